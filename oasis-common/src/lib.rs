//! Types shared between the kernel classifier (`oasis-ebpf`) and the broker.
//!
//! Everything here is `#[repr(C)]` with explicit padding so the kernel and user
//! space agree on every byte, and so no uninitialised padding ever reaches a
//! map key (the kernel hashes keys byte by byte).
#![no_std]

/// Most header rules the classifier holds. A rule is one bit in [`RuleSet`],
/// and the lowest set bit after intersecting the per-field sets wins, so the
/// bit index is the rule's rank in the rule list.
pub const MAX_RULES: usize = 1024;

/// The heartbeat of the broker's packet path, in `OASIS_HEARTBEAT`: the
/// classifier passes everything once it is stale.
pub const HEARTBEAT_PACKETS: u32 = 0;
/// The heartbeat of the packet path and the DNS service together: the DNS
/// hooks redirect nothing once it is stale, so a DNS service that stops
/// answering gives the host its own servers back.
pub const HEARTBEAT_DNS: u32 = 1;
pub const RULE_WORDS: usize = MAX_RULES / 64;

/// Most destination prefixes the classifier holds per address family, all
/// rules together: room for prefix sets (country and ASN lists) of a few
/// hundred thousand entries. The tries allocate per entry, so the size
/// costs nothing until it is used.
pub const MAX_DST_PREFIXES: u32 = 1 << 18;

/// Entries of the per-flow verdict cache.
pub const FLOW_CACHE_ENTRIES: u32 = 65_536;

/// Entries of the verdicts of claimed flows (diverted or measured), kept
/// apart from the flows that pass.
pub const CLAIMED_ENTRIES: u32 = 65_536;

pub mod encap;
pub mod exit_fast;
pub mod maps;

pub use encap::{ENCAP_ENTRIES, ENCAP_PEERS, EncapEntry, EncapPeer, MAX_FAST_SHIM};
pub use exit_fast::{
    EXIT_FAST_CLASSES, EXIT_FAST_FLOWS, ExitBack, ExitFastCounts, ExitFlowKey, ExitOut, MAX_EXIT_TOKEN,
    exit_miss,
};

/// The overlay wire format: every datagram between a host and an overlay is
/// `[shim][IP packet]`, with a shim of the length the overlay's
/// specification gives, at most this many bytes.
pub const MAX_SHIM_LEN: usize = 64;

/// Entries in each in-kernel NAT map (one per fake-address underlay flow).
pub const NAT_ENTRIES: u32 = 65_536;

/// The host's own DNS servers the redirect knows (resolv.conf's and the
/// configured upstreams).
pub const DNS_SYSTEM_ENTRIES: u32 = 64;

/// Sockets whose original DNS server the redirect remembers.
pub const DNS_SOCKETS: u32 = 65_536;

/// Flows (and probes) the kernel measures for the Monitor at once.
pub const MONITORED_ENTRIES: u32 = 16_384;

/// Bytes of the ring buffer that carries measurements to the broker.
pub const MONITOR_EVENTS_BYTES: u32 = 256 * 1024;

/// The uplinks' TC ingress program: turns replies of fake-address flows
/// carried by the underlay back into replies from the fake address.
pub const INGRESS_PROGRAM: &str = "oasis_ingress";

/// The cgroup socket-address programs that send DNS queries (port 53) to
/// the broker, and what the kernel calls each hook.
pub const DNS_PROGRAMS: [(&str, &str); 8] = [
    ("oasis_dns_connect4", "connect4"),
    ("oasis_dns_connect6", "connect6"),
    ("oasis_dns_sendmsg4", "sendmsg4"),
    ("oasis_dns_sendmsg6", "sendmsg6"),
    ("oasis_dns_recvmsg4", "recvmsg4"),
    ("oasis_dns_recvmsg6", "recvmsg6"),
    ("oasis_dns_peer4", "getpeername4"),
    ("oasis_dns_peer6", "getpeername6"),
];

/// The classifier program's name in the object file.
pub const EGRESS_PROGRAM: &str = "oasis_egress";

/// The exit node's ingress program: steers replies to NATed flows to the
/// exit node's TUN, so the exit host's own stack never sees (or resets) them.
pub const EXIT_INGRESS_PROGRAM: &str = "oasis_exit_ingress";

