//! The one seam between the merged view and the maps: the view's typed operations
//! ([`DatapathOp`], [`ServiceOp`]) applied to the pinned maps, and the maps read back into the
//! view's shape ([`DesiredDatapath`]) for the full diff. Nothing above this module knows the
//! raw form of a map entry.
//!
//! The datapath is IPv4 only for now: operations about IPv6 prefixes, nodes, tunnel endpoints
//! or frontends succeed without writing (they stay in the view), and [`ipv4_only`] is the part
//! of a desired state the maps can hold.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use meshd_mesh::{
    Backend, BackendSlot, DatapathOp, DesiredDatapath, DesiredServices, Exposure, Frontend,
    FrontendValue, IpProto, IpcacheTarget, PolicyKey, PolicyValue, ServiceOp,
};
use meshd_state::{ClusterId, NumericIdentity};

use crate::error::Result;
use crate::maps::{ipcache_target, DatapathMaps, LbBackend, LbFrontend, PolicyEntry};
use meshd_ebpf::abi;

fn policy_entry(key: &PolicyKey) -> PolicyEntry {
    PolicyEntry {
        subject: key.subject.get(),
        peer: key.peer.map(NumericIdentity::get),
        proto: key.proto.map(IpProto::number),
        dport: key.dport,
        direction: key.direction,
    }
}

fn lb_frontend(f: &Frontend) -> Option<LbFrontend> {
    match f.ip {
        IpAddr::V4(addr) => Some(LbFrontend {
            addr,
            port: f.port,
            proto: f.proto.number(),
        }),
        IpAddr::V6(_) => None,
    }
}

/// The SERVICES flags of a frontend (see `meshd_service_flags` in the ABI header).
fn service_flags(value: &FrontendValue) -> u32 {
    let exposure = match value.exposure {
        Exposure::Vip => 0,
        Exposure::NodePort => abi::SERVICE_F_NODE_PORT,
        Exposure::ExternalIp => abi::SERVICE_F_EXTERNAL_IP,
    };
    let local = if value.local_only {
        abi::SERVICE_F_LOCAL
    } else {
        0
    };
    exposure | local
}

/// A SERVICES value read back; `None` for flags no desired state has (unknown bits, both
/// kinds at once, or Local on a VIP).
fn frontend_value(count: u32, flags: u32) -> Option<FrontendValue> {
    let local_only = flags & abi::SERVICE_F_LOCAL != 0;
    let exposure = match flags & !abi::SERVICE_F_LOCAL {
        0 if !local_only => Exposure::Vip,
        abi::SERVICE_F_NODE_PORT => Exposure::NodePort,
        abi::SERVICE_F_EXTERNAL_IP => Exposure::ExternalIp,
        _ => return None,
    };
    Some(FrontendValue {
        count,
        exposure,
        local_only,
    })
}

/// The part of `d` the IPv4 datapath holds: borrowed (no copy) when there is no IPv6, the
/// common case, since a copy at 500k entries is tens of megabytes.
pub fn ipv4_only(d: &DesiredDatapath) -> Cow<'_, DesiredDatapath> {
    let v6 = d.ipcache.iter().any(|(p, t)| ipcache_is_v6(p, t))
        || d.nodes.keys().any(IpAddr::is_ipv6)
        || d.services.services.keys().any(|f| f.ip.is_ipv6())
        || d.no_masquerade.iter().any(|p| matches!(p, IpNet::V6(_)));
    if !v6 {
        return Cow::Borrowed(d);
    }
    let mut out = d.clone();
    out.ipcache.retain(|p, t| !ipcache_is_v6(p, t));
    out.nodes.retain(|ip, _| ip.is_ipv4());
    out.services.services.retain(|f, _| f.ip.is_ipv4());
    out.services.backends.retain(|s, _| s.frontend.ip.is_ipv4());
    out.no_masquerade.retain(|p| matches!(p, IpNet::V4(_)));
    Cow::Owned(out)
}

fn ipcache_is_v6(p: &IpNet, t: &IpcacheTarget) -> bool {
    matches!(p, IpNet::V6(_)) || matches!(t.tunnel_endpoint, Some(IpAddr::V6(_)))
}

impl DatapathMaps {
    /// Applies one operation of the view. Deletes are idempotent; policy writes bump the
    /// policy revision (so established connections are checked again).
    pub fn apply(&mut self, op: &DatapathOp) -> Result<()> {
        match *op {
            DatapathOp::UpsertNode { ip, cluster_id } => match ip {
                IpAddr::V4(ip) => self.upsert_node(ip, cluster_id.get()),
                IpAddr::V6(_) => Ok(()),
            },
            DatapathOp::DeleteNode { ip } => match ip {
                IpAddr::V4(ip) => self.delete_node(ip),
                IpAddr::V6(_) => Ok(()),
            },
            DatapathOp::UpsertIpcache { prefix, target } => match prefix {
                IpNet::V4(prefix) if !ipcache_is_v6(&IpNet::V4(prefix), &target) => {
                    self.upsert_ipcache(prefix, target)
                }
                _ => Ok(()),
            },
            DatapathOp::DeleteIpcache { prefix } => match prefix {
                IpNet::V4(prefix) => self.delete_ipcache(prefix),
                IpNet::V6(_) => Ok(()),
            },
            DatapathOp::UpsertPolicy { key, value } => {
                self.upsert_policy(policy_entry(&key), value.verdict, value.cookie)
            }
            DatapathOp::DeletePolicy { key } => self.delete_policy(policy_entry(&key)),
            DatapathOp::EnablePolicy { subject, direction } => {
                self.set_policy_enabled(subject.get(), direction, true)
            }
            DatapathOp::DisablePolicy { subject, direction } => {
                self.set_policy_enabled(subject.get(), direction, false)
            }
            DatapathOp::UpsertNoMasquerade { prefix } => match prefix {
                IpNet::V4(prefix) => self.insert_no_masquerade(prefix),
                IpNet::V6(_) => Ok(()),
            },
            DatapathOp::DeleteNoMasquerade { prefix } => match prefix {
                IpNet::V4(prefix) => self.remove_no_masquerade(prefix),
                IpNet::V6(_) => Ok(()),
            },
        }
    }

