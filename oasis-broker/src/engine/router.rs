//! Outbound decisions: for each diverted packet, given the time, what to do
//! with it: send it on the underlay, send it to an overlay's next hop, write
//! a reply to the application, or drop it for a named reason.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::proto::TCP;
use oasis_common::{FlowKey, FragKey};
use oasis_io::packet::{End, clamp_mss, rewrite_address, unreachable_reply};

use super::carrier::{CarrierChooser, Claim, Decision, NewFlow};
use super::counters::{DropReason, EngineCounters};
use super::encap::Encapsulation;
use super::fake::{choose_real, real_key, reply_key};
use super::flows::{FakeBinding, Flow, FlowTable, Lifetimes, Lookup};
use super::fragments::Fragments;
use super::measure::{FlowProbe, OutboundMeasure, Seen, Segment};
use super::offload::{KernelOp, KernelView, Offload};
pub use super::outbound::Outbound;
use super::packet::{Headers, describe, flow_dst, flow_src, frag_key, routable};
use super::routes::{Routes, Via};
use super::tables::TableError;
use crate::fake::{FakeTable, unix_now};
use crate::monitor::{Event, MonitorLink};
use crate::overlay::{JoinedOverlay, OverlayId};
use crate::shared::{Shared, snapshot};

/// Kernel operations a router queues before it must allocate: one packet
/// queues at most four; a sweep, four per ended flow.
const KERNEL_WORK: usize = 256;

/// Fragmented datagrams a packet thread follows at once.
const FRAGMENTED_DATAGRAMS: usize = 4096;

/// A pinned flow's packets that reach the broker this soon after its
/// first were on their way before the pin: no sign the kernel lost it.
const PINNED_IN_FLIGHT: Duration = Duration::from_millis(50);

/// How often a router ends idle flows and reports what it measured.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How long flows live without packets (TCP, TCP closing, the rest);
    /// a forgotten flow's next packet starts a new one.
    pub lifetimes: Lifetimes,
    /// Most flows one packet thread tracks.
    pub flow_capacity: usize,
    /// The largest uplink MTU: overlay flows' MSS is clamped to fit it.
    pub uplink_mtu: u16,
    /// The fake pools of name rules.
    pub fake_v4: Ipv4Net,
    pub fake_v6: Ipv6Net,
    /// Whether the kernel may wrap plain overlay flows itself after their
    /// first packet (the fast path).
    pub fast_path: bool,
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

/// A WireGuard overlay flow's reply key, as it comes back to the tunnel
/// address → the address of this host the flow left from.
pub type TunnelMap = HashMap<FlowKey, IpAddr>;

/// Reply key → the measurement of a metric rule's flow carried by an
/// overlay, which the return path feeds with the answers.
pub type MeasuredMap = HashMap<FlowKey, Arc<FlowProbe>>;

/// What every packet thread shares. Locks here are taken when a flow
/// starts or ends, never per packet of a known flow.
pub struct Engine {
    pub settings: EngineSettings,
    routes: Shared<Routes>,
    fakes: Arc<Mutex<FakeTable>>,
    replies: RwLock<ReplyMap>,
    /// Whether `replies` holds anything, so the return path takes no lock
    /// at all while no overlay carries a fake-address flow.
    has_replies: AtomicBool,
    tunnels: RwLock<TunnelMap>,
    /// Whether `tunnels` holds anything.
    has_tunnels: AtomicBool,
    measured: RwLock<MeasuredMap>,
    /// How many flows `measured` holds: while none, the return path looks
    /// nothing up.
    measured_count: AtomicUsize,
    pub counters: EngineCounters,
    chooser: Box<dyn CarrierChooser>,
    pub monitor: Arc<MonitorLink>,
    /// The origin of the measurements' clocks.
    epoch: Instant,
    /// Fake-address flows the packet threads' tables hold, summed.
    pub fake_flows: AtomicU64,
    /// Flows the kernel carries (pinned, translated or wrapped), summed:
    /// while none, sweeps ask the kernel nothing.
    pub(crate) kernel_flows: AtomicU64,
    /// Routers made, and the dumps of their flow tables `oasis flows` asked
    /// for: the generation asked, and each router's answer.
    routers: AtomicUsize,
    dump_wanted: AtomicU64,
    dumps: Mutex<HashMap<usize, (u64, Vec<FlowRecord>)>>,
}

