/* SPDX-License-Identifier: Apache-2.0 */
/*
 * meshd datapath ABI: the one source of truth for everything the C programs and the Rust agent
 * share (map keys and values, events, reason codes). The Rust mirror lives in
 * ebpf/src/abi.rs; a test compares it field by field against the BTF of the compiled objects,
 * so any change here must be made there too (the test says which field moved).
 *
 * Byte order: IPv4 addresses are network byte order everywhere (copied from packets as-is).
 * Ports are network byte order in CT keys (copied from packets) and host byte order in policy
 * keys and drop events (written or read by the agent). Identities are host byte order.
 *
 * Padding is always spelled out, so a zeroed Rust value is a valid key (hash maps compare all
 * key bytes, and LPM tries compare prefix bits).
 */
#ifndef MESHD_ABI_H
#define MESHD_ABI_H

#include <linux/types.h>

/*
 * Constants are enums rather than #defines so that they appear in the objects' BTF, where the
 * Rust mirror test checks them.
 */

/* Map capacities. Changing one requires removing the pinned map (it is reused by name). */
enum meshd_limits {
	MESHD_IPCACHE_MAX = 512000,
	/* Above one remote cluster's default entry limit (600,000) with room for the rest of the
	 * mesh: at 512,000, one cluster publishing up to its limit filled the map, every other
	 * cluster's new /32 failed and the full diffs that retried them held up the whole node
	 * (RELIABILITY.md, floods). Not preallocated: the buckets (16 B each) are all it costs
	 * until filled. */
	MESHD_IPCACHE_HOSTS_MAX = 1048576,
	MESHD_ENDPOINTS_MAX = 65536,
	MESHD_NODES_MAX = 16384,
	MESHD_POLICY_MAX = 262144,
	MESHD_CT_MAX = 262144,
	MESHD_FRAGS_MAX = 8192,
	MESHD_SERVICES_MAX = 65536,
	MESHD_BACKENDS_MAX = 262144,
	MESHD_NAT_MAX = 262144,
	MESHD_NO_MASQ_MAX = 1024,
	MESHD_EVENTS_BYTES = 1 << 20,
};

/* Identity layout (DESIGN.md "Identities"): bits 16-23 cluster id, bits 0-15 local id. */
enum meshd_identity {
	MESHD_IDENTITY_HOST = 1,
	MESHD_IDENTITY_WORLD = 2,
	MESHD_IDENTITY_REMOTE_NODE = 6,
	MESHD_IDENTITY_CLUSTER_SHIFT = 16,
	MESHD_IDENTITY_CLUSTER_MASK = 0xff,
	MESHD_IDENTITY_MAX = 0xffffff, /* must fit a 24-bit VNI */
	/* Local-scope identities (bit 24): prefixes named by this node's policies (CIDR rules).
	 * Their ipcache entries stand for addresses outside the mesh, so traffic to them leaves
	 * like `world` (routed, masqueraded) while policy sees the prefix's own identity. */
	MESHD_IDENTITY_LOCAL_SCOPE = 0x1000000,
};

/* Directions, as seen by the endpoint the policy is about. */
enum meshd_dir {
	MESHD_DIR_INGRESS = 0,
	MESHD_DIR_EGRESS = 1,
	MESHD_DIR_COUNT = 2,
};

/*
 * Reason codes. A program's handler returns either a MESHD_FWD_* (>= 0, how the packet left) or a
 * negative MESHD_DROP_* (why it was dropped). The single exit of each program counts the reason
 * in METRICS at index (direction * MESHD_REASONS + abs(code)).
 */
enum meshd_reason {
	MESHD_FWD_LOCAL = 1,  /* redirected to a local endpoint */
	MESHD_FWD_TUNNEL = 2, /* encapsulated towards a remote node */
	MESHD_FWD_STACK = 3,  /* handed to the node's own stack (ARP, ipcache entry without tunnel) */
	MESHD_FWD_WORLD = 4,  /* routed out of the node by its FIB (a destination outside the mesh) */
	MESHD_FWD_NATIVE = 5, /* routed to a remote node without encapsulation (native routing) */
	/* too big for the egress MTU once the DSR option is in (see DSR below): answered with
	 * ICMP fragmentation needed to its sender, in its place */
	MESHD_FWD_FRAG_NEEDED = 6,

