//! Batched datagram I/O: one `sendmmsg`/`recvmmsg` system call for many
//! packets. socket2 wraps single sends and receives only.

use std::io;
use std::mem::zeroed;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{SockAddr, SockAddrStorage, Socket};

/// From linux/udp.h (libc does not export them for this target): send a
/// buffer of equal-size datagrams in one call, and receive coalesced ones.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most datagrams one UDP_SEGMENT send may carry (UDP_MAX_SEGMENTS).
const MAX_SEGMENTS: usize = 64;
/// Most payload one UDP_SEGMENT send may carry.
const MAX_GSO_PAYLOAD: usize = 65_000;

/// Packets to send, each to its own address, in one `sendmmsg`.
#[derive(Default)]
pub struct SendBatch<'a> {
    packets: Vec<&'a [u8]>,
    addrs: Vec<SockAddr>,
}

impl<'a> SendBatch<'a> {
    pub fn push(&mut self, packet: &'a [u8], to: SocketAddr) {
        self.packets.push(packet);
        self.addrs.push(SockAddr::from(to));
    }

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Sends everything; a packet the kernel refuses is counted and skipped.
    /// Returns (sent, failed).
    pub fn send(&self, fd: RawFd) -> (usize, usize) {
        let mut iovecs: Vec<libc::iovec> = self
            .packets
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; every pointer set below outlives the call.
        let mut headers: Vec<libc::mmsghdr> = (0..self.packets.len()).map(|_| unsafe { zeroed() }).collect();
        for (i, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name = self.addrs[i].as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = self.addrs[i].len();
            header.msg_hdr.msg_iov = &mut iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
        }
        send_all(fd, &mut headers, |_| 1)
    }
}

/// `sendmmsg` until every message is sent or refused; a refused message is
/// skipped. `datagrams(i)` says how many datagrams message `i` carries.
/// Returns (datagrams sent, datagrams failed).
fn send_all(fd: RawFd, headers: &mut [libc::mmsghdr], datagrams: impl Fn(usize) -> usize) -> (usize, usize) {
    let (mut sent, mut failed, mut start) = (0, 0, 0);
    while start < headers.len() {
        let rest = &mut headers[start..];
        // SAFETY: the caller's headers point at buffers that outlive this call.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            failed += datagrams(start);
            start += 1;
        } else {
            sent += (start..start + n as usize).map(&datagrams).sum::<usize>();
            start += n as usize;
        }
    }
    (sent, failed)
}

/// Datagrams sent with UDP segmentation offload: consecutive datagrams to
/// the same address with the same prefix and size go out as one buffer, cut
/// into datagrams by the kernel (or not at all, until the receiver's socket
/// when it asked for UDP_GRO), instead of one trip through the stack each.
#[derive(Default)]
pub struct GsoSendBatch<'a> {
    messages: Vec<GsoMessage<'a>>,
}

struct GsoMessage<'a> {
    to: SocketAddr,
    prefix: &'a [u8],
    bodies: Vec<&'a [u8]>,
    /// Size of every datagram but the last (prefix + body).
    segment: usize,
}

