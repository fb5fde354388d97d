//! Picks the fastest of several paths (an overlay's entry nodes, or the
//! overlays a monitor module may use) by measured round-trip time,
//! passively: the time from a connection's SYN to its SYN-ACK, over the
//! path the connection took. A connection keeps its path for its life
//! (each path may leave from a different address); new ones go to the
//! path with the lowest smoothed RTT. A path never measured is tried
//! first, every eighth new connection re-measures the path whose figure is
//! oldest once it is 30 s old, and a SYN unanswered for 3 s counts as a
//! 3 s sample, so a path that dies is left within a few connections.

use crate::flow::{Handshake, flow_hash, handshake};

/// Paths one chooser follows.
pub const MAX_PATHS: usize = 16;

/// Connections remembered, in sets of `WAYS` by hash.
const FLOWS: usize = 4096;
const WAYS: usize = 4;
/// Handshakes awaiting their answer.
const PENDING: usize = 256;
/// A connection idle this long may be forgotten.
const FLOW_IDLE_MS: i64 = 300_000;
/// A SYN unanswered this long counts as a sample this long.
const UNANSWERED_MS: i64 = 3_000;
/// Every how many new connections one re-measures a stale path.
const EXPLORE_EVERY: u32 = 8;
/// A figure this old is re-measured.
const STALE_MS: i64 = 30_000;

/// Milliseconds from `then` to `now`; "never" is long ago.
fn age(now: i64, then: i64) -> i64 {
    now.saturating_sub(then)
}

#[derive(Clone, Copy)]
struct Flow {
    hash: u64,
    path: u8,
    last: i64,
}

#[derive(Clone, Copy)]
struct Pending {
    key: u64,
    path: u8,
    sent: i64,
}

pub struct Fastest {
    paths: usize,
    /// Smoothed RTT in eighths of a millisecond; None: never measured.
    srtt8: [Option<u32>; MAX_PATHS],
    measured_at: [i64; MAX_PATHS],
    /// When an unmeasured path was last given a connection to measure.
    tried_at: [i64; MAX_PATHS],
    flows: [Flow; FLOWS],
    pending: [Pending; PENDING],
    new_flows: u32,
}

impl Fastest {
    pub fn new(paths: usize) -> Fastest {
        Fastest {
            paths: paths.min(MAX_PATHS),
            srtt8: [None; MAX_PATHS],
            measured_at: [i64::MIN; MAX_PATHS],
            tried_at: [i64::MIN; MAX_PATHS],
            // Hash 0 is no connection's: `route` sets the low bit.
            flows: [Flow {
                hash: 0,
                path: 0,
                last: 0,
            }; FLOWS],
            pending: [Pending {
                key: 0,
                path: 0,
                sent: 0,
            }; PENDING],
            new_flows: 0,
        }
    }

    /// Paths there are now (a monitor's overlays come and go).
    pub fn set_paths(&mut self, paths: usize) {
        self.paths = paths.min(MAX_PATHS);
    }

    /// The smoothed RTT of `path` in milliseconds, once measured.
    pub fn rtt_ms(&self, path: usize) -> Option<u32> {
        self.srtt8.get(path).copied().flatten().map(|s| s / 8)
    }

    /// The path for an outgoing packet (a bare IP packet): its
    /// connection's, or for a new one the fastest. `usable` says which
    /// paths may be used now; None when none may.
    pub fn route(&mut self, packet: &[u8], now: i64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let hash = flow_hash(packet) | 1;
        let set = (hash as usize % (FLOWS / WAYS)) * WAYS;
        let syn = match handshake(packet) {
            Some(Handshake::Syn(key)) => Some(key),
            _ => None,
        };
        let known = self.flows[set..set + WAYS]
            .iter()
            .position(|f| f.hash == hash && age(now, f.last) < FLOW_IDLE_MS)
            .map(|way| set + way)
            .filter(|i| usable(usize::from(self.flows[*i].path)))
            // A SYN opens a new connection (its ports may be an old one's),
            // which is routed afresh, unless it is sent again while the
            // first still awaits its answer.
            .filter(|i| syn.is_none_or(|key| self.awaiting(key, usize::from(self.flows[*i].path))));
        let (slot, path) = match known {
            Some(slot) => (slot, usize::from(self.flows[slot].path)),
            None => {
                let path = self.pick(now, &usable)?;
                // The way idle the longest gives its place.
                let way = (0..WAYS).min_by_key(|w| self.flows[set + w].last).unwrap_or(0);
                (set + way, path)
            }
        };
        self.flows[slot] = Flow {
            hash,
            path: path as u8,
            last: now,
        };
        if let Some(key) = syn {
            self.expect(key, path, now);
        }
        Some(path)
    }

