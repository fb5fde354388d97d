//! The exit node's NAT: a client's packet leaves with the exit's public
//! address and a port (or ICMP echo identifier) from the NAT range; a reply
//! to that port is mapped back and returned to the client.
//!
//! Mappings are endpoint-dependent (keyed by the remote end too), expire
//! when idle, and the table is bounded: when full, new flows are refused
//! rather than evicting live ones.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use oasis_io::packet::{
    End, PacketError, addresses, echo_id, icmp_error_quote, layout, ports, rewrite, rewrite_ip_address,
    rewrite_quoted_source, set_fragment_id, tcp_closing,
};

#[derive(Clone, Debug)]
pub struct NatConfig {
    pub public_v4: Option<Ipv4Addr>,
    pub public_v6: Option<Ipv6Addr>,
    pub ports: RangeInclusive<u16>,
    pub max_flows: usize,
    /// An established TCP connection may stay silent this long: 2 h 4 min
    /// by default, the least RFC 5382 (REQ-5) lets a NAT keep one, so a
    /// quiet session still works when the server speaks first.
    pub tcp_idle: Duration,
    /// A TCP flow that has seen FIN or RST lingers this long.
    pub tcp_closing: Duration,
    /// UDP mappings live by activity: at least 2 min (RFC 4787, REQ-5).
    pub udp_idle: Duration,
    pub icmp_idle: Duration,
}

impl NatConfig {
    pub fn new(
        public_v4: Option<Ipv4Addr>,
        public_v6: Option<Ipv6Addr>,
        ports: RangeInclusive<u16>,
    ) -> NatConfig {
        NatConfig {
            public_v4,
            public_v6,
            ports,
            max_flows: 65_536,
            tcp_idle: Duration::from_secs(2 * 3600 + 4 * 60),
            tcp_closing: Duration::from_secs(10),
            udp_idle: Duration::from_secs(120),
            icmp_idle: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error("only TCP, UDP and ICMP echo are carried")]
    Unsupported,
    #[error("the exit has no public address of this IP family")]
    NoPublicAddress,
    #[error("destination not allowed (loopback, link-local, multicast or the exit itself)")]
    ForbiddenDestination,
    #[error("the NAT table is full")]
    Full,
    #[error("no free NAT port toward this destination")]
    NoPort,
    #[error("no mapping for this reply")]
    UnknownMapping,
    #[error("a TCP segment of no connection the exit knows (it restarted?)")]
    NoConnection,
}

/// A flow as the client sent it: who sent it (the datagram's source) and
/// the packet's own protocol, addresses and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Inside {
    pub client: SocketAddr,
    pub proto: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

/// A mapping as someone outside the NAT needs it (the kernel's fast path):
/// the flow, the NAT port it leaves from, its client's class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub inside: Inside,
    pub nat_port: u16,
    pub class: u8,
}

/// The same flow as the remote end sees it, from the reply's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
struct Outside {
    proto: u8,
    remote: IpAddr,
    remote_port: u16,
    nat_port: u16,
}

#[derive(Debug)]
struct Mapping {
    outside: Outside,
    class: u8,
    last_seen: Instant,
    closing: bool,
}

/// The mappings as a state file keeps them across restarts: without
/// them, connections of clients would hang after a restart (their replies
/// mapped to nobody).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NatState {
    mappings: Vec<SavedMapping>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedMapping {
    inside: Inside,
    outside: Outside,
    class: u8,
    /// Seconds since its last packet, when saved.
    idle_secs: u64,
    closing: bool,
}

impl NatState {
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }
}

/// Where a reply goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Return {
    pub client: SocketAddr,
    pub class: u8,
}

pub struct Nat {
    config: NatConfig,
    by_inside: HashMap<Inside, Mapping>,
    by_outside: HashMap<Outside, Inside>,
    cursor: u16,
    /// Fragmented datagrams of clients: a later fragment (no ports) leaves
    /// as its first did, with the identification the exit gave it.
    frags_out: HashMap<(SocketAddr, IpAddr, IpAddr, u8, u32), FragOut>,
    /// Fragmented replies: a later fragment goes where its first went.
    frags_in: HashMap<(IpAddr, u8, u32), FragIn>,
    /// Identifications for clients' fragmented datagrams: the exit's own,
    /// so two clients' datagrams never share one at the far end.
    next_id: u32,
    changes: u64,
    /// Mappings made since `take_news` last ran, and mappings gone since
    /// `take_gone` did: only while someone follows them (`follow`).
    followed: bool,
    news: Vec<Mapped>,
    gone: Vec<Mapped>,
}

