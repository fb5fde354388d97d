//! The client's fast path for overlay flows (`oasis_common::encap`).
//!
//! Out: a packet of a flow the broker gave an `ENCAP` entry gets the outer
//! IP (v4 or v6, as the entry node's address) and UDP headers and the
//! overlay's shim put before it, with
//! `bpf_skb_adjust_room`'s UDP-encapsulation flags: a GSO packet stays one
//! (FIXED_GSO keeps the MSS the broker clamped the flow's SYN to) and each
//! segment the stack or the device cuts from it carries the outer headers
//! and the shim. The route and the neighbour to the entry node come from
//! the kernel's FIB, through the same uplink.
//!
//! In: a datagram from such a flow's entry node to the broker's overlay
//! port is opened (outer headers and shim removed) and its packet goes up
//! the stack as if it had come in plain. Only a packet of a flow that has
//! an entry, from that entry's own node, is opened.
//!
//! What the broker must see keeps its way through user space: SYNs (the
//! MSS clamp both ways), FINs and RSTs (the end of the flow), fragments,
//! ICMP errors, packets too big for the path once wrapped (the broker
//! answers "fragmentation needed"), and received aggregates (GRO), which
//! cannot be opened one datagram at a time here; with outer IPv6, also
//! datagrams with extension headers.
//!
//! The outer UDP checksum is zero for both families (RFC 6935/6936 allow
//! it for IPv6 tunnels): the segments the kernel cuts from a GSO packet
//! cannot get one computed here, and the inner packet has its own. Entry
//! nodes on IPv6 must accept such datagrams (`UDP_NO_CHECK6_RX`; ours do).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_get_prandom_u32, bpf_redirect_neigh, bpf_skb_store_bytes},
    programs::TcContext,
};
use oasis_common::{EncapPeer, FAMILY_V4, FAMILY_V6, FlowKey, MAX_FAST_SHIM, Settings, stat};

use crate::classifier::alive;
use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6};
use crate::maps::{COUNTERS, ENCAP, ENCAP_PEERS, bump};
use crate::parse::{IPPROTO_TCP, IPPROTO_UDP, Parsed, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

pub(crate) const OUTER_V4: usize = 20;
pub(crate) const OUTER_V6: usize = 40;
pub(crate) const UDP_HLEN: usize = 8;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the shim counts as the tunnel's own
/// header, copied onto every segment.
const ENCAP_L2_SHIFT: u64 = 56;
/// Refresh an entry's timestamp at most this often.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Adds `n` to this CPU's slot `index` of the statistics.
#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(counter) = crate::maps::STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *counter += n };
    }
}

/// What became of a packet the fast path looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// Untouched: the broker's to carry.
    Broker,
    /// Opened: it goes on up the stack as it is now.
    Done,
    /// Wrapped: the verdict that sends it on its way to the entry node.
    Redirect(i32),
    /// Changed half-way when the kernel refused the rest: it means nothing
    /// to anyone now and is dropped (its sender sends it again).
    Broken,
}

