//! Packets to fake addresses, as the packet threads meet them: the first
//! packet of a flow picks the real address and carrier; an underlay flow
//! then gets in-kernel NAT entries and never comes back here, an overlay
//! flow is rewritten here packet by packet (it is in user space anyway).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError};
use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{FlowKey, NatEntry};

use crate::dns::server::unix_now;
use crate::fake::FakeTable;
use crate::fake_flows::{FakeFlow, FakeFlows, choose_carrier, choose_real, reply_key};
use crate::flow::flow_key;
use crate::names::NameRules;
use crate::overlay::OverlayTable;
use crate::packet::{End, rewrite_address, unreachable_reply};
use crate::rules::Carrier;

use super::datapath::monotonic_ns;
use super::forward::{Shared, snapshot};

/// The kernel's NAT maps (see oasis-ebpf/src/nat.rs).
pub struct NatMaps {
    pub out: HashMap<MapData, FlowKey, NatEntry>,
    pub inbound: HashMap<MapData, FlowKey, NatEntry>,
}

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

impl NatMaps {
    /// Both directions; the reply direction first, so no reply can arrive
    /// before its translation exists.
    pub fn install(&mut self, key: &FlowKey, fake: IpAddr, real: IpAddr) -> Result<(), MapError> {
        let now = monotonic_ns();
        let reply = reply_key(key, real);
        self.inbound.insert(
            reply,
            NatEntry {
                addr: addr_bytes(fake),
                last_seen_ns: now,
            },
            0,
        )?;
        if let Err(e) = self.out.insert(
            key,
            NatEntry {
                addr: addr_bytes(real),
                last_seen_ns: now,
            },
            0,
        ) {
            let _ = self.inbound.remove(&reply);
            return Err(e);
        }
        Ok(())
    }

    fn remove(&mut self, key: &FlowKey, real: IpAddr) {
        let _ = self.out.remove(key);
        let _ = self.inbound.remove(&reply_key(key, real));
    }

    /// When the kernel last rewrote a packet of the flow, either way.
    fn last_seen_ns(&self, key: &FlowKey, real: IpAddr) -> Option<u64> {
        let out = self.out.get(key, 0).ok().map(|e| e.last_seen_ns);
        let inbound = self
            .inbound
            .get(&reply_key(key, real), 0)
            .ok()
            .map(|e| e.last_seen_ns);
        out.max(inbound)
    }

    pub fn entries(&self) -> usize {
        self.out.keys().filter(Result::is_ok).count()
    }
}

#[derive(Default)]
pub struct FakeStats {
    /// Packets to fake addresses the table does not know: answered with ICMP unreachable.
    pub unknown: AtomicU64,
    pub flows_underlay: AtomicU64,
    pub flows_overlay: AtomicU64,
    pub nat_errors: AtomicU64,
}

pub struct FakePath {
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
    pub table: Arc<Mutex<FakeTable>>,
    pub names: Shared<NameRules>,
    pub nat: Mutex<NatMaps>,
    pub flows: Mutex<FakeFlows>,
    /// Whether any overlay flow's replies need rewriting: the return path
    /// checks this before taking a lock.
    overlay_replies: AtomicBool,
    pub stats: FakeStats,
}

/// What to do with a packet to a fake address.
pub enum FakeRoute {
    /// Rewritten to the real address; send it by this carrier.
    Send(Carrier),
    /// Write this packet (an ICMP error) back into the TUN.
    Reply(Vec<u8>),
    Drop,
}

impl FakePath {
    pub fn new(
        v4: Ipv4Net,
        v6: Ipv6Net,
        table: Arc<Mutex<FakeTable>>,
        names: Shared<NameRules>,
        nat: NatMaps,
    ) -> FakePath {
        FakePath {
            v4,
            v6,
            table,
            names,
            nat: Mutex::new(nat),
            flows: Mutex::new(FakeFlows::default()),
            overlay_replies: AtomicBool::new(false),
            stats: FakeStats::default(),
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => self.v4.contains(&v4),
            IpAddr::V6(v6) => self.v6.contains(&v6),
        }
    }

