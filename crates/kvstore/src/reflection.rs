//! The pure heart of list-then-watch: what a reader believes is in etcd, and the events that
//! move it from one belief to the next. No I/O, so every case (relist with deletes, malformed
//! values, foreign clusters) is unit-tested here; the watcher only feeds it.
//!
//! Two reflections share the watcher's loop ([`Reflect`]): [`Reflection`] decodes and validates
//! records of one [`Resource`] and emits typed [`WatchEvent`]s, skipping identical rewrites;
//! [`RawReflection`] emits the raw key-values with their revisions ([`RawWatchEvent`]), for a
//! reader that decodes for itself and guards its writes with the revisions it read.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meshd_state::{decode, ClusterName, Resource, ResourceKey};

use crate::backend::{EventKind, KeyValue, RawEvent};
use crate::quota::{EntryQuota, MAX_VALUE_BYTES};

/// What the watcher's loop feeds: a full list (`begin_list`, `listed` per entry,
/// `finish_list`), then the events of the watch, each response closed by `progress`.
pub trait Reflect: Send + 'static {
    type Event: Send + 'static;
    fn begin_list(&mut self);
    fn listed(&mut self, kv: KeyValue, stats: &WatchStats, out: &mut Vec<Self::Event>);
    fn finish_list(&mut self, revision: i64, out: &mut Vec<Self::Event>);
    fn apply(&mut self, ev: RawEvent, stats: &WatchStats, out: &mut Vec<Self::Event>);
    /// A watch response at `revision` was applied.
    fn progress(&mut self, _revision: i64, _out: &mut Vec<Self::Event>) {}
    /// Keys held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a watcher emits.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<R: Resource> {
    /// The key now holds this value: new, or its stored JSON differs from what was last emitted
    /// (a rewrite with identical bytes, e.g. on re-publish, emits nothing).
    Upsert { key: R::Key, value: R },
    /// The key is gone (deleted, expired, malformed now, or not seen again by a relist).
    Delete { key: R::Key },
    /// A full list completed at `revision`: every key present then has been emitted and every
    /// key absent then has been deleted. Sent after each list, not only the first.
    Synced { revision: i64 },
}

/// Counters a watcher exposes (shared with its handle).
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Entries skipped because the key did not parse or the value did not decode or validate.
    pub malformed: AtomicU64,
    /// Values refused unread for their size (over the reflection's bound; also counted in
    /// `malformed`).
    pub oversized: AtomicU64,
    /// New keys refused because the cluster's [`EntryQuota`] was used up.
    pub over_limit: AtomicU64,
    /// Full lists done (the first one included).
    pub lists: AtomicU64,
    /// Watches that ended and were re-established after a list.
    pub reconnects: AtomicU64,
}

impl WatchStats {
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    pub fn oversized(&self) -> u64 {
        self.oversized.load(Ordering::Relaxed)
    }
    pub fn over_limit(&self) -> u64 {
        self.over_limit.load(Ordering::Relaxed)
    }
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::Relaxed)
    }
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// What the reflection keeps of a key: 16 bytes besides the key itself. A remote cluster's
/// ipcache can hold 500k entries per node agent; keeping the JSON and the parsed key as well
/// cost about 300 bytes an entry, a third of the agent's memory at that size.
struct Entry {
    /// Fingerprint of the stored JSON as last emitted, so an unchanged entry of a relist or a
    /// re-publish costs a lookup and a hash, no decoding. 64-bit SipHash: two different values
    /// of one key collide (and the change is missed) with probability 2^-64.
    fingerprint: u64,
    /// The list generation that last saw this entry (the "mark" of mark-and-sweep).
    seen: u64,
}

