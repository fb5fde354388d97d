//! The Monitor's probes as packets: building them, and telling their
//! answers from other packets. A TCP probe is a SYN from one of a few
//! local ports the daemon holds (bound, never listening, so no application
//! gets them and the host's stack resets any SYN-ACK that reaches it); an
//! echo probe carries the daemon's own identifier. The answers come back
//! on the underlay (the kernel reports them) or through an overlay (the
//! return path finds them here and keeps them from the applications).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use etherparse::{
    IcmpEchoHeader, Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use oasis_common::{FAMILY_V4, FAMILY_V6, FlowKey};

use super::{ProbeKind, ProbeRequest};
use crate::overlay::Via;

use oasis_common::proto::{ICMP, ICMPV6, TCP};
/// Probes unanswered this long are forgotten here (the Monitor counts them
/// lost by then).
const FORGET_AFTER: Duration = Duration::from_secs(5);

/// A probe on its way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub id: u64,
    pub via: Via,
    pub at: Instant,
}

/// An answer to a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub sent: Sent,
    /// The key the probe was sent with.
    pub key: FlowKey,
    /// A SYN-ACK that the prober must reset, through the same carrier.
    pub reset: bool,
}

pub struct ProbeTable {
    /// Local TCP ports reserved for probes.
    ports: Vec<u16>,
    /// The echo identifier of this daemon's probes.
    echo_id: u16,
    /// Keyed by the probe as it left the host (for echo: source port the
    /// identifier, destination port the sequence number).
    outstanding: Mutex<HashMap<FlowKey, Sent>>,
    count: AtomicUsize,
    next: AtomicUsize,
}

