//! Clients that speak WireGuard (`--wireguard-key FILE --peer KEY`): they
//! are known by their public key, not their address, so no address
//! allow-list is needed and a client that roams keeps its flows. The NAT
//! knows each peer by an address made from its key (in fd57:6700::/32,
//! port 0), which stays the same across roaming and restarts; replies go
//! to wherever the peer last sent an authenticated datagram from.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;

use oasis_wireguard::{PresharedKey, PrivateKey, PublicKey, Responder};

/// A peer as the command line names it: `PUBKEY[,class=N][,psk=FILE]`.
/// A pre-shared key is secret, so it is named by its file (as `wg
/// genpsk` writes one), never given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub key: PublicKey,
    pub class: u8,
    pub psk: Option<std::path::PathBuf>,
}

impl FromStr for WgPeer {
    type Err = String;
    fn from_str(text: &str) -> Result<WgPeer, String> {
        let mut parts = text.split(',');
        let key = PublicKey::parse(parts.next().unwrap_or("")).map_err(|e| format!("{e}"))?;
        let mut peer = WgPeer {
            key,
            class: 0,
            psk: None,
        };
        for part in parts {
            match part.trim().split_once('=') {
                Some(("class", n)) => {
                    peer.class = n
                        .parse()
                        .map_err(|_| format!("class {n:?} is not a number 0-255"))?
                }
                Some(("psk", file)) if !file.is_empty() => peer.psk = Some(file.into()),
                _ => return Err(format!("{part:?}: expected class=N or psk=FILE")),
            }
        }
        Ok(peer)
    }
}

/// Reads each peer's pre-shared key file, if it names one: the keys, and
/// the files others than their owner may read (for a warning).
pub fn preshared_keys(peers: &[WgPeer]) -> Result<(Vec<Option<PresharedKey>>, Vec<String>), String> {
    let mut keys = Vec::with_capacity(peers.len());
    let mut open = Vec::new();
    for peer in peers {
        let Some(path) = &peer.psk else {
            keys.push(None);
            continue;
        };
        let (key, readable) = PresharedKey::read(path).map_err(|e| e.to_string())?;
        if readable {
            open.push(path.display().to_string());
        }
        keys.push(Some(key));
    }
    Ok((keys, open))
}

/// The prefix of the addresses the NAT knows WireGuard peers by.
const PEER_PREFIX: [u8; 4] = [0xfd, 0x57, 0x67, 0x00];

/// Whether `addr` is a WireGuard peer's address for the NAT.
pub fn is_peer_address(addr: SocketAddr) -> bool {
    matches!(addr.ip(), IpAddr::V6(v6) if v6.octets()[..4] == PEER_PREFIX && addr.port() == 0)
}

fn peer_address(key: &PublicKey) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets[..4].copy_from_slice(&PEER_PREFIX);
    octets[4..].copy_from_slice(&key.0[..12]);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), 0)
}

pub struct WgClients {
    pub responder: Responder,
    classes: Vec<u8>,
    addresses: Vec<SocketAddr>,
    by_address: HashMap<SocketAddr, usize>,
    /// Where each peer last sent an authenticated datagram from.
    endpoints: Vec<Mutex<Option<SocketAddr>>>,
    /// Whether an endpoint changed since they were last saved.
    moved: std::sync::atomic::AtomicBool,
}

/// The peers' endpoints as the exit keeps them across restarts: a restarted
/// exit with a reply to send starts the handshake itself, where the peer is,
/// rather than wait for the peer to send again (a download's client may
/// send nothing until it hears something).
pub type SavedEndpoints = std::collections::BTreeMap<String, SocketAddr>;