/// Wraps a packet of a diverted flow for its entry node when the broker
/// asked for it.
#[inline(never)]
pub fn egress(ctx: &TcContext, parsed: &Parsed, now: u64, settings: &Settings) -> Fast {
    if parsed.fragment
        || parsed.first_fragment
        || parsed.icmp_error
        || parsed.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) != 0
    {
        return Fast::Broker;
    }
    let Some(entry) = ENCAP.get_ptr_mut(&parsed.key) else {
        return Fast::Broker;
    };
    // A dead broker's entries stay unused: its flows fail open with the
    // rest of what it claimed.
    if !alive(now, settings) {
        return Fast::Broker;
    }
    // SAFETY: pointer from a successful lookup; plain integers and bytes.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
    let shim_len = entry.shim_len as usize;
    let v6 = entry.peer_family == FAMILY_V6;
    if !(v6 || entry.peer_family == FAMILY_V4) || shim_len > MAX_FAST_SHIM {
        return Fast::Broker;
    }
    let outer_ip = if v6 { OUTER_V6 } else { OUTER_V4 };
    let overhead = outer_ip + UDP_HLEN + shim_len;
    let inner_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let total = inner_len + overhead;
    if total > 0xffff {
        return Fast::Broker;
    }
    // What must fit the path: the packet, or each segment of a GSO packet.
    // SAFETY: the context pointer is valid for the whole run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    let on_wire = if gso_size == 0 {
        total
    } else {
        match segment_headers(ctx, parsed) {
            Some(headers) => headers + gso_size + overhead,
            None => return Fast::Broker,
        }
    };
    if on_wire > entry.mtu as usize {
        bump(stat::FAST_TOO_BIG);
        return Fast::Broker;
    }

    if !wrap_room(ctx, shim_len, v6) {
        bump(stat::FAST_NO_ROOM);
        return Fast::Broker;
    }
    // The link header is the kernel's to write (below); only the outer IP
    // and UDP headers are ours.
    let headers = store_outer(
        ctx,
        v6,
        (&entry.source, entry.our_port),
        (&entry.peer, entry.peer_port),
        total,
    );
    let stored = headers
        && (shim_len == 0 || store_shim(ctx, ETH_HLEN + outer_ip + UDP_HLEN, entry.shim.as_ptr(), shim_len));
    if !stored {
        bump(stat::FAST_NO_ROOM);
        return Fast::Broken;
    }
    bump(stat::ENCAP_PACKETS);
    add(stat::ENCAP_BYTES, ctx.len() as u64);
    if let Some(counters) = COUNTERS.get_ptr_mut(&entry.rule_id) {
        // SAFETY: per-CPU value, only this CPU writes it now.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += inner_len as u64 + ETH_HLEN as u64;
        }
    }
    // The outer packet is the broker's own traffic now: the classifier
    // passes it when it comes by again, and policy routing sees it as it
    // sees the broker's socket.
    ctx.set_mark(settings.bypass_mark);
    // The route and the neighbour to the entry node are the kernel's: it
    // writes the link header (resolving the neighbour if it must) and
    // sends the packet out of this uplink's egress again. (The FIB lookup
    // helper would need forwarding on, which a host seldom has.)
    // SAFETY: plain helper call; no next-hop parameters given.
    let action = unsafe { bpf_redirect_neigh((*ctx.skb.skb).ifindex, core::ptr::null_mut(), 0, 0) };
    Fast::Redirect(action as i32)
}

/// Makes room after the link header for the outer IP (`v6` or v4) and UDP
/// headers and a shim of `shim_len`, marked as a UDP tunnel's (the shim as
/// its own header) so that each segment of a GSO packet gets them, with
/// the MSS kept (FIXED_GSO). The kernel sets the packet's protocol to the
/// outer family, which the neighbour output then writes.
#[inline(always)]
pub(crate) fn wrap_room(ctx: &TcContext, shim_len: usize, v6: bool) -> bool {
    let (family, outer_ip) = if v6 {
        (BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64, OUTER_V6)
    } else {
        (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64, OUTER_V4)
    };
    let flags = family
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_FIXED_GSO as u64
        | ((shim_len as u64) << ENCAP_L2_SHIFT);
    let overhead = (outer_ip + UDP_HLEN + shim_len) as i32;
    ctx.adjust_room(overhead, BPF_ADJ_ROOM_MAC, flags).is_ok()
}

/// The outer IPv4 and UDP headers of a datagram of `total` bytes (outer
/// IPv4 header included) from `from` to `to`. It may be fragmented on the
/// way, as the broker's and the exit's own datagrams and tunnels may: a
/// path narrower than the host knows costs fragments, not a stall (what
/// the host knows is too big never gets here). Fragmentable, the datagram
/// needs an ID of its own. The UDP checksum stays zero (RFC 768 for IPv4;
/// the inner packet has its own).
#[inline(always)]
pub(crate) fn outer_v4(from: ([u8; 4], u16), to: ([u8; 4], u16), total: usize) -> [u8; OUTER_V4 + UDP_HLEN] {
    let mut outer = [0u8; OUTER_V4 + UDP_HLEN];
    let ip = &mut outer[..OUTER_V4];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    // SAFETY: plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&from.0);
    ip[16..20].copy_from_slice(&to.0);
    let checksum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp = &mut outer[OUTER_V4..];
    udp[..2].copy_from_slice(&from.1.to_be_bytes());
    udp[2..4].copy_from_slice(&to.1.to_be_bytes());
    udp[4..6].copy_from_slice(&((total - OUTER_V4) as u16).to_be_bytes());
    outer
}

