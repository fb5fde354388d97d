//! The packet threads: read diverted packets from one TUN queue, find each
//! flow's carrier, and send. Blocking threads rather than async tasks: this
//! is a tight read-decide-send loop where a wake-up per batch is all the
//! scheduling needed.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tun_rs::{IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::control::BrokerCounters;
use crate::flow::{FlowTable, flow_key, routable};
use crate::rules::{Carrier, RuleSet};

use super::underlay::Underlay;

/// Counters shared by all packet threads.
#[derive(Default)]
pub struct ForwardStats {
    pub received: AtomicU64,
    pub sent_underlay: AtomicU64,
    pub send_errors: AtomicU64,
    pub malformed: AtomicU64,
    pub unroutable: AtomicU64,
    pub flows: AtomicU64,
}

impl ForwardStats {
    pub fn snapshot(&self) -> BrokerCounters {
        BrokerCounters {
            received: self.received.load(Relaxed),
            sent_underlay: self.sent_underlay.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            unroutable: self.unroutable.load(Relaxed),
            flows: self.flows.load(Relaxed),
        }
    }
}

/// The rule list as the packet threads see it; swapped whole on change.
pub type SharedRules = Arc<RwLock<Arc<RuleSet>>>;

const FLOW_CAPACITY: usize = 262_144;
const EXPIRY_INTERVAL: Duration = Duration::from_secs(5);
const SEGMENT_BUFFER: usize = 65_536;

pub struct Forwarder {
    pub device: SyncDevice,
    pub underlay: Arc<Underlay>,
    pub rules: SharedRules,
    pub stats: Arc<ForwardStats>,
    pub flow_idle: Duration,
}

impl Forwarder {
    /// Runs until the device fails for good (the process is exiting).
    pub fn run(self) -> std::io::Error {
        let mut flows = FlowTable::new(self.flow_idle, FLOW_CAPACITY);
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + SEGMENT_BUFFER];
        let mut segments = vec![vec![0u8; SEGMENT_BUFFER]; IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
        let mut last_expiry = Instant::now();
        let mut consecutive_errors = 0u32;
        loop {
            let count = match self
                .device
                .recv_multiple(&mut raw, &mut segments, &mut sizes, 0)
            {
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
            let mut underlay_batch: Vec<&[u8]> = Vec::with_capacity(count);
            for (segment, &size) in segments.iter().zip(&sizes).take(count) {
                let packet = &segment[..size];
                let Some(key) = flow_key(packet) else {
                    self.stats.malformed.fetch_add(1, Relaxed);
                    continue;
                };
                if !routable(&key) {
                    self.stats.unroutable.fetch_add(1, Relaxed);
                    continue;
                }
                let state = flows.carrier(key, now, |key| {
                    let rules = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
                    let decision = match rules.first_match(key) {
                        Some(rule) => (Some(rule.id), rule.via.clone()),
                        // The classifier pinned this flow to a rule since
                        // deleted: keep it on the plain path.
                        None => (None, Carrier::Underlay),
                    };
                    tracing::debug!(flow = %describe(key), rule = ?decision.0, carrier = %decision.1, "new flow");
                    decision
                });
                match &state.carrier {
                    Carrier::Underlay => underlay_batch.push(packet),
                    // Overlay carriers arrive with overlay support; until a
                    // rule can name one, do no harm and use the underlay.
                    Carrier::Overlay(_) => underlay_batch.push(packet),
                }
            }
            let (sent, failed) = self.underlay.send_batch(&underlay_batch);
            self.stats.sent_underlay.fetch_add(sent as u64, Relaxed);
            self.stats.send_errors.fetch_add(failed as u64, Relaxed);
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
}

/// `tcp 10.0.0.2:40000 -> 192.0.2.1:80`, for logs.
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
    format!(
        "proto {} {src}:{} -> {dst}:{}",
        key.proto, key.sport, key.dport
    )
}
