//! The packet loops, over the platform's traits: a thread per diverted
//! queue (decide with the engine, send in batches), a thread per overlay
//! socket for returned packets, and a thread per underlay-port socket.
//! Blocking threads rather than async tasks: these are tight read, decide,
//! send loops where a wake-up per batch is all the scheduling needed.
//!
//! Every buffer a loop uses is made before its first packet and reused, so
//! in steady state no packet allocates (a test counts it).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use oasis_wireguard::Opened;

use crate::engine::{
    DropReason, Engine, EngineCounters, LocalAddresses, Outbound, ReplyMap, ReturnPath, Returned, Router,
    Routes, SharedTables, TunnelMap, module_admitted,
};
use crate::liveness::{TICK_EVERY, Tick};
use crate::overlay::JoinedOverlay;
use crate::overlay::wireguard::SealScratch;
use crate::platform::{DatagramSocket, Delivery, DivertedQueue, Received, UnderlaySender, datagrams};

/// The largest datagram a receive buffer of the overlay and underlay ports
/// holds (a coalesced run of datagrams, or one of any size).
const PACKET: usize = 65_536;
/// Receive buffers of the overlay and underlay ports.
const DATAGRAM_BATCH: usize = 16;
/// Datagrams one receive buffer may carry when the kernel coalesced them
/// (UDP_MAX_SEGMENTS).
const COALESCED: usize = 64;
/// How often the return path reads the host's addresses again.
const ADDRESS_REFRESH: Duration = Duration::from_secs(2);
/// A queue that fails this many times in a row is gone for good.
const MAX_CONSECUTIVE_ERRORS: u32 = 1000;

/// The overlay standard port's sockets, one per family.
pub struct OverlaySockets<S> {
    pub v4: S,
    /// None on hosts without IPv6.
    pub v6: Option<S>,
}

/// Reads diverted packets from one queue, decides each, sends them in
/// batches. Returns when `stop` is set or the queue fails for good.
#[allow(clippy::too_many_arguments)]
pub fn run_queue<Q, D, U, S>(
    mut router: Router,
    tables: &SharedTables,
    read: &AtomicU64,
    mut queue: Q,
    mut delivery: D,
    underlay: &U,
    overlay: &OverlaySockets<S>,
    tick: Tick,
    stop: &AtomicBool,
) -> io::Result<()>
where
    Q: DivertedQueue,
    D: Delivery,
    U: UnderlaySender,
    S: DatagramSocket,
{
    let mut batch = queue.new_batch();
    let mut decisions: Vec<Outbound> = Vec::with_capacity(batch.capacity());
    let mut reply = Vec::with_capacity(1500);
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut scratch = SendScratch::<U, S>::default();
    let headroom = delivery.headroom();
    let mut errors = 0;
    let engine = router.engine().clone();
    loop {
        tick.tick();
        if stop.load(Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        router.handle_timeout(now);
        carry_out(&mut router, tables, now, &mut [], &mut reply);
        let wait = router
            .next_timeout()
            .saturating_duration_since(now)
            .min(TICK_EVERY);
        batch.clear();
        match queue.recv(&mut batch, wait) {
            Ok(()) => errors = 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // A packet the platform cannot read is one loss; a queue
                // that keeps failing is gone.
                errors += 1;
                router.engine().counters.dropped(DropReason::Malformed);
                tracing::debug!("reading diverted packets: {e}");
                if errors > MAX_CONSECUTIVE_ERRORS {
                    return Err(e);
                }
                continue;
            }
        }
        if batch.is_empty() {
            continue;
        }
        let now = Instant::now();
        let counters = &engine.counters;
        counters.received.fetch_add(batch.len() as u64, Relaxed);
        read.fetch_add(batch.len() as u64, Relaxed);

        // Decide every packet (the engine may rewrite them in place) ...
        router.begin_batch();
        decisions.clear();
        let mut reply_count = 0;
        for index in 0..batch.len() {
            let packet = batch.packet_mut(index);
            let timed = router
                .decisions_to_time()
                .then(|| (Instant::now(), router.started_monitored()));
            let mut decision = router.outbound(now, packet, &mut reply);
            if let Some(changed) = carry_out(&mut router, tables, now, packet, &mut reply) {
                decision = changed;
            }
            if let Some((began, before)) = timed
                && router.started_monitored() != before
            {
                counters.decisions.record(began.elapsed().as_nanos() as u64);
            }
            if decision == Outbound::Reply {
                if replies.len() == reply_count {
                    replies.push(Vec::with_capacity(headroom + 1500));
                }
                let out = &mut replies[reply_count];
                out.clear();
                out.resize(headroom, 0);
                out.extend_from_slice(&reply);
                reply_count += 1;
            }
            decisions.push(decision);
        }

        // ... then send them, one system call per carrier and family.
        let decided = decisions.iter().copied().zip(batch.packets());
        send_decided(router.routes(), decided, underlay, overlay, &mut scratch).count(counters);
        if reply_count > 0
            && let Err(e) = delivery.deliver(&mut replies[..reply_count])
        {
            tracing::debug!("writing replies to the applications: {e}");
        }
    }
}