	MESHD_DROP_INVALID_PACKET = -130,   /* truncated or malformed headers */
	MESHD_DROP_UNSUPPORTED_L3 = -131,   /* not IPv4 (IPv6 comes later) */
	MESHD_DROP_INVALID_SOURCE = -132,   /* source IP is not the endpoint behind this interface */
	MESHD_DROP_UNKNOWN_DEST = -133,     /* no endpoint and no ipcache entry for the destination */
	MESHD_DROP_POLICY = -134,           /* policy enabled for this direction and no rule allows */
	MESHD_DROP_POLICY_DENY = -135,      /* an explicit deny rule matched */
	MESHD_DROP_UNKNOWN_NODE = -136,     /* overlay packet from an outer source that is no known node */
	MESHD_DROP_INVALID_IDENTITY = -137, /* identity's cluster bits differ from the sending node's */
	MESHD_DROP_NO_TUNNEL_KEY = -138,    /* overlay packet without tunnel metadata */
	MESHD_DROP_NO_CONFIG = -139,        /* CONFIG not written yet by the agent */
	MESHD_DROP_WRITE_ERROR = -140,      /* a helper rewriting the packet failed */
	MESHD_DROP_FRAG_NOT_FOUND = -141,   /* non-first IPv4 fragment whose first one was not seen */
	MESHD_DROP_NO_SERVICE_BACKEND = -142, /* new connection to a service frontend without backends */
	MESHD_DROP_NAT_NO_PORT = -143,      /* masquerade: no free port in the SNAT range */
	/* new connection to a public frontend with externalTrafficPolicy Local and no backend on
	 * this node */
	MESHD_DROP_NO_LOCAL_BACKEND = -144,
};

enum meshd_metrics_layout {
	MESHD_REASONS = 256,
	MESHD_METRICS_MAX = MESHD_DIR_COUNT * MESHD_REASONS,
};

/*
 * IPCACHE: longest-prefix match on the destination address, split in two maps because almost
 * every entry is an endpoint's /32: IPCACHE_HOSTS (hash, /32 entries) is looked up first, then
 * IPCACHE (LPM trie, all shorter prefixes). With 100k /32 entries in the trie, its depth cost
 * about 75 ns per packet (BENCHMARKS.md). The agent's map writer keeps /32s out of the trie.
 */
struct ipcache_key {
	__u32 prefixlen; /* LPM trie key header: number of significant bits in addr */
	__u32 addr;      /* network byte order */
};

enum meshd_ipcache_flags {
	MESHD_IPCACHE_F_LOCAL = 1, /* the prefix belongs to this node (informational) */
};

struct ipcache_host_key {
	__u32 addr; /* network byte order */
};

struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* node IP, network byte order; 0 = deliver to the local stack */
	__u32 flags;           /* MESHD_IPCACHE_F_* */
};

/* ENDPOINTS: local endpoints by IP. */
struct endpoint_key {
	__u32 addr; /* network byte order */
};

struct endpoint_value {
	__u32 ifindex;    /* host side of the endpoint's veth, in the node's namespace */
	__u32 identity;
	__u8 mac[6];      /* the endpoint's own MAC (inside its namespace) */
	__u8 node_mac[6]; /* the host side veth's MAC: the endpoint's gateway */
	__u32 flags;      /* reserved, 0 */
};

/* NODES: outer source addresses accepted on the overlay. */
struct node_key {
	__u32 addr; /* node IP, network byte order */
};

struct node_value {
	__u32 cluster_id; /* 1-255 */
	__u32 flags;      /* reserved, 0 */
};

/*
 * POLICY: (subject, peer, proto, dport, direction) -> verdict. Lookups go from most to least
 * specific: exact port, any port of the protocol, any protocol; each first with the peer
 * identity, then with peer 0 ("any peer"). An entry with direction | MESHD_POLICY_F_MARKER and
 * everything else 0 says "policy is enabled for this subject and direction": without it the
 * direction is default-allow, with it default-deny.
 */
enum meshd_policy_flags {
	MESHD_POLICY_F_MARKER = 0x80,
};

struct policy_key {
	__u32 subject_identity; /* the local endpoint's identity */
	__u32 peer_identity;    /* 0 = any peer */
	__u16 dport;            /* host byte order; 0 = any port */
	__u8 proto;             /* IPPROTO_*; 0 = any protocol */
	__u8 direction;         /* MESHD_DIR_*, or'ed with MESHD_POLICY_F_MARKER for the marker */
};

enum meshd_verdict {
	MESHD_VERDICT_ALLOW = 1,
	MESHD_VERDICT_DENY = 2,
	MESHD_VERDICT_ENABLED = 3, /* value of a marker entry */
};

