//! The kernel's socket diagnostics (sock_diag, the interface `ss` uses):
//! an exact lookup of one TCP or UDP socket by its two ends. The DNS
//! service asks it which server a redirected query was for; the return
//! path asks it which fake address a live flow's socket talks to when a
//! restarted daemon meets the flow's packets before anything of its own.

use std::net::SocketAddr;
use std::sync::Mutex;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use crate::platform::SocketLookup;

/// Netlink sockets kept for reuse (one per concurrent lookup).
#[derive(Default)]
pub struct SockDiag {
    sockets: Mutex<Vec<Socket>>,
}

impl SockDiag {
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
    pub fn cookie(&self, tcp: bool, local: SocketAddr, peer: SocketAddr) -> Option<u64> {
        self.owner(tcp, local, peer).map(|owner| owner.cookie)
    }

    /// The socket whose own end is `local` and whose peer is `peer`: its
    /// cookie, its owner's uid and its cgroup's id.
    pub fn owner(&self, tcp: bool, local: SocketAddr, peer: SocketAddr) -> Option<SocketOwner> {
        let socket = self.socket()?;
        // The kernel's exact UDP lookup takes the socket's peer as the
        // source (swapped, for historical reasons); TCP's takes its own
        // end. Ask as the kernel reads it; the answer names the socket's
        // own port, which must be the client's.
        let (source, destination) = if tcp { (local, peer) } else { (peer, local) };
        let found = exchange(&socket, tcp, source, destination).filter(|(port, _)| *port == local.port());
        let found = found.map(|(_, owner)| owner);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(socket);
        found
    }
}

impl SocketLookup for SockDiag {
    fn connected(&self, proto: u8, local: SocketAddr, peer: SocketAddr) -> bool {
        match proto {
            oasis_common::proto::TCP => self.cookie(true, local, peer).is_some(),
            oasis_common::proto::UDP => self.cookie(false, local, peer).is_some(),
            _ => false,
        }
    }

    fn tcp_peers(
        &self,
        wanted: &dyn Fn(std::net::IpAddr) -> bool,
    ) -> std::io::Result<Vec<(SocketAddr, SocketAddr)>> {
        let mut found = Vec::new();
        for family in [AF_INET, AF_INET6] {
            dump_tcp(family, &mut |local, peer| {
                if wanted(peer.ip()) {
                    found.push((local, peer));
                }
            })?;
        }
        Ok(found)
    }

    fn end_socket(&self, proto: u8, local: SocketAddr, peer: SocketAddr) -> std::io::Result<()> {
        match proto {
            oasis_common::proto::TCP => destroy(IPPROTO_TCP, local, peer),
            // The kernel reads a UDP socket's ends swapped, as in `owner`.
            oasis_common::proto::UDP => destroy(IPPROTO_UDP, peer, local),
            _ => Err(std::io::Error::from(std::io::ErrorKind::Unsupported)),
        }
    }
}

/// Every TCP socket of a family with a peer (established or on its way
/// there or out), as (own end, peer).
fn dump_tcp(family: u8, each: &mut dyn FnMut(SocketAddr, SocketAddr)) -> std::io::Result<()> {
    // Everything but listening, closed and time-wait sockets.
    let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::CLOSE - StateFlags::TIME_WAIT;
    dump(family, IPPROTO_TCP, states, &mut |response| {
        let id = &response.header.socket_id;
        each(
            SocketAddr::new(id.source_address, id.source_port),
            SocketAddr::new(id.destination_address, id.destination_port),
        );
    })
}

/// Every socket of a family and protocol in `states`, each as the kernel
/// describes it (its own end first), with its cgroup id asked for.
fn dump(
    family: u8,
    protocol: u8,
    states: StateFlags,
    each: &mut dyn FnMut(&netlink_packet_sock_diag::inet::InetResponse),
) -> std::io::Result<()> {
    use netlink_packet_core::{NLM_F_DUMP, NetlinkPayload};
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: id,
        })
        .into(),
    );
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let len = socket.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at < len {
            let Ok(message) = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..len]) else {
                return Ok(());
            };
            let size = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(std::io::Error::other(format!("sock_diag: {e:?}"))),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => each(&response),
                _ => {}
            }
            if size == 0 {
                return Ok(());
            }
            at += size.next_multiple_of(4);
        }
    }
}