/// Carries out the changes to the kernel's tables the router decided with
/// `packet` (empty after a sweep), before the packet is sent, and tells the
/// router what the kernel refused: the packet's outcome when that changed
/// it. The tables are locked for one operation at a time, never while the
/// router decides.
pub fn carry_out(
    router: &mut Router,
    tables: &SharedTables,
    now: Instant,
    packet: &mut [u8],
    reply: &mut Vec<u8>,
) -> Option<Outbound> {
    let mut changed = None;
    while let Some(op) = router.next_work() {
        let done = tables.lock().carry_out(&op);
        if let Err(error) = done
            && let Some(outcome) = router.kernel_refused(&op, &error, now, packet, reply)
        {
            changed = Some(outcome);
        }
    }
    changed
}

/// What the sends of one loop reuse from batch to batch.
pub struct SendScratch<U: UnderlaySender, S: DatagramSocket> {
    underlay: U::Scratch,
    v4: S::Scratch,
    v6: S::Scratch,
    /// Datagrams sealed for WireGuard overlays' peers.
    sealed: SealScratch,
}

impl<U: UnderlaySender, S: DatagramSocket> Default for SendScratch<U, S> {
    fn default() -> Self {
        Self {
            underlay: U::Scratch::default(),
            v4: S::Scratch::default(),
            v6: S::Scratch::default(),
            sealed: SealScratch::default(),
        }
    }
}

/// What one [`send_decided`] sent and failed to send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub underlay: usize,
    pub overlay: usize,
    pub failed: usize,
}

impl Sent {
    /// Adds it to the broker's counters (the Monitor's probes are not the
    /// broker's traffic).
    fn count(&self, counters: &EngineCounters) {
        counters.sent_underlay.fetch_add(self.underlay as u64, Relaxed);
        counters.sent_overlay.fetch_add(self.overlay as u64, Relaxed);
        counters.send_errors.fetch_add(self.failed as u64, Relaxed);
    }
}

/// Carries out what the engine decided for packets (by the `routes` they
/// were decided with): the underlay's packets in one call, each family's
/// overlay datagrams in another. Every sender of decided packets (the
/// packet loops, the Monitor's prober) sends through here.
pub fn send_decided<'p, U: UnderlaySender, S: DatagramSocket>(
    routes: &Routes,
    decided: impl Iterator<Item = (Outbound, &'p [u8])> + Clone,
    underlay: &U,
    overlay: &OverlaySockets<S>,
    scratch: &mut SendScratch<U, S>,
) -> Sent {
    let underlay_packets = decided
        .clone()
        .filter(|(d, _)| *d == Outbound::Underlay)
        .map(|(_, p)| p);
    let SendScratch {
        underlay: underlay_scratch,
        v4: v4_scratch,
        v6: v6_scratch,
        sealed,
    } = scratch;
    let (underlay_sent, mut failed_all) = underlay.send(underlay_scratch, underlay_packets);
    // WireGuard overlays' packets are sealed first, each peer's tunnel
    // locked once per run of packets to it.
    let wireguard = routes.overlays.has_wireguard();
    if wireguard {
        let to_seal = decided.clone().filter_map(|(d, packet)| match d {
            Outbound::Overlay { overlay, to } => {
                let overlay = routes.overlays.get(overlay)?;
                let link = overlay.wireguard.as_deref()?;
                overlay.sent.fetch_add(1, Relaxed);
                Some((link, packet, to))
            }
            _ => None,
        });
        sealed.seal_all(to_seal, Instant::now());
    }
    let mut overlay_sent = 0;
    for (v4, socket, scratch) in [
        (true, Some(&overlay.v4), v4_scratch),
        (false, overlay.v6.as_ref(), v6_scratch),
    ] {
        let datagrams = decided.clone().filter_map(|(d, packet)| match d {
            Outbound::Overlay { overlay, to } if to.is_ipv4() == v4 => {
                let overlay = routes.overlays.get(overlay)?;
                if overlay.wireguard.is_some() {
                    return None;
                }
                overlay.sent.fetch_add(1, Relaxed);
                Some((overlay.shim.as_slice(), packet, to))
            }
            Outbound::Module { overlay, to, rule } if to.is_ipv4() == v4 => {
                routes.overlays.get(overlay)?.sent.fetch_add(1, Relaxed);
                Some((routes.monitored(rule)?.module_shim.as_slice(), packet, to))
            }
            _ => None,
        });
        let sealed = sealed
            .datagrams()
            .filter(move |(_, to)| wireguard && to.is_ipv4() == v4)
            .map(|(datagram, to)| (&[][..], datagram, to));
        let datagrams = datagrams.chain(sealed);
        let (sent, failed) = match socket {
            Some(socket) => socket.send(scratch, datagrams),
            // No IPv6 on this host: an IPv6 next hop is unreachable.
            None => (0, datagrams.count()),
        };
        overlay_sent += sent;
        failed_all += failed;
    }
    Sent {
        underlay: underlay_sent,
        overlay: overlay_sent,
        failed: failed_all,
    }
}

