//! The view task's inputs: one bounded queue per cluster, taken in turns.
//!
//! Why not one channel: every cluster's watcher used to feed one channel (65,536 events) into
//! the view task, so a cluster that floods (a 600,000-key list, or 10,000 changes a second)
//! filled it, and a quiet cluster's one change waited behind the whole backlog: in the 1M-key
//! flood of `make floods` a change of c2 did not reach c1's maps within 30 s. Here each cluster
//! (the local one and each remote) has a queue of its own, and the view task takes them round
//! robin, at most [`PER_TURN`] events a turn: a quiet cluster's event is taken within one turn
//! of each busy cluster, whatever their backlogs. A flooding cluster's backlog stays in its own
//! queue and, once that is full, in its watcher (which waits to send), never in front of
//! another cluster's events.
//!
//! What stays: the events of one cluster keep their order (one FIFO queue per cluster name for
//! the agent's lifetime: a watcher restarted for a changed remote file, and the
//! `ClusterRemoved` sent when the file goes, use the same queue, so nothing of an old watcher
//! can come after them). Events of different clusters were never ordered (they come from
//! different etcds). Backpressure is per cluster: a full queue makes its own watcher wait.
//!
//! Cost: O(1) per event. A queue is scheduled (its id in the turn order) at most once: its
//! flag says so, set by the sender that finds it down after sending, cleared by the view task
//! before it takes a turn. An idle agent wakes on the wake channel, not by polling every queue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use meshd_state::ClusterName;
use tokio::sync::mpsc;

use crate::watcher::ViewInput;

/// Events queued per cluster at most: enough for a turn and the next while the view task
/// works, small enough that 255 clusters flooding at once hold tens of MiB, not GiB.
pub const QUEUE: usize = 1024;

/// Events taken from one cluster's queue per turn at most: how far a quiet cluster's event can
/// be behind each busy cluster.
pub const PER_TURN: usize = 256;

/// What the view task is told on its wake channel.
enum Wake {
    /// A cluster seen for the first time: its queue.
    Added(Source),
    /// The queue with this id has events (sent once per scheduling, see [`InputSender::send`]).
    Ready(usize),
}

/// The view task's end of one cluster's queue.
struct Source {
    id: usize,
    rx: mpsc::Receiver<ViewInput>,
    scheduled: Arc<AtomicBool>,
}

/// The view task's end: every cluster's queue, and whose turn is next.
pub struct Inputs {
    wakes: mpsc::UnboundedReceiver<Wake>,
    /// By id (ids are handed out in order, never reused).
    sources: Vec<Source>,
    /// Queues with events (or, rarely, whose events were taken by a turn before this entry's):
    /// the round-robin order.
    turns: VecDeque<usize>,
    /// The queue the last turn was taken from.
    last_turn: Option<usize>,
}

/// One cluster's sending end (cloned by whoever sends for that cluster).
#[derive(Clone)]
pub struct InputSender {
    id: usize,
    tx: mpsc::Sender<ViewInput>,
    scheduled: Arc<AtomicBool>,
    wakes: mpsc::UnboundedSender<Wake>,
}

/// The view task is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the view task is gone")]
pub struct Closed;

impl InputSender {
    /// Queues `input`, waiting while this cluster's queue is full (only this cluster waits).
    pub async fn send(&self, input: ViewInput) -> Result<(), Closed> {
        self.tx.send(input).await.map_err(|_| Closed)?;
        // After the event is in the queue. The view task clears the flag (a swap, so it sees
        // what the sender that set it had queued) before it takes a turn: either that turn
        // takes this event, or this swap finds the flag down and schedules the queue again.
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.wakes.send(Wake::Ready(self.id)).map_err(|_| Closed)?;
        }
        Ok(())
    }
}

struct Registry {
    wakes: mpsc::UnboundedSender<Wake>,
    senders: BTreeMap<ClusterName, InputSender>,
    capacity: usize,
}

/// Hands out each cluster's [`InputSender`] (cheap to clone; shared by the local watcher, the
/// remote watchers and whoever drains a removed cluster).
#[derive(Clone)]
pub struct InputQueues {
    registry: Arc<Mutex<Registry>>,
}

