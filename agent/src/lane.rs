//! A disk's data path on a thread of its own. Every NBD request passes between the task that
//! asks, the connection's writer task and its reader task; on the shared multi-threaded runtime
//! those sit on different threads, so each hand-over is a futex wake of a parked worker and a
//! context switch. Measured on 100,000 scattered 4 KiB areas (2 requests each), the agent spent
//! most of its CPU in the kernel's scheduler: 132,000 futex calls, and a socket write for every
//! two requests (the writer woke at once on another core, before more requests were queued).
//! A lane is a single-threaded runtime on its own thread: a disk's connections and its copy run
//! there, hand-overs are queue pushes, and the writer finds many requests queued when it runs.
//! Disks copied at once run on lanes of their own, so they still use every core.
//!
//! Dropping the lane stops its thread: whatever still runs there (a connection's tasks after an
//! error) is dropped with it, and the sockets close.

use std::future::Future;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A single-threaded runtime on a thread of its own.
pub struct Lane {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl Lane {
    /// Starts the lane's thread, named `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Spawned tasks run while the thread waits here: until the lane is dropped.
                let _ = runtime.block_on(stopped);
                // A blocking file write past its deadline may still hold a blocking thread:
                // never wait for it.
                runtime.shutdown_background();
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `f` on the lane and waits for its output. Connections opened inside `f` run their
    /// tasks on the lane too. A panic in `f` is resumed here; dropping the returned future
    /// cancels `f`.
    pub async fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match AbortOnDrop(self.handle.spawn(f)).await {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only the lane's own end cancels its tasks, and the lane outlives this call.
            Err(e) => panic!("a task on a lane that still runs was cancelled: {e}"),
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A spawned task that is aborted when its handle is dropped unfinished.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn runs_on_its_own_thread_and_returns_the_output() {
        let lane = Lane::new("lane-test").expect("lane");
        let (name, spawned) = lane
            .run(async {
                // A task spawned inside runs on the lane as well.
                let inner = tokio::spawn(async { std::thread::current().name().map(String::from) });
                (
                    std::thread::current().name().map(String::from),
                    inner.await.expect("inner task"),
                )
            })
            .await;
        assert_eq!(name.as_deref(), Some("lane-test"));
        assert_eq!(spawned.as_deref(), Some("lane-test"));
    }

    /// Sets its flag when dropped.
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    async fn until_set(flag: &AtomicBool, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !flag.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_dropped_call_cancels_its_task() {
        let lane = Lane::new("lane-cancel").expect("lane");
        let dropped = Arc::new(AtomicBool::new(false));
        let (started, on_lane) = oneshot::channel();
        let flag = Flag(dropped.clone());
        let call = lane.run(async move {
            let _flag = flag;
            let _ = started.send(());
            std::future::pending::<()>().await;
        });
        let mut call = Box::pin(call);
        tokio::select! {
            _ = &mut call => unreachable!("the task never ends by itself"),
            _ = on_lane => {}
        }
        assert!(!dropped.load(Ordering::SeqCst));
        drop(call);
        until_set(&dropped, "the task outlived its dropped call").await;
        // The lane still serves later calls.
        assert_eq!(lane.run(async { 7 }).await, 7);
    }

    #[tokio::test]
    async fn a_dropped_lane_drops_what_still_runs_there() {
        let dropped = Arc::new(AtomicBool::new(false));
        let lane = Lane::new("lane-drop").expect("lane");
        let flag = Flag(dropped.clone());
        lane.run(async move {
            tokio::spawn(async move {
                let _flag = flag;
                std::future::pending::<()>().await;
            });
        })
        .await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(lane);
        until_set(&dropped, "the lane's task outlived it").await;
    }

    #[tokio::test]
    #[should_panic(expected = "boom")]
    async fn a_panic_on_the_lane_is_resumed_in_the_caller() {
        let lane = Lane::new("lane-panic").expect("lane");
        lane.run(async { panic!("boom") }).await
    }
}
