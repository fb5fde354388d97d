//! The answering side, as an exit node is: one private key, the peers it
//! serves by public key, and which of them a datagram is from. A handshake
//! initiation names its sender's key (sealed to ours: opened here after
//! its MAC is checked, so strangers cost no Diffie-Hellman); every later
//! message names one of our session ids. A datagram of no known peer is
//! refused before any tunnel sees it.

use std::collections::HashMap;
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

use crate::key::{PresharedKey, PrivateKey, PublicKey};
use crate::tunnel::Tunnel;

/// Handshakes a second before the responder answers with cookies instead
/// (the protocol's defence against a flood of initiations).
const HANDSHAKES_PER_SECOND: u64 = 1000;

/// What a datagram to the responder is.
#[derive(Debug)]
pub enum Sender<'b> {
    /// From the peer at this index of [`Responder::peers`].
    Peer(usize),
    /// An initiation while under load: send this cookie back instead.
    Cookie(&'b [u8]),
    /// Of no peer this responder serves (an unknown key, a stale or
    /// forged session id, a bad MAC, not WireGuard at all).
    Unknown,
}

pub struct Responder {
    own: PrivateKey,
    own_public: PublicKey,
    limiter: Arc<RateLimiter>,
    peers: Vec<Tunnel>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
}

impl Responder {
    /// Serves `peers` (their keys, and a pre-shared key each may have).
    pub fn new(own: PrivateKey, peers: &[(PublicKey, Option<PresharedKey>)]) -> Responder {
        let own_public = own.public();
        let limiter = Arc::new(RateLimiter::new(&own_public.x25519(), HANDSHAKES_PER_SECOND));
        let tunnels: Vec<Tunnel> = peers
            .iter()
            .map(|(key, psk)| Tunnel::with_limiter(&own, *key, psk.as_ref(), None, Some(limiter.clone())))
            .collect();
        Responder {
            by_index: tunnels.iter().enumerate().map(|(i, t)| (t.index(), i)).collect(),
            by_key: tunnels.iter().enumerate().map(|(i, t)| (t.peer().0, i)).collect(),
            peers: tunnels,
            own,
            own_public,
            limiter,
        }
    }

    pub fn public(&self) -> PublicKey {
        self.own_public
    }

    pub fn peers(&self) -> &[Tunnel] {
        &self.peers
    }

    /// Which peer sent `datagram` from `from`; `out` holds a cookie reply
    /// when one is due (at least 64 bytes).
    pub fn sender<'b>(&self, from: std::net::IpAddr, datagram: &[u8], out: &'b mut [u8]) -> Sender<'b> {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return Sender::Unknown;
        };
        match packet {
            Packet::HandshakeInit(_) => {
                // The MAC with our key first; under load, a cookie.
                let init = match self.limiter.verify_packet(Some(from), datagram, out) {
                    Ok(Packet::HandshakeInit(init)) => init,
                    Err(TunnResult::WriteToNetwork(cookie)) => return Sender::Cookie(cookie),
                    _ => return Sender::Unknown,
                };
                let Ok(half) = parse_handshake_anon(&self.own.x25519(), &self.own_public.x25519(), &init)
                else {
                    return Sender::Unknown;
                };
                self.by_key
                    .get(&half.peer_static_public)
                    .map_or(Sender::Unknown, |i| Sender::Peer(*i))
            }
            Packet::HandshakeResponse(p) => self.by_session(p.receiver_idx),
            Packet::PacketCookieReply(p) => self.by_session(p.receiver_idx),
            Packet::PacketData(p) => self.by_session(p.receiver_idx),
        }
    }

    fn by_session(&self, receiver: u32) -> Sender<'static> {
        self.by_index
            .get(&(receiver >> 8))
            .map_or(Sender::Unknown, |i| Sender::Peer(*i))
    }

    /// Once a second: the handshake budget starts over.
    pub fn tick(&self) {
        self.limiter.reset_count();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_preshared_key_must_match() {
        let exit = PrivateKey::generate();
        let alice = PrivateKey::generate();
        let psk = PresharedKey([9; 32]);
        let responder = Responder::new(exit.clone(), &[(alice.public(), Some(psk.clone()))]);
        let now = Instant::now();
        let (mut buf, mut out, mut back) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
        for (theirs, answered) in [
            (Some(&psk), true),
            (Some(&PresharedKey([1; 32])), false),
            (None, false),
        ] {
            let client = Tunnel::new(&alice, exit.public(), theirs, None);
            let init = client.lock().start(&mut buf, now).unwrap().to_vec();
            let Sender::Peer(i) = responder.sender(FROM, &init, &mut out) else {
                panic!("the key is known whatever the pre-shared key");
            };
            let response = match responder.peers()[i].lock().open(FROM, &init, &mut back, now) {
                Opened::Reply(r) => r.to_vec(),
                other => panic!("{other:?}"),
            };
            // The response is sealed with the pre-shared key too: a client
            // with another one cannot open it.
            let opened = client.lock().open(FROM, &response, &mut back, now);
            assert_eq!(matches!(opened, Opened::Reply(_)), answered, "{opened:?}");
        }
    }

    use super::*;
    use crate::tunnel::Opened;
    use std::time::Instant;

    const FROM: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn the_responder_knows_its_peers_by_key_and_session_and_no_one_else() {
        let exit = PrivateKey::generate();
        let (alice, bob, mallory) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let responder = Responder::new(exit.clone(), &[(alice.public(), None), (bob.public(), None)]);
        let now = Instant::now();
        let (mut buf, mut out, mut back) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
        for (key, expected) in [(&alice, Some(0)), (&bob, Some(1)), (&mallory, None)] {
            let client = Tunnel::new(key, exit.public(), None, None);
            let init = client.lock().start(&mut buf, now).unwrap().to_vec();
            let sender = responder.sender(FROM, &init, &mut out);
            match (sender, expected) {
                (Sender::Peer(i), Some(e)) => {
                    assert_eq!(i, e);
                    // The peer's tunnel answers, and its next message names
                    // the session.
                    let response = match responder.peers()[i].lock().open(FROM, &init, &mut back, now) {
                        Opened::Reply(r) => r.to_vec(),
                        other => panic!("{other:?}"),
                    };
                    let keepalive = match client.lock().open(FROM, &response, &mut back, now) {
                        Opened::Reply(k) => k.to_vec(),
                        other => panic!("{other:?}"),
                    };
                    assert!(
                        matches!(responder.sender(FROM, &keepalive, &mut out), Sender::Peer(x) if x == i)
                    );
                }
                (Sender::Unknown, None) => {}
                (other, _) => panic!("{other:?} for peer {expected:?}"),
            }
        }
        assert!(matches!(
            responder.sender(FROM, b"\x45\x00 plain", &mut out),
            Sender::Unknown
        ));
        let mut forged = vec![4u8, 0, 0, 0];
        forged.extend_from_slice(&[0xff; 44]);
        assert!(matches!(
            responder.sender(FROM, &forged, &mut out),
            Sender::Unknown
        ));
    }
}
