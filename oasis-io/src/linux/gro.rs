//! Receive offload for packets written into a TUN device with virtio-net
//! headers: consecutive TCP segments of one flow in a batch are written as
//! one large packet whose header tells the kernel it is a GSO burst, so the
//! host's stack takes it up in one pass instead of one per segment.
//!
//! tun-rs does this in `send_multiple`, but copies every packet it looks at
//! into a fresh vector, an allocation per packet that the packet path must
//! not make; this coalescer works in the caller's buffers and in merge
//! buffers of its own that it keeps between batches. It follows the rules
//! of wireguard-go's TCP GRO, which the kernel's own GRO also keeps: same
//! addresses, ports, ACK, options and IP fields; contiguous sequence
//! numbers; equal segment sizes but a shorter last one; PSH only at the end;
//! every checksum verified before a segment joins (the kernel will not check
//! a merged packet's checksum again).

use tun_rs::{
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN, VirtioNetHdr, checksum,
};

const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
use oasis_common::proto::TCP;
const FLAG_PSH: u8 = 0x08;
const FLAG_ACK: u8 = 0x10;
/// The largest packet a merge may make (the IP total length field).
const MAX_MERGED: usize = 65_535;
/// Flows a batch tracks at once; a packet of another flow is written alone.
const OPEN_FLOWS: usize = 8;

/// Where each packet of a TCP segment's headers is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    v6: bool,
    iph_len: usize,
    tcph_len: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

/// A TCP segment that may join others: ACK, optionally PSH, nothing else,
/// with data, not fragmented, no IPv4 options, no IPv6 extension headers.
fn segment(packet: &[u8]) -> Option<Segment> {
    let (v6, iph_len, total) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let fragmented = packet
                .get(6..8)
                .is_none_or(|f| u16::from_be_bytes([f[0], f[1]]) & 0x3fff != 0);
            if ihl != 20 || packet.len() < 20 || packet[9] != TCP || fragmented {
                return None;
            }
            (false, 20, usize::from(u16::from_be_bytes([packet[2], packet[3]])))
        }
        6 => {
            if packet.len() < 40 || packet[6] != TCP {
                return None;
            }
            (
                true,
                40,
                40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])),
            )
        }
        _ => return None,
    };
    if total != packet.len() || packet.len() < iph_len + 20 {
        return None;
    }
    let tcp = &packet[iph_len..];
    let tcph_len = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    if tcph_len < 20 || tcp.len() <= tcph_len || flags & !FLAG_PSH != FLAG_ACK {
        return None;
    }
    Some(Segment {
        v6,
        iph_len,
        tcph_len,
        payload: tcp.len() - tcph_len,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        psh: flags & FLAG_PSH != 0,
    })
}

/// Whether two segments belong to one flow and may share one burst: the
/// same addresses, ports and ACK, the same IP fields a burst carries once
/// (TOS, TTL, DF / traffic class, hop limit), the same TCP options.
fn same_burst(a: &[u8], sa: &Segment, b: &[u8], sb: &Segment) -> bool {
    if sa.v6 != sb.v6 || sa.tcph_len != sb.tcph_len {
        return false;
    }
    let ip_same = if sa.v6 {
        // version, traffic class, flow label; hop limit; addresses
        a[..4] == b[..4] && a[7] == b[7] && a[8..40] == b[8..40]
    } else {
        // TOS; DF; TTL; addresses
        a[1] == b[1] && a[6] & 0xe0 == b[6] & 0xe0 && a[8] == b[8] && a[12..20] == b[12..20]
    };
    let (ta, tb) = (&a[sa.iph_len..], &b[sb.iph_len..]);
    // ports and ACK; options
    ip_same && ta[..4] == tb[..4] && ta[8..12] == tb[8..12] && ta[20..sa.tcph_len] == tb[20..sb.tcph_len]
}

/// The sum of the TCP pseudo-header for a segment of `tcp_len` bytes.
fn pseudo_header(packet: &[u8], v6: bool, tcp_len: usize) -> u64 {
    let addrs = if v6 { &packet[8..40] } else { &packet[12..20] };
    let mut sum = tun_rs::checksum_no_fold(addrs, 0);
    if v6 {
        sum = tun_rs::checksum_no_fold(&(tcp_len as u32).to_be_bytes(), sum);
        sum = tun_rs::checksum_no_fold(&[0, 0, 0, TCP], sum);
    } else {
        let len = (tcp_len as u16).to_be_bytes();
        sum = tun_rs::checksum_no_fold(&[0, TCP, len[0], len[1]], sum);
    }
    sum
}

