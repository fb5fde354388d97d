//! Packets coming back from overlays: datagrams on the standard port, each
//! `[shim][IP packet]`. Only the joined overlays' entry nodes may send them,
//! and only packets addressed to this host go on, into the TUN and so to
//! the application. Everything else is dropped and counted.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use socket2::Socket;
use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::overlay::{JoinedOverlay, OverlayTable};
use crate::packet::{addresses, clamp_mss};

use super::fake_path::FakePath;
use super::forward::{ForwardStats, Shared, snapshot};
use super::local_addrs::local_addresses;
use super::mmsg::{datagrams, enable_udp_gro, recv_batch};

const BATCH: usize = 16;
/// A receive buffer holds one datagram, or a coalesced run of them.
const BUFFER: usize = 65_536;
/// How often the host's own addresses are read again.
const ADDRESS_REFRESH: Duration = Duration::from_secs(2);

pub struct OverlayReceiver {
    pub socket: Socket,
    pub device: Arc<SyncDevice>,
    pub overlays: Shared<OverlayTable>,
    pub stats: Arc<ForwardStats>,
    pub uplink_mtu: u16,
    /// Replies of fake-address flows get their fake source back.
    pub fake: Arc<FakePath>,
}

impl OverlayReceiver {
    pub fn run(self) -> std::io::Error {
        let mut bufs = vec![vec![0u8; BUFFER]; BATCH];
        let mut lens = vec![0usize; BATCH];
        let mut from: Vec<Option<SocketAddr>> = vec![None; BATCH];
        let mut segments = vec![0usize; BATCH];
        // Packets accepted for the TUN, each after room for the virtio-net header.
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut gro = GROTable::default();
        let mut local: HashSet<IpAddr> = local_addresses();
        let mut local_read = Instant::now();
        if let Err(e) = self.socket.set_read_timeout(Some(ADDRESS_REFRESH)) {
            return e;
        }
        if let Err(e) = enable_udp_gro(&self.socket) {
            tracing::warn!("no UDP GRO on the standard port ({e}); datagrams arrive one by one");
        }
        loop {
            let fd = self.socket.as_raw_fd();
            let count = match recv_batch(fd, &mut bufs, 0, &mut lens, &mut from, &mut segments) {
                Ok(count) => count,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    0
                }
                Err(e) => return e,
            };
            if local_read.elapsed() > ADDRESS_REFRESH {
                local = local_addresses();
                local_read = Instant::now();
            }
            if count == 0 {
                continue;
            }
            let overlays = snapshot(&self.overlays);
            let mut accepted = 0;
            for i in 0..count {
                let Some(overlay) = from[i].and_then(|addr| overlays.by_sender(addr)) else {
                    self.stats.rejected_sender.fetch_add(1, Relaxed);
                    tracing::debug!(from = ?from[i], "datagram from a sender that is no joined overlay's entry node");
                    continue;
                };
                let outer_v6 = from[i].is_some_and(|a| a.ip().to_canonical().is_ipv6());
                for range in datagrams(lens[i], segments[i]) {
                    if out.len() == accepted {
                        out.push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + 1500));
                    }
                    let buf = &mut out[accepted];
                    if self.accept(overlay, &local, outer_v6, &bufs[i][range], buf) {
                        accepted += 1;
                    }
                }
            }
            if accepted == 0 {
                continue;
            }
            self.stats.overlay_received.fetch_add(accepted as u64, Relaxed);
            if let Err(e) = self
                .device
                .send_multiple(&mut gro, &mut out[..accepted], VIRTIO_NET_HDR_LEN)
            {
                self.stats.send_errors.fetch_add(1, Relaxed);
                tracing::debug!("writing returned packets to the TUN: {e}");
            }
        }
    }

    /// Checks one datagram from `overlay`'s entry node and, if its packet
    /// may go on, leaves it in `out` after the virtio-net header room.
    fn accept(
        &self,
        overlay: &JoinedOverlay,
        local: &HashSet<IpAddr>,
        outer_v6: bool,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        let shim = overlay.shim.len();
        if datagram.len() <= shim {
            self.stats.malformed.fetch_add(1, Relaxed);
            return false;
        }
        let packet = &datagram[shim..];
        let Some((_, dst)) = addresses(packet) else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return false;
        };
        if !local.contains(&dst) {
            self.stats.rejected_destination.fetch_add(1, Relaxed);
            tracing::debug!(overlay = %overlay.name, %dst, "returned packet not addressed to this host");
            return false;
        }
        out.clear();
        out.resize(VIRTIO_NET_HDR_LEN, 0);
        out.extend_from_slice(packet);
        // The SYN-ACK's MSS bounds what this host sends into the overlay.
        let inner = &mut out[VIRTIO_NET_HDR_LEN..];
        self.fake.translate_reply(inner);
        clamp_mss(
            inner,
            overlay.max_mss(self.uplink_mtu, inner[0] >> 4 == 6, outer_v6),
        );
        overlay.received.fetch_add(1, Relaxed);
        true
    }
}
