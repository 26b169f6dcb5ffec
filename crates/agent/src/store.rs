//! The agent's own state on disk: this node's endpoints and the address allocation cursor, in
//! `<state_dir>/endpoints.json`. Written atomically (temp file + rename) before any plumbing is
//! made for an endpoint and after it is removed, so a crash at any point leaves a record of
//! everything that may exist and an agent restart recovers endpoints instead of recreating them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use meshd_state::{Labels, NumericIdentity};
use serde::{Deserialize, Serialize};

use crate::ipam::{Ipam, IpamError};

/// One endpoint of this node, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub name: String,
    pub namespace: String,
    /// The labels the user gave.
    pub user_labels: Labels,
    /// Every label of the identity (user labels + namespace + cluster).
    pub labels: Labels,
    pub identity: NumericIdentity,
    pub ip: Ipv4Addr,
    /// Name of the endpoint's network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// Host side of the veth, in the node's namespace.
    pub host_ifname: String,
    pub created_ms: u64,
    /// An add or a delete under way: written before the plumbing is made or taken down, so
    /// the next start finishes what a crash interrupted. Absent (`Ready`) in files written
    /// before it existed.
    #[serde(default, skip_serializing_if = "Phase::is_ready")]
    pub phase: Phase,
}

/// Where an endpoint's add or delete stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Added completely: plumbing made, program attached, in the maps.
    #[default]
    Ready,
    /// Being added: the plumbing may be missing or half made (a veth without its address or
    /// routes); a start after a crash makes it again from scratch.
    Adding,
    /// Being deleted: a start after a crash finishes the delete.
    Deleting,
}

impl Phase {
    pub fn is_ready(&self) -> bool {
        *self == Phase::Ready
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(default)]
    next_ip: Option<Ipv4Addr>,
    #[serde(default)]
    endpoints: BTreeMap<String, EndpointRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state file {path}: endpoint {endpoint}: {source}")]
    Ipam {
        path: PathBuf,
        endpoint: String,
        source: IpamError,
    },
}

/// The endpoints and the address allocator, backed by the state file.
#[derive(Debug)]
pub struct EndpointStore {
    path: PathBuf,
    endpoints: BTreeMap<String, EndpointRecord>,
    ipam: Ipam,
}

const FILE: &str = "endpoints.json";

