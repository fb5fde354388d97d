//! DNS interception at the socket layer (cgroup sock_addr hooks).
//!
//! Every query to port 53, over UDP or TCP, IPv4 or IPv6, whatever server
//! the host's resolver names, is sent to the broker's listener on loopback
//! instead: `connect` and `sendmsg` swap the destination, and `recvmsg` and
//! `getpeername` swap the broker's address back to the server the
//! application asked for, so resolvers that check where answers come from
//! (glibc does) accept them. Working on sockets rather than packets gives
//! TCP queries a real TCP peer and costs nothing per packet.
//!
//! Nothing is redirected when the broker or its DNS service is stuck (the
//! DNS heartbeat is stale), for the broker's own upstream queries, or for
//! sockets of another network namespace, where the broker's loopback
//! listener does not exist. Queries to a caching stub on this host
//! (dnsmasq, unbound, systemd-resolved on a loopback address) are taken
//! too: a stub running outside the redirected cgroup would otherwise hand
//! the cgroup's processes the real addresses of claimed names. The broker
//! asks the stub in their place (its own sockets are left alone), so the
//! stub's own names keep resolving.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use oasis_common::{DnsOriginal, DnsSettings, FAMILY_V4, FAMILY_V6, HEARTBEAT_DNS};

use crate::maps::{DNS_ORIGINAL, DNS_SETTINGS, DNS_SYSTEM, HEARTBEAT, SETTINGS};

const DNS_PORT: u16 = 53;
const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MAPPED_LOOPBACK: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
/// A hook that returns 1 lets the call go on (with the rewritten address).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn oasis_dns_connect4(ctx: SockAddrContext) -> i32 {
    crate::owner::remember_app(&ctx);
    redirect_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn oasis_dns_sendmsg4(ctx: SockAddrContext) -> i32 {
    crate::owner::remember_app(&ctx);
    redirect_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn oasis_dns_connect6(ctx: SockAddrContext) -> i32 {
    crate::owner::remember_app(&ctx);
    redirect_v6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn oasis_dns_sendmsg6(ctx: SockAddrContext) -> i32 {
    crate::owner::remember_app(&ctx);
    redirect_v6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn oasis_dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn oasis_dns_peer4(ctx: SockAddrContext) -> i32 {
    restore_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn oasis_dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn oasis_dns_peer6(ctx: SockAddrContext) -> i32 {
    restore_v6(&ctx);
    ALLOW
}

/// The settings, when this socket's DNS traffic is the broker's to take.
#[inline(always)]
fn active(ctx: &SockAddrContext) -> Option<&'static DnsSettings> {
    let settings = DNS_SETTINGS.get(0)?;
    if settings.port == 0 {
        return None;
    }
    // SAFETY: helpers on the program's own context.
    let (netns, tgid, now) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_ktime_get_ns(),
        )
    };
    if netns != settings.netns_cookie || tgid == settings.broker_tgid {
        return None;
    }
    let timeout = SETTINGS.get(0)?.heartbeat_timeout_ns;
    let heartbeat = *HEARTBEAT.get(HEARTBEAT_DNS)?;
    if now.saturating_sub(heartbeat) > timeout {
        return None;
    }
    Some(settings)
}

/// The settings, when this call sends a DNS query the broker is to take.
#[inline(always)]
fn dns_query(ctx: &SockAddrContext) -> Option<&'static DnsSettings> {
    // SAFETY: the context is valid for the run; the verifier checks field access.
    let port = unsafe { u16::from_be((*ctx.sock_addr).user_port as u16) };
    if port != DNS_PORT {
        return None;
    }
    active(ctx)
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, original: &mut DnsOriginal) {
    // SAFETY: helpers on the program's own context.
    let (cookie, tgid, uid) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_uid_gid() as u32,
        )
    };
    original.tgid = tgid;
    original.uid = uid;
    original.comm = bpf_get_current_comm().unwrap_or_default();
    let _ = DNS_ORIGINAL.insert(&cookie, original, 0);
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<&'static DnsOriginal> {
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain bytes; a concurrent update at worst
    // shows the other server's address.
    unsafe { DNS_ORIGINAL.get(&cookie) }
}

#[inline(always)]
fn redirect_v4(ctx: &SockAddrContext) {
    let Some(settings) = dns_query(ctx) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the context is valid for the run; the verifier checks field access.
    let ip = unsafe { (*sa).user_ip4 }.to_ne_bytes();
    let mut saved = DnsOriginal {
        port: DNS_PORT,
        family: FAMILY_V4,
        ..DnsOriginal::default()
    };
    saved.addr[..4].copy_from_slice(&ip);
    remember(ctx, &mut saved);
    // A stub on this host is asked by the broker in the application's
    // place (its own names, its own upstreams), as a server of the
    // application's choosing.
    let port = if ip[0] == 127 {
        settings.explicit_port
    } else {
        port_for(settings, &saved.addr)
    };
    // SAFETY: connect4/sendmsg4 may write the destination.
    unsafe {
        (*sa).user_ip4 = u32::from_ne_bytes(LOOPBACK_V4);
        (*sa).user_port = port.to_be() as u32;
    }
}

