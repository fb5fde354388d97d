//! The carrier's half of DNS through a WireGuard tunnel (the service's is
//! `dns/carrier.rs`): a query for a name the overlay claims leaves as a UDP
//! packet from the tunnel address to the file's `DNS=` server, sealed for
//! the peer that server's address belongs to and sent from the broker's
//! standard-port socket, as the overlay's flows are; the return loop hands
//! the answer back (`WireGuardLink::answers_query`) instead of delivering
//! it. Questions are rare next to packets: a query may allocate and block
//! (on the blocking pool).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wireguard::WireGuardLink;
use crate::dns::carrier::CarrierDns;
use crate::engine::Engine;
use crate::forward::OverlaySockets;
use crate::platform::DatagramSocket;

pub struct TunnelDns<S> {
    pub engine: Arc<Engine>,
    pub sockets: Arc<OverlaySockets<S>>,
}

#[async_trait::async_trait]
impl<S: DatagramSocket + 'static> CarrierDns for TunnelDns<S> {
    fn resolves(&self, overlay: &str) -> bool {
        let routes = self.engine.routes();
        let link = routes.overlays.by_name(overlay).and_then(|o| o.wireguard.clone());
        link.is_some_and(|w| !w.dns.is_empty())
    }

    fn any(&self) -> bool {
        let routes = self.engine.routes();
        routes.overlays.has_wireguard()
            && routes
                .overlays
                .iter()
                .any(|o| o.wireguard.as_ref().is_some_and(|w| !w.dns.is_empty()))
    }

    async fn exchange(&self, overlay: &str, query: Vec<u8>, budget: Duration) -> Option<Vec<u8>> {
        let link = self
            .engine
            .routes()
            .overlays
            .by_name(overlay)?
            .wireguard
            .clone()?;
        let each = budget / link.dns.len().max(1) as u32;
        for server in link.dns.clone() {
            let (link, sockets, query) = (link.clone(), self.sockets.clone(), query.clone());
            let asked = tokio::task::spawn_blocking(move || ask(&link, &sockets, server, &query, each)).await;
            if let Ok(Some(answer)) = asked {
                return Some(answer);
            }
        }
        None
    }
}

/// Sends `query` to `server` through the tunnel and waits up to `wait`
/// for its answer.
fn ask<S: DatagramSocket>(
    link: &WireGuardLink,
    sockets: &OverlaySockets<S>,
    server: IpAddr,
    query: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    let source = link.tunnel_source(server.is_ipv6())?;
    let peer = link.peer_for(server, 0)?;
    let (port, answer) = (0..8).find_map(|_| {
        let port = rand::random_range(49_152..=65_535);
        link.expect_answer(port).map(|answer| (port, answer))
    })?;
    let mut packet = Vec::with_capacity(query.len() + 48);
    let built = match (source, server) {
        (IpAddr::V4(from), IpAddr::V4(to)) => etherparse::PacketBuilder::ipv4(from.octets(), to.octets(), 64)
            .udp(port, 53)
            .write(&mut packet, query),
        (IpAddr::V6(from), IpAddr::V6(to)) => etherparse::PacketBuilder::ipv6(from.octets(), to.octets(), 64)
            .udp(port, 53)
            .write(&mut packet, query),
        _ => {
            link.forget_query(port);
            return None;
        }
    };
    if built.is_err() {
        link.forget_query(port);
        return None;
    }
    let mut sealed = vec![0u8; packet.len() + oasis_wireguard::DATA_OVERHEAD + oasis_wireguard::MIN_BUFFER];
    // None: the query waits for the handshake under way, and goes with
    // the session (the return loop sends what waited).
    let datagram = peer
        .tunnel
        .lock()
        .seal(&packet, &mut sealed, Instant::now())
        .map(<[u8]>::to_vec);
    let socket = match peer.endpoint.is_ipv4() {
        true => Some(&sockets.v4),
        false => sockets.v6.as_ref(),
    };
    if let (Some(datagram), Some(socket)) = (datagram, socket) {
        let mut scratch = S::Scratch::default();
        socket.send(
            &mut scratch,
            std::iter::once((&[][..], datagram.as_slice(), peer.endpoint)),
        );
    }
    let got = answer.recv_timeout(wait).ok();
    link.forget_query(port);
    got
}
