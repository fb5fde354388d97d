//! Every map the kernel programs hold, in one table: name, kind, key and
//! value types, size. Both sides read the table: `oasis-ebpf` declares its
//! maps from it (`kernel_maps!` with a callback that emits statics), and the
//! broker opens and describes the maps through the [`MapDef`] constants the
//! same table generates here. A test in the broker loads the built object
//! and checks every map in it against [`ALL`], so the two cannot drift.

/// The BPF map types the programs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Array,
    HashMap,
    /// A hash map whose entries are allocated as they are added
    /// (`BPF_F_NO_PREALLOC`): for tables only user space fills and that
    /// most hosts leave empty or nearly (the exit node's, the client's
    /// NAT and fast-path tables), which would otherwise cost every loader
    /// their full size in kernel memory. The programs only look entries
    /// up and change them in place, so their cost does not change.
    SparseHashMap,
    LruHashMap,
    LpmTrie,
    PerCpuArray,
    PerCpuHashMap,
    /// Its size is in bytes, not entries.
    RingBuf,
}

impl MapKind {
    /// The kernel's word for the type, as `bpftool` prints it.
    pub const fn as_str(self) -> &'static str {
        match self {
            MapKind::Array => "array",
            MapKind::HashMap | MapKind::SparseHashMap => "hash",
            MapKind::LruHashMap => "lru_hash",
            MapKind::LpmTrie => "lpm_trie",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::PerCpuHashMap => "percpu_hash",
            MapKind::RingBuf => "ringbuf",
        }
    }
}

/// One map of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    pub kind: MapKind,
    pub max_entries: u32,
}

