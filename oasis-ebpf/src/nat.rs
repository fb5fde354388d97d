//! Fake-address flows carried by the underlay, rewritten in the kernel.
//!
//! An application that resolved a name claimed by a name rule talks to a
//! fake address. The broker sees the flow's first packet, picks the real
//! address, and installs a NAT entry for each direction; from then on the
//! egress classifier rewrites fake→real here and the uplinks' ingress
//! program rewrites real→fake on replies, so the flow costs no user space.
//! Checksums are updated incrementally with the kernel's csum helpers, which
//! also keep offloaded (partial) checksums right.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use oasis_common::{FAMILY_V4, NAT_CLOSING, NAT_MEASURE, NatEntry, stat};

use crate::encap::{self, Fast};
use crate::headers::ETH_HLEN;
use crate::maps::bump;
use crate::maps::{
    ENCAP_ACTIVE, MONITOR_ACTIVE, NAT_ACTIVE, NAT_FRAGMENTS, NAT_IN, NAT_OUT, PINNED_ACTIVE, SETTINGS,
};
use crate::measure;
use crate::parse::coarse_ns;
use crate::parse::{
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Parsed, TCP_FLAG_FIN, TCP_FLAG_RST, parse_into,
};

/// Refresh an entry's timestamp at most this often.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Rewrites an outgoing packet of a fake-address flow that has a NAT entry.
/// Returns false when there is none (the broker must see the packet).
/// A separate BPF function: inlined, its buffers would push the
/// classifier past the 512-byte stack.
#[inline(never)]
pub fn egress(ctx: &TcContext, parsed: &mut Parsed) -> bool {
    // A fragmented datagram goes to the broker whole: it follows the
    // later fragments, which have no ports to find an entry by. So does
    // an ICMP error this host sends about the flow: the broker rewrites
    // the packet it quotes too.
    if parsed.fragment || parsed.first_fragment || parsed.icmp_error {
        return false;
    }
    let key = &parsed.key;
    let Some(entry) = NAT_OUT.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup; plain integers and bytes.
    let (real, flags) = unsafe {
        refresh(entry, parsed.tcp_flags);
        ((*entry).addr, (*entry).flags)
    };
    // A measured flow's SYN sent again goes to the broker: unanswered, the
    // Monitor moves the new connection to another carrier.
    if flags & NAT_MEASURE != 0 && parsed.new_connection {
        return false;
    }
    if rewrite(ctx, parsed, Field::Destination, &key.dst, &real).is_some() {
        bump(stat::NAT_EGRESS);
        if flags & NAT_MEASURE != 0 {
            // Measured flows are keyed by the real destination.
            parsed.key.dst = real;
            measure::egress(ctx, parsed);
        }
    }
    true
}

/// Replies of in-kernel NAT flows: the real source becomes the fake one;
/// answers to flows measured for the Monitor; and the FINs and RSTs of
/// claimed flows left to the kernel (a server may end a connection with a
/// reset this host never answers). Every packet the uplinks receive passes
/// here: while there is none of these, it costs three array reads.
#[classifier]
pub fn oasis_ingress(ctx: TcContext) -> i32 {
    let nat = NAT_ACTIVE.get(0).is_some_and(|flows| *flows != 0);
    let monitor = MONITOR_ACTIVE.get(0).is_some_and(|flows| *flows != 0);
    let pinned = PINNED_ACTIVE.get(0).is_some_and(|flows| *flows != 0);
    let encap = ENCAP_ACTIVE.get(0).is_some_and(|flows| *flows != 0);
    if !nat && !monitor && !pinned && !encap {
        return TC_ACT_OK as i32;
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let parsed = Parsed::zero_in(&mut slot);
    if !parse_into(&ctx, parsed) {
        return TC_ACT_OK as i32;
    }
    if encap && let Some(settings) = SETTINGS.get(0) {
        match encap::ingress(&ctx, parsed, settings.overlay_port) {
            Fast::Done | Fast::Redirect(_) => return TC_ACT_OK as i32,
            Fast::Broken => return TC_ACT_SHOT as i32,
            Fast::Broker => {}
        }
    }
    if pinned && parsed.key.proto == IPPROTO_TCP && parsed.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        crate::pins::closing(&parsed.key.reversed());
    }
    // Measured before the NAT rewrites the source: measured flows are
    // keyed by real addresses.
    if monitor {
        measure::ingress(&ctx, parsed);
    }
    if !nat {
        return TC_ACT_OK as i32;
    }
    if parsed.fragment {
        // A later fragment of a reply: the fake source its first got.
        // SAFETY: plain bytes.
        if let Some(fake) = unsafe { NAT_FRAGMENTS.get(&parsed.frag_key()) }.copied()
            && rewrite(&ctx, parsed, Field::Source, &parsed.key.src, &fake).is_some()
        {
            bump(stat::NAT_INGRESS);
        }
        return TC_ACT_OK as i32;
    }
    if parsed.icmp_error {
        // An error about a flow (a router's "fragmentation needed", a
        // server's port unreachable): the packet it quotes left with the
        // real address, which the application never knew.
        // SAFETY: plain bytes.
        if let Some(fake) = unsafe { NAT_IN.get(&parsed.key) }.map(|entry| entry.addr)
            && rewrite_error(&ctx, parsed, &fake).is_some()
        {
            bump(stat::NAT_INGRESS);
        }
        return TC_ACT_OK as i32;
    }
    if let Some(entry) = NAT_IN.get_ptr_mut(&parsed.key) {
        // SAFETY: pointer from a successful lookup.
        let fake = unsafe {
            refresh(entry, parsed.tcp_flags);
            (*entry).addr
        };
        if rewrite(&ctx, parsed, Field::Source, &parsed.key.src, &fake).is_some() {
            bump(stat::NAT_INGRESS);
            if parsed.first_fragment {
                let _ = NAT_FRAGMENTS.insert(&parsed.frag_key(), &fake, 0);
            }
        }
    }
    TC_ACT_OK as i32
}

