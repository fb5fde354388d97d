//! The compiled kernel programs of `oasis-ebpf`, built by this crate's build
//! script with the nightly toolchain and bpf-linker (`cargo xtask setup`
//! installs both). The broker and the exit node load them from here, so the
//! object is built once and neither depends on the other.
#![cfg_attr(not(target_os = "linux"), no_std)]

/// The object file, aligned for aya's ELF parser.
#[cfg(target_os = "linux")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oasis-ebpf"));
