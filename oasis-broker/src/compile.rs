//! Compiles an ordered rule list into the classifier's map contents.
//!
//! The classifier finds a flow's rule with one lookup per header field, each
//! returning the set of rules (a bit per rule rank) that field admits; the
//! intersection's lowest bit is the first matching rule. For prefix fields
//! (destination address, and port ranges written as port prefixes) the
//! lookup is longest-prefix match, so every stored prefix carries the rules
//! of all stored prefixes that contain it: whichever entry the kernel finds
//! is then already the complete answer.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use oasis_common::{
    AppName, CGROUP_DEPTHS, FAMILY_V4, FlowKey, OwnerMatch, RuleAction, RuleSet, Verdict, owner,
};

use crate::rules::{PortRange, Rule};
use crate::sender::{CgroupPath, Sender};

/// A longest-prefix-match key: prefix length in bits and the address bytes
/// with host bits cleared.
pub type Prefix<const N: usize> = (u32, [u8; N]);

/// Everything the classifier's rule maps must hold for one rule list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapImage {
    /// Indexed by IP protocol number.
    pub proto: Vec<RuleSet>,
    pub dst_v4: BTreeMap<Prefix<4>, RuleSet>,
    pub dst_v6: BTreeMap<Prefix<16>, RuleSet>,
    pub dport: BTreeMap<Prefix<2>, RuleSet>,
    pub sport: BTreeMap<Prefix<2>, RuleSet>,
    /// Rules a packet without ports can match.
    pub portless: RuleSet,
    /// Indexed by rank.
    pub actions: Vec<RuleAction>,
    /// Which sender fields the rules use, and the rules naming none.
    pub owner: OwnerMatch,
    /// The rules naming each uid, cgroup id and application.
    pub by_uid: BTreeMap<u32, RuleSet>,
    pub by_cgroup: BTreeMap<u64, RuleSet>,
    pub by_app: BTreeMap<AppName, RuleSet>,
}

/// The ids the rules' cgroups have now; one missing (a unit not started)
/// gives its rules nothing to match.
pub type CgroupIds = BTreeMap<CgroupPath, u64>;

/// Builds the map contents. Every rule diverts to the broker, which then
/// carries the flow by the rule's carrier.
pub fn compile(rules: &[Rule]) -> MapImage {
    compile_for(rules, &CgroupIds::new())
}

/// As [`compile`], with the ids of the cgroups the rules name.
pub fn compile_for(rules: &[Rule], cgroup_ids: &CgroupIds) -> MapImage {
    let mut proto = vec![RuleSet::EMPTY; 256];
    let mut portless = RuleSet::EMPTY;
    for (rank, rule) in rules.iter().enumerate() {
        match rule.subset.proto {
            Some(p) => p.numbers().iter().for_each(|&n| proto[n as usize].insert(rank)),
            None => proto.iter_mut().for_each(|set| set.insert(rank)),
        }
        if rule.subset.dport.is_none() && rule.subset.sport.is_none() {
            portless.insert(rank);
        }
    }

    let dst_v4 = prefix_table(rules, |rule, add| {
        match (&rule.subset.dst, &rule.subset.dst_set) {
            (None, None) => add((0, [0; 4])),
            (Some(IpNet::V4(net)), _) => add((u32::from(net.prefix_len()), net.network().octets())),
            (Some(IpNet::V6(_)), _) => {}
            (None, Some(set)) => set
                .v4()
                .iter()
                .for_each(|net| add((u32::from(net.prefix_len()), net.network().octets()))),
        }
    });
    let dst_v6 = prefix_table(rules, |rule, add| {
        match (&rule.subset.dst, &rule.subset.dst_set) {
            (None, None) => add((0, [0; 16])),
            (Some(IpNet::V6(net)), _) => add((u32::from(net.prefix_len()), net.network().octets())),
            (Some(IpNet::V4(_)), _) => {}
            (None, Some(set)) => set
                .v6()
                .iter()
                .for_each(|net| add((u32::from(net.prefix_len()), net.network().octets()))),
        }
    });
    let dport = prefix_table(rules, |rule, add| {
        port_prefixes(rule.subset.dport).into_iter().for_each(add)
    });
    let sport = prefix_table(rules, |rule, add| {
        port_prefixes(rule.subset.sport).into_iter().for_each(add)
    });

    let actions = rules
        .iter()
        .map(|rule| RuleAction {
            rule_id: rule.id,
            verdict: Verdict::Divert as u8,
            _pad: [0; 3],
        })
        .collect();
    let (owner, by_uid, by_cgroup, by_app) = senders(rules, cgroup_ids);
    MapImage {
        proto,
        dst_v4,
        dst_v6,
        dport,
        sport,
        portless,
        actions,
        owner,
        by_uid,
        by_cgroup,
        by_app,
    }
}

