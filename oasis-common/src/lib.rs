//! Types shared between the kernel classifier (`oasis-ebpf`) and the broker.
//!
//! Everything here is `#[repr(C)]` with explicit padding so the kernel and user
//! space agree on every byte, and so no uninitialised padding ever reaches a
//! map key (the kernel hashes keys byte by byte).
#![no_std]

/// Most header rules the classifier holds. A rule is one bit in [`RuleSet`],
/// and the lowest set bit after intersecting the per-field sets wins, so the
/// bit index is the rule's rank in the rule list.
pub const MAX_RULES: usize = 256;
pub const RULE_WORDS: usize = MAX_RULES / 64;

/// Entries of the per-flow verdict cache.
pub const FLOW_CACHE_ENTRIES: u32 = 65_536;

/// Map names, as the classifier declares them and the broker opens them.
pub mod maps {
    pub const SETTINGS: &str = "OASIS_SETTINGS";
    pub const HEARTBEAT: &str = "OASIS_HEARTBEAT";
    pub const PROTO: &str = "OASIS_PROTO";
    pub const DST_V4: &str = "OASIS_DST_V4";
    pub const DST_V6: &str = "OASIS_DST_V6";
    pub const DPORT: &str = "OASIS_DPORT";
    pub const SPORT: &str = "OASIS_SPORT";
    pub const PORTLESS: &str = "OASIS_PORTLESS";
    pub const ACTIONS: &str = "OASIS_ACTIONS";
    pub const COUNTERS: &str = "OASIS_COUNTERS";
    pub const FLOWS: &str = "OASIS_FLOWS";
    pub const STATS: &str = "OASIS_STATS";
    pub const EXIT_SETTINGS: &str = "OASIS_EXIT_SETTINGS";
}

/// The classifier program's name in the object file.
pub const EGRESS_PROGRAM: &str = "oasis_egress";

/// The exit node's ingress program: steers replies to NATed flows to the
/// exit node's TUN, so the exit host's own stack never sees (or resets) them.
pub const EXIT_INGRESS_PROGRAM: &str = "oasis_exit_ingress";

/// What the exit node's ingress program steers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitSettings {
    /// The exit's public addresses (IPv4 in the first 4 bytes of `v4`); a
    /// family whose `has_*` is 0 is not steered.
    pub v4: [u8; 4],
    pub v6: [u8; 16],
    pub has_v4: u8,
    pub has_v6: u8,
    pub _pad: [u8; 2],
    /// The NAT port range (also ICMP echo identifiers), inclusive.
    pub port_first: u16,
    pub port_last: u16,
    pub tun_ifindex: u32,
}

/// A set of rules, one bit per rule rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub words: [u64; RULE_WORDS],
}

impl RuleSet {
    pub const EMPTY: RuleSet = RuleSet {
        words: [0; RULE_WORDS],
    };

    #[inline(always)]
    pub fn insert(&mut self, rank: usize) {
        self.words[rank / 64] |= 1u64 << (rank % 64);
    }

    #[inline(always)]
    pub fn contains(&self, rank: usize) -> bool {
        self.words[rank / 64] & (1u64 << (rank % 64)) != 0
    }

    #[inline(always)]
    pub fn union_with(&mut self, other: &RuleSet) {
        let mut i = 0;
        while i < RULE_WORDS {
            self.words[i] |= other.words[i];
            i += 1;
        }
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        let mut i = 0;
        while i < RULE_WORDS {
            if self.words[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// What the classifier does with a flow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the packet alone.
    Pass = 0,
    /// Redirect to the broker's TUN device.
    Divert = 1,
}

impl Verdict {
    pub const fn from_u8(v: u8) -> Verdict {
        match v {
            1 => Verdict::Divert,
            _ => Verdict::Pass,
        }
    }
}

/// What a matched rule does; indexed by rule rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleAction {
    /// The rule's user-visible id; counters are kept under it.
    pub rule_id: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// Per-rule traffic counters (per CPU in the kernel, summed by the broker).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes of the classifier's global counters (a per-CPU array).
pub mod stat {
    /// Packets that carried the broker's bypass mark.
    pub const BYPASSED: u32 = 0;
    /// Packets passed because the broker's heartbeat was stale (fail open).
    pub const FAIL_OPEN: u32 = 1;
    /// Packets decided from the flow cache.
    pub const CACHE_HIT: u32 = 2;
    /// Packets matched against the rule maps (cache miss or re-check).
    pub const CLASSIFIED: u32 = 3;
    /// Packets redirected to the TUN.
    pub const DIVERTED: u32 = 4;
    /// Packets the classifier could not parse (passed untouched).
    pub const UNPARSED: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Run-time settings the broker writes once at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// How old the heartbeat may get before the classifier passes everything.
    pub heartbeat_timeout_ns: u64,
    /// A cached verdict older than this (since the flow's last packet) is
    /// decided again, so a reused 5-tuple meets the current rules.
    pub flow_idle_ns: u64,
    /// Where diverted packets go.
    pub tun_ifindex: u32,
    /// Packets with this `skb->mark` were sent by the broker: always pass.
    pub bypass_mark: u32,
}

/// Address family byte of a [`FlowKey`].
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A flow's 5-tuple as the classifier sees it on egress. IPv4 addresses sit
/// in the first 4 bytes of `src`/`dst`, the rest zero. Ports are in host
/// order; zero where the protocol has none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// An IPv4 flow's key.
    pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> FlowKey {
        let mut key = FlowKey {
            proto,
            sport,
            dport,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        key.src[..4].copy_from_slice(&src);
        key.dst[..4].copy_from_slice(&dst);
        key
    }
}

/// A cached verdict for one flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `bpf_ktime_get_ns()` of the flow's last packet (coarsened to ~1 s).
    pub last_seen_ns: u64,
    /// Id of the rule that matched; 0 when none did.
    pub rule_id: u32,
    pub verdict: u8,
    pub _pad: [u8; 3],
}

/// Key of the port tries: a big-endian port, matched by prefix so that port
/// ranges become a handful of prefixes.
pub type PortBytes = [u8; 2];

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte arrays,
    // and have their padding spelled out as fields.
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for RuleAction {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for ExitSettings {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowEntry>(), 8 + 4 + 1 + 3);
        assert_eq!(size_of::<RuleAction>(), 8);
        assert_eq!(size_of::<Settings>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<RuleSet>(), MAX_RULES / 8);
        assert_eq!(size_of::<ExitSettings>(), 4 + 16 + 1 + 1 + 2 + 2 + 2 + 4);
    }

    #[test]
    fn rule_set_bits() {
        let mut set = RuleSet::EMPTY;
        assert!(set.is_empty());
        set.insert(0);
        set.insert(65);
        set.insert(255);
        assert!(set.contains(0) && set.contains(65) && set.contains(255));
        assert!(!set.contains(64));
        let mut other = RuleSet::EMPTY;
        other.insert(64);
        set.union_with(&other);
        assert!(set.contains(64));
    }
}
