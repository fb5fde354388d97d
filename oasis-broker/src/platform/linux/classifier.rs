//! The classifier's maps (oasis-ebpf/src/classifier.rs): the rule maps the
//! compiler's image is written to, the per-rule counters, the flow cache
//! and the program's own counters.

use std::collections::BTreeMap;

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use oasis_common::{
    AppName, Counters, FlowEntry, FlowKey, MAX_RULES, OwnerMatch, PortBytes, RecentFlow, RuleAction, RuleSet,
    maps, stat,
};

use super::sys::{KernelError, take_map};
use crate::compile::{MapImage, Prefix};
use crate::control::ClassifierCounters;

pub struct ClassifierMaps {
    proto: Array<MapData, RuleSet>,
    proto_seen: Array<MapData, u8>,
    /// Protocols some rule has named since the start (never forgotten: a
    /// flow cached under a deleted rule keeps its verdict until idle).
    seen: [bool; 256],
    dst_v4: LpmTrie<MapData, [u8; 4], RuleSet>,
    dst_v6: LpmTrie<MapData, [u8; 16], RuleSet>,
    dport: LpmTrie<MapData, PortBytes, RuleSet>,
    sport: LpmTrie<MapData, PortBytes, RuleSet>,
    portless: Array<MapData, RuleSet>,
    actions: Array<MapData, RuleAction>,
    owner: Array<MapData, OwnerMatch>,
    by_uid: HashMap<MapData, u32, RuleSet>,
    by_cgroup: HashMap<MapData, u64, RuleSet>,
    by_app: HashMap<MapData, AppName, RuleSet>,
    counters: PerCpuHashMap<MapData, u32, Counters>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    claimed: HashMap<MapData, FlowKey, FlowEntry>,
    stats: PerCpuArray<MapData, u64>,
    /// Each CPU's recent flow, which counts its own hits.
    recent: PerCpuArray<MapData, RecentFlow>,
    /// What the rule maps hold now, so updates write only the difference.
    image: Option<MapImage>,
    cpus: usize,
}

impl ClassifierMaps {
    /// The claimed flows' verdicts (the flow pins take a handle of their own).
    pub(super) fn claimed_map(&self) -> &HashMap<MapData, FlowKey, FlowEntry> {
        &self.claimed
    }

    pub(super) fn take(ebpf: &mut Ebpf) -> Result<ClassifierMaps, KernelError> {
        Ok(ClassifierMaps {
            proto: take_map!(ebpf, maps::PROTO, Array<MapData, RuleSet>),
            proto_seen: take_map!(ebpf, maps::PROTO_SEEN, Array<MapData, u8>),
            seen: [false; 256],
            dst_v4: take_map!(ebpf, maps::DST_V4, LpmTrie<MapData, [u8; 4], RuleSet>),
            dst_v6: take_map!(ebpf, maps::DST_V6, LpmTrie<MapData, [u8; 16], RuleSet>),
            dport: take_map!(ebpf, maps::DPORT, LpmTrie<MapData, PortBytes, RuleSet>),
            sport: take_map!(ebpf, maps::SPORT, LpmTrie<MapData, PortBytes, RuleSet>),
            portless: take_map!(ebpf, maps::PORTLESS, Array<MapData, RuleSet>),
            actions: take_map!(ebpf, maps::ACTIONS, Array<MapData, RuleAction>),
            owner: take_map!(ebpf, maps::OWNER, Array<MapData, OwnerMatch>),
            by_uid: take_map!(ebpf, maps::RULE_UID, HashMap<MapData, u32, RuleSet>),
            by_cgroup: take_map!(ebpf, maps::RULE_CGROUP, HashMap<MapData, u64, RuleSet>),
            by_app: take_map!(ebpf, maps::RULE_APP, HashMap<MapData, AppName, RuleSet>),
            counters: take_map!(ebpf, maps::COUNTERS, PerCpuHashMap<MapData, u32, Counters>),
            flows: take_map!(ebpf, maps::FLOWS, HashMap<MapData, FlowKey, FlowEntry>),
            claimed: take_map!(ebpf, maps::CLAIMED, HashMap<MapData, FlowKey, FlowEntry>),
            stats: take_map!(ebpf, maps::STATS, PerCpuArray<MapData, u64>),
            recent: take_map!(ebpf, maps::RECENT, PerCpuArray<MapData, RecentFlow>),
            image: None,
            cpus: aya::util::nr_cpus().map_err(|(_, e)| KernelError::Map {
                map: maps::COUNTERS.name,
                source: Box::new(MapError::IoError(e)),
            })?,
        })
    }

