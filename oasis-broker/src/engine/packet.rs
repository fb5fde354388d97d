//! What the engine reads from a diverted packet: its 5-tuple, the same key
//! the classifier builds in the kernel. An ICMP echo is keyed by its
//! identifier (in both ports), so each ping session is a flow of its own;
//! an ICMP error by the packet it quotes, swapped, so it is a packet of
//! that packet's flow, in its own direction.

use std::net::IpAddr;

use oasis_common::{FAMILY_V4, FAMILY_V6, FlowKey, FragKey, carries_ports, proto};
use oasis_io::packet::{
    Fragment, Layout, PacketError, addresses, echo_id, fragment, icmp_error_quote, icmp_error_quote_in,
    layout,
};

/// The 5-tuple of a raw IP packet, as the classifier builds it: a first
/// fragment has its ports, a later one none (and, for IPv6, the protocol
/// its fragment header names).
pub fn flow_key(packet: &[u8]) -> Option<FlowKey> {
    let at = layout(packet);
    let quote = at.as_ref().ok().and_then(|at| icmp_error_quote_in(packet, at));
    key_of(packet, &at, quote)
}

/// The key of `packet` (laid out as `at`), an ICMP error quoting a packet
/// at `quote` or not.
fn key_of(packet: &[u8], at: &Result<Layout, PacketError>, quote: Option<usize>) -> Option<FlowKey> {
    if let Some(quote) = quote {
        let quoted = plain_key(&packet[quote..])?;
        let outer = plain_key_in(packet, at)?;
        return (quoted.family == outer.family).then(|| quoted.reversed());
    }
    plain_key_in(packet, at)
}

/// Whether a packet is an ICMP error quoting another (whose flow
/// [`flow_key`] gives it).
pub fn is_icmp_error(packet: &[u8]) -> bool {
    icmp_error_quote(packet).is_some()
}

fn plain_key(packet: &[u8]) -> Option<FlowKey> {
    plain_key_in(packet, &layout(packet))
}

fn plain_key_in(packet: &[u8], at: &Result<Layout, PacketError>) -> Option<FlowKey> {
    let (src, dst) = addresses(packet)?;
    let mut key = FlowKey::default();
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            key.family = FAMILY_V4;
            key.src[..4].copy_from_slice(&src.octets());
            key.dst[..4].copy_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            key.family = FAMILY_V6;
            key.src = src.octets();
            key.dst = dst.octets();
        }
        _ => return None,
    }
    match *at {
        Ok(layout) => {
            key.proto = layout.proto;
            if carries_ports(layout.proto) {
                let ports = packet.get(layout.l4..layout.l4 + 4)?;
                key.sport = u16::from_be_bytes([ports[0], ports[1]]);
                key.dport = u16::from_be_bytes([ports[2], ports[3]]);
            } else if let Some((_, id)) = echo_id(packet) {
                key.sport = id;
                key.dport = id;
            }
        }
        Err(PacketError::Fragment) => key.proto = fragment(packet)?.proto,
        Err(_) => return None,
    }
    Some(key)
}

/// What the engine reads of a diverted packet, parsed once on its way in:
/// its flow, whether it is a fragment or an ICMP error, its TCP flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    /// Its flow (see [`flow_key`]).
    pub key: FlowKey,
    pub fragment: Option<Fragment>,
    /// An ICMP error, about a packet of the flow `key`.
    pub icmp_error: bool,
    /// Its TCP flags; 0 for anything else, and for a later fragment.
    pub tcp_flags: u8,
    /// It has ports (or an echo identifier) to be translated by: TCP, UDP
    /// and ICMP echo, whole or a first fragment.
    pub ported: bool,
}

impl Headers {
    pub fn parse(packet: &[u8]) -> Option<Headers> {
        let at = layout(packet);
        let quote = at.as_ref().ok().and_then(|at| icmp_error_quote_in(packet, at));
        let key = key_of(packet, &at, quote)?;
        let (tcp_flags, ported) = match at {
            Ok(at) if at.proto == proto::TCP => (
                packet.get(at.l4 + 13).copied().unwrap_or(0),
                packet.len() >= at.l4 + 4,
            ),
            Ok(at) if at.proto == proto::UDP => (0, packet.len() >= at.l4 + 4),
            Ok(at) if matches!(at.proto, proto::ICMP | proto::ICMPV6) => (0, echo_id(packet).is_some()),
            _ => (0, false),
        };
        Some(Headers {
            key,
            fragment: fragment(packet),
            icmp_error: quote.is_some(),
            tcp_flags,
            ported,
        })
    }

    /// A TCP SYN (with or without ACK): it carries an MSS.
    pub fn syn(&self) -> bool {
        self.tcp_flags & 0x02 != 0
    }

    /// A TCP FIN or RST: its connection is ending.
    pub fn closing(&self) -> bool {
        self.key.proto == proto::TCP && self.tcp_flags & 0x05 != 0
    }
}

