//! What the engine and the packet loops did, counted. Atomics shared by
//! every packet thread; the status view reads a snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why the engine dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IP packet the engine can read, or a datagram too short to
    /// hold its shim.
    Malformed,
    /// Belongs to one link or to this host (link-local, multicast,
    /// broadcast, loopback, neighbour discovery): no carrier can take it
    /// there. The classifier never diverts such packets.
    Unroutable,
    /// The flow's overlay was left, or the rule's overlay is not usable.
    NoCarrier,
    /// A packet of a fake-address flow that cannot be rewritten (a
    /// protocol without ports, a fragment).
    Untranslatable,
    /// Returned by a sender that is no joined overlay's peer.
    NotFromOverlay,
    /// Returned, but not addressed to this host.
    NotForThisHost,
    /// On the underlay port, from no module of this broker.
    NotFromModule,
    /// A later fragment of a datagram whose first fragment was not seen
    /// (or is 30 s old): there is no knowing where it belongs.
    OrphanFragment,
    /// Returned from a fake address's real one, for no socket of this
    /// host (a flow that ended while the daemon was down).
    NoFlow,
    /// A WireGuard datagram its peer's tunnel would not open (forged,
    /// replayed, for no session of ours), or a packet in one from a
    /// source outside the peer's AllowedIPs.
    Unauthenticated,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unroutable => "unroutable",
            DropReason::NoCarrier => "no carrier",
            DropReason::Untranslatable => "untranslatable",
            DropReason::NotFromOverlay => "sender is no overlay's peer",
            DropReason::NotForThisHost => "not addressed to this host",
            DropReason::NotFromModule => "sender is no module of this broker",
            DropReason::OrphanFragment => "fragment without its first",
            DropReason::NoFlow => "returned for no live flow",
            DropReason::Unauthenticated => "WireGuard datagram that failed to authenticate",
        }
    }
}

/// A histogram of durations, without locks or allocation: buckets per
/// power of two of nanoseconds, each split in eight, so a percentile is
/// known within an eighth of its value.
#[derive(Debug)]
pub struct Durations {
    buckets: [AtomicU64; 512],
}

impl Default for Durations {
    fn default() -> Durations {
        Durations {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Durations {
    fn bucket(ns: u64) -> usize {
        if ns < 8 {
            return ns as usize;
        }
        let log = 63 - u64::from(ns.leading_zeros());
        let sub = (ns >> (log - 3)) & 7;
        ((log as usize) << 3 | sub as usize).min(511)
    }

    /// The largest value a bucket holds.
    fn upper(bucket: usize) -> u64 {
        if bucket < 8 {
            return bucket as u64;
        }
        let (log, sub) = ((bucket >> 3) as u64, (bucket & 7) as u64);
        ((8 + sub + 1) << (log - 3)) - 1
    }

    pub fn record(&self, ns: u64) {
        self.buckets[Self::bucket(ns)].fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `p`th percentile (0–100), in nanoseconds; None without samples.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::upper(bucket));
            }
        }
        None
    }
}

#[derive(Debug, Default)]
pub struct EngineCounters {
    pub received: AtomicU64,
    pub sent_underlay: AtomicU64,
    pub sent_overlay: AtomicU64,
    pub send_errors: AtomicU64,
    pub replies: AtomicU64,
    /// Packets too big for their overlay's path, answered with the MTU.
    pub too_big: AtomicU64,
    pub flows: AtomicU64,
    pub flows_started: AtomicU64,
    pub flows_evicted: AtomicU64,
    pub overlay_received: AtomicU64,
    pub fake_unknown: AtomicU64,
    pub fake_flows_underlay: AtomicU64,
    pub fake_flows_overlay: AtomicU64,
    pub nat_errors: AtomicU64,
    /// Metric rules' flows moved to another carrier because their
    /// handshake went unanswered.
    pub rescued: AtomicU64,
    /// Live flows of fake addresses taken up again by the return path (a
    /// daemon restarted under them).
    pub adopted: AtomicU64,
    /// How long the decision on a metric rule's new flow took: the
    /// Monitor's choice, and leaving the flow to the kernel.
    pub decisions: Durations,
    malformed: AtomicU64,
    unroutable: AtomicU64,
    no_carrier: AtomicU64,
    untranslatable: AtomicU64,
    not_from_overlay: AtomicU64,
    not_for_this_host: AtomicU64,
    not_from_module: AtomicU64,
    orphan_fragments: AtomicU64,
    no_flow: AtomicU64,
    unauthenticated: AtomicU64,
}

impl EngineCounters {
    pub fn dropped(&self, reason: DropReason) {
        self.drops(reason).fetch_add(1, Relaxed);
    }

    fn drops(&self, reason: DropReason) -> &AtomicU64 {
        match reason {
            DropReason::Malformed => &self.malformed,
            DropReason::Unroutable => &self.unroutable,
            DropReason::NoCarrier => &self.no_carrier,
            DropReason::Untranslatable => &self.untranslatable,
            DropReason::NotFromOverlay => &self.not_from_overlay,
            DropReason::NotForThisHost => &self.not_for_this_host,
            DropReason::NotFromModule => &self.not_from_module,
            DropReason::OrphanFragment => &self.orphan_fragments,
            DropReason::NoFlow => &self.no_flow,
            DropReason::Unauthenticated => &self.unauthenticated,
        }
    }

    pub fn drops_of(&self, reason: DropReason) -> u64 {
        self.drops(reason).load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_an_eighth() {
        let durations = Durations::default();
        assert_eq!(durations.percentile(50.0), None);
        for ns in 1..=1000u64 {
            durations.record(ns * 1000);
        }
        let p50 = durations.percentile(50.0).unwrap() as f64;
        let p99 = durations.percentile(99.0).unwrap() as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.125, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.125, "{p99}");
        assert_eq!(durations.count(), 1000);
        durations.record(3);
        durations.record(u64::MAX);
        assert_eq!(durations.count(), 1002);
    }
}
