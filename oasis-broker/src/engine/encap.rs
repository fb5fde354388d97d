//! Overlay flows the engine leaves to the kernel after their first packet:
//! the uplink's egress program wraps their packets for the entry node the
//! engine chose (outer headers and the overlay's shim), and the ingress
//! program opens that node's datagrams of the flow. On Linux the `ENCAP`
//! maps (oasis-ebpf/src/encap.rs); in tests [`MemoryEncap`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use oasis_common::{FlowKey, MAX_FAST_SHIM};

use super::tables::{KernelSeen, TableError};
use crate::overlay::JoinedOverlay;

/// How one flow's packets are wrapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encapsulation {
    /// The flow's entry node.
    pub to: SocketAddr,
    /// The rule that claimed the flow: its counters count the packets.
    pub rule: u32,
    shim: [u8; MAX_FAST_SHIM],
    shim_len: u8,
}

impl Encapsulation {
    /// How the kernel may carry a flow of `overlay` to `to`, if it can:
    /// straight to an entry node over IPv4 (the kernel writes no outer IPv6
    /// header yet), with a shim it can write. An overlay whose code module
    /// or monitor module carries its flows keeps them in user space.
    pub fn of(overlay: &JoinedOverlay, to: SocketAddr, rule: u32) -> Option<Encapsulation> {
        if overlay.monitor || overlay.module.is_some() || !to.is_ipv4() || to.ip().is_loopback() {
            return None;
        }
        if overlay.shim.len() > MAX_FAST_SHIM {
            return None;
        }
        let mut shim = [0; MAX_FAST_SHIM];
        shim[..overlay.shim.len()].copy_from_slice(&overlay.shim);
        Some(Encapsulation {
            to,
            rule,
            shim,
            shim_len: overlay.shim.len() as u8,
        })
    }

    pub fn shim(&self) -> &[u8] {
        &self.shim[..usize::from(self.shim_len)]
    }
}

pub trait EncapTable: Send {
    /// From its next packet on, the kernel wraps the flow's packets itself
    /// and opens its entry node's datagrams of it.
    fn install(&mut self, flow: &FlowKey, how: &Encapsulation) -> Result<(), TableError>;
    fn remove(&mut self, flow: &FlowKey);
    /// When the kernel last wrapped a packet of the flow; None when it
    /// does not hold the flow.
    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kernel's part, kept in memory: what tests inspect.
#[derive(Debug, Default)]
pub struct MemoryEncap {
    pub flows: HashMap<FlowKey, (Encapsulation, Option<Instant>)>,
    /// Refuse installs, as a full kernel map would.
    pub full: bool,
}

impl EncapTable for MemoryEncap {
    fn install(&mut self, flow: &FlowKey, how: &Encapsulation) -> Result<(), TableError> {
        if self.full {
            return Err(TableError {
                table: "encapsulations",
                reason: "full".into(),
            });
        }
        self.flows.insert(*flow, (*how, None));
        Ok(())
    }

    fn remove(&mut self, flow: &FlowKey) {
        self.flows.remove(flow);
    }

    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        let (_, seen) = self.flows.get(flow)?;
        Some(KernelSeen {
            at: (*seen)?,
            closing: false,
        })
    }

    fn len(&self) -> usize {
        self.flows.len()
    }
}