    /// Brings the rule maps to `image`, writing new entries before removing
    /// stale ones. Per-rule counters are created for new rules and dropped
    /// for deleted ones; the flow cache is left alone, so live flows keep
    /// their verdict (a new TCP connection is always matched afresh).
    pub fn apply(&mut self, image: &MapImage) -> Result<(), KernelError> {
        let old = self.image.take();
        let old_ids: std::collections::HashSet<u32> = old
            .iter()
            .flat_map(|i| i.actions.iter().map(|a| a.rule_id))
            .collect();
        let new_ids: std::collections::HashSet<u32> = image.actions.iter().map(|a| a.rule_id).collect();
        for id in new_ids.difference(&old_ids) {
            let zero = PerCpuValues::try_from(vec![Counters::default(); self.cpus]).map_err(|e| {
                KernelError::Map {
                    map: maps::COUNTERS.name,
                    source: Box::new(MapError::IoError(e)),
                }
            })?;
            self.counters
                .insert(id, zero, 0)
                .map_err(KernelError::map(maps::COUNTERS.name))?;
        }
        for rank in 0..MAX_RULES {
            let action = image.actions.get(rank).copied().unwrap_or_default();
            let before = old
                .as_ref()
                .and_then(|i| i.actions.get(rank).copied())
                .unwrap_or_default();
            if old.is_none() || action != before {
                self.actions
                    .set(rank as u32, action, 0)
                    .map_err(KernelError::map(maps::ACTIONS.name))?;
            }
        }
        for (number, set) in image.proto.iter().enumerate() {
            // Seen before the rules can match, so no packet of a new flow
            // is passed by the early test while its rule is being added.
            if !set.is_empty() && !self.seen[number] {
                self.proto_seen
                    .set(number as u32, 1, 0)
                    .map_err(KernelError::map(maps::PROTO_SEEN.name))?;
                self.seen[number] = true;
            }
            if old.as_ref().is_none_or(|i| i.proto[number] != *set) {
                self.proto
                    .set(number as u32, *set, 0)
                    .map_err(KernelError::map(maps::PROTO.name))?;
            }
        }
        self.portless
            .set(0, image.portless, 0)
            .map_err(KernelError::map(maps::PORTLESS.name))?;
        let empty = MapImage::default();
        let before = old.as_ref().unwrap_or(&empty);
        sync_trie(&mut self.dst_v4, &before.dst_v4, &image.dst_v4)
            .map_err(KernelError::map(maps::DST_V4.name))?;
        sync_trie(&mut self.dst_v6, &before.dst_v6, &image.dst_v6)
            .map_err(KernelError::map(maps::DST_V6.name))?;
        sync_trie(&mut self.dport, &before.dport, &image.dport)
            .map_err(KernelError::map(maps::DPORT.name))?;
        sync_trie(&mut self.sport, &before.sport, &image.sport)
            .map_err(KernelError::map(maps::SPORT.name))?;
        // The named senders' sets before the fields that make the
        // classifier read them, and stale ones after.
        sync_hash(&mut self.by_uid, &before.by_uid, &image.by_uid)
            .map_err(KernelError::map(maps::RULE_UID.name))?;
        sync_hash(&mut self.by_cgroup, &before.by_cgroup, &image.by_cgroup)
            .map_err(KernelError::map(maps::RULE_CGROUP.name))?;
        sync_hash(&mut self.by_app, &before.by_app, &image.by_app)
            .map_err(KernelError::map(maps::RULE_APP.name))?;
        if old.is_none() || before.owner != image.owner {
            self.owner
                .set(0, image.owner, 0)
                .map_err(KernelError::map(maps::OWNER.name))?;
        }
        for id in old_ids.difference(&new_ids) {
            let _ = self.counters.remove(id);
        }
        self.image = Some(image.clone());
        Ok(())
    }

    /// A rule's packets and bytes, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> Counters {
        self.counters
            .get(&rule_id, 0)
            .map(|values| {
                values.iter().fold(Counters::default(), |sum, c| Counters {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                })
            })
            .unwrap_or_default()
    }

    /// Packets the CPUs' recent-flow slots passed by themselves.
    fn recent_hits(&self) -> u64 {
        self.recent
            .get(&0, 0)
            .map(|slots| slots.iter().map(|slot| slot.hits).sum())
            .unwrap_or(0)
    }

    pub fn counters(&self) -> ClassifierCounters {
        let sum = |index: u32| -> u64 { self.stats.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        ClassifierCounters {
            bypassed: sum(stat::BYPASSED),
            fail_open: sum(stat::FAIL_OPEN),
            cache_hits: sum(stat::CACHE_HIT) + self.recent_hits(),
            classified: sum(stat::CLASSIFIED),
            diverted: sum(stat::DIVERTED),
            unparsed: sum(stat::UNPARSED),
            fake_diverted: sum(stat::FAKE_DIVERTED),
            nat_egress: sum(stat::NAT_EGRESS),
            nat_ingress: sum(stat::NAT_INGRESS),
            measured_egress: sum(stat::MEASURED_EGRESS),
            measured_ingress: sum(stat::MEASURED_INGRESS),
            events_lost: sum(stat::EVENTS_LOST),
            encap_packets: sum(stat::ENCAP_PACKETS),
            encap_bytes: sum(stat::ENCAP_BYTES),
            decap_packets: sum(stat::DECAP_PACKETS),
            decap_bytes: sum(stat::DECAP_BYTES),
            fast_too_big: sum(stat::FAST_TOO_BIG),
            fast_no_room: sum(stat::FAST_NO_ROOM),
            fast_aggregate: sum(stat::FAST_AGGREGATE),
            cached_flows: (self.flows.keys().filter(Result::is_ok).count()
                + self.claimed.keys().filter(Result::is_ok).count()) as u64,
        }
    }

    /// The cached verdict for one flow, if the classifier has one.
    pub fn cached_flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).or_else(|_| self.claimed.get(key, 0)).ok()
    }
}

fn sync_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], RuleSet>,
    old: &BTreeMap<Prefix<N>, RuleSet>,
    new: &BTreeMap<Prefix<N>, RuleSet>,
) -> Result<(), MapError> {
    for (&(len, bytes), set) in new {
        if old.get(&(len, bytes)) != Some(set) {
            trie.insert(&Key::new(len, bytes), set, 0)?;
        }
    }
    for &(len, bytes) in old.keys().filter(|k| !new.contains_key(k)) {
        trie.remove(&Key::new(len, bytes))?;
    }
    Ok(())
}

fn sync_hash<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, RuleSet>,
    old: &BTreeMap<K, RuleSet>,
    new: &BTreeMap<K, RuleSet>,
) -> Result<(), MapError> {
    for (key, set) in new {
        if old.get(key) != Some(set) {
            map.insert(key, set, 0)?;
        }
    }
    for key in old.keys().filter(|k| !new.contains_key(k)) {
        map.remove(key)?;
    }
    Ok(())
}