/// What the exit node's ingress program steers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitSettings {
    /// The exit's public addresses (IPv4 in the first 4 bytes of `v4`); a
    /// family whose `has_*` is 0 is not steered.
    pub v4: [u8; 4],
    pub v6: [u8; 16],
    pub has_v4: u8,
    pub has_v6: u8,
    pub _pad: [u8; 2],
    /// The NAT port range (also ICMP echo identifiers), inclusive.
    pub port_first: u16,
    pub port_last: u16,
    pub tun_ifindex: u32,
    /// The fast path (`exit_fast`): the IPv4 port clients send to, 0 while
    /// it is off.
    pub fast_port: u16,
    /// The overlay's shim length, both ways.
    pub shim_len: u8,
    /// 1: packets the kernel carries get their client's class as their
    /// priority (`TC_H_MAKE(1, class + 1)`), for an htb qdisc on the uplink.
    pub prioritise: u8,
    /// The uplink, where the kernel sends what it carries.
    pub uplink_ifindex: u32,
    /// The largest packet the uplink sends: a reply that would be larger
    /// once wrapped keeps the user-space path.
    pub mtu: u16,
    /// The IPv6 port clients send to, 0 when the fast path serves no
    /// IPv6 clients.
    pub fast_port_v6: u16,
    pub _pad2: [u8; 4],
}

/// A set of rules, one bit per rule rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub words: [u64; RULE_WORDS],
}

impl RuleSet {
    pub const EMPTY: RuleSet = RuleSet {
        words: [0; RULE_WORDS],
    };

    #[inline(always)]
    pub fn insert(&mut self, rank: usize) {
        self.words[rank / 64] |= 1u64 << (rank % 64);
    }

    #[inline(always)]
    pub fn contains(&self, rank: usize) -> bool {
        self.words[rank / 64] & (1u64 << (rank % 64)) != 0
    }

    #[inline(always)]
    pub fn union_with(&mut self, other: &RuleSet) {
        let mut i = 0;
        while i < RULE_WORDS {
            self.words[i] |= other.words[i];
            i += 1;
        }
    }

    /// Keeps only the rules that are in both sets.
    #[inline(always)]
    pub fn intersect_with(&mut self, other: &RuleSet) {
        let mut i = 0;
        while i < RULE_WORDS {
            self.words[i] &= other.words[i];
            i += 1;
        }
    }

