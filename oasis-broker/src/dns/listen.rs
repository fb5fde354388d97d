//! The DNS listeners: on 127.0.0.1 and ::1, the DNS port (queries to the
//! host's own servers) and the next one (queries to any other server);
//! UDP served by threads of our own (udp.rs), TCP by hickory-server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, ResponseCode};
use hickory_proto::rr::Name;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

use super::message::{EDNS_UDP_LIMIT, refusal};
use super::server::{Answer, DnsService};

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// The service as hickory-server's handler, for TCP, on the listener at
/// `port`; `explicit`: the one for queries to servers other than the
/// host's own.
pub struct TcpHandler {
    pub service: Arc<DnsService>,
    pub port: u16,
    pub explicit: bool,
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        use std::sync::atomic::Ordering::Relaxed;
        let service = &self.service;
        service.counters.queries.fetch_add(1, Relaxed);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(true);
        if let Some(edns) = request.edns() {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_UDP_LIMIT);
            ours.set_version(0);
            // RFC 3225: the DO bit is echoed.
            ours.set_dnssec_ok(edns.flags().dnssec_ok);
            builder.edns(ours);
        }
        let queries = request.queries();
        let answer = match refusal(request.message_type(), request.op_code(), queries.len()) {
            Some(code) => {
                service.counters.refused.fetch_add(1, Relaxed);
                Answer::code(code)
            }
            None => {
                let client = request.src();
                let listener = SocketAddr::new(
                    if client.is_ipv4() {
                        IpAddr::from([127, 0, 0, 1])
                    } else {
                        IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
                    },
                    self.port,
                );
                let server = if self.explicit {
                    service.route(true, client, listener)
                } else {
                    None
                };
                let who = Some(super::server::Who {
                    tcp: true,
                    client,
                    listener,
                });
                match server {
                    Some(server) => service.answer_over_tcp_from(server, request, who).await,
                    None => {
                        let name: Name = queries[0].name().into();
                        service
                            .answer(
                                &name,
                                queries[0].query_class(),
                                queries[0].query_type(),
                                service.timeout,
                                who,
                            )
                            .await
                    }
                }
            }
        };
        header.set_response_code(answer.code);
        let sent = response
            .send_response(builder.build(
                header,
                &answer.answers,
                &answer.authority,
                &[],
                &answer.additional,
            ))
            .await;
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("sending a DNS answer over TCP: {e}");
                let mut failed = Header::new();
                failed.set_response_code(ResponseCode::ServFail);
                failed.into()
            }
        }
    }
}

/// UDP sockets per address: threads that can run on different cores. They
/// share the port through SO_REUSEPORT, which Unix has.
const UDP_SOCKETS: usize = if cfg!(unix) { 2 } else { 1 };

fn reuseport_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The port queries to servers other than the host's own come to: the
/// DNS port's next one (the redirect tells the two kinds apart, so the
/// common kind never pays for finding out which server was asked).
pub fn explicit_port(port: u16) -> u16 {
    port.wrapping_add(1)
}

/// Binds the listeners on 127.0.0.1 and, when `v6`, on ::1, at `port`
/// (queries to the host's own servers) and [`explicit_port`] (queries to
/// any other): UDP served by our own threads (udp.rs), TCP by
/// hickory-server. Returns the TCP servers (they run on the current tokio
/// runtime) and whether IPv6 is served.
pub async fn listen(
    service: Arc<DnsService>,
    port: u16,
    v6: bool,
    liveness: &crate::liveness::Liveness,
) -> std::io::Result<(Vec<ServerFuture<TcpHandler>>, bool)> {
    let mut servers = Vec::new();
    let mut served_v6 = false;
    for (port, explicit) in [(port, false), (explicit_port(port), true)] {
        let mut server = ServerFuture::new(TcpHandler {
            service: service.clone(),
            port,
            explicit,
        });
        let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], port))];
        if v6 && (!explicit || served_v6) {
            addrs.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
        }
        // Explicit servers are the rarer kind: one socket a family does.
        let per_address = if explicit { 1 } else { UDP_SOCKETS };
        for addr in addrs {
            let mut sockets = Vec::new();
            for _ in 0..per_address {
                match reuseport_udp(addr) {
                    Ok(socket) => sockets.push(socket),
                    Err(e) if addr.is_ipv6() => {
                        tracing::warn!(
                            "DNS on [::1]:{port} unavailable ({e}); IPv6 queries go out untouched"
                        );
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if sockets.len() < per_address {
                continue;
            }
            let tcp = tokio::net::TcpListener::bind(addr).await?;
            let family = if addr.is_ipv6() { "v6" } else { "v4" };
            let kind = if explicit { "x" } else { "" };
            for (index, socket) in sockets.into_iter().enumerate() {
                let name = format!("oasis-dns{kind}-{family}-{index}");
                let tick = liveness.register(&name);
                super::udp::spawn_thread(
                    name,
                    socket,
                    service.clone(),
                    tokio::runtime::Handle::current(),
                    explicit,
                    tick,
                )?;
            }
            server.register_listener(tcp, TCP_TIMEOUT);
            if !explicit {
                served_v6 |= addr.is_ipv6();
            }
        }
        servers.push(server);
    }
    Ok((servers, served_v6))
}
