//! What the engine routes by: the header rules with their carriers resolved
//! to overlay ids, the compiled name rules, the metric rules' candidates,
//! and the joined overlays. The daemon builds a new [`Routes`] whenever
//! rules or overlays change and publishes it whole; a packet thread reads
//! one snapshot per batch.

use std::collections::HashMap;
use std::sync::Arc;

use oasis_common::FlowKey;

pub use crate::monitor::MonitorRoute;
use crate::names::NameRules;
use crate::overlay::{OverlayId, OverlayTable};
use crate::rules::{Carrier, HeaderSubset, NameRule, Rule};

pub use crate::overlay::Via;

/// A rule's carrier as the packet path holds it: fixed, or the Monitor's
/// choice for each new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleVia {
    Fixed(Via),
    /// A metric rule: see [`Routes::monitored`].
    Monitor,
}

/// A header rule, ready for the packet path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRoute {
    pub id: u32,
    pub subset: HeaderSubset,
    /// The carrier the rule names.
    pub via: RuleVia,
}

#[derive(Debug, Default)]
pub struct Routes {
    header: Vec<HeaderRoute>,
    pub names: Arc<NameRules>,
    pub overlays: Arc<OverlayTable>,
    /// Metric rules of both kinds, by rule id.
    monitored: HashMap<u32, Arc<MonitorRoute>>,
}

impl Routes {
    pub fn new(rules: &[Rule], names: Arc<NameRules>, overlays: Arc<OverlayTable>) -> Routes {
        Routes::with_names(rules, &[], names, overlays)
    }

    /// Routes whose name rules' metric goals are known too (`name_rules`,
    /// the rules `names` was compiled from; only their metric rules are
    /// read).
    pub fn with_names(
        rules: &[Rule],
        name_rules: &[NameRule],
        names: Arc<NameRules>,
        overlays: Arc<OverlayTable>,
    ) -> Routes {
        let mut routes = Routes {
            header: Vec::with_capacity(rules.len()),
            names,
            overlays,
            monitored: HashMap::new(),
        };
        for rule in rules {
            let via = routes.resolve(&rule.via);
            routes.add_monitored(rule.id, &rule.via);
            routes.header.push(HeaderRoute {
                id: rule.id,
                subset: rule.subset.clone(),
                via,
            });
        }
        for rule in name_rules {
            routes.add_monitored(rule.id, &rule.via);
        }
        routes
    }

    fn add_monitored(&mut self, rule: u32, carrier: &Carrier) {
        let Carrier::Monitor(goal) = carrier else {
            return;
        };
        // A monitor module's overlay carries nothing itself.
        let candidates = match &goal.among {
            Some(names) => names
                .iter()
                .filter_map(|n| self.overlays.by_name(n))
                .filter(|o| !o.monitor)
                .map(|o| o.id)
                .collect(),
            None => {
                let mut all: Vec<OverlayId> = self
                    .overlays
                    .iter()
                    .filter(|o| !o.monitor)
                    .map(|o| o.id)
                    .collect();
                all.sort();
                all
            }
        };
        let module = goal.module.as_ref().map(|name| self.fixed(name));
        let module_shim = goal
            .module
            .as_ref()
            .and_then(|name| self.overlays.by_name(name))
            .map(|overlay| {
                let mut shim = goal.metric.to_string().into_bytes();
                shim.resize(overlay.shim.len(), 0);
                shim
            })
            .unwrap_or_default();
        self.monitored.insert(
            rule,
            Arc::new(MonitorRoute {
                rule,
                goal: goal.clone(),
                candidates,
                module,
                module_shim,
            }),
        );
    }

    fn fixed(&self, overlay: &str) -> Via {
        self.overlays
            .id_of(overlay)
            .map_or(Via::Unavailable, Via::Overlay)
    }

    /// A carrier as the packet path holds it.
    pub fn resolve(&self, carrier: &Carrier) -> RuleVia {
        match carrier {
            Carrier::Underlay => RuleVia::Fixed(Via::Underlay),
            Carrier::Overlay(name) => RuleVia::Fixed(self.fixed(name)),
            Carrier::Monitor(_) => RuleVia::Monitor,
        }
    }

    /// A metric rule's goal and candidates.
    pub fn monitored(&self, rule: u32) -> Option<&Arc<MonitorRoute>> {
        self.monitored.get(&rule)
    }

    /// Every metric rule.
    pub fn monitored_rules(&self) -> impl Iterator<Item = &Arc<MonitorRoute>> {
        self.monitored.values()
    }

    /// The header rule that decides a flow: the first that matches, as
    /// the classifier's maps answer. A rule naming a sender (uid, cgroup,
    /// application) matches only by what the kernel saw of the packet's
    /// socket, so while one exists the rule the kernel claimed the flow by
    /// (`claimed`) is asked first.
    pub fn first_header(&self, key: &FlowKey, claimed: impl FnOnce() -> Option<u32>) -> Option<&HeaderRoute> {
        if self.header.iter().any(|r| !r.subset.sender.is_any())
            && let Some(id) = claimed()
            && let Some(route) = self
                .header
                .iter()
                .find(|r| r.id == id && r.subset.matches_headers(key))
        {
            return Some(route);
        }
        self.header.iter().find(|r| r.subset.matches(key))
    }

    pub fn header(&self) -> &[HeaderRoute] {
        &self.header
    }
}
