//! Adoption (DESIGN.md invariant 2): a side that acknowledged a copy whose owner had not observed
//! the id kept the copy's position in its adoption index ([`Waiting`]). This task sweeps that
//! index: an entry whose owner has since observed the id (nearly always, at the first check) is
//! dropped; one whose owner still has not, once `arbiter.adopt_after` has passed since the first
//! sighting, is adopted — atomically in Redis (`adopt.lua`): the owner becomes this side — and this
//! side reads its copy again from its broker ([`Refetch`]) and delivers it through the same path
//! as any copy (`deliver`). A late owner copy afterwards is answered NOT_MINE or DONE.
//!
//! Each of the index's shards is swept by one instance of the side at a time (a lock in Redis).
//! An adoption takes a call slot before it takes the lease, so a lease is never held by a copy
//! waiting for a slot; an entry leaves the index only once the id's fate is recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{deliver, letter_then_ack, renewing, Held, Shared};
use crate::arbiter::waiting::{self, WaitEntry, Waiting, SHARDS};
use crate::arbiter::{Adopt, AdoptRequest, Completion, LeaseToken, Outcome, State};
use crate::message::{Ack, Finished, Identity, Message, Origin, Side};
use crate::source::{Position, Refetch, Refetched};
use crate::telemetry::metrics::SideMetrics;

/// How often the index is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a shard's lock lasts without renewal (an instance that stopped sweeping gives its
/// shards up after this).
const LOCK_TTL: Duration = Duration::from_secs(15);
/// Entries taken from a shard per round trip.
const CHUNK: usize = 256;
/// How often the index's size is read for the gauge.
const GAUGE_EVERY: Duration = Duration::from_secs(10);
/// How long an entry waits after its copy could not be read (the broker away).
const REFETCH_RETRY: Duration = Duration::from_secs(5);

/// Sweeps `side`'s adoption index until `cancel`; adopted copies are delivered on `tracker`, so
/// that the daemon's drain waits for them like for any call.
pub async fn sweep(
    shared: Arc<Shared>,
    side: Side,
    refetch: Arc<dyn Refetch>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let sweeper = Sweeper {
        index: Waiting::new(&shared.arbiter, &side),
        metrics: shared.metrics.side(&side),
        calls: Arc::new(Semaphore::new(shared.settings.max_in_flight)),
        holder: format!("{:016x}", rand::random::<u64>()),
        shared,
        side,
        refetch,
        cancel,
        tracker,
    };
    sweeper.run().await;
}

struct Sweeper {
    shared: Arc<Shared>,
    side: Side,
    index: Waiting,
    refetch: Arc<dyn Refetch>,
    metrics: SideMetrics,
    /// Adopted copies being delivered at once (the pipeline's `max_in_flight`).
    calls: Arc<Semaphore>,
    /// This instance's name in the shard locks.
    holder: String,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// An id this sweep adopted (or holds as adopter), waiting for its copy to be read again.
struct Adopting {
    member: String,
    entry: WaitEntry,
    token: LeaseToken,
    attempt: u32,
    /// When the lease was asked for (it runs from Redis's answer, later than this).
    asked: Instant,
    permit: OwnedSemaphorePermit,
}

/// What one round of a shard came to, for the log line.
#[derive(Default)]
struct Round {
    adopted: u64,
}

impl Sweeper {
    async fn run(self) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = [false; SHARDS as usize];
        let mut gauge_at = Instant::now();
        let sweeper = Arc::new(self);
        loop {
            tokio::select! {
                _ = sweeper.cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut round = Round::default();
            for n in 0..SHARDS {
                match sweeper.index.lock(n, &sweeper.holder, LOCK_TTL).await {
                    Ok(got) => held[n as usize] = got,
                    // Redis away: the pipelines pause and say so; try again next tick.
                    Err(e) => {
                        tracing::debug!(side = %sweeper.side, error = %e, "adoption sweep skipped");
                        break;
                    }
                }
                if held[n as usize] {
                    Arc::clone(&sweeper).shard(n, &mut round).await;
                }
            }
            if round.adopted > 0 {
                tracing::info!(side = %sweeper.side, ids = round.adopted,
                    adopt_after = ?sweeper.shared.arbiter.adopt_after(),
                    "adopted ids whose routed owner never observed them");
                if let Some(parity) = &sweeper.shared.parity {
                    if let Err(e) = parity
                        .parity()
                        .add_adopted(&sweeper.side, round.adopted)
                        .await
                    {
                        tracing::debug!(side = %sweeper.side, error = %e, "cannot count adoptions for parity");
                    }
                }
            }
            if gauge_at.elapsed() >= GAUGE_EVERY {
                gauge_at = Instant::now();
                if let Ok(n) = sweeper.index.count().await {
                    sweeper.metrics.adoption_waiting.set(n as i64);
                }
            }
        }
        // Let the shards go so that another instance sweeps them at once.
        for n in (0..SHARDS).filter(|n| held[*n as usize]) {
            let _ = sweeper.index.unlock(n, &sweeper.holder).await;
        }
    }