    /// The lowest rank in the set: the first rule, in the user's order.
    #[inline(always)]
    pub fn lowest_rank(&self) -> Option<u32> {
        let mut i = 0;
        while i < RULE_WORDS {
            let word = self.words[i];
            if word != 0 {
                return Some(i as u32 * 64 + lowest_bit(word));
            }
            i += 1;
        }
        None
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        let mut i = 0;
        while i < RULE_WORDS {
            if self.words[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Index of the lowest set bit of a non-zero word, by halving: the BPF
/// instruction set has no count-trailing-zeros, and this compiles the same
/// for the kernel and for user space.
#[inline(always)]
fn lowest_bit(mut word: u64) -> u32 {
    let mut index = 0;
    if word & 0xffff_ffff == 0 {
        index += 32;
        word >>= 32;
    }
    if word & 0xffff == 0 {
        index += 16;
        word >>= 16;
    }
    if word & 0xff == 0 {
        index += 8;
        word >>= 8;
    }
    if word & 0xf == 0 {
        index += 4;
        word >>= 4;
    }
    if word & 0x3 == 0 {
        index += 2;
        word >>= 2;
    }
    if word & 0x1 == 0 {
        index += 1;
    }
    index
}

/// What the classifier does with a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the packet alone.
    Pass = 0,
    /// Redirect to the broker's TUN device.
    Divert = 1,
    /// Leave the packet alone, and measure the flow for the Monitor (a
    /// flow of a metric rule the Monitor gave the underlay; only the broker
    /// writes this verdict).
    Measure = 2,
}

impl Verdict {
    pub const fn from_u8(v: u8) -> Verdict {
        match v {
            1 => Verdict::Divert,
            2 => Verdict::Measure,
            _ => Verdict::Pass,
        }
    }
}

/// What a matched rule does; indexed by rule rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleAction {
    /// The rule's user-visible id; counters are kept under it.
    pub rule_id: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// Per-rule traffic counters (per CPU in the kernel, summed by the broker).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes of the classifier's global counters (a per-CPU array).
pub mod stat {
    /// Packets that carried the broker's bypass mark.
    pub const BYPASSED: u32 = 0;
    /// Packets passed because the broker's heartbeat was stale (fail open).
    pub const FAIL_OPEN: u32 = 1;
    /// Packets decided from the flow cache.
    pub const CACHE_HIT: u32 = 2;
    /// Packets matched against the rule maps (cache miss or re-check).
    pub const CLASSIFIED: u32 = 3;
    /// Packets redirected to the TUN.
    pub const DIVERTED: u32 = 4;
    /// Packets the classifier could not parse (passed untouched).
    pub const UNPARSED: u32 = 5;
    /// Packets to a fake address without a NAT entry, sent to the broker.
    pub const FAKE_DIVERTED: u32 = 6;
    /// Packets of fake-address flows rewritten in the kernel, each way.
    pub const NAT_EGRESS: u32 = 7;
    pub const NAT_INGRESS: u32 = 8;
    /// Packets of flows measured for the Monitor, each way.
    pub const MEASURED_EGRESS: u32 = 9;
    pub const MEASURED_INGRESS: u32 = 10;
    /// Measurements lost because the ring buffer to the broker was full.
    pub const EVENTS_LOST: u32 = 11;
    /// Packets (and their bytes) of overlay flows the kernel wrapped on
    /// their way out and opened on their way in (the fast path).
    pub const ENCAP_PACKETS: u32 = 12;
    pub const ENCAP_BYTES: u32 = 13;
    pub const DECAP_PACKETS: u32 = 14;
    pub const DECAP_BYTES: u32 = 15;
    /// Packets of fast-path flows left to the broker, by why: too big for
    /// the path once wrapped; the kernel refused to make room; a received
    /// aggregate of several datagrams (GRO), which the kernel cannot open
    /// one by one.
    pub const FAST_TOO_BIG: u32 = 16;
    pub const FAST_NO_ROOM: u32 = 17;
    pub const FAST_AGGREGATE: u32 = 18;
    pub const COUNT: u32 = 19;
}

/// What the kernel keeps of a flow (or probe) it measures for the Monitor,
/// keyed by the flow as it leaves the host. The broker creates the entry
/// when it pins the flow to the underlay, or sends a probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measure {
    /// CLOCK_MONOTONIC ns the flow's first SYN (or the probe) left; 0 once
    /// answered, or when the SYN was sent again (no sample then: which
    /// copy was answered is unknown).
    pub syn_ns: u64,
    /// When `ts_val` left; 0 while no timestamp sample is on its way.
    pub ts_sent_ns: u64,
    /// When the last round-trip sample was taken (one per 100 ms at most).
    pub sampled_ns: u64,
    /// When counts were last reported.
    pub reported_ns: u64,
    /// Bytes the flow moved since the last report: what the peer
    /// acknowledged, and what it sent (payload received).
    pub moved_bytes: u64,
    /// The timestamp value on its way.
    pub ts_val: u32,
    /// The sequence number after the highest byte sent.
    pub seq_next: u32,
    /// The highest acknowledgement received.
    pub last_ack: u32,
    /// Segments with data sent since the last report, and how many of
    /// them were sent again.
    pub segments: u32,
    pub retransmits: u32,
    /// `measure_flag`s.
    pub flags: u32,
}

/// Bits of [`Measure::flags`].
pub mod measure_flag {
    /// A probe of the Monitor's, not an application's flow.
    pub const PROBE: u32 = 1;
    /// The handshake was answered.
    pub const ANSWERED: u32 = 2;
    /// `seq_next` holds a sequence number.
    pub const SEQ_KNOWN: u32 = 4;
    /// A FIN or RST went by, either way: the connection is ending.
    pub const CLOSING: u32 = 8;
}

/// One measurement, from the kernel to the broker through the ring buffer:
/// a round trip (or a failure) of a flow, or its counts over a while. Made
/// by [`MonitorEvent::round_trip`] and [`MonitorEvent::counts`], read by
/// the accessors named for what each kind carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// The flow as it leaves the host.
    pub key: FlowKey,
    /// `monitor_event`'s kinds.
    pub kind: u32,
    pub _pad: u32,
    /// The kind's figures, in the order its accessors name them.
    figures: [u64; 4],
}

impl MonitorEvent {
    /// A flow's round trip (`SYN_ACK`, `TS_RTT`), or a failure (`RESET`
    /// with the round trip when the SYN was on its way, else 0;
    /// `UNREACHABLE` with 0).
    #[inline(always)]
    pub const fn round_trip(key: FlowKey, kind: u32, rtt_ns: u64) -> MonitorEvent {
        MonitorEvent {
            key,
            kind,
            _pad: 0,
            figures: [rtt_ns, 0, 0, 0],
        }
    }

