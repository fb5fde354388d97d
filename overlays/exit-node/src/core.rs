//! What the exit node decides about each datagram and packet, with no
//! socket, TUN or clock in it: the `oasis-exit` binary reads, asks this,
//! and sends. Given the time, a client's datagram is admitted or refused
//! (who sent it, its token), a queued packet is NATed toward the Internet
//! or answered with a reset, a reply is mapped back to its client or
//! answered with a reset, and once a second the mappings age and the state
//! to save is handed out. Every outcome is counted here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use serde::Serialize;

use crate::clients::{Client, authorised, lookup};
use crate::fast::{FastEntry, FastPath, FastWork};
use crate::nat::{Inside, Mapped, Nat, NatError, NatState};

#[derive(Serialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

#[derive(Serialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct ClientStats {
    pub class: u8,
    pub to_internet: Traffic,
    pub to_client: Traffic,
    /// Dropped because the client's class queue was full.
    pub dropped: u64,
}

#[derive(Serialize, Default, Debug, Clone)]
pub struct ExitStats {
    pub clients: BTreeMap<SocketAddr, ClientStats>,
    pub classes: BTreeMap<u8, ClientStats>,
    /// Datagrams from senders not on the client list.
    pub refused_unknown_sender: u64,
    /// Datagrams whose shim did not carry the client's token.
    pub refused_token: u64,
    /// Datagrams on a WireGuard port of no peer of this exit, or that
    /// failed to authenticate (forged, replayed).
    pub refused_wireguard: u64,
    /// Packets the NAT refused, by reason.
    pub nat_refused: BTreeMap<String, u64>,
    /// Replies that matched no mapping (dropped; the host's own stack never
    /// sees them, so it sends no resets).
    pub unknown_replies: u64,
    pub nat_flows: usize,
    /// Flows the kernel carries (the fast path); their packets are not in
    /// the counts above.
    pub fast_flows: usize,
}

/// What becomes of a client's packet whose turn came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToInternet {
    /// Rewritten in place: send it.
    Send,
    /// Refused; `reset` holds `[shim][TCP reset]` for the client, so its
    /// application learns at once that the connection is gone instead of
    /// retransmitting into nothing.
    Reset,
    /// Refused, nothing to answer.
    Refused,
}

/// What becomes of a packet from the Internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToClient {
    /// Rewritten in place for this client: send it with the shim.
    Client(SocketAddr),
    /// Matches no mapping; `reset` holds a TCP reset for its sender (a
    /// server still sending to a mapping the exit lost).
    Reset,
    /// Matches no mapping, nothing to answer.
    Dropped,
}

/// The exit's shared state: the NAT and the counters. The binary keeps it
/// under one lock, taken once per batch.
pub struct Exit {
    pub nat: Nat,
    pub stats: ExitStats,
    /// The NAT's change count when its state was last handed out to save.
    saved_changes: u64,
    /// The kernel's fast path, when the exit has one.
    fast: Option<FastPath>,
    /// Mappings made or gone, between the NAT and the fast path.
    mapped: Vec<Mapped>,
    /// Kernel work for the binary to carry out, in order.
    work: Vec<FastWork>,
}

impl Exit {
    /// An exit around `nat` (restored from a state file or new): its
    /// mappings count as saved.
    pub fn new(nat: Nat) -> Exit {
        let saved_changes = nat.changes();
        Exit {
            nat,
            stats: ExitStats::default(),
            saved_changes,
            fast: None,
            mapped: Vec::new(),
            work: Vec::new(),
        }
    }

    /// From now on the kernel carries what it can of each mapping (those
    /// already made too): `take_fast_work` hands out what to write.
    pub fn with_fast_path(mut self, fast: FastPath) -> Exit {
        self.nat.follow();
        self.fast = Some(fast);
        self.follow_mappings();
        self
    }

    /// Mappings made and gone since the last call, as kernel work.
    fn follow_mappings(&mut self) {
        let Some(fast) = &mut self.fast else {
            return;
        };
        self.nat.take_news(&mut self.mapped);
        for mapped in self.mapped.drain(..) {
            fast.made(&mapped, &mut self.work);
        }
        self.nat.take_gone(&mut self.mapped);
        for mapped in self.mapped.drain(..) {
            fast.ended(&mapped, &mut self.work);
        }
    }

    /// The kernel work asked for since the last call, in order.
    pub fn take_fast_work(&mut self, into: &mut Vec<FastWork>) {
        into.append(&mut self.work);
    }