/// Whether a segment's TCP checksum (and IPv4 header checksum) is right.
fn checksums_valid(packet: &[u8], s: &Segment) -> bool {
    let tcp_len = packet.len() - s.iph_len;
    let ip_ok = s.v6 || checksum(&packet[..20], 0) == 0xffff;
    ip_ok && checksum(&packet[s.iph_len..], pseudo_header(packet, s.v6, tcp_len)) == 0xffff
}

/// A burst being built.
struct Open {
    /// The buffer its first segment is in.
    first: usize,
    head: Segment,
    /// The merge buffer holding it, once a second segment joined.
    merged: Option<usize>,
    next_seq: u32,
    /// A segment shorter than the first, or with PSH, ended it.
    closed: bool,
    psh: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            bursts: Vec::with_capacity(BATCH_ROOM),
            open: Vec::with_capacity(OPEN_FLOWS),
            merged: Vec::new(),
            writes: Vec::with_capacity(BATCH_ROOM),
        }
    }
}

/// What to write, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// A packet's own buffer, header and all.
    Packet(usize),
    /// A merge buffer.
    Merged(usize),
}

/// Packets a batch holds at most: 16 receive buffers of up to 64 coalesced
/// datagrams each.
const BATCH_ROOM: usize = 1024;

/// The coalescer: its merge buffers and bookkeeping last from batch to batch.
pub struct Coalescer {
    /// Every burst of the batch, in order of their first segment.
    bursts: Vec<Open>,
    /// The bursts still open to new segments (indexes into `bursts`).
    open: Vec<usize>,
    merged: Vec<Vec<u8>>,
    writes: Vec<Write>,
}

impl Coalescer {
    /// Coalesces `packets`, each a virtio-net header's room (
    /// [`VIRTIO_NET_HDR_LEN`]) then an IP packet, and returns what to
    /// write, in order, each with its header filled in.
    pub fn coalesce(&mut self, packets: &mut [Vec<u8>]) -> &[Write] {
        let h = VIRTIO_NET_HDR_LEN;
        self.bursts.clear();
        self.open.clear();
        self.writes.clear();
        let mut merges = 0;
        for index in 0..packets.len() {
            let packet = &packets[index][h..];
            let Some(seg) = segment(packet) else {
                self.writes.push(Write::Packet(index));
                continue;
            };
            let found = self.open.iter().position(|&b| {
                let burst = &self.bursts[b];
                same_burst(&packets[burst.first][h..], &burst.head, packet, &seg)
            });
            if let Some(at) = found {
                let burst = self.open[at];
                if self.join(burst, packets, index, &seg, &mut merges) {
                    if self.bursts[burst].closed {
                        self.open.remove(at);
                    }
                    continue;
                }
                // It could not join: the burst before it ends here.
                self.bursts[burst].closed = true;
                self.open.remove(at);
            }
            if self.open.len() == OPEN_FLOWS {
                let oldest = self.open.remove(0);
                self.bursts[oldest].closed = true;
            }
            self.bursts.push(Open {
                first: index,
                head: seg,
                merged: None,
                next_seq: seg.seq.wrapping_add(seg.payload as u32),
                closed: seg.psh,
                psh: seg.psh,
            });
            if !seg.psh {
                self.open.push(self.bursts.len() - 1);
            }
            // In the position of its first segment, merged or not.
            self.writes.push(Write::Packet(index));
        }
        // Packets written alone keep their own checksum: a header that asks
        // for nothing. Merged bursts get theirs now, and take the place of
        // their first segment.
        for write in self.writes.iter_mut() {
            if let Write::Packet(index) = *write {
                packets[index][..h].fill(0);
            }
        }
        let mut next_write = 0;
        for burst in &self.bursts {
            let Some(slot) = burst.merged else { continue };
            finish(&mut self.merged[slot], &burst.head, burst.psh);
            // Bursts and their writes are both in order of first segments.
            while self.writes[next_write] != Write::Packet(burst.first) {
                next_write += 1;
            }
            self.writes[next_write] = Write::Merged(slot);
        }
        &self.writes
    }

    /// Write `i` of the last batch.
    pub fn write(&self, i: usize) -> Write {
        self.writes[i]
    }

    /// Merge buffer `index` of the last batch, header and all.
    pub fn merged(&self, index: usize) -> &[u8] {
        &self.merged[index]
    }