    /// A flow's counts (`COUNTS`): data segments sent, of them sent again,
    /// bytes moved (acknowledged by the peer or received from it), over
    /// `over_ns`.
    #[inline(always)]
    pub const fn counts(key: FlowKey, segments: u64, resent: u64, bytes: u64, over_ns: u64) -> MonitorEvent {
        MonitorEvent {
            key,
            kind: monitor_event::COUNTS,
            _pad: 0,
            figures: [segments, resent, bytes, over_ns],
        }
    }

    /// The round trip, ns (0 when unknown).
    pub const fn rtt_ns(&self) -> u64 {
        self.figures[0]
    }

    pub const fn segments(&self) -> u64 {
        self.figures[0]
    }

    pub const fn resent(&self) -> u64 {
        self.figures[1]
    }

    pub const fn bytes(&self) -> u64 {
        self.figures[2]
    }

    pub const fn over_ns(&self) -> u64 {
        self.figures[3]
    }
}

/// Kinds of [`MonitorEvent`].
pub mod monitor_event {
    /// The handshake (or a probe) was answered by SYN-ACK, after the round
    /// trip.
    pub const SYN_ACK: u32 = 1;
    /// A timestamp echo, after the round trip.
    pub const TS_RTT: u32 = 2;
    /// The peer reset the flow (a probe's answer, for a closed port), with
    /// the round trip when the flow's SYN was on its way.
    pub const RESET: u32 = 3;
    /// An ICMP error said the destination is unreachable.
    pub const UNREACHABLE: u32 = 4;
    /// Counts over a while: segments sent and sent again, bytes moved.
    pub const COUNTS: u32 = 5;
}

/// Run-time settings the broker writes at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// How old the heartbeat may get before the classifier passes everything.
    pub heartbeat_timeout_ns: u64,
    /// A cached verdict older than this (since the flow's last packet) is
    /// decided again, so a reused 5-tuple meets the current rules. TCP
    /// flows use `tcp_idle_ns` instead: a new TCP connection always meets
    /// the rules anyway, and an established one may be quiet for hours.
    pub flow_idle_ns: u64,
    pub tcp_idle_ns: u64,
    /// Where diverted packets go.
    pub tun_ifindex: u32,
    /// Packets with this `skb->mark` were sent by the broker: always pass.
    pub bypass_mark: u32,
    /// The fake pools of name rules, as address and mask (IPv4 in the
    /// first 4 bytes): a packet to one belongs to the broker, whatever the
    /// rules say. Compared in place rather than looked up in a trie, as
    /// every packet on the uplinks asks. `fake_pools` 0: no pools.
    pub fake_pools: u32,
    pub fake_v4: [u8; 4],
    pub fake_v4_mask: [u8; 4],
    /// The broker's overlay port (host byte order): datagrams to it from an
    /// entry node may carry a fast-path flow's packets (`encap.rs`).
    pub overlay_port: u16,
    pub _pad: [u8; 2],
    pub fake_v6: [u8; 16],
    pub fake_v6_mask: [u8; 16],
}

impl Settings {
    /// Sets the fake pools from prefixes (address bytes and prefix length).
    pub fn set_fake_pools(&mut self, v4: ([u8; 4], u8), v6: ([u8; 16], u8)) {
        fn mask<const N: usize>(len: u8) -> [u8; N] {
            let mut out = [0u8; N];
            let mut bits = len as usize;
            let mut i = 0;
            while i < N {
                out[i] = if bits >= 8 { 0xff } else { !(0xffu8 >> bits) };
                bits = bits.saturating_sub(8);
                i += 1;
            }
            out
        }
        self.fake_v4_mask = mask(v4.1);
        self.fake_v6_mask = mask(v6.1);
        for i in 0..4 {
            self.fake_v4[i] = v4.0[i] & self.fake_v4_mask[i];
        }
        for i in 0..16 {
            self.fake_v6[i] = v6.0[i] & self.fake_v6_mask[i];
        }
        self.fake_pools = 1;
    }

    /// Whether a flow goes to a fake address.
    #[inline(always)]
    pub fn is_fake(&self, key: &FlowKey) -> bool {
        if self.fake_pools == 0 {
            return false;
        }
        if key.family == FAMILY_V4 {
            let mut i = 0;
            while i < 4 {
                if key.dst[i] & self.fake_v4_mask[i] != self.fake_v4[i] {
                    return false;
                }
                i += 1;
            }
        } else {
            let mut i = 0;
            while i < 16 {
                if key.dst[i] & self.fake_v6_mask[i] != self.fake_v6[i] {
                    return false;
                }
                i += 1;
            }
        }
        true
    }
}

