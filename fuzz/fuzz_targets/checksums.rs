//! Shared by the packet and exit targets.

/// Whether every checksum etherparse can check holds (None: nothing to
/// check, e.g. a fragment or a protocol it does not slice).
pub fn checksums_valid(packet: &[u8]) -> Option<bool> {
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
