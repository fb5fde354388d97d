//! Batched datagram I/O: one `sendmmsg`/`recvmmsg` system call for many
//! packets. socket2 wraps single sends and receives only.

use std::io;
use std::mem::zeroed;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams to send, each an optional prefix (an overlay's shim) and a
/// body, sent as two iovecs so the body is never copied.
#[derive(Default)]
pub struct SendBatch<'a> {
    parts: Vec<(&'a [u8], &'a [u8])>,
    addrs: Vec<SockAddr>,
}

impl<'a> SendBatch<'a> {
    pub fn push(&mut self, prefix: &'a [u8], body: &'a [u8], to: SocketAddr) {
        self.parts.push((prefix, body));
        self.addrs.push(SockAddr::from(to));
    }

    pub fn len(&self) -> usize {
        self.parts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Sends everything; a datagram the kernel refuses is counted and
    /// skipped. Returns (sent, failed).
    pub fn send(&self, fd: RawFd) -> (usize, usize) {
        if self.parts.is_empty() {
            return (0, 0);
        }
        let mut iovecs: Vec<[libc::iovec; 2]> = self
            .parts
            .iter()
            .map(|(prefix, body)| {
                [
                    libc::iovec {
                        iov_base: prefix.as_ptr() as *mut _,
                        iov_len: prefix.len(),
                    },
                    libc::iovec {
                        iov_base: body.as_ptr() as *mut _,
                        iov_len: body.len(),
                    },
                ]
            })
            .collect();
        // SAFETY: mmsghdr is plain data; every pointer set below outlives the call.
        let mut headers: Vec<libc::mmsghdr> = (0..self.parts.len()).map(|_| unsafe { zeroed() }).collect();
        for (i, header) in headers.iter_mut().enumerate() {
            header.msg_hdr.msg_name = self.addrs[i].as_ptr() as *mut _;
            header.msg_hdr.msg_namelen = self.addrs[i].len();
            let skip_prefix = usize::from(self.parts[i].0.is_empty());
            header.msg_hdr.msg_iov = iovecs[i][skip_prefix..].as_mut_ptr();
            header.msg_hdr.msg_iovlen = 2 - skip_prefix;
        }
        let (mut sent, mut failed, mut start) = (0, 0, 0);
        while start < headers.len() {
            let rest = &mut headers[start..];
            // SAFETY: `rest` holds initialised headers whose buffers live in self.
            let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as u32, 0) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
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

/// Receives up to `bufs.len()` datagrams, each written at `offset` into its
/// buffer. Fills `lens` and `from`; returns how many arrived.
pub fn recv_batch(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    offset: usize,
    lens: &mut [usize],
    from: &mut [Option<SocketAddr>],
) -> io::Result<usize> {
    let count = bufs.len().min(lens.len()).min(from.len());
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
        // SAFETY: the kernel wrote a valid address of msg_namelen bytes.
        let addr = unsafe { SockAddr::new(name, headers[i].msg_hdr.msg_namelen) };
        from[i] = addr.as_socket();
    }
    Ok(n)
}
