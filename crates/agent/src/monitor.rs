//! What the datapath says about the packets it handles: the one reader of the EVENTS ring
//! buffer (drop events, fanned out to `meshd monitor` subscribers; new connections and drops,
//! kept in a bounded history and fanned out to `meshd observe` subscribers) and of the METRICS
//! counters (read when `meshd status` asks). Its own handles on the pinned maps; it writes
//! nothing but the ring buffer's consumer position, which no other task touches.
//!
//! Driven by a short timer, by the ring buffer's readiness and by requests. The datapath does
//! not wake the reader per event (a wakeup cost the packet about 8 us in a VM, ebpf/bpf/lib/
//! exit.h), only when the ring fills past half: the timer reads the rest, so an event reaches
//! subscribers within EVENT_POLL_INTERVAL. An idle node costs it one look at the ring's
//! positions per tick. A slow subscriber never slows it: each has a bounded backlog and is told
//! how many it missed.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshd_datapath::{Counter, DatapathEvents, DatapathMaps, FlowRecord};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Events kept for a subscriber that reads slower than they happen; beyond this it is told how
/// many it missed.
const SUBSCRIBER_BACKLOG: usize = 4096;
/// How often the ring buffer is read: the most an event waits before `meshd monitor` and
/// `meshd observe` see it (the datapath wakes the reader early only for a flood).
pub const EVENT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long a request waits for the monitor before answering without it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One reported flow: the datapath's record, when the agent read it, and its place in the
/// node's sequence (a subscriber joining history and live stream skips what it already has).
#[derive(Clone, Debug)]
pub struct Flow {
    pub seq: u64,
    pub time_ms: u64,
    pub record: FlowRecord,
}

/// The last `capacity` flows, oldest first.
#[derive(Debug)]
pub struct FlowHistory {
    capacity: usize,
    flows: VecDeque<Arc<Flow>>,
}

impl FlowHistory {
    pub fn new(capacity: usize) -> Self {
        FlowHistory {
            capacity,
            flows: VecDeque::with_capacity(capacity.min(SUBSCRIBER_BACKLOG)),
        }
    }

    pub fn push(&mut self, flow: Arc<Flow>) {
        if self.capacity == 0 {
            return;
        }
        if self.flows.len() == self.capacity {
            self.flows.pop_front();
        }
        self.flows.push_back(flow);
    }

    /// The flows read at or after `since_ms`, oldest first.
    pub fn since(&self, since_ms: u64) -> Vec<Arc<Flow>> {
        // Times only grow (one reader stamps them), so the kept flows are sorted by time.
        let start = self.flows.partition_point(|f| f.time_ms < since_ms);
        self.flows.range(start..).cloned().collect()
    }
}

/// What the monitor reads from the maps on request: the counters, and the entries of the maps
/// the datapath itself fills (the reconciler knows the others').
#[derive(Clone, Debug, Default)]
pub struct Readings {
    pub counters: Vec<Counter>,
    pub ct_entries: u64,
    pub nat_entries: u64,
}

enum Request {
    Readings(oneshot::Sender<Readings>),
    History {
        since_ms: u64,
        reply: oneshot::Sender<Vec<Arc<Flow>>>,
    },
}

pub struct Monitor {
    events: AsyncFd<DatapathEvents>,
    /// For METRICS and EVENT_BUDGET only.
    maps: DatapathMaps,
    drops: broadcast::Sender<FlowRecord>,
    flows: broadcast::Sender<Arc<Flow>>,
    history: FlowHistory,
    next_seq: u64,
    lost: Arc<AtomicU64>,
    requests: mpsc::Receiver<Request>,
}

/// What the API server holds to serve `Monitor`, `Observe` and the counters of `Status`.
#[derive(Clone)]
pub struct MonitorHandle {
    pub drops: broadcast::Sender<FlowRecord>,
    pub flows: broadcast::Sender<Arc<Flow>>,
    lost: Arc<AtomicU64>,
    requests: mpsc::Sender<Request>,
}

impl MonitorHandle {
    async fn ask<T: Default>(
        &self,
        what: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> T {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(make(tx)).await.is_err() {
            tracing::warn!("datapath monitor gone; answering without {what}");
            return T::default();
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(v)) => v,
            _ => {
                tracing::warn!("datapath monitor did not answer; answering without {what}");
                T::default()
            }
        }
    }

    /// The datapath's counters and CT/NAT entries now; empty (and logged) if the monitor does
    /// not answer.
    pub async fn readings(&self) -> Readings {
        self.ask("counters", Request::Readings).await
    }

    /// The flows kept since `since_ms` (Unix ms), oldest first.
    pub async fn history(&self, since_ms: u64) -> Vec<Arc<Flow>> {
        self.ask("flow history", |reply| Request::History { since_ms, reply })
            .await
    }