type SenderTables = (
    OwnerMatch,
    BTreeMap<u32, RuleSet>,
    BTreeMap<u64, RuleSet>,
    BTreeMap<AppName, RuleSet>,
);

/// The sender maps: a rule is in the `any` set of each field it leaves
/// out, and in the named value's set of each field it gives.
fn senders(rules: &[Rule], cgroup_ids: &CgroupIds) -> SenderTables {
    let mut owner = OwnerMatch::default();
    let (mut by_uid, mut by_cgroup, mut by_app) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut levels: Vec<u8> = Vec::new();
    for (rank, rule) in rules.iter().enumerate() {
        let sender = &rule.subset.sender;
        match sender.uid {
            None => owner.any_uid.insert(rank),
            Some(uid) => {
                owner.fields |= owner::UID;
                by_uid.entry(uid).or_insert(RuleSet::EMPTY).insert(rank);
            }
        }
        match &sender.cgroup {
            None => owner.any_cgroup.insert(rank),
            Some(path) => {
                owner.fields |= owner::CGROUP;
                let level = path.level() as u8;
                if !levels.contains(&level) {
                    levels.push(level);
                }
                if let Some(&id) = cgroup_ids.get(path) {
                    by_cgroup.entry(id).or_insert(RuleSet::EMPTY).insert(rank);
                }
            }
        }
        match &sender.app {
            None => owner.any_app.insert(rank),
            Some(app) => {
                owner.fields |= owner::APP;
                by_app.entry(app.key()).or_insert(RuleSet::EMPTY).insert(rank);
            }
        }
    }
    // The rule list refuses a fifth depth (`RuleSet::add`).
    levels.sort_unstable();
    for (slot, level) in owner
        .cgroup_levels
        .iter_mut()
        .zip(levels.iter().take(CGROUP_DEPTHS))
    {
        *slot = *level;
    }
    // What the kernel remembers per cgroup holds while all of this is the
    // same: named by its digest, so equal rules give equal generations.
    let mut digest = std::hash::DefaultHasher::new();
    let named: Vec<(u64, [u64; oasis_common::RULE_WORDS])> = by_cgroup
        .iter()
        .map(|(id, set): (&u64, &RuleSet)| (*id, set.words))
        .collect();
    std::hash::Hash::hash(&(owner.cgroup_levels, owner.any_cgroup.words, named), &mut digest);
    owner.generation = std::hash::Hasher::finish(&digest);
    (owner, by_uid, by_cgroup, by_app)
}

/// For each rule, `prefixes_of` hands `add` the prefixes it covers (none:
/// the rule can never match on this field). Each distinct prefix then gets
/// the set of rules having some prefix that contains it.
///
/// Linear after a sort, for prefix sets of 100,000s of entries: in address
/// order, a shorter prefix before the longer ones at the same address,
/// every prefix comes after all prefixes containing it, and those form a
/// chain kept on a stack.
fn prefix_table<const N: usize>(
    rules: &[Rule],
    prefixes_of: impl Fn(&Rule, &mut dyn FnMut(Prefix<N>)),
) -> BTreeMap<Prefix<N>, RuleSet> {
    let mut own: HashMap<Prefix<N>, RuleSet> = HashMap::new();
    for (rank, rule) in rules.iter().enumerate() {
        prefixes_of(rule, &mut |prefix| {
            own.entry(prefix).or_insert(RuleSet::EMPTY).insert(rank)
        });
    }
    let mut sorted: Vec<(Prefix<N>, RuleSet)> = own.into_iter().collect();
    sorted.sort_unstable_by_key(|&((len, bytes), _)| (bytes, len));
    let mut enclosing: Vec<(Prefix<N>, RuleSet)> = Vec::new();
    let mut table = BTreeMap::new();
    for (prefix, mut set) in sorted {
        while enclosing
            .last()
            .is_some_and(|(outer, _)| !prefix_contains(outer, &prefix))
        {
            enclosing.pop();
        }
        if let Some((_, outer)) = enclosing.last() {
            set.union_with(outer);
        }
        enclosing.push((prefix, set));
        table.insert(prefix, set);
    }
    table
}