fn fingerprint(value: &[u8]) -> u64 {
    // Keyed with zeros: the same in every process, which nothing relies on.
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Bytes of a key held inline: with its length and the variant tag, 24 bytes, a `String`'s
/// size. Every IPv4 ipcache key fits once the watched prefix is taken off (`10.1.0.5` or
/// `10.1.0.0/16`).
const INLINE: usize = 22;

/// A held key without the watched prefix: inline when short, so 100k ipcache keys cost no
/// allocation each (measured: 89 bytes an entry held as full `String`s, 53 this way;
/// `tests/reflection_memory.rs`).
#[derive(Clone)]
enum KeyText {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl KeyText {
    fn new(s: &str) -> Self {
        if s.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Self::Inline {
                len: s.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(s.into())
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Whole strs are copied in, so the bytes are always valid UTF-8.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("a whole str was copied in")
            }
            Self::Heap(s) => s,
        }
    }
}

impl PartialEq for KeyText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KeyText {}

impl Ord for KeyText {
    // As the str it holds, so lookups by `&str` find it (`Borrow<str>`).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for KeyText {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::borrow::Borrow<str> for KeyText {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// The reader's view of one prefix.
pub struct Reflection<R: Resource> {
    /// Key without `prefix` -> what was last emitted for it. The typed key of a delete is
    /// parsed again from the rendered one (it parsed when it was inserted). A B-tree rebuilt
    /// with full nodes after each list (`meshd_state::compact`): 42 bytes an entry at 500k entries,
    /// where a hash map's power-of-two table (1M slots of 41 bytes for 500k keys) took 86.
    entries: BTreeMap<KeyText, Entry>,
    /// What every key of the watch starts with, not stored with each.
    prefix: String,
    kind: std::marker::PhantomData<R>,
    /// Only keys of this cluster count (cluster config's prefix is one key, which other cluster
    /// names can extend: `c1` is a prefix of `c10`).
    scope: Option<ClusterName>,
    /// Generation of the list in progress (or of the last one); entries of older generations
    /// were not seen by it. A counter instead of a set of seen keys: no key copies, no hashing.
    generation: u64,
    /// Shared with the other watches of the cluster: new keys past it are not stored.
    quota: Option<Arc<EntryQuota>>,
    /// Values longer than this are refused before decoding.
    max_value_bytes: usize,
}

/// Whether the `n`th malformed entry of a watch is logged: the first 20, then the 32nd, 64th,
/// ... (each line carries the count), so a cluster rewriting bad values thousands of times a
/// second cannot flood the log; every one is counted in [`WatchStats`].
fn worth_logging(n: u64) -> bool {
    n <= 20 || n.is_power_of_two()
}

/// The outcome of decoding one raw entry.
enum Decoded<R: Resource> {
    Ok(R::Key, R),
    /// Belongs to another cluster: not ours, not an error.
    Foreign,
    Malformed,
}

impl<R: Resource> Reflection<R> {
    pub fn new(scope: Option<ClusterName>) -> Self {
        Self::for_prefix(String::new(), scope)
    }

    /// A reflection of the keys under `prefix` (the watched one); keys outside it are ignored.
    pub fn for_prefix(prefix: String, scope: Option<ClusterName>) -> Self {
        Self {
            entries: BTreeMap::new(),
            prefix,
            kind: std::marker::PhantomData,
            scope,
            generation: 0,
            quota: None,
            max_value_bytes: MAX_VALUE_BYTES,
        }
    }

    /// Stores new keys only while `quota` has room, and refuses values over `max_value_bytes`.
    pub fn with_limits(mut self, quota: Option<Arc<EntryQuota>>, max_value_bytes: usize) -> Self {
        self.quota = quota;
        self.max_value_bytes = max_value_bytes;
        self
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a key (in its rendered form) is currently believed present.
    pub fn contains(&self, key: &str) -> bool {
        key.strip_prefix(self.prefix.as_str())
            .is_some_and(|k| self.entries.contains_key(k))
    }

    fn decode(&self, key: &str, value: &[u8], stats: &WatchStats) -> Decoded<R> {
        if value.len() > self.max_value_bytes {
            let n = stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
            stats.oversized.fetch_add(1, Ordering::Relaxed);
            if worth_logging(n) {
                tracing::warn!(
                    key,
                    kind = R::KIND,
                    bytes = value.len(),
                    max = self.max_value_bytes,
                    malformed = n,
                    "skipping an oversized value unread"
                );
            }
            return Decoded::Malformed;
        }
        match decode::<R>(key, value) {
            Ok((k, v)) => match &self.scope {
                Some(scope) if k.cluster() != scope => Decoded::Foreign,
                _ => Decoded::Ok(k, v),
            },
            Err(e) => {
                let n = stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    tracing::warn!(key, kind = R::KIND, error = %e, malformed = n, "skipping malformed entry");
                }
                Decoded::Malformed
            }
        }
    }

    /// Marks an entry seen if its bytes (fingerprint `fp`) did not change; `true` if so
    /// (nothing else to do).
    fn unchanged(&mut self, suffix: &str, fp: u64) -> bool {
        let generation = self.generation;
        match self.entries.get_mut(suffix) {
            Some(e) if e.fingerprint == fp => {
                e.seen = generation;
                true
            }
            _ => false,
        }
    }

    fn upsert(
        &mut self,
        suffix: &str,
        fp: u64,
        key: R::Key,
        value: R,
        stats: &WatchStats,
        out: &mut Vec<WatchEvent<R>>,
    ) {
        let entry = Entry {
            fingerprint: fp,
            seen: self.generation,
        };
        if let Some(held) = self.entries.get_mut(suffix) {
            *held = entry;
        } else {
            if let Some(quota) = &self.quota {
                if !quota.take() {
                    // Filled by another watch of the cluster since `over_quota` looked.
                    self.refused(suffix, stats);
                    return;
                }
            }
            self.entries.insert(KeyText::new(suffix), entry);
        }
        out.push(WatchEvent::Upsert { key, value });
    }

    /// A new key refused for the quota. Not remembered: it costs nothing until its next write or
    /// the next list.
    fn refused(&self, suffix: &str, stats: &WatchStats) {
        if stats.over_limit.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                key = suffix,
                kind = R::KIND,
                limit = self.quota.as_ref().map(|q| q.limit()),
                "the cluster's entry limit is reached; refusing its new keys"
            );
        }
    }

    /// A key not held while the quota is full: refused and counted before it is decoded, so a
    /// flood past the limit costs a lookup per key, not a decode.
    fn over_quota(&self, suffix: &str, stats: &WatchStats) -> bool {
        match &self.quota {
            Some(q) if q.is_full() && !self.entries.contains_key(suffix) => {
                q.count_refusal();
                self.refused(suffix, stats);
                true
            }
            _ => false,
        }
    }

    /// Forgets `suffix` and emits its delete. `key` is the whole key when the caller has it (a
    /// watch event does: no copy is built per delete); a relist's sweep passes `None`.
    fn remove(&mut self, suffix: &str, key: Option<&str>, out: &mut Vec<WatchEvent<R>>) {
        if self.entries.remove(suffix).is_none() {
            return;
        }
        if let Some(quota) = &self.quota {
            quota.give_back();
        }
        let built;
        let raw = match key {
            Some(key) => key,
            None => {
                built = format!("{}{suffix}", self.prefix);
                &built
            }
        };
        match R::Key::parse(raw) {
            Ok(key) => out.push(WatchEvent::Delete { key }),
            // Only keys that parsed are inserted, and parsing is a pure function of the text.
            Err(e) => tracing::error!(key = raw, error = %e, "a held key no longer parses"),
        }
    }

    /// Starts a full list. Entries not seen again before [`Self::finish_list`] are deleted.
    pub fn begin_list(&mut self) {
        self.generation += 1;
    }

    /// One entry of the list in progress.
    pub fn listed(&mut self, kv: KeyValue, stats: &WatchStats, out: &mut Vec<WatchEvent<R>>) {
        let Some(suffix) = kv.key.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        let fp = fingerprint(&kv.value);
        if self.unchanged(suffix, fp) || self.over_quota(suffix, stats) {
            return;
        }
        match self.decode(&kv.key, &kv.value, stats) {
            Decoded::Ok(key, value) => self.upsert(suffix, fp, key, value, stats, out),
            // Not marked: if we held an older, valid value it is swept as deleted, since etcd
            // no longer holds it.
            Decoded::Foreign | Decoded::Malformed => {}
        }
    }

    /// Ends the list: sweeps what was not seen and announces the sync.
    pub fn finish_list(&mut self, revision: i64, out: &mut Vec<WatchEvent<R>>) {
        let generation = self.generation;
        // In key order (all share the prefix).
        let gone: Vec<KeyText> = self
            .entries
            .iter()
            .filter(|(_, e)| e.seen != generation)
            .map(|(suffix, _)| suffix.clone())
            .collect();
        for suffix in gone {
            self.remove(suffix.as_str(), None, out);
        }
        meshd_state::compact::btree_map(&mut self.entries);
        out.push(WatchEvent::Synced { revision });
    }

    /// One event of the watch. A malformed put of a key we held deletes it: the old value is
    /// no longer what etcd holds, and nothing else is disturbed.
    pub fn apply(&mut self, ev: RawEvent, stats: &WatchStats, out: &mut Vec<WatchEvent<R>>) {
        let Some(suffix) = ev.kv.key.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        match ev.kind {
            EventKind::Put => {
                let fp = fingerprint(&ev.kv.value);
                if self.unchanged(suffix, fp) || self.over_quota(suffix, stats) {
                    return;
                }
                match self.decode(&ev.kv.key, &ev.kv.value, stats) {
                    Decoded::Ok(key, value) => self.upsert(suffix, fp, key, value, stats, out),
                    Decoded::Foreign => {}
                    Decoded::Malformed => self.remove(suffix, Some(&ev.kv.key), out),
                }
            }
            EventKind::Delete => self.remove(suffix, Some(&ev.kv.key), out),
        }
    }
}

