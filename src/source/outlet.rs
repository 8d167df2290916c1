//! Where a source hands its copies over: the bounded channel to its pipeline (`pipeline.channel`
//! copies) and a byte budget (`pipeline.max_buffered_bytes`) for the bodies those copies carry.
//!
//! A copy takes its body's size from the budget before it enters the channel and gives it back
//! when it is dropped: after its fate is recorded and it is acknowledged, or when it is handed
//! back. So the bodies between a source and the fate of each copy (the channel, the claim
//! batches, calls in flight, copies waiting for a retry or for the other side) never add up to
//! more than the budget. `max_buffered_bytes >= max_message_bytes` (validated), so any copy fits
//! alone; a copy larger than the budget would still take the whole budget and pass alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::message::Message;

/// One side's byte budget; clones share it.
#[derive(Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

struct Inner {
    permits: Arc<Semaphore>,
    total: usize,
    held: AtomicUsize,
    peak: AtomicUsize,
    gauge: Option<(IntGauge, IntGauge)>,
}

impl ByteBudget {
    /// A budget of `total` bytes; `gauges` (current, peak) follow what is held.
    pub fn new(total: usize, gauges: Option<(IntGauge, IntGauge)>) -> ByteBudget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        ByteBudget {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(total)),
                total,
                held: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                gauge: gauges,
            }),
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.inner.total
    }

    /// Bytes not held now.
    pub fn available(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// The most bytes held at once so far.
    pub fn peak(&self) -> usize {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// What a body of `bytes` takes: all of it, or the whole budget if it is larger.
    fn share(&self, bytes: usize) -> u32 {
        bytes.min(self.inner.total).min(u32::MAX as usize) as u32
    }

    /// Takes `bytes` now if they are free.
    pub fn try_hold(&self, bytes: usize) -> Option<Held> {
        let n = self.share(bytes);
        let permit = self.inner.permits.clone().try_acquire_many_owned(n).ok()?;
        Some(self.held(permit))
    }

    /// Takes `bytes`, waiting until they are free. Cancel-safe.
    pub async fn hold(&self, bytes: usize) -> Held {
        let n = self.share(bytes);
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphore is never closed");
        self.held(permit)
    }

    fn held(&self, permit: OwnedSemaphorePermit) -> Held {
        let n = permit.num_permits();
        if n > 0 {
            let now = self.inner.held.fetch_add(n, Ordering::Relaxed) + n;
            let peak = self.inner.peak.fetch_max(now, Ordering::Relaxed).max(now);
            if let Some((current, top)) = &self.inner.gauge {
                current.add(n as i64);
                top.set(peak as i64);
            }
        }
        Held {
            permit: Some(permit),
            budget: Some(self.inner.clone()),
        }
    }
}

/// Bytes of a [`ByteBudget`] held by one copy (or a batch being handed over); given back when
/// dropped.
#[derive(Default)]
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
    budget: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({})", self.bytes())
    }
}

impl Held {
    /// Nothing held: copies that never went through a source's outlet (adopted copies, tests).
    pub fn none() -> Held {
        Held::default()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Moves up to `bytes` of this hold into a hold of their own.
    pub fn split(&mut self, bytes: usize) -> Held {
        let n = bytes.min(self.bytes());
        match self.permit.as_mut().and_then(|p| p.split(n)) {
            Some(permit) => Held {
                permit: Some(permit),
                budget: self.budget.clone(),
            },
            None => Held::none(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let n = self.bytes();
        if let (Some(inner), true) = (&self.budget, n > 0) {
            inner.held.fetch_sub(n, Ordering::Relaxed);
            if let Some((current, _)) = &inner.gauge {
                current.sub(n as i64);
            }
        }
        // The permit itself goes back to the semaphore as it drops.
    }
}

/// A source's way into its pipeline: the channel and the byte budget together.
#[derive(Clone)]
pub struct Outlet {
    tx: mpsc::Sender<Message>,
    budget: ByteBudget,
}

impl Outlet {
    /// An outlet over `tx` that holds bodies against `budget`.
    pub fn new(tx: mpsc::Sender<Message>, budget: ByteBudget) -> Outlet {
        Outlet { tx, budget }
    }

    /// The byte budget.
    pub fn budget(&self) -> &ByteBudget {
        &self.budget
    }

    /// Free slots in the channel now.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The channel's size.
    pub fn max_capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// Whether half the channel and half the budget are free: where a source paused for
    /// backpressure fetches again (not at the first free slot or byte, which would flap).
    pub fn half_free(&self) -> bool {
        self.tx.capacity() >= (self.tx.max_capacity() / 2).max(1)
            && self.budget.available() >= self.budget.total() / 2
    }

    /// Sends `msg` if the channel has a slot and the budget its body's bytes; hands it back
    /// (`Full`) otherwise.
    // The copy comes back by value, as from tokio's own `try_send`: boxing it would allocate
    // per copy on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, mut msg: Message) -> Result<(), TrySendError<Message>> {
        let Some(held) = self.budget.try_hold(msg.payload.len()) else {
            return Err(TrySendError::Full(msg));
        };
        match self.tx.try_reserve() {
            Ok(slot) => {
                msg.held = held;
                slot.send(msg);
                Ok(())
            }
            Err(TrySendError::Full(())) => Err(TrySendError::Full(msg)),
            Err(TrySendError::Closed(())) => Err(TrySendError::Closed(msg)),
        }
    }

    /// Waits for `bytes` of the budget, then for a slot: a [`Slot`] for a copy of that size.
    /// `Err` once the pipeline is gone. Cancel-safe.
    pub async fn reserve(&self, bytes: usize) -> Result<Slot<'_>, ()> {
        let held = self.budget.hold(bytes).await;
        let permit = self.tx.reserve().await.map_err(drop)?;
        Ok(Slot {
            permit,
            held,
            budget: &self.budget,
        })
    }

    /// Waits for the bytes of all `sizes` at once, then for as many slots: the slots and the
    /// hold to [`Held::split`] among the copies. `Err` once the pipeline is gone. Cancel-safe.
    pub async fn reserve_many(
        &self,
        sizes: &[usize],
    ) -> Result<(mpsc::PermitIterator<'_, Message>, Held), ()> {
        let total = sizes.iter().map(|s| (*s).min(self.budget.total())).sum();
        let held = self.budget.hold(total).await;
        let permits = self.tx.reserve_many(sizes.len()).await.map_err(drop)?;
        Ok((permits, held))
    }
}

/// A slot in the channel and the bytes for one copy.
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Message>,
    held: Held,
    budget: &'a ByteBudget,
}