#[inline(always)]
fn redirect_v6(ctx: &SockAddrContext) {
    let Some(settings) = dns_query(ctx) else {
        return;
    };
    let addr = read_v6(ctx);
    // A dual-stack socket reaching an IPv4 server uses a v4-mapped
    // address; the broker's IPv4 listener is v4-mapped loopback.
    let mapped = addr[..12] == MAPPED_LOOPBACK[..12];
    if !mapped && settings.has_v6 == 0 {
        return;
    }
    remember(
        ctx,
        &mut DnsOriginal {
            addr,
            port: DNS_PORT,
            family: FAMILY_V6,
            ..DnsOriginal::default()
        },
    );
    let mut server = addr;
    if mapped {
        server = [0; 16];
        server[0] = addr[12];
        server[1] = addr[13];
        server[2] = addr[14];
        server[3] = addr[15];
    }
    let loopback = if mapped {
        server[0] == 127
    } else {
        addr == LOOPBACK_V6
    };
    let port = if loopback {
        settings.explicit_port
    } else {
        port_for(settings, &server)
    };
    write_v6(ctx, if mapped { &MAPPED_LOOPBACK } else { &LOOPBACK_V6 });
    // SAFETY: connect6/sendmsg6 may write the port.
    unsafe { (*ctx.sock_addr).user_port = port.to_be() as u32 };
}

/// The broker's port for a query to `server`: the fast one for the host's
/// own servers, the explicit one (where the broker asks which server it
/// was) for any other.
#[inline(always)]
fn port_for(settings: &DnsSettings, server: &[u8; 16]) -> u16 {
    // SAFETY: plain bytes.
    if unsafe { DNS_SYSTEM.get(server) }.is_some() {
        settings.port
    } else {
        settings.explicit_port
    }
}

/// Whether `port` is one of the broker's.
#[inline(always)]
fn broker_port(settings: &DnsSettings, port: u16) -> bool {
    settings.port != 0 && (port == settings.port || port == settings.explicit_port)
}

#[inline(always)]
fn restore_v4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in redirect_v4.
    let (ip, port) = unsafe { ((*sa).user_ip4.to_ne_bytes(), u16::from_be((*sa).user_port as u16)) };
    if ip != LOOPBACK_V4 {
        return;
    }
    let Some(settings) = DNS_SETTINGS.get(0) else {
        return;
    };
    if !broker_port(settings, port) {
        return;
    }
    if let Some(original) = original(ctx)
        && original.family == FAMILY_V4
    {
        // SAFETY: recvmsg4/getpeername4 may write the peer address.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes([
                original.addr[0],
                original.addr[1],
                original.addr[2],
                original.addr[3],
            ]);
            (*sa).user_port = original.port.to_be() as u32;
        }
    }
}

#[inline(always)]
fn restore_v6(ctx: &SockAddrContext) {
    // SAFETY: as in redirect_v4.
    let port = unsafe { u16::from_be((*ctx.sock_addr).user_port as u16) };
    let Some(settings) = DNS_SETTINGS.get(0) else {
        return;
    };
    if !broker_port(settings, port) {
        return;
    }
    let addr = read_v6(ctx);
    if addr != LOOPBACK_V6 && addr != MAPPED_LOOPBACK {
        return;
    }
    let Some(original) = original(ctx) else {
        return;
    };
    let mut saved = original.addr;
    if original.family == FAMILY_V4 {
        // A dual-stack socket's query to a v4-mapped server goes out by the
        // IPv4 path (sendmsg4 saw it), but its answer is read as IPv6: the
        // server asked, v4-mapped.
        if addr != MAPPED_LOOPBACK {
            return;
        }
        saved = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, saved[0], saved[1], saved[2], saved[3],
        ];
    }
    write_v6(ctx, &saved);
    // SAFETY: recvmsg6/getpeername6 may write the port.
    unsafe { (*ctx.sock_addr).user_port = original.port.to_be() as u32 };
}

/// The verifier allows only 4-byte access to `user_ip6`.
#[inline(always)]
fn read_v6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        // SAFETY: word access within the context.
        let word = unsafe { (*ctx.sock_addr).user_ip6[i] }.to_ne_bytes();
        addr[i * 4..i * 4 + 4].copy_from_slice(&word);
        i += 1;
    }
    addr
}

#[inline(always)]
fn write_v6(ctx: &SockAddrContext, addr: &[u8; 16]) {
    let mut i = 0;
    while i < 4 {
        let word = u32::from_ne_bytes([addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]]);
        // SAFETY: word access within the context.
        unsafe { (*ctx.sock_addr).user_ip6[i] = word };
        i += 1;
    }
}