impl WgClients {
    /// `psks`: each peer's pre-shared key (see [`preshared_keys`]), or
    /// none for all.
    pub fn new(own: PrivateKey, peers: &[WgPeer], psks: &[Option<PresharedKey>]) -> WgClients {
        let keys: Vec<_> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key, psks.get(i).cloned().flatten()))
            .collect();
        let addresses: Vec<SocketAddr> = peers.iter().map(|p| peer_address(&p.key)).collect();
        WgClients {
            responder: Responder::new(own, &keys),
            classes: peers.iter().map(|p| p.class).collect(),
            by_address: addresses.iter().enumerate().map(|(i, a)| (*a, i)).collect(),
            addresses,
            endpoints: peers.iter().map(|_| Mutex::new(None)).collect(),
            moved: Default::default(),
        }
    }

    /// The endpoints to save, when one changed since the last call.
    pub fn take_moved(&self) -> Option<SavedEndpoints> {
        if !self.moved.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let tunnels = self.responder.peers();
        Some(
            (0..self.len())
                .filter_map(|i| Some((tunnels[i].peer().to_string(), self.endpoint(i)?)))
                .collect(),
        )
    }

    /// Endpoints a previous exit saved, for the peers this one serves.
    pub fn restore(&self, saved: &SavedEndpoints) -> usize {
        let mut restored = 0;
        for (i, tunnel) in self.responder.peers().iter().enumerate() {
            if let Some(endpoint) = saved.get(&tunnel.peer().to_string()) {
                *self.endpoints[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(*endpoint);
                restored += 1;
            }
        }
        restored
    }

    /// Peer `i`'s address for the NAT, and its priority class.
    pub fn client(&self, i: usize) -> (SocketAddr, u8) {
        (self.addresses[i], self.classes[i])
    }

    /// The peer the NAT knows by `addr`.
    pub fn peer_of(&self, addr: SocketAddr) -> Option<usize> {
        self.by_address.get(&addr).copied()
    }

    /// Peer `i` sent an authenticated datagram from `from`: replies go
    /// there from now on.
    pub fn seen_at(&self, i: usize, from: SocketAddr) {
        let mut endpoint = self.endpoints[i].lock().unwrap_or_else(|e| e.into_inner());
        if *endpoint != Some(from) {
            if endpoint.is_some() {
                tracing::info!(peer = %self.responder.peers()[i].peer(), %from, "WireGuard client roamed");
            }
            *endpoint = Some(from);
            self.moved.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    pub fn endpoint(&self, i: usize) -> Option<SocketAddr> {
        *self.endpoints[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_get_stable_addresses_of_their_own() {
        let key = PrivateKey::generate().public();
        let peer: WgPeer = format!("{key},class=2").parse().unwrap();
        assert_eq!((peer.key, peer.class), (key, 2));
        assert!("nonsense".parse::<WgPeer>().is_err());
        let with_psk: WgPeer = format!("{key},psk=/etc/oasis-exit/alice.psk").parse().unwrap();
        assert_eq!(
            with_psk.psk.as_deref(),
            Some(std::path::Path::new("/etc/oasis-exit/alice.psk"))
        );
        let missing = preshared_keys(&[with_psk]).unwrap_err();
        assert!(
            missing.starts_with("reading /etc/oasis-exit/alice.psk"),
            "{missing}"
        );
        assert!(format!("{key},colour=red").parse::<WgPeer>().is_err());
        let other: WgPeer = PrivateKey::generate().public().to_string().parse().unwrap();
        let clients = WgClients::new(PrivateKey::generate(), &[peer.clone(), other], &[]);
        let (addr, class) = clients.client(0);
        assert!(is_peer_address(addr));
        assert_eq!(class, 2);
        assert_ne!(clients.client(1).0, addr);
        assert_eq!(clients.peer_of(addr), Some(0));
        assert_eq!(
            WgClients::new(PrivateKey::generate(), std::slice::from_ref(&peer), &[])
                .client(0)
                .0,
            addr,
            "the same key, the same address"
        );
        assert!(!is_peer_address("[fd57:6700::1]:7400".parse().unwrap()));
        assert!(!is_peer_address("10.0.0.1:0".parse().unwrap()));
        clients.seen_at(0, "192.0.2.1:5000".parse().unwrap());
        assert_eq!(clients.endpoint(0), Some("192.0.2.1:5000".parse().unwrap()));
        // Saved once per change, and restored by the next exit's peers.
        let saved = clients.take_moved().unwrap();
        assert!(clients.take_moved().is_none());
        let next = WgClients::new(PrivateKey::generate(), &[peer], &[]);
        assert_eq!(next.restore(&saved), 1);
        assert_eq!(next.endpoint(0), Some("192.0.2.1:5000".parse().unwrap()));
    }
}
