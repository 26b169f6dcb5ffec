//! Bounds on what one cluster may make a reader hold: a number of keys shared by every watch
//! of the cluster ([`EntryQuota`]), and a size per value ([`MAX_VALUE_BYTES`]).
//!
//! A remote cluster is written with its own admin certificate, so nothing it publishes can be
//! trusted to be small: a million keys, or megabyte values, would otherwise become a million
//! entries (and the bookkeeping for them) in every node that watches it. The quota is taken
//! when a reflection stores a new key and given back when it forgets one; a key refused for
//! the quota is not remembered at all (memory stays bounded whatever the cluster writes), and
//! comes back with its next write or the next list once there is room.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Values larger than this are refused before they are decoded: the largest legitimate record
/// (a service with a few thousand backends) is well under 256 KiB, and decoding a 1 MiB
/// JSON value would build structures several times its size.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Keys held at most per remote cluster, unless configured: the scale goal's whole mesh
/// (500k entries) published by one cluster, with a fifth more for its nodes, identities and
/// services. At about 150 bytes of agent memory a key, 90 MB for a cluster at the limit.
pub const DEFAULT_ENTRY_LIMIT: u64 = 600_000;

/// The room a node has for the keys of every remote cluster together, shared out between
/// them. A limit per cluster alone cannot protect maps that the clusters share: two clusters
/// at the default limit (600,000 keys each) overflow IPCACHE_HOSTS (1,048,576 entries), and
/// then map writes fail and the reconciler's full diffs (a read-back of every entry, seconds at
/// that size) repeat, holding up every cluster's changes; a flooding cluster would also take
/// the room a well-behaved cluster's new endpoints need.
///
/// Half the room is reserved in equal shares, one per remote cluster, so that each can always
/// hold its share whatever the others hold; the other half is common, taken by whoever needs it
/// first. A flooding cluster gets its share and the common half at most, never the others'
/// shares; one big cluster (the scale goal's 500,000 endpoints) fits in its share and the
/// common half while the others are small. When clusters come or go, the shares change; keys
/// held are never taken back, only new ones refused until the room allows.
#[derive(Debug)]
pub struct EntryRoom {
    room: u64,
    /// The held-key counters of the clusters sharing the room (their quotas').
    members: Mutex<Vec<Arc<AtomicU64>>>,
    /// `room / (2 x members)`, kept for the check that needs no lock (a cluster under it).
    share: AtomicU64,
}

impl EntryRoom {
    pub fn new(room: u64) -> Arc<Self> {
        Arc::new(Self {
            room,
            members: Mutex::new(Vec::new()),
            share: AtomicU64::new(room / 2),
        })
    }

    pub fn room(&self) -> u64 {
        self.room
    }

    /// What each cluster may hold whatever the others hold.
    pub fn share(&self) -> u64 {
        self.share.load(Ordering::Relaxed)
    }

    /// Clusters sharing the room.
    pub fn members(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<AtomicU64>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn share_of(&self, members: usize) -> u64 {
        self.room / (2 * members.max(1) as u64)
    }

    fn join(&self, held: &Arc<AtomicU64>) {
        let mut m = self.lock();
        m.push(held.clone());
        self.share.store(self.share_of(m.len()), Ordering::Relaxed);
    }

    fn leave(&self, held: &Arc<AtomicU64>) {
        let mut m = self.lock();
        m.retain(|h| !Arc::ptr_eq(h, held));
        self.share.store(self.share_of(m.len()), Ordering::Relaxed);
    }

    /// Whether a cluster that would hold `held` keys with one more (`extra` is 1 when its
    /// counter does not include that key yet) fits: within its share, or while what all
    /// clusters hold beyond their shares fits the common half.
    fn admits(&self, held: u64, extra: u64) -> bool {
        if held + extra <= self.share() {
            return true;
        }
        let m = self.lock();
        let share = self.share_of(m.len());
        let beyond: u64 = m
            .iter()
            .map(|h| h.load(Ordering::Relaxed).saturating_sub(share))
            .sum();
        beyond + extra <= self.room.saturating_sub(share * m.len() as u64)
    }
}

/// The keys of one cluster that the reflections of its watches hold, against a limit (and,
/// [`EntryQuota::in_room`], against the node's room shared with the other clusters).
#[derive(Debug)]
pub struct EntryQuota {
    limit: u64,
    /// Shared with the room, which reads every member's count.
    held: Arc<AtomicU64>,
    room: Option<Arc<EntryRoom>>,
    /// Of `refused_recent`: refused for the room, not for the cluster's own limit.
    refused_for_room: AtomicU64,
    /// Keys refused since the cluster was added.
    refused_total: AtomicU64,
    /// Keys refused since [`EntryQuota::begin_round`]: while not zero, the cluster is over its
    /// limit (degraded).
    refused_recent: AtomicU64,
}

impl EntryQuota {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: Arc::new(AtomicU64::new(0)),
            room: None,
            refused_for_room: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            refused_recent: AtomicU64::new(0),
        }
    }

    /// The cluster also shares `room` with the node's other remote clusters (it leaves the
    /// room when the quota is dropped: the cluster removed, or its watcher restarted).
    pub fn in_room(mut self, room: Arc<EntryRoom>) -> Self {
        room.join(&self.held);
        self.room = Some(room);
        self
    }

    /// Keys refused since the last [`EntryQuota::begin_round`] for the node's room (the
    /// cluster under its own limit).
    pub fn refused_for_room(&self) -> u64 {
        self.refused_for_room.load(Ordering::Relaxed)
    }

    pub fn room(&self) -> Option<&EntryRoom> {
        self.room.as_deref()
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Keys held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub fn refused_total(&self) -> u64 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Keys refused since the last [`EntryQuota::begin_round`].
    pub fn refused_recent(&self) -> u64 {
        self.refused_recent.load(Ordering::Relaxed)
    }

    /// Room for one more key: taken (true), or refused and counted (false).
    pub fn take(&self) -> bool {
        let Ok(before) = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                (h < self.limit).then_some(h + 1)
            })
        else {
            self.count_refusal();
            return false;
        };
        // Counted first, checked after: two clusters taking at once each see the other's key,
        // so together they cannot pass the room (at worst one is refused needlessly).
        if let Some(room) = &self.room {
            if !room.admits(before + 1, 0) {
                self.give_back();
                self.count_refusal();
                return false;
            }
        }
        true
    }

    /// No room: a new key would be refused. Lets a reader refuse it (with
    /// [`EntryQuota::count_refusal`]) before spending anything on decoding it.
    pub fn is_full(&self) -> bool {
        let held = self.held();
        held >= self.limit || self.room.as_ref().is_some_and(|r| !r.admits(held, 1))
    }

    /// A new key refused (see [`EntryQuota::is_full`]).
    pub fn count_refusal(&self) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        self.refused_recent.fetch_add(1, Ordering::Relaxed);
        if self.held() < self.limit {
            self.refused_for_room.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A held key was forgotten.
    pub fn give_back(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1));
    }

    /// Refused keys may fit now: there were some, and there is room.
    pub fn room_for_refused(&self) -> bool {
        self.refused_recent() > 0 && !self.is_full()
    }

    /// A new admission round starts (every watch of the cluster lists again): what it refuses
    /// says whether the cluster is still over its limit.
    pub fn begin_round(&self) {
        self.refused_recent.store(0, Ordering::Relaxed);
        self.refused_for_room.store(0, Ordering::Relaxed);
    }
}

