//! The Oasis egress classifier (TC/TCX on each uplink).
//!
//! For every packet leaving the host it decides: pass it untouched, or
//! redirect it to the broker's TUN device. A flow's first packet is matched
//! against the header rules; the verdict is cached per 5-tuple so later
//! packets cost one hash lookup. Anything unexpected passes: Oasis must never
//! be the reason a packet is lost.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod classifier;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod exit;
#[cfg(target_arch = "bpf")]
mod headers;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod measure;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;

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