    /// Applies one SERVICES/BACKENDS operation of the view.
    pub fn apply_service(&mut self, op: &ServiceOp) -> Result<()> {
        match *op {
            ServiceOp::UpsertBackend { slot, backend } => {
                let (Some(f), IpAddr::V4(addr)) = (lb_frontend(&slot.frontend), backend.ip) else {
                    return Ok(());
                };
                self.upsert_backend(
                    f,
                    slot.slot,
                    LbBackend {
                        addr,
                        port: backend.port,
                        cluster_id: backend.cluster_id.get(),
                    },
                )
            }
            ServiceOp::UpsertService { frontend, value } => match lb_frontend(&frontend) {
                Some(f) => self.upsert_service(f, value.count, service_flags(&value)),
                None => Ok(()),
            },
            ServiceOp::DeleteService { frontend } => match lb_frontend(&frontend) {
                Some(f) => self.delete_service(f),
                None => Ok(()),
            },
            ServiceOp::DeleteBackend { slot } => match lb_frontend(&slot.frontend) {
                Some(f) => self.delete_backend(f, slot.slot),
                None => Ok(()),
            },
        }
    }

    /// What IPCACHE, NODES, POLICY, SERVICES and BACKENDS hold, in the view's shape, so the
    /// full diff is `diff(&read_back, &desired)`. Entries no desired state could contain (an
    /// invalid identity, cluster id 0, an unknown protocol) are deleted on the way.
    pub fn read_back(&mut self) -> Result<DesiredDatapath> {
        let mut actual = DesiredDatapath::default();
        for prefix in self.ipcache_prefixes()? {
            let Some(value) = self.ipcache_value(prefix)? else {
                continue;
            };
            match ipcache_target(&value) {
                Some(target) => {
                    actual.ipcache.insert(IpNet::V4(prefix), target);
                }
                None => self.delete_ipcache(prefix)?,
            }
        }
        for (ip, cluster_id) in self.nodes()? {
            match ClusterId::new(u32::from(cluster_id)) {
                Ok(id) => {
                    actual.nodes.insert(IpAddr::V4(ip), id);
                }
                Err(_) => self.delete_node(ip)?,
            }
        }
        for (entry, verdict, cookie) in self.policy_entries()? {
            match policy_key(&entry) {
                Some(key) => {
                    actual.policy.insert(key, PolicyValue { verdict, cookie });
                }
                None => self.delete_policy(entry)?,
            }
        }
        for (subject, direction) in self.policy_enabled()? {
            match NumericIdentity::new(subject) {
                Ok(subject) => {
                    actual.policy_enabled.insert((subject, direction));
                }
                Err(_) => self.set_policy_enabled(subject, direction, false)?,
            }
        }
        actual.services = self.read_back_services()?;
        actual.no_masquerade = self.no_masquerade()?.into_iter().map(IpNet::V4).collect();
        Ok(actual)
    }

    fn read_back_services(&mut self) -> Result<DesiredServices> {
        let mut actual = DesiredServices::default();
        for (f, count, flags) in self.services()? {
            match (frontend(&f), frontend_value(count, flags)) {
                (Some(frontend), Some(value)) => {
                    actual.services.insert(frontend, value);
                }
                _ => self.delete_service(f)?,
            }
        }
        for (f, slot, b) in self.backends()? {
            match (frontend(&f), ClusterId::new(u32::from(b.cluster_id))) {
                (Some(frontend), Ok(cluster_id)) => {
                    actual.backends.insert(
                        BackendSlot { frontend, slot },
                        Backend {
                            cluster_id,
                            ip: IpAddr::V4(b.addr),
                            port: b.port,
                        },
                    );
                }
                _ => self.delete_backend(f, slot)?,
            }
        }
        Ok(actual)
    }
}

fn frontend(f: &LbFrontend) -> Option<Frontend> {
    match IpProto::from_number(f.proto) {
        Some(proto @ (IpProto::Tcp | IpProto::Udp)) => Some(Frontend {
            ip: IpAddr::V4(f.addr),
            port: f.port,
            proto,
        }),
        _ => None,
    }
}

/// The view's key of a policy entry read back; `None` when no view would write it.
fn policy_key(e: &PolicyEntry) -> Option<PolicyKey> {
    let peer = match e.peer {
        None => None,
        Some(n) => Some(NumericIdentity::from_datapath(n).ok()?),
    };
    let proto = match e.proto {
        None => None,
        Some(n) => Some(IpProto::from_number(n)?),
    };
    Some(PolicyKey {
        subject: NumericIdentity::new(e.subject).ok()?,
        peer,
        proto,
        dport: e.dport,
        direction: e.direction,
    })
}

/// An IPv4 address as the maps key it, for callers that only hold the domain type.
pub fn ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}
