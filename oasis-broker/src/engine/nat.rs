//! The NAT table of fake-address flows carried by the underlay. Once the
//! engine has chosen a flow's real address, the table rewrites the flow's
//! packets outside the engine: on Linux the kernel's maps (the uplinks'
//! programs rewrite both ways, so the flow never reaches user space again);
//! elsewhere, and in tests, [`MemoryNat`] does it for the packet loop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use oasis_common::FlowKey;
use oasis_io::packet::{End, rewrite_address, tcp_closing};

use super::fake::reply_key;
use super::packet::{flow_dst, flow_key};
pub use super::tables::{KernelSeen, TableError};

pub trait NatTable: Send {
    /// Translates the flow `flow` (as the application sends it, to the
    /// fake address `fake`) to `real`, both ways. The reply direction is
    /// installed first, so no reply can arrive before its translation.
    /// `measure`: the translated flow is measured for the Monitor too (see
    /// [`FlowPins::measure`](super::FlowPins::measure)).
    fn install(
        &mut self,
        flow: &FlowKey,
        fake: IpAddr,
        real: IpAddr,
        measure: bool,
    ) -> Result<(), TableError>;
    fn remove(&mut self, flow: &FlowKey, real: IpAddr);
    /// When the table last translated a packet of the flow, either way,
    /// and whether a TCP FIN or RST went by; None when it does not hold
    /// the flow.
    fn last_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Entry {
    addr: IpAddr,
    last_seen: Instant,
    closing: bool,
}

/// The NAT in user space: what the kernel's maps do, for packets a packet
/// loop hands it.
#[derive(Default)]
pub struct MemoryNat {
    out: HashMap<FlowKey, Entry>,
    inbound: HashMap<FlowKey, Entry>,
}

impl MemoryNat {
    /// Rewrites an outgoing packet of a translated flow (fake → real);
    /// false when the table holds no such flow.
    pub fn outbound(&mut self, packet: &mut [u8], now: Instant) -> bool {
        self.rewrite(packet, now, End::Destination, true)
    }

    /// Rewrites a reply of a translated flow (real → fake).
    pub fn inbound(&mut self, packet: &mut [u8], now: Instant) -> bool {
        self.rewrite(packet, now, End::Source, false)
    }

    fn rewrite(&mut self, packet: &mut [u8], now: Instant, end: End, out: bool) -> bool {
        let Some(key) = flow_key(packet) else { return false };
        let map = if out { &mut self.out } else { &mut self.inbound };
        let Some(entry) = map.get_mut(&key) else {
            return false;
        };
        entry.last_seen = now;
        entry.closing |= tcp_closing(packet);
        rewrite_address(packet, end, entry.addr).is_ok()
    }
}

impl NatTable for MemoryNat {
    fn install(
        &mut self,
        flow: &FlowKey,
        fake: IpAddr,
        real: IpAddr,
        _measure: bool,
    ) -> Result<(), TableError> {
        debug_assert_eq!(flow_dst(flow), fake);
        let now = Instant::now();
        self.inbound.insert(
            reply_key(flow, real),
            Entry {
                addr: fake,
                last_seen: now,
                closing: false,
            },
        );
        self.out.insert(
            *flow,
            Entry {
                addr: real,
                last_seen: now,
                closing: false,
            },
        );
        Ok(())
    }

    fn remove(&mut self, flow: &FlowKey, real: IpAddr) {
        self.out.remove(flow);
        self.inbound.remove(&reply_key(flow, real));
    }

    fn last_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen> {
        let out = self.out.get(flow);
        let inbound = self.inbound.get(&reply_key(flow, real));
        let at = out.map(|e| e.last_seen).max(inbound.map(|e| e.last_seen))?;
        let closing = out.is_some_and(|e| e.closing) || inbound.is_some_and(|e| e.closing);
        Some(KernelSeen { at, closing })
    }

    fn len(&self) -> usize {
        self.out.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packet::tests::tcp4;
    use oasis_io::packet::addresses;

    #[test]
    fn memory_nat_rewrites_both_ways_and_forgets() {
        let mut nat = MemoryNat::default();
        let fake: IpAddr = "198.18.0.7".parse().unwrap();
        let real: IpAddr = "192.0.2.10".parse().unwrap();
        let mut out = tcp4([10, 0, 0, 2], [198, 18, 0, 7], 40000, 443, true);
        let key = flow_key(&out).unwrap();
        let now = Instant::now();
        assert!(!nat.outbound(&mut out, now), "no entry yet");
        nat.install(&key, fake, real, false).unwrap();
        assert!(nat.outbound(&mut out, now));
        assert_eq!(addresses(&out).unwrap().1, real);
        let mut reply = tcp4([192, 0, 2, 10], [10, 0, 0, 2], 443, 40000, false);
        assert!(nat.inbound(&mut reply, now));
        assert_eq!(addresses(&reply).unwrap().0, fake);
        assert!(!nat.last_seen(&key, real).unwrap().closing);
        let mut fin = tcp4([192, 0, 2, 10], [10, 0, 0, 2], 443, 40000, false);
        fin[20 + 13] |= 0x01;
        assert!(nat.inbound(&mut fin, now));
        assert!(nat.last_seen(&key, real).unwrap().closing, "a FIN went by");
        assert_eq!(nat.len(), 1);
        nat.remove(&key, real);
        assert!(nat.is_empty() && nat.last_seen(&key, real).is_none());
        let mut reply = tcp4([192, 0, 2, 10], [10, 0, 0, 2], 443, 40000, false);
        assert!(!nat.inbound(&mut reply, now));
    }
}