    /// Works through shard `n`'s due entries, a chunk at a time, while call slots are free.
    async fn shard(self: Arc<Self>, n: u32, round: &mut Round) {
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let room = self.calls.available_permits().min(CHUNK);
            if room == 0 {
                return;
            }
            let due = match self.index.due(n, waiting::now_ms(), room).await {
                Ok(due) if !due.is_empty() => due,
                _ => return,
            };
            let full = due.len() == room;
            if self.clone().settle(n, due, round).await.is_err() || !full {
                return;
            }
        }
    }

    /// Asks Redis about a chunk of due entries and acts on each answer.
    async fn settle(
        self: Arc<Self>,
        n: u32,
        due: Vec<(String, Option<WaitEntry>)>,
        round: &mut Round,
    ) -> Result<(), ()> {
        let mut resolved = Vec::new();
        let mut later = Vec::new();
        let mut adopting: Vec<Adopting> = Vec::new();
        let mut entries = Vec::with_capacity(due.len());
        for (member, entry) in due {
            match entry {
                Some(e) => entries.push((member, e)),
                None => {
                    tracing::warn!(side = %self.side, %member, "dropping an adoption entry this version cannot read");
                    resolved.push(member);
                }
            }
        }
        // A call slot per entry before its lease: a granted lease never waits for a slot.
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::with_capacity(entries.len());
        for _ in &entries {
            match self.calls.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        entries.truncate(permits.len());
        let tokens: Vec<LeaseToken> = entries.iter().map(|_| self.shared.tokens.next()).collect();
        let reqs: Vec<AdoptRequest> = entries
            .iter()
            .zip(&tokens)
            .map(|((_, e), token)| AdoptRequest {
                id: &e.id,
                side: &self.side,
                token,
            })
            .collect();
        let asked = Instant::now();
        let answers = match self.shared.arbiter.adopt_batch(&reqs).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(side = %self.side, error = %e, "adoption sweep: redis did not answer");
                return Err(());
            }
        };
        drop(reqs);
        let now = waiting::now_ms();
        let busy_retry = self.shared.settings.busy_retry;
        let hold = 2 * self.shared.arbiter.lease().as_millis() as u64;
        for ((((member, entry), token), answer), permit) in
            entries.into_iter().zip(tokens).zip(answers).zip(permits)
        {
            match answer {
                Ok(
                    Adopt::OwnerSeen | Adopt::Done | Adopt::Gone | Adopt::Dead { letter: true, .. },
                ) => resolved.push(member),
                Ok(Adopt::NotYet { wait }) => later.push((member, now + wait.as_millis() as u64)),
                Ok(Adopt::Busy { retry_in }) => {
                    later.push((member, now + retry_in.max(busy_retry).as_millis() as u64))
                }
                Ok(Adopt::Dead {
                    reason,
                    letter: false,
                }) => {
                    // Out of the way while its letter is written (with the copy read again).
                    later.push((member.clone(), now + hold));
                    let me = self.clone();
                    self.tracker.spawn(async move {
                        me.letter(n, member, entry, reason).await;
                        drop(permit);
                    });
                }
                Ok(Adopt::Proceed {
                    attempt,
                    takeover,
                    adopted,
                }) => {
                    if adopted {
                        round.adopted += 1;
                        self.metrics.adopted.inc();
                        tracing::debug!(id = %entry.id, side = %self.side, "adopted");
                    }
                    if takeover {
                        self.metrics.ambiguous.inc();
                        tracing::warn!(id = %entry.id, side = %self.side, attempt,
                            "took over an expired lease of an adopted id: the earlier call's outcome is unknown (counted as ambiguous)");
                    }
                    // Out of the way while it is delivered; due again only if this instance dies.
                    later.push((member.clone(), now + hold));
                    adopting.push(Adopting {
                        member,
                        entry,
                        token,
                        attempt,
                        asked,
                        permit,
                    });
                }
                Err(e) => {
                    tracing::warn!(id = %entry.id, side = %self.side, error = %e, "adoption check failed; trying again later");
                    later.push((member, now + 60_000));
                }
            }
        }
        // Both before the next chunk is read: what was dealt with is never handed out twice.
        let done = self.index.resolve(n, &resolved).await;
        let moved = self.index.later(n, &later).await;
        if !adopting.is_empty() {
            let me = self.clone();
            self.tracker
                .spawn(async move { me.fetch_and_deliver(n, adopting).await });
        }
        if done.is_err() || moved.is_err() {
            return Err(());
        }
        Ok(())
    }

    /// Reads a chunk's adopted ids' copies again, in one go (the leases renewed meanwhile: a
    /// broker may take a while), then delivers each with its own call slot.
    async fn fetch_and_deliver(self: Arc<Self>, n: u32, adopting: Vec<Adopting>) {
        let positions: Vec<Position> = adopting.iter().map(|a| a.entry.position.clone()).collect();
        let leases: Vec<(&str, &LeaseToken, Instant)> = adopting
            .iter()
            .map(|a| (a.entry.id.as_str(), &a.token, a.asked))
            .collect();
        let (copies, held) =
            renewing(&self.shared, &leases, self.refetch.refetch_many(&positions)).await;
        drop(leases);
        // A lease whose renewal failed meanwhile is confirmed again right before its call.
        let unconfirmed = Instant::now()
            .checked_sub(self.shared.arbiter.lease())
            .unwrap_or_else(Instant::now);
        for ((a, copy), held) in adopting.into_iter().zip(copies).zip(held) {
            let lease = Held {
                token: a.token,
                attempt: a.attempt,
                confirmed: held.unwrap_or(unconfirmed),
            };
            let me = self.clone();
            let permit = a.permit;
            self.tracker.spawn(async move {
                me.deliver(n, a.member, a.entry, lease, copy).await;
                drop(permit);
            });
        }
    }

    /// Delivers an adopted id's copy read again; the entry goes once its fate is recorded.
    async fn deliver(
        &self,
        n: u32,
        member: String,
        entry: WaitEntry,
        lease: Held,
        copy: Result<Option<Refetched>, crate::source::SourceError>,
    ) {
        let copy = match copy {
            Ok(Some(copy)) => copy,
            Ok(None) => {
                self.metrics.refetch_gone.inc();
                let reason = format!(
                    "adopted, but this side's copy at {} is gone from its broker",
                    describe(&entry)
                );
                return self.park(n, member, entry, lease.token, reason, None).await;
            }
            Err(e) => {
                self.metrics.refetch_error.inc();
                tracing::warn!(id = %entry.id, side = %self.side, error = %e,
                    "adopted id: cannot read its copy again now; handing the lease back and trying again later");
                let _ = self
                    .shared
                    .completer
                    .complete(&entry.id, &self.side, lease.token, Outcome::NotCalled)
                    .await;
                let at = waiting::now_ms() + REFETCH_RETRY.as_millis() as u64;
                let _ = self.index.later(n, &[(member, at)]).await;
                return;
            }
        };
        let (msg, mut acked, mut returned) = match self.message(&entry, copy) {
            Ok(parts) => parts,
            Err((reason, copy)) => {
                return self
                    .park(n, member, entry, lease.token, reason, Some(copy))
                    .await
            }
        };
        deliver(
            &self.shared,
            &self.side,
            &self.metrics,
            msg,
            lease,
            &self.cancel,
            &returned.0,
        )
        .await;
        self.finish(n, member, &mut acked, &mut returned.1).await;
    }

    /// The pipeline message of a copy read again, with the channels its fate comes back on; or
    /// why it cannot be delivered (it is not this id's copy).
    #[allow(clippy::type_complexity)]
    fn message(
        &self,
        entry: &WaitEntry,
        copy: Refetched,
    ) -> Result<
        (
            Message,
            mpsc::UnboundedReceiver<Finished>,
            (
                mpsc::UnboundedSender<Message>,
                mpsc::UnboundedReceiver<Message>,
            ),
        ),
        (String, Refetched),
    > {
        let identity = match &copy.identity {
            Ok(ident) if ident.id == entry.id => Identity {
                id: ident.id.clone(),
                business_id: ident.business_id.clone(),
            },
            Ok(ident) => {
                let reason = format!(
                    "adopted, but the copy at {} is message {:?}, not this id",
                    describe(entry),
                    ident.id
                );
                return Err((reason, copy));
            }
            Err(bad) => {
                let reason = format!(
                    "adopted, but the copy at {} cannot be read: {bad}",
                    describe(entry)
                );
                return Err((reason, copy));
            }
        };
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let origin = self.origin(entry, copy.born_ms);
        let msg = Message {
            identity: Ok(identity),
            payload: copy.payload,
            ack: Ack::new(ack_tx, finished(&origin)),
            origin,
            received: std::time::Instant::now(),
            held: crate::source::outlet::Held::none(),
        };
        Ok((msg, ack_rx, (retry_tx, retry_rx)))
    }

    fn origin(&self, entry: &WaitEntry, born_ms: i64) -> Origin {
        Origin {
            side: self.side.clone(),
            topic: entry.position.topic.clone(),
            partition: entry.position.partition,
            broker: entry.position.broker.clone(),
            offset: entry.position.offset,
            born_ms,
        }
    }

    /// After a delivery: its fate recorded (acknowledged) → the entry goes; put back (its lease
    /// was lost or another worker holds the id) → due again soon; neither (shutting down with
    /// Redis away) → left for the next sweep.
    async fn finish(
        &self,
        n: u32,
        member: String,
        acked: &mut mpsc::UnboundedReceiver<Finished>,
        returned: &mut mpsc::UnboundedReceiver<Message>,
    ) {
        if acked.try_recv().is_ok() {
            let _ = self.index.resolve(n, &[member]).await;
        } else if returned.try_recv().is_ok() {
            let at = waiting::now_ms() + self.shared.settings.busy_retry.as_millis() as u64;
            let _ = self.index.later(n, &[(member, at)]).await;
        }
    }

    /// Parks an adopted id whose copy cannot be delivered (gone from the broker, or not this id's)
    /// under the lease just granted: a fatal outcome, then its letter.
    async fn park(
        &self,
        n: u32,
        member: String,
        entry: WaitEntry,
        token: LeaseToken,
        reason: String,
        copy: Option<Refetched>,
    ) {
        let Some(done) = self
            .shared
            .completer
            .complete(&entry.id, &self.side, token, Outcome::Fatal(reason.clone()))
            .await
        else {
            return; // shutting down with Redis away: the entry stays
        };
        if !matches!(
            done,
            Ok(Completion::Recorded(State::Dead) | Completion::Repeated(State::Dead))
        ) {
            // Someone else decided meanwhile; the next sweep reads what.
            return;
        }
        self.letter(n, member, entry, reason).await;
        drop(copy);
    }

    /// Writes the letter of a dead adopted id (with its copy, read again if it can be) and then
    /// drops the entry.
    async fn letter(&self, n: u32, member: String, entry: WaitEntry, reason: String) {
        let copy = self.refetch.refetch(&entry.position).await.ok().flatten();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        let origin = self.origin(&entry, copy.as_ref().map_or(0, |c| c.born_ms));
        let msg = Message {
            identity: Ok(Identity {
                id: entry.id.clone(),
                business_id: copy
                    .as_ref()
                    .and_then(|c| c.identity.as_ref().ok())
                    .map(|i| i.business_id.clone())
                    .unwrap_or_default(),
            }),
            payload: copy.map(|c| c.payload).unwrap_or_default(),
            ack: Ack::new(ack_tx, finished(&origin)),
            origin,
            received: std::time::Instant::now(),
            held: crate::source::outlet::Held::none(),
        };
        letter_then_ack(&self.shared, &self.metrics, msg, &reason, 0, &self.cancel).await;
        if ack_rx.try_recv().is_ok() {
            let _ = self.index.resolve(n, &[member]).await;
        }
    }
}

fn finished(origin: &Origin) -> Finished {
    Finished {
        topic: origin.topic.clone(),
        partition: origin.partition,
        offset: origin.offset,
    }
}

/// A copy's position in words, for reasons and logs.
fn describe(entry: &WaitEntry) -> String {
    let p = &entry.position;
    match &p.broker {
        Some(b) => format!("{b}/{}/{}@{}", p.topic, p.partition, p.offset),
        None => format!("{}[{}]@{}", p.topic, p.partition, p.offset),
    }
}
