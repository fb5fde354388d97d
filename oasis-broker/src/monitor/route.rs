//! A metric rule as the Monitor sees it. The routes the packet path is
//! published with hold one per metric rule; the Monitor reads them, and
//! needs nothing else of the engine.

use super::goal::Goal;
use crate::overlay::{OverlayId, Via};

/// A metric rule, ready for the Monitor: its goal and the carriers it may
/// choose from, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorRoute {
    pub rule: u32,
    pub goal: Goal,
    /// The overlays it may choose besides the underlay (the `among` list,
    /// or every joined overlay), those that are usable now.
    pub candidates: Vec<OverlayId>,
    /// The monitor module's overlay, when one decides.
    pub module: Option<Via>,
    /// What goes in front of each packet sent to the module: the metric's
    /// text, padded with zeros to the module's shim length.
    pub module_shim: Vec<u8>,
}
