use crate::encap::{self, Fast};
use crate::headers::{ETH_HLEN, ETH_P_IP, read};
use crate::maps::{
    ACTIONS, CLAIMED, COUNTERS, DPORT, DST_V4, DST_V6, ENCAP_ACTIVE, FLOWS, FRAGMENTS, HEARTBEAT, PORTLESS,
    PROTO, PROTO_SEEN, RECENT, RULE_SCRATCH, SETTINGS, SPORT, bump,
};
use crate::measure;
use crate::nat;
use crate::owner;
use crate::parse::coarse_ns;
use crate::parse::{
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
};
use crate::parse::{Parsed, parse_into};
use crate::pins::closing;
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect,
    macros::classifier,
    maps::{LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use oasis_common::{
    FAMILY_V4, FAMILY_V6, FlowEntry, FlowKey, HEARTBEAT_PACKETS, RULE_WORDS, RuleAction, Settings, Verdict,
    icmpv6_link_message, stat,
};

/// Cached flows refresh their timestamp at most this often, so a busy flow
/// does not write to the shared cache on every packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

#[classifier]
pub fn oasis_egress(ctx: TcContext) -> i32 {
    classify(&ctx)
}

/// The checks run in the order that lets a packet no rule claims leave
/// first: it needs neither the heartbeat (a packet that passes passes
/// whatever the broker's state) nor the link checks (what belongs to the
/// link never reaches the flow cache or this CPU's recent flow, so a flow
/// found there is none of it). Anything that would divert, rewrite or
/// measure a packet meets them all.
#[inline(always)]
fn classify(ctx: &TcContext) -> i32 {
    if recent_v4_pass(ctx) {
        return TC_ACT_OK as i32;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the context pointer is valid for the whole run of the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if settings.bypass_mark != 0 && mark == settings.bypass_mark {
        bump(stat::BYPASSED);
        return TC_ACT_OK as i32;
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let parsed = Parsed::zero_in(&mut slot);
    if !parse_into(ctx, parsed) {
        bump(stat::UNPARSED);
        return TC_ACT_OK as i32;
    }
    let now = coarse_ns();
    // Fake addresses come before every rule: they exist only because a
    // name rule claimed the name, and mean nothing on the wire.
    if settings.is_fake(&parsed.key) {
        if !alive(now, settings) {
            return TC_ACT_OK as i32;
        }
        if nat::egress(ctx, &mut *parsed) {
            return TC_ACT_OK as i32;
        }
        bump(stat::FAKE_DIVERTED);
        return divert(settings);
    }
    let key = &parsed.key;
    // A protocol no rule has named cannot be a diverted flow's.
    if PROTO_SEEN.get(key.proto as u32).is_none_or(|seen| *seen == 0) {
        return TC_ACT_OK as i32;
    }
    // The common case: a packet of the flow this CPU saw last, which no
    // rule claims.
    if !parsed.new_connection && !parsed.icmp_error && recent_pass(key, now, settings) {
        return TC_ACT_OK as i32;
    }
    // An overlay flow the broker left to the kernel: wrapped here. Early,
    // while the verifier has few states to carry into the call; what the
    // rest would check the broker checked before it made the entry.
    if ENCAP_ACTIVE.get(0).is_some_and(|flows| *flows != 0) {
        match encap::egress(ctx, parsed, now, settings) {
            Fast::Redirect(action) => return action,
            Fast::Done => return TC_ACT_OK as i32,
            Fast::Broken => return TC_ACT_SHOT as i32,
            Fast::Broker => {}
        }
    }
    // Whatever the rules say: nothing carries what belongs to the link.
    if key.link_scoped() || link_frame(ctx, key) {
        return TC_ACT_OK as i32;
    }
    if !alive(now, settings) {
        return TC_ACT_OK as i32;
    }
    let entry = if parsed.icmp_error {
        // An error about a flow (a port unreachable this host answers a
        // claimed flow's datagram with) goes where the flow goes; it
        // never starts one.
        match claimed_verdict(key, now, settings) {
            Some(entry) if entry.verdict == Verdict::Divert as u8 => entry,
            _ => return TC_ACT_OK as i32,
        }
    } else if parsed.fragment {
        // A later fragment (no ports) goes where its first went.
        match fragment_verdict(parsed) {
            Some(entry) => entry,
            None => verdict(ctx, parsed, now, settings),
        }
    } else {
        let entry = verdict(ctx, parsed, now, settings);
        if parsed.first_fragment && entry.verdict != Verdict::Pass as u8 {
            remember_fragments(parsed, &entry);
        }
        entry
    };

    if entry.rule_id != 0
        && let Some(counters) = COUNTERS.get_ptr_mut(&entry.rule_id)
    {
        // SAFETY: per-CPU value, only this CPU writes it now.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += ctx.len() as u64;
        }
    }

    if entry.rule_id != 0
        && entry.verdict != Verdict::Divert as u8
        && parsed.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
    {
        closing(key);
    }

    match Verdict::from_u8(entry.verdict) {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Divert => {
            bump(stat::DIVERTED);
            divert(settings)
        }
        Verdict::Measure => {
            measure::egress(ctx, parsed);
            TC_ACT_OK as i32
        }
    }
}

/// Whether the broker's heartbeat is fresh; a stale one lets everything
/// pass (fail open), counted.
#[inline(always)]
pub(crate) fn alive(now: u64, settings: &Settings) -> bool {
    let heartbeat = HEARTBEAT.get(HEARTBEAT_PACKETS).copied().unwrap_or(0);
    if now.saturating_sub(heartbeat) > settings.heartbeat_timeout_ns {
        bump(stat::FAIL_OPEN);
        return false;
    }
    true
}

/// Whether the packet is of this CPU's most recent flow (the slot holds only
/// flows no rule claims, which pass), and that flow is not idle past its
/// lifetime: the hit is counted in the slot itself (one cache line for all
/// of it).
#[inline(always)]
fn recent_pass(key: &FlowKey, now: u64, settings: &Settings) -> bool {
    let Some(recent) = RECENT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let recent = unsafe { &mut *recent };
    if recent.entry.verdict != Verdict::Pass as u8
        || recent.entry.last_seen_ns == 0
        || !recent.key.same_as(key)
    {
        return false;
    }
    let idle_ns = if key.proto == IPPROTO_TCP {
        settings.tcp_idle_ns
    } else {
        settings.flow_idle_ns
    };
    let age = now.saturating_sub(recent.entry.last_seen_ns);
    if age >= idle_ns || age > LAST_SEEN_GRANULARITY_NS {
        // Idle too long, or the flow cache's clock is due: the full path.
        return false;
    }
    recent.hits += 1;
    true
}

/// `recent_pass` for the packet nearly every uplink sends most: IPv4
/// without options, TCP or UDP, not a fragment nor a new connection, read
/// in place before anything else. Nothing the full path checks first can
/// differ for such a packet: the slot only ever holds a flow that met the
/// fake pools and the protocol test and passed (a protocol, once seen,
/// stays seen), and a flow stays there at most a second before the full
/// path looks at it again. Skipping the parse, its call and the zeroing
/// of its result is most of what unclaimed traffic costs.
#[inline(always)]
fn recent_v4_pass(ctx: &TcContext) -> bool {
    if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IP {
        return false;
    }
    // The IP header without options, and the transport header's first
    // 14 bytes (ports; TCP's flags at 13), read in place one byte at a
    // time: a copy of them first cost more than the rest of the check.
    let ip = ctx.data() + ETH_HLEN;
    if ip + 34 > ctx.data_end() {
        return false;
    }
    // SAFETY: within the bounds checked above, which the verifier follows.
    let at = |offset: usize| unsafe { *((ip + offset) as *const u8) };
    let proto = at(9);
    if at(0) != 0x45
        || at(6) & 0x3f != 0
        || at(7) != 0
        || !(proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        || (proto == IPPROTO_TCP && at(33) & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN)
    {
        return false;
    }
    let Some(recent) = RECENT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let recent = unsafe { &mut *recent };
    let key = &recent.key;
    // An IPv4 key's address bytes past the fourth are zero.
    if recent.entry.verdict != Verdict::Pass as u8
        || recent.entry.last_seen_ns == 0
        || key.family != FAMILY_V4
        || key.proto != proto
        || key.src[0] != at(12)
        || key.src[1] != at(13)
        || key.src[2] != at(14)
        || key.src[3] != at(15)
        || key.dst[0] != at(16)
        || key.dst[1] != at(17)
        || key.dst[2] != at(18)
        || key.dst[3] != at(19)
        || key.sport != u16::from_be_bytes([at(20), at(21)])
        || key.dport != u16::from_be_bytes([at(22), at(23)])
    {
        return false;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let idle_ns = if proto == IPPROTO_TCP {
        settings.tcp_idle_ns
    } else {
        settings.flow_idle_ns
    };
    let age = coarse_ns().saturating_sub(recent.entry.last_seen_ns);
    if age >= idle_ns || age > LAST_SEEN_GRANULARITY_NS {
        return false;
    }
    recent.hits += 1;
    true
}

/// The flow's verdict: from this CPU's most recent flow, else the verdict
/// caches (flows that pass, then claimed flows), else the rules (a new TCP
/// connection always meets the rules). Cached verdicts last until the flow
/// is idle for `flow_idle_ns` (`tcp_idle_ns` for TCP).
#[inline(never)]
fn verdict(ctx: &TcContext, parsed: &Parsed, now: u64, settings: &Settings) -> FlowEntry {
    // A later fragment has no transport header: never a new connection.
    let (key, new_connection) = (&parsed.key, parsed.new_connection && !parsed.fragment);
    let idle_ns = if key.proto == IPPROTO_TCP {
        settings.tcp_idle_ns
    } else {
        settings.flow_idle_ns
    };
    let recent = RECENT.get_ptr_mut(0);
    if !new_connection && let Some(recent) = recent {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        let recent = unsafe { &mut *recent };
        let age = now.saturating_sub(recent.entry.last_seen_ns);
        if recent.key.same_as(key) && recent.entry.last_seen_ns != 0 && age < idle_ns {
            bump(stat::CACHE_HIT);
            if age > LAST_SEEN_GRANULARITY_NS {
                // The verdict cache must see the flow alive too.
                recent.entry.last_seen_ns = now;
                let cache = cache_of(recent.entry.verdict);
                match cache.get_ptr_mut(key) {
                    // SAFETY: pointer from a successful lookup.
                    Some(cached) => unsafe { (*cached).last_seen_ns = now },
                    None => {
                        let _ = cache.insert(key, &recent.entry, 0);
                    }
                }
            }
            return recent.entry;
        }
    }
    let entry = match cached(&FLOWS, key, new_connection, now, idle_ns) {
        Cached::Live(entry) => entry,
        passed => match cached(&CLAIMED, key, new_connection, now, idle_ns) {
            Cached::Live(entry) => entry,
            claimed => {
                bump(stat::CLASSIFIED);
                let entry = match match_rules(ctx, key) {
                    Some(action) => FlowEntry {
                        last_seen_ns: now,
                        rule_id: action.rule_id,
                        verdict: action.verdict,
                        flags: 0,
                        _pad: [0; 2],
                    },
                    None => FlowEntry {
                        last_seen_ns: now,
                        rule_id: 0,
                        verdict: Verdict::Pass as u8,
                        flags: 0,
                        _pad: [0; 2],
                    },
                };
                // The verdict lives in one cache only: the other's stale
                // entry would shadow it or outlive it.
                let (cache, other_held) = if entry.verdict == Verdict::Pass as u8 {
                    (&FLOWS, claimed == Cached::Expired)
                } else {
                    (&CLAIMED, passed == Cached::Expired)
                };
                if other_held {
                    let _ = cache_other(cache).remove(key);
                }
                // A full cache only costs a re-match next time; never drop for it.
                let _ = cache.insert(key, &entry, 0);
                entry
            }
        },
    };
    if let Some(recent) = recent {
        // SAFETY: this CPU's slot, as above.
        unsafe {
            if entry.verdict != Verdict::Pass as u8 || entry.rule_id != 0 {
                // Claimed flows always ask the verdict cache: the broker
                // changes their verdict there (a flow it leaves to the
                // kernel, or takes back), which this slot must not shadow;
                // and their rule counts every packet.
                if (*recent).key.same_as(key) {
                    (*recent).entry.last_seen_ns = 0;
                }
            } else {
                (*recent).key = *key;
                (*recent).entry = entry;
            }
        }
    }
    entry
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cached {
    Live(FlowEntry),
    /// An entry is there, idle too long (or the packet opens a new
    /// connection): decided afresh.
    Expired,
    Absent,
}

#[inline(always)]
fn cached(
    cache: &LruHashMap<FlowKey, FlowEntry>,
    key: &FlowKey,
    new_connection: bool,
    now: u64,
    idle_ns: u64,
) -> Cached {
    let Some(entry) = cache.get_ptr_mut(key) else {
        return Cached::Absent;
    };
    // SAFETY: pointer from a successful lookup; fields are plain integers.
    unsafe {
        let age = now.saturating_sub((*entry).last_seen_ns);
        if new_connection || age >= idle_ns {
            return Cached::Expired;
        }
        bump(stat::CACHE_HIT);
        if age > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        Cached::Live(*entry)
    }
}

/// Where a verdict is cached: flows that pass in one map, claimed flows
/// in the other.
#[inline(always)]
fn cache_of(verdict: u8) -> &'static LruHashMap<FlowKey, FlowEntry> {
    if verdict == Verdict::Pass as u8 {
        &FLOWS
    } else {
        &CLAIMED
    }
}

#[inline(always)]
fn cache_other(cache: &LruHashMap<FlowKey, FlowEntry>) -> &'static LruHashMap<FlowKey, FlowEntry> {
    if core::ptr::eq(cache, &FLOWS) {
        &CLAIMED
    } else {
        &FLOWS
    }
}

/// A live claimed flow's cached verdict, if it has one; nothing is cached
/// or refreshed.
#[inline(never)]
fn claimed_verdict(key: &FlowKey, now: u64, settings: &Settings) -> Option<FlowEntry> {
    let idle_ns = if key.proto == IPPROTO_TCP {
        settings.tcp_idle_ns
    } else {
        settings.flow_idle_ns
    };
    // SAFETY: plain integers.
    let entry = unsafe { CLAIMED.get(key) }.copied()?;
    (now.saturating_sub(entry.last_seen_ns) < idle_ns).then_some(entry)
}

/// A claimed datagram's first fragment: its verdict, for the rest.
#[inline(never)]
fn remember_fragments(parsed: &Parsed, entry: &FlowEntry) {
    let _ = FRAGMENTS.insert(&parsed.frag_key(), entry, 0);
}

#[inline(never)]
fn fragment_verdict(parsed: &Parsed) -> Option<FlowEntry> {
    // SAFETY: plain integers.
    unsafe { FRAGMENTS.get(&parsed.frag_key()) }.copied()
}

/// A frame for every station on the link (an Ethernet group address: a
/// subnet's broadcast, say, whose IP address alone does not tell), or
/// neighbour discovery and MLD, which may use global addresses.
#[inline(always)]
fn link_frame(ctx: &TcContext, key: &FlowKey) -> bool {
    // Whole words read: a one-byte bounds check is compiled to a form the
    // verifier cannot follow.
    if read::<[u8; 6]>(ctx, 0).is_some_and(|mac| mac[0] & 1 != 0) {
        return true;
    }
    key.proto == IPPROTO_ICMPV6
        && key.family == FAMILY_V6
        && read::<[u8; 4]>(ctx, ETH_HLEN + 40).is_some_and(|icmp| icmpv6_link_message(icmp[0]))
}

#[inline(always)]
fn divert(settings: &Settings) -> i32 {
    // SAFETY: plain helper call; an ifindex that vanished makes the
    // redirect fail and the packet drops, which is why the broker's
    // heartbeat stops diversion within seconds of its death.
    let action = unsafe { bpf_redirect(settings.tun_ifindex, 0) };
    if action == TC_ACT_SHOT as i64 {
        TC_ACT_OK as i32
    } else {
        action as i32
    }
}

/// The first rule (lowest rank) whose every field matches. A separate BPF
/// function: its rule sets and the NAT path's buffers then never share one
/// stack frame, which must stay within 512 bytes for the whole call chain.
#[inline(never)]
fn match_rules(ctx: &TcContext, key: &FlowKey) -> Option<RuleAction> {
    let set = RULE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
    let set = unsafe { &mut *set };
    let by_proto = PROTO.get(key.proto as u32)?;
    let by_dst = if key.family == FAMILY_V4 {
        DST_V4.get(Key::new(32, [key.dst[0], key.dst[1], key.dst[2], key.dst[3]]))?
    } else {
        DST_V6.get(Key::new(128, key.dst))?
    };
    let (by_dport, by_sport) = if !key.has_ports() {
        let portless = PORTLESS.get(0)?;
        (portless, portless)
    } else {
        (
            DPORT.get(Key::new(16, key.dport.to_be_bytes()))?,
            SPORT.get(Key::new(16, key.sport.to_be_bytes()))?,
        )
    };
    // One pass over the sets' words: with a thousand rules each is 128
    // bytes, and a pass per field cost more than the lookups.
    let mut any = 0;
    let mut i = 0;
    while i < RULE_WORDS {
        let word = by_proto.words[i] & by_dst.words[i] & by_dport.words[i] & by_sport.words[i];
        set.words[i] = word;
        any |= word;
        i += 1;
    }
    if any == 0 {
        return None;
    }
    owner::restrict(ctx, set);
    ACTIONS.get(set.lowest_rank()?).copied()
}