impl<R: Resource> Reflect for Reflection<R> {
    type Event = WatchEvent<R>;
    fn begin_list(&mut self) {
        Reflection::begin_list(self)
    }
    fn listed(&mut self, kv: KeyValue, stats: &WatchStats, out: &mut Vec<Self::Event>) {
        Reflection::listed(self, kv, stats, out)
    }
    fn finish_list(&mut self, revision: i64, out: &mut Vec<Self::Event>) {
        Reflection::finish_list(self, revision, out)
    }
    fn apply(&mut self, ev: RawEvent, stats: &WatchStats, out: &mut Vec<Self::Event>) {
        Reflection::apply(self, ev, stats, out)
    }
    fn len(&self) -> usize {
        Reflection::len(self)
    }
}

/// What a raw watcher emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawWatchEvent {
    /// A put (the key is new, or was written since it was last emitted: its mod revision
    /// differs) or a delete (deleted, expired, or not seen again by a relist; the value is
    /// empty). Unlike the typed watch, a rewrite with identical bytes is emitted: its revision
    /// changed, and a reader guarding writes with it needs the new one.
    Event(RawEvent),
    /// A full list completed at `revision` (after each list, not only the first).
    Synced { revision: i64 },
    /// Every change up to `revision` has been emitted (after each watch response).
    Progress { revision: i64 },
}

