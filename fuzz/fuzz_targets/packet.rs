//! The packet reader and rewriter (`oasis-io`) on arbitrary bytes: nothing
//! panics, and a rewrite of a packet etherparse finds whole and valid
//! leaves its checksums valid.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use oasis_io::packet::{
    End, addresses, clamp_mss, echo_id, fragment, icmp_error_quote, layout, ports, reset_reply, rewrite,
    rewrite_ip_address, tcp_closing, unreachable_reply,
};

/// Whether every checksum etherparse can check holds (None: nothing to
/// check, e.g. a fragment or a protocol it does not slice).
fn checksums_valid(packet: &[u8]) -> Option<bool> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    match sliced.net? {
        NetSlice::Ipv4(ip) => {
            let header = ip.header().to_header();
            if header.header_checksum != header.calc_header_checksum() {
                return Some(false);
            }
            if ip.payload().fragmented {
                return None;
            }
            match sliced.transport? {
                TransportSlice::Udp(udp) => {
                    let h = udp.to_header();
                    Some(h.checksum == 0 || h.calc_checksum_ipv4(&header, udp.payload()).ok()? == h.checksum)
                }
                TransportSlice::Tcp(tcp) => {
                    let h = tcp.to_header();
                    Some(h.calc_checksum_ipv4(&header, tcp.payload()).ok()? == h.checksum)
                }
                _ => None,
            }
        }
        NetSlice::Ipv6(ip) => {
            let header = ip.header().to_header();
            if ip.payload().fragmented {
                return None;
            }
            match sliced.transport? {
                TransportSlice::Udp(udp) => {
                    let h = udp.to_header();
                    Some(h.calc_checksum_ipv6(&header, udp.payload()).ok()? == h.checksum)
                }
                TransportSlice::Tcp(tcp) => {
                    let h = tcp.to_header();
                    Some(h.calc_checksum_ipv6(&header, tcp.payload()).ok()? == h.checksum)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = (layout(data), ports(data), addresses(data), fragment(data), echo_id(data));
    let _ = (icmp_error_quote(data), tcp_closing(data));
    let mut out = Vec::new();
    let _ = reset_reply(data, &mut out);
    let _ = unreachable_reply(data, &mut out);

    let valid = checksums_valid(data) == Some(true);
    let v6 = data.first().is_some_and(|b| b >> 4 == 6);
    let addr: IpAddr = if v6 { "2001:db8::77".parse().unwrap() } else { "203.0.113.77".parse().unwrap() };
    for end in [End::Source, End::Destination] {
        let mut packet = data.to_vec();
        if rewrite(&mut packet, end, addr, 4242).is_ok() && valid {
            assert_eq!(checksums_valid(&packet), Some(true), "rewrite broke a checksum");
        }
        let mut packet = data.to_vec();
        let _ = rewrite_ip_address(&mut packet, end, addr);
    }
    let mut packet = data.to_vec();
    clamp_mss(&mut packet, 1200);
    if valid {
        assert_eq!(checksums_valid(&packet), Some(true), "clamping broke a checksum");
    }
});
