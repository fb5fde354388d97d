//! Reading a packet's 5-tuple, shared by the egress classifier and the
//! ingress NAT.

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::TcContext};
use oasis_common::{FAMILY_V4, FAMILY_V6, FlowKey, FragKey, icmp_echo, icmp_error};

use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, read};

pub use oasis_common::proto::{
    ICMP as IPPROTO_ICMP, ICMPV6 as IPPROTO_ICMPV6, IPV6_FRAGMENT as IPPROTO_FRAGMENT, SCTP as IPPROTO_SCTP,
    TCP as IPPROTO_TCP, UDP as IPPROTO_UDP, UDPLITE as IPPROTO_UDPLITE,
};
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// CLOCK_MONOTONIC at the kernel's tick (a few ms): all the heartbeat and
/// the flow timeouts need, at a fraction of the precise clock's cost.
#[inline(always)]
pub fn coarse_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[repr(C)]
pub struct Parsed {
    pub key: FlowKey,
    /// Where the transport header starts, from the start of the frame.
    pub l4_offset: usize,
    /// A TCP SYN without ACK: a new connection, which always re-checks the rules.
    pub new_connection: bool,
    /// A non-first fragment (IPv4, or IPv6 with a fragment header): no
    /// transport header at all.
    pub fragment: bool,
    /// A TCP segment's flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// The first fragment of a fragmented datagram (it has the ports).
    pub first_fragment: bool,
    /// The IP identification of a fragment, first or not.
    pub frag_id: u32,
    /// An ICMP error quoting a packet: the key is then the quoted packet's
    /// flow as a packet in this one's direction would have it (the quoted
    /// packet's key swapped), so the error follows that flow.
    pub icmp_error: bool,
    /// The ICMP type (ICMP and ICMPv6 packets).
    pub icmp_type: u8,
    /// Where the quoted packet of an ICMP error starts.
    pub quote_offset: usize,
}

impl Parsed {
    /// How this fragment's datagram is known.
    #[inline(always)]
    pub fn frag_key(&self) -> FragKey {
        FragKey {
            src: self.key.src,
            dst: self.key.dst,
            id: self.frag_id,
            proto: self.key.proto,
            family: self.key.family,
            _pad: [0; 2],
        }
    }

    /// Zeroes `slot` in place, a word at a time, and returns it. `Default`
    /// (or any zero value moved into place) compiles to a call of a
    /// byte-by-byte memset on this target: the costliest part of the whole
    /// program for a packet it passes.
    #[inline(always)]
    pub fn zero_in(slot: &mut core::mem::MaybeUninit<Parsed>) -> &mut Parsed {
        let words = slot.as_mut_ptr() as *mut u64;
        let mut i = 0;
        while i < core::mem::size_of::<Parsed>() / 8 {
            // SAFETY: within the value; volatile, so the stores are not
            // merged back into a memset call.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
            i += 1;
        }
        // SAFETY: every byte is zero, a valid value of each field.
        unsafe { slot.assume_init_mut() }
    }
}

