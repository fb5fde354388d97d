//! WireGuard for Oasis: the wg-quick files users already have, keys that
//! never print, and one peer's tunnel over boringtun's sans-IO protocol
//! core. The broker's WireGuard overlays and the exit node's WireGuard
//! clients both use it; neither writes a handshake or a cipher of its own.

pub mod conf;
pub mod key;
pub mod responder;
pub mod tunnel;

pub use conf::{ConfError, Endpoint, Interface, Peer, WgQuick};
pub use key::{KeyError, KeyFileError, PresharedKey, PrivateKey, PublicKey};
pub use responder::{Responder, Sender};
pub use tunnel::{
    DATA_OVERHEAD, DOWN_AFTER, DownWhy, Health, MIN_BUFFER, Opened, Sealer, Tunnel, TunnelStatus,
};