/// Which WireGuard peers a return loop runs the protocol's timers for, by
/// their endpoint's family: its socket's, and on a host without IPv6 the
/// IPv4 loop takes the IPv6 peers too (their handshakes fail, and the
/// overlay is down, rather than waiting for nothing).
#[derive(Clone, Copy, Debug)]
pub struct TimersFor {
    pub v4: bool,
    pub v6: bool,
}

/// Receives datagrams on one overlay socket and hands the packets the
/// return path accepts to the applications.
#[allow(clippy::too_many_arguments)]
pub fn run_returns<S, D>(
    mut path: ReturnPath,
    socket: &S,
    timers: TimersFor,
    mut delivery: D,
    local_addresses: impl Fn(&mut LocalAddresses),
    tick: Tick,
    stop: &AtomicBool,
) -> io::Result<()>
where
    S: DatagramSocket,
    D: Delivery,
{
    let mut bufs = vec![vec![0u8; PACKET]; DATAGRAM_BATCH];
    let mut received = [Received::default(); DATAGRAM_BATCH];
    let mut scratch = S::Scratch::default();
    let headroom = delivery.headroom();
    // Room for the largest batch from the start: a busy moment must not
    // be the first to need it.
    let mut out: Vec<Vec<u8>> = (0..DATAGRAM_BATCH * COALESCED)
        .map(|_| Vec::with_capacity(headroom + 1500))
        .collect();
    let mut local = LocalAddresses::with_capacity(64);
    local_addresses(&mut local);
    let mut local_read = Instant::now();
    let mut unseal = Unseal::new();
    loop {
        tick.tick();
        if stop.load(Relaxed) {
            return Ok(());
        }
        unseal.timers(path.engine(), timers, Instant::now());
        unseal.send(socket, &mut scratch);
        let count = match socket.recv(&mut scratch, &mut bufs, &mut received, TICK_EVERY) {
            Ok(count) => count,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted) => 0,
            Err(e) => return Err(e),
        };
        if local_read.elapsed() > ADDRESS_REFRESH {
            local_addresses(&mut local);
            local_read = Instant::now();
        }
        if count == 0 {
            continue;
        }
        let now = Instant::now();
        path.begin_batch(now);
        let engine: Arc<Engine> = path.engine().clone();
        let replies = engine.replies();
        let tunnels = engine.tunnels();
        let routes = path.routes().clone();
        let mut accepted = 0;
        for (buf, got) in bufs.iter().zip(&received).take(count) {
            // Plain datagrams find their overlay in `accept`: the sender is
            // looked up here only while a WireGuard overlay is joined.
            let sealed = got
                .from
                .filter(|_| routes.overlays.has_wireguard())
                .and_then(|from| {
                    let overlay = routes.overlays.by_sender(from)?;
                    overlay.wireguard.is_some().then_some((from, overlay))
                });
            if let Some((from, overlay)) = sealed {
                let maps = (replies.as_deref(), tunnels.as_deref());
                let received = Sealed { from, buf, got };
                unseal.open(
                    &mut path,
                    overlay,
                    received,
                    &local,
                    maps,
                    headroom,
                    &mut out,
                    &mut accepted,
                    now,
                );
                continue;
            }
            for range in datagrams(got.len, got.segment) {
                if out.len() == accepted {
                    out.push(Vec::with_capacity(headroom + 1500));
                }
                let accept = path.accept(
                    got.from,
                    &buf[range],
                    &local,
                    replies.as_deref(),
                    headroom,
                    &mut out[accepted],
                    now,
                );
                match accept {
                    Ok(Returned::Deliver(_)) => accepted += 1,
                    // A probe's SYN-ACK: the reset goes back the way it came,
                    // so the server does not keep a half-open connection.
                    Ok(Returned::ProbeAnswer { overlay, reset: true }) => {
                        if let (Some(to), Some(overlay)) = (got.from, path.routes().overlays.get(overlay)) {
                            let rst = out[accepted].as_slice();
                            socket.send(&mut scratch, std::iter::once((overlay.shim.as_slice(), rst, to)));
                        }
                    }
                    Ok(Returned::ProbeAnswer { .. }) | Err(_) => {}
                }
            }
        }
        drop(replies);
        drop(tunnels);
        unseal.send(socket, &mut scratch);
        if accepted > 0
            && let Err(e) = delivery.deliver(&mut out[..accepted])
        {
            engine.counters.send_errors.fetch_add(1, Relaxed);
            tracing::debug!("writing returned packets to the applications: {e}");
        }
    }
}