/// Writes the outer IP (`v6`, or v4 from the first 4 bytes of each
/// address) and UDP headers after the link header, for a datagram of
/// `total` bytes from `from` to `to`.
#[inline(always)]
fn store_outer(
    ctx: &TcContext,
    v6: bool,
    from: (&[u8; 16], u16),
    to: (&[u8; 16], u16),
    total: usize,
) -> bool {
    if v6 {
        let outer = outer_v6(from, to, total);
        ctx.store(ETH_HLEN, &outer, 0).is_ok()
    } else {
        let source = [from.0[0], from.0[1], from.0[2], from.0[3]];
        let peer = [to.0[0], to.0[1], to.0[2], to.0[3]];
        let outer = outer_v4((source, from.1), (peer, to.1), total);
        ctx.store(ETH_HLEN, &outer, 0).is_ok()
    }
}

/// The outer IPv6 and UDP headers of a datagram of `total` bytes (outer
/// IPv6 header included) from `from` to `to`, the UDP checksum zero (see
/// the module's notes).
#[inline(always)]
pub(crate) fn outer_v6(
    from: (&[u8; 16], u16),
    to: (&[u8; 16], u16),
    total: usize,
) -> [u8; OUTER_V6 + UDP_HLEN] {
    let mut outer = [0u8; OUTER_V6 + UDP_HLEN];
    let payload = ((total - OUTER_V6) as u16).to_be_bytes();
    let ip = &mut outer[..OUTER_V6];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&payload);
    ip[6] = IPPROTO_UDP;
    ip[7] = 64;
    ip[8..24].copy_from_slice(from.0);
    ip[24..40].copy_from_slice(to.0);
    let udp = &mut outer[OUTER_V6..];
    udp[..2].copy_from_slice(&from.1.to_be_bytes());
    udp[2..4].copy_from_slice(&to.1.to_be_bytes());
    udp[4..6].copy_from_slice(&payload);
    outer
}

/// Writes the shim at `at` (after the outer headers); `len` 1..=64.
#[inline(always)]
pub(crate) fn store_shim(ctx: &TcContext, at: usize, shim: *const u8, len: usize) -> bool {
    if len == 0 || len > MAX_FAST_SHIM {
        return false;
    }
    // SAFETY: `shim` points into a map value at least `MAX_FAST_SHIM`
    // bytes long, and `len` is within 1..=MAX_FAST_SHIM.
    unsafe { bpf_skb_store_bytes(ctx.skb.skb, at as u32, shim.cast(), len as u32, 0) == 0 }
}