/// Queues of `capacity` events per cluster, and the view task's end of them.
pub fn input_queues(capacity: usize) -> (InputQueues, Inputs) {
    let (wakes, wakes_rx) = mpsc::unbounded_channel();
    let queues = InputQueues {
        registry: Arc::new(Mutex::new(Registry {
            wakes,
            senders: BTreeMap::new(),
            capacity,
        })),
    };
    let inputs = Inputs {
        wakes: wakes_rx,
        sources: Vec::new(),
        turns: VecDeque::new(),
        last_turn: None,
    };
    (queues, inputs)
}

impl InputQueues {
    /// `cluster`'s sender: the same queue every time (kept for the agent's lifetime, so that a
    /// cluster's events stay in order across its watchers; a removed cluster's queue is an
    /// empty channel).
    pub fn sender(&self, cluster: &ClusterName) -> InputSender {
        let mut r = self.registry.lock().expect("input registry poisoned");
        if let Some(s) = r.senders.get(cluster) {
            return s.clone();
        }
        let (tx, rx) = mpsc::channel(r.capacity);
        let scheduled = Arc::new(AtomicBool::new(false));
        let id = r.senders.len();
        // Before any event of the queue: the view task learns of it first.
        let _ = r.wakes.send(Wake::Added(Source {
            id,
            rx,
            scheduled: scheduled.clone(),
        }));
        let sender = InputSender {
            id,
            tx,
            scheduled,
            wakes: r.wakes.clone(),
        };
        r.senders.insert(cluster.clone(), sender.clone());
        sender
    }
}

impl Inputs {
    /// Waits for the next turn: at most [`PER_TURN`] events of one cluster, into `turn` (which
    /// is cleared first). False once every sender is gone. Cancel-safe (it only waits on the
    /// wake channel).
    pub async fn next_turn(&mut self, turn: &mut Vec<ViewInput>) -> bool {
        loop {
            if self.try_turn(turn) {
                return true;
            }
            match self.wakes.recv().await {
                Some(w) => self.wake(w),
                None => return false,
            }
        }
    }

    /// Clusters other than the last turn's with events waiting for a turn now: the turns that
    /// complete a pass over every cluster with events (see the view task's rounds).
    pub fn others_waiting(&mut self) -> usize {
        while let Ok(w) = self.wakes.try_recv() {
            self.wake(w);
        }
        self.turns
            .iter()
            .filter(|&&id| Some(id) != self.last_turn)
            .count()
    }

    /// The next turn if some cluster has events, without waiting.
    pub fn try_turn(&mut self, turn: &mut Vec<ViewInput>) -> bool {
        turn.clear();
        // Wakes first: a cluster that has just got events joins the back of the order.
        while let Ok(w) = self.wakes.try_recv() {
            self.wake(w);
        }
        while let Some(id) = self.turns.pop_front() {
            let source = &mut self.sources[id];
            // Cleared before taking (see InputSender::send).
            source.scheduled.swap(false, Ordering::AcqRel);
            while turn.len() < PER_TURN {
                match source.rx.try_recv() {
                    Ok(input) => turn.push(input),
                    Err(_) => break,
                }
            }
            // A full turn may have left events: back of the order, unless a sender has
            // scheduled the queue again meanwhile.
            if turn.len() == PER_TURN && !source.scheduled.swap(true, Ordering::AcqRel) {
                self.turns.push_back(id);
            }
            if !turn.is_empty() {
                self.last_turn = Some(id);
                return true;
            }
        }
        false
    }

