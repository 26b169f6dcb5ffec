//! meshd's etcd layer: connecting (plaintext or mTLS), lease-backed publishing, list-then-watch
//! with mark-and-sweep, and sync canaries.

mod backend;
mod connect;
mod error;
mod etcd;

pub use backend::{
    prefix_end, Backend, EventKind, Header, KeyValue, LeaseId, RangePage, RawEvent, WatchMessage,
    WatchStream,
};
pub use connect::{connect, connect_lazy, EtcdConfig};
pub use error::KvError;
pub use etcd::EtcdStore;
