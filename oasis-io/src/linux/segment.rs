//! Cutting a TCP packet larger than the path into segments that fit, with
//! every checksum computed: what a NIC's segmentation offload does, for the
//! one place a packet that large reaches user space. A client's kernel
//! wraps a GSO packet whole (each segment the device cuts gets the outer
//! headers); over a veth to an exit node on the same host nothing cuts it,
//! and the kernel hands a tunnel's GSO packet to a UDP socket whole, so the
//! exit's process reads one datagram holding a TCP packet of several
//! segments. tun-rs's GSO split does the cutting (sequence numbers, IP
//! lengths and IDs, flags, checksums).

use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VirtioNetHdr, gso_split};

use oasis_common::proto::TCP;

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// At most this many segments from one packet (64 KB of 1,280-byte ones).
const MAX_SEGMENTS: usize = 64;

/// Cuts `packet` (IPv4 or IPv6 TCP, longer than `max_len`) into segments of
/// at most `max_len` bytes, appended to `out` (buffers taken from `spare`
/// first). False, with nothing appended, for a packet that is not such a
/// TCP packet or cannot be cut. It allocates the list of its buffers: it
/// runs only for the rare packet a same-host veth delivered whole.
pub fn cut_tcp(packet: &mut [u8], max_len: usize, spare: &mut Vec<Vec<u8>>, out: &mut Vec<Vec<u8>>) -> bool {
    let Ok(layout) = crate::packet::layout(packet) else {
        return false;
    };
    let tcp = layout.l4;
    if layout.proto != TCP || packet.len() <= max_len || packet.len() < tcp + 20 {
        return false;
    }
    let headers = tcp + usize::from(packet[tcp + 12] >> 4) * 4;
    if headers >= max_len || headers > packet.len() {
        return false;
    }
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: if layout.version == 6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        },
        hdr_len: headers as u16,
        gso_size: (max_len - headers) as u16,
        csum_start: tcp as u16,
        csum_offset: 16,
    };
    let count = (packet.len() - headers).div_ceil(max_len - headers);
    if count > MAX_SEGMENTS {
        return false;
    }
    let mut buffers: Vec<Vec<u8>> = (0..count)
        .map(|_| {
            let mut buffer = spare.pop().unwrap_or_default();
            buffer.clear();
            buffer.resize(max_len, 0);
            buffer
        })
        .collect();
    let mut sizes = [0usize; MAX_SEGMENTS];
    match gso_split(packet, hdr, &mut buffers, &mut sizes, 0, layout.version == 6) {
        Ok(made) => {
            for (i, mut buffer) in buffers.into_iter().enumerate() {
                if i < made {
                    buffer.truncate(sizes[i]);
                    out.push(buffer);
                } else {
                    spare.push(buffer);
                }
            }
            true
        }
        Err(_) => {
            spare.append(&mut buffers);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    #[test]
    fn a_large_segment_is_cut_into_valid_ones_that_carry_its_bytes() {
        let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mut big = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 7], 64)
            .tcp(40000, 80, 1000, 64000)
            .ack(5)
            .psh()
            .write(&mut big, &payload)
            .unwrap();
        let (mut spare, mut out) = (Vec::new(), Vec::new());
        assert!(cut_tcp(&mut big, 1500, &mut spare, &mut out));
        assert_eq!(out.len(), 3);
        let mut carried = Vec::new();
        let mut seq = 1000;
        for (i, segment) in out.iter().enumerate() {
            assert!(segment.len() <= 1500);
            let sliced = SlicedPacket::from_ip(segment).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
                panic!("IPv4")
            };
            let header = ip.header().to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
                panic!("TCP")
            };
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "segment {i}");
            assert_eq!(tcp.sequence_number(), seq);
            assert_eq!(tcp.psh(), i == out.len() - 1, "PSH on the last only");
            seq += tcp.payload().len() as u32;
            carried.extend_from_slice(tcp.payload());
        }
        assert_eq!(carried, payload);
        // What fits, or is no TCP, is left alone.
        let mut small = out[0].clone();
        assert!(!cut_tcp(&mut small, 1500, &mut spare, &mut out));
        assert_eq!(out.len(), 3);
    }
}