    fn awaiting(&self, key: u64, path: usize) -> bool {
        let pending = &self.pending[key as usize % PENDING];
        pending.key == key && usize::from(pending.path) == path
    }

    /// A packet (bare IP) that came back over `path`.
    pub fn answered(&mut self, path: usize, packet: &[u8], now: i64) {
        let Some(Handshake::SynAck(key)) = handshake(packet) else {
            return;
        };
        let slot = key as usize % PENDING;
        let pending = self.pending[slot];
        if pending.key == key && usize::from(pending.path) == path {
            self.pending[slot].key = 0;
            self.sample(path, age(now, pending.sent), now);
        }
    }

    /// Counts handshakes unanswered for too long against their path.
    pub fn tick(&mut self, now: i64) {
        for i in 0..PENDING {
            let pending = self.pending[i];
            if pending.key != 0 && age(now, pending.sent) >= UNANSWERED_MS {
                self.pending[i].key = 0;
                self.sample(usize::from(pending.path), age(now, pending.sent), now);
            }
        }
    }

    fn expect(&mut self, key: u64, path: usize, now: i64) {
        // A SYN sent again keeps the first one's time: the wait counts.
        if !self.awaiting(key, path) {
            self.pending[key as usize % PENDING] = Pending {
                key,
                path: path as u8,
                sent: now,
            };
        }
    }

    fn sample(&mut self, path: usize, ms: i64, now: i64) {
        if path >= MAX_PATHS {
            return;
        }
        let ms = ms.clamp(0, i64::from(u32::MAX / 16)) as u32;
        self.srtt8[path] = Some(match self.srtt8[path] {
            None => ms * 8,
            Some(s) => s - s / 8 + ms,
        });
        self.measured_at[path] = now;
    }

