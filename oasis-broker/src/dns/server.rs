//! The DNS listener: hickory-server on loopback (UDP and TCP), answering by
//! the policy in `policy.rs`, with fake addresses from the fake table and
//! everything else from the upstream resolver.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::ProtoErrorKind;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

use super::DnsCounters;
use super::policy::{Plan, UnderlayAnswers, addresses, claim_in_chain, plan, remaining_ttl};
use crate::fake::{FakeError, FakeTable};
use crate::names::NameRules;
use crate::platform::linux::forward::{Shared, snapshot};

/// Without EDNS a UDP answer may be at most 512 bytes (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// The largest UDP answer we send to EDNS clients, whatever they offer:
/// the size that avoids IP fragmentation on nearly every path.
const EDNS_UDP_LIMIT: u16 = 1232;
/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DnsService {
    pub resolver: TokioResolver,
    pub names: Shared<NameRules>,
    pub fakes: Arc<Mutex<FakeTable>>,
    pub counters: Arc<DnsCounters>,
    pub fake_ttl: u32,
    pub underlay: UnderlayAnswers,
    pub timeout: Duration,
}

/// What the upstream said.
enum Upstream {
    Records(Vec<Record>),
    Negative { code: ResponseCode, soa: Option<Box<Record>> },
    Failed,
}

/// The parts of a response.
struct Answer {
    code: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
}

impl Answer {
    fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            answers: Vec::new(),
            authority: Vec::new(),
        }
    }
}

impl DnsService {
    async fn ask(&self, name: &Name, qtype: RecordType) -> Upstream {
        let lookup = match tokio::time::timeout(self.timeout, self.resolver.lookup(name.clone(), qtype)).await
        {
            Err(_) => {
                tracing::debug!(%name, ?qtype, "upstream timed out");
                return Upstream::Failed;
            }
            Ok(Ok(lookup)) => lookup,
            Ok(Err(e)) => {
                if let Some(ProtoErrorKind::NoRecordsFound {
                    response_code, soa, ..
                }) = e.proto().map(|p| p.kind())
                {
                    return Upstream::Negative {
                        code: *response_code,
                        soa: soa.as_ref().map(|soa| Box::new((**soa).clone().into_record_of_rdata())),
                    };
                }
                tracing::debug!(%name, ?qtype, "upstream failed: {e}");
                return Upstream::Failed;
            }
        };
        let left = lookup
            .valid_until()
            .saturating_duration_since(Instant::now())
            .as_secs();
        Upstream::Records(
            lookup
                .records()
                .iter()
                .map(|record| {
                    let mut record = record.clone();
                    record.set_ttl(remaining_ttl(record.ttl(), left));
                    record
                })
                .collect(),
        )
    }

    async fn answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let names = snapshot(&self.names);
        let text = qname.to_utf8();
        let claim = names.first_match(&text);
        match plan(qtype, claim, self.underlay) {
            Plan::NoData { rule } => {
                tracing::debug!(name = %text, ?qtype, rule, "claimed name, type withheld");
                self.counters
                    .empty
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Answer::code(ResponseCode::NoError)
            }
            Plan::Fake { rule, carrier } => match self.ask(qname, qtype).await {
                Upstream::Records(records) => self.fake(qname, qtype, &records, rule, &carrier.to_string()),
                other => self.relay(other),
            },
            Plan::PassThrough => {
                let upstream = self.ask(qname, qtype).await;
                // The name may be an alias of one a rule claims.
                if let Upstream::Records(records) = &upstream
                    && matches!(qtype, RecordType::A | RecordType::AAAA)
                    && let Some((rule, carrier)) = claim_in_chain(records, &names)
                    && let Plan::Fake { .. } = plan(qtype, Some((rule, carrier)), self.underlay)
                {
                    return self.fake(qname, qtype, records, rule, &carrier.to_string());
                }
                self.relay(upstream)
            }
        }
    }

    fn relay(&self, upstream: Upstream) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        match upstream {
            Upstream::Records(answers) => {
                self.counters.passed.fetch_add(1, Relaxed);
                Answer {
                    code: ResponseCode::NoError,
                    answers,
                    authority: Vec::new(),
                }
            }
            Upstream::Negative { code, soa } => {
                self.counters.negative.fetch_add(1, Relaxed);
                Answer {
                    code,
                    answers: Vec::new(),
                    authority: soa.into_iter().map(|soa| *soa).collect(),
                }
            }
            Upstream::Failed => {
                self.counters.servfail.fetch_add(1, Relaxed);
                Answer::code(ResponseCode::ServFail)
            }
        }
    }

    /// Answers `qname` with its fake address, remembering the real ones.
    fn fake(&self, qname: &Name, qtype: RecordType, records: &[Record], rule: u32, carrier: &str) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        let real = addresses(records, qtype);
        if real.is_empty() {
            // An alias chain that ends nowhere, or no address of this
            // family: say what the upstream said.
            return self.relay(Upstream::Records(records.to_vec()));
        }
        let name = crate::names::normalise(&qname.to_utf8());
        let assigned = self.fakes.lock().unwrap_or_else(|e| e.into_inner()).assign(
            &name,
            qtype == RecordType::AAAA,
            real,
            carrier,
            unix_now(),
        );
        let fake = match assigned {
            Ok(fake) => fake,
            Err(FakeError::Exhausted(held)) => {
                tracing::warn!(%name, held, "fake pool exhausted: every address is held by a live flow");
                self.counters.exhausted.fetch_add(1, Relaxed);
                return Answer::code(ResponseCode::ServFail);
            }
            Err(FakeError::NoPool) => return Answer::code(ResponseCode::ServFail),
        };
        tracing::debug!(%name, %fake, rule, %carrier, "fake answer");
        self.counters.faked.fetch_add(1, Relaxed);
        self.counters.answered_for(rule);
        let rdata = match fake {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Answer {
            code: ResponseCode::NoError,
            answers: vec![Record::from_rdata(qname.clone(), self.fake_ttl, rdata)],
            authority: Vec::new(),
        }
    }
}

