//! What a module's packets may be: the one place that decides it. The paper's
//! OC0 lets local code send out *a packet it was given*; a module here may
//! hand the underlay (or, a monitor module, an overlay) only packets of
//! flows the host handed it, while those flows live, and hand this host
//! only packets answering them. Its datagrams to its entry nodes are held
//! to a byte budget earned by what the host gives it, so a module (or a
//! specification that names someone else's address as an entry node)
//! cannot make the user's host a flood's source.
//!
//! Plain state, no I/O and no clock: the runner passes the time and asks
//! before each action, and counts the refusals it is told of.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oasis_common::proto::TCP;
use oasis_common::{FlowKey, FragKey};
use oasis_io::packet::{fragment, icmp_error_quote, tcp_closing};
use serde::{Deserialize, Serialize};

use super::ModuleLimits;
use crate::engine::Lifetimes;
use crate::engine::packet::{flow_key, frag_key};

/// Flows one module is handed at most at once; beyond, the longest idle
/// are forgotten (a packet of theirs is handed again with its next one).
const FLOWS: usize = 65_536;
/// Fragmented datagrams followed at once, and for how long (Linux's
/// reassembly time).
const FRAGMENTS: usize = 4_096;
const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);
/// How often idle flows are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// Why a module's packet was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a packet of a live flow the host handed the module.
    NotItsFlow,
    /// Not an answer to a live flow the host handed the module.
    NotAnAnswer,
    /// Past the module's byte budget toward its entry nodes or overlays.
    OverRate,
}

/// What was refused, by kind, since the module was loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRefusals {
    /// Packets for the underlay that were of no flow the host handed it.
    pub to_underlay: u64,
    /// A monitor module's packets over overlays that were of no such flow.
    pub via: u64,
    /// Packets for this host that answered no such flow.
    pub to_host: u64,
    /// Datagrams to its entry nodes or overlays past the byte budget.
    pub over_rate: u64,
}

struct Handed {
    last: Instant,
    closing: bool,
}

/// One module's flows and budget.
pub struct Confinement {
    lifetimes: Lifetimes,
    flows: HashMap<FlowKey, Handed>,
    /// (addresses, protocol) of live flows, ports zeroed, with how many
    /// flows share them: what the later fragments of an answer (which
    /// carry no ports) are checked against.
    pairs: HashMap<FlowKey, u32>,
    /// Fragmented datagrams the host handed, by their identification.
    fragments: HashMap<FragKey, Instant>,
    budget: Budget,
    next_sweep: Instant,
}

impl Confinement {
    pub fn new(limits: &ModuleLimits, lifetimes: Lifetimes, now: Instant) -> Confinement {
        Confinement {
            lifetimes,
            flows: HashMap::new(),
            pairs: HashMap::new(),
            fragments: HashMap::new(),
            budget: Budget::new(limits, now),
            next_sweep: now + SWEEP_EVERY,
        }
    }

