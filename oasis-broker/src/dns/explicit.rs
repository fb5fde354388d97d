//! Queries an application sent to a server of its own choosing (`dig
//! @10.0.0.5`, split-horizon and VPN DNS, per-link servers), not one of the
//! host's: that server answers, as it would without Oasis. A name no rule
//! claims gets the server's own answer, byte for byte over UDP; a claimed
//! name gets its fake address, the real addresses asked of that server.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use hickory_server::server::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cache::Upstream;
use super::policy::{Plan, claim_in_chain, sections};
use super::server::{Answer, DnsService, Who};
use crate::shared::snapshot;

/// What goes back to the client.
pub(super) enum Reply {
    /// The server's own response, untouched (its ID is the client's);
    /// `personal`: given for this asker only, never kept.
    Raw {
        bytes: Vec<u8>,
        personal: bool,
    },
    Answer(Answer),
}

impl DnsService {
    /// Answers `query` (its wire form `raw`) that the application sent to
    /// `server`.
    pub(super) async fn answer_from(
        &self,
        server: SocketAddr,
        query: &Message,
        raw: &[u8],
        who: Option<Who>,
    ) -> Reply {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.explicit.fetch_add(1, Relaxed);
        let question = &query.queries()[0];
        let (qname, qclass, qtype): (Name, _, _) = (
            question.name().clone(),
            question.query_class(),
            question.query_type(),
        );
        if qclass == DNSClass::IN
            && let Some(answer) = self.local(&qname, qclass, qtype)
        {
            return Reply::Answer(answer);
        }
        let (key, names, plan, personal) = self.prepare(&qname, qtype, who);
        if let Plan::NoData { rule } = plan {
            return Reply::Answer(self.withheld(&key, qtype, rule).personal(personal));
        }
        let Some(bytes) = forward(server, raw, self.timeout).await else {
            self.counters.servfail.fetch_add(1, Relaxed);
            return Reply::Answer(Answer::code(ResponseCode::ServFail));
        };
        let Ok(response) = Message::from_vec(&bytes) else {
            return Reply::Raw { bytes, personal };
        };
        if qclass != DNSClass::IN {
            return Reply::Raw { bytes, personal };
        }
        let upstream = Upstream::from_response(&response);
        // Unchanged unless a rule has a say: the name, an alias target, or
        // an address anywhere in the answer.
        if plan == Plan::PassThrough
            && let Upstream::Records(records) = &upstream
        {
            let claimed_alias = matches!(qtype, RecordType::A | RecordType::AAAA)
                && claim_in_chain(records, &names).is_some();
            let (_, _, withheld) = sections(&key, qtype, records.clone(), &names);
            if !claimed_alias && withheld == 0 {
                self.counters.passed.fetch_add(1, Relaxed);
                return Reply::Raw { bytes, personal };
            }
        } else if plan == Plan::PassThrough {
            self.counters.negative.fetch_add(1, Relaxed);
            return Reply::Raw { bytes, personal };
        }
        let names = snapshot(&self.names);
        let until = super::reuse::lifetime(&bytes).map(|lifetime| std::time::Instant::now() + lifetime);
        Reply::Answer(
            self.finish(&qname, &key, qtype, &names, plan, upstream, until)
                .personal(personal),
        )
    }
}

impl DnsService {
    /// As [`answer_from`](Self::answer_from), for a query that came over
    /// TCP (hickory-server hands it parsed): asked again in wire form.
    pub(super) async fn answer_over_tcp_from(
        &self,
        server: SocketAddr,
        request: &Request,
        who: Option<Who>,
    ) -> Answer {
        let mut query = Message::new();
        query
            .set_id(request.id())
            .set_recursion_desired(request.recursion_desired())
            .add_query(request.queries()[0].original().clone());
        if let Some(edns) = request.edns() {
            query.set_edns(edns.clone());
        }
        let Ok(raw) = query.to_vec() else {
            return Answer::code(ResponseCode::FormErr);
        };
        match self.answer_from(server, &query, &raw, who).await {
            Reply::Answer(answer) => answer,
            Reply::Raw { bytes, .. } => match Message::from_vec(&bytes) {
                Ok(mut response) => Answer {
                    code: response.response_code(),
                    answers: response.take_answers(),
                    authority: response.take_name_servers(),
                    additional: response.take_additionals(),
                    keep: None,
                },
                Err(_) => Answer::code(ResponseCode::ServFail),
            },
        }
    }
}

/// Sends `query` to `server` over UDP (TCP when the answer comes back
/// truncated) and returns the response, or None on timeout or error.
pub(super) async fn forward(server: SocketAddr, query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let response = tokio::time::timeout(timeout, over_udp(server, query))
        .await
        .ok()??;
    let truncated = response.get(2).is_some_and(|flags| flags & 0x02 != 0);
    if !truncated {
        return Some(response);
    }
    tokio::time::timeout(timeout, over_tcp(server, query))
        .await
        .ok()?
}

async fn over_udp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await.ok()?;
    socket.connect(server).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let len = socket.recv(&mut buf).await.ok()?;
        // Only the answer to this query (same ID) counts.
        if len >= 12 && buf[..2] == query[..2] {
            buf.truncate(len);
            return Some(buf);
        }
    }
}

async fn over_tcp(server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(server).await.ok()?;
    let len = u16::try_from(query.len()).ok()?;
    stream.write_all(&len.to_be_bytes()).await.ok()?;
    stream.write_all(query).await.ok()?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await.ok()?;
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut response).await.ok()?;
    Some(response)
}
