//! etcd keys and records of every kind, as a remote cluster (or anyone with write access to a
//! cluster's etcd) may write them: `<key>\n<value>`.
//!
//! Invariants beyond "no panic": a key that parses renders back to exactly itself (one key per
//! object, so mark-and-sweep and deletes find it), and a record that decodes encodes again and
//! decodes to the same key and record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_state::{
    decode, encode, ClusterConfig, IdentityRecord, IpcacheEntry, NodeRecord, Resource,
    ResourceKey, ServiceRecord, SyncCanary,
};

fn check<R: Resource>(key: &str, value: &[u8]) {
    if let Ok(parsed) = R::Key::parse(key) {
        assert_eq!(parsed.to_string(), key, "{} key does not render back", R::KIND);
    }
    if let Ok((parsed, record)) = decode::<R>(key, value) {
        let again = encode(&parsed, &record).expect("a decoded record encodes");
        let (parsed2, record2) = decode::<R>(key, &again).expect("an encoded record decodes");
        assert_eq!(parsed2, parsed, "{} key changed on the round trip", R::KIND);
        assert_eq!(record2, record, "{} record changed on the round trip", R::KIND);
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(key) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let value = data.get(split + 1..).unwrap_or(&[]);
    check::<ClusterConfig>(key, value);
    check::<NodeRecord>(key, value);
    check::<IpcacheEntry>(key, value);
    check::<IdentityRecord>(key, value);
    check::<ServiceRecord>(key, value);
    check::<SyncCanary>(key, value);
});