    /// Events the datapath did not send (rate limit, ring full), as of the last read.
    pub fn events_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Monitor {
    pub fn open(pin_dir: &Path, history: usize) -> anyhow::Result<(Monitor, MonitorHandle)> {
        let context = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "opening the datapath maps in {} for events and counters: {e}",
                pin_dir.display()
            )
        };
        let events = DatapathEvents::open(pin_dir).map_err(|e| context(&e))?;
        // SAFETY: DatapathEvents owns the ring buffer's map fd (aya's MapData holds it as an
        // OwnedFd) until the AsyncFd drops it, and always reports that same fd.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| context(&e))?;
        let maps = DatapathMaps::open(pin_dir).map_err(|e| context(&e))?;
        let lost = Arc::new(AtomicU64::new(maps.events_lost().unwrap_or(0)));
        let (drops, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        let (flows, _) = broadcast::channel(SUBSCRIBER_BACKLOG);
        let (requests_tx, requests) = mpsc::channel(16);
        let handle = MonitorHandle {
            drops: drops.clone(),
            flows: flows.clone(),
            lost: lost.clone(),
            requests: requests_tx,
        };
        Ok((
            Monitor {
                events,
                maps,
                drops,
                flows,
                history: FlowHistory::new(history),
                next_seq: 1,
                lost,
                requests,
            },
            handle,
        ))
    }

    fn record(&mut self, record: FlowRecord, time_ms: u64) {
        if record.is_drop() {
            // No receiver is not an error: nobody is watching.
            let _ = self.drops.send(record);
        }
        let flow = Arc::new(Flow {
            seq: self.next_seq,
            time_ms,
            record,
        });
        self.next_seq += 1;
        self.history.push(flow.clone());
        let _ = self.flows.send(flow);
    }

    /// Hands events read from the ring buffer to the history and the subscribers.
    fn read_events(&mut self, records: Vec<FlowRecord>) {
        let now = crate::now_ms();
        for record in records {
            self.record(record, now);
        }
        if let Ok(lost) = self.maps.events_lost() {
            self.lost.store(lost, Ordering::Relaxed);
        }
    }

    pub async fn run(mut self) {
        let mut poll = tokio::time::interval(EVENT_POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    // Emptied even with no subscriber, as below.
                    let records = self.events.get_mut().drain();
                    if !records.is_empty() {
                        self.read_events(records);
                    }
                }
                ready = self.events.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(e) => {
                            tracing::error!(error = %e, "polling the datapath's event ring; drop and flow events stop");
                            return;
                        }
                    };
                    // Emptied even with no subscriber, so a `meshd monitor` started later sees
                    // drops from then on, not a backlog from whenever the ring last filled.
                    let records = guard.get_inner_mut().drain();
                    // Keeps the readiness if the kernel signalled again while we drained.
                    guard.clear_ready();
                    self.read_events(records);
                }
                Some(request) = self.requests.recv() => match request {
                    Request::Readings(reply) => {
                        let counters = self.maps.counters().unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "reading datapath counters");
                            Vec::new()
                        });
                        if let Ok(lost) = self.maps.events_lost() {
                            self.lost.store(lost, Ordering::Relaxed);
                        }
                        // A walk of each map: proportional to its entries, once per scrape or
                        // status, never per packet or event.
                        let _ = reply.send(Readings {
                            counters,
                            ct_entries: self.maps.ct_len() as u64,
                            nat_entries: self.maps.nat_len() as u64,
                        });
                    }
                    Request::History { since_ms, reply } => {
                        let _ = reply.send(self.history.since(since_ms));
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_datapath::{Direction, FlowVerdict};
    use std::net::Ipv4Addr;

    fn flow(seq: u64, time_ms: u64) -> Arc<Flow> {
        Arc::new(Flow {
            seq,
            time_ms,
            record: FlowRecord {
                verdict: FlowVerdict::Forwarded,
                timestamp_ns: 0,
                reason: meshd_ebpf::abi::FWD_TUNNEL,
                direction: Direction::Egress,
                src_identity: 0,
                dst_identity: 0,
                saddr: Ipv4Addr::LOCALHOST,
                daddr: Ipv4Addr::LOCALHOST,
                sport: 1,
                dport: 2,
                proto: 6,
                ifindex: 0,
                service: None,
            },
        })
    }

    #[test]
    fn history_keeps_the_newest_flows_and_answers_since() {
        let mut h = FlowHistory::new(3);
        for (seq, t) in [(1, 10), (2, 20), (3, 20), (4, 30)] {
            h.push(flow(seq, t));
        }
        let seqs = |v: Vec<Arc<Flow>>| v.iter().map(|f| f.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(h.since(0)),
            [2, 3, 4],
            "the oldest is dropped at capacity"
        );
        assert_eq!(seqs(h.since(20)), [2, 3, 4]);
        assert_eq!(seqs(h.since(21)), [4]);
        assert_eq!(seqs(h.since(31)), Vec::<u64>::new());
        let mut none = FlowHistory::new(0);
        none.push(flow(1, 1));
        assert!(none.since(0).is_empty());
    }
}
