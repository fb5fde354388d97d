//! Finding the uplinks: the interfaces that carry a default route.

use std::collections::BTreeSet;

/// Interfaces named by default routes in `/proc/net/route` (IPv4) and
/// `/proc/net/ipv6_route` (IPv6).
pub fn default_route_interfaces() -> Vec<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut names: BTreeSet<String> = v4_defaults(&v4).into_iter().collect();
    names.extend(v6_defaults(&v6));
    names.into_iter().collect()
}

/// `Iface Destination Gateway Flags ... Mask ...` with hex fields.
fn v4_defaults(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            (*dest == "00000000" && *mask == "00000000" && *iface != "lo").then(|| iface.to_string())
        })
        .collect()
}

/// `dest dest_len src src_len next_hop metric refcnt use flags iface`.
fn v6_defaults(table: &str) -> Vec<String> {
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                return None;
            }
            let (dest, dest_len, iface) = (fields[0], fields[1], fields[9]);
            let is_default = dest.chars().all(|c| c == '0') && dest_len == "00";
            (is_default && iface != "lo").then(|| iface.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v4_default_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(v4_defaults(table), vec!["eth0"]);
    }

    #[test]
    fn finds_v6_default_route_but_not_loopback_unreachable() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     wlan0\n\
                     00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                     fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     wlan0\n";
        assert_eq!(v6_defaults(table), vec!["wlan0"]);
    }
}
