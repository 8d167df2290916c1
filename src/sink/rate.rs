//! A ceiling on calls per second to the endpoint (`sink.rate_limit_per_second`), so that a backlog
//! drained after an outage, or both sides at full speed, cannot flood a downstream that was sized
//! for the usual traffic.
//!
//! The bucket holds one token: calls are spaced evenly at `1 / rate` rather than let through in
//! bursts, which is what a downstream sized in "requests per second" expects.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// An evenly spaced rate limit, shared by every caller of one sink.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    /// The earliest moment the next call may start.
    next_slot: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// A limit of `per_second` calls per second (at least one: zero is taken as one).
    pub fn new(per_second: u32) -> Self {
        let per_second = u64::from(per_second.max(1));
        Self {
            interval: Duration::from_nanos(1_000_000_000 / per_second),
            next_slot: Mutex::new(None),
        }
    }

    /// The spacing between two calls.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Waits for this caller's turn. Each caller reserves the next free slot at once and then
    /// sleeps until it, so waiters are served in order and no lock is held while sleeping. A
    /// caller that is cancelled while waiting leaves its slot unused (the rate only gets lower).
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // An idle limiter does not bank credit: the slot is never in the past.
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn n_acquires_take_n_minus_one_intervals() {
        let rate = RateLimit::new(10);
        let start = Instant::now();
        for _ in 0..21 {
            rate.acquire().await;
        }
        // The first call goes at once, the next 20 are spaced 100 ms apart.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_are_spaced_too() {
        let rate = std::sync::Arc::new(RateLimit::new(4));
        let start = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let rate = rate.clone();
                tokio::spawn(async move {
                    rate.acquire().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        let want: Vec<Duration> = (0..8).map(|i| Duration::from_millis(250 * i)).collect();
        assert_eq!(times, want);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_banked_as_a_burst() {
        let rate = RateLimit::new(2);
        rate.acquire().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        for _ in 0..3 {
            rate.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
