//! meshd's etcd layer: connecting (plaintext or mTLS), lease-backed publishing, list-then-watch
//! with mark-and-sweep, sync canaries, and identity allocation (compare-and-swap transactions).
//!
//! Everything above the [`Backend`] trait is generic, and runs against a real etcd
//! ([`EtcdStore`], from [`connect`]) or an in-memory one ([`MemoryStore`]); the test suite in
//! `tests/suite.rs` runs the same cases against both.

mod backend;
mod backoff;
mod cache;
mod canary;
mod connect;
mod error;
mod etcd;
mod fenced;
mod identity;
mod memory;
mod offload;
mod publisher;
mod quota;
mod reflection;
pub mod remote_file;
mod retry;
mod watcher;

pub use backend::{
    list_prefix, prefix_end, Backend, Compare, EventKind, Header, KeyValue, LeaseId, RangePage,
    RawEvent, Txn, TxnOp, TxnResponse, WatchMessage, WatchStream,
};
pub use backoff::{Backoff, BackoffConfig};
pub use cache::CachedCluster;
pub use canary::wait_for_canaries;
pub use connect::{connect, connect_lazy, EtcdConfig};
pub use error::KvError;
pub use etcd::{watch_events_received, EtcdStore};
pub use fenced::Fenced;
pub use identity::{lowest_free, resolve_identity, IdentityError};
pub use memory::MemoryStore;
pub use offload::{bulk_work_within, off_the_worker};
pub use publisher::{Publisher, PublisherConfig, PublisherStats};
pub use quota::{EntryQuota, EntryRoom, DEFAULT_ENTRY_LIMIT, MAX_VALUE_BYTES};
pub use reflection::{RawReflection, RawWatchEvent, Reflect, Reflection, WatchEvent, WatchStats};
pub use retry::{is_transient, retry_transient};
pub use watcher::{
    watch_cluster, watch_prefix, watch_raw, EventWatch, RawWatchHandle, WatchConfig, WatchHandle,
};
