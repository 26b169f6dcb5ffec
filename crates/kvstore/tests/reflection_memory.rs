//! What a watcher's reflection holds per key, with 100k remote ipcache entries (the agent keeps
//! one per remote cluster's ipcache; issue 11's memory goal counts it). A measurement, not a
//! check: `cargo test --release -p meshd-kvstore --test reflection_memory -- --ignored
//! --nocapture`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use meshd_kvstore::{KeyValue, Reflection, WatchEvent, WatchStats};
use meshd_state::{encode, ClusterName, IpcacheEntry, IpcacheKey, NumericIdentity, Resource};

/// Counts live heap bytes, so the measurement says what the reflection holds (RSS would include
/// what the allocator keeps after freeing).
struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
#[ignore = "measurement: run with --release -- --ignored --nocapture"]
fn measure_reflection_bytes_per_ipcache_entry() {
    const N: u32 = 100_000;
    let c2 = ClusterName::new("c2").unwrap();
    // Before the records exist: what the reflection keeps of them (their keys) counts, what it
    // drops (their values) does not.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let kvs: Vec<KeyValue> = (0..N)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(11, 0, 0, 0)) + i);
            let key = IpcacheKey::host(c2.clone(), ip.into());
            let entry = IpcacheEntry {
                prefix: key.prefix,
                identity: NumericIdentity::new((2 << 16) | 300).unwrap(),
                host_ip: "172.16.0.1".parse().unwrap(),
                endpoint: None,
                namespace: None,
            };
            KeyValue {
                value: encode(&key, &entry).unwrap(),
                key: key.to_string(),
                mod_revision: 1,
                lease: 0,
            }
        })
        .collect();
    let stats = WatchStats::default();
    let mut r = Reflection::<IpcacheEntry>::for_prefix(IpcacheEntry::cluster_prefix(&c2), None);
    r.begin_list();
    let mut upserts = 0;
    for kv in kvs {
        let mut out = Vec::new();
        r.listed(kv, &stats, &mut out);
        upserts += out.len();
    }
    let mut out = Vec::new();
    r.finish_list(2, &mut out);
    assert!(matches!(out.last(), Some(WatchEvent::Synced { .. })));
    assert_eq!(upserts, N as usize);
    let held = LIVE_BYTES.load(Ordering::Relaxed) - before;
    println!(
        "reflection of {N} ipcache entries holds {} bytes per entry",
        held / N as usize
    );
    assert_eq!(r.len(), N as usize);
}
