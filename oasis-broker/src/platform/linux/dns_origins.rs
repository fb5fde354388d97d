//! Which server a redirected query was sent to. The redirect hooks keep
//! the original server per socket cookie (`DNS_ORIGINAL`); the broker sees
//! only the client's address and port, so it asks the kernel's socket
//! diagnostics (sock_diag, the interface `ss` uses) for the socket behind
//! them, whose cookie is the same number the hooks used.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use oasis_common::{DnsOriginal, FAMILY_V4};

use crate::platform::QueryOrigins;

pub struct LinuxOrigins {
    original: HashMap<MapData, u64, DnsOriginal>,
    /// Netlink sockets kept for reuse (one per concurrent lookup).
    sockets: Mutex<Vec<Socket>>,
}

impl LinuxOrigins {
    pub(super) fn new(original: HashMap<MapData, u64, DnsOriginal>) -> LinuxOrigins {
        LinuxOrigins {
            original,
            sockets: Mutex::new(Vec::new()),
        }
    }

    fn socket(&self) -> Option<Socket> {
        if let Some(socket) = self.sockets.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Some(socket);
        }
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).ok()?;
        socket.bind_auto().ok()?;
        socket.connect(&NetlinkAddr::new(0, 0)).ok()?;
        Some(socket)
    }

    /// The cookie of the socket whose own end is `local` and whose peer
    /// is `peer`.
    fn cookie(&self, tcp: bool, local: SocketAddr, peer: SocketAddr) -> Option<u64> {
        let socket = self.socket()?;
        // The kernel's exact UDP lookup takes the socket's peer as the
        // source (swapped, for historical reasons); TCP's takes its own
        // end. Ask as the kernel reads it; the answer names the socket's
        // own port, which must be the client's.
        let (source, destination) = if tcp { (local, peer) } else { (peer, local) };
        let found = exchange(&socket, tcp, source, destination)
            .filter(|(port, _)| *port == local.port())
            .map(|(_, cookie)| cookie);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(socket);
        found
    }
}

/// One exact sock_diag request; the socket's own port and cookie.
fn exchange(socket: &Socket, tcp: bool, source: SocketAddr, destination: SocketAddr) -> Option<(u16, u64)> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut id = if source.is_ipv4() {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    id.source_address = source.ip();
    id.source_port = source.port();
    id.destination_address = destination.ip();
    id.destination_port = destination.port();
    // No cookie to match.
    id.cookie = [0xff; 8];
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family: if source.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0).ok()?;
    let mut buf = vec![0u8; 8192];
    let len = socket.recv(&mut &mut buf[..], 0).ok()?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..len]).ok()?;
    match reply.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
            let id = &response.header.socket_id;
            Some((id.source_port, u64::from_ne_bytes(id.cookie)))
        }
        _ => None,
    }
}

impl QueryOrigins for LinuxOrigins {
    fn original_server(&self, tcp: bool, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddr> {
        let cookie = self.cookie(tcp, client, listener)?;
        let original = self.original.get(&cookie, 0).ok()?;
        let ip = if original.family == FAMILY_V4 {
            IpAddr::from([
                original.addr[0],
                original.addr[1],
                original.addr[2],
                original.addr[3],
            ])
        } else {
            IpAddr::from(original.addr).to_canonical()
        };
        Some(SocketAddr::new(ip, original.port))
    }
}
