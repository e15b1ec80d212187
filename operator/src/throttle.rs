//! At most one trigger per object and interval: a controller fed by another kind's events (a
//! Repository by the jobs that end in it) would otherwise reconcile once per event, each time
//! reading everything it reads, while 25 jobs end a few seconds apart.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;

/// Passes each item's first occurrence at once; occurrences within `gap` of the last one passed
/// are folded into one, passed when the gap has run out. No item is dropped for good: one that
/// arrives within the gap always has a later pass. When `input` ends, what is pending passes at
/// once and the stream ends.
pub fn throttle<T, S>(input: S, gap: Duration) -> impl Stream<Item = T> + Send + 'static
where
    T: Eq + Hash + Clone + Send + Sync + 'static,
    S: Stream<Item = T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut input = std::pin::pin!(input);
        // When each item last passed, and whether one waits for its gap to run out.
        let mut passed: HashMap<T, Instant> = HashMap::new();
        let mut waiting: HashMap<T, Instant> = HashMap::new();
        loop {
            let next_due = waiting.values().min().copied();
            tokio::select! {
                item = input.next() => {
                    let Some(item) = item else { break };
                    let now = Instant::now();
                    match passed.get(&item) {
                        Some(at) if now < *at + gap => {
                            waiting.entry(item).or_insert(*at + gap);
                        }
                        _ => {
                            passed.insert(item.clone(), now);
                            if tx.send(item).is_err() {
                                return;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                    let now = Instant::now();
                    let due: Vec<T> = waiting
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(t, _)| t.clone())
                        .collect();
                    for item in due {
                        waiting.remove(&item);
                        passed.insert(item.clone(), now);
                        if tx.send(item).is_err() {
                            return;
                        }
                    }
                    // Forget what passed long ago (objects deleted since, say).
                    passed.retain(|_, at| now < *at + gap);
                }
            }
        }
        for (item, _) in waiting.drain() {
            if tx.send(item).is_err() {
                return;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn repeats_within_the_gap_pass_once_when_it_runs_out() {
        let gap = Duration::from_secs(1);
        let start = std::time::Instant::now();
        // Five events of "a" and one of "b" at once, then a late "c" after the gap of "a".
        let input = futures::stream::iter(["a", "a", "b", "a", "a", "a"]).chain(
            futures::stream::once(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "c"
            }),
        );
        let mut out = Box::pin(throttle(input, gap));
        assert_eq!(out.next().await, Some("a"));
        assert_eq!(out.next().await, Some("b"));
        // The folded repeats of "a": one, not before its gap ran out.
        assert_eq!(out.next().await, Some("a"));
        assert!(start.elapsed() >= gap, "{:?}", start.elapsed());
        assert_eq!(out.next().await, Some("c"));
        assert_eq!(out.next().await, None);
    }

    #[tokio::test]
    async fn what_waits_when_the_input_ends_still_passes() {
        let input = futures::stream::iter([1, 1, 2, 2]);
        let mut got: Vec<i32> = throttle(input, Duration::from_secs(3600)).collect().await;
        got.sort();
        assert_eq!(got, vec![1, 1, 2, 2]);
    }
}
