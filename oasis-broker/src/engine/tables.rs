//! The words every kernel table of the engine's speaks (the NAT, the flow
//! pins): what the kernel knows of a flow, and a table's refusal.

use std::time::Instant;

/// What the kernel knows of a flow it carries: when it last saw a packet,
/// and whether a FIN or RST went by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSeen {
    pub at: Instant,
    pub closing: bool,
}

/// A kernel table (NAT, flow pins) refused an entry.
#[derive(Debug, thiserror::Error)]
#[error("{table}: {reason}")]
pub struct TableError {
    /// Which table refused (e.g. the kernel map's name).
    pub table: &'static str,
    pub reason: String,
}