/// The inner headers of each segment of a GSO packet (IP, and TCP with
/// its options or UDP).
#[inline(always)]
fn segment_headers(ctx: &TcContext, parsed: &Parsed) -> Option<usize> {
    let ip = parsed.l4_offset - ETH_HLEN;
    match parsed.key.proto {
        IPPROTO_TCP => {
            let offset: u8 = ctx.load(parsed.l4_offset + 12).ok()?;
            Some(ip + ((offset >> 4) as usize) * 4)
        }
        IPPROTO_UDP => Some(ip + UDP_HLEN),
        _ => None,
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < OUTER_V4 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    // Ten words sum to less than 2^20: two folds always end the carries
    // (and a fixed count keeps the verifier's walk short).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Opens a datagram from an entry node to the overlay port when it carries
/// a packet of a fast-path flow of that node (the packet then goes up the
/// stack as the inner packet); anything else stays as it is, for the
/// broker's socket.
#[inline(never)]
pub fn ingress(ctx: &TcContext, parsed: &Parsed, overlay_port: u16) -> Fast {
    let key = &parsed.key;
    let outer_v6 = key.family == FAMILY_V6;
    // Without options or extension headers.
    let outer_ip = if outer_v6 { OUTER_V6 } else { OUTER_V4 };
    if key.proto != IPPROTO_UDP
        || key.dport != overlay_port
        || parsed.fragment
        || parsed.first_fragment
        || parsed.l4_offset != ETH_HLEN + outer_ip
    {
        return Fast::Broker;
    }
    let peer = EncapPeer {
        addr: key.src,
        port: key.sport,
        family: key.family,
        _pad: 0,
    };
    // SAFETY: plain integers.
    let Some(shim_len) = (unsafe { ENCAP_PEERS.get(&peer) }).map(|len| *len as usize) else {
        return Fast::Broker;
    };
    if shim_len > MAX_FAST_SHIM {
        return Fast::Broker;
    }
    // SAFETY: the context pointer is valid for the whole run.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        bump(stat::FAST_AGGREGATE);
        return Fast::Broker;
    }
    let inner = ETH_HLEN + outer_ip + UDP_HLEN + shim_len;
    let Some((reply, flags, inner_v6)) = inner_flow(ctx, inner) else {
        return Fast::Broker;
    };
    if flags & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        return Fast::Broker;
    }
    // SAFETY: plain bytes.
    let Some(entry) = (unsafe { ENCAP.get(&reply.reversed()) }) else {
        return Fast::Broker;
    };
    if !entry.from_peer(&peer) {
        return Fast::Broker;
    }
    // A change of family is the kernel's to know (the packet's protocol)
    // and ours to write (the link header's type).
    let (flags, ethertype) = match (outer_v6, inner_v6) {
        (false, true) => (BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64, Some(ETH_P_IPV6)),
        (true, false) => (BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64, Some(ETH_P_IP)),
        _ => (0, None),
    };
    let outer = (outer_ip + UDP_HLEN + shim_len) as i32;
    if ctx.adjust_room(-outer, BPF_ADJ_ROOM_MAC, flags).is_err() {
        bump(stat::FAST_NO_ROOM);
        return Fast::Broker;
    }
    if let Some(ethertype) = ethertype
        && ctx.store(12, &ethertype.to_be_bytes(), 0).is_err()
    {
        return Fast::Broken;
    }
    bump(stat::DECAP_PACKETS);
    add(stat::DECAP_BYTES, ctx.len() as u64);
    Fast::Done
}

/// The 5-tuple of the packet at `offset`, its TCP flags, and whether it is
/// IPv6: TCP and UDP only, unfragmented, without IPv6 extension headers.
#[inline(always)]
fn inner_flow(ctx: &TcContext, offset: usize) -> Option<(FlowKey, u8, bool)> {
    let first: u8 = ctx.load(offset).ok()?;
    let mut key = FlowKey::default();
    let (l4, v6) = match first >> 4 {
        4 => {
            let ip: [u8; 20] = ctx.load(offset).ok()?;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]);
            if fragment & 0x3fff != 0 {
                return None;
            }
            key.proto = ip[9];
            key.src[..4].copy_from_slice(&ip[12..16]);
            key.dst[..4].copy_from_slice(&ip[16..20]);
            key.family = FAMILY_V4;
            (offset + ((ip[0] & 0x0f) as usize) * 4, false)
        }
        6 => {
            let ip: [u8; 40] = ctx.load(offset).ok()?;
            key.proto = ip[6];
            key.src.copy_from_slice(&ip[8..24]);
            key.dst.copy_from_slice(&ip[24..40]);
            key.family = FAMILY_V6;
            (offset + 40, true)
        }
        _ => return None,
    };
    let flags = match key.proto {
        IPPROTO_TCP => {
            let tcp: [u8; 14] = ctx.load(l4).ok()?;
            key.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            key.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            tcp[13]
        }
        IPPROTO_UDP => {
            let udp: [u8; 4] = ctx.load(l4).ok()?;
            key.sport = u16::from_be_bytes([udp[0], udp[1]]);
            key.dport = u16::from_be_bytes([udp[2], udp[3]]);
            0
        }
        _ => return None,
    };
    Some((key, flags, v6))
}