impl Slot<'_> {
    /// Sends `msg`, which may be a different copy than the one the slot was reserved for (a
    /// revocation dropped that one): bytes held beyond its body are given back, and bytes
    /// missing are taken if free; if they are not, the copy comes back.
    #[allow(clippy::result_large_err)]
    pub fn send(mut self, mut msg: Message) -> Result<(), Message> {
        let want = self.budget.share(msg.payload.len()) as usize;
        let have = self.held.bytes();
        if want > have {
            let Some(more) = self.budget.try_hold(want - have) else {
                return Err(msg);
            };
            if let (Some(p), Some(m)) = (self.held.permit.as_mut(), more.permit_taken()) {
                p.merge(m);
            }
        } else {
            drop(self.held.split(have - want));
        }
        msg.held = self.held;
        self.permit.send(msg);
        Ok(())
    }
}

impl Held {
    /// The permit, leaving the accounting to whoever merges it into another hold of the same
    /// budget (the bytes stay counted as held).
    fn permit_taken(mut self) -> Option<OwnedSemaphorePermit> {
        self.budget = None;
        self.permit.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_bounded_and_given_back_when_dropped() {
        let b = ByteBudget::new(100, None);
        let a = b.try_hold(60).expect("free");
        assert!(b.try_hold(41).is_none(), "over the budget");
        let c = b.try_hold(40).expect("fits");
        assert_eq!((b.available(), b.peak()), (0, 100));
        drop(a);
        assert_eq!(b.available(), 60);
        drop(c);
        assert_eq!(b.available(), 100);
    }

    #[test]
    fn a_body_larger_than_the_budget_takes_all_of_it_and_passes_alone() {
        let b = ByteBudget::new(100, None);
        let big = b.try_hold(1_000).expect("the whole budget");
        assert_eq!(big.bytes(), 100);
        assert!(b.try_hold(1).is_none());
        drop(big);
        assert!(b.try_hold(1).is_some());
    }

    #[test]
    fn a_split_hold_gives_back_each_part_on_its_own() {
        let b = ByteBudget::new(100, None);
        let mut all = b.try_hold(90).unwrap();
        let part = all.split(30);
        assert_eq!((all.bytes(), part.bytes()), (60, 30));
        drop(part);
        assert_eq!(b.available(), 40);
        drop(all);
        assert_eq!(b.available(), 100);
    }

    #[tokio::test]
    async fn a_hold_waits_until_the_bytes_are_free() {
        let b = ByteBudget::new(100, None);
        let first = b.try_hold(80).unwrap();
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.hold(50).await.bytes() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "50 bytes are not free yet");
        drop(first);
        assert_eq!(waiting.await.unwrap(), 50);
    }

    #[test]
    fn gauges_follow_what_is_held_and_the_peak() {
        let current = IntGauge::new("c", "c").unwrap();
        let peak = IntGauge::new("p", "p").unwrap();
        let b = ByteBudget::new(100, Some((current.clone(), peak.clone())));
        let a = b.try_hold(70).unwrap();
        let mut c = b.try_hold(20).unwrap();
        drop(c.split(5));
        assert_eq!((current.get(), peak.get()), (85, 90));
        drop(a);
        drop(c);
        assert_eq!((current.get(), peak.get()), (0, 90));
    }
}