impl<'a> GsoSendBatch<'a> {
    pub fn push(&mut self, prefix: &'a [u8], body: &'a [u8], to: SocketAddr) {
        let size = prefix.len() + body.len();
        if let Some(last) = self.messages.last_mut() {
            let last_is_full = last
                .bodies
                .last()
                .is_some_and(|b| prefix.len() + b.len() == last.segment);
            let fits = size <= last.segment
                && last.bodies.len() < MAX_SEGMENTS
                && (last.bodies.len() + 1) * last.segment <= MAX_GSO_PAYLOAD;
            if last.to == to && std::ptr::eq(last.prefix, prefix) && last_is_full && fits {
                last.bodies.push(body);
                return;
            }
        }
        self.messages.push(GsoMessage {
            to,
            prefix,
            bodies: vec![body],
            segment: size,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Datagrams in the batch.
    pub fn datagrams(&self) -> usize {
        self.messages.iter().map(|m| m.bodies.len()).sum()
    }

    /// Sends everything; returns (datagrams sent, datagrams failed).
    pub fn send(&self, fd: RawFd) -> (usize, usize) {
        if self.messages.is_empty() {
            return (0, 0);
        }
        let addrs: Vec<SockAddr> = self.messages.iter().map(|m| SockAddr::from(m.to)).collect();
        let mut iovecs: Vec<Vec<libc::iovec>> = self
            .messages
            .iter()
            .map(|m| {
                m.bodies
                    .iter()
                    .flat_map(|body| {
                        let prefix = (!m.prefix.is_empty()).then_some(libc::iovec {
                            iov_base: m.prefix.as_ptr() as *mut _,
                            iov_len: m.prefix.len(),
                        });
                        prefix.into_iter().chain(std::iter::once(libc::iovec {
                            iov_base: body.as_ptr() as *mut _,
                            iov_len: body.len(),
                        }))
                    })
                    .collect()
            })
            .collect();
        // One control message each: UDP_SEGMENT with the segment size.
        // SAFETY: CMSG_SPACE is a pure size computation.
        let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        let mut controls = vec![0u8; cmsg_space * self.messages.len()];
        // SAFETY: mmsghdr is plain data; every pointer set below outlives the call.
        let mut headers: Vec<libc::mmsghdr> = (0..self.messages.len()).map(|_| unsafe { zeroed() }).collect();
        for (i, header) in headers.iter_mut().enumerate() {
            let message = &self.messages[i];
            header.msg_hdr.msg_name = addrs[i].as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = addrs[i].len();
            header.msg_hdr.msg_iov = iovecs[i].as_mut_ptr();
            header.msg_hdr.msg_iovlen = iovecs[i].len();
            if message.bodies.len() > 1 {
                let control = &mut controls[i * cmsg_space..(i + 1) * cmsg_space];
                header.msg_hdr.msg_control = control.as_mut_ptr() as *mut _;
                header.msg_hdr.msg_controllen = cmsg_space;
                // SAFETY: the control buffer is CMSG_SPACE(2) bytes, as set above.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, message.segment as u16);
                }
            }
        }
        send_all(fd, &mut headers, |i| self.messages[i].bodies.len())
    }
}

/// Asks the kernel to hand this socket coalesced datagrams: a buffer of
/// equal-size datagrams from one sender, with their size in a control
/// message ([`recv_batch`] reports it).
pub fn enable_udp_gro(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with an int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The datagrams in a received buffer of `len` bytes: one, or several of
/// `segment` bytes each (the last may be shorter) when the kernel coalesced.
pub fn datagrams(len: usize, segment: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = if segment == 0 { len.max(1) } else { segment };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// Receives up to `bufs.len()` datagrams (or coalesced runs of datagrams,
/// on a socket with UDP_GRO), each written at `offset` into its buffer.
/// Fills `lens`, `from` and `segments` (the coalesced datagram size, 0 when
/// not coalesced); returns how many buffers were filled.
pub fn recv_batch(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    offset: usize,
    lens: &mut [usize],
    from: &mut [Option<SocketAddr>],
    segments: &mut [usize],
) -> io::Result<usize> {
    let count = bufs.len().min(lens.len()).min(from.len()).min(segments.len());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut controls = vec![0u8; cmsg_space * count];
    let mut iovecs: Vec<libc::iovec> = bufs[..count]
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b[offset..].as_mut_ptr() as *mut _,
            iov_len: b.len() - offset,
        })
        .collect();
    let mut names: Vec<SockAddrStorage> = (0..count).map(|_| SockAddrStorage::zeroed()).collect();
    // SAFETY: as above.
    let mut headers: Vec<libc::mmsghdr> = (0..count).map(|_| unsafe { zeroed() }).collect();
    for (i, header) in headers.iter_mut().enumerate() {
        header.msg_hdr.msg_name = (&mut names[i]) as *mut _ as *mut _;
        header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        header.msg_hdr.msg_iov = &mut iovecs[i];
        header.msg_hdr.msg_iovlen = 1;
        header.msg_hdr.msg_control = controls[i * cmsg_space..].as_mut_ptr() as *mut _;
        header.msg_hdr.msg_controllen = cmsg_space;
    }
    // SAFETY: headers point at buffers and names that live until we return.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            headers.as_mut_ptr(),
            count as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (i, name) in names.into_iter().take(n).enumerate() {
        lens[i] = headers[i].msg_len as usize;
        segments[i] = 0;
        // SAFETY: walking the control messages the kernel wrote.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&headers[i].msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    segments[i] =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int) as usize;
                }
                cmsg = libc::CMSG_NXTHDR(&headers[i].msg_hdr, cmsg);
            }
        }
        // SAFETY: the kernel wrote a valid address of msg_namelen bytes.
        let addr = unsafe { SockAddr::new(name, headers[i].msg_hdr.msg_namelen) };
        from[i] = addr.as_socket();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesced_buffers_split_into_their_datagrams() {
        assert_eq!(datagrams(100, 0).collect::<Vec<_>>(), vec![0..100]);
        assert_eq!(
            datagrams(100, 40).collect::<Vec<_>>(),
            vec![0..40, 40..80, 80..100]
        );
        assert_eq!(datagrams(80, 40).collect::<Vec<_>>(), vec![0..40, 40..80]);
        assert_eq!(datagrams(0, 40).count(), 0);
    }

