//! What the datapath says about the packets it handles: the one reader of the EVENTS ring
//! buffer (drop events, fanned out to `meshd monitor` subscribers) and of the METRICS counters
//! (for `meshd status`). Its own handle on the pinned maps; it writes nothing but the ring
//! buffer's consumer position, which no other task touches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshd_datapath::{Counter, DatapathMaps, DropRecord};
use tokio::sync::{broadcast, watch};

/// Drop events kept for a subscriber that reads slower than drops happen; beyond this it is
/// told how many it missed.
const SUBSCRIBER_BACKLOG: usize = 4096;
/// How often the ring buffer is emptied. The ring holds 1 MiB, about 18k events of 56 bytes
/// with their headers, so a flood overruns it only above ~350k drops per second; the counters
/// still count every packet then.
const POLL: Duration = Duration::from_millis(50);
/// How often the counters are read (a per-CPU lookup for each of the 512 slots).
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

pub struct Monitor {
    maps: DatapathMaps,
    drops: broadcast::Sender<DropRecord>,
    counters: watch::Sender<Arc<Vec<Counter>>>,
}

/// What the API server holds to serve `Monitor` and the counters of `Status`.
#[derive(Clone)]
pub struct MonitorHandle {
    pub drops: broadcast::Sender<DropRecord>,
    pub counters: watch::Receiver<Arc<Vec<Counter>>>,
}

impl Monitor {
    pub fn open(pin_dir: PathBuf) -> anyhow::Result<(Monitor, MonitorHandle)> {
        let maps = DatapathMaps::open(&pin_dir).map_err(|e| {
            anyhow::anyhow!(
                "opening the datapath maps in {} for events: {e}",
                pin_dir.display()
            )
        })?;
        let (drops, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        let (counters, counters_rx) = watch::channel(Arc::new(Vec::new()));
        let handle = MonitorHandle {
            drops: drops.clone(),
            counters: counters_rx,
        };
        Ok((
            Monitor {
                maps,
                drops,
                counters,
            },
            handle,
        ))
    }

    pub async fn run(mut self) {
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_counters = tokio::time::Instant::now() - COUNTERS_EVERY;
        loop {
            poll.tick().await;
            // Emptied even with no subscriber, so a `meshd monitor` started later sees drops
            // from then on, not a backlog from whenever the ring last filled.
            for drop in self.maps.drain_drop_events() {
                // No receiver is not an error: nobody is watching.
                let _ = self.drops.send(drop);
            }
            if last_counters.elapsed() >= COUNTERS_EVERY {
                last_counters = tokio::time::Instant::now();
                match self.maps.counters() {
                    Ok(c) => {
                        self.counters.send_replace(Arc::new(c));
                    }
                    Err(e) => tracing::warn!(error = %e, "reading datapath counters"),
                }
            }
        }
    }
}
