//! The exit node's fast path: once the exit has admitted a client's flow
//! and given it a NAT mapping, its uplink's ingress program carries the
//! flow both ways itself. A client's datagram of the flow is opened, its
//! packet leaves from the exit's public address and NAT port; a reply to
//! that port gets the client's addresses back and is wrapped toward the
//! client. User space keeps the mappings (ports, expiry, the state file)
//! and writes each one here. What both sides need is defined once, here.
//!
//! Clients over IPv4 or IPv6 (the outer header), flows of IPv4 TCP and UDP
//! inside (the exit's NAT has one public IPv4 address for them); the rest
//! (ICMP, IPv6 inside, fragments, SYN/FIN/RST, packets too big once
//! wrapped, received aggregates) stays on the exit's user-space path.

use crate::FlowKey;

/// Flows the exit's kernel carries at once.
pub const EXIT_FAST_FLOWS: u32 = 65_536;
/// The longest client token the kernel compares; a client with a longer
/// one keeps the user-space path.
pub const MAX_EXIT_TOKEN: usize = 32;
/// Priority classes counted apart; a higher class counts as the last.
pub const EXIT_FAST_CLASSES: u32 = 16;

/// A client's flow as its datagrams arrive: who sends them (the outer
/// source) and the packet inside, as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExitFlowKey {
    /// IPv4 in the first 4 bytes.
    pub client: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`]: the client's.
    pub family: u8,
    /// Up to the flow key's 8-byte alignment.
    pub _pad: [u8; 5],
    pub inner: FlowKey,
}

/// What the kernel does with a client's packet of the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitOut {
    /// CLOCK_MONOTONIC ns of its last packet, refreshed about once a second.
    pub last_seen_ns: u64,
    /// The source it leaves from.
    pub public: [u8; 4],
    /// Host byte order.
    pub nat_port: u16,
    /// The client's priority class (0 first).
    pub class: u8,
    /// How many bytes of `token` the shim must start with.
    pub token_len: u8,
    /// 1 once the kernel has written, into the reply's entry, the address
    /// the client sends to (the source replies must come from).
    pub learned: u8,
    pub _pad: [u8; 7],
    pub token: [u8; MAX_EXIT_TOKEN],
}

/// What the kernel does with a reply, keyed by the reply as it arrives
/// (remote → public address and NAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitBack {
    pub last_seen_ns: u64,
    /// The client's address and port: the outer destination (IPv4 in the
    /// first 4 bytes).
    pub client: [u8; 16],
    /// The exit's address the client sends to, the outer source, of the
    /// client's family; all zero until the kernel has seen a client's
    /// datagram of the flow (replies keep the user-space path until then).
    pub local: [u8; 16],
    /// The packet's destination as the client knows it (its own inner
    /// source).
    pub inside: [u8; 4],
    /// Host byte order, all three.
    pub client_port: u16,
    pub listen_port: u16,
    pub inside_port: u16,
    pub class: u8,
    /// The client's family: the outer header's.
    pub family: u8,
    pub _pad: [u8; 4],
}

/// A class's packets carried by the kernel, each way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitFastCounts {
    pub to_internet_packets: u64,
    pub to_internet_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// Why a packet of a flow the kernel carries went to user space after all
/// (indices of `OASIS_EXIT_FAST_MISSES`).
pub mod exit_miss {
    /// A received aggregate of several datagrams (GRO): not opened here.
    pub const AGGREGATE: u32 = 0;
    /// The shim did not start with the client's token.
    pub const TOKEN: u32 = 1;
    /// A reply too large for the uplink once wrapped.
    pub const TOO_BIG: u32 = 2;
    /// The kernel could not make or take the room for the outer headers.
    pub const NO_ROOM: u32 = 3;
    /// A reply before any datagram of its flow came through the kernel.
    pub const NOT_LEARNED: u32 = 4;
    /// A checksum left for the device to finish (sent from this host over
    /// veth): the headers it points into would move.
    pub const UNFINISHED: u32 = 5;
    pub const COUNT: u32 = 6;
    /// Their names, for the stats file.
    pub const NAMES: [&str; COUNT as usize] = [
        "received aggregate",
        "token mismatch",
        "too big once wrapped",
        "no room for the headers",
        "reply before the client's first",
        "checksum left to the device",
    ];
}

impl ExitFlowKey {
    /// The key of an IPv4 client's flow.
    pub fn v4(client: [u8; 4], client_port: u16, inner: FlowKey) -> ExitFlowKey {
        let mut key = ExitFlowKey {
            client: [0; 16],
            client_port,
            family: crate::FAMILY_V4,
            _pad: [0; 5],
            inner,
        };
        key.client[..4].copy_from_slice(&client);
        key
    }

    /// The key of an IPv6 client's flow.
    pub fn v6(client: [u8; 16], client_port: u16, inner: FlowKey) -> ExitFlowKey {
        ExitFlowKey {
            client,
            client_port,
            family: crate::FAMILY_V6,
            _pad: [0; 5],
            inner,
        }
    }
}
