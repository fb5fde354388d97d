//! What both programs read from packets: link-layer constants and a
//! bounds-checked reader.

use aya_ebpf::programs::TcContext;

/// Uplinks are Ethernet-like: a 14-byte link header before the IP header.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

/// Reads a `T` at a constant `offset` from the packet start: straight from
/// the linear data when it is there (no helper call), else through
/// bpf_skb_load_bytes. Offsets that vary per packet must use `ctx.load`:
/// the verifier cannot follow this bounds check for them.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bounds check above is what the verifier needs to see.
        Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
    } else {
        ctx.load::<T>(offset).ok()
    }
}

/// An IPv4 address in the first 4 of 16 bytes, as keys hold it. Built
/// whole: zeroing an array first may compile to a memset call, which a BPF
/// function cannot make (it would return a stack pointer).
#[inline(always)]
pub fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}