/// Marks the entry alive, and ending when a TCP FIN or RST goes by (the
/// broker then ends the flow soon after it goes quiet, not hours later).
#[inline(always)]
unsafe fn refresh(entry: *mut NatEntry, tcp_flags: u8) {
    let now = coarse_ns();
    // SAFETY: the caller's pointer is valid.
    unsafe {
        if now.saturating_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        if tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 && (*entry).flags & NAT_CLOSING == 0 {
            (*entry).flags |= NAT_CLOSING;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Source,
    Destination,
}

/// Replaces one address and fixes the IPv4 header checksum and the
/// transport checksum (whose pseudo-header holds the address).
#[inline(never)]
fn rewrite(ctx: &TcContext, parsed: &Parsed, field: Field, old: &[u8; 16], new: &[u8; 16]) -> Option<()> {
    // Where the transport checksum sits, if the protocol has one over a
    // pseudo-header. ICMPv4's does not cover addresses, and a non-first
    // fragment has no transport header.
    let (key, l4_offset) = (&parsed.key, parsed.l4_offset);
    let csum_offset = match key.proto {
        _ if parsed.fragment => None,
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        IPPROTO_ICMPV6 => Some(2),
        _ => None,
    };
    // A UDP checksum of 0 means "none" (IPv4) and must stay 0.
    let mangled_zero = if key.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let v4 = key.family == FAMILY_V4;
    let word = |bytes: &[u8; 16], i: usize| {
        u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as u64
    };
    // The pseudo-header sum changes by each 32-bit word of the address.
    if let Some(offset) = csum_offset {
        let len = if v4 { 4 } else { 16 };
        let mut i = 0;
        while i < len {
            ctx.l4_csum_replace(
                l4_offset + offset,
                word(old, i),
                word(new, i),
                BPF_F_PSEUDO_HDR as u64 | mangled_zero | 4,
            )
            .ok()?;
            i += 4;
        }
    }
    if v4 {
        ctx.l3_csum_replace(ETH_HLEN + 10, word(old, 0), word(new, 0), 4)
            .ok()?;
        let at = if field == Field::Source { 12 } else { 16 };
        let bytes = [new[0], new[1], new[2], new[3]];
        ctx.store(ETH_HLEN + at, &bytes, 0).ok()?;
    } else {
        let at = if field == Field::Source { 8 } else { 24 };
        ctx.store(ETH_HLEN + at, new, 0).ok()?;
    }
    Some(())
}

/// An ICMP error about an in-kernel NAT flow, arriving: the quoted packet's
/// destination (the real address) becomes the fake one, and so does the
/// error's source when the real host sent it. IPv4: the quoted header's
/// checksum changes with it, which leaves the ICMP checksum's sum over the
/// message as it was. ICMPv6: its checksum covers the quoted address and,
/// through the pseudo-header, the source.
#[inline(never)]
fn rewrite_error(ctx: &TcContext, parsed: &Parsed, fake: &[u8; 16]) -> Option<()> {
    let key = &parsed.key;
    let real = &key.src;
    let quote = parsed.quote_offset;
    let word = |bytes: &[u8; 16], i: usize| {
        u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as u64
    };
    let icmp_csum = parsed.l4_offset + 2;
    if key.family == FAMILY_V4 {
        ctx.l3_csum_replace(quote + 10, word(real, 0), word(fake, 0), 4)
            .ok()?;
        ctx.store(quote + 16, &[fake[0], fake[1], fake[2], fake[3]], 0)
            .ok()?;
        let outer = ctx.load::<[u8; 4]>(ETH_HLEN + 12).ok()?;
        if outer == [real[0], real[1], real[2], real[3]] {
            ctx.l3_csum_replace(ETH_HLEN + 10, word(real, 0), word(fake, 0), 4)
                .ok()?;
            ctx.store(ETH_HLEN + 12, &[fake[0], fake[1], fake[2], fake[3]], 0)
                .ok()?;
        }
    } else {
        let mut i = 0;
        while i < 16 {
            ctx.l4_csum_replace(icmp_csum, word(real, i), word(fake, i), 4)
                .ok()?;
            i += 4;
        }
        ctx.store(quote + 24, fake, 0).ok()?;
        let outer = ctx.load::<[u8; 16]>(ETH_HLEN + 8).ok()?;
        if outer == *real {
            let mut i = 0;
            while i < 16 {
                ctx.l4_csum_replace(
                    icmp_csum,
                    word(real, i),
                    word(fake, i),
                    BPF_F_PSEUDO_HDR as u64 | 4,
                )
                .ok()?;
                i += 4;
            }
            ctx.store(ETH_HLEN + 8, fake, 0).ok()?;
        }
    }
    Some(())
}
