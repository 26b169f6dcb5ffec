//! Links, addresses, routes and neighbours of one network namespace, through one netlink
//! socket opened inside it.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoVeth, InfoVxlan, LinkAttribute,
    LinkMessage,
};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::error::{io_error, is_no_such_device, NetlinkError, Result};
use crate::netns;

/// What the datapath needs to know about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// An IPv4 route through a link of the namespace.
#[derive(Clone, Debug)]
pub struct Route<'a> {
    pub destination: Ipv4Net,
    pub dev: &'a str,
    pub gateway: Option<Ipv4Addr>,
    /// `scope link`: the destination is on the link, no gateway.
    pub link_scope: bool,
}

/// An IPv4 route of the main table tagged with a route protocol number (`ip route ... proto
/// N`), the mark of the routes one owner manages: listed, replaced and deleted by it alone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnedRoute {
    pub destination: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ifindex: u32,
}

/// Runs `f` with a netlink session in the named namespace (`None`: the caller's). The session
/// lives on a dedicated thread (see the crate documentation) and ends with `f`.
pub fn with_netlink<T, F>(netns: Option<&str>, f: F) -> Result<T>
where
    F: FnOnce(&Netlink) -> Result<T> + Send,
    T: Send,
{
    let path = netns.map(netns::path);
    netns::run_in(path.as_deref(), || {
        let nl = Netlink::open(netns.unwrap_or("the host namespace"))?;
        f(&nl)
    })?
}

/// A netlink session in one namespace. Made by [`with_netlink`]; its methods block.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
    /// For errors.
    netns: String,
}

impl Netlink {
    fn open(netns: &str) -> Result<Netlink> {
        let socket_error = |source| NetlinkError::Socket {
            netns: netns.to_owned(),
            source,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(socket_error)?;
        let (connection, handle, _) = {
            // The socket registers with the runtime's reactor as it is made.
            let _entered = rt.enter();
            rtnetlink::new_connection().map_err(socket_error)?
        };
        rt.spawn(connection);
        Ok(Netlink {
            rt,
            handle,
            netns: netns.to_owned(),
        })
    }

    /// The namespace this session acts in (as errors name it).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    fn request<T>(
        &self,
        op: &'static str,
        target: &str,
        fut: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T> {
        self.rt.block_on(fut).map_err(|e| NetlinkError::Request {
            op,
            target: target.to_owned(),
            netns: self.netns.clone(),
            source: io_error(e),
        })
    }

    /// The link named `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        self.get(name)?
            .map(|message| self.link_info(name, &message))
            .transpose()
    }

    /// The link named `name`; an error names the link when there is none.
    pub fn existing_link(&self, name: &str) -> Result<LinkInfo> {
        self.link(name)?.ok_or_else(|| self.no_such_link(name))
    }

    /// The kernel's description of the link named `name`, if there is one.
    fn get(&self, name: &str) -> Result<Option<LinkMessage>> {
        let found = self.rt.block_on(async {
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await
        });
        match found {
            Ok(message) => Ok(message),
            Err(e) if is_no_such_device(&e) => Ok(None),
            Err(e) => Err(NetlinkError::Request {
                op: "reading link",
                target: name.to_owned(),
                netns: self.netns.clone(),
                source: io_error(e),
            }),
        }
    }

    fn link_info(&self, name: &str, message: &LinkMessage) -> Result<LinkInfo> {
        let bad = |detail: &str| NetlinkError::BadLink {
            link: name.to_owned(),
            netns: self.netns.clone(),
            detail: detail.to_owned(),
        };
        let mut mac = None;
        let mut mtu = None;
        for attr in &message.attributes {
            match attr {
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                _ => {}
            }
        }
        Ok(LinkInfo {
            ifindex: message.header.index,
            mac: mac.ok_or_else(|| bad("no Ethernet address"))?,
            mtu: mtu.ok_or_else(|| bad("no MTU"))?,
        })
    }

    /// The ifindex of `name`; an error names the link when there is none.
    pub fn index(&self, name: &str) -> Result<u32> {
        self.get(name)?
            .map(|message| message.header.index)
            .ok_or_else(|| self.no_such_link(name))
    }

    fn no_such_link(&self, name: &str) -> NetlinkError {
        NetlinkError::NoSuchLink {
            link: name.to_owned(),
            netns: self.netns.clone(),
        }
    }

