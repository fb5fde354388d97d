//! The exit node's TC ingress program. Replies to flows the exit node has
//! NATed arrive addressed to the exit host itself; left to the host's stack
//! they would meet no socket and draw TCP resets. This program hands them to
//! the exit node's TUN instead, and passes everything else untouched. The
//! flows the exit leaves to the kernel it carries both ways first
//! (`exit_fast.rs`).

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::generated::bpf_redirect, macros::classifier, programs::TcContext,
};

use oasis_common::proto::{ICMP, ICMPV6, IPV6_FRAGMENT, TCP, UDP};
use oasis_common::{ExitSettings, FAMILY_V4, FAMILY_V6, FragKey};

use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, read, v4_in_16};
use crate::maps::{EXIT_FRAGMENTS, EXIT_SETTINGS};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;

#[classifier]
pub fn oasis_exit_ingress(ctx: TcContext) -> i32 {
    if let Some(settings) = EXIT_SETTINGS.get(0)
        && settings.fast_port != 0
        && let Some(action) = crate::exit_fast::ingress(&ctx, settings)
    {
        return action;
    }
    match steer(&ctx) {
        Some(ifindex) => {
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        None => TC_ACT_OK as i32,
    }
}

/// The NAT port of the packet an ICMP error quotes (its source port, or
/// its echo identifier), when the exit sent that packet.
#[inline(always)]
fn quoted_port(ctx: &TcContext, settings: &ExitSettings, v4: bool, at: usize) -> Option<u16> {
    let (proto, l4) = if v4 {
        let quoted: [u8; 20] = ctx.load(at).ok()?;
        if quoted[12..16] != settings.v4 {
            return None;
        }
        (quoted[9], at + ((quoted[0] & 0x0f) as usize) * 4)
    } else {
        let quoted: [u8; 40] = ctx.load(at).ok()?;
        if quoted[8..24] != settings.v6 {
            return None;
        }
        (quoted[6], at + 40)
    };
    let head: [u8; 6] = ctx.load(l4).ok()?;
    match proto {
        TCP | UDP => Some(u16::from_be_bytes([head[0], head[1]])),
        // An echo request the exit sent: its identifier.
        1 if head[0] == 8 => Some(u16::from_be_bytes([head[4], head[5]])),
        58 if head[0] == 128 => Some(u16::from_be_bytes([head[4], head[5]])),
        _ => None,
    }
}

/// Where a reply's fragment stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    Whole,
    First,
    Later,
}

/// The TUN's ifindex when the packet is a reply to a NATed flow, or a
/// later fragment of one whose first fragment was. A function of its own:
/// its stack is not in the fast path's call chain (the verifier allows
/// 512 bytes for a chain).
#[inline(never)]
fn steer(ctx: &TcContext) -> Option<u32> {
    let settings = EXIT_SETTINGS.get(0)?;
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    // Built whole in each arm: zeroing a key first would be a memset,
    // which this function may not call (it would return a stack pointer).
    let (piece, l4_offset, datagram) = match ethertype {
        ETH_P_IP if settings.has_v4 != 0 => {
            let head: [u8; 20] = read(ctx, ETH_HLEN)?;
            let ihl = ((head[0] & 0x0f) as usize) * 4;
            if head[16..20] != settings.v4 || ihl < 20 {
                return None;
            }
            let field = u16::from_be_bytes([head[6], head[7]]);
            let datagram = FragKey {
                src: v4_in_16([head[12], head[13], head[14], head[15]]),
                dst: v4_in_16([head[16], head[17], head[18], head[19]]),
                id: u32::from(u16::from_be_bytes([head[4], head[5]])),
                proto: head[9],
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            let piece = match (field & 0x1fff != 0, field & 0x2000 != 0) {
                (true, _) => Piece::Later,
                (false, true) => Piece::First,
                (false, false) => Piece::Whole,
            };
            (piece, ETH_HLEN + ihl, datagram)
        }
        ETH_P_IPV6 if settings.has_v6 != 0 => {
            let head: [u8; 40] = read(ctx, ETH_HLEN)?;
            if head[24..40] != settings.v6 {
                return None;
            }
            let src: [u8; 16] = read(ctx, ETH_HLEN + 8)?;
            let mut datagram = FragKey {
                src,
                dst: settings.v6,
                id: 0,
                proto: head[6],
                family: FAMILY_V6,
                _pad: [0; 2],
            };
            if head[6] == IPV6_FRAGMENT {
                let frag: [u8; 8] = read(ctx, ETH_HLEN + 40)?;
                let field = u16::from_be_bytes([frag[2], frag[3]]);
                datagram.proto = frag[0];
                datagram.id = u32::from_be_bytes([frag[4], frag[5], frag[6], frag[7]]);
                let piece = if field & 0xfff8 != 0 {
                    Piece::Later
                } else {
                    Piece::First
                };
                (piece, ETH_HLEN + 48, datagram)
            } else {
                (Piece::Whole, ETH_HLEN + 40, datagram)
            }
        }
        _ => return None,
    };
    if piece == Piece::Later {
        // SAFETY: plain bytes.
        return unsafe { EXIT_FRAGMENTS.get(&datagram) }.map(|_| settings.tun_ifindex);
    }
    let proto = datagram.proto;
    let port = match proto {
        TCP | UDP => {
            let ports: [u8; 4] = ctx.load(l4_offset).ok()?;
            u16::from_be_bytes([ports[2], ports[3]])
        }
        ICMP | ICMPV6 => {
            // type, code, checksum, identifier
            let head: [u8; 6] = ctx.load(l4_offset).ok()?;
            let reply = if proto == ICMP {
                ICMP_ECHO_REPLY
            } else {
                ICMPV6_ECHO_REPLY
            };
            let error = if proto == ICMP {
                matches!(head[0], 3 | 11 | 12)
            } else {
                matches!(head[0], 1..=4)
            };
            if error {
                quoted_port(ctx, settings, proto == ICMP, l4_offset + 8)?
            } else if head[0] == reply {
                u16::from_be_bytes([head[4], head[5]])
            } else {
                return None;
            }
        }
        _ => return None,
    };
    if !(settings.port_first <= port && port <= settings.port_last) {
        return None;
    }
    if piece == Piece::First {
        let _ = EXIT_FRAGMENTS.insert(&datagram, &1, 0);
    }
    Some(settings.tun_ifindex)
}