impl EndpointStore {
    /// Opens (or starts) the store in `state_dir` for addresses from `ipam`'s CIDR. Every
    /// recorded address is reserved again; one outside the CIDR (the node's pod CIDR changed)
    /// is an error naming the endpoint, because that endpoint would be unreachable.
    pub fn open(state_dir: &Path, mut ipam: Ipam) -> Result<Self, StoreError> {
        let path = state_dir.join(FILE);
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            path: path.clone(),
            what: "creating the state directory",
            source,
        })?;
        let file: StateFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    what: "reading",
                    source,
                })
            }
        };
        for (name, ep) in &file.endpoints {
            ipam.reserve(ep.ip, name)
                .map_err(|source| StoreError::Ipam {
                    path: path.clone(),
                    endpoint: name.clone(),
                    source,
                })?;
        }
        if let Some(next) = file.next_ip {
            ipam.set_cursor(next);
        }
        Ok(Self {
            path,
            endpoints: file.endpoints,
            ipam,
        })
    }

    pub fn get(&self, name: &str) -> Option<&EndpointRecord> {
        self.endpoints.get(name)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.endpoints.values()
    }

    /// The identity an endpoint of this node with exactly `labels` has: what `add` can use when
    /// etcd cannot be asked. The identity stays allocated while that endpoint's ipcache record
    /// refers to it.
    pub fn identity_of(&self, labels: &Labels) -> Option<NumericIdentity> {
        self.endpoints()
            .find(|rec| rec.labels == *labels)
            .map(|rec| rec.identity)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn host_ifname_in_use(&self, ifname: &str) -> bool {
        self.endpoints.values().any(|e| e.host_ifname == ifname)
    }

    /// Takes the next free address for `owner` (not persisted until [`Self::insert`]).
    pub fn allocate_ip(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        self.ipam.allocate(owner)
    }

    /// Gives back an address allocated for an endpoint that was never inserted.
    pub fn release_ip(&mut self, ip: Ipv4Addr) {
        if !self.endpoints.values().any(|e| e.ip == ip) {
            self.ipam.release(ip);
        }
    }

    /// Records an endpoint and writes the file.
    pub fn insert(&mut self, record: EndpointRecord) -> Result<(), StoreError> {
        self.endpoints.insert(record.name.clone(), record);
        self.save()
    }

    /// Forgets an endpoint, frees its address and writes the file.
    pub fn remove(&mut self, name: &str) -> Result<Option<EndpointRecord>, StoreError> {
        let removed = self.endpoints.remove(name);
        if let Some(ep) = &removed {
            self.ipam.release(ep.ip);
            self.save()?;
        }
        Ok(removed)
    }

    fn save(&self) -> Result<(), StoreError> {
        let file = StateFile {
            version: 1,
            next_ip: Some(self.ipam.cursor()),
            endpoints: self.endpoints.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("state serializes");
        let tmp = self.path.with_extension("json.tmp");
        let io = |what| {
            let path = self.path.clone();
            move |source| StoreError::Io { path, what, source }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io("creating temp file"))?;
        f.write_all(&bytes).map_err(io("writing temp file"))?;
        // Durable before the rename makes it the state: a crash never leaves a torn file.
        f.sync_all().map_err(io("syncing temp file"))?;
        std::fs::rename(&tmp, &self.path).map_err(io("renaming temp file"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, ip: Ipv4Addr) -> EndpointRecord {
        EndpointRecord {
            name: name.into(),
            namespace: "default".into(),
            user_labels: Labels::from_pairs([("app", name)]),
            labels: Labels::from_pairs([("app", name), ("meshd.io/cluster", "c1")]),
            identity: NumericIdentity::new((1 << 16) | 300).unwrap(),
            ip,
            netns: format!("meshd-n1-{name}"),
            host_ifname: format!("lxc{name}"),
            created_ms: 1,
            phase: Phase::Ready,
        }
    }

    fn ipam() -> Ipam {
        Ipam::new("10.1.1.0/24".parse().unwrap())
    }

    #[test]
    fn allocations_survive_a_reopen_and_are_never_reused_while_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EndpointStore::open(dir.path(), ipam()).unwrap();
        let a = store.allocate_ip("a").unwrap();
        store.insert(record("a", a)).unwrap();
        let b = store.allocate_ip("b").unwrap();
        store.insert(record("b", b)).unwrap();
        drop(store);

        let mut store = EndpointStore::open(dir.path(), ipam()).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.get("a").unwrap(), &record("a", a));
        let c = store.allocate_ip("c").unwrap();
        assert!(c != a && c != b);
        // Freed on delete, and the freeing is persisted too.
        store.remove("a").unwrap();
        drop(store);
        let store = EndpointStore::open(dir.path(), ipam()).unwrap();
        assert!(store.get("a").is_none());
    }

    #[test]
    fn the_phase_of_an_interrupted_add_or_delete_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EndpointStore::open(dir.path(), ipam()).unwrap();
        let a = store.allocate_ip("a").unwrap();
        store
            .insert(EndpointRecord {
                phase: Phase::Adding,
                ..record("a", a)
            })
            .unwrap();
        let b = store.allocate_ip("b").unwrap();
        store
            .insert(EndpointRecord {
                phase: Phase::Deleting,
                ..record("b", b)
            })
            .unwrap();
        let c = store.allocate_ip("c").unwrap();
        store.insert(record("c", c)).unwrap();
        drop(store);
        let store = EndpointStore::open(dir.path(), ipam()).unwrap();
        assert_eq!(store.get("a").unwrap().phase, Phase::Adding);
        assert_eq!(store.get("b").unwrap().phase, Phase::Deleting);
        assert_eq!(store.get("c").unwrap().phase, Phase::Ready);
        // A ready record is written as before (no phase field), and a file without the field
        // reads as ready.
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.matches("\"phase\"").count(), 2, "{text}");
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let err = EndpointStore::open(dir.path(), ipam()).unwrap_err();
        assert!(err.to_string().contains("endpoints.json"), "{err}");
    }

    #[test]
    fn a_changed_pod_cidr_names_the_stranded_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = EndpointStore::open(dir.path(), ipam()).unwrap();
        let a = store.allocate_ip("a").unwrap();
        store.insert(record("a", a)).unwrap();
        let err =
            EndpointStore::open(dir.path(), Ipam::new("10.9.0.0/24".parse().unwrap())).unwrap_err();
        assert!(err.to_string().contains("endpoint a"), "{err}");
    }
}
