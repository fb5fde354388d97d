//! Runs one overlay's module: a thread of its own with two sockets. The
//! loopback socket is the module's port, where the broker sends the
//! overlay's packets (`[shim][IP packet]`, as to any local module) and from
//! where the module's answers reach the broker's standard and underlay
//! ports. The outside socket talks to the overlay's entry nodes, and hears
//! only them. A module that stops (trap, CPU, memory, flood) is started
//! again after a pause that doubles up to a minute; meanwhile the overlay
//! is marked down, and new flows of rules that did not pin it take the
//! underlay.
//!
//! A monitor module's runner talks to the joined overlays instead of entry
//! nodes of its own: it puts the overlay's shim (and token) in front of
//! each packet the module sends over it, takes it off each answer, and
//! tells the module the overlays' names, never their addresses or tokens.
//!
//! Before it carries out anything a module asked, it asks the module's
//! [`Confinement`]: packets for the underlay or over overlays must be of
//! flows this host handed the module, packets for this host must answer
//! them, and datagrams outward must fit the module's byte budget.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::Module;

use oasis_io::datagram::datagrams;

use super::confine::{Confinement, FlowRefusals, Refusal};
use super::{Action, Actions, ModuleLimits, Peers, Refusals, Running, Sandbox};
use crate::engine::packet::Headers;
use crate::engine::{Lifetimes, toward_overlay};
use crate::overlay::{JoinedOverlay, OverlayId, OverlayTable};
use crate::shared::{Shared, snapshot};

const TICK: Duration = Duration::from_millis(100);
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(60);
/// Running this long without a stop forgives earlier ones.
const STABLE: Duration = Duration::from_secs(60);

/// What `overlay show` reports of a module.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub digest: String,
    /// `running`, `starting`, or `stopped: WHY; again in N s`.
    pub state: String,
    pub restarts: u64,
    /// Why it was last stopped, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stop: Option<String>,
    pub from_host: u64,
    pub to_entries: u64,
    pub from_entries: u64,
    pub to_host: u64,
    pub to_underlay: u64,
    /// Datagrams from senders other than the entry nodes or this host.
    pub refused_senders: u64,
    /// Packets that arrived while it was down, dropped.
    pub dropped_while_down: u64,
    /// Flows this host handed it that are live now.
    #[serde(default)]
    pub flows: u64,
    /// What it asked for that was refused: packets of flows this host never
    /// handed it, answers to none, sends past its byte budget.
    #[serde(default)]
    pub confined: FlowRefusals,
    pub refusals: Refusals,
    /// The compile: taken from the cache, or how long it took.
    pub compile: String,
    /// How long its last start (instantiation and `oasis_start`) took.
    #[serde(default)]
    pub start_us: u64,
}

/// The per-packet counts, kept apart from the status so that no packet
/// takes a lock.
#[derive(Default)]
struct Counts {
    from_host: AtomicU64,
    to_entries: AtomicU64,
    from_entries: AtomicU64,
    to_host: AtomicU64,
    to_underlay: AtomicU64,
    refused_senders: AtomicU64,
    dropped_while_down: AtomicU64,
    flows: AtomicU64,
    refused_underlay: AtomicU64,
    refused_via: AtomicU64,
    refused_host: AtomicU64,
    over_rate: AtomicU64,
}

/// Whom a module talks to beyond this host.
pub enum Reach {
    /// An overlay module: its overlay's entry nodes (as the module's
    /// dual-stack socket writes their addresses).
    Entries(Vec<SocketAddr>),
    /// A monitor module: the joined overlays that carry.
    Overlays(Carriers),
}

impl Reach {
    /// An overlay module's entry nodes.
    pub fn entries(entries: &[SocketAddr]) -> Reach {
        Reach::Entries(entries.iter().map(|e| mapped(*e)).collect())
    }

    /// A monitor module's view of the joined overlays the overlay manager
    /// publishes (it looks at them every tick).
    pub fn overlays(published: Shared<OverlayTable>) -> Reach {
        Reach::Overlays(Carriers::new(published))
    }
}

