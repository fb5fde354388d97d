//! Rewriting raw IP packets in place: addresses and ports (NAT), TCP MSS
//! clamping, with checksums updated incrementally (RFC 1624) rather than
//! recomputed, so the cost does not grow with the payload.
//!
//! etherparse parses and builds packets; it has no in-place rewriting with
//! incremental checksum updates, which is what a NAT needs per packet.

use std::net::IpAddr;

use oasis_common::proto::{ICMP, ICMPV6, TCP, UDP};
const IPV6_FRAGMENT: u8 = 44;

/// One fragment of a datagram, as its fragments are told apart: by
/// addresses, protocol and identification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub id: u32,
    /// The first fragment (offset 0): it holds the transport header.
    pub first: bool,
    /// The transport protocol (IPv6: the fragment header's next header).
    pub proto: u8,
}

/// The fragment a packet is, if it is one.
pub fn fragment(packet: &[u8]) -> Option<Fragment> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let field = u16::from_be_bytes([packet[6], packet[7]]);
            (field & 0x3fff != 0).then(|| Fragment {
                id: u32::from(u16::from_be_bytes([packet[4], packet[5]])),
                first: field & 0x1fff == 0,
                proto: packet[9],
            })
        }
        6 if packet.len() >= 48 && packet[6] == IPV6_FRAGMENT => {
            let field = u16::from_be_bytes([packet[42], packet[43]]);
            Some(Fragment {
                id: u32::from_be_bytes([packet[44], packet[45], packet[46], packet[47]]),
                first: field & 0xfff8 == 0,
                proto: packet[40],
            })
        }
        _ => None,
    }
}

/// Gives a fragment another identification (an exit's NAT does, so
/// datagrams of clients behind one address never share one at the far end).
pub fn set_fragment_id(packet: &mut [u8], id: u32) {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let old = [packet[4], packet[5]];
            let new = (id as u16).to_be_bytes();
            let sum = adjust(u16::from_be_bytes([packet[10], packet[11]]), &old, &new);
            packet[4..6].copy_from_slice(&new);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        Some(6) if packet.len() >= 48 => packet[44..48].copy_from_slice(&id.to_be_bytes()),
        _ => {}
    }
}

/// Replaces one end's address in the IP header alone: for a fragment after
/// the first, which has no transport header (the datagram's transport
/// checksum was fixed in the first).
pub fn rewrite_ip_address(packet: &mut [u8], end: End, addr: IpAddr) -> Result<(), PacketError> {
    match (packet.first().map(|b| b >> 4), addr) {
        (Some(4), IpAddr::V4(a)) if packet.len() >= 20 => {
            let at = if end == End::Source { 12 } else { 16 };
            let old = [packet[at], packet[at + 1], packet[at + 2], packet[at + 3]];
            let sum = adjust(u16::from_be_bytes([packet[10], packet[11]]), &old, &a.octets());
            packet[at..at + 4].copy_from_slice(&a.octets());
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            Ok(())
        }
        (Some(6), IpAddr::V6(a)) if packet.len() >= 40 => {
            let at = if end == End::Source { 8 } else { 24 };
            packet[at..at + 16].copy_from_slice(&a.octets());
            Ok(())
        }
        (Some(4 | 6), _) => Err(PacketError::FamilyMismatch),
        _ => Err(PacketError::NotIp),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("packet truncated")]
    Truncated,
    #[error("protocol {0} cannot be rewritten (only TCP, UDP and ICMP echo)")]
    Unsupported(u8),
    #[error("the new address is of another IP family than the packet")]
    FamilyMismatch,
    #[error("fragmented packets cannot be rewritten")]
    Fragment,
}

/// Where a packet's parts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub version: u8,
    pub proto: u8,
    /// Start of the transport header.
    pub l4: usize,
}

pub fn layout(packet: &[u8]) -> Result<Layout, PacketError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < 20 {
                return Err(PacketError::Truncated);
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Err(PacketError::Truncated);
            }
            // A first fragment has the transport header; later ones do not.
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0 {
                return Err(PacketError::Fragment);
            }
            Ok(Layout {
                version: 4,
                proto: packet[9],
                l4: ihl,
            })
        }
        Some(6) => {
            if packet.len() < 40 {
                return Err(PacketError::Truncated);
            }
            if packet[6] == IPV6_FRAGMENT {
                let header = packet.get(40..48).ok_or(PacketError::Truncated)?;
                if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                    return Err(PacketError::Fragment);
                }
                return Ok(Layout {
                    version: 6,
                    proto: header[0],
                    l4: 48,
                });
            }
            Ok(Layout {
                version: 6,
                proto: packet[6],
                l4: 40,
            })
        }
        _ => Err(PacketError::NotIp),
    }
}

/// Offset of the transport checksum, and of the 16-bit field NAT changes
/// (source port, or the ICMP echo identifier), relative to the L4 start.
fn l4_fields(proto: u8, packet_len: usize, l4: usize) -> Result<(usize, usize, usize), PacketError> {
    let (checksum, port_src, port_dst, min) = match proto {
        TCP => (16, 0, 2, 20),
        UDP => (6, 0, 2, 8),
        // Echo request/reply: the identifier stands for both ports.
        ICMP | ICMPV6 => (2, 4, 4, 8),
        other => return Err(PacketError::Unsupported(other)),
    };
    if packet_len < l4 + min {
        return Err(PacketError::Truncated);
    }
    Ok((checksum, port_src, port_dst))
}