    /// Routes and rewrites one packet whose destination is a fake address.
    pub fn route(
        &self,
        packet: &mut [u8],
        key: &FlowKey,
        overlays: &OverlayTable,
        now: Instant,
    ) -> FakeRoute {
        let fake = crate::rules::flow_dst(key);
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        let flow = match flows.touch(key, now) {
            Some(flow) => flow.clone(),
            None => match self.start(key, fake, overlays, now) {
                Some(flow) => {
                    flows.insert(*key, flow.clone());
                    if !flow.in_kernel {
                        self.overlay_replies.store(true, Relaxed);
                    }
                    flow
                }
                None => {
                    self.stats.unknown.fetch_add(1, Relaxed);
                    return match unreachable_reply(packet) {
                        Some(reply) => FakeRoute::Reply(reply),
                        None => FakeRoute::Drop,
                    };
                }
            },
        };
        drop(flows);
        match rewrite_address(packet, End::Destination, flow.real) {
            Ok(()) => FakeRoute::Send(flow.carrier),
            Err(e) => {
                tracing::debug!(%fake, "cannot rewrite a packet to a fake address: {e}");
                FakeRoute::Drop
            }
        }
    }

    /// A new flow: None when the fake address stands for nothing (any more).
    fn start(&self, key: &FlowKey, fake: IpAddr, overlays: &OverlayTable, now: Instant) -> Option<FakeFlow> {
        let entry = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.flow_started(fake, unix_now())?.clone()
        };
        let Some(real) = choose_real(&entry, key) else {
            self.table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flow_ended(fake, unix_now());
            return None;
        };
        let names = snapshot(&self.names);
        let carrier = choose_carrier(&entry.name, &names, |name| overlays.get(name).is_some());
        let in_kernel = carrier == Carrier::Underlay;
        if in_kernel {
            // Replies of an underlay flow reach the application straight
            // from the uplink: without the kernel's reverse entry they
            // would come from an address it never talked to.
            if let Err(e) = self
                .nat
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .install(key, fake, real)
            {
                self.stats.nat_errors.fetch_add(1, Relaxed);
                tracing::warn!(%fake, %real, "installing an in-kernel NAT entry: {e}");
                self.table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .flow_ended(fake, unix_now());
                return None;
            }
            self.stats.flows_underlay.fetch_add(1, Relaxed);
        } else {
            self.stats.flows_overlay.fetch_add(1, Relaxed);
        }
        tracing::debug!(name = %entry.name, %fake, %real, %carrier, in_kernel, "new fake-address flow");
        Some(FakeFlow {
            fake,
            real,
            carrier,
            in_kernel,
            last_seen: now,
        })
    }

    /// Returned traffic of flows the broker rewrites itself: the real
    /// source becomes the fake one the application knows.
    pub fn translate_reply(&self, packet: &mut [u8]) {
        if !self.overlay_replies.load(Relaxed) {
            return;
        }
        let Some(key) = flow_key(packet) else { return };
        let fake = self
            .flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reply_fake(&key);
        if let Some(fake) = fake
            && let Err(e) = rewrite_address(packet, End::Source, fake)
        {
            tracing::debug!(%fake, "cannot rewrite a reply: {e}");
        }
    }

    /// Ends flows idle for `idle`, removing their kernel entries.
    pub fn expire(&self, idle: Duration) {
        let now = Instant::now();
        let now_ns = monotonic_ns();
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        let ended = {
            let nat = self.nat.lock().unwrap_or_else(|e| e.into_inner());
            flows.expire(now, idle, |key, flow| {
                let seen = nat.last_seen_ns(key, flow.real)?;
                now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(seen)))
            })
        };
        self.overlay_replies.store(flows.has_overlay_flows(), Relaxed);
        drop(flows);
        if ended.is_empty() {
            return;
        }
        let mut nat = self.nat.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        for (key, flow) in &ended {
            if flow.in_kernel {
                nat.remove(key, flow.real);
            }
            table.flow_ended(flow.fake, unix_now());
        }
        tracing::debug!(count = ended.len(), "fake-address flows ended");
    }

    /// (flows the broker knows, of them in the kernel)
    pub fn flow_counts(&self) -> (usize, usize) {
        (
            self.flows.lock().unwrap_or_else(|e| e.into_inner()).len(),
            self.nat.lock().unwrap_or_else(|e| e.into_inner()).entries(),
        )
    }
}
