//! The exit node's decisions, apart from its sockets and its kernel
//! program: what becomes of each datagram and packet (`core`), who may use
//! it (`clients`), the NAT (`nat`) and the priority queues (`sched`). The
//! `oasis-exit` binary is the I/O around them; the fuzz targets drive them
//! directly.

pub mod clients;
pub mod core;
pub mod nat;
pub mod sched;