/// Fragmented datagrams followed at once, each way.
const MAX_FRAGMENTED: usize = 4096;
/// As long as Linux keeps fragments for reassembly.
const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct FragOut {
    public: IpAddr,
    id: u32,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct FragIn {
    inside: IpAddr,
    back: Return,
    at: Instant,
}

impl Nat {
    pub fn new(config: NatConfig) -> Nat {
        let cursor = *config.ports.start();
        Nat {
            config,
            by_inside: HashMap::new(),
            by_outside: HashMap::new(),
            cursor,
            frags_out: HashMap::new(),
            frags_in: HashMap::new(),
            next_id: 1,
            changes: 0,
            followed: false,
            news: Vec::new(),
            gone: Vec::new(),
        }
    }

    /// From now on, keeps the mappings made and gone for `take_news` and
    /// `take_gone`; those made so far count as made now.
    pub fn follow(&mut self) {
        self.followed = true;
        self.news.extend(self.by_inside.iter().map(|(inside, m)| Mapped {
            inside: *inside,
            nat_port: m.outside.nat_port,
            class: m.class,
        }));
    }

    /// The mappings made since the last call.
    pub fn take_news(&mut self, into: &mut Vec<Mapped>) {
        into.append(&mut self.news);
    }

    /// The mappings gone since the last call.
    pub fn take_gone(&mut self, into: &mut Vec<Mapped>) {
        into.append(&mut self.gone);
    }

    /// Whether the flow's mapping would expire at `now` unless it saw a
    /// packet somewhere the NAT does not (in the kernel).
    pub fn due(&self, inside: &Inside, now: Instant) -> bool {
        self.by_inside
            .get(inside)
            .is_some_and(|m| now.saturating_duration_since(m.last_seen) > idle_time(&self.config, inside, m))
    }

    /// The flow had a packet at `at` (in the kernel).
    pub fn seen(&mut self, inside: &Inside, at: Instant) {
        if let Some(mapping) = self.by_inside.get_mut(inside)
            && at > mapping.last_seen
        {
            mapping.last_seen = at;
        }
    }

    /// Bumped when a mapping comes or goes: the state needs saving.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The mappings, for the state file.
    pub fn state(&self, now: Instant) -> NatState {
        NatState {
            mappings: self
                .by_inside
                .iter()
                .map(|(inside, m)| SavedMapping {
                    inside: *inside,
                    outside: m.outside,
                    class: m.class,
                    idle_secs: now.saturating_duration_since(m.last_seen).as_secs(),
                    closing: m.closing,
                })
                .collect(),
        }
    }

    /// Takes back the mappings of a previous run that fit this one (its
    /// port range, its public addresses); returns how many.
    pub fn restore(&mut self, state: NatState, now: Instant) -> usize {
        let before = self.by_inside.len();
        for saved in state.mappings {
            if !self.config.ports.contains(&saved.outside.nat_port)
                || self.by_outside.contains_key(&saved.outside)
                || self.by_inside.len() >= self.config.max_flows
            {
                continue;
            }
            let Some(last_seen) = now.checked_sub(Duration::from_secs(saved.idle_secs)) else {
                continue;
            };
            self.by_outside.insert(saved.outside, saved.inside);
            if self.followed {
                self.news.push(Mapped {
                    inside: saved.inside,
                    nat_port: saved.outside.nat_port,
                    class: saved.class,
                });
            }
            self.by_inside.insert(
                saved.inside,
                Mapping {
                    outside: saved.outside,
                    class: saved.class,
                    last_seen,
                    closing: saved.closing,
                },
            );
        }
        self.expire(now);
        self.changes += 1;
        self.by_inside.len() - before
    }

    pub fn len(&self) -> usize {
        self.by_inside.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_inside.is_empty()
    }

    /// Rewrites a client's packet to leave from the exit.
    pub fn outbound(
        &mut self,
        client: SocketAddr,
        class: u8,
        packet: &mut [u8],
        now: Instant,
    ) -> Result<(), NatError> {
        let (src, dst) = addresses(packet).ok_or(PacketError::Truncated)?;
        let fragment = oasis_io::packet::fragment(packet);
        if let Some(later) = fragment.filter(|f| !f.first) {
            let key = (client, src, dst, later.proto, later.id);
            let route = self
                .frags_out
                .get(&key)
                .filter(|r| now.duration_since(r.at) < FRAGMENT_LIFETIME)
                .copied()
                .ok_or(NatError::UnknownMapping)?;
            rewrite_ip_address(packet, End::Source, route.public)?;
            set_fragment_id(packet, route.id);
            return Ok(());
        }
        let layout = layout(packet)?;
        let (src_port, dst_port) = match layout.proto {
            6 | 17 => ports(packet).ok_or(NatError::Unsupported)?,
            1 | 58 => match echo_id(packet) {
                Some((true, id)) => (id, 0),
                _ => return Err(NatError::Unsupported),
            },
            _ => return Err(NatError::Unsupported),
        };
        let public: IpAddr = match dst {
            IpAddr::V4(_) => self.config.public_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.config.public_v6.map(IpAddr::V6),
        }
        .ok_or(NatError::NoPublicAddress)?;
        if forbidden(dst, public) {
            return Err(NatError::ForbiddenDestination);
        }
        let inside = Inside {
            client,
            proto: layout.proto,
            src,
            src_port,
            dst,
            dst_port,
        };
        let closing = tcp_closing(packet);
        let nat_port = match self.by_inside.get_mut(&inside) {
            Some(mapping) => {
                mapping.last_seen = now;
                mapping.closing |= closing;
                mapping.class = class;
                mapping.outside.nat_port
            }
            None => {
                // A TCP segment other than a SYN starts no connection: a
                // mapping made now would carry it to a server that knows
                // nothing of it (the exit restarted and lost the mapping).
                if layout.proto == oasis_common::proto::TCP && !tcp_opening(packet, layout.l4) {
                    return Err(NatError::NoConnection);
                }
                if self.by_inside.len() >= self.config.max_flows {
                    self.expire(now);
                    if self.by_inside.len() >= self.config.max_flows {
                        return Err(NatError::Full);
                    }
                }
                let outside = self.allocate(inside.proto, dst, dst_port)?;
                self.changes += 1;
                if self.followed {
                    self.news.push(Mapped {
                        inside,
                        nat_port: outside.nat_port,
                        class,
                    });
                }
                self.by_outside.insert(outside, inside);
                self.by_inside.insert(
                    inside,
                    Mapping {
                        outside,
                        class,
                        last_seen: now,
                        closing,
                    },
                );
                outside.nat_port
            }
        };
        rewrite(packet, End::Source, public, nat_port)?;
        if let Some(first) = fragment {
            let id = self.fragment_id(dst.is_ipv4());
            set_fragment_id(packet, id);
            if self.frags_out.len() >= MAX_FRAGMENTED {
                self.frags_out
                    .retain(|_, r| now.duration_since(r.at) < FRAGMENT_LIFETIME);
            }
            if self.frags_out.len() < MAX_FRAGMENTED {
                self.frags_out.insert(
                    (client, src, dst, first.proto, first.id),
                    FragOut { public, id, at: now },
                );
            }
        }
        Ok(())
    }

    fn fragment_id(&mut self, v4: bool) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if v4 { id & 0xffff } else { id }
    }

    /// Rewrites a reply back to the client's addresses; says where it goes.
    pub fn inbound(&mut self, packet: &mut [u8], now: Instant) -> Result<Return, NatError> {
        let (src, _) = addresses(packet).ok_or(PacketError::Truncated)?;
        let fragment = oasis_io::packet::fragment(packet);
        if let Some(later) = fragment.filter(|f| !f.first) {
            let route = self
                .frags_in
                .get(&(src, later.proto, later.id))
                .filter(|r| now.duration_since(r.at) < FRAGMENT_LIFETIME)
                .copied()
                .ok_or(NatError::UnknownMapping)?;
            rewrite_ip_address(packet, End::Destination, route.inside)?;
            return Ok(route.back);
        }
        if let Some(quote) = icmp_error_quote(packet) {
            return self.icmp_error(packet, quote, now);
        }
        let layout = layout(packet)?;
        let (remote_port, nat_port) = match layout.proto {
            6 | 17 => ports(packet).ok_or(NatError::Unsupported)?,
            1 | 58 => match echo_id(packet) {
                Some((false, id)) => (0, id),
                _ => return Err(NatError::Unsupported),
            },
            _ => return Err(NatError::Unsupported),
        };
        let outside = Outside {
            proto: layout.proto,
            remote: src,
            remote_port,
            nat_port,
        };
        let inside = *self.by_outside.get(&outside).ok_or(NatError::UnknownMapping)?;
        let mapping = self.by_inside.get_mut(&inside).ok_or(NatError::UnknownMapping)?;
        mapping.last_seen = now;
        mapping.closing |= tcp_closing(packet);
        let class = mapping.class;
        rewrite(packet, End::Destination, inside.src, inside.src_port)?;
        let back = Return {
            client: inside.client,
            class,
        };
        if let Some(first) = fragment {
            if self.frags_in.len() >= MAX_FRAGMENTED {
                self.frags_in
                    .retain(|_, r| now.duration_since(r.at) < FRAGMENT_LIFETIME);
            }
            if self.frags_in.len() < MAX_FRAGMENTED {
                self.frags_in.insert(
                    (src, first.proto, first.id),
                    FragIn {
                        inside: inside.src,
                        back,
                        at: now,
                    },
                );
            }
        }
        Ok(back)
    }

    /// An ICMP error about a NATed flow (port unreachable, time exceeded
    /// on the way, packet too big): back to the client, about the packet
    /// as the client sent it, so its application hears (ECONNREFUSED,
    /// traceroute's hops, path MTU).
    fn icmp_error(&mut self, packet: &mut [u8], quote: usize, now: Instant) -> Result<Return, NatError> {
        let quoted = &packet[quote..];
        let (_, remote) = addresses(quoted).ok_or(PacketError::Truncated)?;
        let proto = layout(quoted)?.proto;
        let (nat_port, remote_port) = match proto {
            6 | 17 => ports(quoted).ok_or(NatError::Unsupported)?,
            1 | 58 => match echo_id(quoted) {
                Some((true, id)) => (id, 0),
                _ => return Err(NatError::Unsupported),
            },
            _ => return Err(NatError::Unsupported),
        };
        let outside = Outside {
            proto,
            remote,
            remote_port,
            nat_port,
        };
        let inside = *self.by_outside.get(&outside).ok_or(NatError::UnknownMapping)?;
        let mapping = self.by_inside.get_mut(&inside).ok_or(NatError::UnknownMapping)?;
        mapping.last_seen = now;
        let class = mapping.class;
        rewrite_ip_address(packet, End::Destination, inside.src)?;
        rewrite_quoted_source(packet, quote, inside.src, inside.src_port)?;
        Ok(Return {
            client: inside.client,
            class,
        })
    }

    /// Drops idle mappings; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.frags_out
            .retain(|_, r| now.duration_since(r.at) < FRAGMENT_LIFETIME);
        self.frags_in
            .retain(|_, r| now.duration_since(r.at) < FRAGMENT_LIFETIME);
        let config = &self.config;
        let before = self.by_inside.len();
        let by_outside = &mut self.by_outside;
        let (followed, gone) = (self.followed, &mut self.gone);
        self.by_inside.retain(|inside, mapping| {
            let keep = now.saturating_duration_since(mapping.last_seen) <= idle_time(config, inside, mapping);
            if !keep {
                by_outside.remove(&mapping.outside);
                if followed {
                    gone.push(Mapped {
                        inside: *inside,
                        nat_port: mapping.outside.nat_port,
                        class: mapping.class,
                    });
                }
            }
            keep
        });
        let gone = before - self.by_inside.len();
        if gone > 0 {
            self.changes += 1;
        }
        gone
    }

    /// A NAT port not in use toward this remote end.
    fn allocate(&mut self, proto: u8, remote: IpAddr, remote_port: u16) -> Result<Outside, NatError> {
        let (first, last) = (*self.config.ports.start(), *self.config.ports.end());
        let span = u32::from(last - first) + 1;
        let remote_port = if matches!(proto, 1 | 58) { 0 } else { remote_port };
        for _ in 0..span {
            let candidate = Outside {
                proto,
                remote,
                remote_port,
                nat_port: self.cursor,
            };
            self.cursor = if self.cursor >= last {
                first
            } else {
                self.cursor + 1
            };
            if !self.by_outside.contains_key(&candidate) {
                return Ok(candidate);
            }
        }
        Err(NatError::NoPort)
    }
}