/// Where the packet an ICMP error quotes starts, when `packet` is one
/// (destination unreachable, packet too big, time exceeded, parameter
/// problem): routers and hosts on the way send these about a flow.
pub fn icmp_error_quote(packet: &[u8]) -> Option<usize> {
    icmp_error_quote_in(packet, &layout(packet).ok()?)
}

/// As [`icmp_error_quote`], for a packet whose layout is known.
pub fn icmp_error_quote_in(packet: &[u8], layout: &Layout) -> Option<usize> {
    let kind = *packet.get(layout.l4)?;
    let error = match layout.proto {
        ICMP => matches!(kind, 3 | 11 | 12),
        ICMPV6 => matches!(kind, 1..=4),
        _ => false,
    };
    let quote = layout.l4 + 8;
    (error && packet.len() >= quote + 20).then_some(quote)
}

/// Puts `addr` and `port` in as the source of the packet an ICMP error
/// quotes (from `quote` on), as the sender of that packet knew it, and
/// recomputes the ICMP checksum. The quoted transport checksum is left: no
/// stack checks it in an error.
pub fn rewrite_quoted_source(
    packet: &mut [u8],
    quote: usize,
    addr: IpAddr,
    port: u16,
) -> Result<(), PacketError> {
    let quoted = packet.get_mut(quote..).ok_or(PacketError::Truncated)?;
    let layout = layout(quoted)?;
    rewrite_ip_address(quoted, End::Source, addr)?;
    match layout.proto {
        TCP | UDP => {
            let at = layout.l4;
            quoted
                .get_mut(at..at + 2)
                .ok_or(PacketError::Truncated)?
                .copy_from_slice(&port.to_be_bytes());
        }
        // An echo request's identifier.
        ICMP | ICMPV6 => {
            let at = layout.l4 + 4;
            quoted
                .get_mut(at..at + 2)
                .ok_or(PacketError::Truncated)?
                .copy_from_slice(&port.to_be_bytes());
        }
        other => return Err(PacketError::Unsupported(other)),
    }
    refresh_icmp_checksum(packet)
}

/// Puts `addr` in at `end` of the packet an ICMP error quotes, and as the
/// error's own address at the other end when it was the one replaced (an
/// error sent to the quoted packet's source, or sent by its destination),
/// and recomputes the checksums: an error about a flow whose address is
/// translated, translated with it.
pub fn rewrite_error_about(packet: &mut [u8], end: End, addr: IpAddr) -> Result<(), PacketError> {
    let quote = icmp_error_quote(packet).ok_or(PacketError::Unsupported(layout(packet)?.proto))?;
    let (src, dst) = addresses(&packet[quote..]).ok_or(PacketError::Truncated)?;
    let (old, other) = match end {
        End::Source => (src, End::Destination),
        End::Destination => (dst, End::Source),
    };
    rewrite_ip_address(&mut packet[quote..], end, addr)?;
    let (outer_src, outer_dst) = addresses(packet).ok_or(PacketError::Truncated)?;
    let outer = if other == End::Source {
        outer_src
    } else {
        outer_dst
    };
    if outer == old {
        rewrite_ip_address(packet, other, addr)?;
    }
    refresh_icmp_checksum(packet)
}

