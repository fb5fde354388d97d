//! Oasis's kernel programs, one object for the broker and the exit node:
//!
//! - `oasis_egress` (TC egress of each uplink): the classifier. A flow's
//!   first packet is matched against the header rules and the fake pools;
//!   the verdict is cached per 5-tuple, so later packets cost one lookup. It
//!   passes a packet, redirects it to the broker's TUN, or rewrites a fake
//!   destination in place (the in-kernel NAT, `nat.rs`); it also measures
//!   flows the Monitor left to the kernel (`measure.rs`), and wraps the
//!   packets of overlay flows the broker left to it (`encap.rs`).
//! - `oasis_ingress` (TC ingress of each uplink): replies of in-kernel NAT
//!   flows get their fake source back; answers of measured flows are timed;
//!   overlay flows' datagrams from their entry nodes are opened.
//! - eight cgroup socket hooks (`dns.rs`): DNS queries to the broker;
//!   `connect` and `sendmsg` also record which process a socket is
//!   for the rules by application (`owner.rs`).
//! - `oasis_exit_ingress` (the exit node's uplink): replies for the exit's
//!   clients to its TUN (`exit.rs`), and the flows the exit leaves to the
//!   kernel carried both ways (`exit_fast.rs`).
//!
//! Anything unexpected passes: Oasis must never be the reason a packet is
//! lost.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod classifier;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod exit;
#[cfg(target_arch = "bpf")]
mod exit_fast;
#[cfg(target_arch = "bpf")]
mod headers;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod measure;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod owner;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod pins;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("oasis-ebpf builds for bpfel-unknown-none; the broker's build script builds it");
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