/// How long a mapping may stay idle.
fn idle_time(config: &NatConfig, inside: &Inside, mapping: &Mapping) -> Duration {
    match inside.proto {
        6 if mapping.closing => config.tcp_closing,
        6 => config.tcp_idle,
        17 => config.udp_idle,
        _ => config.icmp_idle,
    }
}

/// A TCP segment that may open a connection: a SYN (without ACK). A RST
/// neither opens one nor deserves an answer.
fn tcp_opening(packet: &[u8], l4: usize) -> bool {
    packet.get(l4 + 13).is_some_and(|flags| flags & 0x12 == 0x02)
}

/// Destinations an exit must never reach for a client: itself, loopback,
/// unspecified, link-local and multicast addresses.
fn forbidden(dst: IpAddr, public: IpAddr) -> bool {
    dst == public
        || dst.is_loopback()
        || dst.is_unspecified()
        || dst.is_multicast()
        || match dst {
            IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unicast_link_local() || v6.to_ipv4_mapped().is_some(),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const EXIT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const SERVER: [u8; 4] = [203, 0, 113, 80];

    fn client(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7400))
    }

    fn nat() -> Nat {
        Nat::new(NatConfig::new(
            Some(EXIT),
            Some("2001:db8::2".parse().unwrap()),
            40000..=40009,
        ))
    }

    /// A SYN: what opens a mapping.
    fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .tcp(sport, dport, 1, 1000)
            .syn()
            .write(&mut out, b"data")
            .unwrap();
        out
    }

    #[test]
    fn mappings_survive_a_restart_and_unknown_connections_are_refused() {
        let mut nat = nat();
        let now = Instant::now();
        let mut syn = tcp([10, 0, 0, 1], 5000, SERVER, 80);
        nat.outbound(client(1), 2, &mut syn, now).unwrap();
        let nat_port = ports(&syn).unwrap().0;
        // Written and read back, as by a restarted exit.
        let saved = serde_json::to_vec(&nat.state(now)).unwrap();
        let mut again = self::nat();
        assert_eq!(again.restore(serde_json::from_slice(&saved).unwrap(), now), 1);
        let mut reply = Vec::new();
        PacketBuilder::ipv4(SERVER, EXIT.octets(), 64)
            .tcp(80, nat_port, 9, 1000)
            .ack(2)
            .write(&mut reply, b"hi")
            .unwrap();
        assert_eq!(again.inbound(&mut reply, now).unwrap().class, 2);
        // A segment of a connection nobody knows opens nothing.
        let mut stray = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], SERVER, 64)
            .tcp(5001, 80, 1, 1000)
            .ack(1)
            .write(&mut stray, b"late")
            .unwrap();
        assert_eq!(
            again.outbound(client(1), 0, &mut stray, now),
            Err(NatError::NoConnection)
        );
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn outbound_and_reply_round_trip() {
        let mut nat = nat();
        let now = Instant::now();
        let mut packet = tcp([10, 0, 0, 1], 50000, SERVER, 80);
        nat.outbound(client(1), 0, &mut packet, now).unwrap();
        assert_eq!(
            addresses(&packet).unwrap(),
            (IpAddr::V4(EXIT), IpAddr::from(SERVER))
        );
        let (nat_port, _) = ports(&packet).unwrap();
        assert!((40000..=40009).contains(&nat_port));

        let mut reply = tcp(SERVER, 80, EXIT.octets(), nat_port);
        let back = nat.inbound(&mut reply, now).unwrap();
        assert_eq!(
            back,
            Return {
                client: client(1),
                class: 0
            }
        );
        assert_eq!(addresses(&reply).unwrap().1, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(ports(&reply).unwrap(), (80, 50000));
    }

    #[test]
    fn same_flow_keeps_its_port_and_clients_do_not_collide() {
        let mut nat = nat();
        let now = Instant::now();
        let mut a = tcp([10, 0, 0, 1], 50000, SERVER, 80);
        let mut a2 = a.clone();
        let mut b = tcp([10, 0, 0, 1], 50000, SERVER, 80);
        nat.outbound(client(1), 0, &mut a, now).unwrap();
        nat.outbound(client(1), 0, &mut a2, now).unwrap();
        // Another client using the very same inner addresses and ports.
        nat.outbound(client(2), 1, &mut b, now).unwrap();
        assert_eq!(ports(&a), ports(&a2));
        assert_ne!(ports(&a), ports(&b));
        let mut reply = tcp(SERVER, 80, EXIT.octets(), ports(&b).unwrap().0);
        assert_eq!(
            nat.inbound(&mut reply, now).unwrap(),
            Return {
                client: client(2),
                class: 1
            }
        );
    }

    #[test]
    fn replies_from_elsewhere_are_unknown() {
        let mut nat = nat();
        let now = Instant::now();
        let mut packet = tcp([10, 0, 0, 1], 50000, SERVER, 80);
        nat.outbound(client(1), 0, &mut packet, now).unwrap();
        let port = ports(&packet).unwrap().0;
        let mut wrong_host = tcp([203, 0, 113, 81], 80, EXIT.octets(), port);
        assert_eq!(nat.inbound(&mut wrong_host, now), Err(NatError::UnknownMapping));
        let mut wrong_port = tcp(SERVER, 81, EXIT.octets(), port);
        assert_eq!(nat.inbound(&mut wrong_port, now), Err(NatError::UnknownMapping));
    }

    #[test]
    fn icmp_echo_uses_the_identifier() {
        let mut nat = nat();
        let now = Instant::now();
        let mut ping = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], SERVER, 64)
            .icmpv4_echo_request(4242, 1)
            .write(&mut ping, b"p")
            .unwrap();
        nat.outbound(client(1), 0, &mut ping, now).unwrap();
        let (_, id) = echo_id(&ping).unwrap();
        let mut pong = Vec::new();
        PacketBuilder::ipv4(SERVER, EXIT.octets(), 64)
            .icmpv4_echo_reply(id, 1)
            .write(&mut pong, b"p")
            .unwrap();
        nat.inbound(&mut pong, now).unwrap();
        assert_eq!(echo_id(&pong), Some((false, 4242)));
        assert_eq!(addresses(&pong).unwrap().1, IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn refuses_the_exit_itself_and_local_destinations() {
        let mut nat = nat();
        let now = Instant::now();
        for dst in [
            EXIT.octets(),
            [127, 0, 0, 1],
            [169, 254, 1, 1],
            [224, 0, 0, 1],
            [0, 0, 0, 0],
        ] {
            let mut packet = tcp([10, 0, 0, 1], 50000, dst, 22);
            assert_eq!(
                nat.outbound(client(1), 0, &mut packet, now),
                Err(NatError::ForbiddenDestination),
                "{dst:?}"
            );
        }
        assert_eq!(nat.len(), 0);
    }

    #[test]
    fn bounded_table_expires_idle_flows_before_refusing() {
        let mut config = NatConfig::new(Some(EXIT), None, 40000..=40009);
        config.max_flows = 2;
        let mut nat = Nat::new(config);
        let t0 = Instant::now();
        for sport in [1, 2] {
            nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], sport, SERVER, 80), t0)
                .unwrap();
        }
        assert_eq!(
            nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 3, SERVER, 80), t0),
            Err(NatError::Full)
        );
        // Quiet for ten minutes, established connections still hold.
        let quiet = t0 + Duration::from_secs(600);
        assert_eq!(
            nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 3, SERVER, 80), quiet),
            Err(NatError::Full)
        );
        let later = t0 + Duration::from_secs(2 * 3600 + 4 * 60 + 1);
        nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 3, SERVER, 80), later)
            .unwrap();
        assert_eq!(nat.len(), 1);
    }

    #[test]
    fn ports_run_out_per_destination_only() {
        let mut nat = nat();
        let now = Instant::now();
        for sport in 0..10 {
            nat.outbound(
                client(1),
                0,
                &mut tcp([10, 0, 0, 1], 1000 + sport, SERVER, 80),
                now,
            )
            .unwrap();
        }
        assert_eq!(
            nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 2000, SERVER, 80), now),
            Err(NatError::NoPort)
        );
        // Another destination port reuses the same NAT ports.
        nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 2000, SERVER, 443), now)
            .unwrap();
    }

    #[test]
    fn fragments_follow_their_first_both_ways_with_the_exits_own_identification() {
        let mut nat = nat();
        let now = Instant::now();
        let mut whole = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], SERVER, 64)
            .udp(5, 53)
            .write(&mut whole, &[7; 3000])
            .unwrap();
        let split = |packet: &[u8], id: u16| {
            let (header, payload) = packet.split_at(20);
            let piece = |data: &[u8], offset: usize, more: bool| {
                let mut out = header.to_vec();
                out[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
                out[4..6].copy_from_slice(&id.to_be_bytes());
                let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
                out[6..8].copy_from_slice(&field.to_be_bytes());
                out.extend_from_slice(data);
                out
            };
            (
                piece(&payload[..1480], 0, true),
                piece(&payload[1480..], 1480, false),
            )
        };
        let (mut first, mut rest) = split(&whole, 0x4242);
        nat.outbound(client(1), 0, &mut first, now).unwrap();
        nat.outbound(client(1), 0, &mut rest, now).unwrap();
        let (src_first, _) = addresses(&first).unwrap();
        let (src_rest, _) = addresses(&rest).unwrap();
        assert_eq!((src_first, src_rest), (IpAddr::V4(EXIT), IpAddr::V4(EXIT)));
        let ids = (
            u16::from_be_bytes([first[4], first[5]]),
            u16::from_be_bytes([rest[4], rest[5]]),
        );
        assert_eq!(ids.0, ids.1, "one datagram, one identification");
        assert_ne!(ids.0, 0x4242, "the exit's own");
        let nat_port = ports(&first).unwrap().0;
        // A later fragment of a datagram never seen is refused.
        let (_, mut orphan) = split(&whole, 0x4343);
        assert_eq!(
            nat.outbound(client(1), 0, &mut orphan, now),
            Err(NatError::UnknownMapping)
        );

        // The fragmented reply: both pieces back to the client.
        let mut reply = Vec::new();
        PacketBuilder::ipv4(SERVER, EXIT.octets(), 64)
            .udp(53, nat_port)
            .write(&mut reply, &[8; 3000])
            .unwrap();
        let (mut first, mut rest) = split(&reply, 0x0909);
        assert_eq!(nat.inbound(&mut first, now).unwrap().client, client(1));
        assert_eq!(nat.inbound(&mut rest, now).unwrap().client, client(1));
        assert_eq!(addresses(&rest).unwrap().1, IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn icmp_errors_about_a_flow_go_back_to_its_client_as_it_sent_it() {
        let mut nat = nat();
        let now = Instant::now();
        let mut udp = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], SERVER, 64)
            .udp(4444, 7999)
            .write(&mut udp, b"probe")
            .unwrap();
        nat.outbound(client(1), 0, &mut udp, now).unwrap();
        // The server's "port unreachable", quoting the packet as it left.
        let mut error = Vec::new();
        PacketBuilder::ipv4(SERVER, EXIT.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut error, &udp[..28])
            .unwrap();
        assert_eq!(nat.inbound(&mut error, now).unwrap().client, client(1));
        assert_eq!(addresses(&error).unwrap().1, IpAddr::from([10, 0, 0, 1]));
        let quote = icmp_error_quote(&error).unwrap();
        assert_eq!(addresses(&error[quote..]).unwrap().0, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(ports(&error[quote..]), Some((4444, 7999)));
        // Every checksum of the error holds.
        let sliced = etherparse::SlicedPacket::from_ip(&error).unwrap();
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("ICMP");
        };
        assert_eq!(icmp.checksum(), icmp.icmp_type().calc_checksum(icmp.payload()));
        // An error about a flow the exit never carried: refused.
        let mut stranger = Vec::new();
        PacketBuilder::ipv4(SERVER, EXIT.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut stranger, &tcp([203, 0, 113, 1], 1, SERVER, 2)[..28])
            .unwrap();
        assert!(nat.inbound(&mut stranger, now).is_err());
    }

    #[test]
    fn closed_tcp_flows_expire_fast() {
        let mut nat = nat();
        let t0 = Instant::now();
        nat.outbound(client(1), 0, &mut tcp([10, 0, 0, 1], 5, SERVER, 80), t0)
            .unwrap();
        let mut fin = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 1], SERVER, 64)
            .tcp(5, 80, 1, 1000)
            .fin()
            .write(&mut fin, b"")
            .unwrap();
        nat.outbound(client(1), 0, &mut fin, t0).unwrap();
        assert_eq!(nat.expire(t0 + Duration::from_secs(11)), 1);
    }
}
