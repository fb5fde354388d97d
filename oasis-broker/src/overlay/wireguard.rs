//! WireGuard overlays: the peers of a wg-quick file as an overlay's entry
//! nodes. A flow goes to the peer whose AllowedIPs hold its destination
//! (the longest prefix), leaves with the tunnel address (`Address=`) as
//! its source, sealed by that peer's tunnel; what the peer sends back is
//! opened, checked against its AllowedIPs and handed to the return path,
//! which gives it back this host's address (the engine's tunnel map).
//!
//! The file is kept in a key store beside the config (`wireguard/NAME.conf`,
//! mode 0600 in a directory of mode 0700): the config names the file and
//! never holds the private key.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;
use oasis_common::FlowKey;
use oasis_io::packet::{End, rewrite_address, rewrite_ip_address};
use oasis_wireguard::{ConfError, MIN_BUFFER, PublicKey, Sealer, Tunnel, WgQuick};

use super::spec::unfit_entry;
use super::{LocalAddresses, OverlayPath, OverlaySpec};

/// Why a WireGuard overlay cannot be joined or used.
#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("{file}: {source}")]
    Conf { file: String, source: ConfError },
    #[error("{file}: [Peer] at line {line}: cannot resolve Endpoint {endpoint}: {reason}")]
    Unresolved {
        file: String,
        line: usize,
        endpoint: String,
        reason: String,
    },
    #[error(
        "{file}: [Peer] at line {line}: Endpoint {endpoint} is {why}; a peer must be another host, \
         or the sealed datagrams would go where nobody meant them to"
    )]
    UnfitEndpoint {
        file: String,
        line: usize,
        endpoint: String,
        why: &'static str,
    },
    #[error("keeping the overlay's keys in {path}: {source}")]
    Keep { path: PathBuf, source: std::io::Error },
}

/// One peer: its tunnel, where it listens, what it may send and carry.
#[derive(Debug)]
pub struct WgPeer {
    pub tunnel: Tunnel,
    pub endpoint: SocketAddr,
    pub allowed: Vec<IpNet>,
    /// Whether the log last said it carries (it says so on each change).
    pub reported: std::sync::atomic::AtomicBool,
}

impl WgPeer {
    /// Cryptokey routing: a packet from the peer is taken only from a
    /// source in its AllowedIPs.
    pub fn allows(&self, source: IpAddr) -> bool {
        self.allowed.iter().any(|net| net.contains(&source))
    }
}

/// A WireGuard overlay as the packet path uses it.
#[derive(Debug)]
pub struct WireGuardLink {
    pub peers: Vec<WgPeer>,
    pub tunnel_v4: Option<Ipv4Addr>,
    pub tunnel_v6: Option<Ipv6Addr>,
    /// `MTU=`: the largest packet the tunnel carries.
    pub mtu: Option<u16>,
    /// This host's public key, for the peer's operator.
    pub own_public: PublicKey,
    /// The peer network's DNS servers (`DNS=`).
    pub dns: Vec<IpAddr>,
    endpoints: Vec<SocketAddr>,
    /// DNS queries this host sent through the tunnel (for the names the
    /// overlay claims), by their source port: the return path hands their
    /// answers here instead of to the applications.
    queries: std::sync::Mutex<std::collections::HashMap<u16, std::sync::mpsc::SyncSender<Vec<u8>>>>,
    /// Whether any query waits: while none, the return path looks for none.
    querying: std::sync::atomic::AtomicUsize,
}

