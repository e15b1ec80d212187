//! A bandwidth cap shared by every disk of one backup (`--max-bandwidth-mbps`): each read from
//! the source reserves its bytes on a virtual clock that advances at the capped rate, and waits
//! until its reservation starts. Idle time is not saved up beyond one second's worth, so a cap
//! holds after a pause too; the clock starts at the first read, so the time spent before the
//! copy (login, snapshot) is no burst allowance.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_second: f64,
    /// When the next reservation may start (None before the first read).
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A cap of `mbps` megabits (10^6 bits) per second.
    pub fn from_mbps(mbps: u32) -> Self {
        Self {
            bytes_per_second: f64::from(mbps.max(1)) * 1_000_000.0 / 8.0,
            next: Mutex::new(None),
        }
    }

    /// How long `bytes` take at the cap.
    pub fn duration_of(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_second)
    }

    /// Waits until `bytes` may be read without exceeding the cap.
    pub async fn acquire(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            // At most one second of unused capacity is kept: a burst after a pause stays small.
            let start = match *next {
                None => now,
                Some(n) => n.max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now)),
            };
            *next = Some(start + self.duration_of(bytes));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reads_are_spaced_at_the_capped_rate() {
        // 8 Mbit/s = 1 MB/s: ten 1 MB reads take about nine seconds after the first (one
        // second of burst allowance is granted at the start only when time has passed).
        let r = RateLimiter::from_mbps(8);
        assert_eq!(r.duration_of(1_000_000), Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..10 {
            r.acquire(1_000_000).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_saves_up_at_most_one_second() {
        let r = RateLimiter::from_mbps(8);
        r.acquire(1_000_000).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        for _ in 0..3 {
            r.acquire(1_000_000).await;
        }
        // The first read uses the saved second, the next two wait one second each.
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_time_before_the_first_read_is_no_burst() {
        let r = RateLimiter::from_mbps(8);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        for _ in 0..3 {
            r.acquire(1_000_000).await;
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }
}
