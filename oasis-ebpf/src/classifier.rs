use crate::headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, read};
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, generated::bpf_redirect},
    macros::{classifier, map},
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, lpm_trie::Key},
    programs::TcContext,
};
use oasis_common::{
    Counters, FAMILY_V4, FAMILY_V6, FLOW_CACHE_ENTRIES, FlowEntry, FlowKey, MAX_RULES, PortBytes, RULE_WORDS,
    RuleAction, RuleSet, Settings, Verdict, stat,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Cached flows refresh their timestamp at most this often, so a busy flow
/// does not write to the shared cache on every packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

#[map(name = "OASIS_SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// CLOCK_MONOTONIC nanoseconds of the broker's last sign of life.
#[map(name = "OASIS_HEARTBEAT")]
static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

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
fn bump(index: u32) {
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
    let Some((key, new_connection)) = parse(ctx) else {
        bump(stat::UNPARSED);
        return TC_ACT_OK as i32;
    };

    let entry = match FLOWS.get_ptr_mut(&key) {
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
            let entry = match match_rules(&key) {
                Some(action) => FlowEntry {
                    last_seen_ns: now,
                    rule_id: action.rule_id,
                    verdict: action.verdict,
                    _pad: [0; 3],
                },
                None => FlowEntry { last_seen_ns: now, rule_id: 0, verdict: Verdict::Pass as u8, _pad: [0; 3] },
            };
            // A full cache only costs a re-match next time; never drop for it.
            let _ = FLOWS.insert(&key, &entry, 0);
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
    }
}

/// The fixed IPv4 header fields the classifier needs.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Head {
    version_ihl: u8,
    _tos: u8,
    _total_len: [u8; 2],
    _id: [u8; 2],
    frag: [u8; 2],
    _ttl: u8,
    proto: u8,
    _check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Head {
    _version_class_flow: [u8; 4],
    _payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// Reads the 5-tuple. Returns the key and whether the packet opens a new
/// connection (a TCP SYN without ACK), which always re-checks the rules.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<(FlowKey, bool)> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut key = FlowKey::default();
    let (l4_offset, fragment) = match ethertype {
        ETH_P_IP => {
            let ip: Ipv4Head = read(ctx, ETH_HLEN)?;
            if ip.version_ihl >> 4 != 4 {
                return None;
            }
            let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            key.proto = ip.proto;
            key.src[..4].copy_from_slice(&ip.src);
            key.dst[..4].copy_from_slice(&ip.dst);
            key.family = FAMILY_V4;
            // Non-first fragments carry no ports.
            (ETH_HLEN + ihl, u16::from_be_bytes(ip.frag) & 0x1fff != 0)
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Head = read(ctx, ETH_HLEN)?;
            key.proto = ip.next_header;
            key.src = ip.src;
            key.dst = ip.dst;
            key.family = FAMILY_V6;
            (ETH_HLEN + 40, false)
        }
        _ => return None,
    };
    let mut new_connection = false;
    if !fragment
        && matches!(
            key.proto,
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
        )
    {
        // One load: ports, and for TCP the flags byte 13 bytes in.
        let ports = if key.proto == IPPROTO_TCP {
            let head: [u8; 14] = ctx.load(l4_offset).ok()?;
            new_connection = head[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            [head[0], head[1], head[2], head[3]]
        } else {
            ctx.load::<[u8; 4]>(l4_offset).ok()?
        };
        key.sport = u16::from_be_bytes([ports[0], ports[1]]);
        key.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some((key, new_connection))
}

/// The first rule (lowest rank) whose every field matches.
#[inline(always)]
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
