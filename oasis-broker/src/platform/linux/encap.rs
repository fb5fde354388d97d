//! The client's fast path for overlay flows, as the engine's
//! [`EncapTable`]: a flow's entry in `ENCAP` makes the uplinks' egress
//! program wrap its packets; its entry node's entry in `ENCAP_PEERS` (kept
//! while any of its flows is wrapped) lets the ingress program open that
//! node's datagrams; `ENCAP_ACTIVE` tells the ingress program whether to
//! look at all.

use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData};
use oasis_common::{EncapEntry, EncapPeer, FAMILY_V4, FAMILY_V6, FlowKey, maps};

use super::sys::{ActiveCount, KernelError, monotonic_ns, take_map};
use crate::engine::{EncapTable, Encapsulation, KernelSeen, TableError};

pub struct KernelEncap {
    flows: HashMap<MapData, FlowKey, EncapEntry>,
    peers: HashMap<MapData, EncapPeer, u32>,
    active: ActiveCount,
    /// Each wrapped flow's entry node, and the flows of each node.
    peer_of: StdHashMap<FlowKey, EncapPeer>,
    flows_of: StdHashMap<EncapPeer, usize>,
    /// The broker's overlay port, which entry nodes answer to.
    our_port: u16,
    /// The broker's socket mark, which policy routing may look at.
    bypass_mark: u32,
    /// This host's address toward each entry node, and when it was found.
    sources: StdHashMap<SocketAddr, (IpAddr, Instant)>,
}

/// How long an entry node's source address is taken as known: a host's
/// addresses change seldom, and a new flow costs no system calls for it.
const SOURCE_KEPT: Duration = Duration::from_secs(10);

impl KernelEncap {
    pub(super) fn take(ebpf: &mut Ebpf, our_port: u16, bypass_mark: u32) -> Result<KernelEncap, KernelError> {
        let active = take_map!(ebpf, maps::ENCAP_ACTIVE, Array<MapData, u32>);
        Ok(KernelEncap {
            flows: take_map!(ebpf, maps::ENCAP, HashMap<MapData, FlowKey, EncapEntry>),
            peers: take_map!(ebpf, maps::ENCAP_PEERS, HashMap<MapData, EncapPeer, u32>),
            active: ActiveCount::new(active, maps::ENCAP_ACTIVE.name)?,
            peer_of: StdHashMap::new(),
            flows_of: StdHashMap::new(),
            our_port,
            bypass_mark,
            sources: StdHashMap::new(),
        })
    }

    fn refused(map: &'static str) -> impl Fn(aya::maps::MapError) -> TableError {
        move |e| TableError {
            table: map,
            reason: e.to_string(),
        }
    }

    /// This host's address toward `to`: the one a socket of the broker's
    /// (its mark set) connected to it would send from.
    fn source_toward(&mut self, to: SocketAddr) -> Result<IpAddr, TableError> {
        let now = Instant::now();
        if let Some((source, found)) = self.sources.get(&to)
            && now.duration_since(*found) < SOURCE_KEPT
        {
            return Ok(*source);
        }
        let no_route = |e: std::io::Error| TableError {
            table: maps::ENCAP.name,
            reason: format!("no source address toward the entry node {to}: {e}"),
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(no_route)?;
        socket.set_mark(self.bypass_mark).map_err(no_route)?;
        socket.connect(&to.into()).map_err(no_route)?;
        let source = socket
            .local_addr()
            .map_err(no_route)?
            .as_socket()
            .map(|a| a.ip())
            .ok_or_else(|| no_route(std::io::Error::other("not an IP socket")))?;
        if self.sources.len() > 4096 {
            self.sources.clear();
        }
        self.sources.insert(to, (source, now));
        Ok(source)
    }

    /// The flows wrapped for the entry node `to`.
    fn flows_toward(&self, to: SocketAddr) -> Vec<FlowKey> {
        let peer = peer_of_addr(to);
        self.peer_of
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(flow, _)| *flow)
            .collect()
    }

    /// One flow of `peer` fewer; the node's datagrams stay closed to the
    /// kernel once it has none.
    fn release(&mut self, peer: &EncapPeer) {
        let Some(count) = self.flows_of.get_mut(peer) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.flows_of.remove(peer);
            let _ = self.peers.remove(peer);
        }
    }
}

fn peer_of(how: &Encapsulation) -> EncapPeer {
    peer_of_addr(how.to)
}

fn peer_of_addr(to: SocketAddr) -> EncapPeer {
    let mut addr = [0; 16];
    let family = match to.ip() {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_V6
        }
    };
    EncapPeer {
        addr,
        port: to.port(),
        family,
        _pad: 0,
    }
}

impl EncapTable for KernelEncap {
    fn install(&mut self, flow: &FlowKey, how: &Encapsulation) -> Result<(), TableError> {
        let peer = peer_of(how);
        let source = match self.source_toward(how.to)? {
            IpAddr::V4(v4) => {
                let mut bytes = [0; 16];
                bytes[..4].copy_from_slice(&v4.octets());
                bytes
            }
            IpAddr::V6(v6) => v6.octets(),
        };
        let mut entry = EncapEntry {
            last_seen_ns: monotonic_ns(),
            peer: peer.addr,
            source,
            rule_id: how.rule,
            peer_port: peer.port,
            our_port: self.our_port,
            mtu: how.mtu,
            peer_family: peer.family,
            shim_len: how.shim().len() as u8,
            ..EncapEntry::default()
        };
        entry.shim[..how.shim().len()].copy_from_slice(how.shim());
        // The node first: a reply may come before the flow's next packet.
        let first_of_peer = !self.flows_of.contains_key(&peer);
        if first_of_peer {
            self.peers
                .insert(peer, u32::from(entry.shim_len), 0)
                .map_err(Self::refused(maps::ENCAP_PEERS.name))?;
        }
        if let Err(e) = self.flows.insert(flow, entry, 0) {
            if first_of_peer {
                let _ = self.peers.remove(&peer);
            }
            return Err(Self::refused(maps::ENCAP.name)(e));
        }
        *self.flows_of.entry(peer).or_default() += 1;
        if let Some(old) = self.peer_of.insert(*flow, peer) {
            // Installed again: the old entry was overwritten.
            self.release(&old);
        } else {
            self.active.add();
        }
        Ok(())
    }

    fn remove(&mut self, flow: &FlowKey) {
        let Some(peer) = self.peer_of.remove(flow) else {
            return;
        };
        let _ = self.flows.remove(flow);
        self.release(&peer);
        self.active.sub();
    }

    fn forget_peer(&mut self, to: SocketAddr) {
        for flow in self.flows_toward(to) {
            self.remove(&flow);
        }
    }

    fn narrow(&mut self, to: SocketAddr, mtu: u16) {
        for flow in self.flows_toward(to) {
            if let Ok(mut entry) = self.flows.get(&flow, 0)
                && entry.mtu > mtu
            {
                entry.mtu = mtu;
                // BPF_EXIST: a flow removed meanwhile stays removed.
                let _ = self.flows.insert(flow, entry, 2);
            }
        }
    }

    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        let entry = self.flows.get(flow, 0).ok()?;
        let at = Instant::now().checked_sub(Duration::from_nanos(
            monotonic_ns().saturating_sub(entry.last_seen_ns),
        ))?;
        Some(KernelSeen { at, closing: false })
    }

    fn len(&self) -> usize {
        self.peer_of.len()
    }
}
