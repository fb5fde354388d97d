//! The Monitor's decisions as the packet threads read them: published
//! whole after each evaluation, looked up once per new flow of a metric
//! rule, without a lock on the Monitor.

use std::collections::HashMap;
use std::net::IpAddr;

use super::decide::Why;
use super::path::Prefix;
use super::route::MonitorRoute;
use crate::overlay::Via;

/// One metric rule's decision for one prefix.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub via: Via,
    pub why: Why,
    /// Every candidate that is up, best first: where a flow goes when its
    /// first choice fails it.
    pub ranked: Vec<Via>,
    /// Every candidate that is up has figures for the metric: the choice
    /// rests on measurements, not on the lack of them.
    pub settled: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Choices {
    chosen: HashMap<(u32, Prefix), Chosen>,
    /// Carriers that are down: no new flow takes one.
    down: Vec<Via>,
    /// Carriers the user pinned rules to: new flows take them while up.
    pins: HashMap<u32, Via>,
}

impl Choices {
    pub fn new(chosen: HashMap<(u32, Prefix), Chosen>, down: Vec<Via>) -> Choices {
        Choices {
            chosen,
            down,
            pins: HashMap::new(),
        }
    }

    pub fn with_pins(mut self, pins: HashMap<u32, Via>) -> Choices {
        self.pins = pins;
        self
    }

    /// The carrier the user pinned `rule` to.
    pub fn pin(&self, rule: u32) -> Option<Via> {
        self.pins.get(&rule).copied()
    }

    pub fn is_down(&self, via: Via) -> bool {
        self.down.contains(&via)
    }

    pub fn get(&self, rule: u32, prefix: Prefix) -> Option<&Chosen> {
        self.chosen.get(&(rule, prefix))
    }