impl Engine {
    pub fn new(
        settings: EngineSettings,
        routes: Routes,
        fakes: Arc<Mutex<FakeTable>>,
        chooser: Box<dyn CarrierChooser>,
        monitor: Arc<MonitorLink>,
        now: Instant,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            settings,
            routes: Arc::new(RwLock::new(Arc::new(routes))),
            fakes,
            replies: RwLock::new(HashMap::new()),
            has_replies: AtomicBool::new(false),
            tunnels: RwLock::new(HashMap::new()),
            has_tunnels: AtomicBool::new(false),
            measured: RwLock::new(HashMap::new()),
            measured_count: AtomicUsize::new(0),
            counters: EngineCounters::default(),
            chooser,
            monitor,
            epoch: now,
            fake_flows: AtomicU64::new(0),
            kernel_flows: AtomicU64::new(0),
            routers: AtomicUsize::new(0),
            dump_wanted: AtomicU64::new(0),
            dumps: Mutex::new(HashMap::new()),
        })
    }

    /// A router for one packet thread, reading the kernel's tables through
    /// `kernel` (it never writes them: see [`Router::next_work`]).
    pub fn router(self: &Arc<Self>, kernel: Arc<dyn KernelView + Send + Sync>) -> Router {
        let routes = self.routes();
        let metric_rules = routes.monitored_rules().next().is_some();
        Router {
            metric_rules,
            kernel,
            work: VecDeque::with_capacity(KERNEL_WORK),
            index: self.routers.fetch_add(1, Relaxed),
            dumped: 0,
            engine: self.clone(),
            routes,
            flows: FlowTable::new(self.settings.lifetimes, self.settings.flow_capacity),
            fragments: Fragments::new(FRAGMENTED_DATAGRAMS),
            next_sweep: self.epoch + SWEEP_EVERY,
            ended: Vec::new(),
            measuring: 0,
            started_monitored: 0,
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

    /// The tunnel map, when a WireGuard overlay carries any flow; held for
    /// one batch of returned packets.
    pub fn tunnels(&self) -> Option<RwLockReadGuard<'_, TunnelMap>> {
        if !self.has_tunnels.load(Relaxed) {
            return None;
        }
        Some(self.tunnels.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn add_tunnel(&self, key: FlowKey, own: IpAddr) {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        tunnels.insert(key, own);
        self.has_tunnels.store(true, Relaxed);
    }

    fn remove_tunnels(&self, keys: impl Iterator<Item = FlowKey>) {
        let mut tunnels = self.tunnels.write().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            tunnels.remove(&key);
        }
        self.has_tunnels.store(!tunnels.is_empty(), Relaxed);
    }

    /// The measurement of the flow a returned packet (by its key) answers,
    /// if it is measured.
    pub fn measured(&self, reply: &FlowKey) -> Option<Arc<FlowProbe>> {
        if self.measured_count.load(Relaxed) == 0 {
            return None;
        }
        self.measured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(reply)
            .cloned()
    }

    /// Whether any flow is measured here (the return path skips all work
    /// while none is).
    pub fn measuring(&self) -> bool {
        self.measured_count.load(Relaxed) > 0
    }

    fn add_measured(&self, reply: FlowKey, probe: Arc<FlowProbe>) {
        let mut measured = self.measured.write().unwrap_or_else(|e| e.into_inner());
        measured.insert(reply, probe);
        self.measured_count.store(measured.len(), Relaxed);
    }

    fn remove_measured(&self, replies: impl Iterator<Item = FlowKey>) {
        let mut measured = self.measured.write().unwrap_or_else(|e| e.into_inner());
        for reply in replies {
            measured.remove(&reply);
        }
        self.measured_count.store(measured.len(), Relaxed);
    }

    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Where a probe of the Monitor's goes (`key`: its flow, `packet`: the
    /// probe, built by the caller), by `routes` as any packet by `via`
    /// would; in `work`, what the kernel must do before it is sent. A TCP
    /// SYN on the underlay is timed by the kernel, which also passes the
    /// host's own reset to the answer rather than diverting it.
    pub fn probe(
        &self,
        routes: &Routes,
        via: Via,
        key: &FlowKey,
        packet: &mut [u8],
        now: Instant,
        work: &mut Vec<KernelOp>,
    ) -> Outbound {
        let syn = Segment::of(packet).is_some_and(|s| s.syn && !s.ack_flag);
        if via == Via::Underlay && syn {
            work.push(KernelOp::Pin {
                flow: *key,
                rule: 0,
                measured: true,
            });
            work.push(KernelOp::Measure {
                flow: *key,
                syn_sent: Some(now),
                probe: true,
            });
        }
        // Through a WireGuard peer the probe leaves from the tunnel
        // address, as a flow would; its answer is mapped back the same way.
        // Probes use the prober's few ports toward the Monitor's few
        // destinations: these entries stay bounded without an end.
        if let Via::Overlay(id) = via
            && let Some(link) = routes.overlays.get(id).and_then(|o| o.wireguard.as_ref())
            && let Some(tunnel) = link.tunnel_source(flow_dst(key).is_ipv6())
        {
            let reply = tunnel_reply_key(key, flow_dst(key), tunnel);
            let known = self
                .tunnels()
                .is_some_and(|t| t.get(&reply) == Some(&flow_src(key)));
            if !known {
                self.add_tunnel(reply, flow_src(key));
            }
        }
        carry(routes, &self.settings, via, key, None, syn, packet).unwrap_or_else(Outbound::Drop)
    }

    /// Asks every router for its flows; they answer at their next tick.
    /// The generation to wait for with [`Engine::flow_dump`].
    pub fn ask_flows(&self) -> u64 {
        self.dump_wanted.fetch_add(1, Relaxed) + 1
    }

    /// The flows of every router, once all have answered `generation`.
    pub fn flow_dump(&self, generation: u64) -> Option<Vec<FlowRecord>> {
        let dumps = self.dumps.lock().unwrap_or_else(|e| e.into_inner());
        let routers = self.routers.load(Relaxed);
        let answered = dumps.values().filter(|(g, _)| *g >= generation).count();
        (answered >= routers).then(|| {
            dumps
                .values()
                .flat_map(|(_, flows)| flows.iter().cloned())
                .collect()
        })
    }
}

/// One flow as a packet thread holds it, for `oasis flows` (the control
/// plane makes the view of it).
#[derive(Clone, Debug)]
pub struct FlowRecord {
    /// The flow as the host's stack sees it (a fake address's flow by its
    /// real destination).
    pub key: FlowKey,
    pub rule: Option<u32>,
    pub via: Via,
    /// For a metric rule's flow: why the Monitor chose the carrier.
    pub why: Option<crate::monitor::Why>,
    /// The fake address the application talks to, for a name rule's flow.
    pub fake: Option<IpAddr>,
    pub in_kernel: bool,
    pub age: Duration,
    pub idle: Duration,
    pub packets: u64,
}

/// What a packet of a known flow asks of the router.
enum Known {
    /// Carry it as the flow goes.
    Carry(Via),
    /// The kernel carries the flow but lost its verdict: pin it again.
    Repin(Via),
    /// A metric rule's flow the kernel carries sent its SYN again: the
    /// kernel knows whether the handshake was answered.
    SynAgain(Via),
    /// Its SYN went again unanswered: move the flow elsewhere.
    Rescue,
}

/// One packet thread's decisions: its flow table and the routes of the
/// batch at hand.
pub struct Router {
    /// Which router of the engine's it is, and the last dump it answered.
    index: usize,
    /// What it reads of the kernel's tables.
    kernel: Arc<dyn KernelView + Send + Sync>,
    /// Changes to the kernel's tables decided and not yet taken by the
    /// caller, oldest first.
    work: VecDeque<KernelOp>,
    dumped: u64,
    engine: Arc<Engine>,
    routes: Arc<Routes>,
    flows: FlowTable,
    /// Where the later fragments of datagrams go.
    fragments: Fragments,
    next_sweep: Instant,
    /// Flows ended by a sweep, kept to reuse its allocation.
    ended: Vec<(FlowKey, Flow)>,
    /// Flows of this table measured here: while none, sweeps report nothing.
    measuring: usize,
    /// Flows the Monitor chose a carrier for, and whether any rule of the
    /// batch's routes asks it to (the caller then times the decisions).
    started_monitored: u64,
    metric_rules: bool,
}

impl Router {
    /// Picks up the latest routes; called once per batch.
    pub fn begin_batch(&mut self) {
        let latest = self.engine.routes();
        if !Arc::ptr_eq(&latest, &self.routes) {
            self.metric_rules = latest.monitored_rules().next().is_some();
            self.routes = latest;
            self.unwrap_orphans();
        }
    }

    /// The kernel stops wrapping flows whose overlay is gone: their next
    /// packets come to the broker, which has no carrier for them, instead
    /// of going on to an entry node the host left.
    fn unwrap_orphans(&mut self) {
        if self.engine.kernel_flows.load(Relaxed) == 0 {
            return;
        }
        for (key, flow) in self.flows.iter_mut() {
            let Via::Overlay(id) = flow.via else { continue };
            if matches!(flow.offload, Offload::Encapsulated) && self.routes.overlays.get(id).is_none() {
                flow.offload = Offload::Broker;
                self.engine.kernel_flows.fetch_sub(1, Relaxed);
                self.work.push_back(KernelOp::Unencapsulate { flow: *key });
            }
        }
    }

    /// Whether a packet of this batch may start a flow the Monitor decides:
    /// the caller times such decisions (with their kernel work) for
    /// `oasis status`, and reads no clock per packet otherwise.
    pub fn decisions_to_time(&self) -> bool {
        self.metric_rules
    }

    /// Flows started whose carrier the Monitor chose, so far.
    pub fn started_monitored(&self) -> u64 {
        self.started_monitored
    }

    /// The overlay an [`Outbound::Overlay`] of this batch names.
    pub fn overlay(&self, id: OverlayId) -> Option<&JoinedOverlay> {
        self.routes.overlays.get(id).map(Arc::as_ref)
    }

    /// What goes in front of an [`Outbound::Module`]'s packet: the rule's
    /// metric, as long as the module's shim.
    pub fn module_shim(&self, rule: u32) -> Option<&[u8]> {
        self.routes.monitored(rule).map(|r| r.module_shim.as_slice())
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The routes of the batch at hand.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// The next change to the kernel's tables this router decided, oldest
    /// first. The caller carries out each before it sends the packet just
    /// decided (a flow's NAT entry must exist before its first reply can
    /// arrive), and reports a refusal with [`Router::kernel_refused`].
    pub fn next_work(&mut self) -> Option<KernelOp> {
        self.work.pop_front()
    }

    /// The kernel refused `op`, queued while deciding `packet` (or while
    /// sweeping: then `packet` is empty). The flow goes on without the
    /// kernel's help where it can; a fake address's flow the kernel cannot
    /// translate cannot go on at all. Returns the packet's new outcome when
    /// it changes.
    pub fn kernel_refused(
        &mut self,
        op: &KernelOp,
        error: &TableError,
        now: Instant,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Option<Outbound> {
        match *op {
            KernelOp::Translate { flow, fake, real, .. } => {
                let counters = &self.engine.counters;
                counters.nat_errors.fetch_add(1, Relaxed);
                let _ = counters
                    .fake_flows_underlay
                    .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
                tracing::warn!(%fake, %real, "installing a NAT entry: {error}");
                // Its replies would reach the application from an address
                // it never talked to.
                let old = self.flows.remove(&flow)?;
                self.end_one(flow, old, now);
                self.engine.counters.fake_unknown.fetch_add(1, Relaxed);
                if packet.is_empty() {
                    return None;
                }
                // The packet was given the real destination: the answer
                // must be about the address the application knows.
                let _ = rewrite_address(packet, End::Destination, fake);
                Some(if unreachable_reply(packet, reply) {
                    self.engine.counters.replies.fetch_add(1, Relaxed);
                    Outbound::Reply
                } else {
                    self.drop(DropReason::Malformed)
                })
            }
            KernelOp::Pin { flow, .. } => {
                tracing::debug!(flow = %describe(&flow), "the kernel cannot carry the flow: {error}");
                let held = self.flows.get_mut(&flow).filter(|f| f.offload.pinned())?;
                let measured = held.offload.measured_in_kernel();
                held.offload = Offload::Broker;
                self.engine.kernel_flows.fetch_sub(1, Relaxed);
                if measured {
                    self.work.push_back(KernelOp::Forget { flow });
                }
                None
            }
            KernelOp::Measure { flow, .. } => {
                tracing::debug!(flow = %describe(&flow), "the kernel cannot measure the flow: {error}");
                None
            }
            KernelOp::Encapsulate { flow, .. } => {
                tracing::debug!(flow = %describe(&flow), "the kernel cannot wrap the flow: {error}");
                let held = self
                    .flows
                    .get_mut(&flow)
                    .filter(|f| matches!(f.offload, Offload::Encapsulated))?;
                held.offload = Offload::Broker;
                self.engine.kernel_flows.fetch_sub(1, Relaxed);
                None
            }
            KernelOp::Untranslate { .. } | KernelOp::Forget { .. } | KernelOp::Unencapsulate { .. } => None,
        }
    }

    /// Decides one packet. The packet may be rewritten in place (a fake
    /// destination, a clamped MSS); for [`Outbound::Reply`] the reply is
    /// in `reply`.
    pub fn outbound(&mut self, now: Instant, packet: &mut [u8], reply: &mut Vec<u8>) -> Outbound {
        let Some(headers) = Headers::parse(packet) else {
            return self.drop(DropReason::Malformed);
        };
        let key = headers.key;
        let Some(fragment) = headers.fragment else {
            return match self.outbound_packet(now, &headers, packet, reply) {
                Outbound::Drop(DropReason::NoCarrier) => self.end_without_carrier(&key, packet, reply),
                Outbound::Overlay { overlay, to } => self.fit_overlay(&key, overlay, to, packet, reply),
                outbound => outbound,
            };
        };
        let datagram = frag_key(&key, &fragment);
        if !fragment.first {
            return self.later_fragment(now, &datagram, packet);
        }
        let destination = flow_dst(&key);
        let outbound = self.outbound_packet(now, &headers, packet, reply);
        let rewritten = oasis_io::packet::addresses(packet)
            .map(|(_, dst)| dst)
            .filter(|dst| *dst != destination);
        self.fragments.first(datagram, outbound, rewritten, now);
        outbound
    }

    /// A packet of a flow whose carrier is gone (its overlay was left, or
    /// cannot be used): the application hears at once, by a reset for TCP
    /// and an ICMP unreachable otherwise, rather than sending into a void.
    /// The flow is not moved elsewhere: its source address would change.
    fn end_without_carrier(&mut self, key: &FlowKey, packet: &mut [u8], reply: &mut Vec<u8>) -> Outbound {
        // A fake-address flow's packet was given its real destination: the
        // answer must come from the address the application knows.
        let destination = flow_dst(key);
        if oasis_io::packet::addresses(packet).is_some_and(|(_, dst)| dst != destination) {
            let _ = rewrite_address(packet, End::Destination, destination);
        }
        let tcp_reset = key.proto == TCP && oasis_io::packet::reset_reply(packet, reply);
        if tcp_reset {
            self.flows.closing(key);
        }
        if tcp_reset || (key.proto != TCP && oasis_io::packet::prohibited_reply(packet, reply)) {
            self.engine.counters.replies.fetch_add(1, Relaxed);
            return Outbound::Reply;
        }
        Outbound::Drop(DropReason::NoCarrier)
    }

    /// A TCP segment for an overlay that would not fit its path once
    /// encapsulated, and may not be fragmented: the application hears the
    /// MTU that fits (ICMP fragmentation needed, or packet too big), as
    /// from a router before a narrower link, and its path MTU discovery
    /// sends smaller. Anything else that the uplink could have carried goes
    /// on, and the kernel fragments the encapsulated datagram, as tunnels
    /// may: a UDP application sending datagrams as large as its link takes
    /// (`iperf3 -u -l 1472`) would otherwise get EMSGSIZE on its socket
    /// and give up, where without Oasis it works.
    fn fit_overlay(
        &mut self,
        key: &FlowKey,
        overlay: OverlayId,
        to: std::net::SocketAddr,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Outbound {
        let carried = Outbound::Overlay { overlay, to };
        let Some(joined) = self.routes.overlays.get(overlay) else {
            return carried;
        };
        let limit = joined.max_packet(self.engine.settings.uplink_mtu, to.is_ipv6());
        let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
        let fits_uplink = packet.len() <= usize::from(self.engine.settings.uplink_mtu);
        // IPv6 links carry at least 1280 bytes: below that, IPv6 hosts
        // do not go, and only fragmenting the encapsulation helps.
        if packet.len() <= usize::from(limit)
            || !oasis_io::packet::must_not_fragment(packet)
            || (v6 && limit < 1280)
            || (key.proto != TCP && fits_uplink)
        {
            return carried;
        }
        let destination = flow_dst(key);
        if oasis_io::packet::addresses(packet).is_some_and(|(_, dst)| dst != destination) {
            let _ = rewrite_address(packet, End::Destination, destination);
        }
        if !oasis_io::packet::too_big_reply(packet, limit, reply) {
            return carried;
        }
        self.engine.counters.too_big.fetch_add(1, Relaxed);
        self.engine.counters.replies.fetch_add(1, Relaxed);
        Outbound::Reply
    }

    /// A fragment after the first: the way its first went, or nowhere.
    fn later_fragment(&mut self, now: Instant, datagram: &FragKey, packet: &mut [u8]) -> Outbound {
        let Some(route) = self.fragments.later(datagram, now) else {
            return self.drop(DropReason::OrphanFragment);
        };
        if let Some(real) = route.destination
            && oasis_io::packet::rewrite_ip_address(packet, End::Destination, real).is_err()
        {
            return self.drop(DropReason::Untranslatable);
        }
        route.outbound
    }

    fn outbound_packet(
        &mut self,
        now: Instant,
        headers: &Headers,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Outbound {
        let key = headers.key;
        if self.engine.settings.is_fake(flow_dst(&key)) {
            return self.fake_outbound(now, headers, packet, reply);
        }
        if !routable(&key, packet) {
            return self.drop(DropReason::Unroutable);
        }
        if headers.icmp_error {
            // An error about a flow goes where the flow goes; it never
            // starts one (nothing else of it would follow).
            let via = self.flows.get(&key).map_or(Via::Underlay, |flow| flow.via);
            return self.carry(via, &key, false, packet);
        }
        let via = match self.flows.lookup(&key, now) {
            Lookup::Live(flow) => {
                let wrap_next = matches!(flow.offload, Offload::WrapNext);
                match known(flow, packet, now) {
                    Known::Carry(via) => {
                        if wrap_next {
                            self.wrap_next(&key);
                        }
                        via
                    }
                    Known::Repin(via) => {
                        self.repin(&key);
                        via
                    }
                    Known::SynAgain(via) if self.answered(&key) => {
                        self.repin(&key);
                        via
                    }
                    Known::SynAgain(_) | Known::Rescue => self
                        .rescue(&key, packet, now)
                        .map_or(Via::Underlay, |(via, _)| via),
                }
            }
            Lookup::Stale(old) => {
                self.end_one(key, old, now);
                self.start(&key, packet, now, None)
            }
            Lookup::Absent => self.start(&key, packet, now, None),
        };
        if headers.closing() {
            self.flows.closing(&key);
        }
        self.carry(via, &key, headers.syn(), packet)
    }

    /// Whether the kernel saw a flow's handshake answered.
    fn answered(&self, key: &FlowKey) -> bool {
        let real = self
            .flows
            .get(key)
            .and_then(|f| f.fake)
            .map_or(*key, |f| real_key(key, f.real));
        self.kernel.answered(&real)
    }

    /// A new flow claimed by a header rule.
    fn start(&mut self, key: &FlowKey, packet: &[u8], now: Instant, exclude: Option<Via>) -> Via {
        let flow = NewFlow {
            key,
            dst: flow_dst(key),
            exclude,
        };
        let kernel = &self.kernel;
        let (rule, decision) = match self.routes.first_header(key, || kernel.claimed_by(key)) {
            Some(route) => (
                Some(route.id),
                self.engine
                    .chooser
                    .choose(flow, Claim::Header(route), &self.routes, now),
            ),
            // The classifier pinned this flow to a rule since deleted: keep
            // it on the plain path.
            None => (None, Decision::fixed(Via::Underlay)),
        };
        let via = self.carried(decision.via, key);
        tracing::debug!(flow = %describe(key), ?rule, ?via, why = ?decision.why, "new flow");
        let mut new = Flow::new(rule, via, None, now);
        new.why = decision.why;
        if decision.monitored {
            new.monitored = true;
            self.measure(key, key, &mut new, packet, now);
            self.started_monitored += 1;
        } else if let (Via::Underlay, Some(rule)) = (via, rule) {
            // The underlay needs nothing of the broker: the flow's later
            // packets pass in the kernel, counted by its rule, as if Oasis
            // were not there.
            self.work.push_back(KernelOp::Pin {
                flow: *key,
                rule,
                measured: false,
            });
            new.offload = Offload::Pinned { measured: false };
        } else if let (Via::Overlay(id), Some(rule)) = (via, rule)
            && self.encapsulation(id, key, rule).is_some()
        {
            // A plain overlay needs the broker only for what the kernel
            // leaves it (the handshake, the end, what is too big), once the
            // flow has a second packet.
            new.offload = Offload::WrapNext;
        }
        self.insert(*key, new);
        via
    }

    /// `via`, unless it is an overlay whose path cannot carry the flow
    /// (`real`: as it leaves the host): no WireGuard peer's AllowedIPs
    /// hold its destination, or there is no tunnel address of its family.
    /// Such a flow has no carrier; it never leaks onto another path.
    fn carried(&self, via: Via, real: &FlowKey) -> Via {
        match via {
            Via::Overlay(id)
                if self
                    .routes
                    .overlays
                    .get(id)
                    .is_some_and(|o| !o.path.carries(real)) =>
            {
                tracing::debug!(flow = %describe(real), "the overlay's path cannot carry the flow");
                Via::Unavailable
            }
            via => via,
        }
    }

    /// The second packet of a flow left to wrap (`Offload::WrapNext`): the
    /// kernel takes it from here, when it still may (its overlay, the fast
    /// path).
    fn wrap_next(&mut self, key: &FlowKey) {
        let Some(flow) = self.flows.get(key) else { return };
        let (Offload::WrapNext, Via::Overlay(id), Some(rule)) = (&flow.offload, flow.via, flow.rule) else {
            return;
        };
        let how = self.encapsulation(id, key, rule);
        let Some(flow) = self.flows.get_mut(key) else {
            return;
        };
        match how {
            Some(how) => {
                self.work.push_back(KernelOp::Encapsulate { flow: *key, how });
                flow.offload = Offload::Encapsulated;
                self.engine.kernel_flows.fetch_add(1, Relaxed);
            }
            None => flow.offload = Offload::Broker,
        }
    }

    /// How the kernel may carry a flow of overlay `id` itself, when the
    /// fast path is on and the overlay allows it.
    fn encapsulation(&self, id: OverlayId, key: &FlowKey, rule: u32) -> Option<Encapsulation> {
        if !self.engine.settings.fast_path {
            return None;
        }
        let overlay = self.routes.overlays.get(id)?;
        Encapsulation::of(
            overlay,
            overlay.path.next_hop(key),
            rule,
            self.engine.settings.uplink_mtu,
        )
    }

    /// Sets up the measurement of a metric rule's new flow (`real`: the
    /// flow as it leaves the host, by its real destination). An underlay
    /// flow is left to the kernel, which measures it; an overlay flow is
    /// measured here.
    fn measure(&mut self, key: &FlowKey, real: &FlowKey, flow: &mut Flow, packet: &[u8], now: Instant) {
        let segment = Segment::of(packet);
        let syn = segment.filter(|s| s.syn && !s.ack_flag).map(|_| now);
        match flow.via {
            Via::Underlay => {
                // A translated flow already passes in the kernel.
                let translated = matches!(flow.offload, Offload::Translated { .. });
                if !translated {
                    self.work.push_back(KernelOp::Pin {
                        flow: *key,
                        rule: flow.rule.unwrap_or(0),
                        measured: true,
                    });
                }
                self.work.push_back(KernelOp::Measure {
                    flow: *real,
                    syn_sent: syn,
                    probe: false,
                });
                flow.offload = if translated {
                    Offload::Translated { measured: true }
                } else {
                    Offload::Pinned { measured: true }
                };
            }
            Via::Overlay(_) => {
                let probe = Arc::new(FlowProbe::new(flow.via, flow_dst(real), self.engine.epoch));
                let mut measure = OutboundMeasure::new(probe.clone(), now);
                if let Some(segment) = &segment {
                    measure.outbound(segment, now);
                }
                self.engine.add_measured(reply_key(real, flow_dst(real)), probe);
                flow.offload = Offload::Measured(Box::new(measure));
                self.measuring += 1;
            }
            Via::Unavailable => {}
        }
    }

    /// A pinned flow's packet came back: the kernel lost its verdict (its
    /// cache is bounded); pin it again.
    fn repin(&mut self, key: &FlowKey) {
        let Some(flow) = self.flows.get(key).filter(|f| f.offload.pinned()) else {
            return;
        };
        self.work.push_back(KernelOp::Pin {
            flow: *key,
            rule: flow.rule.unwrap_or(0),
            measured: flow.monitored(),
        });
    }

    /// A metric rule's flow whose SYN went again unanswered: the carrier
    /// failed it before any connection state existed, so it starts over on
    /// another. Its new carrier, and its fake binding if it has one; None
    /// when a fake address no longer stands for anything.
    fn rescue(&mut self, key: &FlowKey, packet: &[u8], now: Instant) -> Option<(Via, Option<FakeBinding>)> {
        let old = self.flows.remove(key)?;
        let from = old.via;
        let dst = old.fake.map_or_else(|| flow_dst(key), |f| f.real);
        self.engine
            .monitor
            .report(now, Event::SynFailed { via: from, dst });
        self.engine.counters.rescued.fetch_add(1, Relaxed);
        tracing::info!(flow = %describe(key), ?from, "handshake unanswered: the flow moves to another carrier");
        let fake = old.fake.is_some();
        self.end_one(*key, old, now);
        if fake {
            self.start_fake(key, packet, now, Some(from))
                .map(|(via, binding)| (via, Some(binding)))
        } else {
            Some((self.start(key, packet, now, Some(from)), None))
        }
    }

    fn insert(&mut self, key: FlowKey, flow: Flow) {
        if self.flows.is_full() {
            let now = flow.started;
            let ended = std::mem::take(&mut self.ended);
            let mut ended = self.collect_idle(now, ended, true);
            let freed = ended.len();
            self.end_all(&mut ended, now);
            self.ended = ended;
            self.engine
                .counters
                .flows_evicted
                .fetch_add(freed as u64, Relaxed);
            tracing::debug!(freed, "flow table full: forgot the flows idle the longest");
        }
        let mut flow = flow;
        if let Via::Overlay(id) = flow.via
            && let Some(overlay) = self.routes.overlays.get(id)
        {
            overlay.flows.fetch_add(1, Relaxed);
            // Through a WireGuard peer the flow leaves from the tunnel
            // address; its replies come back to it.
            let real = flow.fake.map_or_else(|| flow_dst(&key), |f| f.real);
            if let Some(tunnel) = overlay
                .wireguard
                .as_ref()
                .and_then(|w| w.tunnel_source(real.is_ipv6()))
            {
                flow.tunnel = Some(tunnel);
                self.engine
                    .add_tunnel(tunnel_reply_key(&key, real, tunnel), flow_src(&key));
            }
        }
        if flow.in_kernel() {
            self.engine.kernel_flows.fetch_add(1, Relaxed);
        }
        self.flows.insert(key, flow);
        let counters = &self.engine.counters;
        counters.flows_started.fetch_add(1, Relaxed);
        counters.flows.fetch_add(1, Relaxed);
    }

    /// Where a flow's packets go.
    fn carry(&self, via: Via, key: &FlowKey, syn: bool, packet: &mut [u8]) -> Outbound {
        let rule = self.flows.get(key).and_then(|f| f.rule);
        match carry(&self.routes, &self.engine.settings, via, key, rule, syn, packet) {
            Ok(outbound) => outbound,
            Err(reason) => self.drop(reason),
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
        headers: &Headers,
        packet: &mut [u8],
        reply: &mut Vec<u8>,
    ) -> Outbound {
        let key = &headers.key;
        if headers.icmp_error {
            return self.fake_error(key, packet);
        }
        // Only what has ports (or an echo identifier) and is whole can be
        // rewritten; nothing else may start a flow and hold an address.
        if !headers.ported {
            return self.drop(DropReason::Untranslatable);
        }
        let found = match self.flows.lookup(key, now) {
            Lookup::Live(flow) => flow.fake.map(|binding| (known(flow, packet, now), binding)),
            Lookup::Stale(old) => {
                self.end_one(*key, old, now);
                None
            }
            Lookup::Absent => None,
        };
        let started = match found {
            Some((Known::Carry(via) | Known::Repin(via), binding)) => Some((via, binding)),
            Some((Known::SynAgain(via), binding)) if self.answered(key) => Some((via, binding)),
            Some((Known::SynAgain(_) | Known::Rescue, _)) => self
                .rescue(key, packet, now)
                .and_then(|(via, binding)| Some((via, binding?))),
            None => self.start_fake(key, packet, now, None),
        };
        let Some((via, binding)) = started else {
            self.engine.counters.fake_unknown.fetch_add(1, Relaxed);
            return if unreachable_reply(packet, reply) {
                self.engine.counters.replies.fetch_add(1, Relaxed);
                Outbound::Reply
            } else {
                self.drop(DropReason::Malformed)
            };
        };
        if let Err(e) = rewrite_address(packet, End::Destination, binding.real) {
            tracing::debug!(fake = %binding.fake, "cannot rewrite a packet to a fake address: {e}");
            return self.drop(DropReason::Untranslatable);
        }
        self.carry(via, key, headers.syn(), packet)
    }

    /// This host's ICMP error about a fake-address flow (a port unreachable
    /// for a datagram that came over the overlay, say): sent to the fake
    /// address about a packet from it, it leaves about the real one, the
    /// way the flow goes. Without the flow there is no real address.
    fn fake_error(&mut self, key: &FlowKey, packet: &mut [u8]) -> Outbound {
        let Some((via, binding)) = self.flows.get(key).and_then(|f| Some((f.via, f.fake?))) else {
            return self.drop(DropReason::Untranslatable);
        };
        if oasis_io::packet::rewrite_error_about(packet, End::Source, binding.real).is_err() {
            return self.drop(DropReason::Untranslatable);
        }
        self.carry(via, key, false, packet)
    }

    /// A new flow to a fake address; None when the address stands for
    /// nothing (any more), or the NAT table refused it.
    fn start_fake(
        &mut self,
        key: &FlowKey,
        packet: &[u8],
        now: Instant,
        exclude: Option<Via>,
    ) -> Option<(Via, FakeBinding)> {
        let fake = flow_dst(key);
        let (name, real) = {
            let mut table = self.engine.fakes.lock().unwrap_or_else(|e| e.into_inner());
            let entry = table.flow_started(fake, unix_now())?;
            let real = choose_real(entry, key);
            // An alias answers for the name its chain reached: that
            // name's rule decides.
            let name = entry.claimed.clone().unwrap_or_else(|| entry.name.clone());
            if real.is_none() {
                table.flow_ended(fake, unix_now());
            }
            (name, real?)
        };
        // The rule that claims the name now decides: rules may have
        // changed since the answer was given.
        let flow = NewFlow {
            key,
            dst: real,
            exclude,
        };
        let (rule, decision) = match self.routes.names.first_match_any_sender(&name) {
            Some((rule, carrier)) => (
                Some(rule),
                self.engine
                    .chooser
                    .choose(flow, Claim::Name { rule, carrier }, &self.routes, now),
            ),
            None => (None, Decision::fixed(Via::Underlay)),
        };
        let via = self.carried(decision.via, &real_key(key, real));
        let in_kernel = via == Via::Underlay;
        let counters = &self.engine.counters;
        if in_kernel {
            // Replies of an underlay flow reach the application straight
            // from the uplink: the caller installs the reverse entry before
            // it sends this packet, or they would come from an address the
            // application never talked to.
            self.work.push_back(KernelOp::Translate {
                flow: *key,
                fake,
                real,
                measure: decision.monitored,
            });
            counters.fake_flows_underlay.fetch_add(1, Relaxed);
        } else {
            self.engine.add_reply(reply_key(key, real), fake);
            counters.fake_flows_overlay.fetch_add(1, Relaxed);
        }
        tracing::debug!(%name, %fake, %real, ?via, in_kernel, why = ?decision.why, "new fake-address flow");
        let binding = FakeBinding { fake, real };
        let mut new = Flow::new(rule, via, Some(binding), now);
        if in_kernel {
            new.offload = Offload::Translated { measured: false };
        }
        new.why = decision.why;
        if decision.monitored {
            new.monitored = true;
            self.measure(key, &real_key(key, real), &mut new, packet, now);
            self.started_monitored += 1;
        }
        self.insert(*key, new);
        self.engine.fake_flows.fetch_add(1, Relaxed);
        Some((via, binding))
    }

    /// When the router next has work of its own (ending idle flows).
    pub fn next_timeout(&self) -> Instant {
        self.next_sweep
    }

    /// Ends flows idle for longer than the timeout and reports what was
    /// measured; call when [`Router::next_timeout`] has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let wanted = self.engine.dump_wanted.load(Relaxed);
        if wanted > self.dumped {
            self.dump(wanted, now);
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        if !self.fragments.is_empty() {
            self.fragments.expire(now);
        }
        if self.measuring > 0 {
            let monitor = &self.engine.monitor;
            for (_, flow) in self.flows.iter_mut() {
                if let Offload::Measured(measure) = &mut flow.offload {
                    measure.report(now, &mut |event| monitor.report(now, event));
                }
            }
        }
        let ended = std::mem::take(&mut self.ended);
        let mut ended = self.collect_idle(now, ended, false);
        if !ended.is_empty() {
            tracing::debug!(count = ended.len(), "idle flows ended");
        }
        self.end_all(&mut ended, now);
        self.ended = ended;
    }

    /// Hands the engine this table's flows, for `oasis flows`.
    fn dump(&mut self, generation: u64, now: Instant) {
        let flows = self
            .flows
            .iter()
            .map(|(key, flow)| {
                let (shown, fake) = match flow.fake {
                    Some(binding) => (real_key(key, binding.real), Some(binding.fake)),
                    None => (*key, None),
                };
                FlowRecord {
                    key: shown,
                    rule: flow.rule,
                    via: flow.via,
                    why: flow.why,
                    fake,
                    in_kernel: flow.in_kernel(),
                    age: now.saturating_duration_since(flow.started),
                    idle: now.saturating_duration_since(flow.last_seen),
                    packets: flow.packets,
                }
            })
            .collect();
        self.engine
            .dumps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.index, (generation, flows));
        self.dumped = generation;
    }

    /// Flows idle past the timeout (or, to make room, the longest idle).
    fn collect_idle(
        &mut self,
        now: Instant,
        mut ended: Vec<(FlowKey, Flow)>,
        make_room: bool,
    ) -> Vec<(FlowKey, Flow)> {
        ended.clear();
        // The kernel is asked only about in-kernel flows.
        let kernel_flows = self.engine.kernel_flows.load(Relaxed) > 0;
        let kernel = &self.kernel;
        let kernel_seen = |key: &FlowKey, flow: &Flow| {
            if !kernel_flows {
                return None;
            }
            match flow.offload {
                Offload::Pinned { .. } => kernel.pinned_seen(key),
                Offload::Translated { .. } => kernel.translated_seen(key, flow.fake?.real),
                Offload::Encapsulated => kernel.encapsulated_seen(key),
                Offload::Broker | Offload::Measured(_) | Offload::WrapNext => None,
            }
        };
        if make_room {
            self.flows.make_room(now, kernel_seen, &mut ended);
        } else {
            self.flows.expire(now, kernel_seen, &mut ended);
        }
        ended
    }

    fn end_one(&mut self, key: FlowKey, flow: Flow, now: Instant) {
        let mut ended = std::mem::take(&mut self.ended);
        ended.clear();
        ended.push((key, flow));
        self.end_all(&mut ended, now);
        self.ended = ended;
    }

    /// Undoes what starting the flows did: NAT entries, pins, reply
    /// mappings, measurements, the fake table's count of live flows.
    fn end_all(&mut self, ended: &mut Vec<(FlowKey, Flow)>, now: Instant) {
        if ended.is_empty() {
            return;
        }
        self.engine.counters.flows.fetch_sub(ended.len() as u64, Relaxed);
        for (_, flow) in ended.iter() {
            if let Via::Overlay(id) = flow.via
                && let Some(overlay) = self.routes.overlays.get(id)
            {
                let _ = overlay
                    .flows
                    .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
            }
        }
        let monitor = &self.engine.monitor;
        let mut measured_here = 0;
        for (_, flow) in ended.iter_mut() {
            if let Offload::Measured(measure) = &mut flow.offload {
                measure.report(now, &mut |event| monitor.report(now, event));
                measured_here += 1;
            }
        }
        if measured_here > 0 {
            self.measuring = self.measuring.saturating_sub(measured_here);
            self.engine.remove_measured(
                ended
                    .iter()
                    .filter(|(_, f)| matches!(f.offload, Offload::Measured(_)))
                    .map(|(key, flow)| {
                        let real = flow.fake.map_or_else(|| flow_dst(key), |f| f.real);
                        reply_key(key, real)
                    }),
            );
        }
        if ended.iter().any(|(_, f)| f.tunnel.is_some()) {
            self.engine.remove_tunnels(ended.iter().filter_map(|(key, flow)| {
                let real = flow.fake.map_or_else(|| flow_dst(key), |f| f.real);
                Some(tunnel_reply_key(key, real, flow.tunnel?))
            }));
        }
        let special = |flow: &Flow| flow.fake.is_some() || flow.in_kernel();
        if !ended.iter().any(|(_, f)| special(f)) {
            ended.clear();
            return;
        }
        for (key, flow) in ended.iter() {
            if let (Offload::Translated { .. }, Some(binding)) = (&flow.offload, flow.fake) {
                self.work.push_back(KernelOp::Untranslate {
                    flow: *key,
                    real: binding.real,
                });
            }
            if flow.offload.pinned() || flow.offload.measured_in_kernel() {
                let real = flow.fake.map_or(*key, |f| real_key(key, f.real));
                self.work.push_back(KernelOp::Forget { flow: *key });
                if real != *key {
                    self.work.push_back(KernelOp::Forget { flow: real });
                }
            }
            if matches!(flow.offload, Offload::Encapsulated) {
                self.work.push_back(KernelOp::Unencapsulate { flow: *key });
            }
            if flow.in_kernel() {
                self.engine.kernel_flows.fetch_sub(1, Relaxed);
            }
        }
        let on_overlay =
            |flow: &Flow| flow.fake.is_some() && !matches!(flow.offload, Offload::Translated { .. });
        let overlay_replies = ended
            .iter()
            .filter(|(_, f)| on_overlay(f))
            .filter_map(|(key, flow)| {
                let binding = flow.fake?;
                Some(reply_key(key, binding.real))
            });
        if ended.iter().any(|(_, f)| on_overlay(f)) {
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

/// The key a reply of the flow `key` (to `real`) has when it comes back
/// to a WireGuard overlay's tunnel address.
fn tunnel_reply_key(key: &FlowKey, real: IpAddr, tunnel: IpAddr) -> FlowKey {
    let mut reply = reply_key(key, real);
    reply.dst = [0; 16];
    match tunnel {
        IpAddr::V4(v4) => reply.dst[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => reply.dst = v6.octets(),
    }
    reply
}

/// Where a packet goes by `via`, the one place that knows: the underlay,
/// an overlay's next hop for the flow (its MSS clamped to fit the
/// encapsulation), or the monitor module of the flow's metric `rule`.
fn carry(
    routes: &Routes,
    settings: &EngineSettings,
    via: Via,
    key: &FlowKey,
    rule: Option<u32>,
    syn: bool,
    packet: &mut [u8],
) -> Result<Outbound, DropReason> {
    match via {
        Via::Underlay => Ok(Outbound::Underlay),
        Via::Overlay(id) => match routes.overlays.get(id) {
            Some(overlay) if overlay.monitor => {
                // The module forwards the packet on over a carrier of its
                // choosing; its MSS is the module's business.
                match rule.filter(|r| routes.monitored(*r).is_some()) {
                    Some(rule) => Ok(Outbound::Module {
                        overlay: id,
                        to: overlay.path.next_hop(key),
                        rule,
                    }),
                    None => Err(DropReason::NoCarrier),
                }
            }
            Some(overlay) => Ok(Outbound::Overlay {
                overlay: id,
                to: toward_overlay(overlay, settings.uplink_mtu, key, syn, packet),
            }),
            // Its overlay is gone: the flow cannot continue where it
            // started, and moving it would change its source address.
            None => Err(DropReason::NoCarrier),
        },
        Via::Unavailable => Err(DropReason::NoCarrier),
    }
}

/// The entry node of `overlay` that carries the flow `key`, with the MSS
/// of a TCP SYN (`syn`: the packet is one) clamped to fit the overlay's
/// encapsulation on an uplink of `uplink_mtu`: for the flows the broker
/// carries, and for the packets a monitor module sends over an overlay of
/// its choosing.
pub fn toward_overlay(
    overlay: &JoinedOverlay,
    uplink_mtu: u16,
    key: &FlowKey,
    syn: bool,
    packet: &mut [u8],
) -> SocketAddr {
    let to = overlay.path.next_hop(key);
    if syn {
        let inner_v6 = packet.first().is_some_and(|b| b >> 4 == 6);
        clamp_mss(packet, overlay.max_mss(uplink_mtu, inner_v6, to.is_ipv6()));
    }
    to
}

/// What a packet of a known flow asks for. Metric rules' flows are
/// measured here (overlay flows), and watched for a SYN sent again.
fn known(flow: &mut Flow, packet: &[u8], now: Instant) -> Known {
    if !flow.monitored() {
        // What the application sent while the first packet was being
        // decided was diverted before the pin existed: carried, not pinned
        // again one system call each.
        let in_flight = now.saturating_duration_since(flow.started) < PINNED_IN_FLIGHT;
        return if flow.offload.pinned() && !in_flight {
            Known::Repin(flow.via)
        } else {
            Known::Carry(flow.via)
        };
    }
    let segment = Segment::of(packet);
    if let Offload::Measured(measure) = &mut flow.offload {
        return match segment.map(|s| measure.outbound(&s, now)) {
            Some(Seen::SynUnanswered) => Known::Rescue,
            _ => Known::Carry(flow.via),
        };
    }
    // The kernel carries the flow: a packet here is its SYN again (the
    // classifier matches every SYN afresh, and the kernel NAT hands a
    // measured flow's SYNs to the broker) or a lost verdict.
    let syn = segment.is_some_and(|s| s.syn && !s.ack_flag);
    if syn && flow.packets > 1 && flow.in_kernel() {
        return Known::SynAgain(flow.via);
    }
    if flow.offload.pinned() {
        Known::Repin(flow.via)
    } else {
        Known::Carry(flow.via)
    }
}
