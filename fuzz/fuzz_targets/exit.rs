//! The exit node's packet path: clients' packets through its NAT toward the
//! Internet, and packets from the Internet back, in any order and of any
//! bytes. Nothing panics; a packet etherparse finds whole and valid keeps
//! valid checksums through either rewrite; and a reply to what a client
//! sent goes back to that client, addressed as it sent it.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oasis_exit::nat::{Nat, NatConfig};
use oasis_io::packet::addresses;

#[path = "checksums.rs"]
mod checksums;
use checksums::checksums_valid;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A client's packet to the Internet.
    Out { client: u8, class: u8, packet: Vec<u8> },
    /// A client's well-formed packet: TCP (with these flags), UDP, ICMP
    /// echo, over IPv4 or IPv6, maybe fragmented.
    OutBuilt {
        client: u8,
        kind: u8,
        v6: bool,
        dst: [u8; 2],
        sport: u16,
        dport: u16,
        flags: u8,
        len: u8,
        fragment: Option<u16>,
    },
    /// Any packet arriving from the Internet.
    In { packet: Vec<u8> },
    /// The answer to the `index`th packet sent out (addresses and ports
    /// swapped, which keeps checksums as valid as they were), with its
    /// bytes past the ports changed to `tail`.
    Reply { index: u8, tail: Vec<u8> },
    /// Time passes.
    Wait { secs: u16 },
}

fn client(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n % 4], 7400))
}

/// Swaps source and destination addresses and the two ports.
fn swapped(packet: &[u8]) -> Option<Vec<u8>> {
    let mut out = packet.to_vec();
    let (addr, len, l4) = match packet.first()? >> 4 {
        4 => (12, 4, usize::from(packet[0] & 0x0f) * 4),
        6 => (8, 16, 40),
        _ => return None,
    };
    if packet.len() < l4 + 4 || packet.len() < addr + 2 * len {
        return None;
    }
    out[addr..addr + len].copy_from_slice(&packet[addr + len..addr + 2 * len]);
    out[addr + len..addr + 2 * len].copy_from_slice(&packet[addr..addr + len]);
    out[l4..l4 + 2].copy_from_slice(&packet[l4 + 2..l4 + 4]);
    out[l4 + 2..l4 + 4].copy_from_slice(&packet[l4..l4 + 2]);
    Some(out)
}

/// A valid packet from the client's address to one of a few remotes.
#[allow(clippy::too_many_arguments)]
fn built(n: u8, kind: u8, v6: bool, dst: [u8; 2], sport: u16, dport: u16, flags: u8, len: u8) -> Vec<u8> {
    use etherparse::PacketBuilder;
    let payload = vec![0x5a; usize::from(len)];
    let ip = if v6 {
        let mut src = [0u8; 16];
        src[..2].copy_from_slice(&[0xfd, 0x77]);
        src[15] = n % 4;
        let mut to = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        to[14..].copy_from_slice(&[dst[0] % 4, dst[1] % 4]);
        PacketBuilder::ipv6(src, to, 64)
    } else {
        PacketBuilder::ipv4([10, 0, 0, n % 4], [203, 0, dst[0] % 4, dst[1] % 4], 64)
    };
    let mut out = Vec::new();
    let _ = match kind % 3 {
        0 => {
            let mut tcp = ip.tcp(sport, dport, 1, 1000);
            if flags & 1 != 0 {
                tcp = tcp.syn();
            }
            if flags & 2 != 0 {
                tcp = tcp.ack(1);
            }
            if flags & 4 != 0 {
                tcp = tcp.fin();
            }
            if flags & 8 != 0 {
                tcp = tcp.rst();
            }
            tcp.write(&mut out, &payload)
        }
        1 => ip.udp(sport, dport).write(&mut out, &payload),
        _ if v6 => ip.icmpv6_echo_request(sport, dport).write(&mut out, &payload),
        _ => ip.icmpv4_echo_request(sport, dport).write(&mut out, &payload),
    };
    out
}

fuzz_target!(|ops: Vec<Op>| {
    let mut config = NatConfig::new(
        Some("198.51.100.2".parse().unwrap()),
        Some("2001:db8::2".parse().unwrap()),
        40000..=40063,
    );
    config.max_flows = 32;
    let mut nat = Nat::new(config);
    let mut now = Instant::now();
    // What left, with the client and the address it came from.
    let mut sent: Vec<(SocketAddr, IpAddr, Vec<u8>)> = Vec::new();
    for op in ops.into_iter().take(64) {
        match op {
            Op::Out { client: n, class, mut packet } => {
                let valid = checksums_valid(&packet) == Some(true);
                let from = addresses(&packet).map(|(src, _)| src);
                if nat.outbound(client(n), class, &mut packet, now).is_ok() {
                    if valid {
                        assert_eq!(checksums_valid(&packet), Some(true), "outbound broke {packet:?}");
                    }
                    if let Some(from) = from {
                        sent.push((client(n), from, packet));
                    }
                }
            }
            Op::OutBuilt {
                client: n,
                kind,
                v6,
                dst,
                sport,
                dport,
                flags,
                len,
                fragment,
            } => {
                let mut packet = built(n, kind, v6, dst, sport, dport, flags, len);
                let from = addresses(&packet).map(|(src, _)| src);
                if let Some(id) = fragment.filter(|_| !v6 && packet.len() > 36) {
                    // The first fragment of a datagram: more to come.
                    oasis_io::packet::set_fragment_id(&mut packet, u32::from(id));
                    packet[6] = (packet[6] & 0x1f) | 0x20;
                    packet[10..12].copy_from_slice(&[0, 0]);
                    let sum = packet[..20]
                        .chunks(2)
                        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                        .sum::<u32>();
                    let folded = (sum & 0xffff) + (sum >> 16);
                    let folded = (folded & 0xffff) + (folded >> 16);
                    packet[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
                }
                let valid = checksums_valid(&packet) == Some(true);
                if nat.outbound(client(n), 0, &mut packet, now).is_ok() {
                    if valid {
                        assert_eq!(checksums_valid(&packet), Some(true), "outbound broke {packet:?}");
                    }
                    if let Some(from) = from {
                        sent.push((client(n), from, packet));
                    }
                }
            }
            Op::In { mut packet } => {
                let valid = checksums_valid(&packet) == Some(true);
                if nat.inbound(&mut packet, now).is_ok() && valid {
                    assert_ne!(checksums_valid(&packet), Some(false), "inbound broke {packet:?}");
                }
            }
            Op::Reply { index, tail } => {
                let Some((to, from, out)) = sent.get(usize::from(index) % sent.len().max(1)) else {
                    continue;
                };
                let Some(mut reply) = swapped(out) else {
                    continue;
                };
                // The tail changes the payload (and may break checksums,
                // which then are not checked).
                let keep = reply.len().min(48);
                reply.truncate(keep);
                reply.extend_from_slice(&tail[..tail.len().min(64)]);
                let valid = checksums_valid(&reply) == Some(true);
                if let Ok(back) = nat.inbound(&mut reply, now) {
                    if valid {
                        assert_eq!(back.client, *to, "a reply went to another client");
                        assert_eq!(addresses(&reply).map(|(_, dst)| dst), Some(*from));
                        assert_ne!(checksums_valid(&reply), Some(false), "inbound broke {reply:?}");
                    }
                }
            }
            Op::Wait { secs } => {
                now += Duration::from_secs(u64::from(secs));
                nat.expire(now);
                // Mappings may have expired and their ports gone to
                // others: answers to what left before prove nothing now.
                sent.clear();
            }
        }
    }
});