/// Address family byte of a [`FlowKey`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A flow's 5-tuple as the classifier sees it on egress. IPv4 addresses sit
/// in the first 4 bytes of `src`/`dst`, the rest zero. Ports are in host
/// order; zero where the protocol has none. Aligned to 8 bytes, so the
/// kernel programs compare and copy it a word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The destination address.
    pub fn dst_ip(&self) -> core::net::IpAddr {
        if self.family == FAMILY_V4 {
            core::net::IpAddr::from([self.dst[0], self.dst[1], self.dst[2], self.dst[3]])
        } else {
            core::net::IpAddr::from(self.dst)
        }
    }

    /// The source address.
    pub fn src_ip(&self) -> core::net::IpAddr {
        if self.family == FAMILY_V4 {
            core::net::IpAddr::from([self.src[0], self.src[1], self.src[2], self.src[3]])
        } else {
            core::net::IpAddr::from(self.src)
        }
    }

    /// An IPv4 flow's key.
    pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> FlowKey {
        let mut key = FlowKey {
            proto,
            sport,
            dport,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        key.src[..4].copy_from_slice(&src);
        key.dst[..4].copy_from_slice(&dst);
        key
    }

    /// Whether a rule's port fields can match this flow: a protocol with
    /// ports, and ports read (a later fragment has none). An ICMP echo's
    /// identifier, which the key holds in its ports, is no port.
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        carries_ports(self.proto) && (self.sport != 0 || self.dport != 0)
    }

    /// The key with its ends swapped: the other direction of the flow.
    #[inline(always)]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// Traffic that belongs to one link or to this host and that no carrier
    /// can take anywhere else: to or from loopback, unspecified, link-local,
    /// multicast and broadcast addresses (and IPv4's reserved 240/4). The
    /// classifier passes it whatever the rules say, and the broker never
    /// routes it: diverted, neighbour discovery or DHCP would break.
    #[inline(always)]
    pub fn link_scoped(&self) -> bool {
        if self.family == FAMILY_V4 {
            let scoped =
                |a: &[u8; 16]| a[0] == 0 || a[0] == 127 || a[0] >= 224 || (a[0] == 169 && a[1] == 254);
            scoped(&self.dst) || scoped(&self.src)
        } else {
            // fe80::/10, and the ::/127 pair (unspecified, loopback).
            let scoped = |a: &[u8; 16]| {
                (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
                    || (u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) == 0
                        && u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15] & 0xfe])
                            == 0)
            };
            self.dst[0] == 0xff || scoped(&self.dst) || scoped(&self.src)
        }
    }
}

/// IP protocol numbers, one definition for the kernel programs, the broker,
/// the exit node and the packet library.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// IPv6's fragment header.
    pub const IPV6_FRAGMENT: u8 = 44;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// Protocols whose packets carry ports in their first four transport bytes.
#[inline(always)]
pub const fn carries_ports(protocol: u8) -> bool {
    matches!(protocol, proto::TCP | proto::UDP | proto::SCTP | proto::UDPLITE)
}

/// ICMP or ICMPv6 echo requests and replies: a flow of its own per
/// identifier, which both carry (the key's ports, both of them).
#[inline(always)]
pub const fn icmp_echo(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (proto::ICMP, 0 | 8) | (proto::ICMPV6, 128 | 129)
    )
}

/// ICMP and ICMPv6 errors that quote the packet they answer (unreachable,
/// time exceeded, parameter problem, and ICMPv6's packet too big): they
/// belong to the quoted packet's flow.
#[inline(always)]
pub const fn icmp_error(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (proto::ICMP, 3 | 11 | 12) | (proto::ICMPV6, 1..=4)
    )
}

/// ICMPv6 messages of the link itself, whatever their addresses: MLD
/// (130-132, 143) and router and neighbour discovery (133-137). Never
/// diverted (see [`FlowKey::link_scoped`]).
#[inline(always)]
pub const fn icmpv6_link_message(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=137 | 143)
}

/// One fragmented datagram: non-first fragments carry no ports, so they
/// are known by their addresses, protocol and IP identification.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The IP identification (IPv4's 16 bits, or IPv6's fragment header's 32).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Fragmented datagrams whose first fragment a rule claimed remembered
/// this long (Linux keeps fragments for reassembly 30 s).
pub const FRAGMENTS_ENTRIES: u32 = 8_192;

/// A cached verdict for one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `bpf_ktime_get_ns()` of the flow's last packet (coarsened to ~1 s).
    pub last_seen_ns: u64,
    /// Id of the rule that matched; 0 when none did.
    pub rule_id: u32,
    pub verdict: u8,
    /// `FLOW_CLOSING`.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// [`FlowEntry::flags`]: a FIN or RST of a flow the broker left to the
