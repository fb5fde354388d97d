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

use crate::overlay::OverlayTable;
use crate::packet::{addresses, clamp_mss};

use super::forward::{ForwardStats, Shared, snapshot};
use super::local_addrs::local_addresses;
use super::mmsg::recv_batch;

const BATCH: usize = 64;
const DATAGRAM: usize = 65_536;
/// How often the host's own addresses are read again.
const ADDRESS_REFRESH: Duration = Duration::from_secs(2);

pub struct OverlayReceiver {
    pub socket: Socket,
    pub device: Arc<SyncDevice>,
    pub overlays: Shared<OverlayTable>,
    pub stats: Arc<ForwardStats>,
    pub uplink_mtu: u16,
}

impl OverlayReceiver {
    pub fn run(self) -> std::io::Error {
        // Room in front of each datagram for the TUN's virtio-net header.
        let mut bufs = vec![vec![0u8; VIRTIO_NET_HDR_LEN + DATAGRAM]; BATCH];
        let mut lens = vec![0usize; BATCH];
        let mut from: Vec<Option<SocketAddr>> = vec![None; BATCH];
        let mut gro = GROTable::default();
        let mut local: HashSet<IpAddr> = local_addresses();
        let mut local_read = Instant::now();
        if let Err(e) = self.socket.set_read_timeout(Some(ADDRESS_REFRESH)) {
            return e;
        }
        loop {
            for buf in bufs.iter_mut() {
                buf.resize(VIRTIO_NET_HDR_LEN + DATAGRAM, 0);
            }
            let count = match recv_batch(
                self.socket.as_raw_fd(),
                &mut bufs,
                VIRTIO_NET_HDR_LEN,
                &mut lens,
                &mut from,
            ) {
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
                let Some(packet_len) = self.accept(&overlays, &local, from[i], &mut bufs[i], lens[i]) else {
                    continue;
                };
                bufs[i].truncate(VIRTIO_NET_HDR_LEN + packet_len);
                bufs.swap(i, accepted);
                accepted += 1;
            }
            if accepted == 0 {
                continue;
            }
            self.stats.overlay_received.fetch_add(accepted as u64, Relaxed);
            if let Err(e) = self
                .device
                .send_multiple(&mut gro, &mut bufs[..accepted], VIRTIO_NET_HDR_LEN)
            {
                self.stats.send_errors.fetch_add(1, Relaxed);
                tracing::debug!("writing returned packets to the TUN: {e}");
            }
        }
    }

    /// Checks one datagram and moves its IP packet to just after the
    /// virtio-net header room. Returns the packet's length if it may go on.
    fn accept(
        &self,
        overlays: &OverlayTable,
        local: &HashSet<IpAddr>,
        from: Option<SocketAddr>,
        buf: &mut [u8],
        len: usize,
    ) -> Option<usize> {
        let Some(overlay) = from.and_then(|addr| overlays.by_sender(addr)) else {
            self.stats.rejected_sender.fetch_add(1, Relaxed);
            tracing::debug!(
                ?from,
                "datagram from a sender that is no joined overlay's entry node"
            );
            return None;
        };
        let shim = overlay.shim.len();
        if len <= shim {
            self.stats.malformed.fetch_add(1, Relaxed);
            return None;
        }
        let start = VIRTIO_NET_HDR_LEN + shim;
        let packet_len = len - shim;
        buf.copy_within(start..start + packet_len, VIRTIO_NET_HDR_LEN);
        let packet = &mut buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + packet_len];
        let Some((_, dst)) = addresses(packet) else {
            self.stats.malformed.fetch_add(1, Relaxed);
            return None;
        };
        if !local.contains(&dst) {
            self.stats.rejected_destination.fetch_add(1, Relaxed);
            tracing::debug!(overlay = %overlay.name, %dst, "returned packet not addressed to this host");
            return None;
        }
        // The SYN-ACK's MSS bounds what this host sends into the overlay.
        let outer_v6 = from.is_some_and(|a| a.ip().to_canonical().is_ipv6());
        clamp_mss(
            packet,
            overlay.max_mss(self.uplink_mtu, packet[0] >> 4 == 6, outer_v6),
        );
        overlay.received.fetch_add(1, Relaxed);
        Some(packet_len)
    }
}
