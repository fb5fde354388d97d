//! The Oasis broker: rule handling, the daemon and its control interface.
//!
//! Decisions (rules, their compilation into classifier maps, the flow table,
//! configuration) are plain types tested without privileges; the Linux shell
//! around them (eBPF maps, TUN, raw sockets) lives in `platform`.
pub mod compile;
pub mod config;
pub mod control;
#[cfg(target_os = "linux")]
pub mod daemon;
pub mod dns;
pub mod fake;
pub mod fake_flows;
pub mod flow;
pub mod names;
pub mod overlay;
pub mod packet;
pub mod platform;
pub mod render;
pub mod rules;
pub mod shared;

/// The compiled kernel programs, built by this crate's build script.
#[cfg(target_os = "linux")]
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oasis"));
