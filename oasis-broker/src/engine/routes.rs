//! What the engine routes by: the header rules with their carriers resolved
//! to overlay ids, the compiled name rules, and the joined overlays. The
//! daemon builds a new [`Routes`] whenever rules or overlays change and
//! publishes it whole; a packet thread reads one snapshot per batch.

use std::sync::Arc;

use oasis_common::FlowKey;

use crate::names::NameRules;
use crate::overlay::{OverlayId, OverlayTable};
use crate::rules::{Carrier, HeaderSubset, Rule};

/// A carrier as the packet path holds it: by id, never by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Underlay,
    Overlay(OverlayId),
    /// The rule names an overlay that is joined but not usable now (its
    /// entry nodes did not resolve when the daemon started).
    Unavailable,
}

/// A header rule, ready for the packet path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRoute {
    pub id: u32,
    pub subset: HeaderSubset,
    /// The carrier the rule names.
    pub via: Via,
}

#[derive(Debug, Default)]
pub struct Routes {
    header: Vec<HeaderRoute>,
    pub names: Arc<NameRules>,
    pub overlays: Arc<OverlayTable>,
}

impl Routes {
    pub fn new(rules: &[Rule], names: Arc<NameRules>, overlays: Arc<OverlayTable>) -> Routes {
        let mut routes = Routes {
            header: Vec::with_capacity(rules.len()),
            names,
            overlays,
        };
        for rule in rules {
            let via = routes.resolve(&rule.via);
            routes.header.push(HeaderRoute {
                id: rule.id,
                subset: rule.subset.clone(),
                via,
            });
        }
        routes
    }

    /// A carrier name as the packet path holds it.
    pub fn resolve(&self, carrier: &Carrier) -> Via {
        match carrier {
            Carrier::Underlay => Via::Underlay,
            Carrier::Overlay(name) => self.overlays.id_of(name).map_or(Via::Unavailable, Via::Overlay),
        }
    }

    /// The header rule that decides a flow: the first that matches, as
    /// the classifier's maps answer.
    pub fn first_header(&self, key: &FlowKey) -> Option<&HeaderRoute> {
        self.header.iter().find(|r| r.subset.matches(key))
    }

    pub fn header(&self) -> &[HeaderRoute] {
        &self.header
    }
}