fn key_of(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> FlowKey {
    let mut key = FlowKey {
        proto,
        sport,
        dport,
        ..FlowKey::default()
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            key.family = FAMILY_V4;
            key.src[..4].copy_from_slice(&s.octets());
            key.dst[..4].copy_from_slice(&d.octets());
        }
        (s, d) => {
            key.family = FAMILY_V6;
            key.src = match s {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            key.dst = match d {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
        }
    }
    key
}

impl ProbeTable {
    pub fn new(ports: Vec<u16>, echo_id: u16) -> ProbeTable {
        ProbeTable {
            ports,
            echo_id,
            outstanding: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
        }
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<FlowKey, Sent>> {
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the probe's packet from `src` into `out`, and notes it. The
    /// key it is sent with, or None when it cannot be built (no port is
    /// reserved for TCP, or the families differ).
    pub fn build(
        &self,
        request: &ProbeRequest,
        src: IpAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<FlowKey> {
        let dst = request.target.dst;
        if src.is_ipv4() != dst.is_ipv4() {
            return None;
        }
        out.clear();
        let seq = (request.id & 0xffff) as u16;
        let ttl = 64;
        let key = match request.target.kind {
            ProbeKind::TcpSyn { dport } => {
                // A port no probe to the same destination is waiting on, so
                // an answer names its probe (and its carrier) alone.
                let n = self.next.fetch_add(1, Relaxed);
                let table = self.table();
                let port = (0..self.ports.len())
                    .map(|i| self.ports[(n + i) % self.ports.len()])
                    .find(|port| !table.contains_key(&key_of(src, dst, TCP, *port, dport)))?;
                drop(table);
                let builder = match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), ttl),
                    (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), ttl),
                    _ => return None,
                };
                // The sequence number carries the probe's id, so a SYN-ACK
                // is matched to its probe even if a port is reused fast.
                builder
                    .tcp(port, dport, request.id as u32, 64_240)
                    .syn()
                    .write(out, &[])
                    .ok()?;
                key_of(src, dst, TCP, port, dport)
            }
            ProbeKind::Echo => {
                let payload = [0x4f; 16];
                match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        PacketBuilder::ipv4(s.octets(), d.octets(), ttl)
                            .icmpv4_echo_request(self.echo_id, seq)
                            .write(out, &payload)
                            .ok()?;
                        key_of(src, dst, ICMP, self.echo_id, seq)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        PacketBuilder::ipv6(s.octets(), d.octets(), ttl)
                            .icmpv6_echo_request(self.echo_id, seq)
                            .write(out, &payload)
                            .ok()?;
                        key_of(src, dst, ICMPV6, self.echo_id, seq)
                    }
                    _ => return None,
                }
            }
        };
        let mut table = self.table();
        table.insert(
            key,
            Sent {
                id: request.id,
                via: request.via,
                at: now,
            },
        );
        self.count.store(table.len(), Relaxed);
        Some(key)
    }

    /// Forgets a probe that could not be sent.
    pub fn unsent(&self, key: &FlowKey) {
        let mut table = self.table();
        table.remove(key);
        self.count.store(table.len(), Relaxed);
    }

    /// Forgets probes long unanswered; the keys of those it forgot.
    pub fn expire(&self, now: Instant, out: &mut Vec<FlowKey>) {
        let mut table = self.table();
        table.retain(|key, sent| {
            let keep = now.saturating_duration_since(sent.at) < FORGET_AFTER;
            if !keep {
                out.push(*key);
            }
            keep
        });
        self.count.store(table.len(), Relaxed);
    }

    /// Whether any probe is on its way (the return path looks for answers
    /// only then).
    pub fn any(&self) -> bool {
        self.count.load(Relaxed) > 0
    }

    /// The probe a packet coming back answers, if it answers one: a
    /// SYN-ACK or reset to a probe port, an echo reply with this daemon's
    /// identifier. The probe is taken off the table.
    pub fn answer(&self, packet: &[u8]) -> Option<Answer> {
        if !self.any() {
            return None;
        }
        let sliced = SlicedPacket::from_ip(packet).ok()?;
        let (src, dst) = match sliced.net.as_ref()? {
            NetSlice::Ipv4(ip) => (
                IpAddr::from(ip.header().source()),
                IpAddr::from(ip.header().destination()),
            ),
            NetSlice::Ipv6(ip) => (
                IpAddr::from(ip.header().source()),
                IpAddr::from(ip.header().destination()),
            ),
            NetSlice::Arp(_) => return None,
        };
        let (key, reset) = match sliced.transport.as_ref()? {
            TransportSlice::Tcp(tcp) => {
                if !self.ports.contains(&tcp.destination_port()) || !(tcp.rst() || (tcp.syn() && tcp.ack())) {
                    return None;
                }
                (
                    key_of(dst, src, TCP, tcp.destination_port(), tcp.source_port()),
                    tcp.syn(),
                )
            }
            TransportSlice::Icmpv4(icmp) => match icmp.icmp_type() {
                Icmpv4Type::EchoReply(IcmpEchoHeader { id, seq }) if id == self.echo_id => {
                    (key_of(dst, src, ICMP, id, seq), false)
                }
                _ => return None,
            },
            TransportSlice::Icmpv6(icmp) => match icmp.icmp_type() {
                Icmpv6Type::EchoReply(IcmpEchoHeader { id, seq }) if id == self.echo_id => {
                    (key_of(dst, src, ICMPV6, id, seq), false)
                }
                _ => return None,
            },
            _ => return None,
        };
        self.answered(&key).map(|sent| Answer { sent, key, reset })
    }

    /// The probe sent with `key`, taken off the table.
    pub fn answered(&self, key: &FlowKey) -> Option<Sent> {
        let mut table = self.table();
        let sent = table.remove(key);
        self.count.store(table.len(), Relaxed);
        sent
    }

    /// The echo probe `seq` to `from`, answered on the underlay (where the
    /// socket that read it does not say to which local address).
    pub fn echo_answered(&self, from: IpAddr, id: u16, seq: u16) -> Option<Sent> {
        if id != self.echo_id || !self.any() {
            return None;
        }
        let proto = if from.is_ipv4() { ICMP } else { ICMPV6 };
        let probe = key_of(from, from, proto, id, seq);
        let mut table = self.table();
        let key = *table
            .keys()
            .find(|k| k.proto == proto && k.dst == probe.dst && k.sport == id && k.dport == seq)?;
        let sent = table.remove(&key);
        self.count.store(table.len(), Relaxed);
        sent
    }

    pub fn echo_id(&self) -> u16 {
        self.echo_id
    }
}