/// Recomputes an ICMP or ICMPv6 message's checksum from scratch (errors are
/// small; their quoted part changed).
pub fn refresh_icmp_checksum(packet: &mut [u8]) -> Result<(), PacketError> {
    let layout = layout(packet)?;
    let at = layout.l4 + 2;
    if packet.len() < at + 2 {
        return Err(PacketError::Truncated);
    }
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    let mut sum = if layout.version == 6 {
        pseudo_header_sum(packet, ICMPV6, layout.l4)
    } else {
        0
    };
    sum = ones_sum(sum, &packet[layout.l4..]);
    let checksum = !fold(sum);
    packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Finishes a TCP or UDP checksum that holds only its pseudo-header's sum:
/// a packet whose sender's kernel left the checksum to the device
/// (CHECKSUM_PARTIAL) and that crossed a veth unfinished, as a client's
/// kernel-wrapped packets do toward an exit node on the same host.
/// Recomputing is right even when the match is a coincidence (one finished
/// checksum in 65,536 looks so): such a checksum recomputes to itself.
/// True when it recomputed.
pub fn finish_checksum(packet: &mut [u8]) -> bool {
    let Ok(layout) = layout(packet) else {
        return false;
    };
    let at = match layout.proto {
        TCP => layout.l4 + 16,
        UDP => layout.l4 + 6,
        _ => return false,
    };
    let Some(field) = packet.get(at..at + 2) else {
        return false;
    };
    let field = u16::from_be_bytes([field[0], field[1]]);
    // Zero: an IPv4 UDP datagram without a checksum.
    if field == 0 || field != fold(pseudo_header_sum(packet, layout.proto, layout.l4)) {
        return false;
    }
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = ones_sum(
        pseudo_header_sum(packet, layout.proto, layout.l4),
        &packet[layout.l4..],
    );
    let mut checksum = !fold(sum);
    if layout.proto == UDP && checksum == 0 {
        checksum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// The transport pseudo-header's one's-complement sum, unfolded: the
/// addresses, the protocol and the transport length (from `l4` to the
/// packet's end).
fn pseudo_header_sum(packet: &[u8], proto: u8, l4: usize) -> u32 {
    let length = (packet.len() - l4) as u32;
    let addresses = if packet[0] >> 4 == 6 {
        &packet[8..40]
    } else {
        &packet[12..20]
    };
    ones_sum(ones_sum(0, addresses), &length.to_be_bytes()) + u32::from(proto)
}

/// Adds `bytes` as big-endian 16-bit words (an odd last byte padded with
/// zero) to `sum`, without folding.
fn ones_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut pairs = bytes.chunks_exact(2);
    for pair in &mut pairs {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ICMP echo identifier, when the packet is an echo request or reply.
pub fn echo_id(packet: &[u8]) -> Option<(bool, u16)> {
    let layout = layout(packet).ok()?;
    let l4 = layout.l4;
    let kind = *packet.get(l4)?;
    let is_request = match (layout.proto, kind) {
        (ICMP, 8) | (ICMPV6, 128) => true,
        (ICMP, 0) | (ICMPV6, 129) => false,
        _ => return None,
    };
    Some((
        is_request,
        u16::from_be_bytes([*packet.get(l4 + 4)?, *packet.get(l4 + 5)?]),
    ))
}

/// Which end of the packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Replaces one end's address and port (ICMP echo: identifier) and fixes
/// the IPv4 header and transport checksums.
pub fn rewrite(packet: &mut [u8], end: End, addr: IpAddr, port: u16) -> Result<(), PacketError> {
    let layout = layout(packet)?;
    let (checksum_at, src_port_at, dst_port_at) = l4_fields(layout.proto, packet.len(), layout.l4)?;
    if matches!(layout.proto, ICMP | ICMPV6) && echo_id(packet).is_none() {
        return Err(PacketError::Unsupported(layout.proto));
    }
    let mut new_addr = [0u8; 16];
    let (addr_at, addr_len) = match (layout.version, addr, end) {
        (4, IpAddr::V4(a), end) => {
            new_addr[..4].copy_from_slice(&a.octets());
            (if end == End::Source { 12 } else { 16 }, 4)
        }
        (6, IpAddr::V6(a), end) => {
            new_addr = a.octets();
            (if end == End::Source { 8 } else { 24 }, 16)
        }
        _ => return Err(PacketError::FamilyMismatch),
    };
    let new_addr = &new_addr[..addr_len];
    let port_at = layout.l4
        + if end == End::Source {
            src_port_at
        } else {
            dst_port_at
        };
    let checksum_at = layout.l4 + checksum_at;

    // The transport checksum covers the addresses through the pseudo-header,
    // except ICMPv4's; a UDP/IPv4 checksum of zero means "none" and stays so.
    let covers_addresses = layout.proto != ICMP;
    let udp4_without_checksum =
        layout.version == 4 && layout.proto == UDP && packet[checksum_at..checksum_at + 2] == [0, 0];
    let mut l4_sum = u16::from_be_bytes([packet[checksum_at], packet[checksum_at + 1]]);

    let mut old_addr = [0u8; 16];
    old_addr[..addr_len].copy_from_slice(&packet[addr_at..addr_at + addr_len]);
    let old_addr = &old_addr[..addr_len];
    if layout.version == 4 {
        let ip_sum = u16::from_be_bytes([packet[10], packet[11]]);
        let ip_sum = adjust(ip_sum, old_addr, new_addr);
        packet[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    }
    if covers_addresses {
        l4_sum = adjust(l4_sum, old_addr, new_addr);
    }
    packet[addr_at..addr_at + addr_len].copy_from_slice(new_addr);

    let old_port = [packet[port_at], packet[port_at + 1]];
    l4_sum = adjust(l4_sum, &old_port, &port.to_be_bytes());
    packet[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());

    if !udp4_without_checksum {
        // For UDP a computed zero is sent as all ones (RFC 768).
        if layout.proto == UDP && l4_sum == 0 {
            l4_sum = 0xffff;
        }
        packet[checksum_at..checksum_at + 2].copy_from_slice(&l4_sum.to_be_bytes());
    }
    Ok(())
}

/// RFC 1624: the checksum after `old` bytes became `new` (same length, even).
fn adjust(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    for chunk in old.chunks(2) {
        sum += u32::from(!u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    for chunk in new.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Lowers the MSS option of a TCP SYN to `max_mss`, so that segments plus
/// the overlay's encapsulation still fit the path. Returns whether it
/// changed the packet.
pub fn clamp_mss(packet: &mut [u8], max_mss: u16) -> bool {
    let Ok(layout) = layout(packet) else {
        return false;
    };
    if layout.proto != TCP || packet.len() < layout.l4 + 20 {
        return false;
    }
    let l4 = layout.l4;
    let flags = packet[l4 + 13];
    if flags & 0x02 == 0 {
        return false;
    }
    let header_len = usize::from(packet[l4 + 12] >> 4) * 4;
    let end = (l4 + header_len).min(packet.len());
    let mut at = l4 + 20;
    while at < end {
        match packet[at] {
            0 => break,
            1 => at += 1,
            kind => {
                let Some(&len) = packet.get(at + 1) else {
                    break;
                };
                let len = usize::from(len);
                if len < 2 || at + len > end {
                    break;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([packet[at + 2], packet[at + 3]]);
                    if mss <= max_mss {
                        return false;
                    }
                    let sum = u16::from_be_bytes([packet[l4 + 16], packet[l4 + 17]]);
                    let sum = adjust(sum, &mss.to_be_bytes(), &max_mss.to_be_bytes());
                    packet[at + 2..at + 4].copy_from_slice(&max_mss.to_be_bytes());
                    packet[l4 + 16..l4 + 18].copy_from_slice(&sum.to_be_bytes());
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

/// Source and destination port of a TCP or UDP packet; for ICMP echo the
/// identifier stands in for both.
pub fn ports(packet: &[u8]) -> Option<(u16, u16)> {
    let layout = layout(packet).ok()?;
    match layout.proto {
        TCP | UDP => {
            let l4 = packet.get(layout.l4..layout.l4 + 4)?;
            Some((
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            ))
        }
        ICMP | ICMPV6 => echo_id(packet).map(|(_, id)| (id, id)),
        _ => None,
    }
}

/// A TCP reset answering `segment`: from its destination to its source,
/// as RFC 9293 (3.10.7.1) makes one so the sender's stack takes it: with
/// the sequence number the sender expects next (its acknowledgment), or,
/// for a segment without ACK (a SYN), sequence zero and an ACK of what the
/// segment carried, which is what a connecting socket accepts as "refused".
/// Written into `out` (cleared first); false when `segment` is not TCP, or
/// is itself a reset (never answered).
pub fn reset_reply(segment: &[u8], out: &mut Vec<u8>) -> bool {
    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    let Ok(sliced) = SlicedPacket::from_ip(segment) else {
        return false;
    };
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        return false;
    };
    if tcp.rst() {
        return false;
    }
    out.clear();
    let builder = match sliced.net {
        Some(NetSlice::Ipv4(ip)) => PacketBuilder::ipv4(ip.header().destination(), ip.header().source(), 64),
        Some(NetSlice::Ipv6(ip)) => PacketBuilder::ipv6(ip.header().destination(), ip.header().source(), 64),
        _ => return false,
    };
    let (sport, dport) = (tcp.destination_port(), tcp.source_port());
    if tcp.ack() {
        return builder
            .tcp(sport, dport, tcp.acknowledgment_number(), 0)
            .rst()
            .write(out, &[])
            .is_ok();
    }
    let carried = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
    builder
        .tcp(sport, dport, 0, 0)
        .rst()
        .ack(tcp.sequence_number().wrapping_add(carried))
        .write(out, &[])
        .is_ok()
}

/// Whether a TCP packet is a reset (never answered by another).
pub fn tcp_resetting(packet: &[u8]) -> bool {
    let Ok(layout) = layout(packet) else { return false };
    layout.proto == TCP && packet.get(layout.l4 + 13).is_some_and(|flags| flags & 0x04 != 0)
}

/// Whether a TCP packet carries FIN or RST (its connection is ending).
pub fn tcp_closing(packet: &[u8]) -> bool {
    let Ok(layout) = layout(packet) else { return false };
    layout.proto == TCP && packet.get(layout.l4 + 13).is_some_and(|flags| flags & 0x05 != 0)
}

/// The source and destination addresses of a raw IP packet.
pub fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some((src.into(), dst.into()))
        }
        6 if packet.len() >= 40 => {
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some((src.into(), dst.into()))
        }
        _ => None,
    }
}

/// Replaces one end's address only (its port or echo identifier stays).
pub fn rewrite_address(packet: &mut [u8], end: End, addr: IpAddr) -> Result<(), PacketError> {
    let (sport, dport) = ports(packet).ok_or(PacketError::Unsupported(layout(packet)?.proto))?;
    rewrite(packet, end, addr, if end == End::Source { sport } else { dport })
}

/// An ICMP "destination unreachable" (host unreachable, or ICMPv6 address
/// unreachable) that `dead`, a packet to an address nobody answers for,
/// draws: from its destination back to its source, quoting its start, so
/// the sender's stack fails the connection at once instead of retrying.
/// Written into `out` (cleared first, its capacity reused); false when
/// `dead` is not an IP packet.
pub fn unreachable_reply(dead: &[u8], out: &mut Vec<u8>) -> bool {
    build_unreachable(dead, out, false).is_some()
}

/// An ICMP "communication administratively prohibited" (ICMPv6: with the
/// destination administratively prohibited) for `refused`: unlike host
/// unreachable, which a UDP socket ignores, the sender's stack reports it
/// to the application at once (EHOSTUNREACH, EACCES).
pub fn prohibited_reply(refused: &[u8], out: &mut Vec<u8>) -> bool {
    build_unreachable(refused, out, true).is_some()
}

/// Whether `packet` may not be fragmented on its way: IPv4 with the
/// don't-fragment bit, and every IPv6 packet (only its sender fragments).
pub fn must_not_fragment(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => packet.get(6).is_some_and(|flags| flags & 0x40 != 0),
        Some(6) => true,
        _ => false,
    }
}

/// The ICMP "fragmentation needed" (ICMPv6 "packet too big") that a
/// packet larger than the next link's `mtu` draws: from its destination
/// back to its source, so the sender's stack learns the path MTU and sends
/// smaller (TCP segments, UDP with DF, QUIC) instead of losing every large
/// packet. Written into `out`; false when `big` is not an IP packet.
pub fn too_big_reply(big: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4};
    let Some((src, dst)) = addresses(big) else {
        return false;
    };
    out.clear();
    match (dst, src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let ihl = usize::from(big[0] & 0x0f) * 4;
            let quoted = &big[..big.len().min(ihl + 8)];
            PacketBuilder::ipv4(from.octets(), to.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ))
                .write(out, quoted)
                .is_ok()
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let quoted = &big[..big.len().min(1280 - 48)];
            PacketBuilder::ipv6(from.octets(), to.octets(), 64)
                .icmpv6(Icmpv6Type::PacketTooBig { mtu: u32::from(mtu) })
                .write(out, quoted)
                .is_ok()
        }
        _ => false,
    }
}

fn build_unreachable(dead: &[u8], out: &mut Vec<u8>, prohibited: bool) -> Option<()> {
    use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4, icmpv6};
    let (src, dst) = addresses(dead)?;
    out.clear();
    match (dst, src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let ihl = usize::from(dead[0] & 0x0f) * 4;
            let quoted = &dead[..dead.len().min(ihl + 8)];
            PacketBuilder::ipv4(from.octets(), to.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(if prohibited {
                    icmpv4::DestUnreachableHeader::FilterProhibited
                } else {
                    icmpv4::DestUnreachableHeader::Host
                }))
                .write(out, quoted)
                .ok()?;
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            // The whole error must fit the IPv6 minimum MTU.
            let quoted = &dead[..dead.len().min(1280 - 48)];
            PacketBuilder::ipv6(from.octets(), to.octets(), 64)
                .icmpv6(Icmpv6Type::DestinationUnreachable(if prohibited {
                    icmpv6::DestUnreachableCode::Prohibited
                } else {
                    icmpv6::DestUnreachableCode::Address
                }))
                .write(out, quoted)
                .ok()?;
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};

    /// A packet as a kernel leaves it for the device: the transport
    /// checksum holding the pseudo-header's sum alone.
    fn unfinished(mut packet: Vec<u8>) -> Vec<u8> {
        let layout = layout(&packet).unwrap();
        let at = layout.l4 + if layout.proto == TCP { 16 } else { 6 };
        let pseudo = fold(pseudo_header_sum(&packet, layout.proto, layout.l4));
        packet[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        packet
    }

    #[test]
    fn a_reset_is_one_the_sender_takes() {
        let tcp = |packet: &[u8]| match SlicedPacket::from_ip(packet).unwrap().transport {
            Some(TransportSlice::Tcp(tcp)) => tcp.to_header(),
            _ => panic!("not TCP"),
        };
        // A SYN: sequence zero, acknowledging the SYN (a connect() refused).
        let mut syn = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
            .tcp(40000, 80, 1000, 64000)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let mut out = Vec::new();
        assert!(reset_reply(&syn, &mut out));
        let rst = tcp(&out);
        assert!(rst.rst && rst.ack && !rst.syn);
        assert_eq!((rst.sequence_number, rst.acknowledgment_number), (0, 1001));
        assert_eq!((rst.source_port, rst.destination_port), (80, 40000));
        // A segment of a connection: the sequence its sender expects.
        let mut data = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
            .tcp(40000, 80, 1000, 64000)
            .ack(777)
            .write(&mut data, b"hello")
            .unwrap();
        assert!(reset_reply(&data, &mut out));
        let rst = tcp(&out);
        assert!(rst.rst && !rst.ack);
        assert_eq!(rst.sequence_number, 777);
        // A reset is never answered.
        let reset = out.clone();
        assert!(!reset_reply(&reset, &mut out));
    }

    #[test]
    fn an_unfinished_checksum_is_finished_and_a_finished_one_left_alone() {
        let mut tcp4 = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
            .tcp(40000, 80, 1, 64000)
            .write(&mut tcp4, b"an odd-length payload")
            .unwrap();
        let mut udp6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64)
            .udp(5353, 53)
            .write(&mut udp6, b"question")
            .unwrap();
        for finished in [tcp4, udp6] {
            let mut packet = unfinished(finished.clone());
            assert_ne!(packet, finished);
            assert!(finish_checksum(&mut packet));
            assert_eq!(packet, finished, "finished as the sender's device would");
            assert_checksums_valid(&packet);
            let mut again = finished.clone();
            assert!(!finish_checksum(&mut again), "a finished checksum is left alone");
            assert_eq!(again, finished);
        }
        // An IPv4 datagram without a checksum keeps none.
        let mut bare = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
            .udp(1, 2)
            .write(&mut bare, b"x")
            .unwrap();
        bare[26..28].copy_from_slice(&[0, 0]);
        let before = bare.clone();
        assert!(!finish_checksum(&mut bare));
        assert_eq!(bare, before);
    }

    /// Every checksum of the packet, recomputed from scratch, must equal
    /// what the packet carries.
    fn assert_checksums_valid(packet: &[u8]) {
        let sliced = SlicedPacket::from_ip(packet).expect("parses");
        if let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net {
            let header = ip.header().to_header();
            assert_eq!(
                header.header_checksum,
                header.calc_header_checksum(),
                "IPv4 header checksum"
            );
        }
        let (ip4, ip6) = match &sliced.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => (Some(ip.header().to_header()), None),
            Some(etherparse::NetSlice::Ipv6(ip)) => (None, Some(ip.header().to_header())),
            _ => panic!("not IP"),
        };
        match sliced.transport.expect("transport") {
            TransportSlice::Tcp(tcp) => {
                let header = tcp.to_header();
                let expected = match (&ip4, &ip6) {
                    (Some(ip), _) => header.calc_checksum_ipv4(ip, tcp.payload()).unwrap(),
                    (_, Some(ip)) => header.calc_checksum_ipv6(ip, tcp.payload()).unwrap(),
                    _ => unreachable!(),
                };
                assert_eq!(header.checksum, expected, "TCP checksum");
            }
            TransportSlice::Udp(udp) => {
                let header = udp.to_header();
                let expected = match (&ip4, &ip6) {
                    (Some(ip), _) => header.calc_checksum_ipv4(ip, udp.payload()).unwrap(),
                    (_, Some(ip)) => header.calc_checksum_ipv6(ip, udp.payload()).unwrap(),
                    _ => unreachable!(),
                };
                assert_eq!(header.checksum, expected, "UDP checksum");
            }
            TransportSlice::Icmpv4(icmp) => {
                let header = icmp.header();
                assert_eq!(
                    header.checksum,
                    header.icmp_type.calc_checksum(icmp.payload()),
                    "ICMP checksum"
                );
            }
            TransportSlice::Icmpv6(icmp) => {
                let header = icmp.header();
                let ip = ip6.unwrap();
                let expected = header
                    .icmp_type
                    .calc_checksum(ip.source, ip.destination, icmp.payload())
                    .unwrap();
                assert_eq!(header.checksum, expected, "ICMPv6 checksum");
            }
            other => panic!("unexpected transport {other:?}"),
        }
    }

    /// Serialises a packet builder with its payload.
    macro_rules! build {
        ($builder:expr, $payload:expr) => {{
            let mut out = Vec::new();
            $builder.write(&mut out, $payload).unwrap();
            out
        }};
    }

    #[test]
    fn address_rewrites_keep_ports_and_checksums() {
        let mut tcp = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [198, 18, 0, 7], 64).tcp(40000, 443, 1, 1000),
            b"hello"
        );
        rewrite_address(&mut tcp, End::Destination, "192.0.2.10".parse().unwrap()).unwrap();
        assert_eq!(ports(&tcp), Some((40000, 443)));
        assert_eq!(
            addresses(&tcp).unwrap().1,
            "192.0.2.10".parse::<IpAddr>().unwrap()
        );
        assert_checksums_valid(&tcp);
        let mut udp6 = build!(
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(5353, 53),
            b"query"
        );
        rewrite_address(&mut udp6, End::Source, "2001:db8::5".parse().unwrap()).unwrap();
        assert_eq!(ports(&udp6), Some((5353, 53)));
        assert_checksums_valid(&udp6);
    }

    #[test]
    fn a_dead_destination_draws_an_unreachable_error_quoting_the_packet() {
        let syn = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [198, 19, 255, 254], 64).tcp(40000, 80, 1, 1000),
            &[0u8; 100]
        );
        let mut reply = Vec::new();
        assert!(unreachable_reply(&syn, &mut reply));
        let (src, dst) = addresses(&reply).unwrap();
        assert_eq!(src, "198.19.255.254".parse::<IpAddr>().unwrap());
        assert_eq!(dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_checksums_valid(&reply);
        let sliced = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("not ICMP")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 1));
        // The IP header and the first 8 bytes of TCP: what the stack needs
        // to find the connection.
        assert_eq!(icmp.payload(), &syn[..28]);

        let syn6 = build!(
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).tcp(40000, 80, 1, 1000),
            &[0u8; 2000]
        );
        let mut reply6 = vec![0xaa; 3000];
        assert!(unreachable_reply(&syn6, &mut reply6));
        assert!(reply6.len() <= 1280);
        assert_checksums_valid(&reply6);
        assert!(!unreachable_reply(&[0x45, 0], &mut reply6));
    }

    #[test]
    fn an_error_about_a_translated_flow_is_translated_with_it() {
        let fake: IpAddr = "198.18.0.7".parse().unwrap();
        let real: IpAddr = "203.0.113.9".parse().unwrap();
        let host: IpAddr = "10.0.0.2".parse().unwrap();
        // A router's "fragmentation needed" about a segment that left with
        // the real address: the application must see the fake one quoted.
        let segment = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [203, 0, 113, 9], 64).tcp(40000, 443, 1, 1000),
            &[7u8; 1400]
        );
        let mut error = Vec::new();
        assert!(too_big_reply(&segment, 1400, &mut error));
        // From a router on the way, not from the real host.
        error[12..16].copy_from_slice(&[192, 0, 2, 254]);
        refresh_ipv4_header_checksum(&mut error);
        rewrite_error_about(&mut error, End::Destination, fake).unwrap();
        assert_checksums_valid(&error);
        let quote = icmp_error_quote(&error).unwrap();
        assert_eq!(addresses(&error[quote..]).unwrap(), (host, fake));
        assert_eq!(
            addresses(&error).unwrap().0,
            "192.0.2.254".parse::<IpAddr>().unwrap()
        );
        // The quoted header's own checksum is right again.
        let quoted = &error[quote..quote + 20];
        assert_eq!(ones_complement(quoted), 0xffff);

        // This host's port unreachable, sent to the fake address about the
        // datagram that came from it: both become the real address.
        let datagram = build!(
            PacketBuilder::ipv4([198, 18, 0, 7], [10, 0, 0, 2], 64).udp(53, 40000),
            &[7u8; 40]
        );
        let mut unreachable = Vec::new();
        assert!(unreachable_reply(&datagram, &mut unreachable));
        unreachable[12..16].copy_from_slice(&[10, 0, 0, 2]);
        unreachable[16..20].copy_from_slice(&[198, 18, 0, 7]);
        refresh_ipv4_header_checksum(&mut unreachable);
        rewrite_error_about(&mut unreachable, End::Source, real).unwrap();
        assert_checksums_valid(&unreachable);
        assert_eq!(addresses(&unreachable).unwrap(), (host, real));
        let quote = icmp_error_quote(&unreachable).unwrap();
        assert_eq!(addresses(&unreachable[quote..]).unwrap(), (real, host));

        // IPv6: the checksum covers the quoted address.
        let real6: IpAddr = "2001:db8::9".parse().unwrap();
        let fake6: IpAddr = "fd4f:4153:4953::7".parse().unwrap();
        let segment6 = build!(
            PacketBuilder::ipv6([0xfd; 16], real6_octets(real6), 64).tcp(40000, 443, 1, 1000),
            &[7u8; 1400]
        );
        let mut error6 = Vec::new();
        assert!(too_big_reply(&segment6, 1280, &mut error6));
        rewrite_error_about(&mut error6, End::Destination, fake6).unwrap();
        assert_checksums_valid(&error6);
        // It came from the real host itself: its source is translated too.
        assert_eq!(addresses(&error6).unwrap().0, fake6);
        assert!(rewrite_error_about(&mut segment6.clone(), End::Destination, fake6).is_err());
    }

    fn real6_octets(addr: IpAddr) -> [u8; 16] {
        match addr {
            IpAddr::V6(v6) => v6.octets(),
            IpAddr::V4(_) => unreachable!(),
        }
    }

    fn ones_complement(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn refresh_ipv4_header_checksum(packet: &mut [u8]) {
        packet[10..12].copy_from_slice(&[0, 0]);
        let sum = !ones_complement(&packet[..20]);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn a_packet_too_big_for_the_next_link_draws_its_mtu() {
        let mut big = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).udp(40000, 443),
            &[7u8; 1400]
        );
        // etherparse sets DF, as most stacks do.
        assert!(must_not_fragment(&big));
        big[6] &= !0x40;
        assert!(!must_not_fragment(&big));
        big[6] |= 0x40;
        let mut reply = Vec::new();
        assert!(too_big_reply(&big, 1252, &mut reply));
        assert_checksums_valid(&reply);
        assert_eq!(
            addresses(&reply).unwrap(),
            ("192.0.2.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
        );
        let sliced = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("not ICMP")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 4));
        // The next-hop MTU sits in the header's last two bytes.
        assert_eq!(&icmp.slice()[6..8], &1252u16.to_be_bytes());
        assert_eq!(icmp.payload(), &big[..28]);
        let mut reply = Vec::new();

        let big6 = build!(
            PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(40000, 443),
            &[7u8; 1400]
        );
        assert!(must_not_fragment(&big6));
        assert!(too_big_reply(&big6, 1280, &mut reply));
        assert!(reply.len() <= 1280);
        assert_checksums_valid(&reply);
        let sliced = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv6(icmp)) = sliced.transport else {
            panic!("not ICMPv6")
        };
        assert_eq!(icmp.type_u8(), 2);
        assert_eq!(&icmp.slice()[4..8], &1280u32.to_be_bytes());
        assert!(!too_big_reply(&[0x45, 0], 1280, &mut Vec::new()));
    }

    #[test]
    fn nat_rewrites_keep_every_checksum_valid() {
        let payload = b"some payload of odd length!";
        let packets = vec![
            build!(
                PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).tcp(40000, 80, 7, 1000),
                payload
            ),
            build!(
                PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).udp(40000, 53),
                payload
            ),
            build!(
                PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).icmpv4_echo_request(77, 1),
                payload
            ),
            build!(
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64).tcp(40000, 443, 7, 1000),
                payload
            ),
            build!(
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64).udp(40000, 53),
                payload
            ),
            build!(
                PacketBuilder::ipv6([0xfd; 16], [0x20; 16], 64).icmpv6_echo_request(77, 1),
                payload
            ),
        ];
        for original in packets {
            assert_checksums_valid(&original);
            let v4 = original[0] >> 4 == 4;
            let (new_src, new_dst): (IpAddr, IpAddr) = if v4 {
                ("203.0.113.9".parse().unwrap(), "198.51.100.3".parse().unwrap())
            } else {
                ("2001:db8::9".parse().unwrap(), "2001:db8:1::3".parse().unwrap())
            };
            let mut packet = original.clone();
            rewrite(&mut packet, End::Source, new_src, 45001).unwrap();
            assert_checksums_valid(&packet);
            assert_eq!(addresses(&packet).unwrap().0, new_src);
            rewrite(&mut packet, End::Destination, new_dst, 61000).unwrap();
            assert_checksums_valid(&packet);
            assert_eq!(addresses(&packet).unwrap().1, new_dst);
        }
    }

    #[test]
    fn echo_identifier_is_the_icmp_port() {
        let mut packet = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).icmpv4_echo_request(77, 1),
            b"x"
        );
        assert_eq!(echo_id(&packet), Some((true, 77)));
        rewrite(&mut packet, End::Source, "203.0.113.9".parse().unwrap(), 45001).unwrap();
        assert_eq!(echo_id(&packet), Some((true, 45001)));
    }

    #[test]
    fn refuses_what_it_cannot_rewrite() {
        let mut v4 = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).udp(1, 2),
            b"x"
        );
        assert_eq!(
            rewrite(&mut v4, End::Source, "::1".parse().unwrap(), 1),
            Err(PacketError::FamilyMismatch)
        );
        v4[9] = 47;
        assert_eq!(
            rewrite(&mut v4, End::Source, "10.0.0.1".parse().unwrap(), 1),
            Err(PacketError::Unsupported(47))
        );
        assert_eq!(
            rewrite(&mut [0x45, 0, 0], End::Source, "10.0.0.1".parse().unwrap(), 1),
            Err(PacketError::Truncated)
        );
        assert_eq!(
            rewrite(&mut [], End::Source, "10.0.0.1".parse().unwrap(), 1),
            Err(PacketError::NotIp)
        );
    }

    #[test]
    fn mss_of_a_syn_is_clamped_once() {
        let builder = PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64)
            .tcp(40000, 80, 7, 64000)
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .unwrap();
        let mut packet = build!(builder, b"");
        assert!(clamp_mss(&mut packet, 1400));
        assert_checksums_valid(&packet);
        let mss = {
            let sliced = SlicedPacket::from_ip(&packet).unwrap();
            let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
                panic!()
            };
            tcp.options_iterator().find_map(|o| match o.unwrap() {
                TcpOptionElement::MaximumSegmentSize(m) => Some(m),
                _ => None,
            })
        };
        assert_eq!(mss, Some(1400));
        assert!(!clamp_mss(&mut packet, 1400), "already small enough");
        let mut data = build!(
            PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 1], 64).tcp(1, 2, 3, 4),
            b"x"
        );
        assert!(!clamp_mss(&mut data, 500), "not a SYN");
    }

    /// Splits an IPv4 packet into two fragments at `at` bytes of payload
    /// (a multiple of 8).
    fn split_v4(packet: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
        let (header, payload) = packet.split_at(20);
        let piece = |data: &[u8], offset: usize, more: bool| {
            let mut out = header.to_vec();
            out[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            out[6..8].copy_from_slice(&field.to_be_bytes());
            out[10..12].copy_from_slice(&[0, 0]);
            let sum = etherparse::Ipv4Header::from_slice(&out)
                .unwrap()
                .0
                .calc_header_checksum();
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(data);
            out
        };
        (piece(&payload[..at], 0, true), piece(&payload[at..], at, false))
    }

    #[test]
    fn fragments_are_rewritten_so_the_datagram_stays_whole() {
        let mut whole = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [192, 0, 2, 9], 64)
            .udp(40000, 9000)
            .write(&mut whole, &[0x5a; 3000])
            .unwrap();
        set_fragment_id(&mut whole, 0x1234);
        let (mut first, mut rest) = split_v4(&whole, 1480);
        assert_eq!(
            fragment(&first),
            Some(Fragment {
                id: 0x1234,
                first: true,
                proto: UDP
            })
        );
        assert_eq!(
            fragment(&rest),
            Some(Fragment {
                id: 0x1234,
                first: false,
                proto: UDP
            })
        );
        assert_eq!(fragment(&whole), None);
        assert_eq!(
            ports(&first),
            Some((40000, 9000)),
            "a first fragment has its ports"
        );
        assert!(ports(&rest).is_none());
        // A NAT: the first fragment gets a new source and port, the rest
        // the new source only, and a new identification for all.
        let public: IpAddr = "203.0.113.1".parse().unwrap();
        rewrite(&mut first, End::Source, public, 61000).unwrap();
        rewrite_ip_address(&mut rest, End::Source, public).unwrap();
        set_fragment_id(&mut first, 7);
        set_fragment_id(&mut rest, 7);
        for piece in [&first, &rest] {
            let header = etherparse::Ipv4Header::from_slice(piece).unwrap().0;
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            assert_eq!(header.identification, 7);
        }
        // Reassembled, the UDP checksum holds.
        let mut datagram = first[..20].to_vec();
        datagram[6..8].copy_from_slice(&[0, 0]);
        datagram.extend_from_slice(&first[20..]);
        datagram.extend_from_slice(&rest[20..]);
        let len = datagram.len() as u16;
        datagram[2..4].copy_from_slice(&len.to_be_bytes());
        datagram[10..12].copy_from_slice(&[0, 0]);
        let sum = etherparse::Ipv4Header::from_slice(&datagram)
            .unwrap()
            .0
            .calc_header_checksum();
        datagram[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_checksums_valid(&datagram);
        assert_eq!(addresses(&datagram).unwrap().0, public);
    }
}
