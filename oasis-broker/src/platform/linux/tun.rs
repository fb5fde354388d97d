//! The TUN device diverted packets arrive on (oasis-io creates it), as the
//! platform's [`DivertedQueue`] and [`Delivery`]. The device has offload
//! on, so one read can return a whole GSO burst, split into MTU-sized
//! packets here; small packets arrive one per read, so a batch keeps
//! reading until the queue is empty.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use oasis_io::linux::gro::{Coalescer, Write};
use tun_rs::{IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::platform::{Delivery, DivertedQueue, PacketBatch};

/// Slots of a batch: room for several reads of small packets, and always
/// for one whole GSO burst (the split fails without enough slots).
const SLOTS: usize = 2 * IDEAL_BATCH_SIZE;

/// One queue of the device, read by one thread.
pub struct TunQueue {
    device: Arc<SyncDevice>,
    /// One raw read: the virtio-net header and up to a whole GSO burst.
    raw: Vec<u8>,
    mtu: u16,
}

impl TunQueue {
    pub fn new(device: Arc<SyncDevice>, mtu: u16) -> io::Result<TunQueue> {
        // Reads never block: the queue waits in poll(2), with a timeout,
        // and a batch reads until the device is empty.
        device.set_nonblocking(true)?;
        Ok(TunQueue {
            device,
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65_536],
            mtu,
        })
    }

    fn read_once(&mut self, batch: &mut PacketBatch) -> io::Result<usize> {
        let (bufs, sizes) = batch.free();
        let count = self.device.recv_multiple(&mut self.raw, bufs, sizes, 0)?;
        batch.filled(count);
        Ok(count)
    }
}

/// Waits until `fd` is readable or `timeout` passes; false on timeout.
fn wait_readable(fd: i32, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n > 0)
}

impl DivertedQueue for TunQueue {
    fn new_batch(&self) -> PacketBatch {
        PacketBatch::new(SLOTS, usize::from(self.mtu).max(1280) + 256)
    }

    fn recv(&mut self, batch: &mut PacketBatch, timeout: Duration) -> io::Result<()> {
        let mut waited = false;
        loop {
            // Another read needs room for a whole GSO burst.
            if !batch.is_empty() && batch.capacity() - batch.len() < IDEAL_BATCH_SIZE {
                return Ok(());
            }
            match self.read_once(batch) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if waited || !batch.is_empty() {
                        return Ok(());
                    }
                    waited = true;
                    if !wait_readable(self.device.as_raw_fd(), timeout)? {
                        return Ok(());
                    }
                }
                Err(e) if !batch.is_empty() => {
                    // Keep what was read; the error shows on the next call.
                    tracing::debug!("reading the TUN: {e}");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes packets into the device, to the host's applications, TCP
/// segments of one flow coalesced (oasis-io's GRO), so a run of them goes
/// up the stack as one.
pub struct TunDelivery {
    device: Arc<SyncDevice>,
    gro: Coalescer,
}

impl TunDelivery {
    pub fn new(device: Arc<SyncDevice>) -> TunDelivery {
        TunDelivery {
            device,
            gro: Coalescer::default(),
        }
    }
}

impl Clone for TunDelivery {
    fn clone(&self) -> Self {
        TunDelivery::new(self.device.clone())
    }
}

impl Delivery for TunDelivery {
    fn headroom(&self) -> usize {
        VIRTIO_NET_HDR_LEN
    }

    fn deliver(&mut self, packets: &mut [Vec<u8>]) -> io::Result<()> {
        let mut result = Ok(());
        let writes = self.gro.coalesce(packets).len();
        for i in 0..writes {
            let buffer = match self.gro.write(i) {
                Write::Packet(index) => &packets[index],
                Write::Merged(index) => self.gro.merged(index),
            };
            // One packet refused is one loss; the others still go.
            if let Err(e) = self.device.send(buffer) {
                result = Err(e);
            }
        }
        result
    }
}
