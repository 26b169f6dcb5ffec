//! Bulk work (a page of a list, a big batch of the view or of the maps) off the runtime's
//! worker thread.
//!
//! The agent runs one worker thread (its per-event pipeline is cheapest there: hand-offs
//! between its tasks stay on one thread), so a burst that keeps that thread busy for
//! milliseconds at a time would also keep every other task waiting, and use one core where
//! the two of an initial sync's stages (decoding the list, applying it to the view) could use
//! two. [`off_the_worker`] runs such work under `block_in_place`: the worker's other tasks
//! move to another thread meanwhile.

/// Runs `work` where it does not hold up the runtime's other tasks: under
/// `tokio::task::block_in_place` on a multi-thread runtime; as it is elsewhere (a
/// current-thread runtime, as in tests, has no other thread to hand its tasks to, and
/// outside a runtime nothing waits).
pub fn off_the_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_outside_a_runtime() {
        assert_eq!(off_the_worker(|| 7), 7);
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
