//! Batched datagram I/O: one `sendmmsg`/`recvmmsg` system call for many
//! packets, with UDP segmentation offload both ways. socket2 wraps single
//! sends and receives only.
//!
//! The vectors a system call needs (iovecs, addresses, message headers,
//! control buffers) live in a store that is cleared, never freed, between
//! batches: once a store has seen the largest batch it will carry, sending
//! and receiving allocate nothing. A batch borrows its store and the packets
//! it points at, so no pointer outlives the packets it was taken from.

use std::io;
use std::marker::PhantomData;
use std::mem::zeroed;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{SockAddr, SockAddrStorage, Socket};

pub use crate::datagram::{Received, datagrams};

/// From linux/udp.h (libc does not export them for this target): send a
/// buffer of equal-size datagrams in one call, and receive coalesced ones.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
const UDP_NO_CHECK6_RX: libc::c_int = 102;
/// Most datagrams one UDP_SEGMENT send may carry (UDP_MAX_SEGMENTS).
const MAX_SEGMENTS: usize = 64;
/// Most payload one UDP_SEGMENT send may carry.
const MAX_GSO_PAYLOAD: usize = 65_000;

fn iovec(bytes: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    }
}

/// Datagrams a store has room for from the start: a batch as large as a
/// packet loop makes (a TUN queue's 256 slots), so growing is rare even
/// before the first busy moment.
pub const BATCH_ROOM: usize = 256;

/// Reusable vectors for sending datagrams, each to its own address.
pub struct Datagrams {
    iovecs: Vec<libc::iovec>,
    addrs: Vec<SockAddr>,
    headers: Vec<libc::mmsghdr>,
}

impl Default for Datagrams {
    fn default() -> Self {
        Datagrams {
            iovecs: Vec::with_capacity(BATCH_ROOM),
            addrs: Vec::with_capacity(BATCH_ROOM),
            headers: Vec::with_capacity(BATCH_ROOM),
        }
    }
}

// SAFETY: the raw pointers in the vectors are set by a batch and cleared when
// it ends; between batches the store holds no pointer at all.
unsafe impl Send for Datagrams {}

impl Datagrams {
    /// Starts a batch; the packets pushed must outlive it.
    pub fn batch<'p>(&mut self) -> SendBatch<'_, 'p> {
        self.clear();
        SendBatch {
            store: self,
            _packets: PhantomData,
        }
    }

    fn clear(&mut self) {
        self.iovecs.clear();
        self.addrs.clear();
        self.headers.clear();
    }
}

/// Packets to send, each to its own address, in one `sendmmsg`.
pub struct SendBatch<'s, 'p> {
    store: &'s mut Datagrams,
    _packets: PhantomData<&'p [u8]>,
}

impl<'p> SendBatch<'_, 'p> {
    pub fn push(&mut self, packet: &'p [u8], to: SocketAddr) {
        self.store.iovecs.push(iovec(packet));
        self.store.addrs.push(SockAddr::from(to));
    }

    pub fn len(&self) -> usize {
        self.store.iovecs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.iovecs.is_empty()
    }

    /// Sends everything; a packet the kernel refuses is counted and skipped.
    /// Returns (sent, failed).
    pub fn send(self, fd: RawFd) -> (usize, usize) {
        let store = &mut *self.store;
        // The address and iovec vectors are complete: pointers into them
        // stay valid until the headers are cleared.
        for i in 0..store.iovecs.len() {
            // SAFETY: mmsghdr is plain data; zero is a valid empty header.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_name = store.addrs[i].as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = store.addrs[i].len();
            header.msg_hdr.msg_iov = &mut store.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            store.headers.push(header);
        }
        send_all(fd, &mut store.headers, |_| 1, |_, _| 0)
    }
}

impl Drop for SendBatch<'_, '_> {
    fn drop(&mut self) {
        self.store.clear();
    }
}