struct policy_value {
	__u32 verdict; /* MESHD_VERDICT_* */
	__u32 cookie;  /* opaque rule id for the agent (monitor output), not used by the datapath */
};

/*
 * CT: two entries per connection, one per direction, keyed by the tuple of the packets going
 * that way, so every packet costs one lookup. The entry of the first packet's direction has
 * flags 0, the other MESHD_CT_F_REPLY: packets hitting a reply entry, and ICMP errors whose
 * embedded tuple has an entry, skip policy. Packets of the first direction are re-checked
 * against policy whenever CONFIG's policy_revision moved since their entry was last checked.
 */
struct ct_key {
	__u32 saddr; /* network byte order */
	__u32 daddr;
	__u16 sport; /* network byte order; ICMP echo: identifier in sport, 0 in dport */
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	/* bpf_ktime_get_coarse_ns() of a packet this way, refreshed at most once a second */
	__u64 last_seen_ns;
	__u32 flags;           /* MESHD_CT_F_* */
	__u32 policy_revision; /* CONFIG policy_revision when policy last allowed this direction */
	/* Service connections (see SERVICES below), network byte order:
	 * - MESHD_CT_F_SERVICE entry (client -> frontend tuple): the backend chosen for it;
	 * - entries of the translated tuple (client -> backend and its reply): the frontend, which
	 *   the reply entry (MESHD_CT_F_REV_NAT) writes back as the source of replies.
	 * 0 for connections that are not to a service. */
	__u32 nat_addr;
	__u16 nat_port;
	/* MESHD_CT_F_SERVICE entry: the BACKENDS slot its backend was last seen in (lib/lb.h checks
	 * that the backend still backs the frontend); 0 otherwise. */
	__u16 backend_slot;
	/*
	 * Forwarding cache of from-endpoint for this direction's packets to a remote endpoint
	 * (lib/fwd_cache.h): what the ENDPOINTS lookup of the sender and the ENDPOINTS and IPCACHE
	 * lookups of the destination decided, valid while CONFIG forward_revision equals
	 * fwd_revision and the packet comes in on fwd_ifindex. fwd_tunnel_endpoint 0 = empty.
	 */
	__u32 fwd_revision;
	__u32 fwd_ifindex;         /* the sender's host veth, checked as ENDPOINTS would */
	__u32 fwd_src_identity;    /* the sender's identity (the VNI) */
	__u32 fwd_dst_identity;    /* the destination's identity (metrics and events) */
	__u32 fwd_tunnel_endpoint; /* node the destination is behind (tunnel mode: the tunnel's
				    * remote; native: a marker, the FIB routes), network order */
	__u32 fwd_pad;
};

enum meshd_ct_flags {
	MESHD_CT_F_REPLY = 1,   /* this entry is the reply direction of the connection */
	MESHD_CT_F_CLOSING = 2, /* FIN or RST seen */
	MESHD_CT_F_SERVICE = 4, /* keyed by the frontend tuple: nat_* is the connection's backend */
	MESHD_CT_F_REV_NAT = 8, /* replies get source nat_addr:nat_port (the frontend) back */
	/* the entry node's entry of a public connection to a remote backend that started under
	 * DSR (see DSR below): its packets keep going DSR, those of one without it SNAT, whatever
	 * the mode says now */
	MESHD_CT_F_DSR = 16,
};

#define MESHD_CT_LIFETIME_TCP_NS (6ull * 3600 * 1000000000)
#define MESHD_CT_LIFETIME_CLOSING_NS (10ull * 1000000000)
#define MESHD_CT_LIFETIME_OTHER_NS (60ull * 1000000000)

/*
 * FRAGS: ports of fragmented datagrams, recorded from the first fragment so that later ones
 * (which carry no L4 header) get the same conntrack and policy treatment. Fragments arriving
 * before their first one are dropped.
 */
struct frag_key {
	__u32 saddr; /* network byte order */
	__u32 daddr;
	__u16 id; /* IPv4 identification, network byte order */
	__u8 proto;
	__u8 pad;
};

struct frag_value {
	__u16 sport; /* network byte order, as in ct_key */
	__u16 dport;
};

/* METRICS: per-CPU, index direction * MESHD_REASONS + abs(reason code). */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

