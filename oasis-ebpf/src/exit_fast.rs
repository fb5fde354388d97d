//! The exit node's fast path (`oasis_common::exit_fast`), in its uplink's
//! ingress program.
//!
//! In from a client: a datagram to the exit's fast port (over IPv4 or
//! IPv6) carrying a packet of a flow the exit gave a mapping to, from that
//! very client (address, port and token), is opened; its packet gets the
//! mapping's public source and NAT port and is sent out of the uplink
//! toward its destination.
//!
//! In from the Internet: a reply to a mapping's public address and port
//! gets the client's own addresses back, is wrapped (outer IP of the
//! client's family and UDP, a zero shim, as the exit's own replies have)
//! and sent to the client.
//!
//! SYN, FIN and RST segments keep the user-space path both ways, so the
//! exit's NAT sees every connection open and close; so do what the kernel
//! cannot carry as it is: fragments, IPv4 options, IPv6 extension headers,
//! aggregates of received datagrams (GRO), replies too big once wrapped,
//! and everything else than IPv4 TCP and UDP inside.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_check_mtu, bpf_ktime_get_coarse_ns, bpf_redirect_neigh},
    programs::TcContext,
};
use oasis_common::{
    EXIT_FAST_CLASSES, ExitFlowKey, ExitSettings, FAMILY_V4, FAMILY_V6, FlowKey, MAX_EXIT_TOKEN,
    MAX_FAST_SHIM, exit_miss,
    proto::{TCP, UDP},
};

use crate::encap::{OUTER_V4, OUTER_V6, UDP_HLEN, outer_v4, outer_v6, store_shim, wrap_room};
use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, read, v4_in_16};
use crate::maps::{EXIT_BACK, EXIT_FAST_COUNTS, EXIT_FAST_MISSES, EXIT_OUT};

const TCP_SYN_FIN_RST: u8 = 0x07;
/// Refresh an entry's timestamp at most this often.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// Where the transport header starts in a packet without IPv4 options.
const L4: usize = ETH_HLEN + OUTER_V4;

/// Carries the packet when it is the fast path's: the program's verdict
/// then. None leaves it to the rest of the program (the steering of
/// replies to the exit's TUN) and to the exit's socket.
///
/// The verifier allows 512 bytes of stack along a chain of calls: the
/// headers are read here, and the work on a client's datagram and on a
/// reply are functions of their own, each called from here alone.
#[inline(never)]
pub fn ingress(ctx: &TcContext, settings: &ExitSettings) -> Option<i32> {
    let from = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => match ipv4(ctx, settings)? {
            V4::Client(from) => from,
            V4::Reply => return from_internet(ctx, settings),
        },
        ETH_P_IPV6 if settings.fast_port_v6 != 0 => ipv6_client(ctx, settings)?,
        _ => return None,
    };
    let udp = if from.family == FAMILY_V6 {
        ETH_HLEN + OUTER_V6
    } else {
        L4
    };
    from_client(ctx, settings, udp, &from)
}

/// What an IPv4 packet may be to the fast path.
enum V4 {
    Client(Sender),
    Reply,
}

/// An IPv4 packet without options or fragments: a client's datagram to
/// the fast port, or a reply to one of the NAT's ports.
#[inline(always)]
fn ipv4(ctx: &TcContext, settings: &ExitSettings) -> Option<V4> {
    let ip: [u8; OUTER_V4] = read(ctx, ETH_HLEN)?;
    if ip[0] != 0x45 || ip[6] & 0x3f != 0 || ip[7] != 0 {
        return None;
    }
    // Ports, and a UDP header's length and checksum.
    let ports: [u8; 8] = read(ctx, L4)?;
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    if ip[9] == UDP && dport == settings.fast_port {
        if unfinished(&ip, UDP, [ports[4], ports[5]], [ports[6], ports[7]]) {
            miss(exit_miss::UNFINISHED);
            return None;
        }
        return Some(V4::Client(Sender {
            family: FAMILY_V4,
            client: v4_in_16([ip[12], ip[13], ip[14], ip[15]]),
            port: u16::from_be_bytes([ports[0], ports[1]]),
            local: v4_in_16([ip[16], ip[17], ip[18], ip[19]]),
        }));
    }
    let reply = ip[16..20] == settings.v4
        && (ip[9] == TCP || ip[9] == UDP)
        && settings.port_first <= dport
        && dport <= settings.port_last;
    reply.then_some(V4::Reply)
}