impl WireGuardLink {
    /// The link for a checked file whose peers' endpoints resolved to
    /// `endpoints` (in the file's order).
    pub fn new(conf: &WgQuick, endpoints: &[SocketAddr]) -> WireGuardLink {
        let own = &conf.interface.private_key;
        let peers = conf
            .peers
            .iter()
            .zip(endpoints)
            .map(|(peer, endpoint)| WgPeer {
                tunnel: Tunnel::new(
                    own,
                    peer.public_key,
                    peer.preshared_key.as_ref(),
                    peer.persistent_keepalive,
                ),
                endpoint: *endpoint,
                allowed: peer.allowed_ips.iter().map(IpNet::trunc).collect(),
                reported: std::sync::atomic::AtomicBool::new(true),
            })
            .collect();
        let addresses = &conf.interface.addresses;
        WireGuardLink {
            peers,
            tunnel_v4: addresses.iter().find_map(|a| match a.addr() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            tunnel_v6: addresses.iter().find_map(|a| match a.addr() {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
            mtu: conf.interface.mtu,
            own_public: own.public(),
            dns: conf.interface.dns.clone(),
            endpoints: endpoints.to_vec(),
            queries: Default::default(),
            querying: Default::default(),
        }
    }

    /// Waits for the answer to a DNS query sent from the tunnel address's
    /// UDP `port`; None when the port is taken by another query.
    pub fn expect_answer(&self, port: u16) -> Option<std::sync::mpsc::Receiver<Vec<u8>>> {
        let mut queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        if queries.contains_key(&port) {
            return None;
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        queries.insert(port, sender);
        self.querying
            .store(queries.len(), std::sync::atomic::Ordering::Relaxed);
        Some(receiver)
    }

    /// The query from `port` is answered or given up.
    pub fn forget_query(&self, port: u16) {
        let mut queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        queries.remove(&port);
        self.querying
            .store(queries.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `packet`, opened from a peer, answers one of this host's own
    /// DNS queries through the tunnel: then its payload went to the query.
    pub fn answers_query(&self, packet: &[u8]) -> bool {
        if self.querying.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return false;
        }
        let Some(key) = crate::engine::packet::flow_key(packet) else {
            return false;
        };
        let from_dns = key.proto == oasis_common::proto::UDP && key.sport == 53;
        let to_us = self.tunnel_source(key.family == oasis_common::FAMILY_V6)
            == Some(crate::engine::packet::flow_dst(&key));
        if !from_dns || !to_us {
            return false;
        }
        let queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = queries.get(&key.dport) else {
            return false;
        };
        let Ok(layout) = oasis_io::packet::layout(packet) else {
            return false;
        };
        let _ = waiting.try_send(packet.get(layout.l4 + 8..).unwrap_or_default().to_vec());
        true
    }

    /// Whether any peer may take new flows.
    pub fn carries(&self) -> bool {
        self.peers.iter().any(|p| p.tunnel.health().carries())
    }

    /// The peer whose AllowedIPs hold `dst` most narrowly; among peers
    /// that hold it equally (a specification's entry nodes each allow
    /// everything), the one `spread` picks, so flows spread over them.
    pub fn peer_for(&self, dst: IpAddr, spread: u64) -> Option<&WgPeer> {
        let narrowest = |peer: &WgPeer| {
            peer.allowed
                .iter()
                .filter(|n| n.contains(&dst))
                .map(IpNet::prefix_len)
                .max()
        };
        let best = self.peers.iter().filter_map(narrowest).max()?;
        let tied = || self.peers.iter().filter(move |p| narrowest(p) == Some(best));
        let count = tied().count() as u64;
        tied().nth((spread % count) as usize)
    }

    /// The peer that listens at `from`.
    pub fn peer_at(&self, from: SocketAddr) -> Option<&WgPeer> {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        self.peers.iter().find(|p| p.endpoint == from)
    }

    /// This host's address inside the tunnel for a packet of the family.
    pub fn tunnel_source(&self, v6: bool) -> Option<IpAddr> {
        match v6 {
            false => self.tunnel_v4.map(IpAddr::V4),
            true => self.tunnel_v6.map(IpAddr::V6),
        }
    }
}

/// The path of a WireGuard overlay: each flow to the peer its
/// destination's AllowedIPs name.
#[derive(Debug)]
pub struct WireGuardPath(pub Arc<WireGuardLink>);

impl OverlayPath for WireGuardPath {
    fn next_hop(&self, flow: &FlowKey) -> SocketAddr {
        // A fixed-key hash, as for plain entry nodes: the same flow meets
        // the same peer after a restart too.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        flow.hash(&mut hasher);
        let link = &self.0;
        link.peer_for(flow_dst(flow), hasher.finish())
            .map_or(link.endpoints[0], |peer| peer.endpoint)
    }

    fn peers(&self) -> &[SocketAddr] {
        &self.0.endpoints
    }

    fn carries(&self, flow: &FlowKey) -> bool {
        let dst = flow_dst(flow);
        self.0.peer_for(dst, 0).is_some() && self.0.tunnel_source(dst.is_ipv6()).is_some()
    }
}

fn flow_dst(key: &FlowKey) -> IpAddr {
    crate::engine::packet::flow_dst(key)
}

/// Gives a packet leaving through the tunnel its tunnel address as source
/// (checksums follow). A later fragment has only its IP header to change.
pub fn into_tunnel(packet: &mut [u8], source: IpAddr) -> bool {
    let later = oasis_io::packet::fragment(packet).is_some_and(|f| !f.first);
    if !later && rewrite_address(packet, End::Source, source).is_ok() {
        return true;
    }
    rewrite_ip_address(packet, End::Source, source).is_ok()
}

/// Reads and checks a wg-quick file's text and resolves its peers'
/// endpoints (blocking: may ask the resolver). `file` names it in errors.
pub fn prepare(
    file: &str,
    text: &str,
    own: &LocalAddresses,
) -> Result<(WgQuick, Vec<SocketAddr>), WireGuardError> {
    let conf = oasis_wireguard::conf::parse(text).map_err(|source| WireGuardError::Conf {
        file: file.into(),
        source,
    })?;
    let endpoints = resolve(file, &conf, own)?;
    Ok((conf, endpoints))
}

fn resolve(file: &str, conf: &WgQuick, own: &LocalAddresses) -> Result<Vec<SocketAddr>, WireGuardError> {
    let mut endpoints = Vec::with_capacity(conf.peers.len());
    for peer in &conf.peers {
        let endpoint = peer.endpoint.to_string();
        let unresolved = |reason: String| WireGuardError::Unresolved {
            file: file.into(),
            line: peer.line,
            endpoint: endpoint.clone(),
            reason,
        };
        let addr = (peer.endpoint.host.as_str(), peer.endpoint.port)
            .to_socket_addrs()
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?;
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        if let Some(why) = unfit_entry(addr.ip(), own) {
            return Err(WireGuardError::UnfitEndpoint {
                file: file.into(),
                line: peer.line,
                endpoint,
                why,
            });
        }
        endpoints.push(addr);
    }
    Ok(endpoints)
}

/// Reads a kept file again (at start), with its endpoints resolved anew.
pub fn load(path: &Path, own: &LocalAddresses) -> Result<(WgQuick, Vec<SocketAddr>), WireGuardError> {
    let file = path.display().to_string();
    let (conf, warnings) = oasis_wireguard::conf::read(path).map_err(|source| WireGuardError::Conf {
        file: file.clone(),
        source,
    })?;
    if warnings.readable_by_others {
        tracing::warn!(
            file,
            "the WireGuard key file may be read by others than its owner: chmod 600 it"
        );
    }
    let endpoints = resolve(&file, &conf, own)?;
    Ok((conf, endpoints))
}

/// The key store beside the config file.
pub fn key_dir(config_path: &Path) -> PathBuf {
    config_path.parent().unwrap_or(Path::new(".")).join("wireguard")
}

/// Keeps the checked file as `NAME.conf` in the key store, readable by
/// its owner alone, written whole or not at all.
pub fn keep(dir: &Path, name: &str, conf: &WgQuick) -> Result<PathBuf, WireGuardError> {
    let path = dir.join(format!("{name}.conf"));
    let failed = |source| WireGuardError::Keep {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    let partial = dir.join(format!(".{name}.conf.partial"));
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(failed)?;
        file.write_all(conf.render().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(failed)?;
    }
    #[cfg(not(unix))]
    std::fs::write(&partial, conf.render()).map_err(failed)?;
    std::fs::rename(&partial, &path).map_err(failed)?;
    Ok(path)
}

/// What the config keeps of a WireGuard overlay besides the key file: its
/// peers' endpoints as entry nodes, for `overlay show` and the checks
/// every overlay's entry nodes get.
pub fn spec_of(conf: &WgQuick) -> OverlaySpec {
    OverlaySpec {
        name: None,
        description: Some(format!(
            "WireGuard, {} peer{}",
            conf.peers.len(),
            if conf.peers.len() == 1 { "" } else { "s" }
        )),
        entries: conf.peers.iter().map(|p| p.endpoint.to_string()).collect(),
        shim_len: 0,
        module: None,
        wireguard: None,
    }
}

/// Datagrams sealed for WireGuard peers in one batch, in buffers reused
/// from batch to batch.
#[derive(Default)]
pub struct SealScratch {
    plain: Vec<u8>,
    sealed: Vec<(Vec<u8>, SocketAddr)>,
    used: usize,
}

impl SealScratch {
    /// Seals each packet for the peer at its `to`, taking each peer's lock
    /// once per run of packets to it.
    pub fn seal_all<'a>(
        &mut self,
        packets: impl Iterator<Item = (&'a WireGuardLink, &'a [u8], SocketAddr)>,
        now: Instant,
    ) {
        self.used = 0;
        let mut held: Option<(&'a WgPeer, Sealer<'a>)> = None;
        for (link, packet, to) in packets {
            let Some(peer) = link.peer_at(to) else { continue };
            let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
            let Some(source) = link.tunnel_source(v6) else {
                continue;
            };
            self.plain.clear();
            self.plain.extend_from_slice(packet);
            if !into_tunnel(&mut self.plain, source) {
                continue;
            }
            if !held.as_ref().is_some_and(|(p, _)| std::ptr::eq(*p, peer)) {
                held = Some((peer, peer.tunnel.lock()));
            }
            let (_, sealer) = held.as_mut().expect("just held");
            if self.sealed.len() == self.used {
                self.sealed.push((Vec::with_capacity(2048), to));
            }
            let (buf, dest) = &mut self.sealed[self.used];
            buf.resize(
                (self.plain.len() + oasis_wireguard::DATA_OVERHEAD).max(MIN_BUFFER),
                0,
            );
            if let Some(len) = sealer.seal(&self.plain, buf, now).map(<[u8]>::len) {
                buf.truncate(len);
                *dest = to;
                self.used += 1;
            }
        }
    }

    /// What the last [`SealScratch::seal_all`] made, with where each goes.
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> + Clone {
        self.sealed[..self.used].iter().map(|(d, to)| (d.as_slice(), *to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(peers: &[(&str, &str)]) -> WgQuick {
        let mut text = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.66.0.2/24\n",
            oasis_wireguard::PrivateKey::generate().to_base64()
        );
        for (endpoint, allowed) in peers {
            text += &format!(
                "[Peer]\nPublicKey = {}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n",
                oasis_wireguard::PrivateKey::generate().public()
            );
        }
        oasis_wireguard::conf::parse(&text).unwrap()
    }

    #[test]
    fn flows_go_to_the_peer_whose_allowed_ips_hold_them_most_narrowly() {
        let file = conf(&[
            ("192.0.2.1:51820", "0.0.0.0/0"),
            ("192.0.2.2:51820", "198.51.100.0/24"),
        ]);
        let endpoints: Vec<SocketAddr> = vec![
            "192.0.2.1:51820".parse().unwrap(),
            "192.0.2.2:51820".parse().unwrap(),
        ];
        let link = Arc::new(WireGuardLink::new(&file, &endpoints));
        let path = WireGuardPath(link.clone());
        let to = |dst: [u8; 4]| path.next_hop(&FlowKey::v4([10, 0, 0, 1], dst, 6, 1000, 443));
        assert_eq!(to([198, 51, 100, 7]), endpoints[1]);
        assert_eq!(to([203, 0, 113, 7]), endpoints[0]);
        assert!(path.carries(&FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 7], 6, 1, 2)));
        // No IPv6 tunnel address, and no peer allows IPv6: no carrier.
        let mut v6 = FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 7], 6, 1, 2);
        v6.family = oasis_common::FAMILY_V6;
        v6.dst = [0x20; 16];
        assert!(!path.carries(&v6));
        assert_eq!(link.tunnel_source(false), Some(IpAddr::from([10, 66, 0, 2])));
        assert!(
            link.peer_at("[::ffff:192.0.2.2]:51820".parse().unwrap())
                .is_some()
        );
        // Peers that allow alike share the flows.
        let both = conf(&[("192.0.2.1:51820", "0.0.0.0/0"), ("192.0.2.2:51820", "0.0.0.0/0")]);
        let path = WireGuardPath(Arc::new(WireGuardLink::new(&both, &endpoints)));
        let used: std::collections::HashSet<SocketAddr> = (1000..1100)
            .map(|port| path.next_hop(&FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 7], 6, port, 443)))
            .collect();
        assert_eq!(used.len(), 2);
        assert!(link.peer_at("192.0.2.2:51821".parse().unwrap()).is_none());
    }

    #[test]
    fn the_key_store_is_readable_by_its_owner_alone() {
        let dir = std::env::temp_dir().join(format!("oasis-wg-keep-{}", std::process::id()));
        let conf = conf(&[("192.0.2.1:51820", "0.0.0.0/0")]);
        let path = keep(&dir, "home", &conf).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert_eq!(
                std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let (again, endpoints) = load(&path, &LocalAddresses::default()).unwrap();
        assert_eq!(again.render(), conf.render());
        assert_eq!(endpoints, ["192.0.2.1:51820".parse::<SocketAddr>().unwrap()]);
        // An endpoint that is this host is refused, with its line.
        let own: LocalAddresses = ["192.0.2.1".parse().unwrap()].into_iter().collect();
        let error = load(&path, &own).unwrap_err().to_string();
        assert!(
            error.contains("[Peer] at line 5") && error.contains("this host's own"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_packet_into_the_tunnel_gets_the_tunnel_address_and_sound_checksums() {
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([192, 168, 1, 5], [203, 0, 113, 9], 64)
            .udp(5000, 53)
            .write(&mut packet, b"hello")
            .unwrap();
        assert!(into_tunnel(&mut packet, IpAddr::from([10, 66, 0, 2])));
        let parsed = etherparse::SlicedPacket::from_ip(&packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [10, 66, 0, 2]);
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
            panic!()
        };
        assert_eq!(
            udp.checksum(),
            udp.to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .unwrap()
        );
    }
}
