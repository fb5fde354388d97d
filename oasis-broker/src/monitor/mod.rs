//! The Monitor (paper §2.2.2): for flows of metric rules, chooses the
//! carrier that serves the rule's metric best among the underlay and the
//! joined overlays, from what it measures of each.

pub mod goal;

pub use goal::{Goal, LossLimit, Metric, MetricError};
