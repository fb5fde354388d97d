//! The underlay carrier (OC0): diverted packets go back out as they are,
//! through raw sockets that write the whole IP header themselves. The
//! sockets carry the bypass mark so the classifier lets them through.

use std::io;
use std::mem::zeroed;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// One raw socket per address family.
pub struct Underlay {
    v4: Socket,
    v6: Socket,
}

/// Most packets handed to `sendmmsg` at once.
pub const MAX_BATCH: usize = 128;

impl Underlay {
    pub fn open(bypass_mark: u32) -> io::Result<Underlay> {
        // IPPROTO_RAW implies IP_HDRINCL (IPv4) and IPV6_HDRINCL (IPv6): the
        // kernel sends our header unchanged but for the IPv4 checksum.
        let open = |domain| -> io::Result<Socket> {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            socket.set_mark(bypass_mark)?;
            socket.set_send_buffer_size(4 << 20)?;
            Ok(socket)
        };
        Ok(Underlay {
            v4: open(Domain::IPV4)?,
            v6: open(Domain::IPV6)?,
        })
    }

    /// Sends a batch of raw IP packets to their own destinations. Returns
    /// how many were sent and how many failed; a failure is one packet lost,
    /// as on any router, never a reason to stop.
    pub fn send_batch(&self, packets: &[&[u8]]) -> (usize, usize) {
        let mut sent = 0;
        let mut failed = 0;
        for chunk in packets.chunks(MAX_BATCH) {
            let mut v4 = Batch::default();
            let mut v6 = Batch::default();
            for packet in chunk {
                match destination(packet) {
                    Some(SocketAddr::V4(addr)) => v4.push(packet, SockAddr::from(addr)),
                    Some(SocketAddr::V6(addr)) => v6.push(packet, SockAddr::from(addr)),
                    None => failed += 1,
                }
            }
            for (batch, socket) in [(&mut v4, &self.v4), (&mut v6, &self.v6)] {
                let (ok, err) = batch.send(socket.as_raw_fd());
                sent += ok;
                failed += err;
            }
        }
        (sent, failed)
    }
}

/// The destination of a raw IP packet, as a raw-socket address.
fn destination(packet: &[u8]) -> Option<SocketAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(dst.into(), 0)))
        }
        6 if packet.len() >= 40 => {
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(dst.into(), 0, 0, 0)))
        }
        _ => None,
    }
}

#[derive(Default)]
struct Batch<'a> {
    packets: Vec<&'a [u8]>,
    addrs: Vec<SockAddr>,
}

impl<'a> Batch<'a> {
    fn push(&mut self, packet: &'a [u8], addr: SockAddr) {
        self.packets.push(packet);
        self.addrs.push(addr);
    }

    /// One `sendmmsg` for the whole batch, retried past a failing packet.
    fn send(&mut self, fd: RawFd) -> (usize, usize) {
        let mut iovecs: Vec<libc::iovec> = self
            .packets
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; every pointer set below outlives the call.
        let mut headers: Vec<libc::mmsghdr> = (0..self.packets.len())
            .map(|_| unsafe { zeroed() })
            .collect();
        for (i, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name = self.addrs[i].as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = self.addrs[i].len();
            header.msg_hdr.msg_iov = &mut iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut failed, mut start) = (0, 0, 0);
        while start < headers.len() {
            let remaining = &mut headers[start..];
            // SAFETY: `remaining` points at initialised headers whose buffers live in self.
            let n =
                unsafe { libc::sendmmsg(fd, remaining.as_mut_ptr(), remaining.len() as u32, 0) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first packet of the rest failed: count it, go on.
                failed += 1;
                start += 1;
            } else {
                sent += n as usize;
                start += n as usize;
            }
        }
        (sent, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_of_raw_packets() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[198, 51, 100, 7]);
        assert_eq!(destination(&v4), Some("198.51.100.7:0".parse().unwrap()));
        let mut v6 = vec![0x60u8; 40];
        v6[24..40].copy_from_slice(
            &"2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        assert_eq!(destination(&v6), Some("[2001:db8::9]:0".parse().unwrap()));
        assert_eq!(destination(&[0x45, 0, 0]), None);
        assert_eq!(destination(&[]), None);
    }
}
