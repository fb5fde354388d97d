//! Fake-address flows in the kernel (oasis-ebpf/src/nat.rs): the fake
//! pools, whose packets the classifier hands to the broker, and the NAT
//! maps the uplinks' programs rewrite flows carried by the underlay with,
//! both ways, so after its first packet such a flow costs no user space.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{HashMap, LpmTrie, MapData};
use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{FlowKey, NatEntry, maps};

use super::kernel::{KernelError, monotonic_ns, take_map};
use crate::engine::fake::reply_key;
use crate::engine::{NatError, NatTable};

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// The pools whose addresses belong to the broker.
pub struct FakePools {
    v4: LpmTrie<MapData, [u8; 4], u8>,
    v6: LpmTrie<MapData, [u8; 16], u8>,
}

impl FakePools {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<FakePools, KernelError> {
        Ok(FakePools {
            v4: take_map!(ebpf, maps::FAKE_V4, LpmTrie<MapData, [u8; 4], u8>),
            v6: take_map!(ebpf, maps::FAKE_V6, LpmTrie<MapData, [u8; 16], u8>),
        })
    }

    pub fn set(&mut self, v4: Ipv4Net, v6: Ipv6Net) -> Result<(), KernelError> {
        self.v4
            .insert(&Key::new(u32::from(v4.prefix_len()), v4.network().octets()), 1, 0)
            .map_err(KernelError::map(maps::FAKE_V4.name))?;
        self.v6
            .insert(&Key::new(u32::from(v6.prefix_len()), v6.network().octets()), 1, 0)
            .map_err(KernelError::map(maps::FAKE_V6.name))
    }
}

/// The kernel's NAT maps.
pub struct KernelNat {
    out: HashMap<MapData, FlowKey, NatEntry>,
    inbound: HashMap<MapData, FlowKey, NatEntry>,
}

impl KernelNat {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<KernelNat, KernelError> {
        Ok(KernelNat {
            out: take_map!(ebpf, maps::NAT_OUT, HashMap<MapData, FlowKey, NatEntry>),
            inbound: take_map!(ebpf, maps::NAT_IN, HashMap<MapData, FlowKey, NatEntry>),
        })
    }

    fn refused(map: &'static str) -> impl Fn(aya::maps::MapError) -> NatError {
        move |e| NatError {
            table: map,
            reason: e.to_string(),
        }
    }
}

impl NatTable for KernelNat {
    fn install(&mut self, flow: &FlowKey, fake: IpAddr, real: IpAddr) -> Result<(), NatError> {
        let now = monotonic_ns();
        let reply = reply_key(flow, real);
        self.inbound
            .insert(
                reply,
                NatEntry {
                    addr: addr_bytes(fake),
                    last_seen_ns: now,
                },
                0,
            )
            .map_err(Self::refused(maps::NAT_IN.name))?;
        let installed = self.out.insert(
            flow,
            NatEntry {
                addr: addr_bytes(real),
                last_seen_ns: now,
            },
            0,
        );
        if let Err(e) = installed {
            let _ = self.inbound.remove(&reply);
            return Err(Self::refused(maps::NAT_OUT.name)(e));
        }
        Ok(())
    }

    fn remove(&mut self, flow: &FlowKey, real: IpAddr) {
        let _ = self.out.remove(flow);
        let _ = self.inbound.remove(&reply_key(flow, real));
    }

    fn last_seen(&self, flow: &FlowKey, real: IpAddr) -> Option<Instant> {
        let out = self.out.get(flow, 0).ok().map(|e| e.last_seen_ns);
        let inbound = self
            .inbound
            .get(&reply_key(flow, real), 0)
            .ok()
            .map(|e| e.last_seen_ns);
        let seen = out.max(inbound)?;
        Instant::now().checked_sub(Duration::from_nanos(monotonic_ns().saturating_sub(seen)))
    }

    fn len(&self) -> usize {
        self.out.keys().filter(Result::is_ok).count()
    }
}
