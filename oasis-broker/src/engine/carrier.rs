//! Choosing a new flow's carrier. The engine asks a [`CarrierChooser`] once
//! per flow, with the rule that claimed it; the flow then keeps the answer
//! for its whole life (a new TCP connection whose handshake goes
//! unanswered may be asked again, excluding the carrier that failed it).
//! [`RuleCarrier`] gives every rule its own carrier; [`MonitorChooser`]
//! does the same for rules with a fixed carrier and asks the Monitor's
//! published choices for metric rules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use oasis_common::FlowKey;

use super::routes::{HeaderRoute, MonitorRoute, Routes, RuleVia, Via};
use crate::monitor::{Event, MonitorLink, Why};
use crate::rules::Carrier;

/// The rule that claimed a new flow.
#[derive(Clone, Copy, Debug)]
pub enum Claim<'a> {
    /// A header rule matched the flow's packets.
    Header(&'a HeaderRoute),
    /// The flow goes to a fake address given to a name this rule claims now.
    Name { rule: u32, carrier: &'a Carrier },
}

impl Claim<'_> {
    pub fn rule(&self) -> u32 {
        match self {
            Claim::Header(route) => route.id,
            Claim::Name { rule, .. } => *rule,
        }
    }

    /// The claim's fixed carrier, or None for a metric rule.
    fn fixed(&self, routes: &Routes) -> Option<Via> {
        let via = match self {
            Claim::Header(route) => route.via,
            Claim::Name { carrier, .. } => match routes.resolve(carrier) {
                // A fake address means something only to Oasis: when the
                // name's overlay cannot carry it, the plain path, as if
                // Oasis were not installed, is the one safe fallback.
                RuleVia::Fixed(Via::Unavailable) => RuleVia::Fixed(Via::Underlay),
                other => other,
            },
        };
        match via {
            RuleVia::Fixed(via) => Some(via),
            RuleVia::Monitor => None,
        }
    }
}

/// A new flow's carrier, and for metric rules why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub via: Via,
    /// None for a rule with a fixed carrier.
    pub why: Option<Why>,
    /// The flow is a metric rule's: the Monitor measures it.
    pub monitored: bool,
}

impl Decision {
    /// A carrier that is no metric rule's choice.
    pub fn fixed(via: Via) -> Decision {
        Decision {
            via,
            why: None,
            monitored: false,
        }
    }
}

/// A new flow, as the chooser is asked about it.
#[derive(Clone, Copy, Debug)]
pub struct NewFlow<'a> {
    pub key: &'a FlowKey,
    /// Where the flow really goes (a fake address's real one).
    pub dst: IpAddr,
    /// A carrier the flow must not take (its handshake failed there).
    pub exclude: Option<Via>,
}

pub trait CarrierChooser: Send + Sync {
    fn choose(&self, flow: NewFlow<'_>, claim: Claim<'_>, routes: &Routes, now: Instant) -> Decision;
}

/// Every rule's own carrier; a metric rule's flows take the underlay, as
/// if Oasis were not installed (there is nothing to measure with).
#[derive(Debug, Default, Clone, Copy)]
pub struct RuleCarrier;

impl CarrierChooser for RuleCarrier {
    fn choose(&self, _flow: NewFlow<'_>, claim: Claim<'_>, routes: &Routes, _now: Instant) -> Decision {
        match claim.fixed(routes) {
            Some(via) => Decision::fixed(via),
            None => Decision {
                via: Via::Underlay,
                why: Some(Why::Incumbent),
                monitored: false,
            },
        }
    }
}

/// Fixed carriers as they are; metric rules by the Monitor's choices, or
/// by their monitor module.
pub struct MonitorChooser {
    link: Arc<MonitorLink>,
}

impl MonitorChooser {
    pub fn new(link: Arc<MonitorLink>) -> MonitorChooser {
        MonitorChooser { link }
    }

    fn monitored(&self, flow: NewFlow<'_>, route: &MonitorRoute, now: Instant) -> Decision {
        if let Some(module) = route.module {
            // The module decides for every packet; the flow goes to it.
            return Decision {
                via: module,
                why: Some(Why::Module),
                monitored: false,
            };
        }
        let (via, why) = self.link.choices().choose(route, flow.dst, flow.exclude);
        self.link.report(
            now,
            Event::FlowStarted {
                rule: route.rule,
                dst: flow.dst,
                proto: flow.key.proto,
                dport: flow.key.dport,
                via,
            },
        );
        Decision {
            via,
            why: Some(why),
            monitored: true,
        }
    }
}

impl CarrierChooser for MonitorChooser {
    fn choose(&self, flow: NewFlow<'_>, claim: Claim<'_>, routes: &Routes, now: Instant) -> Decision {
        let decision = if let Some(via) = claim.fixed(routes) {
            Decision::fixed(via)
        } else {
            match routes.monitored(claim.rule()) {
                Some(route) => self.monitored(flow, route, now),
                // Published routes always list their metric rules; should
                // one be missing, the plain path.
                None => Decision::fixed(Via::Underlay),
            }
        };
        // Do no harm: an overlay whose code module or WireGuard peer is
        // down carries no new flow, unless the user pinned it. A pinned
        // overlay's flow waits for a restarting module; a peer that does
        // not answer refuses it at once, where it would wait for nothing.
        let Via::Overlay(id) = decision.via else {
            return decision;
        };
        match routes.overlays.get(id) {
            Some(down) if down.falls_back() => Decision {
                via: Via::Underlay,
                why: Some(match down.wireguard {
                    Some(_) => Why::PeerDown,
                    None => Why::ModuleDown,
                }),
                monitored: false,
            },
            Some(down) if down.wireguard.is_some() && down.is_down() => Decision {
                via: Via::Unavailable,
                why: Some(Why::PeerDown),
                monitored: false,
            },
            _ => decision,
        }
    }
}
