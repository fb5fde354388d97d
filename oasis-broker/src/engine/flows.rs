//! The flow table: the carrier of each flow the broker has seen, chosen on
//! its first packet and kept for the flow's life, so a legacy destination
//! always sees one source address. One table per packet thread: a flow's
//! packets always arrive on the same queue, so no lock is needed.
//!
//! A flow lives as long as its transport does ([`Lifetimes`]): an
//! established TCP connection may be quiet for hours and must still find
//! its carrier (and its fake address's mapping) when the server speaks
//! first; one that has shown FIN or RST goes soon after it falls quiet;
//! other flows live by their activity.
//!
//! The table is bounded. When it is full, flows idle the longest (for
//! their kind) are forgotten first (idle for half their lifetime, then a
//! quarter, ...), so a burst of new flows can never grow it without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use oasis_common::FlowKey;

use super::offload::Offload;
use super::routes::Via;
use super::tables::KernelSeen;
use crate::monitor::Why;

/// How long a flow lives without a packet, by transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// An established TCP connection: 2 h 4 min by default, the least a
    /// NAT may keep one (RFC 5382, REQ-5), as applications' keepalives
    /// (2 h by default on Linux) assume.
    pub tcp: Duration,
    /// A TCP connection after a FIN or RST went by.
    pub tcp_closing: Duration,
    /// UDP and everything else, by activity (RFC 4787 asks at least 2 min).
    pub other: Duration,
}

impl Lifetimes {
    pub const DEFAULT_TCP: Duration = Duration::from_secs(2 * 3600 + 4 * 60);
    pub const DEFAULT_TCP_CLOSING: Duration = Duration::from_secs(10);

    /// Lifetimes with the defaults for TCP and `other` for the rest.
    pub fn new(other: Duration) -> Lifetimes {
        Lifetimes {
            tcp: Self::DEFAULT_TCP,
            tcp_closing: Self::DEFAULT_TCP_CLOSING,
            other,
        }
    }

    /// A flow's lifetime without packets.
    pub fn of(&self, key: &FlowKey, closing: bool) -> Duration {
        match key.proto {
            TCP if closing => self.tcp_closing.min(self.tcp),
            TCP => self.tcp,
            _ => self.other,
        }
    }
}

use oasis_common::proto::TCP;

/// A flow to a fake address: which real address stands behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeBinding {
    pub fake: IpAddr,
    pub real: IpAddr,
}

#[derive(Debug)]
pub struct Flow {
    /// The rule that claimed the flow; None when it no longer existed.
    pub rule: Option<u32>,
    pub via: Via,
    pub fake: Option<FakeBinding>,
    pub started: Instant,
    pub last_seen: Instant,
    pub packets: u64,
    /// A TCP flow whose FIN or RST went by (from this host).
    pub closing: bool,
    /// A metric rule's flow: why its carrier was chosen.
    pub why: Option<Why>,
    /// Its carrier was the Monitor's choice: the flow may be rescued when
    /// its handshake goes unanswered.
    pub monitored: bool,
    /// Where its packets after the first are handled. An in-kernel flow's
    /// packets reach the engine only when the kernel lost its cached
    /// verdict, or its SYN went again.
    pub offload: Offload,
    /// Through a WireGuard overlay: the tunnel address it leaves from.
    pub tunnel: Option<IpAddr>,
}

impl Flow {
    pub fn new(rule: Option<u32>, via: Via, fake: Option<FakeBinding>, now: Instant) -> Flow {
        Flow {
            rule,
            via,
            fake,
            started: now,
            last_seen: now,
            packets: 0,
            closing: false,
            why: None,
            monitored: false,
            offload: Offload::Broker,
            tunnel: None,
        }
    }

    /// Whether the kernel carries the flow's packets after its first.
    pub fn in_kernel(&self) -> bool {
        self.offload.in_kernel()
    }

    /// Whether the Monitor chose its carrier.
    pub fn monitored(&self) -> bool {
        self.monitored
    }
}

/// What the table holds for a packet's flow.
pub enum Lookup<'a> {
    Live(&'a mut Flow),
    /// It held one that had gone idle: the packet starts a new flow, and
    /// the old one must be ended.
    Stale(Flow),
    Absent,
}

/// Tables start this small and grow as flows arrive.
const INITIAL_CAPACITY: usize = 1024;

