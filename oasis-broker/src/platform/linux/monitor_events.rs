//! The ring buffer the kernel programs send the Monitor's measurements
//! through (`MonitorEvent`s), read by a thread of the broker's own.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use oasis_common::{MonitorEvent, maps};

use super::sys::{KernelError, take_map};
use crate::platform::MonitorEvents;

pub struct KernelEvents {
    ring: RingBuf<MapData>,
}

impl KernelEvents {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<KernelEvents, KernelError> {
        Ok(KernelEvents {
            ring: take_map!(ebpf, maps::MONITOR_EVENTS, RingBuf<MapData>),
        })
    }
}

impl MonitorEvents for KernelEvents {
    fn read(&mut self, timeout: Duration, out: &mut Vec<MonitorEvent>) -> io::Result<()> {
        let mut pollfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<MonitorEvent>() {
                // SAFETY: the programs write whole MonitorEvents, plain
                // integers; read unaligned, the ring keeps 8-byte alignment
                // but nothing promises it here.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const MonitorEvent) });
            }
        }
        Ok(())
    }
}