/// The reset that ends a probe's half-open connection, answering its
/// SYN-ACK (`syn_ack`, as it came back), into `out`.
pub fn reset_for(syn_ack: &[u8], out: &mut Vec<u8>) -> Option<()> {
    oasis_io::packet::reset_reply(syn_ack, out).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::ProbeTarget;
    use crate::overlay::OverlayId;

    const LOCAL: &str = "10.0.0.2";
    const SERVER: &str = "203.0.113.9";

    fn request(id: u64, kind: ProbeKind) -> ProbeRequest {
        ProbeRequest {
            id,
            via: Via::Overlay(OverlayId(1)),
            target: ProbeTarget {
                dst: SERVER.parse().unwrap(),
                kind,
            },
            bytes: 60,
        }
    }

    fn syn_ack(probe: &[u8]) -> Vec<u8> {
        let sliced = SlicedPacket::from_ip(probe).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!()
        };
        let mut out = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 9], [10, 0, 0, 2], 64)
            .tcp(tcp.destination_port(), tcp.source_port(), 777, 64_000)
            .syn()
            .ack(tcp.sequence_number() + 1)
            .write(&mut out, &[])
            .unwrap();
        out
    }

    #[test]
    fn a_syn_ack_answers_its_probe_once_and_gets_a_reset() {
        let table = ProbeTable::new(vec![40001, 40002], 0x4f53);
        let now = Instant::now();
        let mut packet = Vec::new();
        let key = table
            .build(
                &request(9, ProbeKind::TcpSyn { dport: 443 }),
                LOCAL.parse().unwrap(),
                now,
                &mut packet,
            )
            .unwrap();
        assert_eq!((key.sport, key.dport, key.proto), (40001, 443, 6));
        let answer = syn_ack(&packet);
        let got = table.answer(&answer).unwrap();
        assert_eq!((got.sent.id, got.reset, got.key), (9, true, key));
        assert!(table.answer(&answer).is_none(), "answered once");
        assert!(!table.any());
        let mut rst = Vec::new();
        reset_for(&answer, &mut rst).unwrap();
        let sliced = SlicedPacket::from_ip(&rst).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!()
        };
        assert!(tcp.rst());
        assert_eq!(
            (tcp.source_port(), tcp.destination_port(), tcp.sequence_number()),
            (40001, 443, 10)
        );
    }

    #[test]
    fn a_port_is_not_reused_while_a_probe_waits_on_it() {
        let table = ProbeTable::new(vec![40001, 40002], 0x4f53);
        let now = Instant::now();
        let mut packet = Vec::new();
        let local = LOCAL.parse().unwrap();
        let syn = ProbeKind::TcpSyn { dport: 443 };
        let a = table.build(&request(1, syn), local, now, &mut packet).unwrap();
        let b = table.build(&request(2, syn), local, now, &mut packet).unwrap();
        assert_ne!(a.sport, b.sport);
        assert!(
            table.build(&request(3, syn), local, now, &mut packet).is_none(),
            "every port waits"
        );
        // Another destination port may use them.
        assert!(
            table
                .build(
                    &request(4, ProbeKind::TcpSyn { dport: 80 }),
                    local,
                    now,
                    &mut packet
                )
                .is_some()
        );
        table.answered(&a);
        assert_eq!(
            table
                .build(&request(5, syn), local, now, &mut packet)
                .unwrap()
                .sport,
            a.sport
        );
    }

    #[test]
    fn application_packets_are_no_answers() {
        let table = ProbeTable::new(vec![40001], 0x4f53);
        let now = Instant::now();
        let mut packet = Vec::new();
        table
            .build(
                &request(1, ProbeKind::TcpSyn { dport: 443 }),
                LOCAL.parse().unwrap(),
                now,
                &mut packet,
            )
            .unwrap();
        // Data to an application's own port, and an echo reply of another id.
        let mut other = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 9], [10, 0, 0, 2], 64)
            .tcp(443, 40999, 1, 1000)
            .syn()
            .ack(1)
            .write(&mut other, &[])
            .unwrap();
        assert!(table.answer(&other).is_none());
        let mut echo = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 9], [10, 0, 0, 2], 64)
            .icmpv4_echo_reply(1234, 1)
            .write(&mut echo, &[])
            .unwrap();
        assert!(table.answer(&echo).is_none());
        assert!(table.any(), "the probe still waits");
    }

    #[test]
    fn echo_probes_are_matched_by_identifier_and_sequence() {
        let table = ProbeTable::new(vec![], 0x4f53);
        let now = Instant::now();
        let mut packet = Vec::new();
        assert!(
            table
                .build(
                    &request(5, ProbeKind::TcpSyn { dport: 80 }),
                    LOCAL.parse().unwrap(),
                    now,
                    &mut packet
                )
                .is_none(),
            "no port reserved"
        );
        table
            .build(
                &request(70_000, ProbeKind::Echo),
                LOCAL.parse().unwrap(),
                now,
                &mut packet,
            )
            .unwrap();
        let seq = (70_000u64 & 0xffff) as u16;
        let mut reply = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 9], [10, 0, 0, 2], 64)
            .icmpv4_echo_reply(0x4f53, seq)
            .write(&mut reply, &[0x4f; 16])
            .unwrap();
        assert_eq!(table.answer(&reply).unwrap().sent.id, 70_000);
        // On the underlay the socket reader reports it instead.
        table
            .build(
                &request(6, ProbeKind::Echo),
                LOCAL.parse().unwrap(),
                now,
                &mut packet,
            )
            .unwrap();
        assert_eq!(
            table
                .echo_answered(SERVER.parse().unwrap(), 0x4f53, 6)
                .map(|s| s.id),
            Some(6)
        );
        let mut expired = Vec::new();
        table
            .build(
                &request(7, ProbeKind::Echo),
                LOCAL.parse().unwrap(),
                now,
                &mut packet,
            )
            .unwrap();
        table.expire(now + Duration::from_secs(6), &mut expired);
        assert_eq!(expired.len(), 1);
    }
}