/// kernel went by, so the broker may forget the flow soon after it goes
/// quiet rather than after TCP's long idle lifetime.
pub const FLOW_CLOSING: u8 = 1;

/// A CPU's most recent flow and its verdict: consecutive packets on a CPU
/// mostly belong to one flow (a bulk transfer's GSO bursts), which then
/// costs a comparison instead of a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecentFlow {
    pub key: FlowKey,
    pub entry: FlowEntry,
    /// Packets passed by this slot alone, counted here rather than in the
    /// statistics: the common case touches one cache line.
    pub hits: u64,
}

impl FlowKey {
    /// Equality word by word: the kernel target has no memcmp to call.
    #[inline(always)]
    pub fn same_as(&self, other: &FlowKey) -> bool {
        // SAFETY: a FlowKey is 40 bytes of plain integers without padding,
        // aligned to 8.
        let (a, b) = unsafe {
            (
                &*(self as *const FlowKey as *const [u64; 5]),
                &*(other as *const FlowKey as *const [u64; 5]),
            )
        };
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
    }
}

/// Key of the port tries: a big-endian port, matched by prefix so that port
/// ranges become a handful of prefixes.
pub type PortBytes = [u8; 2];

/// One direction of an in-kernel NAT entry. In `NAT_OUT` the key is the
/// flow as the application sends it (to the fake address) and `addr` the
/// real destination; in `NAT_IN` the key is the reply as it arrives (from
/// the real address) and `addr` the fake source to put in its place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u8; 16],
    /// CLOCK_MONOTONIC ns of the last packet, refreshed about once a second.
    pub last_seen_ns: u64,
    /// `NAT_MEASURE`, `NAT_CLOSING`.
    pub flags: u32,
    pub _pad: u32,
}

/// [`NatEntry::flags`]: after the rewrite, the flow (by its real address)
/// is measured for the Monitor.
pub const NAT_MEASURE: u32 = 1;
/// [`NatEntry::flags`]: the kernel saw a FIN or RST of this TCP flow (set
/// in both directions' entries' own copy), so the broker may end it soon
/// after it goes quiet instead of after the established idle time.
pub const NAT_CLOSING: u32 = 2;

/// What the DNS redirect needs to know. `port` 0 turns it off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// Only sockets in the broker's network namespace are redirected: in
    /// any other the broker's loopback listener does not exist.
    pub netns_cookie: u64,
    /// The broker's own queries (to its upstreams) are never redirected.
    pub broker_tgid: u32,
    /// The broker's DNS port on 127.0.0.1 and ::1 (host byte order), for
    /// queries to the host's own servers (`DNS_SYSTEM`)...
    pub port: u16,
    /// ... and for queries to any other server.
    pub explicit_port: u16,
    /// Whether the broker listens on ::1 too; if not, IPv6 queries go out
    /// untouched.
    pub has_v6: u8,
    pub _pad: [u8; 7],
}

/// Which sending socket a rule asks for (`OwnerMatch::fields`): its
/// owner's uid, its cgroup (or an ancestor), the process that opened it.
pub mod owner {
    pub const UID: u32 = 1;
    pub const CGROUP: u32 = 2;
    pub const APP: u32 = 4;
}

/// Deepest cgroup level a rule can name (`user.slice` is level 1).
pub const MAX_CGROUP_LEVEL: u32 = 63;

/// How many distinct cgroup levels the rules may name together: the
/// classifier looks the socket's ancestor up at each (a loop the verifier
/// walks for every path into it, so it is kept short).
pub const CGROUP_DEPTHS: usize = 4;

/// Distinct uids, cgroups and application names the rules may name, each.
pub const OWNER_ENTRIES: u32 = 4096;

/// Sockets whose process name the socket hooks remember for `--app` rules.
pub const SOCKET_APPS: u32 = 65_536;

/// The length of a process name as the kernel keeps it (`TASK_COMM_LEN`),
/// with its terminating zero.
pub const APP_NAME_LEN: usize = 16;

/// Cgroups whose rules the classifier remembers (`CgroupRules`).
pub const CGROUP_MEMO_ENTRIES: u32 = 4096;

/// The rules a cgroup's sockets may match by cgroup, as the classifier
/// worked them out from its ancestors, under `OwnerMatch::generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupRules {
    pub generation: u64,
    pub rules: RuleSet,
}

/// A process name (`comm`), zero-padded: a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName {
    pub bytes: [u8; APP_NAME_LEN],
}

