//! What the engine and the packet loops did, counted. Atomics shared by
//! every packet thread; the status view reads a snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::control::BrokerCounters;

/// Why the engine dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not an IP packet the engine can read, or a datagram too short to
    /// hold its shim.
    Malformed,
    /// To a link-local or multicast destination: a raw socket cannot pick
    /// the one link such a packet is for.
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
        }
    }
}

#[derive(Debug, Default)]
pub struct EngineCounters {
    pub received: AtomicU64,
    pub sent_underlay: AtomicU64,
    pub sent_overlay: AtomicU64,
    pub send_errors: AtomicU64,
    pub replies: AtomicU64,
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
    malformed: AtomicU64,
    unroutable: AtomicU64,
    no_carrier: AtomicU64,
    untranslatable: AtomicU64,
    not_from_overlay: AtomicU64,
    not_for_this_host: AtomicU64,
    not_from_module: AtomicU64,
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
        }
    }

    pub fn drops_of(&self, reason: DropReason) -> u64 {
        self.drops(reason).load(Relaxed)
    }

    pub fn snapshot(&self) -> BrokerCounters {
        let load = |c: &AtomicU64| c.load(Relaxed);
        BrokerCounters {
            received: load(&self.received),
            sent_underlay: load(&self.sent_underlay),
            sent_overlay: load(&self.sent_overlay),
            send_errors: load(&self.send_errors),
            malformed: load(&self.malformed),
            unroutable: load(&self.unroutable),
            no_carrier: load(&self.no_carrier),
            untranslatable: load(&self.untranslatable),
            flows: load(&self.flows),
            flows_started: load(&self.flows_started),
            flows_evicted: load(&self.flows_evicted),
            rescued: load(&self.rescued),
            overlay_received: load(&self.overlay_received),
            rejected_sender: load(&self.not_from_overlay),
            rejected_destination: load(&self.not_for_this_host),
            rejected_module_sender: load(&self.not_from_module),
        }
    }
}