/// One received buffer from a WireGuard overlay's peer: one datagram, or
/// a coalesced run of them.
struct Sealed<'b> {
    from: SocketAddr,
    buf: &'b [u8],
    got: &'b Received,
}

/// What a return loop reuses for WireGuard overlays: the buffer packets
/// are opened into, and protocol messages (handshake responses,
/// keepalives, timers' retries, packets that waited for a session) to
/// send once no tunnel is locked.
struct Unseal {
    opened: Vec<u8>,
    queued: Vec<(Vec<u8>, SocketAddr)>,
    queued_len: usize,
    last_tick: Option<Instant>,
}

impl Unseal {
    fn new() -> Unseal {
        Unseal {
            opened: vec![0; PACKET],
            queued: Vec::new(),
            queued_len: 0,
            last_tick: None,
        }
    }

    fn queue(&mut self, datagram: &[u8], to: SocketAddr) {
        if self.queued.len() == self.queued_len {
            self.queued.push((Vec::with_capacity(datagram.len()), to));
        }
        let (buf, dest) = &mut self.queued[self.queued_len];
        buf.clear();
        buf.extend_from_slice(datagram);
        *dest = to;
        self.queued_len += 1;
    }

    fn send<S: DatagramSocket>(&mut self, socket: &S, scratch: &mut S::Scratch) {
        if self.queued_len == 0 {
            return;
        }
        let queued = self.queued[..self.queued_len]
            .iter()
            .map(|(datagram, to)| (&[][..], datagram.as_slice(), *to));
        socket.send(scratch, queued);
        self.queued_len = 0;
    }

    /// The protocol's timers of the WireGuard peers this loop's family
    /// reaches, every quarter second: handshakes to start or retry,
    /// rekeying, keepalives.
    fn timers(&mut self, engine: &Engine, families: TimersFor, now: Instant) {
        if self
            .last_tick
            .is_some_and(|at| now.saturating_duration_since(at) < TICK_EVERY)
        {
            return;
        }
        self.last_tick = Some(now);
        let routes = engine.routes();
        if !routes.overlays.has_wireguard() {
            return;
        }
        for link in routes.overlays.iter().filter_map(|o| o.wireguard.as_ref()) {
            let ours = |p: &&crate::overlay::wireguard::WgPeer| match p.endpoint.is_ipv4() {
                true => families.v4,
                false => families.v6,
            };
            for peer in link.peers.iter().filter(ours) {
                let mut sealer = peer.tunnel.lock();
                let sent = sealer.tick(&mut self.opened, now).map(<[u8]>::len);
                drop(sealer);
                let health = peer.tunnel.health();
                if peer.reported.swap(health.carries(), Relaxed) != health.carries() {
                    match health.carries() {
                        true => tracing::info!(endpoint = %peer.endpoint, "WireGuard peer {health}"),
                        false => tracing::warn!(endpoint = %peer.endpoint, "WireGuard peer {health}"),
                    }
                }
                let Some(len) = sent else { continue };
                let datagram = std::mem::take(&mut self.opened);
                self.queue(&datagram[..len], peer.endpoint);
                self.opened = datagram;
            }
        }
    }