    /// Appends segment `index` to burst `at` if the rules allow.
    fn join(
        &mut self,
        at: usize,
        packets: &[Vec<u8>],
        index: usize,
        seg: &Segment,
        merges: &mut usize,
    ) -> bool {
        let h = VIRTIO_NET_HDR_LEN;
        let open = &self.bursts[at];
        let size = open.head.payload;
        let current = match open.merged {
            Some(slot) => self.merged[slot].len() - h,
            None => packets[open.first].len() - h,
        };
        if seg.seq != open.next_seq || seg.payload > size || current + seg.payload > MAX_MERGED {
            return false;
        }
        let packet = &packets[index][h..];
        if !checksums_valid(packet, seg) {
            return false;
        }
        let slot = match open.merged {
            Some(slot) => slot,
            None => {
                // The first join: the head moves into a merge buffer.
                let head = &packets[open.first][h..];
                if !checksums_valid(head, &open.head) {
                    return false;
                }
                if self.merged.len() == *merges {
                    self.merged.push(Vec::with_capacity(h + MAX_MERGED));
                }
                let buffer = &mut self.merged[*merges];
                buffer.clear();
                buffer.resize(h, 0);
                buffer.extend_from_slice(head);
                *merges += 1;
                *merges - 1
            }
        };
        let offset = seg.iph_len + seg.tcph_len;
        self.merged[slot].extend_from_slice(&packet[offset..]);
        let open = &mut self.bursts[at];
        open.merged = Some(slot);
        open.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        open.psh |= seg.psh;
        open.closed = seg.psh || seg.payload < size;
        true
    }
}