/// An IPv6 client's datagram to the fast port, without extension headers.
#[inline(always)]
fn ipv6_client(ctx: &TcContext, settings: &ExitSettings) -> Option<Sender> {
    let ip: [u8; OUTER_V6] = read(ctx, ETH_HLEN)?;
    if ip[6] != UDP {
        return None;
    }
    let udp: [u8; UDP_HLEN] = read(ctx, ETH_HLEN + OUTER_V6)?;
    if u16::from_be_bytes([udp[2], udp[3]]) != settings.fast_port_v6 {
        return None;
    }
    if unfinished_v6(&ip, [udp[4], udp[5]], [udp[6], udp[7]]) {
        miss(exit_miss::UNFINISHED);
        return None;
    }
    Some(Sender {
        family: FAMILY_V6,
        client: read(ctx, ETH_HLEN + 8)?,
        port: u16::from_be_bytes([udp[0], udp[1]]),
        local: read(ctx, ETH_HLEN + 24)?,
    })
}

/// Who sent a client's datagram, and to which of the exit's addresses.
struct Sender {
    family: u8,
    /// IPv4 in the first 4 bytes, as `local`.
    client: [u8; 16],
    port: u16,
    local: [u8; 16],
}

/// A client's datagram (its UDP header at `udp`): opened and sent on from
/// the exit when it carries a packet of one of the client's mapped flows.
#[inline(never)]
fn from_client(ctx: &TcContext, settings: &ExitSettings, udp: usize, from: &Sender) -> Option<i32> {
    let shim_len = settings.shim_len as usize;
    if shim_len > MAX_FAST_SHIM {
        return None;
    }
    let inner = udp + UDP_HLEN + shim_len;
    let ip: [u8; OUTER_V4] = ctx.load(inner).ok()?;
    let proto = ip[9];
    if ip[0] != 0x45 || ip[6] & 0x3f != 0 || ip[7] != 0 || !(proto == TCP || proto == UDP) {
        return None;
    }
    // Ports, and TCP's flags 13 bytes in (a UDP header is 8 bytes: its
    // datagram may end before).
    let (sport, dport) = if proto == TCP {
        let tcp: [u8; 14] = ctx.load(inner + OUTER_V4).ok()?;
        if tcp[13] & TCP_SYN_FIN_RST != 0 {
            return None;
        }
        (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        )
    } else {
        let udp: [u8; 4] = ctx.load(inner + OUTER_V4).ok()?;
        (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        )
    };
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    let key = ExitFlowKey {
        client: from.client,
        client_port: from.port,
        family: from.family,
        _pad: [0; 5],
        inner: FlowKey::v4(src, dst, proto, sport, dport),
    };
    let entry = EXIT_OUT.get_ptr_mut(&key)?;
    // SAFETY: pointer from a successful lookup; plain integers and bytes.
    let entry = unsafe { &mut *entry };
    // SAFETY: the context pointer is valid for the whole run.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        miss(exit_miss::AGGREGATE);
        return None;
    }
    if entry.token_len != 0 && !token_matches(ctx, udp + UDP_HLEN, entry.token_len as usize, &entry.token) {
        miss(exit_miss::TOKEN);
        return None;
    }
    // Replies come from where the client sends to: the reply's entry
    // learns it from the first datagram carried here.
    if entry.learned == 0 {
        let reply = FlowKey::v4(dst, entry.public, proto, dport, entry.nat_port);
        if let Some(back) = EXIT_BACK.get_ptr_mut(&reply) {
            // SAFETY: pointer from a successful lookup.
            unsafe { (*back).local = from.local };
            entry.learned = 1;
        }
    }
    // Out of IPv6, the packet is IPv4: the kernel must know (the packet's
    // protocol) and the link header say so.
    let v6 = from.family == FAMILY_V6;
    let flags = if v6 {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64
    } else {
        0
    };
    let overhead = (inner - ETH_HLEN) as i32;
    if ctx.adjust_room(-overhead, BPF_ADJ_ROOM_MAC, flags).is_err() {
        miss(exit_miss::NO_ROOM);
        return None;
    }
    if v6 && ctx.store(12, &ETH_P_IP.to_be_bytes(), 0).is_err() {
        return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
    }
    // Now the client's packet is all there is: its source becomes the
    // mapping's.
    let rewritten = rewrite(
        ctx,
        proto,
        Field::Source,
        (src, sport),
        (entry.public, entry.nat_port),
    );
    if !rewritten {
        // Opened but not rewritten: nobody can use it now; the client's
        // stack sends it again.
        return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
    }
    touch(&mut entry.last_seen_ns);
    let class = entry.class;
    count(class, true, ctx.len());
    send(ctx, settings, class)
}

