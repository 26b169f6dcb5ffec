//! Publishes this node's records (its node record, its endpoints' ipcache entries) under one
//! etcd lease, so they expire by themselves when the node dies.
//!
//! One task owns the lease and the set of records that should exist. It keeps the lease alive
//! (every TTL/3); when the lease is gone (expired during an outage, etcd restored) it takes a
//! new one and writes every record again. Writes made while etcd is unreachable are kept and
//! written once it answers. On shutdown the lease is NOT revoked: a restarting agent writes
//! the same records under its new lease, so peers never see its endpoints disappear; if the
//! agent does not come back, the lease expires and takes them along.
//!
//! kvstore's lease publisher was not there when this was written; this is built on its
//! `Backend` trait so it can be swapped for it.

use std::collections::BTreeMap;
use std::time::Duration;

use meshd_kvstore::{Backend, KvError, LeaseId};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug)]
enum Command {
    Put {
        key: String,
        value: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Delete {
        key: String,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Handle to the publisher task.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Command>,
    lease: watch::Receiver<Option<LeaseId>>,
}

impl Publisher {
    /// Writes `key` under the node's lease. `Err` says the write did not reach etcd yet; the
    /// record is kept and written when etcd answers again.
    pub async fn put(&self, key: String, value: Vec<u8>) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Put { key, value, done })
            .await
            .map_err(|_| "publisher stopped".to_string())?;
        rx.await.map_err(|_| "publisher stopped".to_string())?
    }

    /// Deletes `key` and stops republishing it.
    pub async fn delete(&self, key: String) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Delete { key, done })
            .await
            .map_err(|_| "publisher stopped".to_string())?;
        rx.await.map_err(|_| "publisher stopped".to_string())?
    }

    /// Waits until a lease is granted.
    pub async fn wait_lease(&self) -> LeaseId {
        let mut rx = self.lease.clone();
        loop {
            if let Some(l) = *rx.borrow_and_update() {
                return l;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The current lease (None while none is granted).
    pub fn lease(&self) -> Option<LeaseId> {
        *self.lease.borrow()
    }
}

/// Starts the publisher task.
pub fn spawn<B: Backend>(backend: B, ttl: Duration) -> Publisher {
    let (tx, rx) = mpsc::channel(256);
    let (lease_tx, lease_rx) = watch::channel(None);
    tokio::spawn(run(backend, ttl, rx, lease_tx));
    Publisher {
        tx,
        lease: lease_rx,
    }
}

async fn run<B: Backend>(
    backend: B,
    ttl: Duration,
    mut rx: mpsc::Receiver<Command>,
    lease_tx: watch::Sender<Option<LeaseId>>,
) {
    let mut records: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // Records not yet written under the current lease.
    let mut dirty = false;
    let mut lease: Option<LeaseId> = None;
    let mut tombstones: std::collections::BTreeSet<String> = Default::default();
    let keepalive_every = (ttl / 3).max(Duration::from_millis(500));
    let mut tick = tokio::time::interval(keepalive_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Command::Put { key, value, done } => {
                        records.insert(key.clone(), value.clone());
                        let r = match lease {
                            Some(l) => backend.put(&key, value, Some(l)).await.map(drop),
                            None => Err(not_connected(&backend)),
                        };
                        if let Err(e) = &r {
                            handle_error(e, &mut lease, &lease_tx);
                            dirty = true;
                        }
                        let _ = done.send(r.map_err(|e| e.to_string()));
                    }
                    Command::Delete { key, done } => {
                        records.remove(&key);
                        let r = backend.delete(&key).await.map(drop);
                        if r.is_err() {
                            // The key lives on under our (living) lease: retry until it is gone.
                            tracing::warn!(key, "delete failed; retrying on the next tick");
                            tombstones.insert(key);
                        }
                        let _ = done.send(r.map_err(|e| e.to_string()));
                    }
                }
            }
            _ = tick.tick() => {
                match lease {
                    Some(l) => {
                        if let Err(e) = backend.keep_alive(l).await {
                            tracing::warn!(lease = format!("{l:x}"), error = %e, "lease keep-alive failed");
                            handle_error(&e, &mut lease, &lease_tx);
                        }
                    }
                    None => match backend.grant_lease(ttl).await {
                        Ok(l) => {
                            tracing::info!(lease = format!("{l:x}"), ttl = ?ttl, "granted node lease");
                            lease = Some(l);
                            lease_tx.send_replace(lease);
                            dirty = true;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot grant the node lease; retrying"),
                    },
                }
                for key in tombstones.clone() {
                    if records.contains_key(&key) || backend.delete(&key).await.is_ok() {
                        tombstones.remove(&key);
                    }
                }
                if dirty {
                    if let Some(l) = lease {
                        dirty = false;
                        for (key, value) in &records {
                            if let Err(e) = backend.put(key, value.clone(), Some(l)).await {
                                tracing::warn!(key, error = %e, "republishing failed; retrying");
                                handle_error(&e, &mut lease, &lease_tx);
                                dirty = true;
                                break;
                            }
                        }
                        if !dirty {
                            tracing::info!(records = records.len(), "published node records under lease");
                        }
                    }
                }
            }
        }
    }
}

fn not_connected<B: Backend>(backend: &B) -> KvError {
    KvError::Unavailable {
        endpoints: backend.describe(),
        op: "put",
        key: String::new(),
        reason: "no lease yet (etcd unreachable?)".into(),
    }
}

fn handle_error(
    e: &KvError,
    lease: &mut Option<LeaseId>,
    lease_tx: &watch::Sender<Option<LeaseId>>,
) {
    if matches!(e, KvError::LeaseNotFound { .. }) {
        *lease = None;
        lease_tx.send_replace(None);
    }
}