    /// The kernel's flows whose mappings would expire at `now` by what
    /// the user-space path saw (`all`: every one, as before the state is
    /// saved for the last time): the caller asks the kernel when each last
    /// carried a packet (`fast_seen`) before `upkeep` ages them.
    pub fn fast_due(&self, now: Instant, all: bool, into: &mut Vec<(Inside, FastEntry)>) {
        if let Some(fast) = &self.fast {
            let due = fast.all().filter(|inside| all || self.nat.due(inside, now));
            into.extend(fast.held(due));
        }
    }

    /// The kernel carried a packet of the flow at `at`.
    pub fn fast_seen(&mut self, inside: &Inside, at: Instant) {
        self.nat.seen(inside, at);
    }

    /// A datagram from `sender`: its packet (after the shim) and the
    /// sender's class when the sender is a client and its shim carries
    /// the client's token; None, counted, otherwise.
    pub fn admit<'d>(
        &mut self,
        clients: &[Client],
        shim_len: usize,
        sender: SocketAddr,
        datagram: &'d [u8],
    ) -> Option<(u8, &'d [u8])> {
        let Some(client) = lookup(clients, sender.ip()) else {
            self.stats.refused_unknown_sender += 1;
            return None;
        };
        if datagram.len() <= shim_len || !authorised(client, &datagram[..shim_len]) {
            self.stats.refused_token += 1;
            return None;
        }
        Some((client.class, &datagram[shim_len..]))
    }

    /// A class's counters, which say which class they are.
    fn class_stats(&mut self, class: u8) -> &mut ClientStats {
        let stats = self.stats.classes.entry(class).or_default();
        stats.class = class;
        stats
    }

    /// WireGuard datagrams refused before the core saw them.
    pub fn refused_wireguard(&mut self, count: u64) {
        self.stats.refused_wireguard += count;
    }

    /// An admitted packet found its class's queue full.
    pub fn queue_full(&mut self, sender: SocketAddr, class: u8) {
        self.stats.clients.entry(sender).or_default().dropped += 1;
        self.class_stats(class).dropped += 1;
    }

    /// A client's packet whose turn came: NATed in place toward its
    /// destination, or refused (with a reset in `reset`, after
    /// `shim_len` zeros, when the client should hear of it).
    pub fn to_internet(
        &mut self,
        sender: SocketAddr,
        class: u8,
        packet: &mut [u8],
        now: Instant,
        shim_len: usize,
        reset: &mut Vec<u8>,
    ) -> ToInternet {
        // A client on this same host behind a veth (its kernel wrapped the
        // packet) hands over a checksum its device was to finish: nothing
        // after this would.
        oasis_io::packet::finish_checksum(packet);
        match self.nat.outbound(sender, class, packet, now) {
            Ok(()) => {
                self.follow_mappings();
                let size = packet.len();
                let client = self.stats.clients.entry(sender).or_default();
                client.class = class;
                client.to_internet.add(size);
                self.class_stats(class).to_internet.add(size);
                ToInternet::Send
            }
            Err(e) => {
                *self.stats.nat_refused.entry(nat_reason(e).into()).or_default() += 1;
                if e == NatError::NoConnection && oasis_io::packet::reset_reply(packet, reset) {
                    // The shim in front, zeros as on every reply.
                    reset.splice(0..0, std::iter::repeat_n(0u8, shim_len));
                    return ToInternet::Reset;
                }
                ToInternet::Refused
            }
        }
    }

    /// A packet from the Internet: mapped back in place to its client, or
    /// refused (with a TCP reset for its sender in `reset` when it belongs
    /// to a connection).
    pub fn to_client(&mut self, packet: &mut [u8], now: Instant, reset: &mut Vec<u8>) -> ToClient {
        match self.nat.inbound(packet, now) {
            Ok(back) => {
                let size = packet.len();
                self.stats
                    .clients
                    .entry(back.client)
                    .or_default()
                    .to_client
                    .add(size);
                self.class_stats(back.class).to_client.add(size);
                ToClient::Client(back.client)
            }
            Err(_) => {
                self.stats.unknown_replies += 1;
                if oasis_io::packet::reset_reply(packet, reset) {
                    ToClient::Reset
                } else {
                    ToClient::Dropped
                }
            }
        }
    }

    /// The once-a-second work: idle mappings expire; the counters to
    /// publish, and the NAT's state when it changed since it was last
    /// handed out (or `always`, when the exit stops) for the caller to save.
    pub fn upkeep(&mut self, now: Instant, always: bool) -> (ExitStats, Option<NatState>) {
        self.nat.expire(now);
        self.follow_mappings();
        self.stats.nat_flows = self.nat.len();
        self.stats.fast_flows = self.fast.as_ref().map_or(0, FastPath::flows);
        let changes = self.nat.changes();
        let state = (changes != self.saved_changes || always).then(|| {
            self.saved_changes = changes;
            self.nat.state(now)
        });
        (self.stats.clone(), state)
    }
}

