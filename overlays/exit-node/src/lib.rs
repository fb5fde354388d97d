//! The exit node's decisions, apart from its sockets and its kernel
//! program: what becomes of each datagram and packet (`core`), who may use
//! it (`clients`, and `wg` for clients that speak WireGuard), the NAT
//! (`nat`), the priority queues (`sched`) and what the kernel's fast path
//! carries (`fast`). The
//! `oasis-exit` binary is the I/O around them; the fuzz targets drive them
//! directly.

pub mod clients;
pub mod core;
pub mod fast;
pub mod nat;
pub mod sched;
pub mod wg;
