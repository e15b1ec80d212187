//! How many chunks of a copy run at once: a byte budget (the memory bound) and a count cap, so
//! that small chunks run many at once and full-size ones a few.

use futures::StreamExt;
use futures::stream::FusedStream;

use super::map::Job;
use super::{CopyError, CopyOptions};

/// How many chunks a copy keeps in flight: at most `bytes` of them (the memory bound, the same
/// as `max_in_flight` full-size chunks) and at most `chunks` of them. Small CBT areas are small
/// chunks: many more of them run at once than full-size ones, in the same memory, so the
/// requests of scattered 4 KiB areas go out in batches rather than a few at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InFlight {
    bytes: u64,
    chunks: usize,
}

/// Chunks in flight at most, per full-size chunk allowed (`max_in_flight`).
const SMALL_CHUNKS_PER_SLOT: usize = 8;

impl InFlight {
    pub(super) fn of(opts: &CopyOptions) -> Self {
        Self {
            bytes: opts.max_in_flight as u64 * u64::from(opts.request_size),
            chunks: opts.max_in_flight.saturating_mul(SMALL_CHUNKS_PER_SLOT),
        }
    }
}

/// Runs `work` on every job of `jobs`, many at once within `limit` (a job longer than the byte
/// budget runs when nothing else does). The first error ends the run; the jobs still running
/// are dropped.
pub(super) async fn run_bounded<S, F, Fut>(
    jobs: S,
    limit: InFlight,
    mut work: F,
) -> Result<(), CopyError>
where
    S: futures::Stream<Item = Result<Job, CopyError>>,
    F: FnMut(Job) -> Fut,
    Fut: std::future::Future<Output = Result<(), CopyError>>,
{
    let mut jobs = std::pin::pin!(jobs.fuse());
    let mut running = futures::stream::FuturesUnordered::new();
    let mut bytes = 0u64;
    let mut next: Option<Job> = None;
    loop {
        if let Some(job) = next.take() {
            let length = job.chunk.length;
            if running.is_empty() || (running.len() < limit.chunks && bytes + length <= limit.bytes)
            {
                bytes += length;
                let f = work(job);
                running.push(async move { f.await.map(|()| length) });
                continue;
            }
            next = Some(job);
        }
        // Filling comes first: chunks are started until the budget is used, then completions
        // make room.
        tokio::select! {
            biased;
            Some(job) = jobs.next(), if next.is_none() && !jobs.is_terminated() => next = Some(job?),
            Some(done) = running.next(), if !running.is_empty() => bytes -= done?,
            else => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ChangedArea;
    use std::sync::Mutex;

    fn job(start: u64, length: u64) -> Job {
        Job {
            chunk: ChangedArea { start, length },
            segments: Vec::new(),
        }
    }

    /// Runs `jobs` under `limit`, each job taking a few scheduler turns; the most chunks and
    /// bytes seen running at once, and the jobs in the order they started.
    async fn peaks(jobs: Vec<Job>, limit: InFlight) -> (usize, u64, Vec<u64>) {
        let state = Mutex::new((0usize, 0u64, 0usize, 0u64, Vec::new()));
        run_bounded(
            futures::stream::iter(jobs.into_iter().map(Ok)),
            limit,
            |j| {
                let state = &state;
                async move {
                    {
                        let mut s = state.lock().unwrap();
                        s.0 += 1;
                        s.1 += j.chunk.length;
                        s.2 = s.2.max(s.0);
                        s.3 = s.3.max(s.1);
                        s.4.push(j.chunk.start);
                    }
                    for _ in 0..3 {
                        tokio::task::yield_now().await;
                    }
                    let mut s = state.lock().unwrap();
                    s.0 -= 1;
                    s.1 -= j.chunk.length;
                    Ok(())
                }
            },
        )
        .await
        .expect("no error");
        let s = state.into_inner().unwrap();
        (s.2, s.3, s.4)
    }

    #[tokio::test]
    async fn small_chunks_run_many_at_once_within_the_chunk_cap() {
        let limit = InFlight::of(&CopyOptions {
            request_size: 2 << 20,
            max_in_flight: 4,
            ..Default::default()
        });
        assert_eq!(
            limit,
            InFlight {
                bytes: 8 << 20,
                chunks: 4 * SMALL_CHUNKS_PER_SLOT
            }
        );
        let jobs = (0..500).map(|i| job(i * 8192, 4096)).collect();
        let (chunks, bytes, order) = peaks(jobs, limit).await;
        assert_eq!(
            chunks, limit.chunks,
            "as many 4 KiB chunks as the cap allows"
        );
        assert!(bytes <= limit.bytes);
        assert_eq!(order.len(), 500, "every job ran once");
        assert!(order.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[tokio::test]
    async fn full_size_chunks_are_bounded_by_bytes_and_a_longer_one_runs_alone() {
        let limit = InFlight {
            bytes: 8 << 20,
            chunks: 32,
        };
        let jobs = (0..40).map(|i| job(i << 21, 2 << 20)).collect();
        let (chunks, bytes, _) = peaks(jobs, limit).await;
        assert_eq!((chunks, bytes), (4, 8 << 20));
        // A job over the budget waits for the others, then runs by itself.
        let jobs = vec![
            job(0, 1 << 20),
            job(1 << 20, 16 << 20),
            job(17 << 20, 1 << 20),
        ];
        let (chunks, bytes, order) = peaks(jobs, limit).await;
        assert_eq!((chunks, bytes), (1, 16 << 20));
        assert_eq!(order, vec![0, 1 << 20, 17 << 20]);
    }

    #[tokio::test]
    async fn the_first_error_ends_the_run() {
        let limit = InFlight {
            bytes: 1 << 30,
            chunks: 4,
        };
        let started = Mutex::new(0);
        let jobs = (0..100).map(|i| Ok(job(i * 4096, 4096)));
        let r = run_bounded(futures::stream::iter(jobs), limit, |j| {
            *started.lock().unwrap() += 1;
            async move {
                if j.chunk.start == 8192 {
                    Err(CopyError::Options("boom".into()))
                } else {
                    tokio::task::yield_now().await;
                    Ok(())
                }
            }
        })
        .await;
        assert!(matches!(r, Err(CopyError::Options(m)) if m == "boom"));
        assert!(
            *started.lock().unwrap() < 100,
            "no job started after the error"
        );
        // An error from the stream of jobs ends it too.
        let jobs = vec![Ok(job(0, 4096)), Err(CopyError::Options("map".into()))];
        let r = run_bounded(futures::stream::iter(jobs), limit, |_| async { Ok(()) }).await;
        assert!(matches!(r, Err(CopyError::Options(m)) if m == "map"));
    }
}
