//! The packet threads: read diverted packets from one TUN queue, find each
//! flow's carrier, and send. Blocking threads rather than async tasks: this
//! is a tight read-decide-send loop where a wake-up per batch is all the
//! scheduling needed.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use socket2::Socket;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::control::BrokerCounters;
use crate::flow::{FlowTable, flow_key, routable};
use crate::overlay::{JoinedOverlay, OverlayTable};
use crate::packet::clamp_mss;
use crate::rules::{Carrier, RuleSet};

use super::fake_path::{FakePath, FakeRoute};
use super::mmsg::GsoSendBatch;
use super::underlay::Underlay;

/// Counters shared by all packet threads.
#[derive(Default)]
pub struct ForwardStats {
    pub received: AtomicU64,
    pub sent_underlay: AtomicU64,
    pub sent_overlay: AtomicU64,
    pub send_errors: AtomicU64,
    pub malformed: AtomicU64,
    pub unroutable: AtomicU64,
    pub no_carrier: AtomicU64,
    pub flows: AtomicU64,
    pub overlay_received: AtomicU64,
    pub rejected_sender: AtomicU64,
    pub rejected_destination: AtomicU64,
    pub rejected_module_sender: AtomicU64,
}

impl ForwardStats {
    pub fn snapshot(&self) -> BrokerCounters {
        BrokerCounters {
            received: self.received.load(Relaxed),
            sent_underlay: self.sent_underlay.load(Relaxed),
            sent_overlay: self.sent_overlay.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            unroutable: self.unroutable.load(Relaxed),
            no_carrier: self.no_carrier.load(Relaxed),
            flows: self.flows.load(Relaxed),
            overlay_received: self.overlay_received.load(Relaxed),
            rejected_sender: self.rejected_sender.load(Relaxed),
            rejected_destination: self.rejected_destination.load(Relaxed),
            rejected_module_sender: self.rejected_module_sender.load(Relaxed),
        }
    }
}

pub use crate::shared::{Shared, snapshot};

/// The UDP sockets on the overlay standard port, one per family.
pub struct OverlaySockets {
    pub v4: Socket,
    /// None on hosts without IPv6.
    pub v6: Option<Socket>,
}

const FLOW_CAPACITY: usize = 262_144;
const EXPIRY_INTERVAL: Duration = Duration::from_secs(5);
const SEGMENT_BUFFER: usize = 65_536;

pub struct Forwarder {
    pub device: Arc<SyncDevice>,
    pub underlay: Arc<Underlay>,
    pub overlay_sockets: Arc<OverlaySockets>,
    pub rules: Shared<RuleSet>,
    pub overlays: Shared<OverlayTable>,
    pub stats: Arc<ForwardStats>,
    pub flow_idle: Duration,
    pub uplink_mtu: u16,
    /// Flows to fake addresses (name rules).
    pub fake: Arc<FakePath>,
}

/// Where one packet of a batch goes.
enum Route {
    Underlay,
    Overlay(Arc<JoinedOverlay>, SocketAddr),
    /// Written back into the TUN (an ICMP error for the application).
    Reply(Vec<u8>),
    Drop,
}