/// A reply to a mapping: back to its client, wrapped, once the kernel has
/// carried a datagram of the client's (and so knows where to answer from).
#[inline(never)]
fn from_internet(ctx: &TcContext, settings: &ExitSettings) -> Option<i32> {
    let ip: [u8; OUTER_V4] = read(ctx, ETH_HLEN)?;
    let proto = ip[9];
    // Ports, TCP's flags at 13 and its checksum at 16; UDP's at 6.
    let head: [u8; 18] = if proto == TCP {
        read(ctx, L4)?
    } else {
        let udp: [u8; 8] = read(ctx, L4)?;
        [
            udp[0], udp[1], udp[2], udp[3], 0, 0, udp[6], udp[7], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]
    };
    if proto == TCP && head[13] & TCP_SYN_FIN_RST != 0 {
        return None;
    }
    // SAFETY: the context pointer is valid for the whole run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    let check = if proto == TCP {
        [head[16], head[17]]
    } else {
        [head[6], head[7]]
    };
    let l4_len = u16::from_be_bytes([ip[2], ip[3]]).saturating_sub(OUTER_V4 as u16);
    if gso_size == 0 && unfinished(&ip, proto, l4_len.to_be_bytes(), check) {
        miss(exit_miss::UNFINISHED);
        return None;
    }
    let remote = [ip[12], ip[13], ip[14], ip[15]];
    let remote_port = u16::from_be_bytes([head[0], head[1]]);
    let nat_port = u16::from_be_bytes([head[2], head[3]]);
    let key = FlowKey::v4(remote, settings.v4, proto, remote_port, nat_port);
    let entry = EXIT_BACK.get_ptr_mut(&key)?;
    // SAFETY: pointer from a successful lookup; plain integers and bytes.
    let entry = unsafe { &mut *entry };
    if entry.local == [0; 16] {
        miss(exit_miss::NOT_LEARNED);
        return None;
    }
    let shim_len = settings.shim_len as usize;
    if shim_len > MAX_FAST_SHIM {
        return None;
    }
    let v6 = entry.family == FAMILY_V6;
    let outer_ip = if v6 { OUTER_V6 } else { OUTER_V4 };
    let overhead = outer_ip + UDP_HLEN + shim_len;
    let inner_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let total = inner_len + overhead;
    // What must fit the uplink: the packet, or each segment of an
    // aggregate the uplink's GRO made (cut again on the way out).
    let on_wire = if gso_size == 0 {
        total
    } else if proto == TCP {
        OUTER_V4 + ((head[12] >> 4) as usize) * 4 + gso_size + overhead
    } else {
        OUTER_V4 + UDP_HLEN + gso_size + overhead
    };
    if total > 0xffff || on_wire > uplink_mtu(ctx, settings) {
        miss(exit_miss::TOO_BIG);
        return None;
    }
    // The client's own addresses back, as for the user-space path.
    let rewritten = rewrite(
        ctx,
        proto,
        Field::Destination,
        (settings.v4, nat_port),
        (entry.inside, entry.inside_port),
    );
    if !rewritten {
        return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
    }
    if !wrap_room(ctx, shim_len, v6) {
        // Rewritten for the client but not wrapped: useless to anyone.
        miss(exit_miss::NO_ROOM);
        return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
    }
    // Written here, not through `encap::store_outer`: shared, the
    // function's stack grew past the verifier's 512 bytes per call chain.
    let headers = if v6 {
        let outer = outer_v6(
            (&entry.local, entry.listen_port),
            (&entry.client, entry.client_port),
            total,
        );
        ctx.store(ETH_HLEN, &outer, 0).is_ok()
    } else {
        let local = [entry.local[0], entry.local[1], entry.local[2], entry.local[3]];
        let client = [entry.client[0], entry.client[1], entry.client[2], entry.client[3]];
        let outer = outer_v4((local, entry.listen_port), (client, entry.client_port), total);
        ctx.store(ETH_HLEN, &outer, 0).is_ok()
    };
    // A reply's shim is zeros, as the exit's user-space path sends it.
    let zeros = [0u8; MAX_FAST_SHIM];
    let stored = headers
        && (shim_len == 0 || store_shim(ctx, ETH_HLEN + outer_ip + UDP_HLEN, zeros.as_ptr(), shim_len));
    if !stored {
        miss(exit_miss::NO_ROOM);
        return Some(aya_ebpf::bindings::TC_ACT_SHOT as i32);
    }
    touch(&mut entry.last_seen_ns);
    let class = entry.class;
    count(class, false, ctx.len());
    send(ctx, settings, class)
}

