//! Bulk work (a page of a list, a big batch of the view or of the maps) off the runtime's
//! worker thread.
//!
//! The agent runs one worker thread (its per-event pipeline is cheapest there: hand-offs
//! between its tasks stay on one thread), so a burst that keeps that thread busy for
//! milliseconds at a time would also keep every other task waiting, and use one core where
//! the two of an initial sync's stages (decoding the list, applying it to the view) could use
//! two. [`off_the_worker`] runs such work under `block_in_place`: the worker's other tasks
//! move to another thread meanwhile.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Runs `work` where it does not hold up the runtime's other tasks: under
/// `tokio::task::block_in_place` on a multi-thread runtime; as it is elsewhere (a
/// current-thread runtime, as in tests, has no other thread to hand its tasks to, and
/// outside a runtime nothing waits).
///
/// The work is also recorded as bulk work, for [`bulk_work_within`].
pub fn off_the_worker<T>(work: impl FnOnce() -> T) -> T {
    let _bulk = BULK.start();
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Whether bulk work runs now, or ended less than `window` ago, anywhere in the process.
///
/// The agent's wake-up moderation (`meshd_agent::moderation`) asks this before a worker naps:
/// a nap pays off for a steady trickle of small events, and would only delay an initial sync
/// or a full diff, whose stages hand their pages and batches to each other through short idle
/// spells.
pub fn bulk_work_within(window: Duration) -> bool {
    BULK.within(window)
}

static BULK: BulkClock = BulkClock::new();

/// Bulk work running and when it last ended.
struct BulkClock {
    running: AtomicUsize,
    /// When bulk work last ended ([`nanos_since_epoch`]); 0: never.
    ended_ns: AtomicU64,
}

impl BulkClock {
    const fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            ended_ns: AtomicU64::new(0),
        }
    }

    fn start(&self) -> BulkWork<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        BulkWork(self)
    }

    fn within(&self, window: Duration) -> bool {
        if self.running.load(Ordering::Relaxed) > 0 {
            return true;
        }
        match self.ended_ns.load(Ordering::Relaxed) {
            0 => false,
            ended => nanos_since_epoch() <= ended.saturating_add(window.as_nanos() as u64),
        }
    }
}

/// One piece of bulk work, from its start to its end (also when it panics).
struct BulkWork<'a>(&'a BulkClock);

impl Drop for BulkWork<'_> {
    fn drop(&mut self) {
        // At least 1: 0 means "never".
        let now = nanos_since_epoch().max(1);
        self.0.ended_ns.fetch_max(now, Ordering::Relaxed);
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Nanoseconds since the process first asked.
fn nanos_since_epoch() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_outside_a_runtime() {
        assert_eq!(off_the_worker(|| 7), 7);
    }

    /// Bulk work reads as such while it runs and for the window after it (a clock of the
    /// test's own: the process's is shared by every test here).
    #[test]
    fn bulk_work_is_seen_while_it_runs_and_for_a_window_after() {
        let clock = BulkClock::new();
        let window = Duration::from_millis(200);
        assert!(!clock.within(window), "bulk work seen before any ran");
        let work = clock.start();
        assert!(
            clock.within(Duration::ZERO),
            "bulk work in progress not seen"
        );
        drop(work);
        assert!(
            clock.within(window),
            "bulk work just ended not seen within the window"
        );
        std::thread::sleep(window + Duration::from_millis(50));
        assert!(
            !clock.within(window),
            "bulk work that ended more than a window ago still seen"
        );
    }

    #[test]
    fn off_the_worker_counts_as_bulk_work() {
        assert!(off_the_worker(|| bulk_work_within(Duration::ZERO)));
    }

    #[tokio::test]
    async fn runs_on_a_current_thread_runtime() {
        // block_in_place would panic here.
        assert_eq!(off_the_worker(|| 7), 7);
    }

    /// The one worker blocks in `work` until a task spawned after it has run: only possible
    /// if the worker's tasks were handed to another thread meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn lets_other_tasks_run_on_a_one_worker_runtime() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        let blocker = tokio::spawn(async move {
            off_the_worker(move || {
                started_tx.send(()).unwrap();
                rx.recv_timeout(std::time::Duration::from_secs(5))
            })
        });
        started.recv().unwrap();
        tokio::spawn(async move { tx.send(()).unwrap() });
        blocker
            .await
            .unwrap()
            .expect("the task spawned later never ran: the worker was held");
    }
}
