//! The broker's flow table: which carrier each diverted flow uses. A flow
//! keeps the carrier chosen on its first packet for its whole life, so a
//! legacy destination always sees one source address.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use oasis_common::{FAMILY_V4, FAMILY_V6, FlowKey};

use crate::rules::Carrier;

/// The 5-tuple of a raw IP packet, as the classifier builds it.
pub fn flow_key(packet: &[u8]) -> Option<FlowKey> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let mut key = FlowKey::default();
    match sliced.net? {
        NetSlice::Ipv4(ip) => {
            let header = ip.header();
            key.family = FAMILY_V4;
            key.proto = header.protocol().0;
            key.src[..4].copy_from_slice(&header.source());
            key.dst[..4].copy_from_slice(&header.destination());
        }
        NetSlice::Ipv6(ip) => {
            let header = ip.header();
            key.family = FAMILY_V6;
            // The classifier reads the fixed header's next-header field.
            key.proto = header.next_header().0;
            key.src = header.source();
            key.dst = header.destination();
        }
        NetSlice::Arp(_) => return None,
    }
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            key.sport = tcp.source_port();
            key.dport = tcp.destination_port();
        }
        Some(TransportSlice::Udp(udp)) => {
            key.sport = udp.source_port();
            key.dport = udp.destination_port();
        }
        _ => {}
    }
    Some(key)
}

/// Whether the broker can send this packet on the underlay at all. A packet
/// to a multicast or link-local destination only makes sense on one link,
/// which a raw socket cannot pick; such packets reach the TUN only from the
/// host's own link-local chatter, never from a rule worth honouring.
pub fn routable(key: &FlowKey) -> bool {
    match crate::rules::flow_dst(key) {
        std::net::IpAddr::V4(dst) => !(dst.is_multicast() || dst.is_broadcast() || dst.is_link_local()),
        std::net::IpAddr::V6(dst) => !(dst.is_multicast() || dst.is_unicast_link_local()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// The rule that claimed the flow; None when it no longer exists.
    pub rule_id: Option<u32>,
    pub carrier: Carrier,
    pub last_seen: Instant,
    pub packets: u64,
}

/// Flows seen by one packet thread. A flow always arrives on the same TUN
/// queue, so each thread owns its table and needs no lock.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, FlowState>,
    idle: Duration,
    capacity: usize,
}

impl FlowTable {
    pub fn new(idle: Duration, capacity: usize) -> FlowTable {
        FlowTable {
            flows: HashMap::new(),
            idle,
            capacity,
        }
    }

    /// The carrier of the flow this packet belongs to; `decide` picks it for
    /// a new flow (or one idle for longer than the timeout).
    pub fn carrier(
        &mut self,
        key: FlowKey,
        now: Instant,
        decide: impl FnOnce(&FlowKey) -> (Option<u32>, Carrier),
    ) -> &FlowState {
        if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
            self.expire(now);
        }
        let idle = self.idle;
        let state = match self.flows.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let state = entry.into_mut();
                if now.duration_since(state.last_seen) > idle {
                    let (rule_id, carrier) = decide(&key);
                    *state = FlowState {
                        rule_id,
                        carrier,
                        last_seen: now,
                        packets: 0,
                    };
                }
                state
            }
            std::collections::hash_map::Entry::Vacant(entry) => {
                let (rule_id, carrier) = decide(&key);
                entry.insert(FlowState {
                    rule_id,
                    carrier,
                    last_seen: now,
                    packets: 0,
                })
            }
        };
        state.last_seen = now;
        state.packets += 1;
        state
    }

    /// Forgets idle flows; returns how many were dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.flows.len();
        let idle = self.idle;
        self.flows
            .retain(|_, state| now.duration_since(state.last_seen) <= idle);
        before - self.flows.len()
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    fn tcp_packet(dport: u16) -> Vec<u8> {
        let builder = PacketBuilder::ipv4([10, 0, 0, 1], [203, 0, 113, 9], 64).tcp(40000, dport, 1, 1000);
        let mut out = Vec::new();
        builder.write(&mut out, b"hello").unwrap();
        out
    }

    #[test]
    fn keys_from_v4_and_v6_packets() {
        let key = flow_key(&tcp_packet(8080)).unwrap();
        assert_eq!(
            (key.family, key.proto, key.sport, key.dport),
            (FAMILY_V4, 6, 40000, 8080)
        );
        assert_eq!(&key.dst[..4], &[203, 0, 113, 9]);
        assert!(key.dst[4..].iter().all(|b| *b == 0));

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
    fn link_local_and_multicast_are_not_routable() {
        let mut rs = Vec::new();
        let src = "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let dst = "ff02::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        PacketBuilder::ipv6(src, dst, 255)
            .icmpv6_echo_request(1, 1)
            .write(&mut rs, b"")
            .unwrap();
        assert!(!routable(&flow_key(&rs).unwrap()));
        assert!(routable(&flow_key(&tcp_packet(80)).unwrap()));
        let mut mdns = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], [224, 0, 0, 251], 1)
            .udp(5353, 5353)
            .write(&mut mdns, b"")
            .unwrap();
        assert!(!routable(&flow_key(&mdns).unwrap()));
    }

    #[test]
    fn a_flow_keeps_its_carrier_until_idle() {
        let mut table = FlowTable::new(Duration::from_secs(10), 100);
        let key = flow_key(&tcp_packet(80)).unwrap();
        let t0 = Instant::now();
        let first = table
            .carrier(key, t0, |_| (Some(1), Carrier::Overlay("a".into())))
            .clone();
        assert_eq!(first.carrier, Carrier::Overlay("a".into()));
        // Rules changed, but the live flow stays where it was.
        let again = table.carrier(key, t0 + Duration::from_secs(5), |_| (None, Carrier::Underlay));
        assert_eq!(
            (again.carrier.clone(), again.packets),
            (Carrier::Overlay("a".into()), 2)
        );
        // After a long silence it is a new flow and meets the current rules.
        let later = table.carrier(key, t0 + Duration::from_secs(30), |_| (None, Carrier::Underlay));
        assert_eq!((later.carrier.clone(), later.packets), (Carrier::Underlay, 1));
    }

    #[test]
    fn a_full_table_drops_idle_flows_first() {
        let mut table = FlowTable::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        for port in [1, 2] {
            table.carrier(flow_key(&tcp_packet(port)).unwrap(), t0, |_| {
                (None, Carrier::Underlay)
            });
        }
        table.carrier(
            flow_key(&tcp_packet(3)).unwrap(),
            t0 + Duration::from_secs(5),
            |_| (None, Carrier::Underlay),
        );
        assert_eq!(table.len(), 1);
    }
}