/// Every TCP or UDP socket of this namespace and its owner, by (own end,
/// peer): one dump per family instead of a lookup per socket, for when
/// many are asked about at once.
pub fn all_owners(tcp: bool) -> std::collections::HashMap<(SocketAddr, SocketAddr), SocketOwner> {
    let mut owners = std::collections::HashMap::new();
    let protocol = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    for family in [AF_INET, AF_INET6] {
        let _ = dump(family, protocol, StateFlags::all(), &mut |response| {
            let (local, peer, owner) = describe_owner(response, tcp);
            owners.insert((local, peer), owner);
        });
    }
    owners
}

/// Ends a socket as `ss -K` does (SOCK_DESTROY): its application gets
/// ECONNABORTED at once. `source` and `destination` as the kernel's exact
/// lookup of `protocol` reads them.
fn destroy(protocol: u8, source: SocketAddr, destination: SocketAddr) -> std::io::Result<()> {
    use netlink_packet_core::{NLM_F_ACK, NetlinkPayload};
    use netlink_packet_sock_diag::message::SockDiagDestroy;
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut id = if source.is_ipv4() {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    id.source_address = source.ip();
    id.source_port = source.port();
    id.destination_address = destination.ip();
    id.destination_port = destination.port();
    id.cookie = [0xff; 8];
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: if source.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        }))),
    );
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0)?;
    let mut buf = vec![0u8; 4096];
    let len = socket.recv(&mut &mut buf[..], 0)?;
    match NetlinkMessage::<SockDiagDestroy>::deserialize(&buf[..len]).map(|m| m.payload) {
        Ok(NetlinkPayload::Error(e)) if e.code.is_some() => Err(e.to_io()),
        _ => Ok(()),
    }
}

/// One exact sock_diag request; the socket's own port and cookie.
/// What sock_diag tells of a socket's owner.
#[derive(Clone, Copy, Debug)]
pub struct SocketOwner {
    pub cookie: u64,
    pub uid: u32,
    /// Its cgroup's id, where the kernel says (5.7 and later).
    pub cgroup: Option<u64>,
    /// A full socket, with an owner: not one in TIME_WAIT or a
    /// half-open connection's request, which the kernel reports as root's.
    pub full: bool,
}

/// TCP states of sockets without an owner of their own.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// The kernel's attribute for a socket's cgroup id (`INET_DIAG_CGROUP_ID`).
const INET_DIAG_CGROUP_ID: u16 = 21;

fn exchange(
    socket: &Socket,
    tcp: bool,
    source: SocketAddr,
    destination: SocketAddr,
) -> Option<(u16, SocketOwner)> {
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
            let (local, _, owner) = describe_owner(&response, tcp);
            Some((local.port(), owner))
        }
        _ => None,
    }
}

/// A socket as sock_diag describes it: its own end, its peer, its owner.
fn describe_owner(
    response: &netlink_packet_sock_diag::inet::InetResponse,
    tcp: bool,
) -> (SocketAddr, SocketAddr, SocketOwner) {
    use netlink_packet_core::Nla as _;
    let id = &response.header.socket_id;
    let cgroup = response.nlas.iter().find_map(|nla| match nla {
        netlink_packet_sock_diag::inet::nlas::Nla::Other(other) if other.kind() == INET_DIAG_CGROUP_ID => {
            let mut value = [0u8; 8];
            (other.value_len() == 8).then(|| {
                other.emit_value(&mut value);
                u64::from_ne_bytes(value)
            })
        }
        _ => None,
    });
    let state = response.header.state;
    let owner = SocketOwner {
        cookie: u64::from_ne_bytes(id.cookie),
        uid: response.header.uid,
        cgroup,
        full: !tcp || (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV),
    };
    (
        SocketAddr::new(id.source_address, id.source_port),
        SocketAddr::new(id.destination_address, id.destination_port),
        owner,
    )
}