enum meshd_config_flags {
	/* destinations outside the mesh are world and leave by the node's routes (see NAT
	 * below); without it (until the agent wrote its egress settings) they are dropped as
	 * MESHD_DROP_UNKNOWN_DEST */
	MESHD_CONFIG_F_WORLD = 1,
	/* masquerade world-bound traffic of local endpoints to node_ip (see NAT below) */
	MESHD_CONFIG_F_MASQUERADE = 2,
	/* native routing: traffic to remote endpoints leaves unencapsulated by the node's FIB
	 * (bpf_fib_lookup + redirect to the uplink), no VXLAN; receivers take the sender's
	 * identity from the ipcache by source address (from-netdev) */
	MESHD_CONFIG_F_NATIVE = 4,
	/* public frontends (service_lb_mode, see DSR below): a new TCP connection (UDP: every
	 * datagram) to a backend on another node leaves with the client's address and the DSR
	 * option instead of SNAT; only honoured with MESHD_CONFIG_F_NATIVE. `dsr` sets both,
	 * `hybrid` TCP only, `snat` neither */
	MESHD_CONFIG_F_DSR_TCP = 8,
	MESHD_CONFIG_F_DSR_UDP = 16,
	/* tunnel mode: VXLAN encapsulation in from-endpoint (and from-netdev's public path),
	 * handed straight to the underlay device, and decapsulation of VXLAN packets for node_ip
	 * on tunnel_port in from-netdev on the uplink (lib/vxlan.h); the wire format is the
	 * device's, and the device (vxlan_ifindex) stays for what the program leaves to it.
	 * Without it (`tunnel_encap: device`) the device does both */
	MESHD_CONFIG_F_TUNNEL_PROGRAM = 32,
};

/* CONFIG: a one-entry array written by the agent before it attaches the programs. */
struct datapath_config {
	__u32 vxlan_ifindex;   /* the VXLAN device (external mode) in the node's namespace */
	__u32 node_ip;         /* this node's underlay IP, network byte order */
	__u32 cluster_id;      /* this node's cluster */
	__u32 flags;           /* MESHD_CONFIG_F_* */
	__u32 policy_revision; /* bumped by the agent after every POLICY change */
	/* bumped by the agent after ENDPOINTS, IPCACHE or CONFIG changes: empties every CT
	 * forwarding cache (ct_value fwd_*) */
	__u32 forward_revision;
	/* SNAT port range of masquerade, host byte order, inclusive; disjoint from the node's
	 * ephemeral range (net.ipv4.ip_local_port_range, checked by the agent) so that the node's
	 * own connections never take a port a masqueraded flow holds */
	__u16 nat_port_min;
	__u16 nat_port_max;
	/* the VXLAN UDP port (the device's dstport), network byte order: what in-program
	 * encapsulation sends to and decapsulation accepts (MESHD_CONFIG_F_TUNNEL_PROGRAM) */
	__u16 tunnel_port;
	__u16 pad;
};

/*
 * EVENTS: ring buffer records, one per dropped packet (MESHD_EVENT_DROP, reason MESHD_DROP_*)
 * and, when EVENT_LIMIT enables them, one per new connection as conntrack creates its entries
 * (MESHD_EVENT_FLOW, reason the MESHD_FWD_* of that first packet). `meshd monitor` shows the
 * drops, `meshd observe` both.
 */
enum meshd_event_type {
	MESHD_EVENT_DROP = 1,
	MESHD_EVENT_FLOW = 2,
};

struct flow_event {
	__u64 timestamp_ns; /* CLOCK_MONOTONIC to a tick: bpf_ktime_get_coarse_ns(), conntrack's clock */
	__u32 event_type;   /* MESHD_EVENT_* */
	__u32 src_identity; /* 0 if not known when dropped */
	__u32 dst_identity;
	__u32 saddr; /* network byte order; after service translation (the backend) */
	__u32 daddr;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u8 proto;
	__u8 direction;
	__s16 reason; /* MESHD_DROP_* (drop) or MESHD_FWD_* (flow) */
	__u32 ifindex;
	__u32 svc_addr; /* service frontend the packet was sent to, network byte order; 0 if none */
	__u16 svc_port; /* host byte order */
	__u16 pad;
	__u32 pad2;
};

/*
 * EVENT_LIMIT (one-entry array, written by the agent) bounds what EVENTS costs: at most `rate`
 * events per second per CPU (0 = no limit, as before the agent wrote it); the rest are counted
 * in EVENT_BUDGET's `lost` (as are events the ring buffer had no room for) and not sent. Drops
 * are always counted in METRICS, whatever the limit.
 */