/// How the later fragments of a datagram are known (see `FragKey`).
pub fn frag_key(key: &FlowKey, fragment: &Fragment) -> FragKey {
    FragKey {
        src: key.src,
        dst: key.dst,
        id: fragment.id,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// The destination address of a flow key.
pub fn flow_dst(key: &FlowKey) -> IpAddr {
    key.dst_ip()
}

/// The source address of a flow key.
pub fn flow_src(key: &FlowKey) -> IpAddr {
    key.src_ip()
}

/// Whether the broker can carry this packet at all: what belongs to one
/// link or to this host (see `FlowKey::link_scoped`, the classifier's own
/// test) only makes sense on that link, which no carrier can reach.
pub fn routable(key: &FlowKey, packet: &[u8]) -> bool {
    let ndp = key.family == FAMILY_V6
        && key.proto == proto::ICMPV6
        && packet
            .get(40)
            .is_some_and(|t| oasis_common::icmpv6_link_message(*t));
    !(key.link_scoped() || ndp)
}

/// `tcp 10.0.0.2:40000 -> 192.0.2.1:80`, for logs and `oasis flows`.
pub fn describe(key: &FlowKey) -> String {
    let proto = match key.proto {
        proto::TCP => "tcp".to_string(),
        proto::UDP => "udp".to_string(),
        proto::ICMP => "icmp".to_string(),
        proto::ICMPV6 => "icmpv6".to_string(),
        n => format!("proto {n}"),
    };
    let end = |addr: IpAddr, port: u16| match (addr, port) {
        (addr, 0) => addr.to_string(),
        (IpAddr::V6(v6), port) => format!("[{v6}]:{port}"),
        (addr, port) => format!("{addr}:{port}"),
    };
    format!(
        "{proto} {} -> {}",
        end(flow_src(key), key.sport),
        end(flow_dst(key), key.dport)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    pub(crate) fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 64000);
        let builder = if syn { builder.syn() } else { builder.ack(1) };
        let mut out = Vec::new();
        builder.write(&mut out, b"hello").unwrap();
        out
    }

    #[test]
    fn keys_from_v4_and_v6_packets() {
        let key = flow_key(&tcp4([10, 0, 0, 1], [203, 0, 113, 9], 40000, 8080, false)).unwrap();
        assert_eq!(
            (key.family, key.proto, key.sport, key.dport),
            (FAMILY_V4, 6, 40000, 8080)
        );
        assert_eq!(&key.dst[..4], &[203, 0, 113, 9]);
        assert!(key.dst[4..].iter().all(|b| *b == 0));
        assert_eq!(describe(&key), "tcp 10.0.0.1:40000 -> 203.0.113.9:8080");

        let mut v6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(5353, 53)
            .write(&mut v6, b"q")
            .unwrap();
        let key = flow_key(&v6).unwrap();
        assert_eq!(
            (key.family, key.proto, key.sport, key.dport, key.dst),
            (FAMILY_V6, 17, 5353, 53, [0xfe; 16])
        );
        assert!(flow_key(b"\x45garbage").is_none());
    }

    #[test]
    fn headers_are_read_once_as_the_single_readers_read_them() {
        let syn = tcp4([10, 0, 0, 1], [203, 0, 113, 9], 40000, 443, true);
        let headers = Headers::parse(&syn).unwrap();
        assert_eq!(headers.key, flow_key(&syn).unwrap());
        assert!(headers.syn() && !headers.closing() && headers.ported && !headers.icmp_error);
        assert_eq!(headers.fragment, None);

        let mut fin = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 9], 64)
            .tcp(40000, 443, 9, 100)
            .fin()
            .ack(1)
            .write(&mut fin, b"")
            .unwrap();
        let headers = Headers::parse(&fin).unwrap();
        assert!(headers.closing() && !headers.syn());
        assert_eq!(headers.closing(), oasis_io::packet::tcp_closing(&fin));

        let mut echo = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 9], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        let headers = Headers::parse(&echo).unwrap();
        assert!(headers.ported && headers.tcp_flags == 0);
        assert_eq!(headers.ported, oasis_io::packet::ports(&echo).is_some());

        // A later fragment: no ports, no flags, the datagram's fragment.
        let mut later = tcp4([10, 0, 0, 1], [203, 0, 113, 9], 40000, 443, true);
        later[6..8].copy_from_slice(&0x00b9u16.to_be_bytes());
        let headers = Headers::parse(&later).unwrap();
        assert!(!headers.ported && !headers.syn());
        assert_eq!(headers.fragment, oasis_io::packet::fragment(&later));
        assert!(headers.fragment.is_some_and(|f| !f.first));
        assert_eq!(headers.key, flow_key(&later).unwrap());

        // An ICMP error is a packet of the flow it quotes, reversed.
        let mut error = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 9], [10, 0, 0, 1], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut error, &syn)
            .unwrap();
        let headers = Headers::parse(&error).unwrap();
        assert!(headers.icmp_error && !headers.ported);
        assert_eq!(headers.key, flow_key(&error).unwrap());
        assert_eq!(headers.key, flow_key(&syn).unwrap().reversed());
        assert!(Headers::parse(b"\x45garbage").is_none());
    }

    #[test]
    fn link_local_and_multicast_are_not_routable() {
        let mut rs = Vec::new();
        let src = "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let dst = "ff02::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        PacketBuilder::ipv6(src, dst, 255)
            .icmpv6_echo_request(1, 1)
            .write(&mut rs, b"")
            .unwrap();
        assert!(!routable(&flow_key(&rs).unwrap(), &rs));
        let tcp = tcp4([10, 0, 0, 1], [203, 0, 113, 9], 1, 80, true);
        assert!(routable(&flow_key(&tcp).unwrap(), &tcp));
        // Neighbour solicitation between global addresses (unicast NUD).
        let mut ns = Vec::new();
        let a = "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let b = "2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        PacketBuilder::ipv6(a, b, 255)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: 135,
                code_u8: 0,
                bytes5to8: [0; 4],
            })
            .write(&mut ns, &[0; 16])
            .unwrap();
        assert!(!routable(&flow_key(&ns).unwrap(), &ns));
        let mut mdns = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [224, 0, 0, 251], 1)
            .udp(5353, 5353)
            .write(&mut mdns, b"")
            .unwrap();
        assert!(!routable(&flow_key(&mdns).unwrap(), &mdns));
    }
}
