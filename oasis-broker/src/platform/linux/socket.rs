//! The broker's UDP sockets (the overlay standard port, the underlay
//! port): batched sends with UDP segmentation offload, batched receives
//! with UDP GRO where asked for. They carry the bypass mark, so nothing
//! they send is ever diverted by a rule itself.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use oasis_io::linux::mmsg::{GsoDatagrams, Receiver, accept_zero_udp_checksum_v6, enable_udp_gro};
use socket2::{Domain, Protocol, Socket, Type};

use crate::platform::{DatagramSocket, Received};

pub struct UdpSocket {
    socket: Socket,
    /// The receive timeout set now, in microseconds (set again only when
    /// a caller asks for another).
    timeout_us: AtomicU64,
}

impl UdpSocket {
    /// Binds `addr` (IPv6 sockets only IPv6) with the bypass mark.
    pub fn open(addr: SocketAddr, bypass_mark: u32, coalesce: bool) -> io::Result<UdpSocket> {
        let domain = Domain::for_address(addr);
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if domain == Domain::IPV6 {
            socket.set_only_v6(true)?;
            accept_zero_udp_checksum_v6(&socket)?;
        }
        socket.set_mark(bypass_mark)?;
        socket.set_recv_buffer_size(8 << 20)?;
        socket.set_send_buffer_size(8 << 20)?;
        socket.bind(&addr.into())?;
        if coalesce && let Err(e) = enable_udp_gro(&socket) {
            tracing::warn!(%addr, "no UDP GRO ({e}); datagrams arrive one by one");
        }
        Ok(UdpSocket {
            socket,
            timeout_us: AtomicU64::new(0),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an IP socket"))
    }
}

/// Per-thread batch vectors.
#[derive(Default)]
pub struct UdpScratch {
    send: GsoDatagrams,
    recv: Receiver,
}

impl DatagramSocket for UdpSocket {
    type Scratch = UdpScratch;

    fn send<'p>(
        &self,
        scratch: &mut UdpScratch,
        datagrams: impl Iterator<Item = (&'p [u8], &'p [u8], SocketAddr)>,
    ) -> (usize, usize) {
        let mut batch = scratch.send.batch();
        for (prefix, body, to) in datagrams {
            batch.push(prefix, body, to);
        }
        if batch.is_empty() {
            return (0, 0);
        }
        batch.send(self.socket.as_raw_fd())
    }

    fn recv(
        &self,
        scratch: &mut UdpScratch,
        bufs: &mut [Vec<u8>],
        out: &mut [Received],
        timeout: Duration,
    ) -> io::Result<usize> {
        let micros = timeout.as_micros().max(1) as u64;
        if self.timeout_us.swap(micros, Relaxed) != micros {
            self.socket
                .set_read_timeout(Some(Duration::from_micros(micros)))?;
        }
        match scratch.recv.recv(self.socket.as_raw_fd(), bufs, 0, out) {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(0),
            other => other,
        }
    }
}
