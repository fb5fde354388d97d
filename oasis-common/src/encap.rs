//! The client's fast path for overlay flows: once the broker has chosen a
//! flow's overlay and entry node, the uplink's egress program wraps the
//! flow's packets itself (outer IP and UDP, then the overlay's shim) and the
//! ingress program opens the entry node's datagrams of that flow, so the
//! flow's packets never cross user space. What the kernel needs for it is
//! defined here, once for both sides.

/// Flows the kernel wraps at once.
pub const ENCAP_ENTRIES: u32 = 65_536;
/// Entry nodes whose datagrams the kernel opens at once.
pub const ENCAP_PEERS: u32 = 1_024;
/// The longest shim the kernel writes: every shim an overlay may have.
pub const MAX_FAST_SHIM: usize = crate::MAX_SHIM_LEN;

/// How the kernel wraps one flow's packets, keyed by the flow as it leaves
/// the host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncapEntry {
    /// CLOCK_MONOTONIC ns of the flow's last packet out, refreshed about
    /// once a second: the broker reads it to tell an idle flow.
    pub last_seen_ns: u64,
    /// The entry node (IPv4 in the first 4 bytes).
    pub peer: [u8; 16],
    /// This host's address toward it, as the broker's own socket would
    /// send from.
    pub source: [u8; 16],
    /// The rule that claimed the flow, whose counters count its packets.
    pub rule_id: u32,
    /// Host byte order.
    pub peer_port: u16,
    /// The broker's overlay port, which the entry node answers to.
    pub our_port: u16,
    /// The largest outer packet the path to the entry node takes; a packet
    /// (or a GSO packet's segment) larger goes to the broker, which tells
    /// the sender the MTU.
    pub mtu: u16,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`] of the outer header.
    pub peer_family: u8,
    pub shim_len: u8,
    pub _pad: [u8; 4],
    pub shim: [u8; MAX_FAST_SHIM],
}

impl Default for EncapEntry {
    fn default() -> Self {
        EncapEntry {
            last_seen_ns: 0,
            peer: [0; 16],
            source: [0; 16],
            rule_id: 0,
            peer_port: 0,
            our_port: 0,
            mtu: 0,
            peer_family: 0,
            shim_len: 0,
            _pad: [0; 4],
            shim: [0; MAX_FAST_SHIM],
        }
    }
}

/// An entry node whose datagrams the ingress program may open, and the
/// shim its overlay puts before each packet (the value, a length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EncapPeer {
    /// IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

impl EncapEntry {
    /// Whether `peer` (the sender of a datagram) is this flow's entry node:
    /// no other overlay's peer may hand the kernel packets of the flow.
    #[inline(always)]
    pub fn from_peer(&self, peer: &EncapPeer) -> bool {
        if self.peer_port != peer.port || self.peer_family != peer.family {
            return false;
        }
        let mut i = 0;
        while i < 16 {
            if self.peer[i] != peer.addr[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
