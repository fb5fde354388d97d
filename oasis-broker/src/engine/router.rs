//! Outbound decisions: for each diverted packet, given the time, what to do
//! with it: send it on the underlay, send it to an overlay's next hop, write
//! a reply to the application, or drop it for a named reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::FlowKey;
use oasis_io::packet::{End, clamp_mss, rewrite_address, unreachable_reply};

use super::carrier::{CarrierChooser, Claim};
use super::counters::{DropReason, EngineCounters};
use super::fake::{choose_real, reply_key};
use super::flows::{FakeBinding, Flow, FlowTable, Lookup};
use super::nat::NatTable;
use super::packet::{describe, flow_dst, flow_key, routable};
use super::routes::{Routes, Via};
use crate::fake::{FakeTable, unix_now};
use crate::overlay::{JoinedOverlay, OverlayId};
use crate::shared::{Shared, snapshot};

/// How often a router ends idle flows.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// A flow idle for this long is forgotten; its next packet starts a new one.
    pub flow_idle: Duration,
    /// Most flows one packet thread tracks.
    pub flow_capacity: usize,
    /// The largest uplink MTU: overlay flows' MSS is clamped to fit it.
    pub uplink_mtu: u16,
    /// The fake pools of name rules.
    pub fake_v4: Ipv4Net,
    pub fake_v6: Ipv6Net,
}

impl EngineSettings {
    pub fn is_fake(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => self.fake_v4.contains(&v4),
            IpAddr::V6(v6) => self.fake_v6.contains(&v6),
        }
    }
}

/// Reply key → fake address, for fake-address flows carried by overlays:
/// their replies come back through the broker (underlay flows' replies are
/// the NAT table's business).
pub type ReplyMap = HashMap<FlowKey, IpAddr>;

/// What every packet thread shares. Locks here are taken when a flow
/// starts or ends, never per packet of a known flow.
pub struct Engine {
    pub settings: EngineSettings,
    routes: Shared<Routes>,
    fakes: Arc<Mutex<FakeTable>>,
    nat: Mutex<Box<dyn NatTable>>,
    replies: RwLock<ReplyMap>,
    /// Whether `replies` holds anything, so the return path takes no lock
    /// at all while no overlay carries a fake-address flow.
    has_replies: AtomicBool,
    pub counters: EngineCounters,
    chooser: Box<dyn CarrierChooser>,
    /// Flows the packet threads' tables hold, summed.
    pub fake_flows: AtomicU64,
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        routes: Routes,
        fakes: Arc<Mutex<FakeTable>>,
        nat: Box<dyn NatTable>,
        chooser: Box<dyn CarrierChooser>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            settings,
            routes: Arc::new(RwLock::new(Arc::new(routes))),
            fakes,
            nat: Mutex::new(nat),
            replies: RwLock::new(HashMap::new()),
            has_replies: AtomicBool::new(false),
            counters: EngineCounters::default(),
            chooser,
            fake_flows: AtomicU64::new(0),
        })
    }

    /// A router for one packet thread.
    pub fn router(self: &Arc<Self>) -> Router {
        Router {
            engine: self.clone(),
            routes: self.routes(),
            flows: FlowTable::new(self.settings.flow_idle, self.settings.flow_capacity),
            next_sweep: Instant::now() + SWEEP_EVERY,
            ended: Vec::new(),
        }
    }

    /// Makes `routes` what new batches route by.
    pub fn publish(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
    }

    pub fn routes(&self) -> Arc<Routes> {
        snapshot(&self.routes)
    }

    pub fn fakes(&self) -> &Arc<Mutex<FakeTable>> {
        &self.fakes
    }

    /// Flows the NAT table translates now.
    pub fn nat_flows(&self) -> usize {
        self.nat.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The reply map, when any overlay carries a fake-address flow; held
    /// for one batch of returned packets.
    pub fn replies(&self) -> Option<RwLockReadGuard<'_, ReplyMap>> {
        if !self.has_replies.load(Relaxed) {
            return None;
        }
        Some(self.replies.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn add_reply(&self, key: FlowKey, fake: IpAddr) {
        let mut replies = self.replies.write().unwrap_or_else(|e| e.into_inner());
        replies.insert(key, fake);
        self.has_replies.store(true, Relaxed);
    }

    fn remove_replies(&self, keys: impl Iterator<Item = FlowKey>) {
        let mut replies = self.replies.write().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            replies.remove(&key);
        }
        self.has_replies.store(!replies.is_empty(), Relaxed);
    }
}