/// Whether `outer` contains `inner` (both with host bits cleared).
fn prefix_contains<const N: usize>(outer: &Prefix<N>, inner: &Prefix<N>) -> bool {
    outer.0 <= inner.0 && mask(&inner.1, outer.0) == outer.1
}

fn mask<const N: usize>(bytes: &[u8; N], bits: u32) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in bytes.iter().enumerate() {
        let start = i as u32 * 8;
        if bits >= start + 8 {
            out[i] = *byte;
        } else if bits > start {
            out[i] = byte & (0xffu8 << (8 - (bits - start)));
        }
    }
    out
}

/// The fewest port prefixes whose union is the range (the whole port space
/// for no range). Each is the largest aligned block that fits.
pub fn port_prefixes(range: Option<PortRange>) -> Vec<Prefix<2>> {
    let Some(range) = range else {
        return vec![(0, [0, 0])];
    };
    let mut out = Vec::new();
    let (mut first, last) = (u32::from(range.first), u32::from(range.last));
    while first <= last {
        let mut size_bits = first.trailing_zeros().min(16);
        while first + (1 << size_bits) - 1 > last {
            size_bits -= 1;
        }
        out.push((16 - size_bits, (first as u16).to_be_bytes()));
        first += 1 << size_bits;
    }
    out
}

impl Default for MapImage {
    /// The maps of an empty rule list.
    fn default() -> Self {
        compile(&[])
    }
}

impl MapImage {
    /// What the classifier will answer for a flow with no local socket.
    pub fn lookup(&self, key: &FlowKey) -> Option<RuleAction> {
        self.lookup_from(key, None)
    }

    /// What the classifier will answer for a flow sent from `sender`,
    /// computed the way the kernel does it (longest-prefix lookups,
    /// intersection, the sender's sets, lowest rank).
    pub fn lookup_from(&self, key: &FlowKey, sender: Option<&Sender>) -> Option<RuleAction> {
        let mut set = self.proto[key.proto as usize];
        let by_dst = if key.family == FAMILY_V4 {
            longest_match(&self.dst_v4, [key.dst[0], key.dst[1], key.dst[2], key.dst[3]], 32)?
        } else {
            longest_match(&self.dst_v6, key.dst, 128)?
        };
        set.intersect_with(&by_dst);
        if !key.has_ports() {
            set.intersect_with(&self.portless);
        } else {
            set.intersect_with(&longest_match(&self.dport, key.dport.to_be_bytes(), 16)?);
            set.intersect_with(&longest_match(&self.sport, key.sport.to_be_bytes(), 16)?);
        }
        if self.owner.fields != 0 {
            self.restrict(&mut set, sender);
        }
        self.actions.get(set.lowest_rank()? as usize).copied()
    }
}

impl MapImage {
    /// oasis-ebpf/src/owner.rs, step by step.
    fn restrict(&self, set: &mut RuleSet, sender: Option<&Sender>) {
        let owner = &self.owner;
        let Some(sender) = sender else {
            set.intersect_with(&owner.any_uid);
            set.intersect_with(&owner.any_cgroup);
            set.intersect_with(&owner.any_app);
            return;
        };
        let keep = |set: &mut RuleSet, any: &RuleSet, named: Option<&RuleSet>| {
            let mut allowed = *any;
            if let Some(named) = named {
                allowed.union_with(named);
            }
            set.intersect_with(&allowed);
        };
        if owner.fields & owner::UID != 0 {
            keep(set, &owner.any_uid, self.by_uid.get(&sender.uid));
        }
        if owner.fields & owner::CGROUP != 0 {
            let mut allowed = owner.any_cgroup;
            for &level in owner.cgroup_levels.iter().take_while(|&&l| l != 0) {
                let id = sender.cgroups.get(usize::from(level)).copied().unwrap_or(0);
                if let Some(named) = self.by_cgroup.get(&id) {
                    allowed.union_with(named);
                }
            }
            set.intersect_with(&allowed);
        }
        if owner.fields & owner::APP != 0 {
            keep(
                set,
                &owner.any_app,
                sender.app.and_then(|app| self.by_app.get(&app)),
            );
        }
    }
}

