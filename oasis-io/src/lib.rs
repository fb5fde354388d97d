//! Packet I/O that the Oasis broker and the overlay exit node share.
//!
//! - [`packet`]: rewriting raw IP packets in place (addresses, ports, MSS)
//!   with incremental checksums, and ICMP errors; no OS in it.
//! - `linux`: the TUN device with offload, raw IP sockets, and batched
//!   datagram I/O (`sendmmsg`/`recvmmsg` with UDP segmentation offload), each
//!   keeping its buffers between calls so a steady stream allocates nothing.
pub mod datagram;
pub mod packet;

#[cfg(target_os = "linux")]
pub mod linux;