    /// The host handed the module `packet` (a bare IP packet): its flow is
    /// the module's to carry, and its bytes earn the module sends.
    pub fn handed(&mut self, packet: &[u8], now: Instant) {
        self.budget.earn(packet.len());
        let Some(key) = flow_key(packet) else {
            return;
        };
        if let Some(piece) = fragment(packet) {
            if self.fragments.len() >= FRAGMENTS {
                self.fragments
                    .retain(|_, at| now.saturating_duration_since(*at) < FRAGMENT_LIFETIME);
            }
            if self.fragments.len() < FRAGMENTS {
                self.fragments.insert(frag_key(&key, &piece), now);
            }
            if !piece.first {
                return;
            }
        }
        let closing = key.proto == TCP && tcp_closing(packet);
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.last = now;
            flow.closing |= closing;
            return;
        }
        if self.flows.len() >= FLOWS {
            self.forget_idle(now, true);
        }
        self.flows.insert(key, Handed { last: now, closing });
        *self.pairs.entry(pair(&key)).or_default() += 1;
    }

    /// Whether the module may send `packet` (a bare IP packet) on the
    /// underlay or over an overlay: a packet of a live flow it was handed.
    pub fn may_leave(&self, packet: &[u8], now: Instant) -> Result<(), Refusal> {
        let key = flow_key(packet).ok_or(Refusal::NotItsFlow)?;
        if let Some(piece) = fragment(packet).filter(|p| !p.first) {
            return self
                .fragments
                .get(&frag_key(&key, &piece))
                .filter(|at| now.saturating_duration_since(**at) < FRAGMENT_LIFETIME)
                .map(|_| ())
                .ok_or(Refusal::NotItsFlow);
        }
        self.live(&key, now).then_some(()).ok_or(Refusal::NotItsFlow)
    }

    /// Whether the module may hand this host `packet` (a bare IP packet):
    /// an answer to a live flow it was handed, a later fragment of one, or
    /// an ICMP error about one.
    pub fn may_come_home(&self, packet: &[u8], now: Instant) -> Result<(), Refusal> {
        let key = flow_key(packet).ok_or(Refusal::NotAnAnswer)?;
        if fragment(packet).is_some_and(|p| !p.first) {
            let answered = self.pairs.contains_key(&pair(&key.reversed()));
            return answered.then_some(()).ok_or(Refusal::NotAnAnswer);
        }
        if self.live(&key.reversed(), now) {
            return Ok(());
        }
        // An ICMP error about a flow (from a router on its way) quotes the
        // flow's own packet.
        let quoted = icmp_error_quote(packet)
            .and_then(|at| flow_key(&packet[at..]))
            .is_some_and(|quoted| self.live(&quoted, now));
        quoted.then_some(()).ok_or(Refusal::NotAnAnswer)
    }

    /// Whether the module may send `len` bytes to an entry node (or over an
    /// overlay) now; spends them if so.
    pub fn may_send(&mut self, len: usize, now: Instant) -> Result<(), Refusal> {
        self.budget.spend(len, now).then_some(()).ok_or(Refusal::OverRate)
    }

    /// Forgets flows idle past their lifetime; call every tick.
    pub fn sweep(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        self.forget_idle(now, false);
        self.fragments
            .retain(|_, at| now.saturating_duration_since(*at) < FRAGMENT_LIFETIME);
    }

    /// Flows the module carries now.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    fn live(&self, key: &FlowKey, now: Instant) -> bool {
        self.flows.get(key).is_some_and(|flow| {
            now.saturating_duration_since(flow.last) <= self.lifetimes.of(key, flow.closing)
        })
    }

    /// Forgets the flows past their lifetime; when `make_room`, the
    /// oldest eighth too.
    fn forget_idle(&mut self, now: Instant, make_room: bool) {
        let lifetimes = self.lifetimes;
        let mut cutoff = None;
        if make_room {
            let mut idle: Vec<Instant> = self.flows.values().map(|f| f.last).collect();
            let eighth = idle.len() / 8;
            idle.select_nth_unstable(eighth);
            cutoff = Some(idle[eighth]);
        }
        let pairs = &mut self.pairs;
        self.flows.retain(|key, flow| {
            let expired = now.saturating_duration_since(flow.last) > lifetimes.of(key, flow.closing)
                || cutoff.is_some_and(|c| flow.last <= c);
            if expired && let Some(count) = pairs.get_mut(&pair(key)) {
                *count -= 1;
                if *count == 0 {
                    pairs.remove(&pair(key));
                }
            }
            !expired
        });
    }
}

/// Addresses and protocol only.
fn pair(key: &FlowKey) -> FlowKey {
    FlowKey {
        sport: 0,
        dport: 0,
        ..*key
    }
}

/// Bytes a module may send outward: `send_ratio` times what the host
/// handed it (kept up to `EARNED_MAX`), and `own_bytes_per_second` for its
/// own protocol (keepalives, measurements), kept up to one second's worth.
struct Budget {
    ratio: u64,
    own_rate: u64,
    earned: u64,
    own: u64,
    refilled: Instant,
}

/// The most a module can save up from what it was handed.
const EARNED_MAX: u64 = 16 << 20;