enum meshd_event_limit_flags {
	MESHD_EVENT_LIMIT_F_FLOWS = 1, /* emit MESHD_EVENT_FLOW on new connections */
};

struct event_limit {
	__u32 rate;  /* events per second per CPU; 0 = unlimited */
	__u32 flags; /* MESHD_EVENT_LIMIT_F_* */
};

/* EVENT_BUDGET: per-CPU state of the limit, a one-second window. */
struct event_budget {
	__u64 window_ns; /* bpf_ktime_get_coarse_ns() the window started */
	__u32 used;      /* events sent in this window */
	__u32 pad;
	__u64 lost; /* events not sent since the map was created (limit or ring full) */
};

/*
 * SERVICES and BACKENDS: service load-balancing in from-endpoint. A new connection (no
 * MESHD_CT_F_SERVICE entry for its tuple) to a frontend picks slot prandom % count of the
 * frontend's BACKENDS, and the choice is kept in CT for the connection's life. The packet is
 * then DNATed (destination address and port, checksums fixed) before anything else looks at
 * it, so policy, conntrack and forwarding see the backend. Replies get the frontend back as
 * their source where they re-enter the client's node: from-overlay (remote backend) or
 * from-endpoint (backend on the same node), keyed by the reply's CT entry (MESHD_CT_F_REV_NAT).
 * The agent writes a frontend's slots 0..count-1 before raising count and lowers count before
 * deleting slots, so a packet never picks a slot that is not there.
 *
 * Hairpin: a client chosen as its own backend gets the packet back with its own address as
 * destination; with its own address as source too, its kernel would drop it as a martian. Such
 * a packet's source becomes MESHD_SERVICE_LOOPBACK_ADDR instead, and from-endpoint returns
 * the replies to that address to their sender (destination back to the client, source back to
 * the frontend). Link-local, so no endpoint has it and it is never routed off the node. Policy
 * is not checked on hairpin connections: an endpoint reaching itself crosses no boundary, as
 * it would not over its own loopback.
 */
#define MESHD_SERVICE_LOOPBACK_ADDR 0xa9fe2a01 /* 169.254.42.1, host byte order */

