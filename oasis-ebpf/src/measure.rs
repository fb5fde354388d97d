//! Passive measurement, for the Monitor, of flows that stay in the kernel:
//! flows of metric rules the Monitor gave the underlay (their cached
//! verdict is `Measure`), and the Monitor's TCP probes. The broker creates
//! an entry in `MONITORED` for each; the egress classifier and the uplinks'
//! ingress program read the flow's TCP headers and send the broker what
//! they learn through a ring buffer:
//!
//! - the handshake's round trip (the broker notes when the SYN left),
//! - timestamp round trips: a TSval going out, its echo coming back, at
//!   most one sample per flow every 100 ms,
//! - data segments and how many were sent again, and bytes moved (payload
//!   received, bytes acknowledged: goodput), reported once a second,
//! - resets, and ICMP errors about the flow.
//!
//! Only the common TCP option layout (NOP, NOP, timestamps first, as
//! Linux and most stacks send on established flows) is read; flows with
//! other layouts give handshake samples and counts only.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use oasis_common::{FAMILY_V4, FlowKey, Measure, MonitorEvent, measure_flag, monitor_event, stat};

use crate::headers::{ETH_HLEN, read};
use crate::maps::bump;
use crate::maps::{MONITOR_EVENTS, MONITORED};
use crate::parse::{
    IPPROTO_TCP, Parsed, TCP_FLAG_ACK as TCP_ACK, TCP_FLAG_FIN as TCP_FIN, TCP_FLAG_RST as TCP_RST,
    TCP_FLAG_SYN as TCP_SYN,
};
/// One round-trip sample per flow this often at most.
const SAMPLE_EVERY_NS: u64 = 100_000_000;
/// A timestamp sample unanswered this long is given up.
const SAMPLE_GIVE_UP_NS: u64 = 1_000_000_000;
/// Counts are reported this often.
const REPORT_EVERY_NS: u64 = 1_000_000_000;
/// A handshake answered later than the first retransmission timeout gives
/// no sample.
const MAX_HANDSHAKE_NS: u64 = 1_000_000_000;

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments. The precise clock: round trips of
    // a few milliseconds need better than the coarse clock's tick.
    unsafe { bpf_ktime_get_ns() }
}

/// `a` comes after `b` in sequence space.
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The TCP header fields measurement reads: sequence, acknowledgement,
/// header length, flags.
struct Tcp {
    seq: u32,
    ack: u32,
    header_len: usize,
    flags: u8,
}

#[inline(always)]
fn tcp_at(ctx: &TcContext, offset: usize) -> Option<Tcp> {
    let head = match offset {
        34 => read::<[u8; 14]>(ctx, 34),
        54 => read::<[u8; 14]>(ctx, 54),
        _ => ctx.load::<[u8; 14]>(offset).ok(),
    }?;
    Some(Tcp {
        seq: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        ack: u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
        header_len: ((head[12] >> 4) as usize) * 4,
        flags: head[13],
    })
}

/// (TSval, TSecr) when the options start with NOP, NOP, timestamps.
#[inline(always)]
fn timestamps(ctx: &TcContext, tcp_offset: usize, tcp: &Tcp) -> Option<(u32, u32)> {
    if tcp.header_len < 32 {
        return None;
    }
    let o = match tcp_offset {
        34 => read::<[u8; 12]>(ctx, 54),
        54 => read::<[u8; 12]>(ctx, 74),
        _ => ctx.load::<[u8; 12]>(tcp_offset + 20).ok(),
    }?;
    if o[0] != 1 || o[1] != 1 || o[2] != 8 || o[3] != 10 {
        return None;
    }
    Some((
        u32::from_be_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_be_bytes([o[8], o[9], o[10], o[11]]),
    ))
}

/// Bytes after the IP header, from the IP header's own length field.
#[inline(always)]
fn ip_payload_len(ctx: &TcContext, key: &FlowKey, l4_offset: usize) -> Option<usize> {
    if key.family == FAMILY_V4 {
        let total = read::<[u8; 2]>(ctx, ETH_HLEN + 2)?;
        (u16::from_be_bytes(total) as usize).checked_sub(l4_offset - ETH_HLEN)
    } else {
        let payload = read::<[u8; 2]>(ctx, ETH_HLEN + 4)?;
        Some(u16::from_be_bytes(payload) as usize)
    }
}

#[inline(always)]
fn emit(event: MonitorEvent) {
    match MONITOR_EVENTS.reserve::<MonitorEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => bump(stat::EVENTS_LOST),
    }
}

/// Reports counts once a second, when there are any.
#[inline(always)]
fn report(key: &FlowKey, m: &mut Measure, now: u64) {
    if m.reported_ns == 0 {
        m.reported_ns = now;
        return;
    }
    let over = now.saturating_sub(m.reported_ns);
    if over < REPORT_EVERY_NS || (m.segments == 0 && m.moved_bytes == 0) {
        return;
    }
    emit(MonitorEvent::counts(
        *key,
        m.segments as u64,
        m.retransmits as u64,
        m.moved_bytes,
        over,
    ));
    m.segments = 0;
    m.retransmits = 0;
    m.moved_bytes = 0;
    m.reported_ns = now;
}

