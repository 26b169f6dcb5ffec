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

/// Values larger than this are refused before they are decoded: the largest legitimate record
/// (a service with a few thousand backends) is well under 256 KiB, and decoding a 1 MiB
/// JSON value would build structures several times its size.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Keys held at most per remote cluster, unless configured: the scale goal's whole mesh
/// (500k entries) published by one cluster, with a fifth more for its nodes, identities and
/// services. At about 150 bytes of agent memory a key, 90 MB for a cluster at the limit.
pub const DEFAULT_ENTRY_LIMIT: u64 = 600_000;

/// The keys of one cluster that the reflections of its watches hold, against a limit.
#[derive(Debug)]
pub struct EntryQuota {
    limit: u64,
    held: AtomicU64,
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
            held: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            refused_recent: AtomicU64::new(0),
        }
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
        let taken = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                (h < self.limit).then_some(h + 1)
            })
            .is_ok();
        if !taken {
            self.count_refusal();
        }
        taken
    }

    /// No room: a new key would be refused. Lets a reader refuse it (with
    /// [`EntryQuota::count_refusal`]) before spending anything on decoding it.
    pub fn is_full(&self) -> bool {
        self.held() >= self.limit
    }

    /// A new key refused (see [`EntryQuota::is_full`]).
    pub fn count_refusal(&self) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        self.refused_recent.fetch_add(1, Ordering::Relaxed);
    }

    /// A held key was forgotten.
    pub fn give_back(&self) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| h.checked_sub(1));
    }

    /// Refused keys may fit now: there were some, and there is room.
    pub fn room_for_refused(&self) -> bool {
        self.refused_recent() > 0 && self.held() < self.limit
    }

    /// A new admission round starts (every watch of the cluster lists again): what it refuses
    /// says whether the cluster is still over its limit.
    pub fn begin_round(&self) {
        self.refused_recent.store(0, Ordering::Relaxed);
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
}
