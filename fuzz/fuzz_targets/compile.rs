//! The classifier's compiler: for any rule list and any flow, sent from
//! any socket or none, the compiled map image answers exactly as "the
//! first rule that matches".
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oasis_broker::compile::{CgroupIds, compile_for};
use oasis_broker::sender::{App, CgroupPath, Sender};
use std::sync::Arc;

use oasis_broker::prefix_set::PrefixSet;
use oasis_broker::rules::{RuleSet, RuleSpec, Subset};
use oasis_common::{FAMILY_V4, FAMILY_V6, FlowKey};

#[derive(Arbitrary, Debug)]
struct FuzzRule {
    proto: u8,
    dst: Option<(bool, [u8; 4], u8)>,
    /// A prefix set, when `dst` is None and this is not empty.
    set: Vec<(bool, [u8; 4], u8)>,
    dport: Option<(u16, u8)>,
    sport: Option<(u16, u8)>,
    /// Who sent it: a uid, a cgroup, an application, by index (0: none).
    sender: (u8, u8, u8),
}

#[derive(Arbitrary, Debug)]
struct FuzzKey {
    proto: u8,
    v6: bool,
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    /// The socket: none (forwarded), or a uid, a cgroup chain, a name.
    sender: Option<(u8, u8, u8)>,
}

const UIDS: [u32; 3] = [0, 1000, 1001];
const APPS: [&str; 3] = ["curl", "firefox", "/usr/bin/wget"];
/// A cgroup tree: paths and their ids now (0: not there).
const CGROUPS: [(&str, u64); 6] = [("a", 10), ("a/b", 11), ("a/b/c", 12), ("d", 20), ("d/e", 21), ("x/y", 0)];
/// Sockets' cgroups with their ancestors, by level from the root.
const CHAINS: [&[u64]; 6] = [&[1], &[1, 10], &[1, 10, 11], &[1, 10, 11, 12], &[1, 20, 21], &[1, 30, 31]];

fn cgroup_ids() -> CgroupIds {
    CGROUPS
        .iter()
        .filter(|(_, id)| *id != 0)
        .map(|(path, id)| (CgroupPath::parse(path).unwrap(), *id))
        .collect()
}

fn socket((uid, chain, app): (u8, u8, u8)) -> Sender {
    Sender {
        uid: UIDS[usize::from(uid) % UIDS.len()] + u32::from(uid / 200),
        cgroups: CHAINS[usize::from(chain) % CHAINS.len()].to_vec(),
        app: (app % 4 != 0).then(|| App::parse(APPS[usize::from(app % 4) - 1]).unwrap().key()),
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    rules: Vec<FuzzRule>,
    keys: Vec<FuzzKey>,
}

fn prefix((v6, bytes, len): (bool, [u8; 4], u8)) -> String {
    if v6 {
        let addr = std::net::Ipv6Addr::new(0xfd00, u16::from(bytes[0] % 4), 0, 0, 0, 0, 0, u16::from(bytes[3]));
        ipnet::Ipv6Net::new(addr, len % 129).unwrap().trunc().to_string()
    } else {
        let addr = std::net::Ipv4Addr::new(10, bytes[1] % 4, bytes[2] % 4, bytes[3] % 8);
        ipnet::Ipv4Net::new(addr, len % 33).unwrap().trunc().to_string()
    }
}

/// The prefix set of a rule that has one.
fn prefix_set(rule: &FuzzRule) -> Option<Arc<PrefixSet>> {
    if rule.dst.is_some() || rule.set.is_empty() {
        return None;
    }
    let text: String = rule.set.iter().take(32).map(|p| prefix(*p) + "\n").collect();
    Some(Arc::new(PrefixSet::parse("set.txt", &text).expect("valid prefixes")))
}

fn spec(rule: &FuzzRule) -> RuleSpec {
    let proto = match rule.proto % 5 {
        0 => None,
        1 => Some("tcp".to_string()),
        2 => Some("udp".to_string()),
        3 => Some("icmp".to_string()),
        _ => Some("47".to_string()),
    };
    let dst = rule.dst.map(prefix);
    let range = |r: Option<(u16, u8)>| {
        r.map(|(first, span)| {
            let first = 1 + first % 200;
            format!("{first}-{}", first.saturating_add(u16::from(span % 64)))
        })
    };
    let (uid, cgroup, app) = rule.sender;
    RuleSpec {
        proto,
        dst,
        dst_set: prefix_set(rule).map(|_| "set.txt".to_string()),
        dport: range(rule.dport),
        sport: range(rule.sport),
        uid: (uid % 4 != 0).then(|| UIDS[usize::from(uid % 4) - 1].to_string()),
        cgroup: (cgroup % 7 != 0).then(|| CGROUPS[usize::from(cgroup % 7) - 1].0.to_string()),
        app: (app % 4 != 0).then(|| APPS[usize::from(app % 4) - 1].to_string()),
        via: "underlay".into(),
        ..RuleSpec::default()
    }
}

fuzz_target!(|input: Input| {
    let mut set = RuleSet::default();
    for rule in input.rules.iter().take(64) {
        if let Ok((Subset::Header(subset), via)) = spec(rule).parse_with(prefix_set(rule)) {
            let _ = set.add(subset, via);
        }
    }
    let ids = cgroup_ids();
    let image = compile_for(set.rules(), &ids);
    for key in input.keys.iter().take(64) {
        let mut flow = FlowKey {
            proto: [6, 17, 1, 58, 47][usize::from(key.proto % 5)],
            ..FlowKey::default()
        };
        if key.v6 {
            flow.family = FAMILY_V6;
            flow.dst[0] = 0xfd;
            flow.dst[3] = key.dst[0] % 4;
            flow.dst[15] = key.dst[3];
        } else {
            flow.family = FAMILY_V4;
            flow.dst[..4].copy_from_slice(&[10, key.dst[1] % 4, key.dst[2] % 4, key.dst[3] % 8]);
        }
        if matches!(flow.proto, 6 | 17) {
            flow.sport = 1 + key.sport % 270;
            flow.dport = 1 + key.dport % 270;
        }
        let sender = key.sender.map(socket);
        let expected = set
            .rules()
            .iter()
            .find(|r| r.subset.matches_from(&flow, sender.as_ref(), |p| ids.get(p).copied()))
            .map(|r| r.id);
        assert_eq!(
            image.lookup_from(&flow, sender.as_ref()).map(|a| a.rule_id),
            expected,
            "{flow:?} from {sender:?}"
        );
    }
});