/// Which address and port of the packet a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Source,
    Destination,
}

/// Replaces an IPv4 TCP or UDP packet's source or destination address and
/// port (the packet right after the link header, without options), fixing
/// both checksums; false when the kernel refused a step.
#[inline(always)]
fn rewrite(ctx: &TcContext, proto: u8, field: Field, old: ([u8; 4], u16), new: ([u8; 4], u16)) -> bool {
    let csum = if proto == TCP { L4 + 16 } else { L4 + 6 };
    // A UDP checksum of 0 means "none" and must stay 0.
    let mangled_zero = if proto == UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let (old_addr, new_addr) = (u32::from_ne_bytes(old.0) as u64, u32::from_ne_bytes(new.0) as u64);
    let (old_port, new_port) = (u16::to_be(old.1) as u64, u16::to_be(new.1) as u64);
    let (addr_at, port_at) = match field {
        Field::Source => (ETH_HLEN + 12, L4),
        Field::Destination => (ETH_HLEN + 16, L4 + 2),
    };
    ctx.l4_csum_replace(
        csum,
        old_addr,
        new_addr,
        BPF_F_PSEUDO_HDR as u64 | mangled_zero | 4,
    )
    .is_ok()
        && ctx
            .l4_csum_replace(csum, old_port, new_port, mangled_zero | 2)
            .is_ok()
        && ctx.l3_csum_replace(ETH_HLEN + 10, old_addr, new_addr, 4).is_ok()
        && ctx.store(addr_at, &new.0, 0).is_ok()
        && ctx.store(port_at, &new.1.to_be_bytes(), 0).is_ok()
}