fn longest_match<const N: usize>(
    table: &BTreeMap<Prefix<N>, RuleSet>,
    addr: [u8; N],
    bits: u32,
) -> Option<RuleSet> {
    (0..=bits)
        .rev()
        .find_map(|len| table.get(&(len, mask(&addr, len))).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_set::PrefixSet;
    use crate::rules::{Carrier, HeaderSubset, PortRange, Protocol};
    use crate::sender::{App, SenderMatch};
    use oasis_common::FAMILY_V6;
    use std::sync::Arc;

    #[test]
    fn port_ranges_become_minimal_prefixes() {
        assert_eq!(
            port_prefixes(Some(PortRange {
                first: 8080,
                last: 8080
            })),
            vec![(16, 8080u16.to_be_bytes())]
        );
        assert_eq!(
            port_prefixes(Some(PortRange {
                first: 1,
                last: 65535
            }))
            .len(),
            16
        );
        assert_eq!(
            port_prefixes(Some(PortRange {
                first: 1024,
                last: 2047
            })),
            vec![(6, 1024u16.to_be_bytes())]
        );
        // Every port of a range is covered exactly once, and nothing else.
        for (first, last) in [(1u16, 1u16), (3, 17), (1000, 2000), (65000, 65535), (80, 443)] {
            let prefixes = port_prefixes(Some(PortRange { first, last }));
            for port in 0..=65535u16 {
                let hits = prefixes
                    .iter()
                    .filter(|p| prefix_contains(p, &(16, port.to_be_bytes())))
                    .count();
                assert_eq!(
                    hits,
                    usize::from((first..=last).contains(&port)),
                    "port {port} in {first}-{last}"
                );
            }
        }
    }

    /// A small deterministic generator, so the cross-check is reproducible.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_range(rng: &mut XorShift) -> Option<PortRange> {
        match rng.below(3) {
            0 => None,
            1 => {
                let p = 1 + rng.below(100) as u16;
                Some(PortRange { first: p, last: p })
            }
            _ => {
                let a = 1 + rng.below(100) as u16;
                let b = a + rng.below(40) as u16;
                Some(PortRange { first: a, last: b })
            }
        }
    }

    fn random_rules(rng: &mut XorShift, count: usize) -> Vec<Rule> {
        let mut rules = Vec::new();
        for id in 1..=count as u32 {
            let proto = [
                None,
                Some(Protocol::Tcp),
                Some(Protocol::Udp),
                Some(Protocol::Icmp),
            ][rng.below(4) as usize];
            let dst: Option<IpNet> = match rng.below(5) {
                0 | 4 => None,
                1 => Some(
                    format!("10.{}.0.0/{}", rng.below(4), 8 + rng.below(17))
                        .parse::<IpNet>()
                        .unwrap()
                        .trunc(),
                ),
                2 => Some(
                    format!("10.{}.{}.{}/32", rng.below(4), rng.below(2), rng.below(4))
                        .parse()
                        .unwrap(),
                ),
                _ => Some(
                    format!("fd00:{}::/{}", rng.below(4), 16 + rng.below(100))
                        .parse::<IpNet>()
                        .unwrap()
                        .trunc(),
                ),
            };
            let ports = proto.is_none_or(|p| p.has_ports());
            let dport = if ports { random_range(rng) } else { None };
            let sport = if ports && rng.below(4) == 0 {
                random_range(rng)
            } else {
                None
            };
            // A prefix set, overlapping the other rules' prefixes and
            // itself (nested, equal, adjacent), of both families.
            let dst_set = (dst.is_none() && rng.below(2) == 0).then(|| {
                let mut text = String::new();
                for _ in 0..1 + rng.below(12) {
                    if rng.below(3) == 0 {
                        let net: IpNet = format!("fd00:{}::/{}", rng.below(4), 16 + rng.below(100))
                            .parse()
                            .unwrap();
                        text.push_str(&format!("{}\n", net.trunc()));
                    } else {
                        let net: IpNet = format!(
                            "10.{}.{}.{}/{}",
                            rng.below(4),
                            rng.below(2),
                            rng.below(4),
                            8 + rng.below(25)
                        )
                        .parse()
                        .unwrap();
                        text.push_str(&format!("{}\n", net.trunc()));
                    }
                }
                Arc::new(PrefixSet::parse("set.txt", &text).unwrap())
            });
            let sender = SenderMatch {
                uid: (rng.below(4) == 0).then(|| [0, 1000, 1001][rng.below(3) as usize]),
                cgroup: (rng.below(4) == 0)
                    .then(|| CgroupPath::parse(CGROUPS[rng.below(CGROUPS.len() as u64) as usize].0).unwrap()),
                app: (rng.below(4) == 0).then(|| {
                    App::parse(["curl", "firefox", "/usr/bin/wget"][rng.below(3) as usize]).unwrap()
                }),
            };
            let subset = HeaderSubset {
                proto,
                dst,
                dst_set,
                dport,
                sport,
                sender,
            };
            rules.push(Rule {
                id,
                subset,
                via: Carrier::Underlay,
            });
        }
        rules
    }

    /// A cgroup tree: paths and their ids (0: not there now).
    const CGROUPS: [(&str, u64); 6] = [
        ("a", 10),
        ("a/b", 11),
        ("a/b/c", 12),
        ("d", 20),
        ("d/e", 21),
        ("x/y", 0),
    ];

    fn cgroup_ids() -> CgroupIds {
        CGROUPS
            .iter()
            .filter(|(_, id)| *id != 0)
            .map(|(path, id)| (CgroupPath::parse(path).unwrap(), *id))
            .collect()
    }

    /// A packet's socket, or none (forwarded): its cgroup and ancestors
    /// from the tree, or a cgroup no rule names.
    fn random_sender(rng: &mut XorShift) -> Option<Sender> {
        if rng.below(4) == 0 {
            return None;
        }
        let chains: [&[u64]; 6] = [
            &[1],
            &[1, 10],
            &[1, 10, 11],
            &[1, 10, 11, 12],
            &[1, 20, 21],
            &[1, 30, 31],
        ];
        let apps = [None, Some("curl"), Some("firefox"), Some("wget"), Some("ssh")];
        Some(Sender {
            uid: [0, 1000, 1001, 1002][rng.below(4) as usize],
            cgroups: chains[rng.below(6) as usize].to_vec(),
            app: apps[rng.below(5) as usize].map(|a| App::parse(a).unwrap().key()),
        })
    }

    /// The maps must answer for sender rules as first match does, for
    /// packets of any socket and of none.
    #[test]
    fn sender_rules_agree_with_first_match() {
        let mut rng = XorShift(0x5eed_0a51_5000_0007);
        let ids = cgroup_ids();
        for round in 0..200 {
            let count = 1 + rng.below(40) as usize;
            let rules = random_rules(&mut rng, count);
            let image = compile_for(&rules, &ids);
            for _ in 0..300 {
                let key = random_key(&mut rng);
                let sender = random_sender(&mut rng);
                let expected = rules
                    .iter()
                    .find(|r| {
                        r.subset
                            .matches_from(&key, sender.as_ref(), |p| ids.get(p).copied())
                    })
                    .map(|r| r.id);
                let got = image.lookup_from(&key, sender.as_ref()).map(|a| a.rule_id);
                assert_eq!(
                    got, expected,
                    "round {round}, key {key:?}, sender {sender:?}, rules {rules:#?}"
                );
            }
        }
    }

    fn random_key(rng: &mut XorShift) -> FlowKey {
        let proto = [6u8, 17, 1, 58, 47][rng.below(5) as usize];
        let mut key = FlowKey {
            proto,
            ..Default::default()
        };
        if rng.below(3) == 0 {
            key.family = FAMILY_V6;
            key.dst[0] = 0xfd;
            key.dst[3] = rng.below(4) as u8;
            key.dst[15] = rng.below(255) as u8;
        } else {
            key.family = FAMILY_V4;
            key.dst[..4].copy_from_slice(&[10, rng.below(4) as u8, rng.below(2) as u8, rng.below(4) as u8]);
        }
        if matches!(proto, 6 | 17) {
            key.dport = 1 + rng.below(150) as u16;
            key.sport = 1 + rng.below(150) as u16;
        }
        key
    }

    /// The compiled maps must answer exactly as "first rule that matches".
    #[test]
    fn compiled_maps_agree_with_first_match() {
        let mut rng = XorShift(0x5eed_0a51_5000_0001);
        for round in 0..200 {
            let count = 1 + rng.below(40) as usize;
            let rules = random_rules(&mut rng, count);
            let image = compile(&rules);
            for _ in 0..300 {
                let key = random_key(&mut rng);
                let expected = rules.iter().find(|r| r.subset.matches(&key)).map(|r| r.id);
                let got = image.lookup(&key).map(|a| a.rule_id);
                assert_eq!(got, expected, "round {round}, key {key:?}, rules {rules:#?}");
            }
        }
    }

    /// A country-sized set in one rule, between two ordinary rules: one
    /// classifier entry per merged prefix, and the answers of first match.
    #[test]
    fn a_hundred_thousand_prefixes_in_one_rule() {
        let mut rng = XorShift(0x0a51_5000_5e70_0001);
        let text: String = (0..100_000)
            .map(|_| {
                let block = 0x0100_0000 + rng.below(0xdf00_0000 - 0x0100_0000) as u32;
                format!("{}/24\n", std::net::Ipv4Addr::from(block & 0xffff_ff00))
            })
            .collect();
        let set = Arc::new(PrefixSet::parse("world.txt", &text).unwrap());
        let header = |dst: Option<&str>, set: Option<Arc<PrefixSet>>, dport: Option<u16>| HeaderSubset {
            proto: Some(Protocol::Tcp),
            dst: dst.map(|d| d.parse().unwrap()),
            dst_set: set,
            dport: dport.map(|p| PortRange { first: p, last: p }),
            sport: None,
            sender: SenderMatch::default(),
        };
        let rules = vec![
            Rule {
                id: 1,
                subset: header(Some("8.8.8.0/24"), None, Some(53)),
                via: Carrier::Underlay,
            },
            Rule {
                id: 2,
                subset: header(None, Some(set.clone()), None),
                via: Carrier::Underlay,
            },
            Rule {
                id: 3,
                subset: header(None, None, Some(443)),
                via: Carrier::Underlay,
            },
        ];
        let image = compile(&rules);
        let distinct = set.v4().len() + usize::from(!set.contains("8.8.8.1".parse().unwrap()));
        // The set's prefixes, rule 1's unless the set holds it, rule 3's /0.
        assert_eq!(image.dst_v4.len(), distinct + 1);
        let listed: Vec<[u8; 4]> = text
            .lines()
            .map(|l| {
                l.trim_end_matches("/24")
                    .parse::<std::net::Ipv4Addr>()
                    .unwrap()
                    .octets()
            })
            .collect();
        for i in 0..20_000 {
            let dst = if i % 2 == 0 {
                let mut a = listed[rng.below(listed.len() as u64) as usize];
                a[3] = rng.below(256) as u8;
                a
            } else {
                (rng.below(u32::MAX as u64) as u32).to_be_bytes()
            };
            let dport = [53, 443, 80][rng.below(3) as usize];
            let key = FlowKey::v4([10, 0, 0, 1], dst, 6, 40_000, dport);
            let expected = rules.iter().find(|r| r.subset.matches(&key)).map(|r| r.id);
            assert_eq!(image.lookup(&key).map(|a| a.rule_id), expected, "{key:?}");
        }
    }

    #[test]
    fn no_rules_means_no_entries() {
        let image = compile(&[]);
        assert!(image.dst_v4.is_empty() && image.dport.is_empty() && image.actions.is_empty());
        assert!(image.proto.iter().all(RuleSet::is_empty));
    }
}
