//! What the datapath says about the packets it handles: the one reader of the EVENTS ring
//! buffer (drop events, fanned out to `meshd monitor` subscribers) and of the METRICS counters
//! (read when `meshd status` asks). Its own handles on the pinned maps; it writes nothing but
//! the ring buffer's consumer position, which no other task touches.
//!
//! Driven by the ring buffer's readiness and by requests: an idle node costs it nothing.

use std::path::Path;
use std::time::Duration;

use meshd_datapath::{Counter, DatapathMaps, DropEvents, DropRecord};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Drop events kept for a subscriber that reads slower than drops happen; beyond this it is
/// told how many it missed.
const SUBSCRIBER_BACKLOG: usize = 4096;
/// How long `Status` waits for the counters before answering without them.
const COUNTERS_TIMEOUT: Duration = Duration::from_secs(2);

type CountersRequest = oneshot::Sender<Vec<Counter>>;

pub struct Monitor {
    events: AsyncFd<DropEvents>,
    /// For METRICS only.
    maps: DatapathMaps,
    drops: broadcast::Sender<DropRecord>,
    requests: mpsc::Receiver<CountersRequest>,
}

/// What the API server holds to serve `Monitor` and the counters of `Status`.
#[derive(Clone)]
pub struct MonitorHandle {
    pub drops: broadcast::Sender<DropRecord>,
    requests: mpsc::Sender<CountersRequest>,
}

impl MonitorHandle {
    /// The datapath's counters now; empty (and logged) if the monitor does not answer.
    pub async fn counters(&self) -> Vec<Counter> {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(tx).await.is_err() {
            tracing::warn!("datapath monitor gone; status without counters");
            return Vec::new();
        }
        match tokio::time::timeout(COUNTERS_TIMEOUT, rx).await {
            Ok(Ok(counters)) => counters,
            _ => {
                tracing::warn!("datapath monitor did not answer; status without counters");
                Vec::new()
            }
        }
    }
}

impl Monitor {
    pub fn open(pin_dir: &Path) -> anyhow::Result<(Monitor, MonitorHandle)> {
        let context = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "opening the datapath maps in {} for events and counters: {e}",
                pin_dir.display()
            )
        };
        let events = DropEvents::open(pin_dir).map_err(|e| context(&e))?;
        // SAFETY: DropEvents owns the ring buffer's map fd (aya's MapData holds it as an
        // OwnedFd) until the AsyncFd drops it, and always reports that same fd.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| context(&e))?;
        let maps = DatapathMaps::open(pin_dir).map_err(|e| context(&e))?;
        let (drops, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        let (requests_tx, requests) = mpsc::channel(16);
        let handle = MonitorHandle {
            drops: drops.clone(),
            requests: requests_tx,
        };
        Ok((
            Monitor {
                events,
                maps,
                drops,
                requests,
            },
            handle,
        ))
    }

    pub async fn run(mut self) {
        loop {
            tokio::select! {
                ready = self.events.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            tracing::error!(error = %e, "polling the datapath's event ring; drop events stop");
                            return;
                        }
                    };
                    // Emptied even with no subscriber, so a `meshd monitor` started later sees
                    // drops from then on, not a backlog from whenever the ring last filled.
                    for drop in guard.get_inner_mut().drain() {
                        // No receiver is not an error: nobody is watching.
                        let _ = self.drops.send(drop);
                    }
                    // Keeps the readiness if the kernel signalled again while we drained.
                    guard.clear_ready();
                }
                Some(reply) = self.requests.recv() => {
                    let counters = self.maps.counters().unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "reading datapath counters");
                        Vec::new()
                    });
                    let _ = reply.send(counters);
                }
            }
        }
    }
}