/// Turns a merge buffer into one large packet: lengths, the IPv4 header
/// checksum, PSH, the TCP checksum left for the kernel to finish, and the
/// virtio-net header announcing a burst of `head.payload`-byte segments.
fn finish(buffer: &mut [u8], head: &Segment, psh: bool) {
    let h = VIRTIO_NET_HDR_LEN;
    let packet = &mut buffer[h..];
    let len = packet.len();
    if head.v6 {
        packet[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        packet[10..12].fill(0);
        let sum = !checksum(&packet[..20], 0);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let tcp = head.iph_len;
    if psh {
        packet[tcp + 13] |= FLAG_PSH;
    }
    // With NEEDS_CSUM the kernel sums from csum_start onward and adds
    // it to what the field holds: the pseudo-header's sum.
    let pseudo = checksum(&[], pseudo_header(packet, head.v6, len - tcp));
    packet[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
    let header = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: if head.v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        },
        hdr_len: (head.iph_len + head.tcph_len) as u16,
        gso_size: head.payload as u16,
        csum_start: head.iph_len as u16,
        csum_offset: 16,
    };
    header
        .encode(&mut buffer[..h])
        .expect("the buffer starts with room for the header");
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn tcp4(seq: u32, payload: &[u8], psh: bool, ack: u32) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([192, 0, 2, 10], [10, 0, 0, 2], 64)
            .tcp(443, 40000, seq, 64000)
            .ack(ack);
        let builder = if psh { builder.psh() } else { builder };
        let mut out = vec![0u8; VIRTIO_NET_HDR_LEN];
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn tcp6(seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; VIRTIO_NET_HDR_LEN];
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(443, 40000, seq, 64000)
            .ack(1)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn header(buffer: &[u8]) -> VirtioNetHdr {
        VirtioNetHdr::decode(&buffer[..VIRTIO_NET_HDR_LEN]).unwrap()
    }

    /// Splits a merged burst back the way the kernel does (tun-rs's GSO
    /// split, as a TUN read would), every checksum computed afresh.
    fn split(buffer: &[u8]) -> Vec<Vec<u8>> {
        let hdr = header(buffer);
        let mut input = buffer[VIRTIO_NET_HDR_LEN..].to_vec();
        let mut bufs = vec![vec![0u8; 2000]; 64];
        let mut sizes = vec![0; 64];
        let v6 = input[0] >> 4 == 6;
        let n = tun_rs::gso_split(&mut input, hdr, &mut bufs, &mut sizes, 0, v6).unwrap();
        bufs.into_iter()
            .zip(sizes)
            .take(n)
            .map(|(b, s)| b[..s].to_vec())
            .collect()
    }

    fn payload(packet: &[u8]) -> Vec<u8> {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not TCP")
        };
        tcp.payload().to_vec()
    }

    #[test]
    fn a_run_of_segments_becomes_one_burst_that_splits_back() {
        let mut packets = vec![
            tcp4(1000, &[1; 100], false, 7),
            tcp4(1100, &[2; 100], false, 7),
            tcp4(1200, &[3; 60], true, 7),
        ];
        let originals: Vec<Vec<u8>> = packets.iter().map(|p| p[VIRTIO_NET_HDR_LEN..].to_vec()).collect();
        let mut coalescer = Coalescer::default();
        for _round in 0..2 {
            let writes = coalescer.coalesce(&mut packets).to_vec();
            assert_eq!(writes, vec![Write::Merged(0)]);
            let merged = &coalescer.merged[0];
            let hdr = header(merged);
            assert_eq!(
                (hdr.gso_type, hdr.gso_size, hdr.hdr_len),
                (VIRTIO_NET_HDR_GSO_TCPV4, 100, 40)
            );
            let parts = split(merged);
            assert_eq!(parts.len(), 3);
            for (part, original) in parts.iter().zip(&originals) {
                assert_eq!(payload(part), payload(original));
                assert!(
                    checksums_valid(part, &segment(part).unwrap()),
                    "split segments check out"
                );
            }
            assert!(segment(&parts[2]).unwrap().psh, "PSH stays on the last");
        }
    }

    #[test]
    fn only_what_the_rules_allow_is_merged() {
        let mut coalescer = Coalescer::default();
        // A gap in the sequence, another ACK, a longer segment after a
        // shorter one, and a PSH in the middle each end a burst.
        let mut packets = vec![
            tcp4(1000, &[1; 100], false, 7),
            tcp4(1150, &[2; 100], false, 7),
            tcp4(1250, &[3; 100], false, 8),
            tcp4(1350, &[4; 50], false, 8),
            tcp4(1400, &[5; 100], false, 8),
            tcp4(2000, &[6; 100], true, 9),
            tcp4(2100, &[7; 100], false, 9),
        ];
        let writes = coalescer.coalesce(&mut packets).to_vec();
        let merged = writes.iter().filter(|w| matches!(w, Write::Merged(_))).count();
        assert_eq!(writes.len(), 6, "{writes:?}");
        assert_eq!(merged, 1, "only 1250 + 1350 merge: {writes:?}");
        // A corrupt segment is left for the kernel to drop, not merged.
        let mut bad = vec![tcp4(1000, &[1; 100], false, 7), tcp4(1100, &[2; 100], false, 7)];
        let last = bad[1].len() - 1;
        bad[1][last] ^= 0xff;
        assert_eq!(
            coalescer.coalesce(&mut bad).to_vec(),
            vec![Write::Packet(0), Write::Packet(1)]
        );
        // Not TCP data: written as it is, with an empty header.
        let mut udp = vec![0u8; VIRTIO_NET_HDR_LEN];
        PacketBuilder::ipv4([192, 0, 2, 10], [10, 0, 0, 2], 64)
            .udp(53, 40000)
            .write(&mut udp, b"x")
            .unwrap();
        udp[..VIRTIO_NET_HDR_LEN].fill(0xaa);
        let mut single = vec![udp];
        assert_eq!(coalescer.coalesce(&mut single).to_vec(), vec![Write::Packet(0)]);
        assert!(single[0][..VIRTIO_NET_HDR_LEN].iter().all(|b| *b == 0));
    }

    #[test]
    fn interleaved_flows_and_ipv6_merge_each() {
        let mut other = tcp4(5000, &[9; 100], false, 7);
        // Another client port: another flow.
        let at = VIRTIO_NET_HDR_LEN + 20 + 2;
        other[at..at + 2].copy_from_slice(&40001u16.to_be_bytes());
        let sum_at = VIRTIO_NET_HDR_LEN + 20 + 16;
        other[sum_at..sum_at + 2].fill(0);
        let packet = &other[VIRTIO_NET_HDR_LEN..];
        let sum = !checksum(&packet[20..], pseudo_header(packet, false, packet.len() - 20));
        other[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
        let mut next = other.clone();
        let seq_at = VIRTIO_NET_HDR_LEN + 20 + 4;
        next[seq_at..seq_at + 4].copy_from_slice(&5100u32.to_be_bytes());
        next[sum_at..sum_at + 2].fill(0);
        let packet = &next[VIRTIO_NET_HDR_LEN..];
        let sum = !checksum(&packet[20..], pseudo_header(packet, false, packet.len() - 20));
        next[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
        let mut packets = vec![
            tcp4(1000, &[1; 100], false, 7),
            other,
            tcp4(1100, &[2; 100], false, 7),
            next,
            tcp6(1, &[3; 200]),
            tcp6(201, &[4; 200]),
        ];
        let mut coalescer = Coalescer::default();
        let writes = coalescer.coalesce(&mut packets).to_vec();
        assert_eq!(writes, vec![Write::Merged(0), Write::Merged(1), Write::Merged(2)]);
        assert_eq!(header(&coalescer.merged[2]).gso_type, VIRTIO_NET_HDR_GSO_TCPV6);
        assert_eq!(split(&coalescer.merged[2]).len(), 2);
    }
}