#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    lifetimes: Lifetimes,
    capacity: usize,
}

impl FlowTable {
    pub fn new(lifetimes: Lifetimes, capacity: usize) -> FlowTable {
        FlowTable {
            flows: HashMap::with_capacity(INITIAL_CAPACITY.min(capacity)),
            lifetimes,
            capacity: capacity.max(1),
        }
    }

    /// The flow of a packet, marked as seen now.
    pub fn lookup(&mut self, key: &FlowKey, now: Instant) -> Lookup<'_> {
        let stale = match self.flows.get(key) {
            None => return Lookup::Absent,
            // An in-kernel flow's packets reach the engine only by accident
            // (a race with the NAT entry); the sweep knows its real idle time.
            Some(flow) => {
                !flow.in_kernel()
                    && now.saturating_duration_since(flow.last_seen) > self.lifetimes.of(key, flow.closing)
            }
        };
        if stale {
            return Lookup::Stale(self.flows.remove(key).expect("present"));
        }
        let flow = self.flows.get_mut(key).expect("present");
        flow.last_seen = now;
        flow.packets += 1;
        Lookup::Live(flow)
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key)
    }

    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        self.flows.get_mut(key)
    }

    pub fn is_full(&self) -> bool {
        self.flows.len() >= self.capacity
    }

    /// Adds a flow (its first packet counted). The caller makes room first.
    pub fn insert(&mut self, key: FlowKey, mut flow: Flow) {
        flow.packets = 1;
        self.flows.insert(key, flow);
    }

    /// Moves flows idle for longer than their lifetime divided by
    /// `divisor` to `ended`. `kernel_seen` says what the kernel knows of an
    /// in-kernel flow.
    fn sweep(
        &mut self,
        now: Instant,
        divisor: u32,
        mut kernel_seen: impl FnMut(&FlowKey, &Flow) -> Option<KernelSeen>,
        ended: &mut Vec<(FlowKey, Flow)>,
    ) {
        let lifetimes = self.lifetimes;
        let gone = self.flows.extract_if(|key, flow| {
            let limit = |closing| lifetimes.of(key, closing) / divisor;
            // Within even the shortest lifetime it could have: what the
            // kernel knows could only make it younger, so it is not asked
            // (a system call or two per flow, each sweep).
            if now.saturating_duration_since(flow.last_seen) <= limit(true) {
                return false;
            }
            if flow.in_kernel()
                && let Some(kernel) = kernel_seen(key, flow)
            {
                // Kept, so that later sweeps ask again only once this is
                // stale too.
                flow.last_seen = flow.last_seen.max(kernel.at);
                flow.closing |= kernel.closing;
            }
            now.saturating_duration_since(flow.last_seen) > limit(flow.closing)
        });
        ended.extend(gone);
    }

    /// Ends the flows idle past their lifetime.
    pub fn expire(
        &mut self,
        now: Instant,
        kernel_seen: impl FnMut(&FlowKey, &Flow) -> Option<KernelSeen>,
        ended: &mut Vec<(FlowKey, Flow)>,
    ) {
        self.sweep(now, 1, kernel_seen, ended);
    }

    /// Frees an eighth of the table or more, taking the flows idle the
    /// longest for their kind: those idle for half their lifetime, then a
    /// quarter, and so on. Returns how many went.
    pub fn make_room(
        &mut self,
        now: Instant,
        mut kernel_seen: impl FnMut(&FlowKey, &Flow) -> Option<KernelSeen>,
        ended: &mut Vec<(FlowKey, Flow)>,
    ) -> usize {
        let before = self.flows.len();
        let target = self.capacity - self.capacity / 8;
        let mut divisor = 1u32;
        while self.flows.len() > target && !self.flows.is_empty() {
            divisor = divisor.saturating_mul(2);
            self.sweep(now, divisor, &mut kernel_seen, ended);
            if divisor == u32::MAX {
                break;
            }
        }
        before - self.flows.len()
    }

    /// Notes that a flow's FIN or RST went by.
    pub fn closing(&mut self, key: &FlowKey) {
        if let Some(flow) = self.flows.get_mut(key) {
            flow.closing = true;
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.flows.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&FlowKey, &mut Flow)> {
        self.flows.iter_mut()
    }

    /// Takes a flow out of the table.
    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        self.flows.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OverlayId;

    fn key(port: u16) -> FlowKey {
        FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 9], 6, 40000, port)
    }

    fn live(table: &mut FlowTable, key: &FlowKey, now: Instant) -> Option<Via> {
        match table.lookup(key, now) {
            Lookup::Live(flow) => Some(flow.via),
            _ => None,
        }
    }

    #[test]
    fn a_flow_keeps_its_carrier_until_idle() {
        let mut table = FlowTable::new(
            Lifetimes {
                tcp: Duration::from_secs(10),
                ..Lifetimes::new(Duration::from_secs(10))
            },
            100,
        );
        let t0 = Instant::now();
        let overlay = Via::Overlay(OverlayId(1));
        assert!(matches!(table.lookup(&key(80), t0), Lookup::Absent));
        table.insert(key(80), Flow::new(Some(1), overlay, None, t0));
        assert_eq!(
            live(&mut table, &key(80), t0 + Duration::from_secs(5)),
            Some(overlay)
        );
        assert_eq!(table.get(&key(80)).unwrap().packets, 2);
        // Idle from 5 s to 16 s: longer than the timeout.
        match table.lookup(&key(80), t0 + Duration::from_secs(16)) {
            Lookup::Stale(old) => assert_eq!(old.via, overlay),
            _ => panic!("expected the idle flow back"),
        }
        assert!(table.is_empty());
    }

    /// A fake address's flow the kernel's NAT rewrites.
    fn translated(fake: FakeBinding, at: Instant) -> Flow {
        let mut flow = Flow::new(Some(1), Via::Underlay, Some(fake), at);
        flow.offload = Offload::Translated { measured: false };
        flow
    }

    #[test]
    fn in_kernel_flows_are_aged_by_the_kernels_clock() {
        let mut table = FlowTable::new(
            Lifetimes {
                tcp: Duration::from_secs(10),
                ..Lifetimes::new(Duration::from_secs(10))
            },
            100,
        );
        let t0 = Instant::now();
        let fake = FakeBinding {
            fake: "198.18.0.1".parse().unwrap(),
            real: "192.0.2.1".parse().unwrap(),
        };
        table.insert(key(1), translated(fake, t0));
        table.insert(key(2), translated(fake, t0));
        table.insert(key(3), Flow::new(Some(1), Via::Underlay, None, t0));
        // Long after its first packet the kernel still sees flow 1.
        let later = t0 + Duration::from_secs(60);
        assert!(matches!(table.lookup(&key(1), later), Lookup::Live(_)));
        let mut ended = Vec::new();
        let seen = KernelSeen {
            at: later,
            closing: false,
        };
        table.expire(later, |k, _| (k.dport == 1).then_some(seen), &mut ended);
        let mut gone: Vec<u16> = ended.iter().map(|(k, _)| k.dport).collect();
        gone.sort();
        assert_eq!(gone, vec![2, 3]);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_full_table_forgets_the_longest_idle_flows_first() {
        let hundred = Lifetimes {
            tcp: Duration::from_secs(100),
            ..Lifetimes::new(Duration::from_secs(100))
        };
        let mut table = FlowTable::new(hundred, 8);
        let t0 = Instant::now();
        for port in 0..8u16 {
            // Port p was last seen p * 10 s after t0.
            let seen = t0 + Duration::from_secs(u64::from(port) * 10);
            table.insert(key(port), Flow::new(None, Via::Underlay, None, seen));
        }
        assert!(table.is_full());
        let mut ended = Vec::new();
        let now = t0 + Duration::from_secs(75);
        let freed = table.make_room(now, |_, _| None, &mut ended);
        // Idle more than 50 s: ports 0, 1 and 2 (idle 75, 65, 55 s).
        assert_eq!(freed, 3);
        assert!(!table.is_full());
        assert!(ended.iter().all(|(k, _)| k.dport <= 2));
        // Every flow seen this instant: nothing is idle, yet room is made.
        let mut table = FlowTable::new(hundred, 8);
        for port in 0..8u16 {
            table.insert(key(port), Flow::new(None, Via::Underlay, None, now));
        }
        table.make_room(now + Duration::from_millis(1), |_, _| None, &mut ended);
        assert!(!table.is_full());
    }

    #[test]
    fn an_established_tcp_flow_outlives_the_udp_timeout_and_ends_soon_after_closing() {
        let mut table = FlowTable::new(Lifetimes::new(Duration::from_secs(120)), 100);
        let t0 = Instant::now();
        let overlay = Via::Overlay(OverlayId(1));
        let udp = FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 9], 17, 40000, 53);
        for k in [key(22), key(23), udp] {
            table.insert(k, Flow::new(Some(1), overlay, None, t0));
        }
        let mut ended = Vec::new();
        // Ten minutes of silence: the TCP sessions hold, the UDP flow went.
        let quiet = t0 + Duration::from_secs(600);
        table.expire(quiet, |_, _| None, &mut ended);
        assert_eq!(ended.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![udp]);
        assert_eq!(
            live(&mut table, &key(22), quiet),
            Some(overlay),
            "the server speaks first"
        );
        // Port 23 closes; 11 s later it is gone, port 22 is not.
        table.closing(&key(23));
        ended.clear();
        table.expire(quiet + Duration::from_secs(11), |_, _| None, &mut ended);
        assert_eq!(ended.iter().map(|(k, _)| k.dport).collect::<Vec<_>>(), vec![23]);
        // Idle past 2 h 4 min, even TCP goes.
        ended.clear();
        table.expire(
            quiet + Lifetimes::DEFAULT_TCP + Duration::from_secs(1),
            |_, _| None,
            &mut ended,
        );
        assert_eq!(ended.len(), 1);
        assert!(table.is_empty());
    }

    #[test]
    fn the_kernel_tells_when_an_in_kernel_flow_closed() {
        let mut table = FlowTable::new(Lifetimes::new(Duration::from_secs(120)), 100);
        let t0 = Instant::now();
        let fake = FakeBinding {
            fake: "198.18.0.1".parse().unwrap(),
            real: "192.0.2.1".parse().unwrap(),
        };
        table.insert(key(1), translated(fake, t0));
        table.insert(key(2), translated(fake, t0));
        let later = t0 + Duration::from_secs(30);
        let mut ended = Vec::new();
        table.expire(
            later,
            |k, _| {
                Some(KernelSeen {
                    at: t0 + Duration::from_secs(5),
                    closing: k.dport == 2,
                })
            },
            &mut ended,
        );
        assert_eq!(ended.iter().map(|(k, _)| k.dport).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn the_kernel_is_asked_only_about_flows_that_could_be_idle() {
        // TCP: 100 s, 10 s once closing (the shortest it could have).
        let mut table = FlowTable::new(
            Lifetimes {
                tcp: Duration::from_secs(100),
                tcp_closing: Duration::from_secs(10),
                ..Lifetimes::new(Duration::from_secs(100))
            },
            100,
        );
        let t0 = Instant::now();
        let pinned = || {
            let mut flow = Flow::new(Some(1), Via::Underlay, None, t0);
            flow.offload = Offload::Pinned { measured: false };
            flow
        };
        table.insert(key(1), pinned());
        table.insert(key(2), pinned());
        table.insert(key(3), Flow::new(Some(1), Via::Underlay, None, t0));
        let asked = std::cell::Cell::new(0);
        let mut sweep = |at: Instant, kernel_at: Instant| {
            let mut ended = Vec::new();
            table.expire(
                at,
                |_, _| {
                    asked.set(asked.get() + 1);
                    Some(KernelSeen {
                        at: kernel_at,
                        closing: false,
                    })
                },
                &mut ended,
            );
            ended.len()
        };
        let secs = |s| t0 + Duration::from_secs(s);
        assert_eq!(sweep(secs(5), secs(5)), 0);
        assert_eq!(asked.get(), 0, "young flows: nothing to ask");
        assert_eq!(sweep(secs(20), secs(19)), 0);
        assert_eq!(asked.get(), 2, "the two in-kernel flows, not the other");
        assert_eq!(sweep(secs(25), secs(24)), 0);
        assert_eq!(asked.get(), 2, "what the kernel said at 19 s still holds");
        assert_eq!(sweep(secs(30), secs(30)), 0);
        assert_eq!(asked.get(), 4);
        // Idle past the whole lifetime by the kernel's clock too: ended.
        assert_eq!(sweep(secs(200), secs(30)), 3);
    }
}