    #[test]
    fn gso_groups_equal_datagrams_to_one_place() {
        let to: SocketAddr = "192.0.2.1:7400".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:7400".parse().unwrap();
        let shim = [0u8; 4];
        let (full, short) = ([1u8; 100], [2u8; 60]);
        let mut batch = GsoSendBatch::default();
        batch.push(&shim, &full, to);
        batch.push(&shim, &full, to);
        batch.push(&shim, &short, to); // a shorter one ends the group
        batch.push(&shim, &full, to);
        batch.push(&shim, &full, other);
        let groups: Vec<(usize, usize)> = batch
            .messages
            .iter()
            .map(|m| (m.bodies.len(), m.segment))
            .collect();
        assert_eq!(groups, vec![(3, 104), (1, 104), (1, 104)]);
    }

    /// Over loopback: a GSO send arrives as one coalesced buffer on a
    /// socket with UDP_GRO, and splits back into the same datagrams.
    #[test]
    fn gso_send_arrives_coalesced_and_splits_back() {
        use socket2::{Domain, Type};
        let receiver = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        receiver
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        enable_udp_gro(&receiver).unwrap();
        let to = receiver.local_addr().unwrap().as_socket().unwrap();
        let sender = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        let shim = [9u8; 2];
        let bodies: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; if i == 4 { 30 } else { 500 }]).collect();
        let mut batch = GsoSendBatch::default();
        for body in &bodies {
            batch.push(&shim, body, to);
        }
        assert_eq!(batch.send(sender.as_raw_fd()), (5, 0));

        let mut bufs = vec![vec![0u8; 65_536]; 4];
        let (mut lens, mut from, mut segments) = (vec![0; 4], vec![None; 4], vec![0; 4]);
        let mut received = Vec::new();
        while received.len() < 5 {
            let n = recv_batch(
                receiver.as_raw_fd(),
                &mut bufs,
                0,
                &mut lens,
                &mut from,
                &mut segments,
            )
            .unwrap();
            for i in 0..n {
                for range in datagrams(lens[i], segments[i]) {
                    received.push(bufs[i][range].to_vec());
                }
            }
        }
        let expected: Vec<Vec<u8>> = bodies.iter().map(|b| [&shim[..], b].concat()).collect();
        assert_eq!(received, expected);
    }
}