/// Seconds since the epoch: the fake table's clock, which must survive restarts.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Does a response with these records fit a classic (non-EDNS) UDP answer?
fn fits_classic_udp(request_query: &Query, header: &Header, answer: &Answer) -> bool {
    if answer.answers.len() + answer.authority.len() <= 2 {
        return true;
    }
    let mut message = Message::new();
    message.set_header(*header);
    message.add_query(request_query.clone());
    message.add_answers(answer.answers.iter().cloned());
    message.add_name_servers(answer.authority.iter().cloned());
    message
        .to_vec()
        .is_ok_and(|bytes| bytes.len() <= CLASSIC_UDP_LIMIT)
}

#[async_trait::async_trait]
impl RequestHandler for DnsService {
    async fn handle_request<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.queries.fetch_add(1, Relaxed);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_recursion_available(true);
        if let Some(edns) = request.edns() {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().clamp(512, EDNS_UDP_LIMIT));
            ours.set_version(0);
            builder.edns(ours);
        }
        let queries = request.queries();
        let answer = if request.message_type() != MessageType::Query
            || request.op_code() != OpCode::Query
            || queries.len() != 1
        {
            self.counters.refused.fetch_add(1, Relaxed);
            Answer::code(if request.op_code() == OpCode::Query {
                ResponseCode::FormErr
            } else {
                ResponseCode::NotImp
            })
        } else {
            let query = &queries[0];
            let name: Name = query.name().into();
            self.answer(&name, query.query_type()).await
        };
        header.set_response_code(answer.code);
        let truncate = request.protocol() == Protocol::Udp
            && request.edns().is_none()
            && queries.len() == 1
            && !fits_classic_udp(queries[0].original(), &header, &answer);
        let sent = if truncate {
            self.counters.truncated.fetch_add(1, Relaxed);
            header.set_truncated(true);
            response
                .send_response(builder.build(header, &[], &[], &[], &[]))
                .await
        } else {
            response
                .send_response(builder.build(header, &answer.answers, &answer.authority, &[], &[]))
                .await
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("sending a DNS answer: {e}");
                let mut failed = Header::new();
                failed.set_response_code(ResponseCode::ServFail);
                failed.into()
            }
        }
    }
}

/// Binds the listener on 127.0.0.1 and, when `v6`, on ::1, UDP and TCP.
/// Returns the server (it runs on the current tokio runtime) and whether
/// IPv6 is served.
pub async fn listen(
    service: DnsService,
    port: u16,
    v6: bool,
) -> std::io::Result<(ServerFuture<DnsService>, bool)> {
    let mut server = ServerFuture::new(service);
    let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], port))];
    if v6 {
        addrs.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
    }
    let mut served_v6 = false;
    for addr in addrs {
        let udp = match tokio::net::UdpSocket::bind(addr).await {
            Ok(udp) => udp,
            Err(e) if addr.is_ipv6() => {
                tracing::warn!("DNS on [::1]:{port} unavailable ({e}); IPv6 queries go out untouched");
                continue;
            }
            Err(e) => return Err(e),
        };
        let tcp = tokio::net::TcpListener::bind(addr).await?;
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT);
        served_v6 |= addr.is_ipv6();
    }
    Ok((server, served_v6))
}
