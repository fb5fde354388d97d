//! Flows the engine leaves to the kernel after their first packet: flows
//! that header rules send on the underlay, and flows of metric rules that
//! the Monitor gave the underlay (both pass in the kernel, as if Oasis were
//! not there, counted by their rule), the latter measured there for the
//! Monitor; and the Monitor's own probes, measured the same way. On Linux the
//! classifier's verdict cache and the `MONITORED` map; in tests and on
//! other platforms [`MemoryPins`].

use std::collections::HashMap;
use std::time::Instant;

use oasis_common::FlowKey;

use super::tables::{KernelSeen, TableError};

pub trait FlowPins: Send {
    /// From its next packet on, the flow passes in the kernel (counted
    /// under `rule`) instead of coming to the broker; `measured`: its
    /// packets are looked at for [`FlowPins::measure`].
    fn pin(&mut self, flow: &FlowKey, rule: u32, measured: bool) -> Result<(), TableError>;
    /// The kernel measures the flow (keyed as it leaves the host, by its
    /// real destination) and reports to the Monitor. `syn_sent`: when its
    /// SYN left, to time the handshake; `probe`: a probe of the Monitor's.
    fn measure(&mut self, flow: &FlowKey, syn_sent: Option<Instant>, probe: bool) -> Result<(), TableError>;
    /// Undoes `pin` and `measure`.
    fn forget(&mut self, flow: &FlowKey);
    /// When the kernel last saw a packet of a pinned flow, and whether a
    /// FIN or RST went by.
    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen>;
    /// Whether the flow's handshake was answered (a SYN-ACK came back).
    fn answered(&self, flow: &FlowKey) -> bool;
    /// How many flows are measured.
    fn measured(&self) -> usize;
    /// The rule whose match diverted the flow, as the classifier cached it.
    fn claimed_by(&self, flow: &FlowKey) -> Option<u32>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPin {
    pub rule: Option<u32>,
    /// Pinned with its packets looked at for the measurement.
    pub measured_pin: bool,
    pub measured: bool,
    pub probe: bool,
    pub syn_sent: Option<Instant>,
    pub answered: bool,
    pub last_seen: Option<Instant>,
    pub closing: bool,
}

/// The kernel's part, kept in memory: what tests inspect.
#[derive(Debug, Default)]
pub struct MemoryPins {
    pub flows: HashMap<FlowKey, MemoryPin>,
    /// What a classifier would have claimed flows by.
    pub claimed: HashMap<FlowKey, u32>,
}

impl FlowPins for MemoryPins {
    fn pin(&mut self, flow: &FlowKey, rule: u32, measured: bool) -> Result<(), TableError> {
        let pin = self.flows.entry(*flow).or_default();
        pin.rule = Some(rule);
        pin.measured_pin = measured;
        Ok(())
    }

    fn measure(&mut self, flow: &FlowKey, syn_sent: Option<Instant>, probe: bool) -> Result<(), TableError> {
        let pin = self.flows.entry(*flow).or_default();
        pin.measured = true;
        pin.probe = probe;
        pin.syn_sent = syn_sent;
        Ok(())
    }

    fn forget(&mut self, flow: &FlowKey) {
        self.flows.remove(flow);
    }

    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        let pin = self.flows.get(flow)?;
        Some(KernelSeen {
            at: pin.last_seen?,
            closing: pin.closing,
        })
    }

    fn answered(&self, flow: &FlowKey) -> bool {
        self.flows.get(flow).is_some_and(|p| p.answered)
    }

    fn measured(&self) -> usize {
        self.flows.values().filter(|p| p.measured).count()
    }

    fn claimed_by(&self, flow: &FlowKey) -> Option<u32> {
        self.claimed.get(flow).copied()
    }
}
