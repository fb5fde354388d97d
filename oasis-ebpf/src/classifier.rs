use crate::nat;
use crate::parse::{Parsed, parse_into};
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, generated::bpf_redirect},
    macros::{classifier, map},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use oasis_common::{
    Counters, FAMILY_V4, FLOW_CACHE_ENTRIES, FlowEntry, FlowKey, MAX_RULES, PortBytes, RULE_WORDS,
    RuleAction, RuleSet, Settings, Verdict, stat,
};

/// Cached flows refresh their timestamp at most this often, so a busy flow
/// does not write to the shared cache on every packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

#[map(name = "OASIS_SETTINGS")]
pub(crate) static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// CLOCK_MONOTONIC nanoseconds of the broker's last sign of life.
#[map(name = "OASIS_HEARTBEAT")]
pub(crate) static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

/// Rules by IP protocol number.
#[map(name = "OASIS_PROTO")]
static PROTO: Array<RuleSet> = Array::with_max_entries(256, 0);

/// Rules by destination prefix. Each entry already holds every rule whose
/// prefix covers it, so the longest match alone is the answer.
#[map(name = "OASIS_DST_V4")]
static DST_V4: LpmTrie<[u8; 4], RuleSet> = LpmTrie::with_max_entries(MAX_RULES as u32 + 1, 0);

#[map(name = "OASIS_DST_V6")]
static DST_V6: LpmTrie<[u8; 16], RuleSet> = LpmTrie::with_max_entries(MAX_RULES as u32 + 1, 0);

/// Rules by destination / source port; ranges are stored as port prefixes.
#[map(name = "OASIS_DPORT")]
static DPORT: LpmTrie<PortBytes, RuleSet> = LpmTrie::with_max_entries(MAX_RULES as u32 * 32 + 1, 0);

#[map(name = "OASIS_SPORT")]
static SPORT: LpmTrie<PortBytes, RuleSet> = LpmTrie::with_max_entries(MAX_RULES as u32 * 32 + 1, 0);

/// Index 0: the rules that ask for no port at all, the only ones a packet
/// without ports (ICMP, fragments) can match.
#[map(name = "OASIS_PORTLESS")]
static PORTLESS: Array<RuleSet> = Array::with_max_entries(1, 0);

/// What each rule rank does.
#[map(name = "OASIS_ACTIONS")]
static ACTIONS: Array<RuleAction> = Array::with_max_entries(MAX_RULES as u32, 0);

/// Packets and bytes per rule id; the broker creates an entry per rule.
#[map(name = "OASIS_COUNTERS")]
static COUNTERS: PerCpuHashMap<u32, Counters> = PerCpuHashMap::with_max_entries(MAX_RULES as u32, 0);

#[map(name = "OASIS_FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOW_CACHE_ENTRIES, 0);

#[map(name = "OASIS_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[classifier]
pub fn oasis_egress(ctx: TcContext) -> i32 {
    classify(&ctx)
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn classify(ctx: &TcContext) -> i32 {
    let Some(settings) = SETTINGS.get(0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the context pointer is valid for the whole run of the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if settings.bypass_mark != 0 && mark == settings.bypass_mark {
        bump(stat::BYPASSED);
        return TC_ACT_OK as i32;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let heartbeat = HEARTBEAT.get(0).copied().unwrap_or(0);
    if now.saturating_sub(heartbeat) > settings.heartbeat_timeout_ns {
        bump(stat::FAIL_OPEN);
        return TC_ACT_OK as i32;
    }
    let mut parsed = Parsed::default();
    if !parse_into(ctx, &mut parsed) {
        bump(stat::UNPARSED);
        return TC_ACT_OK as i32;
    }
    // Fake addresses come before every rule: they exist only because a
    // name rule claimed the name, and mean nothing on the wire.
    if nat::is_fake(&parsed.key) {
        if nat::egress(ctx, &parsed) {
            return TC_ACT_OK as i32;
        }
        bump(stat::FAKE_DIVERTED);
        return divert(settings);
    }
    let (key, new_connection) = (&parsed.key, parsed.new_connection);

    let entry = match FLOWS.get_ptr_mut(key) {
        Some(cached)
            // SAFETY: pointer from a successful lookup; fields are plain integers.
            if !new_connection && now.saturating_sub(unsafe { (*cached).last_seen_ns }) < settings.flow_idle_ns =>
        {
            bump(stat::CACHE_HIT);
            unsafe {
                if now.saturating_sub((*cached).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
                    (*cached).last_seen_ns = now;
                }
                *cached
            }
        }
        _ => {
            bump(stat::CLASSIFIED);
            let entry = match match_rules(key) {
                Some(action) => FlowEntry {
                    last_seen_ns: now,
                    rule_id: action.rule_id,
                    verdict: action.verdict,
                    _pad: [0; 3],
                },
                None => FlowEntry { last_seen_ns: now, rule_id: 0, verdict: Verdict::Pass as u8, _pad: [0; 3] },
            };
            // A full cache only costs a re-match next time; never drop for it.
            let _ = FLOWS.insert(key, &entry, 0);
            entry
        }
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

    match Verdict::from_u8(entry.verdict) {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Divert => {
            bump(stat::DIVERTED);
            divert(settings)
        }
    }
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
fn match_rules(key: &FlowKey) -> Option<RuleAction> {
    let mut set = *PROTO.get(key.proto as u32)?;
    let by_dst = if key.family == FAMILY_V4 {
        DST_V4.get(Key::new(32, [key.dst[0], key.dst[1], key.dst[2], key.dst[3]]))?
    } else {
        DST_V6.get(Key::new(128, key.dst))?
    };
    intersect(&mut set, by_dst);
    if key.sport == 0 && key.dport == 0 {
        intersect(&mut set, PORTLESS.get(0)?);
    } else {
        intersect(&mut set, DPORT.get(Key::new(16, key.dport.to_be_bytes()))?);
        intersect(&mut set, SPORT.get(Key::new(16, key.sport.to_be_bytes()))?);
    }
    let rank = lowest_rank(&set)?;
    ACTIONS.get(rank).copied()
}

#[inline(always)]
fn intersect(set: &mut RuleSet, other: &RuleSet) {
    let mut i = 0;
    while i < RULE_WORDS {
        set.words[i] &= other.words[i];
        i += 1;
    }
}

#[inline(always)]
fn lowest_rank(set: &RuleSet) -> Option<u32> {
    let mut i = 0;
    while i < RULE_WORDS {
        let word = set.words[i];
        if word != 0 {
            return Some(i as u32 * 64 + lowest_bit(word));
        }
        i += 1;
    }
    None
}

/// Index of the lowest set bit of a non-zero word, by halving; the BPF
/// instruction set has no count-trailing-zeros.
#[inline(always)]
fn lowest_bit(mut word: u64) -> u32 {
    let mut index = 0;
    if word & 0xffff_ffff == 0 {
        index += 32;
        word >>= 32;
    }
    if word & 0xffff == 0 {
        index += 16;
        word >>= 16;
    }
    if word & 0xff == 0 {
        index += 8;
        word >>= 8;
    }
    if word & 0xf == 0 {
        index += 4;
        word >>= 4;
    }
    if word & 0x3 == 0 {
        index += 2;
        word >>= 2;
    }
    if word & 0x1 == 0 {
        index += 1;
    }
    index
}