    /// Whether the Monitor, on measurements, gives new flows of `rule` to
    /// every one of `addresses` the underlay: then a name can be answered
    /// with its real addresses, and its flows never touch Oasis.
    pub fn underlay_settled(&self, rule: u32, addresses: &[IpAddr]) -> bool {
        !addresses.is_empty()
            && addresses.iter().all(|addr| {
                self.get(rule, Prefix::of(*addr))
                    .is_some_and(|c| c.via == Via::Underlay && c.settled && !self.is_down(Via::Underlay))
            })
    }

    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }

    /// The carrier for a new flow of `route` to `dst`, never `exclude` (the
    /// carrier a flow's handshake just failed on): the Monitor's choice
    /// if it is still a candidate and up; else the next of its ranking;
    /// else the underlay, the incumbent (unless excluded or down, then any
    /// candidate that is up).
    pub fn choose(&self, route: &MonitorRoute, dst: IpAddr, exclude: Option<Via>) -> (Via, Why) {
        let usable = |via: Via| {
            Some(via) != exclude
                && !self.is_down(via)
                && match via {
                    Via::Underlay => true,
                    Via::Overlay(id) => route.candidates.contains(&id),
                    Via::Unavailable => false,
                }
        };
        let rescued = |why: Why| if exclude.is_some() { Why::Rescued } else { why };
        // A pin holds while its carrier is up: the underlay is still
        // there for when it is not.
        if let Some(pinned) = self.pin(route.rule)
            && usable(pinned)
        {
            return (pinned, Why::Pinned);
        }
        if let Some(chosen) = self.get(route.rule, Prefix::of(dst)) {
            if usable(chosen.via) {
                return (chosen.via, chosen.why);
            }
            if let Some(via) = chosen.ranked.iter().copied().find(|v| usable(*v)) {
                return (via, rescued(Why::Failover));
            }
        }
        if usable(Via::Underlay) {
            return (Via::Underlay, rescued(Why::Incumbent));
        }
        let fallback = route
            .candidates
            .iter()
            .map(|id| Via::Overlay(*id))
            .find(|v| usable(*v));
        match fallback {
            Some(via) => (via, rescued(Why::Failover)),
            // Nothing else: the plain path, as if Oasis were not there.
            None => (Via::Underlay, Why::Incumbent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{Goal, Metric};
    use crate::overlay::OverlayId;

    const O1: Via = Via::Overlay(OverlayId(1));
    const O2: Via = Via::Overlay(OverlayId(2));

    fn route() -> MonitorRoute {
        MonitorRoute {
            rule: 7,
            goal: Goal {
                metric: Metric::Latency,
                among: None,
                module: None,
            },
            candidates: vec![OverlayId(1), OverlayId(2)],
            module: None,
            module_shim: Vec::new(),
        }
    }

    #[test]
    fn a_pin_holds_while_its_carrier_is_up_and_not_excluded() {
        let dst: IpAddr = "203.0.113.9".parse().unwrap();
        let pinned = Choices::new(HashMap::new(), vec![]).with_pins(HashMap::from([(7, O2)]));
        assert_eq!(pinned.choose(&route(), dst, None), (O2, Why::Pinned));
        // Its handshake failed there: the flow is rescued elsewhere.
        assert_eq!(
            pinned.choose(&route(), dst, Some(O2)),
            (Via::Underlay, Why::Rescued)
        );
        let down = Choices::new(HashMap::new(), vec![O2]).with_pins(HashMap::from([(7, O2)]));
        assert_eq!(down.choose(&route(), dst, None), (Via::Underlay, Why::Incumbent));
        // Another rule's pin is not this one's.
        let other = Choices::new(HashMap::new(), vec![]).with_pins(HashMap::from([(8, O2)]));
        assert_eq!(other.choose(&route(), dst, None), (Via::Underlay, Why::Incumbent));
    }

    #[test]
    fn new_flows_take_the_choice_or_fall_back_in_order() {
        let dst: IpAddr = "203.0.113.9".parse().unwrap();
        let prefix = Prefix::of(dst);
        let faster = Why::Faster {
            chosen_ms: 10.0,
            underlay_ms: 40.0,
        };
        let chosen = Chosen {
            via: O1,
            why: faster,
            ranked: vec![O1, O2, Via::Underlay],
            settled: true,
        };
        let choices = Choices::new([((7, prefix), chosen)].into(), vec![]);
        assert_eq!(choices.choose(&route(), dst, None), (O1, faster));
        assert_eq!(choices.choose(&route(), dst, Some(O1)), (O2, Why::Rescued));
        // Another prefix: nothing decided, the incumbent.
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            choices.choose(&route(), other, None),
            (Via::Underlay, Why::Incumbent)
        );
        assert_eq!(
            choices.choose(&route(), other, Some(Via::Underlay)),
            (O1, Why::Rescued)
        );
        // A carrier goes down between evaluations: flows leave it at once.
        let chosen = choices.get(7, prefix).unwrap().clone();
        let choices = Choices::new([((7, prefix), chosen)].into(), vec![O1]);
        assert_eq!(choices.choose(&route(), dst, None), (O2, Why::Failover));
        // An overlay the rule no longer lists is not used.
        let mut narrower = route();
        narrower.candidates = vec![OverlayId(2)];
        assert_eq!(choices.choose(&narrower, dst, None).0, O2);
        let everything_down = Choices::new(Default::default(), vec![Via::Underlay, O1, O2]);
        assert_eq!(
            everything_down.choose(&route(), dst, None),
            (Via::Underlay, Why::Incumbent)
        );
    }

    #[test]
    fn names_get_real_answers_only_where_the_underlay_won_on_figures() {
        let here: IpAddr = "203.0.113.9".parse().unwrap();
        let there: IpAddr = "198.51.100.1".parse().unwrap();
        let chosen = |via, settled| Chosen {
            via,
            why: Why::Incumbent,
            ranked: vec![via],
            settled,
        };
        let choices = Choices::new(
            [
                ((7, Prefix::of(here)), chosen(Via::Underlay, true)),
                ((7, Prefix::of(there)), chosen(Via::Underlay, false)),
                ((8, Prefix::of(here)), chosen(O1, true)),
            ]
            .into(),
            vec![],
        );
        assert!(choices.underlay_settled(7, &[here]));
        assert!(
            !choices.underlay_settled(7, &[here, there]),
            "not measured there yet"
        );
        assert!(!choices.underlay_settled(8, &[here]), "an overlay is better");
        assert!(!choices.underlay_settled(9, &[here]), "no decision");
        assert!(!choices.underlay_settled(7, &[]));
    }
}
