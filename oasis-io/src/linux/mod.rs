//! Linux packet I/O: the TUN device, raw IP sockets, batched datagrams.
pub mod gro;
pub mod mmsg;
pub mod raw;
pub mod segment;
pub mod tun;