/// How the rules use the sending socket, in `OASIS_OWNER`. A rule that
/// names none of these fields is in every `any_*` set; a rule that names
/// one is in the named value's set in `OASIS_RULE_UID` (and the others)
/// instead. The classifier keeps, of the rules the headers admit, those in
/// `any ∪ named` for each field the rules use (`fields`), and only looks
/// the socket up at all when some rule needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerMatch {
    /// `owner::*` bits: which fields any rule names.
    pub fields: u32,
    /// The levels of the cgroups the rules name, 0 for none.
    pub cgroup_levels: [u8; CGROUP_DEPTHS],
    /// Changes whenever the cgroup rules (or their cgroups' ids) do: a
    /// cgroup's rules remembered under another generation are stale.
    pub generation: u64,
    pub any_uid: RuleSet,
    pub any_cgroup: RuleSet,
    pub any_app: RuleSet,
}

/// The DNS server a redirected socket asked for, so replies and
/// `getpeername` show it instead of the broker.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOriginal {
    /// IPv4 in the first four bytes, or IPv6 (v4-mapped for dual-stack sockets).
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
    /// Who asked, for name rules by sender: the process (its thread
    /// group), its uid and its name.
    pub tgid: u32,
    pub uid: u32,
    pub comm: [u8; APP_NAME_LEN],
}