/// `sendmmsg` until every message is sent or refused; a refused message is
/// handed to `refused` (which may send it another way and says how many
/// of its datagrams went), else skipped. `datagrams(i)` says how many
/// datagrams message `i` carries. Returns (datagrams sent, datagrams failed).
fn send_all(
    fd: RawFd,
    headers: &mut [libc::mmsghdr],
    datagrams: impl Fn(usize) -> usize,
    mut refused: impl FnMut(usize, &io::Error) -> usize,
) -> (usize, usize) {
    let (mut sent, mut failed, mut start) = (0, 0, 0);
    while start < headers.len() {
        let rest = &mut headers[start..];
        // SAFETY: the caller's headers point at buffers that outlive this call.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as u32, 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let went = refused(start, &error);
            sent += went;
            failed += datagrams(start) - went;
            start += 1;
        } else {
            sent += (start..start + n as usize).map(&datagrams).sum::<usize>();
            start += n as usize;
        }
    }
    (sent, failed)
}

/// One UDP_SEGMENT message: consecutive iovecs `first..first + iovs`.
struct GsoMessage {
    to: SocketAddr,
    addr: SockAddr,
    /// The prefix every datagram of the message starts with (compared by
    /// address: the same shim buffer means the same overlay).
    prefix: *const u8,
    prefix_len: usize,
    first: usize,
    iovs: usize,
    datagrams: usize,
    /// Size of every datagram but the last (prefix + body).
    segment: usize,
    /// Size of the last datagram.
    last: usize,
}

/// Reusable vectors for datagrams sent with UDP segmentation offload:
/// consecutive datagrams to the same address with the same prefix and size
/// go out as one buffer, cut into datagrams by the kernel (or not at all,
/// until the receiver's socket when it asked for UDP_GRO), instead of one
/// trip through the stack each.
pub struct GsoDatagrams {
    messages: Vec<GsoMessage>,
    iovecs: Vec<libc::iovec>,
    controls: Vec<u8>,
    headers: Vec<libc::mmsghdr>,
}

impl Default for GsoDatagrams {
    fn default() -> Self {
        GsoDatagrams {
            messages: Vec::with_capacity(BATCH_ROOM),
            // A prefix and a body each.
            iovecs: Vec::with_capacity(2 * BATCH_ROOM),
            controls: Vec::with_capacity(BATCH_ROOM * 32),
            headers: Vec::with_capacity(BATCH_ROOM),
        }
    }
}

// SAFETY: as for `Datagrams`: pointers live only while a batch does.
unsafe impl Send for GsoDatagrams {}

impl GsoDatagrams {
    /// Starts a batch; the prefixes and bodies pushed must outlive it.
    pub fn batch<'p>(&mut self) -> GsoBatch<'_, 'p> {
        self.clear();
        GsoBatch {
            store: self,
            _packets: PhantomData,
        }
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.iovecs.clear();
        self.headers.clear();
    }
}

pub struct GsoBatch<'s, 'p> {
    store: &'s mut GsoDatagrams,
    _packets: PhantomData<&'p [u8]>,
}

