//! Live flows of fake addresses a daemon finds when it starts: the last
//! daemon died under them (a crash, `kill -9`, a supervisor's restart).
//! Their applications' sockets still talk to fake addresses.
//!
//! - A flow whose name an overlay carries goes on: the fake-address table
//!   and the overlay's own mapping (the exit's NAT) both survived, and the
//!   return path takes the flow up again from its next packet either way.
//! - A flow the kernel rewrote on the underlay cannot: its NAT entries
//!   died with the last daemon, and while none ran the server's packets
//!   reached this host untranslated and drew resets. Its socket is ended,
//!   so the application hears of it at once instead of waiting for hours.
//! - A metric rule's flow is left alone: which carrier the Monitor gave it
//!   is not known any more (documented).

use std::net::SocketAddr;

use crate::engine::Routes;
use crate::fake::FakeTable;
use crate::platform::SocketLookup;
use crate::rules::Carrier;

/// What becomes of a live flow found at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Its overlay carries it on.
    GoesOn,
    /// Ended: it cannot go on.
    Ended,
    /// A metric rule's: left as it is.
    Unknown,
}

/// The fate of each socket (own end, peer) whose peer is a fake address.
pub fn fates(peers: &[(SocketAddr, SocketAddr)], fakes: &FakeTable, routes: &Routes) -> Vec<Fate> {
    peers
        .iter()
        .map(|(_, peer)| {
            let Some(entry) = fakes.get(peer.ip()) else {
                // An address that stands for nothing now: no way on.
                return Fate::Ended;
            };
            let name = entry.claimed.as_deref().unwrap_or(&entry.name);
            match routes
                .names
                .first_match_any_sender(name)
                .map(|(_, carrier)| carrier)
            {
                Some(Carrier::Overlay(overlay)) if routes.overlays.by_name(overlay).is_some() => Fate::GoesOn,
                Some(Carrier::Monitor(_)) => Fate::Unknown,
                // The underlay, or an overlay that is no longer joined
                // (its flows would take the underlay): the kernel's NAT.
                _ => Fate::Ended,
            }
        })
        .collect()
}

/// Looks for live flows of fake addresses and ends those that cannot go
/// on; how many of each fate.
pub fn sweep(sockets: &dyn SocketLookup, fakes: &FakeTable, routes: &Routes) -> [usize; 3] {
    let (v4, v6) = fakes.pools();
    let in_pool = |addr: std::net::IpAddr| match addr.to_canonical() {
        std::net::IpAddr::V4(a) => v4.contains(&a),
        std::net::IpAddr::V6(a) => v6.contains(&a),
    };
    let peers = match sockets.tcp_peers(&in_pool) {
        Ok(peers) => peers,
        Err(e) => {
            tracing::warn!("cannot look for live flows of the last daemon: {e}");
            return [0; 3];
        }
    };
    let mut counts = [0; 3];
    for ((local, peer), fate) in peers.iter().zip(fates(&peers, fakes, routes)) {
        counts[fate as usize] += 1;
        if fate == Fate::Ended
            && let Err(e) = sockets.end_socket(oasis_common::proto::TCP, *local, *peer)
        {
            tracing::warn!(%local, %peer, "cannot end a flow the last daemon left: {e}");
        }
    }
    if peers.is_empty() {
        return counts;
    }
    tracing::info!(
        goes_on = counts[Fate::GoesOn as usize],
        ended = counts[Fate::Ended as usize],
        left = counts[Fate::Unknown as usize],
        "live flows of fake addresses from the last daemon: those of overlays go on, those the kernel \
         rewrote on the underlay are ended (their mappings died with it), metric rules' are left"
    );
    counts
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::names::NameRules;
    use crate::overlay::{OverlayTable, test_overlay};
    use crate::rules::{RuleSet, RuleSpec};

    #[test]
    fn flows_of_overlays_go_on_and_the_kernels_are_ended() {
        let mut rules = RuleSet::default();
        for (suffix, via) in [
            ("over.test", "detour"),
            ("under.test", "underlay"),
            ("gone.test", "left"),
        ] {
            let spec = RuleSpec {
                name_suffix: Some(suffix.into()),
                via: via.into(),
                ..RuleSpec::default()
            };
            let (subset, via) = spec.parse().unwrap();
            rules.add_any(subset, via).unwrap();
        }
        let metric = RuleSpec {
            name_suffix: Some("fast.test".into()),
            metric: Some("latency".into()),
            ..RuleSpec::default()
        };
        let (subset, via) = metric.parse().unwrap();
        rules.add_any(subset, via).unwrap();
        let overlays = Arc::new(OverlayTable::new([test_overlay(
            1,
            "detour",
            &["192.0.2.1:7400"],
            4,
        )]));
        let names = NameRules::compile(rules.names()).unwrap();
        let routes = Routes::with_names(rules.rules(), rules.names(), Arc::new(names), overlays);
        let mut fakes = FakeTable::new(
            "198.18.0.0/15".parse().unwrap(),
            "fd4f:4153:4953::/48".parse().unwrap(),
            16,
        );
        let mut fake = |name: &str| {
            fakes
                .assign(name, false, vec!["203.0.113.9".parse().unwrap()], "x", 1)
                .unwrap()
        };
        let (over, under, gone, fast) = (
            fake("www.over.test"),
            fake("www.under.test"),
            fake("www.gone.test"),
            fake("www.fast.test"),
        );
        let stranger = "198.18.9.9".parse().unwrap();
        let local: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let peers: Vec<_> = [over, under, gone, fast, stranger]
            .iter()
            .map(|fake| (local, SocketAddr::new(*fake, 443)))
            .collect();
        assert_eq!(
            fates(&peers, &fakes, &routes),
            [Fate::GoesOn, Fate::Ended, Fate::Ended, Fate::Unknown, Fate::Ended]
        );
    }
}