pub fn nat_reason(e: NatError) -> &'static str {
    match e {
        NatError::Packet(_) => "malformed",
        NatError::Unsupported => "unsupported protocol",
        NatError::NoPublicAddress => "no public address of that family",
        NatError::ForbiddenDestination => "forbidden destination",
        NatError::Full => "table full",
        NatError::NoPort => "no free port",
        NatError::UnknownMapping => "unknown mapping",
        NatError::NoConnection => "no such connection (reset sent back)",
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use etherparse::PacketBuilder;

    use super::*;
    use crate::nat::NatConfig;

    const EXIT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const SERVER: [u8; 4] = [203, 0, 113, 80];
    const SHIM: usize = 4;

    fn exit() -> Exit {
        let mut config = NatConfig::new(Some(EXIT), None, 40000..=40009);
        config.udp_idle = Duration::from_secs(120);
        Exit::new(Nat::new(config))
    }

    fn clients() -> Vec<Client> {
        ["10.0.0.0/24,class=1,token=a1b2", "10.0.1.0/24"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect()
    }

    fn sender(net: u8, host: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, net, host], 7400))
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 1000);
        let builder = if syn { builder.syn() } else { builder.ack(1) };
        let mut out = Vec::new();
        builder.write(&mut out, b"data").unwrap();
        out
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, b"hello")
            .unwrap();
        out
    }

    fn datagram(shim: &[u8], packet: &[u8]) -> Vec<u8> {
        [shim, packet].concat()
    }

    fn source(packet: &[u8]) -> std::net::IpAddr {
        oasis_io::packet::addresses(packet).unwrap().0
    }

    #[test]
    fn only_clients_with_their_token_are_admitted() {
        let mut exit = exit();
        let clients = clients();
        let packet = udp([10, 0, 0, 5], SERVER, 5000, 53);
        let token = [0xa1, 0xb2, 0, 0];

        let admitted = datagram(&token, &packet);
        let got = exit.admit(&clients, SHIM, sender(0, 5), &admitted);
        assert_eq!(got, Some((1, packet.as_slice())), "the shim is taken off");
        let wrong = datagram(&[0xa1, 0xb3, 0, 0], &packet);
        assert_eq!(exit.admit(&clients, SHIM, sender(0, 5), &wrong), None);
        let short = [0xa1, 0xb2, 0];
        assert_eq!(exit.admit(&clients, SHIM, sender(0, 5), &short), None);
        // A prefix without a token needs none; a stranger is refused.
        let any = datagram(&[0; 4], &packet);
        assert!(exit.admit(&clients, SHIM, sender(1, 9), &any).is_some());
        let stranger = SocketAddr::from(([192, 0, 2, 1], 7400));
        assert_eq!(exit.admit(&clients, SHIM, stranger, &any), None);
        assert_eq!(
            (exit.stats.refused_token, exit.stats.refused_unknown_sender),
            (2, 1)
        );
    }

    #[test]
    fn packets_leave_from_the_exit_and_replies_find_their_client() {
        let mut exit = exit();
        let now = Instant::now();
        let client = sender(0, 5);
        let mut reset = Vec::new();
        let mut syn = tcp([10, 0, 0, 5], SERVER, 5000, 80, true);
        let out = exit.to_internet(client, 1, &mut syn, now, SHIM, &mut reset);
        assert_eq!(out, ToInternet::Send);
        assert_eq!(source(&syn), std::net::IpAddr::V4(EXIT));
        let nat_port = oasis_io::packet::ports(&syn).unwrap().0;

        let mut reply = tcp(SERVER, EXIT.octets(), 80, nat_port, false);
        assert_eq!(
            exit.to_client(&mut reply, now, &mut reset),
            ToClient::Client(client)
        );
        let (_, dst) = oasis_io::packet::addresses(&reply).unwrap();
        assert_eq!(dst, std::net::IpAddr::from([10, 0, 0, 5]));
        assert_eq!(oasis_io::packet::ports(&reply).unwrap().1, 5000);

        let counted = &exit.stats.clients[&client];
        assert_eq!(
            (
                counted.class,
                counted.to_internet.packets,
                counted.to_client.packets
            ),
            (1, 1, 1)
        );
        assert_eq!(exit.stats.classes[&1].to_internet.bytes, syn.len() as u64);
    }

    #[test]
    fn lost_connections_are_reset_both_ways() {
        let mut exit = exit();
        let now = Instant::now();
        let mut reset = Vec::new();
        // A client's segment of a connection the exit never saw.
        let mut data = tcp([10, 0, 0, 5], SERVER, 5000, 80, false);
        let out = exit.to_internet(sender(0, 5), 1, &mut data, now, SHIM, &mut reset);
        assert_eq!(out, ToInternet::Reset);
        assert_eq!(&reset[..SHIM], &[0; SHIM], "a reply's shim is zeros");
        let rst = &reset[SHIM..];
        assert_eq!(
            source(rst),
            std::net::IpAddr::from(SERVER),
            "from the server's address"
        );
        assert_eq!(exit.stats.nat_refused[nat_reason(NatError::NoConnection)], 1);
        // A server sending to a mapping the exit does not hold.
        let mut stray = tcp(SERVER, EXIT.octets(), 80, 40003, false);
        assert_eq!(exit.to_client(&mut stray, now, &mut reset), ToClient::Reset);
        let mut stray_udp = udp(SERVER, EXIT.octets(), 53, 40003);
        assert_eq!(exit.to_client(&mut stray_udp, now, &mut reset), ToClient::Dropped);
        assert_eq!(exit.stats.unknown_replies, 2);
    }

    #[test]
    fn upkeep_ages_mappings_and_hands_out_the_state_only_when_it_changed() {
        let mut exit = exit();
        let t0 = Instant::now();
        let (_, state) = exit.upkeep(t0, false);
        assert!(state.is_none(), "nothing changed");
        let mut query = udp([10, 0, 0, 5], SERVER, 5000, 53);
        let out = exit.to_internet(sender(0, 5), 1, &mut query, t0, SHIM, &mut Vec::new());
        assert_eq!(out, ToInternet::Send);
        let (stats, state) = exit.upkeep(t0 + Duration::from_secs(1), false);
        assert_eq!((stats.nat_flows, state.map(|s| s.len())), (1, Some(1)));
        assert!(exit.upkeep(t0 + Duration::from_secs(2), false).1.is_none());
        assert_eq!(
            exit.upkeep(t0 + Duration::from_secs(2), true).1.map(|s| s.len()),
            Some(1)
        );
        // Past the UDP lifetime the mapping goes, and the change is saved.
        let (stats, state) = exit.upkeep(t0 + Duration::from_secs(200), false);
        assert_eq!((stats.nat_flows, state.map(|s| s.len())), (0, Some(0)));
    }

    #[test]
    fn the_kernel_gets_each_new_mapping_and_keeps_it_alive_until_it_is_idle_there_too() {
        let clients = clients();
        let fast = FastPath::new(EXIT, (7400, 0), SHIM, clients.clone());
        let mut exit = exit().with_fast_path(fast);
        let t0 = Instant::now();
        let mut work = Vec::new();
        let mut query = udp([10, 0, 1, 5], SERVER, 5000, 53);
        let client = sender(1, 5);
        let out = exit.to_internet(client, 0, &mut query, t0, SHIM, &mut Vec::new());
        assert_eq!(out, ToInternet::Send);
        exit.take_fast_work(&mut work);
        let [FastWork::Install(entry)] = work[..] else {
            panic!("one install: {work:?}");
        };
        let nat_port = oasis_io::packet::ports(&query).unwrap().0;
        assert_eq!(entry.out.nat_port, nat_port, "the port the NAT gave");
        // A second packet of the flow makes no new work.
        let mut again = udp([10, 0, 1, 5], SERVER, 5000, 53);
        exit.to_internet(client, 0, &mut again, t0, SHIM, &mut Vec::new());
        work.clear();
        exit.take_fast_work(&mut work);
        assert!(work.is_empty());

        // Past the UDP lifetime by the user-space clock: due, unless the
        // kernel saw it; it did, so upkeep keeps it.
        let later = t0 + std::time::Duration::from_secs(150);
        let mut due = Vec::new();
        exit.fast_due(later, false, &mut due);
        assert_eq!(due.len(), 1);
        let (inside, _) = due[0];
        exit.fast_seen(&inside, later - std::time::Duration::from_secs(5));
        let (stats, _) = exit.upkeep(later, false);
        assert_eq!((stats.nat_flows, stats.fast_flows), (1, 1));
        exit.take_fast_work(&mut work);
        assert!(work.is_empty(), "nothing removed: {work:?}");
        // Idle in the kernel too: the mapping and its entries go.
        let much_later = later + std::time::Duration::from_secs(150);
        let (stats, _) = exit.upkeep(much_later, false);
        assert_eq!((stats.nat_flows, stats.fast_flows), (0, 0));
        exit.take_fast_work(&mut work);
        assert_eq!(work, [FastWork::Remove(entry)]);
    }
}