impl<'p> GsoBatch<'_, 'p> {
    /// Adds the datagram `prefix` + `body` for `to`.
    pub fn push(&mut self, prefix: &'p [u8], body: &'p [u8], to: SocketAddr) {
        let store = &mut *self.store;
        let size = prefix.len() + body.len();
        let extends = store.messages.last().is_some_and(|last| {
            last.to == to
                && std::ptr::eq(last.prefix, prefix.as_ptr())
                && last.prefix_len == prefix.len()
                && last.last == last.segment
                && size <= last.segment
                && last.datagrams < MAX_SEGMENTS
                && (last.datagrams + 1) * last.segment <= MAX_GSO_PAYLOAD
        });
        let iovs = if prefix.is_empty() { 1 } else { 2 };
        if !prefix.is_empty() {
            store.iovecs.push(iovec(prefix));
        }
        store.iovecs.push(iovec(body));
        if extends {
            let last = store.messages.last_mut().expect("checked");
            last.iovs += iovs;
            last.datagrams += 1;
            last.last = size;
        } else {
            store.messages.push(GsoMessage {
                to,
                addr: SockAddr::from(to),
                prefix: prefix.as_ptr(),
                prefix_len: prefix.len(),
                first: store.iovecs.len() - iovs,
                iovs,
                datagrams: 1,
                segment: size,
                last: size,
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.store.messages.is_empty()
    }

    /// Datagrams in the batch.
    pub fn datagrams(&self) -> usize {
        self.store.messages.iter().map(|m| m.datagrams).sum()
    }

    /// Groups of datagrams that go out as one send: (datagrams, segment size).
    pub fn groups(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.store.messages.iter().map(|m| (m.datagrams, m.segment))
    }

    /// Sends everything; returns (datagrams sent, datagrams failed).
    pub fn send(self, fd: RawFd) -> (usize, usize) {
        let store = &mut *self.store;
        if store.messages.is_empty() {
            return (0, 0);
        }
        // One control message each: UDP_SEGMENT with the segment size.
        // SAFETY: CMSG_SPACE is a pure size computation.
        let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
        store.controls.clear();
        store.controls.resize(cmsg_space * store.messages.len(), 0);
        for (i, message) in store.messages.iter().enumerate() {
            // SAFETY: mmsghdr is plain data; zero is a valid empty header.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_name = message.addr.as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = message.addr.len();
            header.msg_hdr.msg_iov = store.iovecs[message.first..].as_mut_ptr();
            header.msg_hdr.msg_iovlen = message.iovs;
            if message.datagrams > 1 {
                let control = &mut store.controls[i * cmsg_space..(i + 1) * cmsg_space];
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
            store.headers.push(header);
        }
        let (messages, iovecs) = (&store.messages, &mut store.iovecs);
        send_all(
            fd,
            &mut store.headers,
            |i| messages[i].datagrams,
            |i, error| {
                // Datagrams larger than the path's MTU cannot be segmented
                // (the kernel refuses with EMSGSIZE); one by one, the
                // kernel fragments them.
                let message = &messages[i];
                if message.datagrams < 2 || error.raw_os_error() != Some(libc::EMSGSIZE) {
                    return 0;
                }
                let per = if message.prefix_len > 0 { 2 } else { 1 };
                let mut went = 0;
                for d in 0..message.datagrams {
                    // SAFETY: plain data; zero is a valid empty header.
                    let mut header: libc::msghdr = unsafe { zeroed() };
                    header.msg_name = message.addr.as_ptr() as *mut _;
                    header.msg_namelen = message.addr.len();
                    header.msg_iov = iovecs[message.first + d * per..].as_mut_ptr();
                    header.msg_iovlen = per;
                    // SAFETY: the iovecs point at the batch's buffers.
                    if unsafe { libc::sendmsg(fd, &header, 0) } >= 0 {
                        went += 1;
                    }
                }
                went
            },
        )
    }
}

impl Drop for GsoBatch<'_, '_> {
    fn drop(&mut self) {
        self.store.clear();
    }
}

/// Lets an IPv6 UDP socket take datagrams whose UDP checksum is zero.
/// RFC 6935/6936 allow it for tunnels, where the inner packet carries its
/// own checksums; peers and kernel encapsulators send them, and IPv6
/// sockets drop them otherwise.
pub fn accept_zero_udp_checksum_v6(socket: &Socket) -> io::Result<()> {
    set_udp_option(socket, UDP_NO_CHECK6_RX)
}

fn set_udp_option(socket: &Socket, option: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a plain setsockopt with an int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            option,
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

/// Asks the kernel to hand this socket coalesced datagrams: a buffer of
/// equal-size datagrams from one sender, with their size in a control
/// message ([`Receiver::recv`] reports it).
pub fn enable_udp_gro(socket: &Socket) -> io::Result<()> {
    set_udp_option(socket, UDP_GRO)
}

/// Reusable vectors for `recvmmsg`.
#[derive(Default)]
pub struct Receiver {
    iovecs: Vec<libc::iovec>,
    names: Vec<SockAddrStorage>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<u8>,
}

// SAFETY: pointers are set and used within one call of `recv`.
unsafe impl Send for Receiver {}

impl Receiver {
    /// Receives up to `bufs.len()` datagrams (or coalesced runs of
    /// datagrams, on a socket with UDP_GRO), each written at `offset` into
    /// its buffer, and describes each in `out`. Returns how many buffers
    /// were filled.
    pub fn recv(
        &mut self,
        fd: RawFd,
        bufs: &mut [Vec<u8>],
        offset: usize,
        out: &mut [Received],
    ) -> io::Result<usize> {
        let count = bufs.len().min(out.len());
        // SAFETY: CMSG_SPACE is a pure size computation.
        let cmsg_space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        self.controls.clear();
        self.controls.resize(cmsg_space * count, 0);
        self.iovecs.clear();
        self.iovecs.extend(bufs[..count].iter_mut().map(|b| libc::iovec {
            iov_base: b[offset..].as_mut_ptr() as *mut _,
            iov_len: b.len() - offset,
        }));
        self.names.clear();
        self.names.resize_with(count, SockAddrStorage::zeroed);
        self.headers.clear();
        for i in 0..count {
            // SAFETY: mmsghdr is plain data; zero is a valid empty header.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_name = (&mut self.names[i]) as *mut _ as *mut _;
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            header.msg_hdr.msg_iov = &mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[i * cmsg_space..].as_mut_ptr() as *mut _;
            header.msg_hdr.msg_controllen = cmsg_space;
            self.headers.push(header);
        }
        // SAFETY: headers point at buffers and names that live until we return.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                count as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, received) in out.iter_mut().take(n).enumerate() {
            let header = &self.headers[i];
            let mut segment = 0;
            // SAFETY: walking the control messages the kernel wrote.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                        segment =
                            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int) as usize;
                    }
                    cmsg = libc::CMSG_NXTHDR(&header.msg_hdr, cmsg);
                }
            }
            // SAFETY: the kernel wrote a valid address of msg_namelen bytes.
            let name = std::mem::replace(&mut self.names[i], SockAddrStorage::zeroed());
            let addr = unsafe { SockAddr::new(name, header.msg_hdr.msg_namelen) };
            *received = Received {
                len: header.msg_len as usize,
                from: addr.as_socket(),
                segment,
            };
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_groups_equal_datagrams_to_one_place() {
        let to: SocketAddr = "192.0.2.1:7400".parse().unwrap();
        let other: SocketAddr = "192.0.2.2:7400".parse().unwrap();
        let shim = [0u8; 4];
        let (full, short) = ([1u8; 100], [2u8; 60]);
        let mut store = GsoDatagrams::default();
        let mut batch = store.batch();
        batch.push(&shim, &full, to);
        batch.push(&shim, &full, to);
        batch.push(&shim, &short, to); // a shorter one ends the group
        batch.push(&shim, &full, to);
        batch.push(&shim, &full, other);
        let groups: Vec<(usize, usize)> = batch.groups().collect();
        assert_eq!(groups, vec![(3, 104), (1, 104), (1, 104)]);
        assert_eq!(batch.datagrams(), 5);
    }

    /// Over loopback: a GSO send arrives as one coalesced buffer on a
    /// socket with UDP_GRO, and splits back into the same datagrams; the
    /// stores keep working batch after batch.
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
        let (mut store, mut rx) = (GsoDatagrams::default(), Receiver::default());
        let mut bufs = vec![vec![0u8; 65_536]; 4];
        let mut out = [Received::default(); 4];
        for _round in 0..3 {
            let mut batch = store.batch();
            for body in &bodies {
                batch.push(&shim, body, to);
            }
            assert_eq!(batch.send(sender.as_raw_fd()), (5, 0));
            let mut received = Vec::new();
            while received.len() < 5 {
                let n = rx.recv(receiver.as_raw_fd(), &mut bufs, 0, &mut out).unwrap();
                for (buf, r) in bufs.iter().zip(&out).take(n) {
                    let sender_port = sender.local_addr().unwrap().as_socket().unwrap().port();
                    assert_eq!(r.from.map(|f| f.port()), Some(sender_port));
                    for range in datagrams(r.len, r.segment) {
                        received.push(buf[range].to_vec());
                    }
                }
            }
            let expected: Vec<Vec<u8>> = bodies.iter().map(|b| [&shim[..], b].concat()).collect();
            assert_eq!(received, expected);
        }
    }

    #[test]
    fn plain_batches_reach_each_address() {
        use socket2::{Domain, Type};
        let bind = || {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            s
        };
        let (a, b, sender) = (bind(), bind(), bind());
        let addr = |s: &Socket| s.local_addr().unwrap().as_socket().unwrap();
        let mut store = Datagrams::default();
        let mut batch = store.batch();
        batch.push(b"to a", addr(&a));
        batch.push(b"to b", addr(&b));
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.send(sender.as_raw_fd()), (2, 0));
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        for (socket, text) in [(&a, "to a"), (&b, "to b")] {
            let n = socket.recv(&mut buf).unwrap();
            // SAFETY: recv initialised the first n bytes.
            let got: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(got, text.as_bytes());
        }
    }
}
