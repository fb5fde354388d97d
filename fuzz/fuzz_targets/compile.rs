//! The classifier's compiler: for any rule list and any flow, the compiled
//! map image answers exactly as "the first rule that matches".
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use oasis_broker::compile::compile;
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
}

#[derive(Arbitrary, Debug)]
struct FuzzKey {
    proto: u8,
    v6: bool,
    dst: [u8; 4],
    sport: u16,
    dport: u16,
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
    RuleSpec {
        proto,
        dst,
        dst_set: prefix_set(rule).map(|_| "set.txt".to_string()),
        dport: range(rule.dport),
        sport: range(rule.sport),
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
    let image = compile(set.rules());
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
        let expected = set.first_match(&flow).map(|r| r.id);
        assert_eq!(image.lookup(&flow).map(|a| a.rule_id), expected, "{flow:?}");
    }
});