/// Whether a transport checksum holds only its pseudo-header's sum, as a
/// packet from this same host carries it through veth ("the device will
/// finish it", CHECKSUM_PARTIAL). Such a packet keeps the user-space path:
/// the kernel's checksum offsets would point into the headers taken off
/// or put on here. A finished checksum looks so one time in 65,536 (that
/// packet, too, goes through user space); a zero UDP checksum never does.
#[inline(always)]
fn unfinished(ip: &[u8; OUTER_V4], proto: u8, l4_len: [u8; 2], check: [u8; 2]) -> bool {
    let check = u16::from_be_bytes(check);
    if check == 0 {
        return false;
    }
    let word = |i: usize| u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
    let mut sum =
        word(12) + word(14) + word(16) + word(18) + u32::from(proto) + u32::from(u16::from_be_bytes(l4_len));
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16 == check
}

/// As [`unfinished`], for a UDP datagram over IPv6 (its pseudo-header: the
/// two addresses, the length, the protocol).
#[inline(always)]
fn unfinished_v6(ip: &[u8; OUTER_V6], udp_len: [u8; 2], check: [u8; 2]) -> bool {
    let check = u16::from_be_bytes(check);
    if check == 0 {
        return false;
    }
    let mut sum = u32::from(UDP) + u32::from(u16::from_be_bytes(udp_len));
    let mut i = 8;
    while i < OUTER_V6 {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    // Sixteen words and two more sum to less than 2^21: two folds end it.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16 == check
}

/// The uplink's MTU now (it may have changed since the exit started).
#[inline(always)]
fn uplink_mtu(ctx: &TcContext, settings: &ExitSettings) -> usize {
    let mut mtu: u32 = 0;
    // SAFETY: a valid context and out-parameter; with no length to check
    // and no flags the helper only reports the device's MTU.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), settings.uplink_ifindex, &mut mtu, 0, 0) };
    if mtu == 0 {
        settings.mtu as usize
    } else {
        mtu as usize
    }
}

/// Whether the datagram's shim (at `at`) starts with the client's token.
#[inline(always)]
fn token_matches(ctx: &TcContext, at: usize, len: usize, token: &[u8; MAX_EXIT_TOKEN]) -> bool {
    if len > MAX_EXIT_TOKEN || len > MAX_FAST_SHIM {
        return false;
    }
    let Ok(shim) = ctx.load::<[u8; MAX_EXIT_TOKEN]>(at) else {
        return false;
    };
    let mut i = 0;
    while i < MAX_EXIT_TOKEN {
        if i < len && shim[i] != token[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Out of the uplink, to the next hop the kernel's routes and neighbours
/// say, in the client's priority class when the exit asked for them.
#[inline(always)]
fn send(ctx: &TcContext, settings: &ExitSettings, class: u8) -> Option<i32> {
    if settings.prioritise != 0 {
        // TC_H_MAKE(1, class + 1): the class of the exit's htb qdisc.
        // SAFETY: the context pointer is valid; priority is writable here.
        unsafe { (*ctx.skb.skb).priority = (1 << 16) | (u32::from(class) + 1) };
    }
    // SAFETY: plain helper call without next-hop parameters.
    let action = unsafe { bpf_redirect_neigh(settings.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    Some(action as i32)
}

#[inline(always)]
fn touch(last_seen_ns: &mut u64) {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if now.saturating_sub(*last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        *last_seen_ns = now;
    }
}

#[inline(always)]
fn count(class: u8, to_internet: bool, len: u32) {
    let index = u32::from(class).min(EXIT_FAST_CLASSES - 1);
    if let Some(counts) = EXIT_FAST_COUNTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            if to_internet {
                (*counts).to_internet_packets += 1;
                (*counts).to_internet_bytes += u64::from(len);
            } else {
                (*counts).to_client_packets += 1;
                (*counts).to_client_bytes += u64::from(len);
            }
        }
    }
}

#[inline(always)]
fn miss(reason: u32) {
    if let Some(counter) = EXIT_FAST_MISSES.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, as above.
        unsafe { *counter += 1 };
    }
}
