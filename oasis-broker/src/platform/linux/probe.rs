//! What the Monitor's probes need from Linux besides the raw sockets that
//! send them: TCP ports held for them (bound, never listening, so no
//! application gets one, and the host's stack resets a SYN-ACK that reaches
//! one), the address the host sends from towards a destination, and raw
//! ICMP sockets that read echo replies.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::platform::{EchoReply, ProbeSockets};

pub struct LinuxProbeSockets {
    ports: Vec<u16>,
    /// The sockets holding the ports, IPv4 and IPv6.
    _held: Vec<OwnedFd>,
    icmp4: OwnedFd,
    icmp6: Option<OwnedFd>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn socket(family: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the descriptor is owned from here on.
    let fd = check(unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, proto) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` lives for the call and its size is given.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Binds a TCP socket of `family` to `port` (0: any); the port it got.
fn hold(family: libc::c_int, port: u16) -> io::Result<(OwnedFd, u16)> {
    let fd = socket(family, libc::SOCK_STREAM, 0)?;
    let (addr, len): (libc::sockaddr_storage, libc::socklen_t) = if family == libc::AF_INET {
        // SAFETY: zeroed sockaddr_in is valid.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as u16;
        sin.sin_port = port.to_be();
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: sockaddr_storage is large enough for a sockaddr_in.
        unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
        (
            storage,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    } else {
        setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &1i32)?;
        let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sin6.sin6_family = libc::AF_INET6 as u16;
        sin6.sin6_port = port.to_be();
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above, for a sockaddr_in6.
        unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
        (
            storage,
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    // SAFETY: a valid address of the given length.
    check(unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) })?;
    let mut got: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut got_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: room for any address.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut got as *mut _ as *mut libc::sockaddr,
            &mut got_len,
        )
    })?;
    // Both layouts keep the port at the same offset, after the family.
    let port = u16::from_be(unsafe { (*(&got as *const _ as *const libc::sockaddr_in)).sin_port });
    Ok((fd, port))
}

impl LinuxProbeSockets {
    /// Holds `count` TCP ports (each for IPv4 and, where the host has it,
    /// IPv6) and opens the ICMP sockets that read echo replies (the probes
    /// themselves leave through the underlay's raw sockets).
    pub fn open(count: usize) -> io::Result<LinuxProbeSockets> {
        let mut ports = Vec::with_capacity(count);
        let mut held = Vec::with_capacity(count * 2);
        let mut attempts = 0;
        while ports.len() < count && attempts < count * 20 {
            attempts += 1;
            let (v4, port) = hold(libc::AF_INET, 0)?;
            match hold(libc::AF_INET6, port) {
                Ok((v6, _)) => held.push(v6),
                // Taken for IPv6 by someone else: try another port.
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                // No IPv6 at all: IPv4 alone.
                Err(_) => {}
            }
            held.push(v4);
            ports.push(port);
        }
        let icmp4 = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
        let icmp6 = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6).ok();
        if let Some(fd) = &icmp6 {
            // Echo replies (type 129) only: ICMP6_FILTER blocks a type whose
            // bit is set.
            let mut filter = [u32::MAX; 8];
            filter[129 >> 5] &= !(1u32 << (129 & 31));
            setsockopt(fd, libc::IPPROTO_ICMPV6, 1 /* ICMP6_FILTER */, &filter)?;
        }
        Ok(LinuxProbeSockets {
            ports,
            _held: held,
            icmp4,
            icmp6,
        })
    }

    /// One datagram from a raw ICMP socket, without waiting.
    fn recv(fd: &OwnedFd, buf: &mut [u8]) -> Option<(usize, IpAddr)> {
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buffers valid for the call.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n <= 0 {
            return None;
        }
        let addr = match from.ss_family as libc::c_int {
            libc::AF_INET => {
                let sin = unsafe { &*(&from as *const _ as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            _ => {
                let sin6 = unsafe { &*(&from as *const _ as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
        };
        Some((n as usize, addr))
    }
}

impl ProbeSockets for LinuxProbeSockets {
    fn ports(&self) -> Vec<u16> {
        self.ports.clone()
    }

    fn source_for(&self, dst: IpAddr) -> Option<IpAddr> {
        // Connecting a UDP socket sends nothing; the kernel picks the
        // route's source address.
        let bind: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect((dst, 9)).ok()?;
        Some(socket.local_addr().ok()?.ip())
    }

    fn echo_replies(&self, timeout: Duration, out: &mut Vec<EchoReply>) -> io::Result<()> {
        let mut fds = vec![libc::pollfd {
            fd: self.icmp4.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = &self.icmp6 {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: valid pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready <= 0 {
            return Ok(());
        }
        let at = Instant::now();
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        // SAFETY: recvfrom only writes into the buffer; reading it back is
        // limited to what it wrote.
        let buf: &mut [u8] = unsafe { &mut *(&mut buf as *mut [MaybeUninit<u8>] as *mut [u8]) };
        while let Some((n, from)) = Self::recv(&self.icmp4, buf) {
            // IPv4 raw sockets hand over the IP header too.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n >= ihl + 8 && buf[ihl] == 0 {
                let id = u16::from_be_bytes([buf[ihl + 4], buf[ihl + 5]]);
                let seq = u16::from_be_bytes([buf[ihl + 6], buf[ihl + 7]]);
                out.push(EchoReply { from, id, seq, at });
            }
        }
        if let Some(fd) = &self.icmp6 {
            while let Some((n, from)) = Self::recv(fd, buf) {
                if n >= 8 && buf[0] == 129 {
                    let id = u16::from_be_bytes([buf[4], buf[5]]);
                    let seq = u16::from_be_bytes([buf[6], buf[7]]);
                    out.push(EchoReply { from, id, seq, at });
                }
            }
        }
        Ok(())
    }
}