    /// Opens what a WireGuard overlay's peer sent, its tunnel locked once
    /// for the buffer, and hands each packet to the return path.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        path: &mut ReturnPath,
        overlay: &Arc<JoinedOverlay>,
        received: Sealed<'_>,
        local: &LocalAddresses,
        (replies, tunnels): (Option<&ReplyMap>, Option<&TunnelMap>),
        headroom: usize,
        out: &mut Vec<Vec<u8>>,
        accepted: &mut usize,
        now: Instant,
    ) {
        let engine = path.engine().clone();
        let counters = &engine.counters;
        let Sealed { from, buf, got } = received;
        let Some(link) = overlay.wireguard.as_deref() else {
            return;
        };
        let Some(peer) = link.peer_at(from) else {
            counters.dropped(DropReason::NotFromOverlay);
            return;
        };
        let mut sealer = peer.tunnel.lock();
        for range in datagrams(got.len, got.segment) {
            let mut opened = std::mem::take(&mut self.opened);
            match sealer.open(from.ip(), &buf[range], &mut opened, now) {
                Opened::Packet(packet) => {
                    // Cryptokey routing: the peer speaks only for its
                    // AllowedIPs.
                    let allowed =
                        oasis_io::packet::addresses(packet).is_some_and(|(src, _)| peer.allows(src));
                    if !allowed {
                        counters.dropped(DropReason::Unauthenticated);
                    } else if link.answers_query(packet) {
                        // This host's own DNS question through the tunnel
                        // (overlay/tunnel_dns.rs), answered.
                    } else {
                        if out.len() == *accepted {
                            out.push(Vec::with_capacity(headroom + 1500));
                        }
                        let slot = &mut out[*accepted];
                        match path.accept_opened(
                            overlay, from, packet, local, replies, tunnels, headroom, slot, now,
                        ) {
                            Ok(Returned::Deliver(_)) => *accepted += 1,
                            // A probe's SYN-ACK: the reset goes back sealed.
                            Ok(Returned::ProbeAnswer { reset: true, .. }) => {
                                let v6 = slot.first().is_some_and(|b| b >> 4 == 6);
                                if let Some(source) = link.tunnel_source(v6)
                                    && crate::overlay::wireguard::into_tunnel(slot, source)
                                {
                                    let mut sealed =
                                        vec![0; slot.len() + oasis_wireguard::DATA_OVERHEAD + 148];
                                    if let Some(datagram) = sealer.seal(slot, &mut sealed, now) {
                                        let datagram = datagram.to_vec();
                                        self.queue(&datagram, from);
                                    }
                                }
                            }
                            Ok(Returned::ProbeAnswer { .. }) | Err(_) => {}
                        }
                    }
                }
                Opened::Reply(reply) => {
                    let reply = reply.to_vec();
                    self.queue(&reply, from);
                    // The packets that waited for the session go now.
                    while let Some(len) = sealer.flush(&mut opened).map(<[u8]>::len) {
                        let datagram = opened[..len].to_vec();
                        self.queue(&datagram, from);
                    }
                }
                Opened::Nothing => {}
                Opened::Rejected(error) => {
                    counters.dropped(DropReason::Unauthenticated);
                    tracing::debug!(overlay = %overlay.name, %from, ?error, "WireGuard datagram refused");
                }
            }
            self.opened = opened;
        }
    }
}

/// The underlay port: where local overlay modules hand raw IP packets to be
/// sent on the underlay (paper §2.2.3). Only the broker's own module
/// sockets are heard; what a module may send there (packets of flows the
/// host handed it) its runner decided before it sent them.
pub fn run_underlay_port<S, U>(
    engine: Arc<Engine>,
    socket: &S,
    underlay: &U,
    tick: Tick,
    stop: &AtomicBool,
) -> io::Result<()>
where
    S: DatagramSocket,
    U: UnderlaySender,
{
    let mut bufs = vec![vec![0u8; PACKET]; DATAGRAM_BATCH];
    let mut received = [Received::default(); DATAGRAM_BATCH];
    let mut scratch = S::Scratch::default();
    let mut underlay_scratch = U::Scratch::default();
    let counters = &engine.counters;
    loop {
        tick.tick();
        if stop.load(Relaxed) {
            return Ok(());
        }
        let count = match socket.recv(&mut scratch, &mut bufs, &mut received, TICK_EVERY) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        if count == 0 {
            continue;
        }
        let routes = engine.routes();
        let admitted = bufs.iter().zip(&received).take(count).filter_map(|(buf, got)| {
            if module_admitted(&routes, got.from) {
                Some(&buf[..got.len])
            } else {
                counters.dropped(DropReason::NotFromModule);
                tracing::debug!(from = ?got.from, "datagram on the underlay port from no module of this broker");
                None
            }
        });
        let (sent, failed) = underlay.send(&mut underlay_scratch, admitted);
        counters.sent_underlay.fetch_add(sent as u64, Relaxed);
        counters.send_errors.fetch_add(failed as u64, Relaxed);
    }
}
