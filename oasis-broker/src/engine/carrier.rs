//! Choosing a new flow's carrier. The engine asks a [`CarrierChooser`] once
//! per flow, with the rule that claimed it; the flow then keeps the answer
//! for its whole life. Today's chooser gives every rule its own carrier;
//! the Monitor (paper §2.2.2) will choose among carriers by measurement
//! behind the same interface.

use std::time::Instant;

use oasis_common::FlowKey;

use super::routes::{HeaderRoute, Routes, RuleVia, Via};
use crate::rules::Carrier;

/// The rule that claimed a new flow.
#[derive(Clone, Copy, Debug)]
pub enum Claim<'a> {
    /// A header rule matched the flow's packets.
    Header(&'a HeaderRoute),
    /// The flow goes to a fake address given to a name this rule claims now.
    Name { rule: u32, carrier: &'a Carrier },
}

pub trait CarrierChooser: Send + Sync {
    fn choose(&self, flow: &FlowKey, claim: Claim<'_>, routes: &Routes, now: Instant) -> Via;
}

/// Every rule's own carrier.
#[derive(Debug, Default, Clone, Copy)]
pub struct RuleCarrier;

impl CarrierChooser for RuleCarrier {
    fn choose(&self, _flow: &FlowKey, claim: Claim<'_>, routes: &Routes, _now: Instant) -> Via {
        match claim {
            Claim::Header(route) => match route.via {
                RuleVia::Fixed(via) => via,
                // No measurements here: the underlay, as if Oasis were not
                // installed.
                RuleVia::Monitor => Via::Underlay,
            },
            // A fake address means something only to Oasis: when the
            // name's overlay cannot carry it, the plain path, as if Oasis
            // were not installed, is the one safe fallback.
            Claim::Name { carrier, .. } => match routes.resolve(carrier) {
                RuleVia::Fixed(Via::Unavailable) | RuleVia::Monitor => Via::Underlay,
                RuleVia::Fixed(via) => via,
            },
        }
    }
}
