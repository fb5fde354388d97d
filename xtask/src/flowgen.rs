//! `cargo xtask flowgen` (hidden; the benchmark runs it inside the
//! client's namespace): sends UDP datagrams, each of a flow never seen
//! before, as fast as one core can, through a raw socket so that every
//! source port and destination port pair is a new 5-tuple without a
//! socket per flow. Prints how many it sent.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Datagrams per sendmmsg.
const BATCH: usize = 256;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source address of the datagrams (the sender's own).
    #[arg(long)]
    src: Ipv4Addr,
    #[arg(long)]
    dst: Ipv4Addr,
    /// Destination ports to spread the flows over, inclusive: `A-B`.
    #[arg(long)]
    ports: String,
    #[arg(long)]
    seconds: f64,
}

/// An IPv4/UDP datagram with an empty payload's worth of bytes.
fn datagram(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    // The kernel fills the IPv4 checksum of raw sends; a UDP checksum of
    // zero means "none".
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&12u16.to_be_bytes());
    p[28..32].copy_from_slice(b"flow");
    p
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (first, last) = args
        .ports
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .filter(|(a, b)| a <= b)
        .context("--ports: give a range such as 30000-30015")?;
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {} (run as root)", std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own from here on.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_in is plain data.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as u16;
    to.sin_addr.s_addr = u32::from_ne_bytes(args.dst.octets());
    let ports = u32::from(last - first) + 1;
    let mut packets = vec![[0u8; 32]; BATCH];
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let (mut sent, mut next) = (0u64, 0u32);
    while Instant::now() < deadline {
        for packet in packets.iter_mut() {
            // Source ports 1024-65535 under each destination port, so no
            // 5-tuple repeats for 64,512 × ports flows.
            let sport = 1024 + (next / ports) % 64_512;
            let dport = first as u32 + next % ports;
            *packet = datagram(args.src, args.dst, sport as u16, dport as u16);
            next = next.wrapping_add(1);
        }
        iovecs.clear();
        iovecs.extend(packets.iter().map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        }));
        headers.clear();
        for iov in iovecs.iter_mut() {
            // SAFETY: mmsghdr is plain data.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_name = (&mut to) as *mut _ as *mut _;
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            headers.push(header);
        }
        // SAFETY: the headers point at buffers alive for the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    println!("{sent}");
    Ok(())
}