    fn pick(&mut self, now: i64, usable: &impl Fn(usize) -> bool) -> Option<usize> {
        let usable = |p: &usize| usable(*p);
        // Never measured: try it, one path at a time.
        if let Some(path) = (0..self.paths)
            .filter(usable)
            .filter(|p| self.srtt8[*p].is_none())
            .min_by_key(|p| self.tried_at[*p])
            && age(now, self.tried_at[path]) >= 1_000
        {
            self.tried_at[path] = now;
            return Some(path);
        }
        self.new_flows = self.new_flows.wrapping_add(1);
        if self.new_flows.is_multiple_of(EXPLORE_EVERY)
            && let Some(stale) = (0..self.paths)
                .filter(usable)
                .filter(|p| self.srtt8[*p].is_some())
                .min_by_key(|p| self.measured_at[*p])
                .filter(|p| age(now, self.measured_at[*p]) >= STALE_MS)
        {
            return Some(stale);
        }
        (0..self.paths)
            .filter(usable)
            .min_by_key(|p| self.srtt8[*p].unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP packet over IPv4 from port `sport` to `dport`.
    fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> [u8; 40] {
        let mut p = [0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[33] = flags;
        p
    }
    const HOST: [u8; 4] = [10, 0, 0, 1];
    const SERVER: [u8; 4] = [192, 0, 2, 80];
    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;

    /// Opens a connection from `port` at `now`; the path it took.
    fn connect(f: &mut Fastest, port: u16, now: i64, rtt: impl Fn(usize) -> Option<i64>) -> usize {
        let path = f
            .route(&tcp(HOST, SERVER, port, 443, SYN), now, |_| true)
            .unwrap();
        if let Some(ms) = rtt(path) {
            f.answered(path, &tcp(SERVER, HOST, 443, port, SYN_ACK), now + ms);
        }
        path
    }

    #[test]
    fn new_connections_go_to_the_fastest_path_and_each_keeps_its_own() {
        let mut f = Fastest::new(3);
        let rtt = |p: usize| Some([40, 5, 20][p]);
        let mut now = 0;
        let mut taken = [0; 3];
        for port in 1000..1100 {
            now += 1_000;
            taken[connect(&mut f, port, now, rtt)] += 1;
        }
        assert_eq!(f.rtt_ms(1), Some(5));
        assert!(taken[1] >= 85, "{taken:?}");
        assert!(
            taken[0] >= 1 && taken[2] >= 1,
            "every path was measured: {taken:?}"
        );
        // A connection's later packets follow it, whatever is fastest now.
        let first = f
            .route(&tcp(HOST, SERVER, 1000, 443, ACK), now, |_| true)
            .unwrap();
        let again = f.route(&tcp(HOST, SERVER, 1000, 443, ACK), now + 10, |_| true);
        assert_eq!(Some(first), again);
    }

    #[test]
    fn a_path_that_stops_answering_is_left() {
        let mut f = Fastest::new(2);
        let mut now = 0;
        for port in 1..20 {
            now += 500;
            connect(&mut f, port, now, |p| Some([10, 30][p]));
        }
        assert_eq!(connect(&mut f, 100, now + 1, |_| None), 0);
        // Path 0 dies: its handshakes go unanswered, counted at 3 s each.
        let mut moved = None;
        for port in 200..260u16 {
            now += 1_000;
            f.tick(now);
            if connect(&mut f, port, now, |p| (p == 1).then_some(30)) == 1 {
                moved.get_or_insert(port);
            }
        }
        let moved = moved.expect("new connections left the dead path");
        assert!(moved < 210, "left after {} connections", moved - 200);
        assert_eq!(connect(&mut f, 300, now + 1, |p| (p == 1).then_some(30)), 1);
    }

    #[test]
    fn a_new_connection_on_an_old_ones_ports_is_routed_afresh() {
        let mut f = Fastest::new(2);
        let mut now = 0;
        for port in 1..10 {
            now += 100;
            connect(&mut f, port, now, |p| Some([10, 30][p]));
        }
        // Port 5's connection went over path 0; path 0 then slows down.
        for port in 20..30 {
            now += 100;
            connect(&mut f, port, now, |p| Some([90, 30][p]));
        }
        assert_eq!(f.rtt_ms(0).map(|ms| ms > 30), Some(true));
        // Its retransmitted SYN keeps its path; a later SYN on the same
        // ports is a new connection and takes the faster path.
        let syn = tcp(HOST, SERVER, 40, 443, SYN);
        let first = f.route(&syn, now, |_| true).unwrap();
        assert_eq!(f.route(&syn, now + 1000, |_| true), Some(first));
        let reused = tcp(HOST, SERVER, 5, 443, SYN);
        assert_eq!(f.route(&reused, now + 1500, |_| true), Some(1));
    }

    #[test]
    fn unusable_paths_are_never_chosen() {
        let mut f = Fastest::new(2);
        let syn = tcp(HOST, SERVER, 5, 443, SYN);
        assert_eq!(f.route(&syn, 0, |p| p == 1), Some(1));
        assert_eq!(f.route(&tcp(HOST, SERVER, 6, 443, SYN), 0, |_| false), None);
        // The path of a known connection went away: it gets a new one.
        assert_eq!(f.route(&syn, 10, |p| p == 0), Some(0));
    }

    #[test]
    fn handshakes_are_keyed_the_same_both_ways() {
        let Some(Handshake::Syn(a)) = handshake(&tcp(HOST, SERVER, 7, 443, SYN)) else {
            panic!()
        };
        let Some(Handshake::SynAck(b)) = handshake(&tcp(SERVER, HOST, 443, 7, SYN_ACK)) else {
            panic!()
        };
        assert_eq!(a, b);
        assert_eq!(handshake(&tcp(HOST, SERVER, 7, 443, ACK)), None);
        assert_eq!(handshake(&tcp(HOST, SERVER, 7, 443, SYN | 0x04)), None);
        assert_eq!(handshake(&[0x45; 10]), None);
    }
}