/// Reads the 5-tuple into `out`; ports are 0 for packets without them.
/// False for what is not IPv4 or IPv6. A separate BPF function writing
/// straight into the caller's value: the BPF backend hardly reuses stack
/// slots, and every copy of a key costs the whole call chain's 512 bytes.
#[inline(never)]
pub fn parse_into(ctx: &TcContext, out: &mut Parsed) -> bool {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let key = &mut out.key;
    match ethertype {
        ETH_P_IP => {
            // version/ihl, tos, length, id, fragment, ttl, protocol, checksum, source, destination
            let Some(head) = read::<[u8; 20]>(ctx, ETH_HLEN) else {
                return false;
            };
            let ihl = ((head[0] & 0x0f) as usize) * 4;
            if head[0] >> 4 != 4 || ihl < 20 {
                return false;
            }
            key.proto = head[9];
            key.src[..4].copy_from_slice(&head[12..16]);
            key.dst[..4].copy_from_slice(&head[16..20]);
            key.family = FAMILY_V4;
            out.l4_offset = ETH_HLEN + ihl;
            // Non-first fragments carry no ports.
            let fragment = u16::from_be_bytes([head[6], head[7]]);
            out.fragment = fragment & 0x1fff != 0;
            out.first_fragment = fragment & 0x3fff == 0x2000;
            out.frag_id = u32::from(u16::from_be_bytes([head[4], head[5]]));
        }
        ETH_P_IPV6 => {
            let Some(head) = read::<[u8; 8]>(ctx, ETH_HLEN) else {
                return false;
            };
            key.proto = head[6];
            let Some(src) = read::<[u8; 16]>(ctx, ETH_HLEN + 8) else {
                return false;
            };
            key.src = src;
            let Some(dst) = read::<[u8; 16]>(ctx, ETH_HLEN + 24) else {
                return false;
            };
            key.dst = dst;
            key.family = FAMILY_V6;
            out.l4_offset = ETH_HLEN + 40;
            if key.proto == IPPROTO_FRAGMENT {
                // next header, reserved, offset (13 bits) and M, identification
                let Some(frag) = read::<[u8; 8]>(ctx, ETH_HLEN + 40) else {
                    return false;
                };
                key.proto = frag[0];
                let offset = u16::from_be_bytes([frag[2], frag[3]]);
                out.fragment = offset & 0xfff8 != 0;
                out.first_fragment = offset & 0xfff9 == 1;
                out.frag_id = u32::from_be_bytes([frag[4], frag[5], frag[6], frag[7]]);
                out.l4_offset = ETH_HLEN + 48;
            }
        }
        _ => return false,
    }
    if !out.fragment && (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6) {
        return parse_icmp(ctx, out);
    }
    if !out.fragment
        && matches!(
            key.proto,
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
        )
    {
        // One load: ports, and for TCP the flags byte 13 bytes in; read in
        // place when the transport header is where it nearly always is
        // (no IPv4 options), the verifier needing a constant offset.
        let direct = match out.l4_offset {
            34 => read::<[u8; 14]>(ctx, 34),
            54 => read::<[u8; 14]>(ctx, 54),
            62 => read::<[u8; 14]>(ctx, 62),
            _ => None,
        };
        let Some(head) = direct.or_else(|| ctx.load::<[u8; 14]>(out.l4_offset).ok()) else {
            // A UDP header is only 8 bytes: a short datagram may end early.
            let Ok(ports) = ctx.load::<[u8; 4]>(out.l4_offset) else {
                return false;
            };
            key.sport = u16::from_be_bytes([ports[0], ports[1]]);
            key.dport = u16::from_be_bytes([ports[2], ports[3]]);
            return true;
        };
        if key.proto == IPPROTO_TCP {
            out.tcp_flags = head[13];
            out.new_connection = head[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
        }
        key.sport = u16::from_be_bytes([head[0], head[1]]);
        key.dport = u16::from_be_bytes([head[2], head[3]]);
    }
    true
}

/// An ICMP or ICMPv6 packet: an echo is keyed by its identifier (in both
/// ports), an error by the flow of the packet it quotes. Anything else, or
/// what cannot be read, keeps the plain key (no ports). A separate BPF
/// function, so only ICMP pays for it.
#[inline(never)]
fn parse_icmp(ctx: &TcContext, out: &mut Parsed) -> bool {
    // type, code, checksum, then an echo's identifier and sequence
    let Ok(head) = ctx.load::<[u8; 8]>(out.l4_offset) else {
        return true;
    };
    let proto = out.key.proto;
    out.icmp_type = head[0];
    if icmp_echo(proto, head[0]) {
        let id = u16::from_be_bytes([head[4], head[5]]);
        out.key.sport = id;
        out.key.dport = id;
        return true;
    }
    if !icmp_error(proto, head[0]) {
        return true;
    }
    let quote = out.l4_offset + 8;
    let key = &mut out.key;
    // The quoted packet's addresses, protocol and ports, swapped as they
    // are written into the key.
    let ports_at = if key.family == FAMILY_V4 {
        let Ok(ip) = ctx.load::<[u8; 20]>(quote) else {
            return true;
        };
        if ip[0] >> 4 != 4 {
            return true;
        }
        key.proto = ip[9];
        key.dst[..4].copy_from_slice(&ip[12..16]);
        key.src[..4].copy_from_slice(&ip[16..20]);
        quote + ((ip[0] & 0x0f) as usize) * 4
    } else {
        let Ok(next) = ctx.load::<[u8; 8]>(quote) else {
            return true;
        };
        let (Ok(src), Ok(dst)) = (ctx.load::<[u8; 16]>(quote + 8), ctx.load::<[u8; 16]>(quote + 24)) else {
            return true;
        };
        if next[0] >> 4 != 6 {
            return true;
        }
        key.proto = next[6];
        key.dst = src;
        key.src = dst;
        quote + 40
    };
    key.sport = 0;
    key.dport = 0;
    if matches!(
        key.proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    ) && let Ok(ports) = ctx.load::<[u8; 4]>(ports_at)
    {
        key.dport = u16::from_be_bytes([ports[0], ports[1]]);
        key.sport = u16::from_be_bytes([ports[2], ports[3]]);
    } else if (key.proto == IPPROTO_ICMP || key.proto == IPPROTO_ICMPV6)
        && let Ok(echo) = ctx.load::<[u8; 6]>(ports_at)
        && icmp_echo(key.proto, echo[0])
    {
        let id = u16::from_be_bytes([echo[4], echo[5]]);
        key.sport = id;
        key.dport = id;
    }
    out.icmp_error = true;
    out.quote_offset = quote;
    true
}