    /// `ip link add NAME [mtu M] type veth peer name PEER [mtu M] [netns PEER_NETNS]`.
    pub fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: Option<&str>,
        mtu: Option<u32>,
    ) -> Result<()> {
        let peer_ns = peer_netns.map(netns::open).transpose()?;
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
        let mut builder = LinkVeth::new(name, peer);
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            builder = builder.mtu(mtu);
        }
        if let Some(ns) = &peer_ns {
            peer_msg = peer_msg.setns_by_fd(ns.as_raw_fd());
        }
        let message = builder
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.request(
            "adding veth",
            &format!("{name} (peer {peer})"),
            self.handle.link().add(message).execute(),
        )
    }

    /// `ip link add NAME type bridge`.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        self.request(
            "adding bridge",
            name,
            self.handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute(),
        )
    }

    /// `ip link add NAME type vxlan external dstport PORT nolearning`: one device for every
    /// remote, the tunnel key chosen per packet (collect-metadata mode).
    pub fn add_vxlan_external(&self, name: &str, port: u16) -> Result<()> {
        let message = LinkMessageBuilder::<LinkVxlan>::new(name)
            .append_info_data(InfoVxlan::CollectMetadata(true))
            .append_info_data(InfoVxlan::Port(port))
            .append_info_data(InfoVxlan::Learning(false))
            .build();
        self.request(
            "adding vxlan",
            name,
            self.handle.link().add(message).execute(),
        )
    }

    fn set(
        &self,
        op: &'static str,
        name: &str,
        f: impl FnOnce(LinkMessageBuilder<LinkUnspec>) -> LinkMessageBuilder<LinkUnspec>,
    ) -> Result<()> {
        let index = self.index(name)?;
        let message = f(LinkUnspec::new_with_index(index)).build();
        self.request(op, name, self.handle.link().set(message).execute())
    }

    /// `ip link set NAME up`.
    pub fn set_up(&self, name: &str) -> Result<()> {
        self.set("setting up", name, |b| b.up())
    }

    /// `ip link set NAME mtu MTU`.
    pub fn set_mtu(&self, name: &str, mtu: u32) -> Result<()> {
        self.set("setting the MTU of", name, |b| b.mtu(mtu))
    }

    /// `ip link set NAME master BRIDGE up`.
    pub fn set_master_up(&self, name: &str, bridge: &str) -> Result<()> {
        let bridge_index = self.index(bridge)?;
        self.set("attaching to bridge", name, |b| {
            b.controller(bridge_index).up()
        })
    }

    /// `ip link set NAME addrgenmode none`: no IPv6 link-local address (nor the chatter that
    /// comes with one). Set before the link goes up.
    pub fn set_no_ipv6_addrgen(&self, name: &str) -> Result<()> {
        self.set("turning off IPv6 address generation of", name, |b| {
            b.append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
        })
    }

    /// `sysctl net.ipv4.conf.NAME.forwarding=1`: IPv4 forwarding for packets entering through
    /// this link only. (/proc/sys/net answers for the namespace of the thread that opens it,
    /// this session's.)
    pub fn enable_ipv4_forwarding(&self, name: &str) -> Result<()> {
        self.set_ipv4_conf(name, "forwarding", "1", "enabling IPv4 forwarding on")
    }

    /// `sysctl net.ipv4.conf.{all,NAME}.rp_filter=1`: strict reverse-path filtering on the
    /// link (the kernel applies the greater of `all` and the link's value, so both are set).
    pub fn set_strict_rp_filter(&self, name: &str) -> Result<()> {
        for link in ["all", name] {
            self.set_ipv4_conf(link, "rp_filter", "1", "setting strict rp_filter on")?;
        }
        Ok(())
    }

    /// Writes `/proc/sys/net/ipv4/conf/LINK/KEY` of this session's namespace.
    fn set_ipv4_conf(&self, link: &str, key: &str, value: &str, op: &'static str) -> Result<()> {
        let path = format!("/proc/sys/net/ipv4/conf/{link}/{key}");
        std::fs::write(&path, value).map_err(|source| NetlinkError::Request {
            op,
            target: link.to_owned(),
            netns: self.netns.clone(),
            source,
        })
    }

    /// The link holding the IPv4 address `addr` (e.g. the node's uplink by its node IP).
    pub fn link_with_address(&self, addr: Ipv4Addr) -> Result<Option<String>> {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a list freed below by freeifaddrs; every node
        // is read only while the list lives.
        unsafe {
            if libc::getifaddrs(&mut list) != 0 {
                return Err(NetlinkError::Request {
                    op: "listing addresses",
                    target: addr.to_string(),
                    netns: self.netns.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
            let mut found = None;
            let mut node = list;
            while !node.is_null() {
                let ifa = &*node;
                if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    if Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()) == addr {
                        found = Some(
                            std::ffi::CStr::from_ptr(ifa.ifa_name)
                                .to_string_lossy()
                                .into_owned(),
                        );
                        break;
                    }
                }
                node = ifa.ifa_next;
            }
            libc::freeifaddrs(list);
            Ok(found)
        }
    }

    /// `ip link del NAME` (a veth takes its peer along).
    pub fn delete_link(&self, name: &str) -> Result<()> {
        let index = self.index(name)?;
        self.request(
            "deleting link",
            name,
            self.handle.link().del(index).execute(),
        )
    }

    /// `ip addr add ADDRESS dev NAME`.
    pub fn add_address(&self, name: &str, address: Ipv4Net) -> Result<()> {
        let index = self.index(name)?;
        self.request(
            "adding address",
            &format!("{address} to {name}"),
            self.handle
                .address()
                .add(index, IpAddr::V4(address.addr()), address.prefix_len())
                .execute(),
        )
    }

    /// `ip route add` (or `replace`) of an IPv4 route.
    pub fn add_route(&self, route: &Route<'_>, replace: bool) -> Result<()> {
        let index = self.index(route.dev)?;
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination.addr(), route.destination.prefix_len())
            .output_interface(index);
        if let Some(gw) = route.gateway {
            builder = builder.gateway(gw);
        }
        if route.link_scope {
            builder = builder.scope(RouteScope::Link);
        }
        let mut request = self.handle.route().add(builder.build());
        if replace {
            request = request.replace();
        }
        let target = match route.gateway {
            Some(gw) => format!("{} via {gw} dev {}", route.destination, route.dev),
            None => format!("{} dev {}", route.destination, route.dev),
        };
        self.request("adding route", &target, request.execute())
    }

    /// The IPv4 routes of the main table with route protocol `protocol` and a gateway.
    pub fn owned_routes(&self, protocol: u8) -> Result<Vec<OwnedRoute>> {
        let messages: Vec<RouteMessage> = self.request(
            "listing routes",
            &format!("proto {protocol}"),
            self.handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect(),
        )?;
        Ok(messages
            .iter()
            .filter(|m| {
                u8::from(m.header.protocol) == protocol
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
            })
            .filter_map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let (mut gateway, mut ifindex) = (None, 0);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                        RouteAttribute::Oif(i) => ifindex = *i,
                        _ => {}
                    }
                }
                Some(OwnedRoute {
                    destination: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    gateway: gateway?,
                    ifindex,
                })
            })
            .collect())
    }

    /// `ip route add DEST via GATEWAY dev IFINDEX proto PROTOCOL` in the main table, or with
    /// `replace` (a route of `protocol` for DEST is there) `ip route replace`. An add fails with
    /// EEXIST ([`NetlinkError::is_exists`]) while any other route for DEST is in the way: a
    /// replace would overwrite it whatever its protocol, and the owner of `protocol` touches
    /// only its own routes.
    pub fn put_owned_route(&self, route: &OwnedRoute, protocol: u8, replace: bool) -> Result<()> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination.addr(), route.destination.prefix_len())
            .gateway(route.gateway)
            .output_interface(route.ifindex)
            .protocol(RouteProtocol::from(protocol))
            .build();
        let request = self.handle.route().add(message);
        let (op, request) = if replace {
            ("replacing route", request.replace())
        } else {
            ("adding route", request)
        };
        self.request(
            op,
            &format!(
                "{} via {} dev #{} proto {protocol}",
                route.destination, route.gateway, route.ifindex
            ),
            request.execute(),
        )
    }

    /// `ip route del DEST proto PROTOCOL` in the main table (only a route of that protocol
    /// matches).
    pub fn delete_owned_route(&self, destination: Ipv4Net, protocol: u8) -> Result<()> {
        let message = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.addr(), destination.prefix_len())
            .protocol(RouteProtocol::from(protocol))
            .build();
        self.request(
            "deleting route",
            &format!("{destination} proto {protocol}"),
            self.handle.route().del(message).execute(),
        )
    }

    /// The IPv4 networks of link `name` (address and prefix of each of its addresses).
    pub fn ipv4_networks(&self, name: &str) -> Result<Vec<Ipv4Net>> {
        let index = self.index(name)?;
        let messages: Vec<_> = self.request(
            "listing addresses of",
            name,
            self.handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect(),
        )?;
        Ok(messages
            .iter()
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) => {
                        Ipv4Net::new(*ip, m.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// `ip neigh replace IP dev NAME lladdr MAC nud permanent`.
    pub fn replace_permanent_neighbour(
        &self,
        name: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<()> {
        let index = self.index(name)?;
        self.request(
            "setting neighbour",
            &format!("{ip} on {name}"),
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(ip))
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
        )
    }
}
