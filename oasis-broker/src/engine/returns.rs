//! Packets coming back: datagrams `[shim][IP packet]` on the standard port
//! and packets local modules hand to the underlay port. Only a joined
//! overlay's peers may return packets, and only packets addressed to this
//! host go on to the applications; only the broker's own module sockets
//! may use the underlay port. Everything else is dropped and counted.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use oasis_common::proto::{TCP, UDP};
use oasis_common::{FlowKey, FragKey};
use oasis_io::packet::{
    End, addresses, clamp_mss, finish_checksum, fragment, rewrite_address, rewrite_error_about,
    rewrite_ip_address,
};

use super::counters::DropReason;
use super::fragments::FRAGMENT_LIFETIME;
use super::measure::{FlowProbe, Segment};
use super::packet::{describe, flow_dst, flow_key, flow_src, frag_key, is_icmp_error};
use super::router::{Engine, ReplyMap, TunnelMap};
use super::routes::Routes;
use crate::overlay::{JoinedOverlay, OverlayId};

/// How often a return path forgets the measurements of flows that ended.
const PRUNE_EVERY: Duration = Duration::from_secs(2);

/// What became of a returned packet that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Returned {
    /// It goes on to the applications.
    Deliver(OverlayId),
    /// It answered a probe of the Monitor's; `reset`: a reset to send back
    /// through the overlay is in the caller's buffer.
    ProbeAnswer { overlay: OverlayId, reset: bool },
}

pub use crate::overlay::LocalAddresses;

/// Whether this host has a socket of a flow: the return path asks, of a
/// packet of a fake-address flow it has no mapping for (a daemon restarted
/// under a live flow), which fake address the application's socket talks
/// to.
pub trait SocketLookup: Send + Sync {
    /// Whether a socket of protocol `proto` (TCP or UDP) has its own end
    /// at `local` and its peer at `peer`.
    fn connected(&self, proto: u8, local: std::net::SocketAddr, peer: std::net::SocketAddr) -> bool;
    /// The connected TCP sockets whose peer address is `wanted`, as (own
    /// end, peer).
    fn tcp_peers(
        &self,
        wanted: &dyn Fn(std::net::IpAddr) -> bool,
    ) -> std::io::Result<Vec<(std::net::SocketAddr, std::net::SocketAddr)>>;
    /// Ends a TCP or UDP socket (`proto`): its application hears of it at
    /// once (ECONNABORTED), and a TCP peer gets a reset.
    fn end_socket(
        &self,
        proto: u8,
        local: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> std::io::Result<()>;
}

/// The checks of the return path, for one receiving thread.
pub struct ReturnPath {
    /// This host's sockets, to find which fake address a live flow's
    /// socket talks to when there is no mapping (a daemon restarted under
    /// the flow).
    sockets: Option<Arc<dyn SocketLookup>>,
    /// Flows taken up again that way: a returned packet's key, and the
    /// fake address it gets.
    adopted: HashMap<FlowKey, IpAddr>,
    /// Sources found to stand for no fake address.
    strangers: HashSet<IpAddr>,
    /// Flows from a source that stands for fake addresses, found to be of
    /// none of them (a header rule's flow to the real address): delivered
    /// as they are.
    plain: HashSet<FlowKey>,
    engine: Arc<Engine>,
    routes: Arc<Routes>,
    /// The measured flows this thread has seen answers of: a packet of one
    /// costs a lookup here, not a lock.
    measured: HashMap<FlowKey, Arc<FlowProbe>>,
    pruned: Instant,
    /// Fragmented replies of fake-address flows: the fake source their
    /// first fragment got, for the later ones (no ports to look up by).
    fragments: HashMap<FragKey, (IpAddr, Instant)>,
}

/// Fragmented replies followed at once.
const MAX_FRAGMENTED: usize = 1024;
/// Flows taken up again, and sources known to stand for no fake address,
/// remembered at once (each set is forgotten whole when full).
const MAX_ADOPTED: usize = 4096;
const MAX_STRANGERS: usize = 16_384;

impl ReturnPath {
    pub fn new(engine: &Arc<Engine>) -> ReturnPath {
        ReturnPath {
            sockets: None,
            adopted: HashMap::new(),
            strangers: HashSet::new(),
            plain: HashSet::new(),
            engine: engine.clone(),
            routes: engine.routes(),
            measured: HashMap::new(),
            pruned: engine.epoch(),
            fragments: HashMap::new(),
        }
    }