/// What to do with one diverted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send it (possibly rewritten) on the underlay.
    Underlay,
    /// Send `[shim][packet]` to the overlay's next hop `to`.
    Overlay {
        overlay: OverlayId,
        to: std::net::SocketAddr,
    },
    /// Write the reply the router left in the caller's buffer back to the
    /// application (an ICMP error).
    Reply,
    Drop(DropReason),
}

/// One packet thread's decisions: its flow table and the routes of the
/// batch at hand.
pub struct Router {
    engine: Arc<Engine>,
    routes: Arc<Routes>,
    flows: FlowTable,
    next_sweep: Instant,
    /// Flows ended by a sweep, kept to reuse its allocation.
    ended: Vec<(FlowKey, Flow)>,
}

impl Router {
    /// Picks up the latest routes; called once per batch.
    pub fn begin_batch(&mut self) {
        let latest = self.engine.routes();
        if !Arc::ptr_eq(&latest, &self.routes) {
            self.routes = latest;
        }
    }

    /// The overlay an [`Outbound::Overlay`] of this batch names.
    pub fn overlay(&self, id: OverlayId) -> Option<&JoinedOverlay> {
        self.routes.overlays.get(id).map(Arc::as_ref)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// Decides one packet. The packet may be rewritten in place (a fake
    /// destination, a clamped MSS); for [`Outbound::Reply`] the reply is
    /// in `reply`.
    pub fn outbound(&mut self, now: Instant, packet: &mut [u8], reply: &mut Vec<u8>) -> Outbound {
        let Some(key) = flow_key(packet) else {
            return self.drop(DropReason::Malformed);
        };
        if self.engine.settings.is_fake(flow_dst(&key)) {
            return self.fake_outbound(now, &key, packet, reply);
        }
        if !routable(&key) {
            return self.drop(DropReason::Unroutable);
        }
        let via = match self.flows.lookup(&key, now) {
            Lookup::Live(flow) => flow.via,
            Lookup::Stale(old) => {
                self.end_one(key, old);
                self.start(&key, now)
            }
            Lookup::Absent => self.start(&key, now),
        };
        self.carry(via, &key, packet)
    }

    /// A new flow claimed by a header rule.
    fn start(&mut self, key: &FlowKey, now: Instant) -> Via {
        let (rule, via) = match self.routes.first_header(key) {
            Some(route) => (
                Some(route.id),
                self.engine
                    .chooser
                    .choose(key, Claim::Header(route), &self.routes, now),
            ),
            // The classifier pinned this flow to a rule since deleted: keep
            // it on the plain path.
            None => (None, Via::Underlay),
        };
        tracing::debug!(flow = %describe(key), ?rule, ?via, "new flow");
        self.insert(*key, Flow::new(rule, via, None, now));
        via
    }

    fn insert(&mut self, key: FlowKey, flow: Flow) {
        if self.flows.is_full() {
            let now = flow.started;
            let ended = std::mem::take(&mut self.ended);
            let mut ended = self.collect_idle(now, ended, true);
            let freed = ended.len();
            self.end_all(&mut ended);
            self.ended = ended;
            self.engine
                .counters
                .flows_evicted
                .fetch_add(freed as u64, Relaxed);
            tracing::debug!(freed, "flow table full: forgot the flows idle the longest");
        }
        self.flows.insert(key, flow);
        let counters = &self.engine.counters;
        counters.flows_started.fetch_add(1, Relaxed);
        counters.flows.fetch_add(1, Relaxed);
    }

    /// Where a flow's packets go.
    fn carry(&self, via: Via, key: &FlowKey, packet: &mut [u8]) -> Outbound {
        match via {
            Via::Underlay => Outbound::Underlay,
            Via::Overlay(id) => match self.routes.overlays.get(id) {
                Some(overlay) => {
                    let to = overlay.path.next_hop(key);
                    let inner_v6 = packet.first().is_some_and(|b| b >> 4 == 6);
                    clamp_mss(
                        packet,
                        overlay.max_mss(self.engine.settings.uplink_mtu, inner_v6, to.is_ipv6()),
                    );
                    Outbound::Overlay { overlay: id, to }
                }
                // Its overlay is gone: the flow cannot continue where it
                // started, and moving it would change its source address.
                None => self.drop(DropReason::NoCarrier),
            },
            Via::Unavailable => self.drop(DropReason::NoCarrier),
        }
    }

    fn drop(&self, reason: DropReason) -> Outbound {
        self.engine.counters.dropped(reason);
        Outbound::Drop(reason)
    }

    /// A packet to a fake address: the first of its flow picks the real
    /// address and the carrier; every packet gets the real destination.
    fn fake_outbound(
        &mut self,
        now: Instant,
        key: &FlowKey,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Outbound {
        // Only what has ports (or an echo identifier) and is whole can be
        // rewritten; nothing else may start a flow and hold an address.
        if oasis_io::packet::ports(packet).is_none() {
            return self.drop(DropReason::Untranslatable);
        }
        let found = match self.flows.lookup(key, now) {
            Lookup::Live(flow) => flow.fake.map(|fake| (flow.via, fake)),
            Lookup::Stale(old) => {
                self.end_one(*key, old);
                None
            }
            Lookup::Absent => None,
        };
        let (via, binding) = match found {
            Some(found) => found,
            None => match self.start_fake(key, now) {
                Some(started) => started,
                None => {
                    self.engine.counters.fake_unknown.fetch_add(1, Relaxed);
                    return if unreachable_reply(packet, reply) {
                        self.engine.counters.replies.fetch_add(1, Relaxed);
                        Outbound::Reply
                    } else {
                        self.drop(DropReason::Malformed)
                    };
                }
            },
        };
        if let Err(e) = rewrite_address(packet, End::Destination, binding.real) {
            tracing::debug!(fake = %binding.fake, "cannot rewrite a packet to a fake address: {e}");
            return self.drop(DropReason::Untranslatable);
        }
        self.carry(via, key, packet)
    }

    /// A new flow to a fake address; None when the address stands for
    /// nothing (any more), or the NAT table refused it.
    fn start_fake(&mut self, key: &FlowKey, now: Instant) -> Option<(Via, FakeBinding)> {
        let fake = flow_dst(key);
        let (name, real) = {
            let mut table = self.engine.fakes.lock().unwrap_or_else(|e| e.into_inner());
            let entry = table.flow_started(fake, unix_now())?;
            let real = choose_real(entry, key);
            let name = entry.name.clone();
            if real.is_none() {
                table.flow_ended(fake, unix_now());
            }
            (name, real?)
        };
        // The rule that claims the name now decides: rules may have
        // changed since the answer was given.
        let (rule, via) = match self.routes.names.first_match(&name) {
            Some((rule, carrier)) => (
                Some(rule),
                self.engine
                    .chooser
                    .choose(key, Claim::Name { rule, carrier }, &self.routes, now),
            ),
            None => (None, Via::Underlay),
        };
        let in_kernel = via == Via::Underlay;
        let counters = &self.engine.counters;
        if in_kernel {
            // Replies of an underlay flow reach the application straight
            // from the uplink: without the reverse entry they would come
            // from an address it never talked to.
            let installed = self
                .engine
                .nat
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .install(key, fake, real);
            if let Err(e) = installed {
                counters.nat_errors.fetch_add(1, Relaxed);
                tracing::warn!(%fake, %real, "installing a NAT entry: {e}");
                self.engine
                    .fakes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .flow_ended(fake, unix_now());
                return None;
            }
            counters.fake_flows_underlay.fetch_add(1, Relaxed);
        } else {
            self.engine.add_reply(reply_key(key, real), fake);
            counters.fake_flows_overlay.fetch_add(1, Relaxed);
        }
        tracing::debug!(%name, %fake, %real, ?via, in_kernel, "new fake-address flow");
        let binding = FakeBinding {
            fake,
            real,
            in_kernel,
        };
        self.insert(*key, Flow::new(rule, via, Some(binding), now));
        self.engine.fake_flows.fetch_add(1, Relaxed);
        Some((via, binding))
    }

    /// When the router next has work of its own (ending idle flows).
    pub fn next_timeout(&self) -> Instant {
        self.next_sweep
    }

    /// Ends flows idle for longer than the timeout; call when
    /// [`Router::next_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        let ended = std::mem::take(&mut self.ended);
        let mut ended = self.collect_idle(now, ended, false);
        if !ended.is_empty() {
            tracing::debug!(count = ended.len(), "idle flows ended");
        }
        self.end_all(&mut ended);
        self.ended = ended;
    }

    /// Flows idle past the timeout (or, to make room, the longest idle).
    fn collect_idle(
        &mut self,
        now: Instant,
        mut ended: Vec<(FlowKey, Flow)>,
        make_room: bool,
    ) -> Vec<(FlowKey, Flow)> {
        ended.clear();
        let kernel_flows = self.engine.fake_flows.load(Relaxed) > 0;
        // The NAT table is asked only about in-kernel flows, under one
        // lock for the whole sweep.
        let nat = kernel_flows.then(|| self.engine.nat.lock().unwrap_or_else(|e| e.into_inner()));
        let kernel_seen = |key: &FlowKey, flow: &Flow| nat.as_ref()?.last_seen(key, flow.fake?.real);
        if make_room {
            self.flows.make_room(now, kernel_seen, &mut ended);
        } else {
            self.flows.expire(now, kernel_seen, &mut ended);
        }
        ended
    }

    fn end_one(&mut self, key: FlowKey, flow: Flow) {
        let mut ended = std::mem::take(&mut self.ended);
        ended.clear();
        ended.push((key, flow));
        self.end_all(&mut ended);
        self.ended = ended;
    }

    /// Undoes what starting the flows did: NAT entries, reply mappings,
    /// the fake table's count of live flows.
    fn end_all(&mut self, ended: &mut Vec<(FlowKey, Flow)>) {
        if ended.is_empty() {
            return;
        }
        self.engine.counters.flows.fetch_sub(ended.len() as u64, Relaxed);
        let fake = |(_, flow): &&(FlowKey, Flow)| flow.fake.is_some();
        if ended.iter().filter(fake).count() == 0 {
            ended.clear();
            return;
        }
        {
            let mut nat = self.engine.nat.lock().unwrap_or_else(|e| e.into_inner());
            for (key, flow) in ended.iter() {
                if let Some(binding) = flow.fake.filter(|b| b.in_kernel) {
                    nat.remove(key, binding.real);
                }
            }
        }
        let overlay_replies = ended.iter().filter_map(|(key, flow)| {
            let binding = flow.fake.filter(|b| !b.in_kernel)?;
            Some(reply_key(key, binding.real))
        });
        if ended.iter().any(|(_, f)| f.fake.is_some_and(|b| !b.in_kernel)) {
            self.engine.remove_replies(overlay_replies);
        }
        {
            let mut table = self.engine.fakes.lock().unwrap_or_else(|e| e.into_inner());
            let now = unix_now();
            for (_, flow) in ended.iter() {
                if let Some(binding) = flow.fake {
                    table.flow_ended(binding.fake, now);
                    self.engine.fake_flows.fetch_sub(1, Relaxed);
                }
            }
        }
        ended.clear();
    }
}
