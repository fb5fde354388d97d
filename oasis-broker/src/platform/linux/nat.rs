//! Fake-address flows in the kernel (oasis-ebpf/src/nat.rs): the NAT maps
//! the uplinks' programs rewrite flows carried by the underlay with, both
//! ways, so after its first packet such a flow costs no user space. (The
//! fake pools themselves are in the classifier's settings.)

use std::net::IpAddr;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use oasis_common::{FlowKey, NAT_MEASURE, NatEntry, maps};

use super::sys::{KernelError, monotonic_ns, take_map};
use crate::engine::KernelSeen;
use crate::engine::fake::reply_key;
use crate::engine::{NatTable, TableError};

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// The kernel's NAT maps.
pub struct KernelNat {
    out: HashMap<MapData, FlowKey, NatEntry>,
    inbound: HashMap<MapData, FlowKey, NatEntry>,
    /// How many flows the maps hold, for the ingress program to skip all
    /// work while there are none.
    active: Array<MapData, u32>,
    flows: u32,
}

impl KernelNat {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<KernelNat, KernelError> {
        let mut nat = KernelNat {
            out: take_map!(ebpf, maps::NAT_OUT, HashMap<MapData, FlowKey, NatEntry>),
            inbound: take_map!(ebpf, maps::NAT_IN, HashMap<MapData, FlowKey, NatEntry>),
            active: take_map!(ebpf, maps::NAT_ACTIVE, Array<MapData, u32>),
            flows: 0,
        };
        nat.publish_count()
            .map_err(KernelError::map(maps::NAT_ACTIVE.name))?;
        Ok(nat)
    }

    fn publish_count(&mut self) -> Result<(), aya::maps::MapError> {
        self.active.set(0, self.flows, 0)
    }

    fn refused(map: &'static str) -> impl Fn(aya::maps::MapError) -> TableError {
        move |e| TableError {
            table: map,
            reason: e.to_string(),
        }
    }
}

impl NatTable for KernelNat {
    fn install(
        &mut self,
        flow: &FlowKey,
        fake: IpAddr,
        real: IpAddr,
        measure: bool,
    ) -> Result<(), TableError> {
        let now = monotonic_ns();
        let reply = reply_key(flow, real);
        self.inbound
            .insert(
                reply,
                NatEntry {
                    addr: addr_bytes(fake),
                    last_seen_ns: now,
                    ..NatEntry::default()
                },
                0,
            )
            .map_err(Self::refused(maps::NAT_IN.name))?;
        let installed = self.out.insert(
            flow,
            NatEntry {
                addr: addr_bytes(real),
                last_seen_ns: now,
                flags: if measure { NAT_MEASURE } else { 0 },
                _pad: 0,
            },
            0,
        );
        if let Err(e) = installed {
            let _ = self.inbound.remove(&reply);
            return Err(Self::refused(maps::NAT_OUT.name)(e));
        }
        self.flows += 1;
        // Counted up after the entries exist, so the ingress program never
        // skips a reply whose entry is there.
        self.publish_count().map_err(Self::refused(maps::NAT_ACTIVE.name))
    }

    fn remove(&mut self, flow: &FlowKey, real: IpAddr) {
        if self.out.remove(flow).is_ok() {
            self.flows = self.flows.saturating_sub(1);
            let _ = self.publish_count();
        }
        let _ = self.inbound.remove(&reply_key(flow, real));
    }

    fn last_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<KernelSeen> {
        let out = self.out.get(flow, 0).ok();
        let inbound = self.inbound.get(&reply_key(flow, real), 0).ok();
        let seen = out.map(|e| e.last_seen_ns).max(inbound.map(|e| e.last_seen_ns))?;
        let closing = [out, inbound]
            .iter()
            .flatten()
            .any(|e| e.flags & oasis_common::NAT_CLOSING != 0);
        let at = Instant::now().checked_sub(Duration::from_nanos(monotonic_ns().saturating_sub(seen)))?;
        Some(KernelSeen { at, closing })
    }

    fn len(&self) -> usize {
        self.flows as usize
    }
}
