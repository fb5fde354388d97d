//! Flows to fake addresses: which real address a new flow uses, and the
//! key its replies arrive with once the destination is rewritten.

use std::net::IpAddr;

use oasis_common::{FAMILY_V4, FlowKey};

use crate::fake::FakeEntry;

/// The real address a new flow uses: one of the upstream's answers of the
/// flow's family, spread over them by the flow's ports.
pub fn choose_real(entry: &FakeEntry, key: &FlowKey) -> Option<IpAddr> {
    let v4 = key.family == FAMILY_V4;
    let count = entry.real.iter().filter(|a| a.is_ipv4() == v4).count();
    if count == 0 {
        return None;
    }
    let spread = usize::from(key.sport ^ key.dport) % count;
    entry
        .real
        .iter()
        .filter(|a| a.is_ipv4() == v4)
        .nth(spread)
        .copied()
}

/// `key`'s flow as it leaves the host once its fake destination is
/// replaced by `real`.
pub fn real_key(key: &FlowKey, real: IpAddr) -> FlowKey {
    let mut out = *key;
    match real {
        IpAddr::V4(v4) => {
            out.dst = [0; 16];
            out.dst[..4].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => out.dst = v6.octets(),
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(real: &[&str]) -> FakeEntry {
        FakeEntry {
            fake: "198.18.0.1".parse().unwrap(),
            name: "www.example.org".into(),
            real: real.iter().map(|a| a.parse().unwrap()).collect(),
            carrier: "detour".into(),
            claimed: None,
            last_used: 0,
            live_flows: 0,
        }
    }

    fn key(sport: u16) -> FlowKey {
        FlowKey::v4([10, 0, 0, 2], [198, 18, 0, 1], 6, sport, 443)
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
    fn replies_come_from_the_real_address_to_the_flows_source() {
        let reply = reply_key(&key(40000), "192.0.2.10".parse().unwrap());
        assert_eq!(reply, FlowKey::v4([192, 0, 2, 10], [10, 0, 0, 2], 6, 443, 40000));
    }
}