/// An outgoing packet of a measured flow (its cached verdict is
/// `Measure`). The packet itself always passes.
#[inline(never)]
pub fn egress(ctx: &TcContext, parsed: &Parsed) {
    bump(stat::MEASURED_EGRESS);
    let key = &parsed.key;
    if key.proto != IPPROTO_TCP || parsed.fragment {
        return;
    }
    let Some(m) = MONITORED.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a pointer from a successful lookup; plain integers. Another
    // CPU may update the entry meanwhile: a count may come out short,
    // which a measurement tolerates.
    let m = unsafe { &mut *m };
    let Some(tcp) = tcp_at(ctx, parsed.l4_offset) else {
        return;
    };
    let now = now_ns();
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        m.flags |= measure_flag::CLOSING;
    }
    if tcp.flags & TCP_SYN != 0 {
        // The SYN again: its answer can no longer be timed.
        m.syn_ns = 0;
        return;
    }
    let data = ip_payload_len(ctx, key, parsed.l4_offset)
        .and_then(|l4| l4.checked_sub(tcp.header_len))
        .unwrap_or(0);
    if data > 0 || tcp.flags & TCP_FIN != 0 {
        // SAFETY: the context pointer is valid for the whole run.
        let segments = unsafe { (*ctx.skb.skb).gso_segs }.max(1);
        // A FIN takes a sequence number of its own.
        let fin = u32::from(tcp.flags & TCP_FIN != 0);
        let end = tcp.seq.wrapping_add(data as u32 + fin);
        let known = m.flags & measure_flag::SEQ_KNOWN != 0;
        if known && !after(end, m.seq_next) {
            m.retransmits += segments;
        } else {
            m.seq_next = end;
            m.flags |= measure_flag::SEQ_KNOWN;
        }
        m.segments += segments;
    }
    let idle = m.ts_sent_ns == 0 || now.saturating_sub(m.ts_sent_ns) > SAMPLE_GIVE_UP_NS;
    if idle
        && now.saturating_sub(m.sampled_ns) >= SAMPLE_EVERY_NS
        && let Some((ts_val, _)) = timestamps(ctx, parsed.l4_offset, &tcp)
    {
        m.ts_val = ts_val;
        m.ts_sent_ns = now;
    }
    report(key, m, now);
}

/// The flow a packet arriving on the uplink answers: its key swapped.
#[inline(always)]
fn reversed(key: &FlowKey, out: &mut FlowKey) {
    out.src = key.dst;
    out.dst = key.src;
    out.sport = key.dport;
    out.dport = key.sport;
    out.proto = key.proto;
    out.family = key.family;
}

/// A packet arriving on an uplink, while anything is measured.
#[inline(never)]
pub fn ingress(ctx: &TcContext, parsed: &Parsed) {
    let key = &parsed.key;
    if parsed.fragment {
        return;
    }
    if parsed.icmp_error {
        unreachable(parsed);
        return;
    }
    if key.proto != IPPROTO_TCP {
        return;
    }
    let mut flow = FlowKey::default();
    reversed(key, &mut flow);
    let Some(m) = MONITORED.get_ptr_mut(&flow) else {
        return;
    };
    // SAFETY: as in `egress`.
    let m = unsafe { &mut *m };
    bump(stat::MEASURED_INGRESS);
    let Some(tcp) = tcp_at(ctx, parsed.l4_offset) else {
        return;
    };
    let now = now_ns();
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        m.flags |= measure_flag::CLOSING;
    }
    if tcp.flags & TCP_RST != 0 {
        let rtt = if m.syn_ns != 0 {
            now.saturating_sub(m.syn_ns)
        } else {
            0
        };
        m.syn_ns = 0;
        emit(MonitorEvent::round_trip(flow, monitor_event::RESET, rtt));
        return;
    }
    if tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        let rtt = now.saturating_sub(m.syn_ns);
        // An answer after a second may be the peer's SYN-ACK sent again
        // (its first was lost): which SYN it answers is unknown.
        if m.syn_ns != 0 && rtt < MAX_HANDSHAKE_NS {
            emit(MonitorEvent::round_trip(flow, monitor_event::SYN_ACK, rtt));
            m.sampled_ns = now;
        }
        m.syn_ns = 0;
        m.flags |= measure_flag::ANSWERED;
        m.last_ack = tcp.ack;
        return;
    }
    // Goodput either way: payload received (downloads) and bytes the peer
    // acknowledged (uploads).
    let data = ip_payload_len(ctx, key, parsed.l4_offset)
        .and_then(|l4| l4.checked_sub(tcp.header_len))
        .unwrap_or(0);
    m.moved_bytes += data as u64;
    if tcp.flags & TCP_ACK != 0 {
        if m.last_ack != 0 && after(tcp.ack, m.last_ack) {
            m.moved_bytes += tcp.ack.wrapping_sub(m.last_ack) as u64;
        }
        if m.last_ack == 0 || after(tcp.ack, m.last_ack) {
            m.last_ack = tcp.ack;
        }
    }
    if m.ts_sent_ns != 0
        && let Some((_, echo)) = timestamps(ctx, parsed.l4_offset, &tcp)
        && echo == m.ts_val
    {
        emit(MonitorEvent::round_trip(
            flow,
            monitor_event::TS_RTT,
            now.saturating_sub(m.ts_sent_ns),
        ));
        m.ts_sent_ns = 0;
        m.sampled_ns = now;
    }
    report(&flow, m, now);
}

/// An ICMP "destination unreachable" about a measured flow: the packet it
/// quotes is one the host sent, so the error's key (the quoted one,
/// swapped) is the flow's key swapped.
#[inline(never)]
fn unreachable(parsed: &Parsed) {
    let v4 = parsed.key.family == FAMILY_V4;
    let unreachable_type = if v4 { 3 } else { 1 };
    if parsed.icmp_type != unreachable_type {
        return;
    }
    let mut flow = FlowKey::default();
    reversed(&parsed.key, &mut flow);
    if MONITORED.get_ptr_mut(&flow).is_some() {
        bump(stat::MEASURED_INGRESS);
        emit(MonitorEvent::round_trip(flow, monitor_event::UNREACHABLE, 0));
    }
}
