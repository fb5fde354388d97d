//! Linux packet I/O: the TUN device, raw IP sockets, batched datagrams.
pub mod mmsg;
pub mod raw;
pub mod tun;
