//! Flows to fake addresses: which real address and carrier each one uses,
//! and the reverse lookup that turns replies back into replies from the
//! fake address. A flow keeps its real address and carrier for its whole
//! life, like every diverted flow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use oasis_common::{FAMILY_V4, FlowKey};

use crate::fake::FakeEntry;
use crate::names::NameRules;
use crate::rules::Carrier;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFlow {
    pub fake: IpAddr,
    pub real: IpAddr,
    pub carrier: Carrier,
    /// Underlay flows are rewritten by the kernel after their first packet.
    pub in_kernel: bool,
    pub last_seen: Instant,
}

/// The carrier for a flow to a fake address given to `name`: the rule
/// that claims the name now (rules may have changed since the answer), or
/// the underlay when none does or its overlay is gone. A fake address only
/// means something to Oasis, so leaving the flow to the plain path, as if
/// Oasis were not installed, is the one safe fallback.
pub fn choose_carrier(name: &str, names: &NameRules, joined: impl Fn(&str) -> bool) -> Carrier {
    match names.first_match(name) {
        Some((_, Carrier::Overlay(overlay))) if joined(overlay) => Carrier::Overlay(overlay.clone()),
        _ => Carrier::Underlay,
    }
}

/// The real address a new flow uses: one of the upstream's answers of the
/// flow's family, spread over them by the flow's ports.
pub fn choose_real(entry: &FakeEntry, key: &FlowKey) -> Option<IpAddr> {
    let same_family: Vec<IpAddr> = entry
        .real
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() == (key.family == FAMILY_V4))
        .collect();
    if same_family.is_empty() {
        return None;
    }
    let spread = usize::from(key.sport ^ key.dport) % same_family.len();
    Some(same_family[spread])
}

