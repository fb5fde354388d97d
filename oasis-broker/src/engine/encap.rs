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
    /// The largest outer packet the path takes: larger ones go to the
    /// broker, which tells the sender the MTU.
    pub mtu: u16,
    shim: [u8; MAX_FAST_SHIM],
    shim_len: u8,
}

impl Encapsulation {
    /// How the kernel may carry a flow of `overlay` to `to`, if it can:
    /// straight to an entry node (over IPv4 or IPv6), with a shim it can
    /// write. An overlay whose code module or monitor module carries its
    /// flows keeps them in user space, and so does a WireGuard overlay
    /// (the kernel does not seal).
    /// `uplink_mtu`: the uplinks' MTU.
    pub fn of(overlay: &JoinedOverlay, to: SocketAddr, rule: u32, uplink_mtu: u16) -> Option<Encapsulation> {
        if overlay.monitor || overlay.module.is_some() || overlay.wireguard.is_some() || to.ip().is_loopback()
        {
            return None;
        }
        Encapsulation::new(to, rule, overlay.outer_mtu(uplink_mtu), &overlay.shim)
    }

    /// None for a shim longer than the kernel writes.
    pub fn new(to: SocketAddr, rule: u32, mtu: u16, shim: &[u8]) -> Option<Encapsulation> {
        let mut bytes = [0; MAX_FAST_SHIM];
        bytes.get_mut(..shim.len())?.copy_from_slice(shim);
        Some(Encapsulation {
            to,
            rule,
            mtu,
            shim: bytes,
            shim_len: shim.len() as u8,
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
    /// Stops wrapping every flow toward `peer` (its overlay was left): the
    /// flows' next packets come to the broker, which ends them.
    fn forget_peer(&mut self, peer: SocketAddr);
    /// The path toward `peer` takes packets of `mtu` at most now: larger
    /// ones of its flows go to the broker, which tells their senders.
    fn narrow(&mut self, peer: SocketAddr, mtu: u16);
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

    fn forget_peer(&mut self, peer: SocketAddr) {
        self.flows.retain(|_, (how, _)| how.to != peer);
    }

    fn narrow(&mut self, peer: SocketAddr, mtu: u16) {
        for (how, _) in self.flows.values_mut().filter(|(how, _)| how.to == peer) {
            how.mtu = how.mtu.min(mtu);
        }
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
