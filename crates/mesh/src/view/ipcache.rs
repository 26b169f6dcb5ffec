//! Admission of ipcache entries: identity in the cluster's range, no overlap with a local
//! prefix, one claimant per prefix (lower cluster id wins), pending while the node they tunnel
//! to is unknown.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use meshd_state::{compact, ClusterName, IpcacheEntry};

use super::cluster::{rejected, EntryValue, Status, StatusCode, StoredEntry};
use super::txn::{Txn, Work};
use super::MeshView;
use crate::reject::RejectReason;

impl MeshView {
    pub(super) fn upsert_entry(&mut self, c: &ClusterName, entry: IpcacheEntry, txn: &mut Txn) {
        let p = entry.prefix;
        let value = EntryValue {
            identity: entry.identity,
            host_ip: entry.host_ip,
        };
        let local_cluster = *c == self.local.cluster;
        let cs = self.cluster_mut(c);
        let arc = cs.name.clone();
        let host = entry.host_ip;
        let mut new_prefix = false;
        match cs.ipcache.get_mut(&p) {
            Some(stored) => {
                let old_host = stored.value.host_ip;
                // A rewritten key is judged afresh: a repeated bad update is reported again.
                cs.ipcache_counts.track(stored.status, false);
                stored.status = StatusCode::New;
                stored.value = value;
                cs.entry_reasons.remove(&p);
                if old_host != host {
                    remove_by_host(&mut cs.by_host, old_host, &p);
                    cs.by_host.entry(host).or_default().insert(p);
                }
            }
            None => {
                cs.ipcache.insert(p, StoredEntry::new(value));
                cs.ipcache_lengths.add(&p);
                cs.by_host.entry(host).or_default().insert(p);
                new_prefix = true;
            }
        }
        self.ipcache_inserts += usize::from(new_prefix);
        txn.touched_prefixes.push(p);
        // Other claimants of the prefix are re-examined when this entry's (reset) status
        // changes, in `eval_entry`.
        if local_cluster && new_prefix && self.local_prefixes.add(p) {
            self.push_remote_overlapping(&p, txn);
        }
        txn.work.push_back(Work::Entry(arc, p));
    }

    pub(super) fn delete_entry(&mut self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        let local_cluster = *c == self.local.cluster;
        let Some(cs) = self.clusters.get_mut(c) else {
            return;
        };
        let Some(old) = cs.ipcache.remove(p) else {
            return;
        };
        cs.ipcache_counts.track(old.status, false);
        cs.entry_reasons.remove(p);
        cs.ipcache_lengths.remove(p);
        remove_by_host(&mut cs.by_host, old.value.host_ip, p);
        txn.touched_prefixes.push(*p);
        if local_cluster {
            if self.local_prefixes.remove(p) {
                self.push_remote_overlapping(p, txn);
            }
        } else {
            self.push_prefix_claimants(c, p, txn);
        }
    }

    fn push_prefix_claimants(&self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        for (other, os) in &self.clusters {
            if other != c && !os.is_local() && os.ipcache.contains_key(p) {
                txn.work.push_back(Work::Entry(os.name.clone(), *p));
            }
        }
    }

    fn entry_base_status(&self, c: &ClusterName, p: &IpNet) -> Option<Status> {
        let cs = self.clusters.get(c)?;
        let entry = &cs.ipcache.get(p)?.value;
        let id = match self.cluster_id_of(cs) {
            Ok(id) => id,
            Err(status) => return Some(status),
        };
        let identity = entry.identity;
        if identity.is_reserved() {
            return Some(rejected(RejectReason::ReservedIdentity { identity }));
        }
        if identity.cluster_id() != Some(id) {
            return Some(rejected(RejectReason::IdentityOutOfRange {
                identity,
                cluster_id: id,
            }));
        }
        if !cs.is_local() {
            if let Some(local) = self.local_prefixes.first_overlap(p) {
                return Some(rejected(RejectReason::OverlapsLocal { prefix: *p, local }));
            }
        }
        let host = entry.host_ip;
        let known = cs.admitted_node_ips.contains_key(&host)
            || (cs.is_local() && host == self.local.node_ip);
        if !known {
            return Some(Status::AwaitingNode);
        }
        Some(Status::Admitted)
    }

    fn entry_status(&self, c: &ClusterName, p: &IpNet) -> Option<Status> {
        let base = self.entry_base_status(c, p)?;
        let Some(my_id) = self.clusters[c].accepted_id() else {
            return Some(base);
        };
        if base != Status::Admitted {
            return Some(base);
        }
        for (other, os) in &self.clusters {
            let Some(their_id) = os.accepted_id() else {
                continue;
            };
            if other != c
                && their_id < my_id
                && os.ipcache.contains_key(p)
                && self.entry_base_status(other, p) == Some(Status::Admitted)
            {
                return Some(rejected(RejectReason::PrefixClaimed {
                    prefix: *p,
                    by: other.clone(),
                }));
            }
        }
        Some(Status::Admitted)
    }

    pub(super) fn eval_entry(&mut self, c: &ClusterName, p: &IpNet, txn: &mut Txn) {
        let Some(new) = self.entry_status(c, p) else {
            return;
        };
        let cs = self.clusters.get_mut(c).expect("evaluated above");
        let Some(old) = cs.replace_entry_status(p, new) else {
            return;
        };
        let stored = cs.ipcache.get_mut(p).expect("evaluated above");
        cs.ipcache_counts.track(old.code(), false);
        cs.ipcache_counts.track(stored.status, true);
        txn.touched_prefixes.push(*p);
        // A key written in this transaction (New) is reported by its final status alone, so
        // the common New -> Admitted needs no record.
        let fresh_and_admitted = old == Status::New && stored.status == StatusCode::Admitted;
        if !stored.marked && !fresh_and_admitted {
            stored.marked = true;
            txn.changed_entries
                .push((cs.name.clone(), *p, old, stored.value.host_ip));
        }
        if !cs.is_local() {
            self.push_prefix_claimants(c, p, txn);
        }
    }
}

/// Fewest inserts that make a compaction worth its O(n) pass.
const COMPACT_AFTER: usize = 4096;

impl MeshView {
    /// After a cluster's ipcache list: rebuilds the ipcache stores (each cluster's entries and
    /// per-host index, the desired ipcache) with full B-tree nodes if they grew by a quarter
    /// since the last time. A list fills them one insert at a time, which leaves their nodes
    /// about half full: at 500k entries that was about 130 bytes an entry of the view's 260.
    /// Not per event: once per list that grew the view.
    pub(super) fn compact_ipcache(&mut self) {
        if self.ipcache_inserts < COMPACT_AFTER.max(self.ipcache_out.len() / 4) {
            return;
        }
        self.ipcache_inserts = 0;
        compact::btree_map(&mut self.ipcache_out);
        for cs in self.clusters.values_mut() {
            compact::btree_map(&mut cs.ipcache);
            cs.by_host.values_mut().for_each(compact::btree_set);
        }
    }
}

fn remove_by_host(by_host: &mut HashMap<IpAddr, BTreeSet<IpNet>>, host: IpAddr, p: &IpNet) {
    if let Some(set) = by_host.get_mut(&host) {
        set.remove(p);
        if set.is_empty() {
            by_host.remove(&host);
        }
    }
}