/// The key a reply of `key`'s flow arrives with once its fake destination
/// is replaced by `real`.
pub fn reply_key(key: &FlowKey, real: IpAddr) -> FlowKey {
    let mut reply = FlowKey {
        src: [0; 16],
        dst: key.src,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    match real {
        IpAddr::V4(v4) => reply.src[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => reply.src = v6.octets(),
    }
    reply
}

#[derive(Debug, Default)]
pub struct FakeFlows {
    flows: HashMap<FlowKey, FakeFlow>,
    /// Reply key → fake address, for flows carried by overlays (the kernel
    /// keeps its own for underlay flows).
    replies: HashMap<FlowKey, IpAddr>,
}

impl FakeFlows {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Whether any reply needs rewriting in user space.
    pub fn has_overlay_flows(&self) -> bool {
        !self.replies.is_empty()
    }

    /// The flow, marked as seen now.
    pub fn touch(&mut self, key: &FlowKey, now: Instant) -> Option<&FakeFlow> {
        let flow = self.flows.get_mut(key)?;
        flow.last_seen = now;
        Some(flow)
    }

    pub fn insert(&mut self, key: FlowKey, flow: FakeFlow) {
        if !flow.in_kernel {
            self.replies.insert(reply_key(&key, flow.real), flow.fake);
        }
        self.flows.insert(key, flow);
    }

    /// The fake address to put as the source of a reply arriving with `key`.
    pub fn reply_fake(&self, key: &FlowKey) -> Option<IpAddr> {
        self.replies.get(key).copied()
    }

    /// Removes flows idle for `idle`. An in-kernel flow's packets never come
    /// here; `kernel_seen` says when the kernel last saw it.
    pub fn expire(
        &mut self,
        now: Instant,
        idle: Duration,
        kernel_seen: impl Fn(&FlowKey, &FakeFlow) -> Option<Instant>,
    ) -> Vec<(FlowKey, FakeFlow)> {
        let mut ended = Vec::new();
        self.flows.retain(|key, flow| {
            let seen = if flow.in_kernel {
                kernel_seen(key, flow).map_or(flow.last_seen, |k| k.max(flow.last_seen))
            } else {
                flow.last_seen
            };
            let alive = now.saturating_duration_since(seen) < idle;
            if !alive {
                ended.push((*key, flow.clone()));
            }
            alive
        });
        for (key, flow) in &ended {
            self.replies.remove(&reply_key(key, flow.real));
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::NamePattern;
    use crate::rules::NameRule;

    fn entry(real: &[&str]) -> FakeEntry {
        FakeEntry {
            fake: "198.18.0.1".parse().unwrap(),
            name: "www.example.org".into(),
            real: real.iter().map(|a| a.parse().unwrap()).collect(),
            carrier: "detour".into(),
            last_used: 0,
            live_flows: 0,
        }
    }

    fn key(sport: u16) -> FlowKey {
        FlowKey::v4([10, 0, 0, 2], [198, 18, 0, 1], 6, sport, 443)
    }

    fn flow(in_kernel: bool, now: Instant) -> FakeFlow {
        FakeFlow {
            fake: "198.18.0.1".parse().unwrap(),
            real: "192.0.2.10".parse().unwrap(),
            carrier: if in_kernel {
                Carrier::Underlay
            } else {
                Carrier::Overlay("detour".into())
            },
            in_kernel,
            last_seen: now,
        }
    }

    #[test]
    fn the_rule_of_now_decides_and_a_missing_overlay_means_underlay() {
        let names = NameRules::compile(&[NameRule {
            id: 1,
            pattern: NamePattern::Suffix("example.org".into()),
            via: Carrier::Overlay("detour".into()),
        }])
        .unwrap();
        assert_eq!(
            choose_carrier("www.example.org", &names, |o| o == "detour"),
            Carrier::Overlay("detour".into())
        );
        assert_eq!(
            choose_carrier("www.example.org", &names, |_| false),
            Carrier::Underlay
        );
        assert_eq!(choose_carrier("other.net", &names, |_| true), Carrier::Underlay);
    }

    #[test]
    fn real_addresses_of_the_flows_family_are_spread_by_port() {
        let e = entry(&["2001:db8::1", "192.0.2.1", "192.0.2.2"]);
        let picked: std::collections::HashSet<IpAddr> =
            (0..16).filter_map(|p| choose_real(&e, &key(p))).collect();
        assert_eq!(picked.len(), 2);
        assert!(picked.iter().all(IpAddr::is_ipv4));
        assert_eq!(choose_real(&entry(&["2001:db8::1"]), &key(1)), None);
    }

    #[test]
    fn replies_of_overlay_flows_map_back_to_the_fake() {
        let now = Instant::now();
        let mut flows = FakeFlows::default();
        flows.insert(key(40000), flow(false, now));
        assert!(flows.has_overlay_flows());
        let reply = FlowKey::v4([192, 0, 2, 10], [10, 0, 0, 2], 6, 443, 40000);
        assert_eq!(flows.reply_fake(&reply), Some("198.18.0.1".parse().unwrap()));
        let stranger = FlowKey::v4([192, 0, 2, 10], [10, 0, 0, 2], 6, 443, 40001);
        assert_eq!(flows.reply_fake(&stranger), None);
        // The kernel translates replies of underlay flows, not the broker.
        flows.insert(key(40002), flow(true, now));
        let kernel_reply = FlowKey::v4([192, 0, 2, 10], [10, 0, 0, 2], 6, 443, 40002);
        assert_eq!(flows.reply_fake(&kernel_reply), None);
    }

    #[test]
    fn idle_flows_end_but_kernel_traffic_keeps_them_alive() {
        let start = Instant::now();
        let idle = Duration::from_secs(60);
        let mut flows = FakeFlows::default();
        flows.insert(key(1), flow(false, start));
        flows.insert(key(2), flow(true, start));
        flows.insert(key(3), flow(true, start));
        let later = start + Duration::from_secs(61);
        let ended = flows.expire(later, idle, |k, _| (k.sport == 2).then_some(later));
        let mut ended_ports: Vec<u16> = ended.iter().map(|(k, _)| k.sport).collect();
        ended_ports.sort();
        assert_eq!(ended_ports, vec![1, 3]);
        assert_eq!(flows.len(), 1);
        assert!(!flows.has_overlay_flows());
    }
}
