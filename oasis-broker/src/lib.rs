//! The Oasis broker: rules, the routing engine, the daemon and its control
//! interface.
//!
//! Decisions are plain types tested without privileges: rules and their
//! compilation into classifier maps (`rules`, `compile`, `names`), the
//! routing engine (`engine`: flows, carriers, fake-address flows, returned
//! packets), the Monitor (`monitor`: measurements and carrier choice for
//! metric rules), the overlay manager (`overlay`), DNS policy (`dns`). The
//! operating system sits behind the traits of `platform`; `forward` runs
//! the packet loops over them, and `daemon` wires everything together.
pub mod api;
pub mod compile;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod engine;
pub mod fake;
pub mod forward;
pub mod liveness;
pub mod module;
pub mod monitor;
pub mod name_pattern;
pub mod names;
pub mod overlay;
pub mod platform;
pub mod prefix_set;
pub mod render;
pub mod rule_list;
pub mod rule_spec;
pub mod rules;
pub mod sender;
pub mod shared;