impl Drop for EntryQuota {
    fn drop(&mut self) {
        if let Some(room) = &self.room {
            room.leave(&self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_past_the_limit_are_refused_and_counted_until_room_frees() {
        let q = EntryQuota::new(2);
        assert!(q.take());
        assert!(q.take());
        assert!(!q.take());
        assert!(!q.take());
        assert_eq!((q.held(), q.refused_total(), q.refused_recent()), (2, 2, 2));
        assert!(q.is_full());
        assert!(!q.room_for_refused());
        q.give_back();
        assert!(q.room_for_refused());
        q.begin_round();
        assert_eq!((q.refused_total(), q.refused_recent()), (2, 0));
        assert!(q.take());
        assert!(!q.room_for_refused());
        // Never below zero, whatever a caller does wrong.
        for _ in 0..5 {
            q.give_back();
        }
        assert_eq!(q.held(), 0);
    }

    /// Takes keys for `q` until one is refused; how many it took.
    fn fill(q: &EntryQuota) -> u64 {
        let mut n = 0;
        while q.take() {
            n += 1;
        }
        n
    }

    /// The point of the room: clusters each under their own limit cannot hold more together
    /// than the room, and a flooding cluster cannot take a quiet one's share.
    #[test]
    fn clusters_share_the_room_and_a_flood_leaves_the_others_their_share() {
        let room = EntryRoom::new(1000);
        let c3 = EntryQuota::new(800).in_room(room.clone());
        let c2 = EntryQuota::new(800).in_room(room.clone());
        assert_eq!(room.share(), 250);
        // c3 floods first: its share and the common half, not its own limit (800 + 800 would
        // not fit the room).
        assert_eq!(fill(&c3), 750);
        assert!(c3.is_full());
        assert_eq!((c3.refused_recent(), c3.refused_for_room()), (1, 1));
        // c2 still has its share.
        assert!(!c2.is_full());
        assert_eq!(fill(&c2), 250);
        assert!(c2.held() + c3.held() <= room.room());
        // c3 gives keys back: c2 may go on beyond its share, into the common half.
        for _ in 0..100 {
            c3.give_back();
        }
        assert_eq!(fill(&c2), 100);
        assert_eq!((c2.held(), c3.held()), (350, 650));
    }

    /// Alone in the room, a cluster is bound by its own limit, and the refusals say so; a
    /// cluster that goes leaves its share to the others.
    #[test]
    fn one_cluster_has_the_whole_room_and_a_leaving_one_frees_its_share() {
        let room = EntryRoom::new(1000);
        let big = EntryQuota::new(600).in_room(room.clone());
        assert_eq!(fill(&big), 600);
        assert_eq!((big.refused_recent(), big.refused_for_room()), (1, 0));

        let other = EntryQuota::new(600).in_room(room.clone());
        assert_eq!((room.members(), room.share()), (2, 250));
        // The big cluster holds 350 beyond its share of the common 500: 150 are left, and the
        // newcomer's share (250) on top.
        assert_eq!(fill(&other), 400);
        drop(other);
        assert_eq!((room.members(), room.share()), (1, 500));
        big.begin_round();
        assert!(big.is_full(), "still at its own limit");
        assert_eq!(big.refused_for_room(), 0);
    }
}