/// Everything a module's thread needs.
pub struct ModuleSetup {
    pub overlay: String,
    pub module: Module,
    pub shim_len: usize,
    pub limits: ModuleLimits,
    /// The broker's standard port (returns) and underlay port, on loopback.
    pub overlay_port: u16,
    pub underlay_port: u16,
    /// The mark that keeps the classifier off the module's own datagrams.
    pub bypass_mark: u32,
    /// The uplink's MTU, for a monitor module's connections over overlays.
    pub uplink_mtu: u16,
    /// How long the flows this host hands it live without packets.
    pub lifetimes: Lifetimes,
    pub status: ModuleStatus,
}

/// A running module; stopped when dropped.
pub struct ModuleRunner {
    port: u16,
    up: Arc<AtomicBool>,
    status: Arc<Mutex<ModuleStatus>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModuleRunner {
    /// Opens the module's sockets and starts its thread, talking to
    /// `peers` beyond this host.
    pub fn start(sandbox: Arc<Sandbox>, setup: ModuleSetup, peers: Reach) -> std::io::Result<ModuleRunner> {
        let local = local_socket()?;
        let port = local.local_addr()?.port();
        let outside = outside_socket(setup.bypass_mark)?;
        local.set_nonblocking(true)?;
        outside.set_nonblocking(true)?;
        let up = Arc::new(AtomicBool::new(false));
        let status = Arc::new(Mutex::new(ModuleStatus {
            state: "starting".into(),
            ..setup.status.clone()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let thread = {
            let (up, status, stop, counts) = (up.clone(), status.clone(), stop.clone(), counts.clone());
            std::thread::Builder::new()
                .name(format!("oasis-module-{}", setup.overlay))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            tracing::error!(overlay = %setup.overlay, "module thread: {e}");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let (local, outside) = match (
                            tokio::net::UdpSocket::from_std(local),
                            tokio::net::UdpSocket::from_std(outside),
                        ) {
                            (Ok(local), Ok(outside)) => (local, outside),
                            (Err(e), _) | (_, Err(e)) => {
                                tracing::error!(overlay = %setup.overlay, "module sockets: {e}");
                                return;
                            }
                        };
                        Host {
                            sandbox,
                            peers,
                            confine: Confinement::new(&setup.limits, setup.lifetimes, Instant::now()),
                            setup,
                            up,
                            status,
                            counts,
                            stop,
                            local,
                            outside,
                            running: None,
                            destinations: Vec::new(),
                            pause: FIRST_PAUSE,
                            restart_at: Instant::now(),
                            since: Instant::now(),
                            actions: Actions::default(),
                        }
                        .run()
                        .await
                    })
                })?
        };
        Ok(ModuleRunner {
            port,
            up,
            status,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    /// The loopback port the broker sends the overlay's packets to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Up while the module runs; the overlay's flows fall back otherwise.
    pub fn up(&self) -> Arc<AtomicBool> {
        self.up.clone()
    }

    pub fn status(&self) -> ModuleStatus {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let c = &self.counts;
        status.from_host = c.from_host.load(Relaxed);
        status.to_entries = c.to_entries.load(Relaxed);
        status.from_entries = c.from_entries.load(Relaxed);
        status.to_host = c.to_host.load(Relaxed);
        status.to_underlay = c.to_underlay.load(Relaxed);
        status.refused_senders = c.refused_senders.load(Relaxed);
        status.dropped_while_down = c.dropped_while_down.load(Relaxed);
        status.flows = c.flows.load(Relaxed);
        status.confined = FlowRefusals {
            to_underlay: c.refused_underlay.load(Relaxed),
            via: c.refused_via.load(Relaxed),
            to_host: c.refused_host.load(Relaxed),
            over_rate: c.over_rate.load(Relaxed),
        };
        status
    }
}

impl Drop for ModuleRunner {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Dual-stack, so entry nodes of either family are reachable; marked so
/// the classifier never diverts the module's own traffic.
fn outside_socket(mark: u32) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    #[cfg(target_os = "linux")]
    oasis_io::linux::mmsg::accept_zero_udp_checksum_v6(&socket)?;
    #[cfg(target_os = "linux")]
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mark;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
    coalesce(&socket);
    Ok(socket.into())
}

/// The module's port, on loopback: the broker's overlay sockets send it the
/// overlay's packets.
fn local_socket() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    coalesce(&socket);
    Ok(socket.into())
}

/// Asks the kernel to hand over runs of datagrams from one sender as one
/// buffer (UDP GRO): fewer trips for a bulk transfer. Without it (an old
/// kernel), datagrams come one by one, which works too.
fn coalesce(socket: &socket2::Socket) {
    #[cfg(target_os = "linux")]
    if let Err(e) = oasis_io::linux::mmsg::enable_udp_gro(socket) {
        tracing::debug!("UDP GRO on a module socket: {e}");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// As a dual-stack socket sends and receives it.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// A monitor module's view of the joined overlays. An overlay keeps its
/// index for the module's life, and a left one's index is never reused,
/// so a module can hold on to indices it looked up by name.
pub struct Carriers {
    published: Shared<OverlayTable>,
    seen: Option<Arc<OverlayTable>>,
    ids: Vec<OverlayId>,
    carriers: Vec<Option<Arc<JoinedOverlay>>>,
    names: Vec<Option<String>>,
}

impl Carriers {
    fn new(published: Shared<OverlayTable>) -> Carriers {
        Carriers {
            published,
            seen: None,
            ids: Vec::new(),
            carriers: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Takes in what the manager published last; whether it changed.
    fn refresh(&mut self) -> bool {
        let latest = snapshot(&self.published);
        if self.seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &latest)) {
            return false;
        }
        self.update(&latest);
        self.seen = Some(latest);
        true
    }

    /// Only overlays with entry nodes of their own carry for a monitor
    /// module: another module's overlay hears only the broker, and a
    /// monitor carries nothing.
    fn update(&mut self, table: &OverlayTable) {
        for (i, id) in self.ids.iter().enumerate() {
            let now = table.get(*id).filter(|o| carries(o)).cloned();
            self.names[i] = now.as_ref().map(|o| o.name.clone());
            self.carriers[i] = now;
        }
        let mut new: Vec<&Arc<JoinedOverlay>> = table
            .iter()
            .filter(|o| carries(o) && !self.ids.contains(&o.id))
            .collect();
        new.sort_by_key(|o| o.id);
        for overlay in new {
            self.ids.push(overlay.id);
            self.names.push(Some(overlay.name.clone()));
            self.carriers.push(Some(overlay.clone()));
        }
    }

    /// The index of the overlay whose entry node sent a datagram.
    fn index_of(&self, from: SocketAddr) -> Option<(usize, &JoinedOverlay)> {
        let id = self.seen.as_ref()?.by_sender(from)?.id;
        let index = self.ids.iter().position(|i| *i == id)?;
        Some((index, self.carriers[index].as_deref()?))
    }
}

fn carries(overlay: &JoinedOverlay) -> bool {
    !overlay.monitor && overlay.module.is_none()
}

struct Host {
    sandbox: Arc<Sandbox>,
    peers: Reach,
    /// What the module's packets may be.
    confine: Confinement,
    setup: ModuleSetup,
    up: Arc<AtomicBool>,
    status: Arc<Mutex<ModuleStatus>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    local: tokio::net::UdpSocket,
    outside: tokio::net::UdpSocket,
    running: Option<Running>,
    /// Where the actions of the batch at hand go outward (capacity kept).
    destinations: Vec<Option<SocketAddr>>,
    pause: Duration,
    restart_at: Instant,
    /// When the module last started.
    since: Instant,
    actions: Actions,
}

impl Host {
    async fn run(mut self) {
        let mut io = Batches::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let broker_port = self.setup.overlay_port;
        if let Reach::Overlays(carriers) = &mut self.peers {
            carriers.refresh();
        }
        loop {
            tokio::select! {
                ready = self.local.readable() => {
                    if ready.is_err() { continue }
                    let count = io.recv(&self.local);
                    let (mut taken, mut refused) = (0, 0);
                    let now = Instant::now();
                    for i in 0..count {
                        let got = io.received[i];
                        // Only the broker's overlay sockets feed a module.
                        if !got.from.is_some_and(|f| f.ip().to_canonical().is_loopback() && f.port() == broker_port) {
                            refused += 1;
                            continue;
                        }
                        for at in datagrams(got.len, got.segment) {
                            taken += 1;
                            let packet = &io.bufs[i][at];
                            // Its flow is the module's to carry from now.
                            if let Some(inner) = packet.get(self.setup.shim_len..) {
                                self.confine.handed(inner, now);
                            }
                            self.event(|running, out| running.from_host(packet, out));
                        }
                    }
                    self.counts.from_host.fetch_add(taken, Relaxed);
                    self.counts.refused_senders.fetch_add(refused, Relaxed);
                    self.flush(&mut io);
                }
                ready = self.outside.readable() => {
                    if ready.is_err() { continue }
                    let count = io.recv(&self.outside);
                    let (mut taken, mut refused) = (0, 0);
                    for i in 0..count {
                        let got = io.received[i];
                        let Some(from) = got.from else {
                            refused += 1;
                            continue;
                        };
                        // Which entry node, or which overlay (and the
                        // length of its shim) it came from.
                        let source = match &self.peers {
                            Reach::Entries(entries) => {
                                entries.iter().position(|e| *e == mapped(from)).map(|e| (e, None))
                            }
                            Reach::Overlays(carriers) => {
                                carriers.index_of(from).map(|(i, o)| (i, Some(o.shim.len())))
                            }
                        };
                        let Some((peer, overlay_shim)) = source else {
                            refused += 1;
                            continue;
                        };
                        let own = self.setup.shim_len;
                        for at in datagrams(got.len, got.segment) {
                            taken += 1;
                            let datagram = &io.bufs[i][at];
                            match overlay_shim {
                                None => self.event(|running, out| running.from_entry(peer, datagram, out)),
                                Some(shim) => {
                                    let packet = datagram.get(shim..).unwrap_or_default();
                                    self.event(|running, out| running.from_overlay(peer, own, packet, out));
                                }
                            }
                        }
                    }
                    self.counts.from_entries.fetch_add(taken, Relaxed);
                    self.counts.refused_senders.fetch_add(refused, Relaxed);
                    self.flush(&mut io);
                }
                _ = tick.tick() => {
                    if self.stop.load(Relaxed) {
                        self.up.store(false, Relaxed);
                        return;
                    }
                    if let Reach::Overlays(carriers) = &mut self.peers
                        && carriers.refresh()
                        && let Some(running) = self.running.as_mut()
                    {
                        running.set_overlays(&carriers.names);
                    }
                    self.confine.sweep(Instant::now());
                    self.counts.flows.store(self.confine.flows() as u64, Relaxed);
                    if let Some(running) = &self.running {
                        let refusals = running.refusals().clone();
                        self.count(|s| s.refusals = refusals);
                        self.event(|running, out| running.tick(out));
                        self.flush(&mut io);
                        if self.since.elapsed() >= STABLE {
                            self.pause = FIRST_PAUSE;
                        }
                    } else if Instant::now() >= self.restart_at {
                        self.instantiate();
                    }
                }
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut ModuleStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn instantiate(&mut self) {
        let setup = &self.setup;
        let started = Instant::now();
        let peers = match &self.peers {
            Reach::Entries(entries) => Peers::Entries(entries.len()),
            Reach::Overlays(carriers) => Peers::Overlays(&carriers.names),
        };
        match self.sandbox.instantiate(
            &setup.module,
            &setup.overlay,
            peers,
            setup.shim_len,
            &setup.limits,
        ) {
            Ok(running) => {
                self.running = Some(running);
                self.since = Instant::now();
                self.up.store(true, Relaxed);
                let took = started.elapsed().as_micros() as u64;
                self.count(|s| {
                    s.state = "running".into();
                    s.start_us = took;
                });
                tracing::info!(overlay = %setup.overlay, "module running");
            }
            Err(e) => self.stopped(e.to_string()),
        }
    }

    fn stopped(&mut self, why: String) {
        self.running = None;
        self.up.store(false, Relaxed);
        let pause = self.pause;
        self.restart_at = Instant::now() + pause;
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
        tracing::warn!(overlay = %self.setup.overlay, "module stopped: {why}; starting it again in {} s", pause.as_secs());
        self.count(|s| {
            s.restarts += 1;
            s.state = format!("stopped: {why}; again in {} s", pause.as_secs());
            s.last_stop = Some(why);
        });
    }

    /// One event into the module; what it asked for joins the batch's.
    fn event(&mut self, call: impl FnOnce(&mut Running, &mut Actions) -> Result<(), super::Stop>) {
        let Some(running) = self.running.as_mut() else {
            self.counts.dropped_while_down.fetch_add(1, Relaxed);
            return;
        };
        if let Err(stop) = call(running, &mut self.actions) {
            let refusals = running.refusals().clone();
            self.count(|s| s.refusals = refusals);
            self.stopped(stop.to_string());
        }
    }

    /// Carries out what the batch's events asked for, as far as the
    /// module's confinement allows: to the entry nodes from the outside
    /// socket, to the broker's ports from the loopback socket, as few
    /// system calls as the platform allows.
    fn flush(&mut self, io: &mut Batches) {
        if self.actions.list.is_empty() {
            return;
        }
        let broker = SocketAddr::from((Ipv4Addr::LOCALHOST, self.setup.overlay_port));
        let underlay = SocketAddr::from((Ipv4Addr::LOCALHOST, self.setup.underlay_port));
        let now = Instant::now();
        let shim_len = self.setup.shim_len;
        // Where each action goes, worked out once: None for what may not
        // go anywhere.
        let mut refused = FlowRefusals::default();
        self.destinations.clear();
        for action in &self.actions.list {
            let decided = match (action, &self.peers) {
                (Action::Send { entry, at }, Reach::Entries(entries)) => entries
                    .get(*entry)
                    .copied()
                    .ok_or(Refusal::NotItsFlow)
                    .and_then(|to| self.confine.may_send(at.len(), now).map(|()| to)),
                (Action::Via { overlay, at }, Reach::Overlays(carriers)) => {
                    // The overlay may have been left since the module asked.
                    match carriers.carriers.get(*overlay).and_then(|c| c.as_deref()) {
                        None => Err(Refusal::NotItsFlow),
                        Some(carrier) => {
                            let packet = &mut self.actions.data[at.clone()];
                            self.confine
                                .may_leave(packet, now)
                                .and_then(|()| self.confine.may_send(carrier.shim.len() + packet.len(), now))
                                .map(|()| {
                                    // A monitor's connections go over overlays it
                                    // chose: the entry node and the MSS that fits
                                    // are decided as for the broker's own flows.
                                    let (key, syn) = Headers::parse(packet)
                                        .map_or((Default::default(), false), |h| (h.key, h.syn()));
                                    mapped(toward_overlay(carrier, self.setup.uplink_mtu, &key, syn, packet))
                                })
                        }
                    }
                }
                (Action::ToHost { at }, _) => {
                    let packet = self
                        .actions
                        .data
                        .get(at.start + shim_len..at.end)
                        .unwrap_or_default();
                    self.confine.may_come_home(packet, now).map(|()| broker)
                }
                (Action::ToUnderlay { at }, _) => self
                    .confine
                    .may_leave(&self.actions.data[at.clone()], now)
                    .map(|()| underlay),
                // The sandbox gives each role its own sends only.
                _ => Err(Refusal::NotItsFlow),
            };
            match (&decided, action) {
                (Err(Refusal::OverRate), _) => refused.over_rate += 1,
                (Err(_), Action::ToUnderlay { .. }) => refused.to_underlay += 1,
                (Err(_), Action::ToHost { .. }) => refused.to_host += 1,
                (Err(_), Action::Via { .. }) => refused.via += 1,
                _ => {}
            }
            self.destinations.push(decided.ok());
        }
        let (actions, peers) = (&self.actions, &self.peers);
        let outward = actions
            .list
            .iter()
            .zip(&self.destinations)
            .filter_map(|(action, to)| {
                let to = (*to)?;
                match (action, peers) {
                    (Action::Send { at, .. }, _) => Some((&[][..], actions.bytes(at), to)),
                    (Action::Via { overlay, at }, Reach::Overlays(carriers)) => {
                        let carrier = carriers.carriers.get(*overlay)?.as_deref()?;
                        Some((carrier.shim.as_slice(), actions.bytes(at), to))
                    }
                    _ => None,
                }
            });
        let sent = io.send(&self.outside, outward);
        let (mut home, mut down) = (0, 0);
        let inward = actions
            .list
            .iter()
            .zip(&self.destinations)
            .filter_map(|(action, to)| match (action, (*to)?) {
                (Action::ToHost { at }, to) => {
                    home += 1;
                    Some((&[][..], actions.bytes(at), to))
                }
                (Action::ToUnderlay { at }, to) => {
                    down += 1;
                    Some((&[][..], actions.bytes(at), to))
                }
                _ => None,
            });
        io.send(&self.local, inward);
        self.actions.clear();
        let c = &self.counts;
        c.refused_underlay.fetch_add(refused.to_underlay, Relaxed);
        c.refused_via.fetch_add(refused.via, Relaxed);
        c.refused_host.fetch_add(refused.to_host, Relaxed);
        c.over_rate.fetch_add(refused.over_rate, Relaxed);
        c.to_entries.fetch_add(sent, Relaxed);
        c.to_host.fetch_add(home, Relaxed);
        c.to_underlay.fetch_add(down, Relaxed);
    }
}

/// Datagrams in batches: one system call receives many (coalesced by the
/// kernel where it can, on Linux), one sends many.
struct Batches {
    bufs: Vec<Vec<u8>>,
    received: Vec<oasis_io::datagram::Received>,
    #[cfg(target_os = "linux")]
    receiver: oasis_io::linux::mmsg::Receiver,
    #[cfg(target_os = "linux")]
    sender: oasis_io::linux::mmsg::GsoDatagrams,
    /// Where a datagram is put together from its prefix and body.
    #[cfg(not(target_os = "linux"))]
    whole: Vec<u8>,
}

/// Receive buffers: each holds a datagram, or a run of coalesced ones.
const BATCH: usize = 32;

impl Default for Batches {
    fn default() -> Self {
        Batches {
            // Room for a run of coalesced datagrams as large as UDP GRO makes.
            bufs: vec![vec![0u8; 1 << 16]; BATCH],
            received: vec![oasis_io::datagram::Received::default(); BATCH],
            #[cfg(target_os = "linux")]
            receiver: Default::default(),
            #[cfg(target_os = "linux")]
            sender: Default::default(),
            #[cfg(not(target_os = "linux"))]
            whole: Vec::with_capacity(1 << 16),
        }
    }
}

impl Batches {
    /// What is waiting on `socket`, without blocking; how many buffers.
    #[cfg(target_os = "linux")]
    fn recv(&mut self, socket: &tokio::net::UdpSocket) -> usize {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        let (receiver, bufs, received) = (&mut self.receiver, &mut self.bufs, &mut self.received);
        socket
            .try_io(tokio::io::Interest::READABLE, || {
                receiver.recv(fd, bufs, 0, received)
            })
            .unwrap_or(0)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv(&mut self, socket: &tokio::net::UdpSocket) -> usize {
        let mut count = 0;
        while count < BATCH {
            match socket.try_recv_from(&mut self.bufs[count]) {
                Ok((len, from)) => {
                    self.received[count] = oasis_io::datagram::Received {
                        len,
                        from: Some(from),
                        segment: 0,
                    };
                    count += 1;
                }
                Err(_) => break,
            }
        }
        count
    }

    /// Sends each datagram to its address; how many went.
    #[cfg(target_os = "linux")]
    fn send<'p>(
        &mut self,
        socket: &tokio::net::UdpSocket,
        datagrams: impl Iterator<Item = (&'p [u8], &'p [u8], SocketAddr)>,
    ) -> u64 {
        use std::os::fd::AsRawFd;
        let mut batch = self.sender.batch();
        for (prefix, bytes, to) in datagrams {
            batch.push(prefix, bytes, to);
        }
        if batch.is_empty() {
            return 0;
        }
        batch.send(socket.as_raw_fd()).0 as u64
    }

    #[cfg(not(target_os = "linux"))]
    fn send<'p>(
        &mut self,
        socket: &tokio::net::UdpSocket,
        datagrams: impl Iterator<Item = (&'p [u8], &'p [u8], SocketAddr)>,
    ) -> u64 {
        let whole = &mut self.whole;
        datagrams
            .filter(|(prefix, bytes, to)| {
                whole.clear();
                whole.extend_from_slice(prefix);
                whole.extend_from_slice(bytes);
                socket.try_send_to(whole, *to).is_ok()
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::table::test_overlay;
    use crate::overlay::{EntryNodes, ModuleLink};

    fn special(id: u32, name: &str, monitor: bool) -> Arc<JoinedOverlay> {
        let nodes = EntryNodes::new(vec![format!("192.0.2.{id}:7400").parse().unwrap()]).unwrap();
        let mut overlay = JoinedOverlay::new(OverlayId(id), name.into(), Box::new(nodes), vec![]);
        overlay.monitor = monitor;
        overlay.module = (!monitor).then(|| ModuleLink { up: Arc::default() });
        Arc::new(overlay)
    }

    #[test]
    fn a_monitor_sees_the_carrying_overlays_under_indices_that_last() {
        let a = test_overlay(1, "a", &["192.0.2.1:7400"], 4);
        let b = test_overlay(2, "b", &["192.0.2.2:7400", "[2001:db8::2]:7400"], 4);
        let c = test_overlay(5, "c", &["192.0.2.5:7400"], 4);
        let published = Shared::<OverlayTable>::default();
        let publish = |list: Vec<Arc<JoinedOverlay>>| {
            *published.write().unwrap() = Arc::new(OverlayTable::new(list));
        };
        publish(vec![
            b.clone(),
            a.clone(),
            special(3, "mon", true),
            special(4, "moduled", false),
        ]);
        let mut carriers = Carriers::new(published.clone());
        assert!(carriers.refresh());
        assert!(!carriers.refresh(), "nothing new was published");
        // Neither a monitor nor another module's overlay carries for it.
        assert_eq!(carriers.names, [Some("a".into()), Some("b".into())]);
        // `a` left and `c` joined: `b` keeps its index, `a`'s is not reused.
        publish(vec![b.clone(), c.clone()]);
        assert!(carriers.refresh());
        assert_eq!(carriers.names, [None, Some("b".into()), Some("c".into())]);
        let from = |s: &str| s.parse::<SocketAddr>().unwrap();
        let index = |s: &str| carriers.index_of(from(s)).map(|(i, o)| (i, o.name.clone()));
        assert_eq!(index("[2001:db8::2]:7400"), Some((1, "b".into())));
        assert_eq!(index("[::ffff:192.0.2.5]:7400"), Some((2, "c".into())));
        assert_eq!(index("192.0.2.1:7400"), None, "a left overlay answers no more");
        assert_eq!(index("192.0.2.9:7400"), None);
    }
}
