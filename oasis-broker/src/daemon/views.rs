//! What the control plane shows of the engine: its counters and its flows
//! as `oasis status` and `oasis flows` print them. The engine keeps
//! numbers, keys and ids; names and text are made here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::control::{BrokerCounters, FlowView, SenderView};
use crate::engine::counters::{DropReason, EngineCounters};
use crate::engine::packet::{describe, flow_dst, flow_src};
use crate::engine::router::FlowRecord;
use crate::overlay::{OverlayTable, Via};

pub(super) fn broker_counters(counters: &EngineCounters) -> BrokerCounters {
    let load = |c: &AtomicU64| c.load(Relaxed);
    let drops = |reason| counters.drops_of(reason);
    let decisions = &counters.decisions;
    BrokerCounters {
        received: load(&counters.received),
        sent_underlay: load(&counters.sent_underlay),
        sent_overlay: load(&counters.sent_overlay),
        send_errors: load(&counters.send_errors),
        malformed: drops(DropReason::Malformed),
        unroutable: drops(DropReason::Unroutable),
        no_carrier: drops(DropReason::NoCarrier),
        untranslatable: drops(DropReason::Untranslatable),
        flows: load(&counters.flows),
        flows_started: load(&counters.flows_started),
        flows_evicted: load(&counters.flows_evicted),
        rescued: load(&counters.rescued),
        monitor_decisions: decisions.count(),
        decision_p50_us: decisions.percentile(50.0).map(|ns| ns as f64 / 1000.0),
        decision_p99_us: decisions.percentile(99.0).map(|ns| ns as f64 / 1000.0),
        overlay_received: load(&counters.overlay_received),
        rejected_sender: drops(DropReason::NotFromOverlay),
        rejected_destination: drops(DropReason::NotForThisHost),
        rejected_module_sender: drops(DropReason::NotFromModule),
        orphan_fragments: drops(DropReason::OrphanFragment),
        returned_for_no_flow: drops(DropReason::NoFlow),
        unauthenticated: drops(DropReason::Unauthenticated),
        flows_adopted: load(&counters.adopted),
        too_big: load(&counters.too_big),
    }
}

/// A carrier's name, as users know it, by the overlays joined now.
pub(super) fn carrier_name(overlays: &OverlayTable, via: Via) -> String {
    match via {
        Via::Underlay => "underlay".into(),
        Via::Overlay(id) => overlays
            .get(id)
            .map_or_else(|| format!("overlay {id} (left)"), |o| o.name.clone()),
        Via::Unavailable => "unavailable".into(),
    }
}

/// A flow as `oasis flows` shows it.
pub(super) fn flow_view(flow: &FlowRecord, overlays: &OverlayTable, sender: Option<SenderView>) -> FlowView {
    FlowView {
        id: flow_id(&flow.key),
        flow: describe(&flow.key),
        proto: flow.key.proto,
        src: std::net::SocketAddr::new(flow_src(&flow.key), flow.key.sport),
        dst: std::net::SocketAddr::new(flow_dst(&flow.key), flow.key.dport),
        rule: flow.rule,
        carrier: carrier_name(overlays, flow.via),
        why: flow.why.map(|why| why.to_string()),
        fake: flow.fake.map(|fake| fake.to_string()),
        in_kernel: flow.in_kernel,
        age_secs: flow.age.as_secs_f64(),
        idle_secs: flow.idle.as_secs_f64(),
        packets: flow.packets,
        sender,
    }
}

/// A flow's id: a hash of its addresses, ports and protocol, shaped as
/// the UUIDs dashboards expect. The same while the flow lives (and the
/// daemon runs); not a secret, and not meant to be unguessable.
pub(super) fn flow_id(key: &oasis_common::FlowKey) -> String {
    use std::hash::{Hash, Hasher};
    let half = |seed: u8| {
        let mut hasher = std::hash::DefaultHasher::new();
        (
            seed,
            key.proto,
            flow_src(key),
            key.sport,
            flow_dst(key),
            key.dport,
        )
            .hash(&mut hasher);
        hasher.finish()
    };
    let (a, b) = (half(1), half(2));
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A flow's socket as the application holds it: a fake-address flow's
/// peer is the fake address.
pub(super) fn flow_socket(flow: &FlowRecord) -> (u8, std::net::SocketAddr, std::net::SocketAddr) {
    let key = &flow.key;
    let peer = flow.fake.unwrap_or_else(|| key.dst_ip());
    (
        key.proto,
        std::net::SocketAddr::new(key.src_ip(), key.sport),
        std::net::SocketAddr::new(peer, key.dport),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use oasis_common::FlowKey;
    use std::time::Duration;

    #[test]
    fn a_flow_is_shown_with_its_carrier_named_and_its_fake_address() {
        let record = FlowRecord {
            key: FlowKey::v4([10, 0, 0, 2], [203, 0, 113, 9], 6, 40000, 443),
            rule: Some(3),
            via: Via::Overlay(crate::overlay::OverlayId(7)),
            why: None,
            fake: Some("198.18.0.5".parse().unwrap()),
            in_kernel: false,
            age: Duration::from_millis(1500),
            idle: Duration::from_millis(250),
            packets: 12,
        };
        // The application's socket talks to the fake address.
        assert_eq!(
            flow_socket(&record),
            (
                6,
                "10.0.0.2:40000".parse().unwrap(),
                "198.18.0.5:443".parse().unwrap()
            )
        );
        let view = flow_view(&record, &OverlayTable::default(), None);
        assert_eq!(view.flow, "tcp 10.0.0.2:40000 -> 203.0.113.9:443");
        assert_eq!(view.id.len(), 36);
        let other = FlowKey::v4([10, 0, 0, 2], [203, 0, 113, 9], 6, 40001, 443);
        assert_ne!(view.id, flow_id(&other));
        assert_eq!(
            (view.proto, view.src, view.dst),
            (
                6,
                "10.0.0.2:40000".parse().unwrap(),
                "203.0.113.9:443".parse().unwrap()
            )
        );
        assert_eq!(view.carrier, "overlay #7 (left)");
        assert_eq!(view.fake.as_deref(), Some("198.18.0.5"));
        assert_eq!((view.age_secs, view.idle_secs, view.packets), (1.5, 0.25, 12));
        let underlay = FlowRecord {
            via: Via::Underlay,
            ..record
        };
        assert_eq!(
            flow_view(&underlay, &OverlayTable::default(), None).carrier,
            "underlay"
        );
    }

    #[test]
    fn every_drop_is_shown_under_its_own_name() {
        let counters = EngineCounters::default();
        for (i, reason) in [
            DropReason::Malformed,
            DropReason::Unroutable,
            DropReason::NoCarrier,
            DropReason::Untranslatable,
            DropReason::NotFromOverlay,
            DropReason::NotForThisHost,
            DropReason::NotFromModule,
            DropReason::OrphanFragment,
            DropReason::NoFlow,
            DropReason::Unauthenticated,
        ]
        .into_iter()
        .enumerate()
        {
            for _ in 0..=i {
                counters.dropped(reason);
            }
        }
        let shown = broker_counters(&counters);
        assert_eq!(
            [
                shown.malformed,
                shown.unroutable,
                shown.no_carrier,
                shown.untranslatable,
                shown.rejected_sender,
                shown.rejected_destination,
                shown.rejected_module_sender,
                shown.orphan_fragments,
                shown.returned_for_no_flow,
                shown.unauthenticated,
            ],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        );
    }
}
