//! Raw IP sockets: packets go out as they are, whole IP header included.
//! The broker reinjects diverted packets on the underlay this way (with its
//! bypass mark, so the classifier lets them through), and the exit node
//! sends translated packets toward their destinations.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use super::mmsg::Datagrams;

/// One raw socket per address family.
pub struct RawSockets {
    v4: Socket,
    /// None on hosts without IPv6.
    v6: Option<Socket>,
}

/// A sender's reusable batch vectors, one per family (see [`Datagrams`]).
#[derive(Default)]
pub struct RawBatches {
    v4: Datagrams,
    v6: Datagrams,
}

impl RawSockets {
    /// Opens both sockets; `mark` (SO_MARK) is 0 for none.
    pub fn open(mark: u32) -> io::Result<RawSockets> {
        // IPPROTO_RAW implies IP_HDRINCL (IPv4) and IPV6_HDRINCL (IPv6): the
        // kernel sends our header unchanged but for the IPv4 checksum.
        let open = |domain| -> io::Result<Socket> {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            if mark != 0 {
                socket.set_mark(mark)?;
            }
            socket.set_send_buffer_size(4 << 20)?;
            Ok(socket)
        };
        let v6 = match open(Domain::IPV6) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!("no IPv6 raw socket ({e}); IPv4 only");
                None
            }
        };
        Ok(RawSockets {
            v4: open(Domain::IPV4)?,
            v6,
        })
    }

    /// Sends raw IP packets to their own destinations. Returns how many
    /// were sent and how many failed; a failure is one packet lost, as on
    /// any router, never a reason to stop.
    pub fn send<'p>(
        &self,
        batches: &mut RawBatches,
        packets: impl IntoIterator<Item = &'p [u8]>,
    ) -> (usize, usize) {
        let mut v4 = batches.v4.batch();
        let mut v6 = batches.v6.batch();
        let mut failed = 0;
        for packet in packets {
            match destination(packet) {
                Some(addr @ SocketAddr::V4(_)) => v4.push(packet, addr),
                Some(addr @ SocketAddr::V6(_)) => v6.push(packet, addr),
                None => failed += 1,
            }
        }
        let (sent4, failed4) = if v4.is_empty() {
            (0, 0)
        } else {
            v4.send(self.v4.as_raw_fd())
        };
        let (sent6, failed6) = match &self.v6 {
            _ if v6.is_empty() => (0, 0),
            Some(socket) => v6.send(socket.as_raw_fd()),
            None => (0, v6.len()),
        };
        (sent4 + sent6, failed + failed4 + failed6)
    }
}

/// The destination of a raw IP packet, as a raw-socket address.
pub fn destination(packet: &[u8]) -> Option<SocketAddr> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_of_raw_packets() {
        let mut v4 = vec![0x45u8; 20];
        v4[16..20].copy_from_slice(&[198, 51, 100, 7]);
        assert_eq!(destination(&v4), Some("198.51.100.7:0".parse().unwrap()));
        let mut v6 = vec![0x60u8; 40];
        v6[24..40].copy_from_slice(&"2001:db8::9".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(destination(&v6), Some("[2001:db8::9]:0".parse().unwrap()));
        assert_eq!(destination(&[0x45, 0, 0]), None);
        assert_eq!(destination(&[]), None);
    }
}
