//! What the router tells its caller to do with one diverted packet: the
//! word every carrier's path (and the fragment tracker) speaks.

use super::counters::DropReason;
use crate::overlay::OverlayId;

/// What to do with one diverted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    /// Send it (possibly rewritten) on the underlay.
    Underlay,
    /// Send `[shim][packet]` to the overlay's next hop `to`.
    Overlay {
        overlay: OverlayId,
        to: std::net::SocketAddr,
    },
    /// Send `[rule's metric][packet]` to the monitor module `to`
    /// (the overlay `overlay`), which picks the carrier.
    Module {
        overlay: OverlayId,
        to: std::net::SocketAddr,
        rule: u32,
    },
    /// Write the reply the router left in the caller's buffer back to the
    /// application (an ICMP error).
    Reply,
    Drop(DropReason),
}