/// The table. `$callback` is a macro taking entries of the form
/// `#[doc] IDENT, "NAME", Kind<Key, Value>, max_entries;` (arrays have a
/// value type only).
#[macro_export]
macro_rules! kernel_maps {
    ($callback:ident) => {
        $callback! {
            /// Run-time settings the broker writes once at start.
            SETTINGS, "OASIS_SETTINGS", Array<$crate::Settings>, 1;
            /// CLOCK_MONOTONIC nanoseconds of the broker's last sign of life:
            /// of its packet path ([`HEARTBEAT_PACKETS`], what the
            /// classifier checks) and of its DNS service as well
            /// ([`HEARTBEAT_DNS`], what the DNS hooks check).
            HEARTBEAT, "OASIS_HEARTBEAT", Array<u64>, 2;
            /// Header rules by IP protocol number.
            PROTO, "OASIS_PROTO", Array<$crate::RuleSet>, 256;
            /// 1 for each protocol any rule has named since the daemon
            /// started: packets of any other protocol cannot belong to a
            /// diverted flow, and pass without a look at the flow cache.
            PROTO_SEEN, "OASIS_PROTO_SEEN", Array<u8>, 256;
            /// Header rules by destination prefix. Each entry already holds
            /// every rule whose prefix covers it, so the longest match alone
            /// is the answer.
            DST_V4, "OASIS_DST_V4", LpmTrie<[u8; 4], $crate::RuleSet>, $crate::MAX_DST_PREFIXES;
            DST_V6, "OASIS_DST_V6", LpmTrie<[u8; 16], $crate::RuleSet>, $crate::MAX_DST_PREFIXES;
            /// Header rules by destination and source port; ranges are
            /// stored as port prefixes (at most 32 per rule and field).
            DPORT, "OASIS_DPORT", LpmTrie<$crate::PortBytes, $crate::RuleSet>, $crate::MAX_RULES as u32 * 32 + 1;
            SPORT, "OASIS_SPORT", LpmTrie<$crate::PortBytes, $crate::RuleSet>, $crate::MAX_RULES as u32 * 32 + 1;
            /// Index 0: the rules that ask for no port at all, the only ones
            /// a packet without ports (ICMP, fragments) can match.
            PORTLESS, "OASIS_PORTLESS", Array<$crate::RuleSet>, 1;
            /// What each rule rank does.
            ACTIONS, "OASIS_ACTIONS", Array<$crate::RuleAction>, $crate::MAX_RULES as u32;
            /// How the rules use the sending socket (index 0).
            OWNER, "OASIS_OWNER", Array<$crate::OwnerMatch>, 1;
            /// Rules by the uid owning the sending socket.
            RULE_UID, "OASIS_RULE_UID", HashMap<u32, $crate::RuleSet>, $crate::OWNER_ENTRIES;
            /// Rules by cgroup id: a socket in the cgroup or below it.
            RULE_CGROUP, "OASIS_RULE_CGROUP", HashMap<u64, $crate::RuleSet>, $crate::OWNER_ENTRIES;
            /// A cgroup's rules by cgroup, worked out once from its
            /// ancestors: one lookup for each new flow after the first.
            CGROUP_MEMO, "OASIS_CGROUP_MEMO", LruHashMap<u64, $crate::CgroupRules>, $crate::CGROUP_MEMO_ENTRIES;
            /// Each CPU's room for a `CgroupRules` being written.
            RULE_MEMO_SLOT, "OASIS_RULE_MEMO_SLOT", PerCpuArray<$crate::CgroupRules>, 1;
            /// Rules by the name of the process that opened the socket.
            RULE_APP, "OASIS_RULE_APP", HashMap<$crate::AppName, $crate::RuleSet>, $crate::OWNER_ENTRIES;
            /// Each CPU's room for the rule sets a match builds (the rules
            /// a packet's headers admit; the union of its socket's cgroup
            /// levels): too big for the programs' 512-byte stack.
            RULE_SCRATCH, "OASIS_RULE_SCRATCH", PerCpuArray<$crate::RuleSet>, 2;
            /// Socket cookie → the name of the process that connected it
            /// (or sent on it), recorded by the socket hooks: at TC egress
            /// the sending process is no longer known.
            SOCKET_APP, "OASIS_SOCKET_APP", LruHashMap<u64, $crate::AppName>, $crate::SOCKET_APPS;
            /// Packets and bytes per rule id; the broker creates an entry per rule.
            COUNTERS, "OASIS_COUNTERS", PerCpuHashMap<u32, $crate::Counters>, $crate::MAX_RULES as u32;
            /// The verdict cache of flows that pass: a flow's verdict,
            /// decided on its first packet.
            FLOWS, "OASIS_FLOWS", LruHashMap<$crate::FlowKey, $crate::FlowEntry>, $crate::FLOW_CACHE_ENTRIES;
            /// The verdicts of flows a rule claimed (`Divert`, `Measure`),
            /// apart from `FLOWS`: a flood of short flows nobody claimed can
            /// never push a live claimed flow's verdict out, after which its
            /// packets would meet the rules afresh (and pass, its rule gone).
            CLAIMED, "OASIS_CLAIMED", LruHashMap<$crate::FlowKey, $crate::FlowEntry>, $crate::CLAIMED_ENTRIES;
            /// Fragmented datagrams a rule claimed, by their first
            /// fragment's verdict: the later fragments (no ports) take the
            /// same way instead of leaving on the underlay.
            FRAGMENTS, "OASIS_FRAGMENTS", LruHashMap<$crate::FragKey, $crate::FlowEntry>, $crate::FRAGMENTS_ENTRIES;
            /// Each CPU's most recent flow that passes (never a diverted
            /// one, whose verdict the broker may change), in front of the
            /// verdict cache.
            RECENT, "OASIS_RECENT", PerCpuArray<$crate::RecentFlow>, 1;
            /// The classifier's own counters (see `stat`).
            STATS, "OASIS_STATS", PerCpuArray<u64>, $crate::stat::COUNT;
            /// In-kernel NAT of fake-address flows carried by the underlay:
            /// the flow as the application sends it → the real destination.
            NAT_OUT, "OASIS_NAT_OUT", SparseHashMap<$crate::FlowKey, $crate::NatEntry>, $crate::NAT_ENTRIES;
            /// The reply as it arrives → the fake source to put in its place.
            NAT_IN, "OASIS_NAT_IN", SparseHashMap<$crate::FlowKey, $crate::NatEntry>, $crate::NAT_ENTRIES;
            /// Replies of in-kernel NAT flows that came fragmented: the
            /// fake source their first fragment got, for the later ones
            /// (no ports to look them up by).
            NAT_FRAGMENTS, "OASIS_NAT_FRAGMENTS", LruHashMap<$crate::FragKey, [u8; 16]>, $crate::FRAGMENTS_ENTRIES;
            /// Index 0: how many flows the NAT maps hold. While none, the
            /// uplinks' ingress program looks at nothing.
            NAT_ACTIVE, "OASIS_NAT_ACTIVE", Array<u32>, 1;
            /// What the DNS redirect needs to know.
            DNS_SETTINGS, "OASIS_DNS_SETTINGS", Array<$crate::DnsSettings>, 1;
            /// The host's own DNS servers (IPv4 in the first 4 bytes): a
            /// query to one goes to the broker's DNS port, a query to any
            /// other to its explicit port.
            DNS_SYSTEM, "OASIS_DNS_SYSTEM", HashMap<[u8; 16], u8>, $crate::DNS_SYSTEM_ENTRIES;
            /// Socket cookie → the DNS server the application asked for.
            DNS_ORIGINAL, "OASIS_DNS_ORIGINAL", LruHashMap<u64, $crate::DnsOriginal>, $crate::DNS_SOCKETS;
            /// Fragmented replies the exit node steers: the later
            /// fragments (no ports) follow their first.
            EXIT_FRAGMENTS, "OASIS_EXIT_FRAGMENTS", LruHashMap<$crate::FragKey, u8>, $crate::FRAGMENTS_ENTRIES;
            /// What the exit node's ingress program steers.
            EXIT_SETTINGS, "OASIS_EXIT_SETTINGS", Array<$crate::ExitSettings>, 1;
            /// The exit's fast path (`exit_fast`): a client's flow as its
            /// datagrams arrive → the NAT source it leaves from.
            EXIT_OUT, "OASIS_EXIT_OUT", SparseHashMap<$crate::ExitFlowKey, $crate::ExitOut>, $crate::EXIT_FAST_FLOWS;
            /// A reply as it arrives → the client it goes back to.
            EXIT_BACK, "OASIS_EXIT_BACK", SparseHashMap<$crate::FlowKey, $crate::ExitBack>, $crate::EXIT_FAST_FLOWS;
            /// Packets and bytes the kernel carried, per class and way.
            EXIT_FAST_COUNTS, "OASIS_EXIT_FAST_COUNTS", PerCpuArray<$crate::ExitFastCounts>, $crate::EXIT_FAST_CLASSES;
            /// Packets of carried flows left to user space, by reason
            /// (`exit_miss`).
            EXIT_FAST_MISSES, "OASIS_EXIT_FAST_MISSES", PerCpuArray<u64>, $crate::exit_miss::COUNT;
            /// Flows and probes measured for the Monitor.
            MONITORED, "OASIS_MONITORED", LruHashMap<$crate::FlowKey, $crate::Measure>, $crate::MONITORED_ENTRIES;
            /// Measurements on their way to the broker (`MonitorEvent`s).
            MONITOR_EVENTS, "OASIS_MONITOR_EVENTS", RingBuf<$crate::MonitorEvent>, $crate::MONITOR_EVENTS_BYTES;
            /// Index 0: how many entries `MONITORED` holds. While none, the
            /// uplinks' ingress program measures nothing.
            MONITOR_ACTIVE, "OASIS_MONITOR_ACTIVE", Array<u32>, 1;
            /// Index 0: how many claimed flows the broker left to the
            /// kernel (at least; the kernel may have evicted some). While
            /// none, the uplinks' ingress program looks for none of their
            /// FINs and RSTs.
            PINNED_ACTIVE, "OASIS_PINNED_ACTIVE", Array<u32>, 1;
            /// Overlay flows the kernel wraps itself: the flow as it leaves
            /// the host → its entry node and shim (`encap.rs`).
            ENCAP, "OASIS_ENCAP", SparseHashMap<$crate::FlowKey, $crate::EncapEntry>, $crate::ENCAP_ENTRIES;
            /// The entry nodes of those flows → their overlay's shim length:
            /// only their datagrams are opened in the kernel.
            ENCAP_PEERS, "OASIS_ENCAP_PEERS", HashMap<$crate::EncapPeer, u32>, $crate::ENCAP_PEERS;
            /// Index 0: how many flows `ENCAP` holds. While none, the
            /// uplinks' ingress program opens no datagram.
            ENCAP_ACTIVE, "OASIS_ENCAP_ACTIVE", Array<u32>, 1;
        }
    };
}

macro_rules! map_defs {
    ($($(#[$doc:meta])* $id:ident, $name:tt, $kind:ident<$($arg:ty),+>, $size:expr;)*) => {
        $(
            $(#[$doc])*
            pub const $id: MapDef = MapDef { name: $name, kind: MapKind::$kind, max_entries: $size };
        )*
        /// Every map, in table order.
        pub const ALL: &[MapDef] = &[$($id),*];
    };
}

kernel_maps!(map_defs);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sizes_set() {
        for (i, map) in ALL.iter().enumerate() {
            assert!(map.name.starts_with("OASIS_"), "{}", map.name);
            assert!(map.max_entries > 0, "{}", map.name);
            assert!(
                ALL[..i].iter().all(|other| other.name != map.name),
                "{} twice",
                map.name
            );
        }
        assert_eq!(FLOWS.kind.as_str(), "lru_hash");
    }
}
