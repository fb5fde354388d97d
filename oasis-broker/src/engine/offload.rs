//! What the kernel does for a flow after its first packet, and the work
//! the engine hands its caller to tell the kernel so.
//!
//! The engine decides; it never writes a kernel table itself. A router
//! queues [`KernelOp`]s while it decides a packet (or sweeps its flows),
//! and the shell carries them out with its [`KernelTables`] before it sends
//! that packet, outside every lock of the engine's, and reports a refusal
//! back ([`Router::kernel_refused`](super::Router::kernel_refused)). What
//! the engine needs to know of the kernel (when a flow was last seen,
//! whether a handshake was answered) it reads through a [`KernelView`] its
//! caller passes in, as it takes the time.

use std::net::IpAddr;
use std::time::Instant;

use oasis_common::FlowKey;

use super::encap::{EncapTable, Encapsulation};
use super::measure::OutboundMeasure;
use super::nat::NatTable;
use super::pins::FlowPins;
use super::tables::{KernelSeen, TableError};

/// Where a flow's packets after its first are handled.
#[derive(Debug)]
pub enum Offload {
    /// Every packet comes to the engine.
    Broker,
    /// Every packet comes to the engine, which measures the flow for the
    /// Monitor (a metric rule's flow on an overlay).
    Measured(Box<OutboundMeasure>),
    /// Passes in the kernel under its rule's verdict (a header or metric
    /// rule's flow on the underlay); `measured`: the kernel measures it.
    Pinned { measured: bool },
    /// The kernel's NAT rewrites it both ways (a fake address's flow on the
    /// underlay); `measured`: the kernel measures it.
    Translated { measured: bool },
    /// The kernel wraps it for its entry node and opens the node's
    /// datagrams of it (a header rule's flow on a plain overlay); what the
    /// kernel leaves to the broker (SYN, FIN, too big) still comes here.
    Encapsulated,
    /// A header rule's flow on a plain overlay, its first packet carried
    /// here: the kernel takes it over at its second (`Encapsulated`), so a
    /// flow of one packet (a DNS query, a probe) costs no kernel entry.
    WrapNext,
}

impl Offload {
    /// Whether the kernel carries the flow's packets after its first.
    pub fn in_kernel(&self) -> bool {
        matches!(
            self,
            Offload::Pinned { .. } | Offload::Translated { .. } | Offload::Encapsulated
        )
    }

    /// Whether the kernel measures the flow for the Monitor.
    pub fn measured_in_kernel(&self) -> bool {
        matches!(
            self,
            Offload::Pinned { measured: true } | Offload::Translated { measured: true }
        )
    }

    pub fn pinned(&self) -> bool {
        matches!(self, Offload::Pinned { .. })
    }
}

/// One change to the kernel's tables, for the shell to carry out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOp {
    /// Translate the flow (to the fake address) to `real`, both ways.
    Translate {
        flow: FlowKey,
        fake: IpAddr,
        real: IpAddr,
        measure: bool,
    },
    /// Undo a `Translate`.
    Untranslate { flow: FlowKey, real: IpAddr },
    /// The flow passes in the kernel from its next packet on.
    Pin {
        flow: FlowKey,
        rule: u32,
        measured: bool,
    },
    /// The kernel measures the flow (keyed by its real destination).
    Measure {
        flow: FlowKey,
        syn_sent: Option<Instant>,
        probe: bool,
    },
    /// Undo `Pin` and `Measure`.
    Forget { flow: FlowKey },
    /// Wrap the flow's packets for its entry node in the kernel.
    Encapsulate { flow: FlowKey, how: Encapsulation },
    /// Undo `Encapsulate`.
    Unencapsulate { flow: FlowKey },
}

/// What the engine reads of the kernel's tables.
pub trait KernelView {
    /// When the kernel last saw a packet of a pinned flow.
    fn pinned_seen(&self, flow: &FlowKey) -> Option<KernelSeen>;
    /// When the NAT last translated a packet of the flow.
    fn translated_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen>;
    /// Whether the flow's handshake was answered.
    fn answered(&self, flow: &FlowKey) -> bool;
    /// When the kernel last wrapped a packet of the flow.
    fn encapsulated_seen(&self, flow: &FlowKey) -> Option<KernelSeen>;
    /// The rule the kernel's classifier claimed the flow by: the one
    /// answer for rules naming a sender, which only the kernel sees.
    fn claimed_by(&self, flow: &FlowKey) -> Option<u32>;
}

/// The kernel's tables, as the shell holds them.
pub struct KernelTables {
    pub nat: Box<dyn NatTable>,
    pub pins: Box<dyn FlowPins>,
    pub encap: Box<dyn EncapTable>,
}

impl KernelTables {
    /// Carries out one operation.
    pub fn carry_out(&mut self, op: &KernelOp) -> Result<(), TableError> {
        match *op {
            KernelOp::Translate {
                flow,
                fake,
                real,
                measure,
            } => self.nat.install(&flow, fake, real, measure),
            KernelOp::Untranslate { flow, real } => {
                self.nat.remove(&flow, real);
                Ok(())
            }
            KernelOp::Pin { flow, rule, measured } => self.pins.pin(&flow, rule, measured),
            KernelOp::Measure {
                flow,
                syn_sent,
                probe,
            } => self.pins.measure(&flow, syn_sent, probe),
            KernelOp::Forget { flow } => {
                self.pins.forget(&flow);
                Ok(())
            }
            KernelOp::Encapsulate { flow, how } => self.encap.install(&flow, &how),
            KernelOp::Unencapsulate { flow } => {
                self.encap.remove(&flow);
                Ok(())
            }
        }
    }
}

impl KernelView for KernelTables {
    fn pinned_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        self.pins.last_seen(flow)
    }
    fn translated_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen> {
        self.nat.last_seen(flow, real)
    }
    fn answered(&self, flow: &FlowKey) -> bool {
        self.pins.answered(flow)
    }
    fn encapsulated_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        self.encap.last_seen(flow)
    }
    fn claimed_by(&self, flow: &FlowKey) -> Option<u32> {
        self.pins.claimed_by(flow)
    }
}

/// The tables every packet thread, the prober and the Monitor's thread
/// share. Taken only to carry out or read one operation, never while the
/// engine decides.
#[derive(Clone)]
pub struct SharedTables(std::sync::Arc<std::sync::Mutex<KernelTables>>);

impl SharedTables {
    pub fn new(tables: KernelTables) -> SharedTables {
        SharedTables(std::sync::Arc::new(std::sync::Mutex::new(tables)))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, KernelTables> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flows the NAT table translates now.
    pub fn translated(&self) -> usize {
        self.lock().nat.len()
    }

    /// Overlay flows the kernel wraps now.
    pub fn encapsulated(&self) -> usize {
        self.lock().encap.len()
    }

    /// Flows the kernel measures for the Monitor now.
    pub fn measured(&self) -> usize {
        self.lock().pins.measured()
    }
}

impl KernelView for SharedTables {
    fn pinned_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        self.lock().pinned_seen(flow)
    }
    fn translated_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen> {
        self.lock().translated_seen(flow, real)
    }
    fn answered(&self, flow: &FlowKey) -> bool {
        self.lock().answered(flow)
    }
    fn encapsulated_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        self.lock().encapsulated_seen(flow)
    }
    fn claimed_by(&self, flow: &FlowKey) -> Option<u32> {
        self.lock().claimed_by(flow)
    }
}