impl Budget {
    fn new(limits: &ModuleLimits, now: Instant) -> Budget {
        Budget {
            ratio: u64::from(limits.send_ratio),
            own_rate: u64::from(limits.own_bytes_per_second),
            earned: 0,
            own: u64::from(limits.own_bytes_per_second),
            refilled: now,
        }
    }

    fn earn(&mut self, len: usize) {
        self.earned = (self.earned + self.ratio * len as u64).min(EARNED_MAX);
    }

    fn spend(&mut self, len: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled);
        let refill = (self.own_rate as u128 * elapsed.as_micros() / 1_000_000) as u64;
        if refill > 0 {
            self.own = (self.own + refill).min(self.own_rate);
            self.refilled = now;
        }
        let len = len as u64;
        if self.earned >= len {
            self.earned -= len;
            true
        } else if self.earned + self.own >= len {
            self.own -= len - self.earned;
            self.earned = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    const HOST: [u8; 4] = [10, 0, 0, 2];
    const SERVER: [u8; 4] = [203, 0, 113, 9];
    const OTHER: [u8; 4] = [198, 51, 100, 7];

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, &vec![7; len])
            .unwrap();
        out
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, fin: bool) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 64000);
        let builder = if fin { builder.fin().ack(1) } else { builder.syn() };
        let mut out = Vec::new();
        builder.write(&mut out, b"").unwrap();
        out
    }

    fn confinement(now: Instant) -> Confinement {
        Confinement::new(
            &ModuleLimits::default(),
            Lifetimes::new(Duration::from_secs(120)),
            now,
        )
    }

    #[test]
    fn only_packets_of_flows_it_was_handed_may_leave() {
        let now = Instant::now();
        let mut c = confinement(now);
        let handed = udp(HOST, SERVER, 40000, 53, 20);
        assert_eq!(c.may_leave(&handed, now), Err(Refusal::NotItsFlow));
        c.handed(&handed, now);
        assert_eq!(c.may_leave(&handed, now), Ok(()));
        // Another destination, port or source: not its flow.
        for other in [
            udp(HOST, OTHER, 40000, 53, 20),
            udp(HOST, SERVER, 40000, 22, 20),
            udp(OTHER, SERVER, 40000, 53, 20),
            tcp(HOST, SERVER, 40000, 53, false),
        ] {
            assert_eq!(c.may_leave(&other, now), Err(Refusal::NotItsFlow));
        }
        assert_eq!(c.may_leave(b"not a packet", now), Err(Refusal::NotItsFlow));
        // The flow ends when idle past its lifetime.
        let later = now + Duration::from_secs(121);
        assert_eq!(c.may_leave(&handed, later), Err(Refusal::NotItsFlow));
        c.sweep(later);
        assert_eq!(c.flows(), 0);
        assert!(c.pairs.is_empty());
    }

    #[test]
    fn only_answers_to_its_flows_come_home() {
        let now = Instant::now();
        let mut c = confinement(now);
        c.handed(&tcp(HOST, SERVER, 40000, 443, false), now);
        assert_eq!(
            c.may_come_home(&tcp(SERVER, HOST, 443, 40000, false), now),
            Ok(())
        );
        assert_eq!(
            c.may_come_home(&tcp(SERVER, HOST, 443, 40001, false), now),
            Err(Refusal::NotAnAnswer)
        );
        assert_eq!(
            c.may_come_home(&tcp(OTHER, HOST, 443, 40000, false), now),
            Err(Refusal::NotAnAnswer)
        );
        // An ICMP error about the flow, from a router on its way.
        let mut error = Vec::new();
        let quoted = tcp(HOST, SERVER, 40000, 443, false);
        PacketBuilder::ipv4(OTHER, HOST, 64)
            .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut error, &quoted[..28])
            .unwrap();
        assert_eq!(c.may_come_home(&error, now), Ok(()));
        // A closed connection lives 10 s more.
        c.handed(&tcp(HOST, SERVER, 40000, 443, true), now);
        let later = now + Duration::from_secs(11);
        assert_eq!(
            c.may_come_home(&tcp(SERVER, HOST, 443, 40000, false), later),
            Err(Refusal::NotAnAnswer)
        );
    }

    #[test]
    fn fragments_follow_their_datagram() {
        let now = Instant::now();
        let mut c = confinement(now);
        let mut whole = udp(HOST, SERVER, 40000, 9000, 3000);
        oasis_io::packet::set_fragment_id(&mut whole, 77);
        let (head, payload) = whole.split_at(20);
        let piece = |data: &[u8], offset: usize, more: bool, src: [u8; 4], dst: [u8; 4]| {
            let mut out = head.to_vec();
            out[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            out[6..8].copy_from_slice(&((offset / 8) as u16 | if more { 0x2000 } else { 0 }).to_be_bytes());
            out[12..16].copy_from_slice(&src);
            out[16..20].copy_from_slice(&dst);
            out.extend_from_slice(data);
            out
        };
        let first = piece(&payload[..1480], 0, true, HOST, SERVER);
        let second = piece(&payload[1480..], 1480, false, HOST, SERVER);
        assert_eq!(c.may_leave(&second, now), Err(Refusal::NotItsFlow));
        c.handed(&first, now);
        c.handed(&second, now);
        assert_eq!(c.may_leave(&first, now), Ok(()));
        assert_eq!(c.may_leave(&second, now), Ok(()));
        // A later fragment of an answer: between the flow's addresses.
        let answer = piece(&payload[1480..], 1480, false, SERVER, HOST);
        assert_eq!(c.may_come_home(&answer, now), Ok(()));
        let stranger = piece(&payload[1480..], 1480, false, OTHER, HOST);
        assert_eq!(c.may_come_home(&stranger, now), Err(Refusal::NotAnAnswer));
    }

    #[test]
    fn sends_outward_are_held_to_what_the_host_handed_and_a_small_allowance() {
        let limits = ModuleLimits {
            send_ratio: 2,
            own_bytes_per_second: 1000,
            ..ModuleLimits::default()
        };
        let now = Instant::now();
        let mut c = Confinement::new(&limits, Lifetimes::new(Duration::from_secs(120)), now);
        // Its own allowance: a second's worth.
        assert_eq!(c.may_send(600, now), Ok(()));
        assert_eq!(c.may_send(600, now), Err(Refusal::OverRate));
        // Handed 1,000 bytes: 2,000 may go out.
        c.handed(&udp(HOST, SERVER, 1, 2, 1000 - 28), now);
        assert_eq!(c.may_send(1500, now), Ok(()));
        assert_eq!(c.may_send(900, now), Ok(()));
        assert_eq!(c.may_send(100, now), Err(Refusal::OverRate));
        // The allowance comes back with time, never more than a second's.
        let later = now + Duration::from_secs(10);
        assert_eq!(c.may_send(1000, later), Ok(()));
        assert_eq!(c.may_send(1, later), Err(Refusal::OverRate));
    }

    #[test]
    fn a_full_table_forgets_the_longest_idle() {
        let now = Instant::now();
        let mut c = confinement(now);
        for i in 0..FLOWS as u32 {
            let at = now + Duration::from_millis(u64::from(i) / 1000);
            c.handed(
                &udp(HOST, SERVER, (i % 60000) as u16 + 1, 1000 + (i / 60000) as u16, 1),
                at,
            );
        }
        assert_eq!(c.flows(), FLOWS);
        let at = now + Duration::from_secs(70);
        c.handed(&udp(HOST, OTHER, 1, 1, 1), at);
        assert!(c.flows() <= FLOWS - FLOWS / 8 + 1, "{}", c.flows());
        assert_eq!(c.may_leave(&udp(HOST, OTHER, 1, 1, 1), at), Ok(()));
        // The newest of the old ones are kept.
        let newest = FLOWS as u32 - 1;
        let last = udp(
            HOST,
            SERVER,
            (newest % 60000) as u16 + 1,
            1000 + (newest / 60000) as u16,
            1,
        );
        assert_eq!(c.may_leave(&last, at), Ok(()));
        let pairs: u32 = c.pairs.values().sum();
        assert_eq!(pairs as usize, c.flows());
    }
}