impl Forwarder {
    /// Runs until the device fails for good (the process is exiting).
    pub fn run(self) -> std::io::Error {
        let mut flows = FlowTable::new(self.flow_idle, FLOW_CAPACITY);
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + SEGMENT_BUFFER];
        let mut segments = vec![vec![0u8; SEGMENT_BUFFER]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut routes: Vec<Route> = Vec::with_capacity(IDEAL_BATCH_SIZE);
        let mut last_expiry = Instant::now();
        let mut consecutive_errors = 0u32;
        let mut gro = GROTable::default();
        let mut replies: Vec<Vec<u8>> = Vec::new();
        loop {
            let count = match self.device.recv_multiple(&mut raw, &mut segments, &mut sizes, 0) {
                Ok(count) => {
                    consecutive_errors = 0;
                    count
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A packet the offload code cannot split is one loss;
                    // a device that keeps failing is gone.
                    consecutive_errors += 1;
                    self.stats.malformed.fetch_add(1, Relaxed);
                    tracing::debug!("reading from the TUN: {e}");
                    if consecutive_errors > 1000 {
                        return e;
                    }
                    continue;
                }
            };
            let now = Instant::now();
            let flows_before = flows.len();
            self.stats.received.fetch_add(count as u64, Relaxed);
            let overlays = snapshot(&self.overlays);

            // First pass: decide, and clamp the MSS of SYNs that go into an
            // overlay (it needs the packet mutable).
            routes.clear();
            for (segment, &size) in segments.iter_mut().zip(&sizes).take(count) {
                let packet = &mut segment[..size];
                let route = self.route(packet, &mut flows, &overlays, now);
                if let Route::Overlay(overlay, entry) = &route {
                    let max_mss = overlay.max_mss(self.uplink_mtu, packet[0] >> 4 == 6, entry.is_ipv6());
                    clamp_mss(packet, max_mss);
                }
                routes.push(route);
            }

            // Second pass: batch by carrier and send.
            replies.clear();
            let mut underlay_batch: Vec<&[u8]> = Vec::with_capacity(count);
            // A GSO burst read from the TUN goes to one entry node as one
            // segmented send.
            let mut overlay_v4 = GsoSendBatch::default();
            let mut overlay_v6 = GsoSendBatch::default();
            for ((segment, &size), route) in segments.iter().zip(&sizes).zip(&routes) {
                let packet = &segment[..size];
                match route {
                    Route::Underlay => underlay_batch.push(packet),
                    Route::Overlay(overlay, entry) => {
                        overlay.sent.fetch_add(1, Relaxed);
                        let batch = if entry.is_ipv4() {
                            &mut overlay_v4
                        } else {
                            &mut overlay_v6
                        };
                        batch.push(&overlay.shim, packet, *entry);
                    }
                    Route::Reply(reply) => {
                        let mut framed = vec![0u8; VIRTIO_NET_HDR_LEN];
                        framed.extend_from_slice(reply);
                        replies.push(framed);
                    }
                    Route::Drop => {}
                }
            }
            if !replies.is_empty()
                && let Err(e) = self
                    .device
                    .send_multiple(&mut gro, &mut replies, VIRTIO_NET_HDR_LEN)
            {
                tracing::debug!("writing ICMP errors to the TUN: {e}");
            }
            let (sent, failed) = self.underlay.send_batch(&underlay_batch);
            self.stats.sent_underlay.fetch_add(sent as u64, Relaxed);
            self.stats.send_errors.fetch_add(failed as u64, Relaxed);
            for (batch, socket) in [
                (&overlay_v4, Some(&self.overlay_sockets.v4)),
                (&overlay_v6, self.overlay_sockets.v6.as_ref()),
            ] {
                // No IPv6 on this host: an IPv6 entry node is unreachable.
                let (sent, failed) = match socket {
                    Some(socket) => batch.send(socket.as_raw_fd()),
                    None => (0, batch.datagrams()),
                };
                self.stats.sent_overlay.fetch_add(sent as u64, Relaxed);
                self.stats.send_errors.fetch_add(failed as u64, Relaxed);
            }

            if now.duration_since(last_expiry) > EXPIRY_INTERVAL {
                flows.expire(now);
                last_expiry = now;
            }
            // Each thread adds its own change, so the total stays a sum.
            let flows_after = flows.len();
            if flows_after >= flows_before {
                self.stats
                    .flows
                    .fetch_add((flows_after - flows_before) as u64, Relaxed);
            } else {
                self.stats
                    .flows
                    .fetch_sub((flows_before - flows_after) as u64, Relaxed);
            }
        }
    }

    fn route(
        &self,
        packet: &mut [u8],
        flows: &mut FlowTable,
        overlays: &OverlayTable,
        now: Instant,
    ) -> Route {
        let Some(key) = flow_key(packet) else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return Route::Drop;
        };
        if self.fake.contains(crate::rules::flow_dst(&key)) {
            return match self.fake.route(packet, &key, overlays, now) {
                FakeRoute::Send(carrier) => self.carrier_route(&carrier, &key, overlays),
                FakeRoute::Reply(reply) => Route::Reply(reply),
                FakeRoute::Drop => Route::Drop,
            };
        }
        if !routable(&key) {
            self.stats.unroutable.fetch_add(1, Relaxed);
            return Route::Drop;
        }
        let state = flows.carrier(key, now, |key| {
            let rules = snapshot(&self.rules);
            let decision = match rules.first_match(key) {
                Some(rule) => (Some(rule.id), rule.via.clone()),
                // The classifier pinned this flow to a rule since deleted:
                // keep it on the plain path.
                None => (None, Carrier::Underlay),
            };
            tracing::debug!(flow = %describe(key), rule = ?decision.0, carrier = %decision.1, "new flow");
            decision
        });
        let carrier = state.carrier.clone();
        self.carrier_route(&carrier, &key, overlays)
    }

    fn carrier_route(
        &self,
        carrier: &Carrier,
        key: &oasis_common::FlowKey,
        overlays: &OverlayTable,
    ) -> Route {
        match carrier {
            Carrier::Underlay => Route::Underlay,
            Carrier::Overlay(name) => match overlays.get(name) {
                Some(overlay) => Route::Overlay(overlay.clone(), overlay.entry_for(key)),
                // Its overlay is gone: the flow cannot continue where it
                // started, and moving it would change its source address.
                None => {
                    self.stats.no_carrier.fetch_add(1, Relaxed);
                    Route::Drop
                }
            },
        }
    }
}

/// `proto 6 10.0.0.2:40000 -> 192.0.2.1:80`, for logs.
fn describe(key: &oasis_common::FlowKey) -> String {
    use std::net::IpAddr;
    let (src, dst): (IpAddr, IpAddr) = if key.family == oasis_common::FAMILY_V4 {
        (
            IpAddr::from([key.src[0], key.src[1], key.src[2], key.src[3]]),
            IpAddr::from([key.dst[0], key.dst[1], key.dst[2], key.dst[3]]),
        )
    } else {
        (IpAddr::from(key.src), IpAddr::from(key.dst))
    };
    format!("proto {} {src}:{} -> {dst}:{}", key.proto, key.sport, key.dport)
}
