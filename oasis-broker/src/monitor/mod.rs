//! The Monitor (paper §2.2.2): for flows of metric rules, chooses the
//! carrier that serves the rule's metric best among the underlay and the
//! joined overlays, from what it measures of each.
//!
//! Plain types and functions, no I/O: `estimate` (round trip, loss,
//! goodput), `path` (figures per carrier and destination prefix), `health`
//! (carriers up and down), `decide` (the decision for one rule and prefix,
//! with margins and hold times), `budget` and `probe` (active probes),
//! `probe_table` (the probes in flight, and their packets), `route` (a
//! metric rule as the Monitor sees it), `state` (the Monitor tying them
//! together), `choices` (what the packet threads read). The daemon feeds it
//! events and the time; it imports nothing of the engine.

pub mod budget;
pub mod choices;
pub mod decide;
pub mod estimate;
pub mod goal;
pub mod health;
pub mod link;
pub mod path;
pub mod probe;
pub mod probe_table;
pub mod route;
pub mod state;

pub use choices::{Choices, Chosen};
pub use decide::{DecisionSettings, Why};
pub use goal::{Goal, LossLimit, Metric, MetricError};
pub use link::MonitorLink;
pub use path::{Figures, Prefix};
pub use probe::{ProbeKind, ProbeRequest, ProbeTarget};
pub use probe_table::ProbeTable;
pub use route::MonitorRoute;
pub use state::{Event, Monitor, MonitorSettings, Switch};