/// The reader's view of one prefix, raw: each key's mod revision.
#[derive(Default)]
pub struct RawReflection {
    /// Rendered key -> (mod revision last emitted, list generation that last saw it).
    entries: HashMap<String, (i64, u64)>,
    generation: u64,
}

impl RawReflection {
    pub fn new() -> Self {
        Self::default()
    }

    fn put(&mut self, kv: KeyValue, out: &mut Vec<RawWatchEvent>) {
        let generation = self.generation;
        match self.entries.get_mut(&kv.key) {
            Some((rev, seen)) if *rev == kv.mod_revision => *seen = generation,
            _ => {
                self.entries
                    .insert(kv.key.clone(), (kv.mod_revision, generation));
                out.push(RawWatchEvent::Event(RawEvent {
                    kind: EventKind::Put,
                    kv,
                }));
            }
        }
    }

    fn remove(&mut self, key: String, revision: i64, out: &mut Vec<RawWatchEvent>) {
        if self.entries.remove(&key).is_some() {
            out.push(RawWatchEvent::Event(RawEvent {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key,
                    value: Vec::new(),
                    mod_revision: revision,
                    lease: 0,
                },
            }));
        }
    }
}

impl Reflect for RawReflection {
    type Event = RawWatchEvent;
    fn begin_list(&mut self) {
        self.generation += 1;
    }
    fn listed(&mut self, kv: KeyValue, _stats: &WatchStats, out: &mut Vec<Self::Event>) {
        self.put(kv, out);
    }
    fn finish_list(&mut self, revision: i64, out: &mut Vec<Self::Event>) {
        let generation = self.generation;
        let mut gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, (_, seen))| *seen != generation)
            .map(|(key, _)| key.clone())
            .collect();
        gone.sort();
        for key in gone {
            self.remove(key, revision, out);
        }
        out.push(RawWatchEvent::Synced { revision });
    }
    fn apply(&mut self, ev: RawEvent, _stats: &WatchStats, out: &mut Vec<Self::Event>) {
        match ev.kind {
            EventKind::Put => self.put(ev.kv, out),
            EventKind::Delete => self.remove(ev.kv.key, ev.kv.mod_revision, out),
        }
    }
    fn progress(&mut self, revision: i64, out: &mut Vec<Self::Event>) {
        out.push(RawWatchEvent::Progress { revision });
    }
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd_state::{ClusterConfig, IpcacheEntry, IpcacheKey, NumericIdentity};

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    fn entry(ip: &str, id: u32) -> KeyValue {
        entry_via(ip, id, "192.168.0.1")
    }

    /// An ipcache record of c1 for `ip` with identity `id`, tunnelled to `host_ip`.
    fn entry_via(ip: &str, id: u32, host_ip: &str) -> KeyValue {
        let key = IpcacheKey::host(c("c1"), ip.parse().unwrap());
        let value = IpcacheEntry {
            prefix: key.prefix,
            identity: NumericIdentity::new(id).unwrap(),
            host_ip: host_ip.parse().unwrap(),
            endpoint: None,
            namespace: None,
        };
        KeyValue {
            key: key.to_string(),
            value: serde_json::to_vec(&value).unwrap(),
            mod_revision: 1,
            lease: 0,
        }
    }

    fn raw(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            mod_revision: 1,
            lease: 0,
        }
    }

    fn put(kv: KeyValue) -> RawEvent {
        RawEvent {
            kind: EventKind::Put,
            kv,
        }
    }

    fn del(key: &str) -> RawEvent {
        RawEvent {
            kind: EventKind::Delete,
            kv: raw(key, b""),
        }
    }

    fn list(
        r: &mut Reflection<IpcacheEntry>,
        kvs: Vec<KeyValue>,
        stats: &WatchStats,
    ) -> Vec<WatchEvent<IpcacheEntry>> {
        let mut out = Vec::new();
        r.begin_list();
        for kv in kvs {
            r.listed(kv, stats, &mut out);
        }
        r.finish_list(10, &mut out);
        out
    }

    fn summary(events: &[WatchEvent<IpcacheEntry>]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                WatchEvent::Upsert { key, value } => {
                    format!("+{} {}", key.prefix.addr(), value.identity)
                }
                WatchEvent::Delete { key } => format!("-{}", key.prefix.addr()),
                WatchEvent::Synced { revision } => format!("synced@{revision}"),
            })
            .collect()
    }

    const ID1: u32 = (1 << 16) | 300;
    const ID2: u32 = (1 << 16) | 301;

    #[test]
    fn relist_emits_changes_and_sweeps_what_is_gone() {
        let stats = WatchStats::default();
        let mut r = Reflection::new(Some(c("c1")));
        let out = list(
            &mut r,
            vec![entry("10.0.0.1", ID1), entry("10.0.0.2", ID1)],
            &stats,
        );
        assert_eq!(
            summary(&out),
            ["+10.0.0.1 65836", "+10.0.0.2 65836", "synced@10"]
        );

        // .1 unchanged (no event), .2 gone, .3 new.
        let out = list(
            &mut r,
            vec![entry("10.0.0.1", ID1), entry("10.0.0.3", ID2)],
            &stats,
        );
        assert_eq!(summary(&out), ["+10.0.0.3 65837", "-10.0.0.2", "synced@10"]);
        assert_eq!(r.len(), 2);
        assert_eq!(stats.malformed(), 0);
    }

    #[test]
    fn watch_events_update_delete_and_ignore_no_ops() {
        let stats = WatchStats::default();
        let mut r = Reflection::new(None);
        let mut out = Vec::new();
        r.apply(put(entry("10.0.0.1", ID1)), &stats, &mut out);
        r.apply(put(entry("10.0.0.1", ID1)), &stats, &mut out);
        r.apply(put(entry("10.0.0.1", ID2)), &stats, &mut out);
        r.apply(del("meshd/state/ip/v1/c1/10.0.0.1"), &stats, &mut out);
        r.apply(del("meshd/state/ip/v1/c1/10.0.0.9"), &stats, &mut out);
        assert_eq!(
            summary(&out),
            ["+10.0.0.1 65836", "+10.0.0.1 65837", "-10.0.0.1"]
        );
    }

    /// Two reflections (two kinds of one cluster) share a quota: new keys past it are neither
    /// stored nor emitted, updates of held keys still pass, and a deleted key makes room for
    /// the next write of a refused one.
    #[test]
    fn new_keys_past_the_shared_quota_are_refused_and_room_is_given_back() {
        let stats = WatchStats::default();
        let quota = Arc::new(EntryQuota::new(3));
        let mut a = Reflection::new(Some(c("c1"))).with_limits(Some(quota.clone()), 1024);
        let mut b = Reflection::new(Some(c("c1"))).with_limits(Some(quota.clone()), 1024);
        let out = list(
            &mut a,
            vec![entry("10.0.0.1", ID1), entry("10.0.0.2", ID1)],
            &stats,
        );
        assert_eq!(summary(&out).len(), 3);
        let out = list(
            &mut b,
            vec![entry("10.0.1.1", ID1), entry("10.0.1.2", ID1)],
            &stats,
        );
        assert_eq!(summary(&out), ["+10.0.1.1 65836", "synced@10"]);
        assert_eq!((quota.held(), quota.refused_total()), (3, 1));
        assert_eq!(stats.over_limit(), 1);

        let mut out = Vec::new();
        b.apply(put(entry("10.0.1.3", ID1)), &stats, &mut out);
        b.apply(put(entry("10.0.1.1", ID2)), &stats, &mut out);
        assert_eq!(
            summary(&out),
            ["+10.0.1.1 65837"],
            "an update of a held key passes"
        );
        out.clear();
        a.apply(del("meshd/state/ip/v1/c1/10.0.0.1"), &stats, &mut out);
        assert!(quota.room_for_refused());
        b.apply(put(entry("10.0.1.3", ID1)), &stats, &mut out);
        assert_eq!(summary(&out), ["-10.0.0.1", "+10.0.1.3 65836"]);
        assert_eq!((a.len() + b.len()) as u64, quota.held());
        assert_eq!(stats.malformed(), 0);
    }

    /// A value over the size bound is refused unread and counted, and a held key rewritten
    /// with one goes away (etcd no longer holds the old value).
    #[test]
    fn oversized_values_are_refused_unread() {
        let stats = WatchStats::default();
        let mut r = Reflection::<IpcacheEntry>::new(Some(c("c1"))).with_limits(None, 200);
        let big = raw(
            "meshd/state/ip/v1/c1/10.0.0.2",
            format!("{{\"pad\":\"{}\"}}", "x".repeat(300)).as_bytes(),
        );
        let out = list(&mut r, vec![entry("10.0.0.1", ID1), big.clone()], &stats);
        assert_eq!(summary(&out), ["+10.0.0.1 65836", "synced@10"]);
        assert_eq!((stats.oversized(), stats.malformed()), (1, 1));
        let mut out = Vec::new();
        let mut big1 = big;
        big1.key = "meshd/state/ip/v1/c1/10.0.0.1".into();
        r.apply(put(big1), &stats, &mut out);
        assert_eq!(summary(&out), ["-10.0.0.1"]);
        assert_eq!(stats.oversized(), 2);
    }

    #[test]
    fn malformed_entries_are_counted_and_skipped_without_disturbing_others() {
        let stats = WatchStats::default();
        let mut r = Reflection::new(Some(c("c1")));
        let out = list(
            &mut r,
            vec![
                entry("10.0.0.1", ID1),
                raw("meshd/state/ip/v1/c1/10.0.0.2", b"{not json"),
                raw(
                    "meshd/state/ip/v1/c1/10.0.0.3",
                    br#"{"prefix":"10.0.0.3/32","identity":"x","host_ip":"1.1.1.1"}"#,
                ),
                raw("meshd/state/ip/v1/c1/not-an-ip", b"{}"),
                entry("10.0.0.4", ID1),
            ],
            &stats,
        );
        assert_eq!(
            summary(&out),
            ["+10.0.0.1 65836", "+10.0.0.4 65836", "synced@10"]
        );
        assert_eq!(stats.malformed(), 3);

        // A malformed update of a held key removes it; others stay.
        let mut out = Vec::new();
        r.apply(
            put(raw("meshd/state/ip/v1/c1/10.0.0.1", b"[]")),
            &stats,
            &mut out,
        );
        assert_eq!(summary(&out), ["-10.0.0.1"]);
        assert_eq!(stats.malformed(), 4);
        assert!(r.contains("meshd/state/ip/v1/c1/10.0.0.4"));
    }

    #[test]
    fn malformed_value_in_a_relist_sweeps_the_old_value() {
        let stats = WatchStats::default();
        let mut r = Reflection::new(None);
        list(&mut r, vec![entry("10.0.0.1", ID1)], &stats);
        let out = list(
            &mut r,
            vec![raw("meshd/state/ip/v1/c1/10.0.0.1", b"garbage")],
            &stats,
        );
        assert_eq!(summary(&out), ["-10.0.0.1", "synced@10"]);
    }

    #[test]
    fn keys_of_other_clusters_are_ignored_not_counted() {
        let stats = WatchStats::default();
        let mut r: Reflection<ClusterConfig> = Reflection::new(Some(c("c1")));
        let mut out = Vec::new();
        r.begin_list();
        for (name, id) in [("c1", 1), ("c10", 10)] {
            let cfg = ClusterConfig {
                name: c(name),
                id: meshd_state::ClusterId::new(id).unwrap(),
                capabilities: Default::default(),
                routing_mode: Default::default(),
            };
            r.listed(
                raw(
                    &format!("meshd/cluster-config/{name}"),
                    &serde_json::to_vec(&cfg).unwrap(),
                ),
                &stats,
                &mut out,
            );
        }
        r.finish_list(3, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], WatchEvent::Upsert { key, .. } if key.cluster.as_str() == "c1"));
        assert_eq!(stats.malformed(), 0);
    }

    fn entry6(ip: &str, id: u32) -> KeyValue {
        entry_via(ip, id, "fd00::1")
    }

    #[test]
    fn keys_are_held_without_the_prefix_short_ones_inline() {
        let stats = WatchStats::default();
        let mut r: Reflection<IpcacheEntry> =
            Reflection::for_prefix("meshd/state/ip/v1/c1/".into(), Some(c("c1")));
        let long = "fd00:1234:5678:9abc:def0:1234:5678:9abc";
        let out = list(
            &mut r,
            vec![
                entry("10.0.0.1", ID1),
                entry6(long, ID1),
                entry("10.0.0.2", ID1),
            ],
            &stats,
        );
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(r.contains("meshd/state/ip/v1/c1/10.0.0.1"));
        assert!(r.contains(&format!("meshd/state/ip/v1/c1/{long}")));
        assert!(
            !r.contains("10.0.0.1"),
            "held keys are matched with their prefix"
        );
        assert!(matches!(KeyText::new("10.0.0.1"), KeyText::Inline { .. }));
        assert!(matches!(KeyText::new(long), KeyText::Heap(_)));

        // Unchanged: nothing; the long key and .2 gone: deleted with their full keys.
        let out = list(&mut r, vec![entry("10.0.0.1", ID1)], &stats);
        let deleted: Vec<String> = out
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Delete { key } => Some(key.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            deleted,
            [
                "meshd/state/ip/v1/c1/10.0.0.2".to_owned(),
                format!("meshd/state/ip/v1/c1/{long}")
            ]
        );
        // A key outside the prefix is not ours.
        let mut out = Vec::new();
        r.apply(put(raw("other/10.0.0.9", b"{}")), &stats, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.len(), 1);
    }

    fn rev(key: &str, value: &[u8], mod_revision: i64) -> KeyValue {
        KeyValue {
            mod_revision,
            ..raw(key, value)
        }
    }

    fn raw_summary(events: &[RawWatchEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                RawWatchEvent::Event(RawEvent {
                    kind: EventKind::Put,
                    kv,
                }) => format!("+{}@{}", kv.key, kv.mod_revision),
                RawWatchEvent::Event(RawEvent {
                    kind: EventKind::Delete,
                    kv,
                }) => format!("-{}@{}", kv.key, kv.mod_revision),
                RawWatchEvent::Synced { revision } => format!("synced@{revision}"),
                RawWatchEvent::Progress { revision } => format!("progress@{revision}"),
            })
            .collect()
    }

    #[test]
    fn raw_reflection_emits_revisions_and_sweeps_on_relist() {
        let stats = WatchStats::default();
        let mut r = RawReflection::new();
        let mut out = Vec::new();
        r.begin_list();
        r.listed(rev("p/a", b"1", 2), &stats, &mut out);
        r.listed(rev("p/b", b"1", 3), &stats, &mut out);
        r.finish_list(3, &mut out);
        assert_eq!(raw_summary(&out), ["+p/a@2", "+p/b@3", "synced@3"]);

        // Watch: an identical rewrite is emitted (new revision), a repeat of a revision is not.
        let mut out = Vec::new();
        r.apply(put(rev("p/a", b"1", 4)), &stats, &mut out);
        r.apply(put(rev("p/a", b"1", 4)), &stats, &mut out);
        r.apply(del("p/zz"), &stats, &mut out);
        r.progress(4, &mut out);
        assert_eq!(raw_summary(&out), ["+p/a@4", "progress@4"]);

        // Relist: a unchanged, b gone, c new.
        let mut out = Vec::new();
        r.begin_list();
        r.listed(rev("p/a", b"1", 4), &stats, &mut out);
        r.listed(rev("p/c", b"1", 6), &stats, &mut out);
        r.finish_list(7, &mut out);
        assert_eq!(raw_summary(&out), ["+p/c@6", "-p/b@7", "synced@7"]);
        assert_eq!(Reflect::len(&r), 2);
        assert_eq!(stats.malformed(), 0);
    }
}