    /// Finds this host's sockets through `sockets`, to take up flows of
    /// fake addresses this daemon has no mapping for.
    pub fn with_sockets(mut self, sockets: Arc<dyn SocketLookup>) -> ReturnPath {
        self.sockets = Some(sockets);
        self
    }

    /// Picks up the latest routes; called once per batch.
    pub fn begin_batch(&mut self, now: Instant) {
        let latest = self.engine.routes();
        if !Arc::ptr_eq(&latest, &self.routes) {
            self.routes = latest;
        }
        if now.saturating_duration_since(self.pruned) >= PRUNE_EVERY {
            // A measurement only this thread still holds is of a flow that
            // ended.
            self.measured.retain(|_, probe| Arc::strong_count(probe) > 1);
            self.pruned = now;
        }
    }

    /// Feeds a returned packet (as it came back, before any rewriting) to
    /// its flow's measurement, if the flow is measured.
    pub fn measure(&mut self, packet: &[u8], now: Instant) {
        if !self.engine.measuring() {
            return;
        }
        let Some(key) = flow_key(packet) else {
            return;
        };
        let probe = match self.measured.get(&key) {
            Some(probe) => probe,
            None => {
                let Some(probe) = self.engine.measured(&key) else {
                    return;
                };
                self.measured.entry(key).or_insert(probe)
            }
        };
        if let Some(segment) = Segment::of(packet)
            && let Some(event) = probe.inbound(&segment, now)
        {
            self.engine.monitor.report(now, event);
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The routes of the batch at hand.
    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// Checks one datagram from `from`. When its packet may go on, it is
    /// left in `out` after `headroom` bytes, its source turned back into
    /// the fake address the application knows (`replies`, for
    /// fake-address flows carried by overlays) and the MSS of a SYN-ACK
    /// clamped to what the overlay carries. The answer to a probe of the
    /// Monitor's goes no further; when it must be reset, the reset is left
    /// in `out`, to go back to `from`.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        local: &LocalAddresses,
        replies: Option<&ReplyMap>,
        headroom: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Result<Returned, DropReason> {
        let result = self.check(from, datagram, local, replies, headroom, out, now);
        self.counted(result)
    }

    /// `result`, counted: as returned, or as dropped and why.
    fn counted(&self, result: Result<Returned, DropReason>) -> Result<Returned, DropReason> {
        match result {
            Ok(_) => self.engine.counters.overlay_received.fetch_add(1, Relaxed),
            Err(reason) => {
                self.engine.counters.dropped(reason);
                0
            }
        };
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        from: Option<SocketAddr>,
        datagram: &[u8],
        local: &LocalAddresses,
        replies: Option<&ReplyMap>,
        headroom: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Result<Returned, DropReason> {
        let Some(overlay) = from.and_then(|addr| self.routes.overlays.by_sender(addr)) else {
            tracing::debug!(?from, "datagram from a sender that is no joined overlay's peer");
            return Err(DropReason::NotFromOverlay);
        };
        if overlay.wireguard.is_some() {
            // Sealed: only what the peer's tunnel opened may go on.
            return Err(DropReason::Unauthenticated);
        }
        let packet = datagram
            .get(overlay.shim.len()..)
            .filter(|p| !p.is_empty())
            .ok_or(DropReason::Malformed)?;
        let overlay = overlay.clone();
        self.check_packet(&overlay, from, packet, local, replies, headroom, out, now)
    }

    /// Checks a packet a WireGuard overlay's peer sent, opened by its
    /// tunnel (the caller checked its source against the peer's
    /// AllowedIPs): addressed to the tunnel address, it gets back the
    /// address of this host its flow left from (`tunnels`), and then the
    /// checks every returned packet gets.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_opened(
        &mut self,
        overlay: &Arc<JoinedOverlay>,
        from: SocketAddr,
        packet: &mut [u8],
        local: &LocalAddresses,
        replies: Option<&ReplyMap>,
        tunnels: Option<&TunnelMap>,
        headroom: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Result<Returned, DropReason> {
        let result = self.untunnel(overlay, packet, tunnels).and_then(|()| {
            self.check_packet(overlay, Some(from), packet, local, replies, headroom, out, now)
        });
        self.counted(result)
    }

    fn untunnel(
        &self,
        overlay: &JoinedOverlay,
        packet: &mut [u8],
        tunnels: Option<&TunnelMap>,
    ) -> Result<(), DropReason> {
        let Some(link) = &overlay.wireguard else {
            return Ok(());
        };
        let (_, dst) = addresses(packet).ok_or(DropReason::Malformed)?;
        if link.tunnel_source(dst.is_ipv6()) != Some(dst) {
            tracing::debug!(overlay = %overlay.name, %dst, "opened packet not addressed to the tunnel address");
            return Err(DropReason::NotForThisHost);
        }
        let key = flow_key(packet).ok_or(DropReason::NoFlow)?;
        let own = tunnels.and_then(|t| t.get(&key)).ok_or(DropReason::NoFlow)?;
        rewrite_address(packet, End::Destination, *own).map_err(|_| DropReason::Untranslatable)
    }

    /// The checks every returned packet gets, its shim gone (or opened).
    #[allow(clippy::too_many_arguments)]
    fn check_packet(
        &mut self,
        overlay: &Arc<JoinedOverlay>,
        from: Option<SocketAddr>,
        packet: &[u8],
        local: &LocalAddresses,
        replies: Option<&ReplyMap>,
        headroom: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Result<Returned, DropReason> {
        let (_, dst) = addresses(packet).ok_or(DropReason::Malformed)?;
        if !local.contains(&dst) {
            tracing::debug!(overlay = %overlay.name, %dst, "returned packet not addressed to this host");
            return Err(DropReason::NotForThisHost);
        }
        overlay.received.fetch_add(1, Relaxed);
        // The SYN-ACK's MSS bounds what this host sends into the overlay.
        let outer_v6 = from.is_some_and(|a| a.ip().to_canonical().is_ipv6());
        let inner_v6 = packet[0] >> 4 == 6;
        let (id, max_mss) = (
            overlay.id,
            overlay.max_mss(self.engine.settings.uplink_mtu, inner_v6, outer_v6),
        );
        let monitor = &self.engine.monitor;
        if let Some(answer) = monitor.probes.answer(packet) {
            monitor.report(
                now,
                crate::monitor::Event::ProbeAnswered {
                    id: answer.sent.id,
                    at: now,
                    rtt: None,
                },
            );
            out.clear();
            let reset = answer.reset && crate::monitor::probe_table::reset_for(packet, out).is_some();
            return Ok(Returned::ProbeAnswer { overlay: id, reset });
        }
        self.measure(packet, now);
        out.clear();
        out.resize(headroom, 0);
        out.extend_from_slice(packet);
        let inner = &mut out[headroom..];
        // An exit node on this same host behind a veth hands over what its
        // kernel wrapped with the checksum still the device's to finish;
        // nothing between here and the application would.
        finish_checksum(inner);
        if let Some(key) = flow_key(inner) {
            let mapped = replies.and_then(|r| r.get(&key).copied());
            match fragment(inner) {
                Some(later) if !later.first => {
                    let datagram = frag_key(&key, &later);
                    if let Some(&(fake, at)) = self.fragments.get(&datagram)
                        && now.saturating_duration_since(at) < FRAGMENT_LIFETIME
                    {
                        let _ = rewrite_ip_address(inner, End::Source, fake);
                    }
                }
                // An error about a flow (a router's "fragmentation needed")
                // quotes the packet that left with the real address.
                _ if is_icmp_error(inner) => {
                    let fake = match mapped {
                        Some(fake) => Some(fake),
                        None => self.orphan(&key)?,
                    };
                    if let Some(fake) = fake
                        && let Err(e) = rewrite_error_about(inner, End::Destination, fake)
                    {
                        tracing::debug!(%fake, "cannot rewrite an error about a flow: {e}");
                    }
                }
                first => {
                    let fake = match mapped {
                        Some(fake) => Some(fake),
                        None => self.orphan(&key)?,
                    };
                    if let Some(fake) = fake {
                        if let Err(e) = rewrite_address(inner, End::Source, fake) {
                            tracing::debug!(%fake, "cannot rewrite a reply: {e}");
                        } else if let Some(first) = first {
                            if self.fragments.len() >= MAX_FRAGMENTED {
                                self.fragments.retain(|_, (_, at)| {
                                    now.saturating_duration_since(*at) < FRAGMENT_LIFETIME
                                });
                            }
                            if self.fragments.len() < MAX_FRAGMENTED {
                                self.fragments.insert(frag_key(&key, &first), (fake, now));
                            }
                        }
                    }
                }
            }
        }
        clamp_mss(inner, max_mss);
        Ok(Returned::Deliver(id))
    }
}

impl ReturnPath {
    /// A returned packet with no mapping: one of a fake-address flow this
    /// daemon does not know (it was restarted under the flow, whose
    /// mappings at the fake-address table's and the overlay's ends both
    /// survived), or of a flow that is no fake address's at all. When its
    /// source stands for fake addresses, the application's socket tells
    /// which one the flow is of (a real address may stand for several
    /// names), and the flow is taken up again: the packet gets that fake
    /// address as its source, and so do the flow's next ones until the
    /// flow's own next packet out starts it in the router. A flow whose
    /// socket talks to the real address itself (a header rule's flow) goes
    /// as it is. A TCP flow with no socket at all is dropped, counted; a
    /// datagram that no connected socket claims is delivered as it is (an
    /// unconnected socket may take it). Without a way to ask the sockets,
    /// nothing is taken up: a guess could break a header rule's flow.
    fn orphan(&mut self, key: &FlowKey) -> Result<Option<IpAddr>, DropReason> {
        if let Some(fake) = self.adopted.get(key) {
            return Ok(Some(*fake));
        }
        let real = flow_src(key);
        if self.strangers.contains(&real) || self.plain.contains(key) {
            return Ok(None);
        }
        let candidates: Vec<IpAddr> = {
            let fakes = self.engine.fakes().lock().unwrap_or_else(|e| e.into_inner());
            fakes.fakes_of(real).to_vec()
        };
        if candidates.is_empty() {
            if self.strangers.len() >= MAX_STRANGERS {
                self.strangers.clear();
            }
            self.strangers.insert(real);
            return Ok(None);
        }
        let local = SocketAddr::new(flow_dst(key), key.dport);
        let Some(sockets) = self.sockets.as_ref().filter(|_| matches!(key.proto, TCP | UDP)) else {
            return Ok(None);
        };
        let connected = |peer: IpAddr| sockets.connected(key.proto, local, SocketAddr::new(peer, key.sport));
        let Some(fake) = candidates.iter().copied().find(|fake| connected(*fake)) else {
            if key.proto == UDP || connected(real) {
                if self.plain.len() >= MAX_ADOPTED {
                    self.plain.clear();
                }
                self.plain.insert(*key);
                return Ok(None);
            }
            tracing::debug!(flow = %describe(key), ?candidates, "a returned packet of no live flow of this host");
            return Err(DropReason::NoFlow);
        };
        if self.adopted.len() >= MAX_ADOPTED {
            self.adopted.clear();
        }
        self.adopted.insert(*key, fake);
        self.engine.counters.adopted.fetch_add(1, Relaxed);
        tracing::info!(flow = %describe(key), %fake, "a live flow of a fake address taken up again");
        Ok(Some(fake))
    }
}

/// Whether a datagram on the underlay port may be sent on the underlay: it
/// must come from the loopback socket of one of the broker's own sandboxed
/// modules (the address of its overlay's path in the table). Anything else
/// could use the port to send arbitrary, spoofed packets with the broker's
/// privileges.
pub fn module_admitted(routes: &Routes, from: Option<SocketAddr>) -> bool {
    let Some(addr) = from
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .filter(|a| a.ip().is_loopback())
    else {
        return false;
    };
    routes
        .overlays
        .iter()
        .any(|o| o.module.is_some() && o.path.peers().contains(&addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_loopback_sockets_of_the_brokers_modules_are_admitted() {
        use crate::overlay::{JoinedOverlay, LocalModule, ModuleLink, OverlayId, OverlayTable};
        let overlay = |id: u32, port: u16, module: bool| {
            let mut overlay = JoinedOverlay::new(
                OverlayId(id),
                format!("o{id}"),
                Box::new(LocalModule::new(port)),
                vec![0; 16],
            );
            overlay.module = module.then(|| ModuleLink { up: Arc::default() });
            Arc::new(overlay)
        };
        // 40123 is a module's socket; 40124 a path on loopback that no
        // module of the broker's holds.
        let routes = Routes::new(
            &[],
            Arc::default(),
            Arc::new(OverlayTable::new([
                overlay(1, 40123, true),
                overlay(2, 40124, false),
            ])),
        );
        let admitted = |from: &str| module_admitted(&routes, Some(from.parse().unwrap()));
        assert!(admitted("127.0.0.1:40123"));
        assert!(admitted("[::ffff:127.0.0.1]:40123"));
        assert!(!admitted("127.0.0.1:40124"));
        assert!(!admitted("127.0.0.1:40125"));
        assert!(!admitted("10.0.0.1:40123"), "not from loopback");
        assert!(!module_admitted(&routes, None));
        assert!(!module_admitted(
            &Routes::default(),
            Some("127.0.0.1:40123".parse().unwrap())
        ));
    }
}