#[cfg(all(feature = "user", target_os = "linux"))]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays,
    // and have their padding spelled out as fields.
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for RuleAction {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for RecentFlow {}
    unsafe impl aya::Pod for ExitSettings {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for DnsSettings {}
    unsafe impl aya::Pod for DnsOriginal {}
    unsafe impl aya::Pod for AppName {}
    unsafe impl aya::Pod for OwnerMatch {}
    unsafe impl aya::Pod for CgroupRules {}
    unsafe impl aya::Pod for Measure {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for EncapEntry {}
    unsafe impl aya::Pod for EncapPeer {}
    unsafe impl aya::Pod for ExitFlowKey {}
    unsafe impl aya::Pod for ExitOut {}
    unsafe impl aya::Pod for ExitBack {}
    unsafe impl aya::Pod for ExitFastCounts {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowEntry>(), 8 + 4 + 1 + 3);
        assert_eq!(size_of::<FragKey>(), 16 + 16 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<RecentFlow>(), 40 + 16 + 8);
        assert_eq!(size_of::<RuleAction>(), 8);
        assert_eq!(size_of::<Settings>(), 8 + 8 + 8 + 4 + 4 + 4 + 4 + 4 + 4 + 16 + 16);
        assert_eq!(size_of::<RuleSet>(), MAX_RULES / 8);
        assert_eq!(
            size_of::<ExitSettings>(),
            4 + 16 + 1 + 1 + 2 + 2 + 2 + 4 + 2 + 1 + 1 + 4 + 2 + 2 + 4
        );
        assert_eq!(size_of::<ExitFlowKey>(), 16 + 2 + 1 + 5 + 40);
        assert_eq!(size_of::<ExitOut>(), 8 + 4 + 2 + 1 + 1 + 1 + 7 + MAX_EXIT_TOKEN);
        assert_eq!(size_of::<ExitBack>(), 8 + 16 + 16 + 4 + 2 + 2 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<ExitFastCounts>(), 4 * 8);
        assert_eq!(size_of::<NatEntry>(), 16 + 8 + 4 + 4);
        assert_eq!(size_of::<DnsSettings>(), 8 + 4 + 2 + 2 + 1 + 7);
        assert_eq!(size_of::<DnsOriginal>(), 16 + 2 + 1 + 5 + 4 + 4 + APP_NAME_LEN);
        assert_eq!(size_of::<Measure>(), 5 * 8 + 6 * 4);
        assert_eq!(size_of::<MonitorEvent>(), 40 + 4 + 4 + 4 * 8);
        assert_eq!(
            size_of::<EncapEntry>(),
            8 + 16 + 16 + 4 + 2 + 2 + 2 + 1 + 1 + 4 + MAX_FAST_SHIM
        );
        assert_eq!(size_of::<EncapPeer>(), 16 + 2 + 1 + 1);
    }

    #[test]
    fn link_scoped_traffic_is_recognised_and_nothing_else() {
        let v6 = |src: &str, dst: &str| {
            let (src, dst): (core::net::Ipv6Addr, core::net::Ipv6Addr) =
                (src.parse().unwrap(), dst.parse().unwrap());
            FlowKey {
                src: src.octets(),
                dst: dst.octets(),
                proto: 58,
                family: FAMILY_V6,
                ..FlowKey::default()
            }
        };
        let v4 = |src: [u8; 4], dst: [u8; 4]| FlowKey::v4(src, dst, 17, 68, 67);
        for scoped in [
            v6("2001:db8::1", "ff02::1:ff00:2"),
            v6("fe80::1", "2001:db8::2"),
            v6("2001:db8::1", "fe80::2"),
            v6("::", "ff02::16"),
            v6("::1", "::1"),
            v6("2001:db8::1", "febf::1"),
        ] {
            assert!(scoped.link_scoped(), "{scoped:?}");
        }
        for scoped in [
            v4([0, 0, 0, 0], [255, 255, 255, 255]),
            v4([10, 0, 0, 1], [224, 0, 0, 251]),
            v4([169, 254, 3, 3], [10, 0, 0, 2]),
            v4([10, 0, 0, 1], [127, 0, 0, 53]),
            v4([10, 0, 0, 1], [240, 0, 0, 1]),
        ] {
            assert!(scoped.link_scoped(), "{scoped:?}");
        }
        for global in [
            v6("2001:db8::1", "2001:db8::2"),
            v6("2001:db8::1", "::2"),
            v6("2001:db8::1", "fec0::1"),
            v6("fd00::1", "64:ff9b::1"),
        ] {
            assert!(!global.link_scoped(), "{global:?}");
        }
        for global in [
            v4([10, 0, 0, 1], [192, 0, 2, 1]),
            v4([10, 0, 0, 1], [223, 255, 255, 255]),
            v4([10, 0, 0, 1], [169, 253, 0, 1]),
        ] {
            assert!(!global.link_scoped(), "{global:?}");
        }
        assert!(icmpv6_link_message(135) && icmpv6_link_message(143) && !icmpv6_link_message(128));
    }

    #[test]
    fn flow_keys_compare_word_by_word() {
        let a = FlowKey::v4([10, 0, 0, 1], [192, 0, 2, 1], 6, 40000, 443);
        let mut b = a;
        assert!(a.same_as(&b));
        b.dport = 444;
        assert!(!a.same_as(&b));
        b = a;
        b.dst[15] = 1;
        assert!(!a.same_as(&b));
    }

    #[test]
    fn fake_pools_are_masked_prefixes() {
        let mut settings = Settings::default();
        let key = |dst: [u8; 4]| FlowKey::v4([10, 0, 0, 1], dst, 6, 1, 2);
        assert!(
            !settings.is_fake(&key([198, 18, 0, 1])),
            "no pools: nothing is fake"
        );
        let v6: [u8; 16] = [0xfd, 0x4f, 0x41, 0x53, 0x49, 0x53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        settings.set_fake_pools(([198, 18, 0, 0], 15), (v6, 48));
        assert!(settings.is_fake(&key([198, 18, 0, 1])));
        assert!(settings.is_fake(&key([198, 19, 255, 254])));
        assert!(!settings.is_fake(&key([198, 20, 0, 1])));
        assert!(!settings.is_fake(&key([10, 18, 0, 1])));
        let mut six = FlowKey {
            family: FAMILY_V6,
            ..FlowKey::default()
        };
        six.dst = v6;
        six.dst[15] = 7;
        assert!(settings.is_fake(&six));
        six.dst[5] ^= 1;
        assert!(!settings.is_fake(&six));
    }

    #[test]
    fn rule_set_bits() {
        let mut set = RuleSet::EMPTY;
        assert!(set.is_empty());
        set.insert(0);
        set.insert(65);
        set.insert(255);
        assert!(set.contains(0) && set.contains(65) && set.contains(255));
        assert!(!set.contains(64));
        let mut other = RuleSet::EMPTY;
        other.insert(64);
        set.union_with(&other);
        assert!(set.contains(64));
        assert_eq!(set.lowest_rank(), Some(0));
        let mut high = RuleSet::EMPTY;
        high.insert(64);
        high.insert(200);
        set.intersect_with(&high);
        assert_eq!(set.lowest_rank(), Some(64));
        set.intersect_with(&RuleSet::EMPTY);
        assert_eq!(set.lowest_rank(), None);
    }

    #[test]
    fn lowest_bit_agrees_with_trailing_zeros() {
        let mut word = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1000 {
            word = word.rotate_left(7) ^ (word >> 3);
            for candidate in [word, word & word.wrapping_neg(), 1u64 << (word % 64)] {
                if candidate != 0 {
                    assert_eq!(lowest_bit(candidate), candidate.trailing_zeros());
                }
            }
        }
    }
}
