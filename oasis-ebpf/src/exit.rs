//! The exit node's TC ingress program. Replies to flows the exit node has
//! NATed arrive addressed to the exit host itself; left to the host's stack
//! they would meet no socket and draw TCP resets. This program hands them to
//! the exit node's TUN instead, and passes everything else untouched.

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::generated::bpf_redirect, macros::classifier, programs::TcContext,
};

use crate::maps::EXIT_SETTINGS;

use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, read};
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;

#[classifier]
pub fn oasis_exit_ingress(ctx: TcContext) -> i32 {
    match steer(&ctx) {
        Some(ifindex) => {
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        None => TC_ACT_OK as i32,
    }
}

/// The TUN's ifindex when the packet is a reply to a NATed flow.
#[inline(always)]
fn steer(ctx: &TcContext) -> Option<u32> {
    let settings = EXIT_SETTINGS.get(0)?;
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let (proto, l4_offset) = match ethertype {
        ETH_P_IP if settings.has_v4 != 0 => {
            let head: [u8; 20] = read(ctx, ETH_HLEN)?;
            let ihl = ((head[0] & 0x0f) as usize) * 4;
            let fragment = u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0;
            if head[16..20] != settings.v4 || fragment || ihl < 20 {
                return None;
            }
            (head[9], ETH_HLEN + ihl)
        }
        ETH_P_IPV6 if settings.has_v6 != 0 => {
            let head: [u8; 40] = read(ctx, ETH_HLEN)?;
            if head[24..40] != settings.v6 {
                return None;
            }
            (head[6], ETH_HLEN + 40)
        }
        _ => return None,
    };
    let port = match proto {
        6 | 17 => {
            let ports: [u8; 4] = ctx.load(l4_offset).ok()?;
            u16::from_be_bytes([ports[2], ports[3]])
        }
        1 | 58 => {
            // type, code, checksum, identifier
            let head: [u8; 6] = ctx.load(l4_offset).ok()?;
            let reply = if proto == 1 {
                ICMP_ECHO_REPLY
            } else {
                ICMPV6_ECHO_REPLY
            };
            if head[0] != reply {
                return None;
            }
            u16::from_be_bytes([head[4], head[5]])
        }
        _ => return None,
    };
    (settings.port_first <= port && port <= settings.port_last).then_some(settings.tun_ifindex)
}