struct service_key {
	__u32 addr;  /* frontend IP (VIP), network byte order */
	__u16 port;  /* network byte order */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/*
 * Public endpoints (NodePort / LoadBalancer services, external IPs): besides its VIP, a service
 * has frontends clients outside the mesh reach on the node's uplink (from-netdev). The agent
 * writes them into SERVICES and BACKENDS like VIP frontends, with a flag saying which kind:
 * - MESHD_SERVICE_F_NODE_PORT: key = (this node's IP, the port's nodePort, proto);
 * - MESHD_SERVICE_F_EXTERNAL_IP: key = (an external IP or the LB IP, the service port, proto).
 * Their backends are the VIP's (global ones included, affinity applied), except with
 * MESHD_SERVICE_F_LOCAL (externalTrafficPolicy Local): only this node's own backends, so the
 * client's address can be kept; count 0 then means "no local backend": refuse new connections
 * (MESHD_DROP_NO_LOCAL_BACKEND). A VIP frontend has none of these flags, and from-netdev does
 * not balance it. A connection from outside to a backend on another node is SNATed to node_ip
 * with a NAT entry pair like masquerade's (forward keyed client -> backend, reverse keyed
 * backend -> node_ip:nat_port holding the client), alive as long as the CT entry of client ->
 * backend; it travels the tunnel with the VNI MESHD_IDENTITY_WORLD.
 */
enum meshd_service_flags {
	MESHD_SERVICE_F_NODE_PORT = 1,
	MESHD_SERVICE_F_EXTERNAL_IP = 2,
	MESHD_SERVICE_F_LOCAL = 4,
};

struct service_value {
	__u32 count; /* backends in slots 0..count-1; 0 = refuse new connections */
	__u32 flags; /* MESHD_SERVICE_F_*; 0 for a VIP */
};

struct backend_key {
	struct service_key frontend;
	__u32 slot;
};

struct backend_value {
	__u32 addr;       /* network byte order */
	__u16 port;       /* network byte order */
	__u16 pad;
	__u32 cluster_id; /* the backend's cluster (informational: forwarding goes by IPCACHE) */
};

/*
 * Leaving the mesh (CONFIG flags MESHD_CONFIG_F_WORLD). A destination that is no local
 * endpoint and has no ipcache entry is `world` (MESHD_IDENTITY_WORLD) if the node's FIB
 * forwards it, `host` (MESHD_IDENTITY_HOST) if the FIB says it is one of the node's own
 * addresses, and MESHD_DROP_UNKNOWN_DEST if the node has no route for it. World-bound packets are routed by from-endpoint itself (bpf_fib_lookup, then
 * a redirect to the egress device), so they never enter the node's input path: a masqueraded
 * source (the node's own address) would be a martian there, and rp_filter never sees them.
 *
 * Masquerade (CONFIG flags MESHD_CONFIG_F_MASQUERADE): a new connection from a local endpoint
 * to world, unless its destination is in NO_MASQ, leaves with source node_ip and a port (ICMP
 * echo: identifier) from the CONFIG range. NAT holds two entries per flow:
 * - forward, keyed by the endpoint's tuple as sent (ep -> remote): node_ip and the NAT port;
 * - reverse, keyed by the replies' tuple as they arrive (remote -> node_ip:nat_port): the
 *   endpoint's address and port, used by from-netdev on the uplink before anything else.
 * A mapping lives as long as the connection's CT entry (keyed by the endpoint's tuple): an
 * entry whose connection is gone from CT, or expired there, is free to be taken again. The
 * endpoint's port is kept when it lies in the range and is free; otherwise ports are tried from
 * a random start, MESHD_NAT_RETRIES at most, and a flow finding none is dropped
 * (MESHD_DROP_NAT_NO_PORT). Replies of connections that started outside never get a mapping:
 * only CT_NEW packets of from-endpoint allocate.
 */
enum meshd_nat {
	MESHD_NAT_RETRIES = 64,
};

struct nat_key {
	__u32 saddr; /* network byte order */
	__u32 daddr;
	__u16 sport; /* network byte order; ICMP echo: identifier in sport (request) or dport (reply) */
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct nat_value {
	__u32 addr; /* forward: node_ip; reverse: the endpoint. Network byte order */
	__u16 port; /* forward: the NAT port; reverse: the endpoint's. Network byte order */
	__u16 pad;
};

/* NO_MASQ: destinations never masqueraded (non_masquerade_cidrs, the clusters' pod CIDRs). */
struct no_masq_key {
	__u32 prefixlen; /* LPM trie key header */
	__u32 addr;      /* network byte order */
};

struct no_masq_value {
	__u32 flags; /* reserved, 0 */
};

/*
 * DSR, direct server return (CONFIG flags MESHD_CONFIG_F_DSR_*, native routing only): the node a
 * client outside the mesh connects to (the entry node) DNATs a new connection to a backend on
 * another node as usual, but keeps the client's address instead of SNATing it, and carries the
 * frontend the client sent to (address and port) in an IPv4 option, inserted right after the
 * fixed 20-byte header of the connection's first packet (TCP: every SYN; UDP: every datagram,
 * since UDP has no first packet a lost one could be told from). The backend's node
 * (from-netdev, a packet for a local endpoint) takes the option out before delivery and records
 * the frontend in the connection's CT entries like a frontend of its own (nat_addr/nat_port,
 * MESHD_CT_F_REV_NAT on the reply entry), so from-endpoint gives the replies the frontend as
 * source and routes them straight to the client: they never cross the entry node again.
 *
 * A packet the option would push over the egress MTU is answered, when it has DF, with ICMP
 * fragmentation needed (next-hop MTU = egress MTU - MESHD_DSR_OPT_LEN) quoting it as the client
 * sent it (MESHD_FWD_FRAG_NEEDED); without DF the node's stack fragments it (the option has the
 * copied bit: every fragment carries it). The mode is a connection's: the one of its first
 * packet, kept in the entry node's CT entry (MESHD_CT_F_DSR), so a mode change applies to new
 * connections and leaves established ones working.
 *
 * Type 0x9e: option number 30 with the copied bit, class 0: an experimental value (RFC 4727)
 * that no router gives a meaning to. Not authenticated: the backend's node believes any packet
 * on its uplink that carries it, as native routing believes a packet's source address (the
 * underlay must be trusted).
 */
enum meshd_dsr {
	MESHD_DSR_OPT_TYPE = 0x9e,
	MESHD_DSR_OPT_LEN = 8,
};

/* The option on the wire. */
struct dsr_option {
	__u8 kind; /* MESHD_DSR_OPT_TYPE (the option type byte) */
	__u8 len;  /* MESHD_DSR_OPT_LEN */
	__u16 port; /* the frontend's port, network byte order */
	__u32 addr; /* the frontend's address, network byte order */
};

#endif /* MESHD_ABI_H */