    fn wake(&mut self, wake: Wake) {
        match wake {
            Wake::Added(source) => {
                debug_assert_eq!(source.id, self.sources.len());
                self.sources.push(source);
            }
            Wake::Ready(id) => self.turns.push_back(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd_mesh::{ClusterEvent, EventKind, ResourceKind};

    use super::*;

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    fn event(c: &str) -> ViewInput {
        ViewInput::Cluster(ClusterEvent::new(
            cluster(c),
            EventKind::Synced(ResourceKind::Nodes),
        ))
    }

    fn cluster_of(input: &ViewInput) -> &str {
        match input {
            ViewInput::Cluster(ev) => ev.cluster.as_str(),
            ViewInput::Policy(_) => "policy",
        }
    }

    /// The whole point: a quiet cluster's event is taken after at most one turn of a cluster
    /// with a full backlog (a single FIFO channel would hand it over after the whole backlog).
    #[tokio::test]
    async fn a_quiet_clusters_event_is_taken_within_one_turn_of_a_backlog() {
        let backlog = 10 * PER_TURN;
        let (queues, mut inputs) = input_queues(backlog);
        let flood = queues.sender(&cluster("c3"));
        let quiet = queues.sender(&cluster("c2"));
        for _ in 0..backlog {
            flood.send(event("c3")).await.unwrap();
        }
        quiet.send(event("c2")).await.unwrap();

        let mut turn = Vec::new();
        let mut taken_before = 0;
        loop {
            assert!(inputs.try_turn(&mut turn), "c2's event was never taken");
            assert!(turn.len() <= PER_TURN);
            if turn.iter().any(|i| cluster_of(i) == "c2") {
                break;
            }
            taken_before += turn.len();
        }
        assert!(
            taken_before <= PER_TURN,
            "{taken_before} of c3's {backlog} events were taken before c2's one"
        );
        // Then c3's backlog, all of it, in turns.
        let mut rest = 0;
        while inputs.try_turn(&mut turn) {
            assert!(turn.iter().all(|i| cluster_of(i) == "c3"));
            rest += turn.len();
        }
        assert_eq!(taken_before + rest, backlog);
    }

    /// Busy clusters alternate turn by turn; each one's events keep their order; a sender that
    /// is asked for again gets the same queue.
    #[tokio::test]
    async fn busy_clusters_alternate_and_each_keeps_its_order() {
        let (queues, mut inputs) = input_queues(4 * PER_TURN);
        let names = ["c2", "c3", "c4"];
        for name in names {
            for n in 0..(3 * PER_TURN) as u32 {
                // A new sender each time: the same queue.
                queues
                    .sender(&cluster(name))
                    .send(ViewInput::Cluster(ClusterEvent::new(
                        cluster(name),
                        EventKind::DeleteNode {
                            name: n.to_string(),
                        },
                    )))
                    .await
                    .unwrap();
            }
        }
        let mut turn = Vec::new();
        let mut order = Vec::new();
        let mut next: BTreeMap<String, u32> = BTreeMap::new();
        while inputs.try_turn(&mut turn) {
            let c = cluster_of(&turn[0]).to_owned();
            for i in &turn {
                let ViewInput::Cluster(ev) = i else {
                    panic!("{i:?}")
                };
                assert_eq!(ev.cluster.as_str(), c, "a turn takes one cluster's events");
                let EventKind::DeleteNode { name } = &ev.kind else {
                    panic!("{ev:?}")
                };
                let n = next.entry(c.clone()).or_default();
                assert_eq!(*name, n.to_string(), "{c}'s events out of order");
                *n += 1;
            }
            order.push(c);
        }
        let expected: Vec<String> = (0..3)
            .flat_map(|_| names.iter().map(|n| n.to_string()))
            .collect();
        assert_eq!(order, expected);
    }

    /// Senders on other tasks, the view task waiting: every event arrives once, none is lost
    /// between a turn's take and a sender's scheduling; the inputs end with the last sender.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_lose_nothing_and_the_end_is_seen() {
        let (queues, mut inputs) = input_queues(8);
        let per_cluster = 20_000;
        let tasks: Vec<_> = ["c2", "c3", "c4"]
            .into_iter()
            .map(|name| {
                let tx = queues.sender(&cluster(name));
                tokio::spawn(async move {
                    for n in 0..per_cluster {
                        tx.send(event(name)).await.unwrap();
                        if n % 1000 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        drop(queues);
        let mut turn = Vec::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        while tokio::time::timeout(
            std::time::Duration::from_secs(30),
            inputs.next_turn(&mut turn),
        )
        .await
        .expect("an event was lost: the view task waits for nothing")
        {
            for i in &turn {
                *counts.entry(cluster_of(i).to_owned()).or_default() += 1;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![per_cluster; 3]
        );
    }
}
