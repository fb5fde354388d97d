//! The DNS listener: hickory-server on loopback (UDP and TCP), answering by
//! the policy in `policy.rs`, with fake addresses from the fake table and
//! everything else from the upstream resolver.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::ProtoErrorKind;
use hickory_proto::op::{Edns, Header, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_server::ServerFuture;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};

use super::DnsCounters;
use super::cache::{AnswerCache, Upstream};
use super::policy::{Plan, UnderlayAnswers, addresses, claim_in_chain, plan, remaining_ttl, sections};
use super::udp::{EDNS_UDP_LIMIT, refusal};
use crate::fake::{FakeError, FakeTable, unix_now};
use crate::names::NameRules;
use crate::rules::Carrier;
use crate::shared::{Shared, snapshot};

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DnsService {
    /// Our own resolver (the configured upstreams, or resolv.conf's,
    /// followed when the file changes).
    pub resolver: RwLock<TokioResolver>,
    /// The host's own servers (resolv.conf's, and the configured
    /// upstreams): queries sent to them, or whose server is unknown, are
    /// ours to resolve; any other server answers its own.
    pub system: RwLock<Arc<Vec<IpAddr>>>,
    /// Which server a redirected query was sent to (set once the
    /// interception is attached).
    pub origins: std::sync::OnceLock<Arc<dyn crate::platform::QueryOrigins>>,
    /// Whether our resolver asks a server on loopback (a local stub).
    pub resolver_on_loopback: std::sync::atomic::AtomicBool,
    /// Questions our resolver is asking a loopback upstream right now: the
    /// same question coming back is a loop through a local stub.
    pub in_flight: Mutex<std::collections::HashSet<(String, RecordType)>>,
    pub names: Shared<NameRules>,
    pub fakes: Arc<Mutex<FakeTable>>,
    /// The table's pools, for a look at answers without its lock.
    pub pools: (ipnet::Ipv4Net, ipnet::Ipv6Net),
    pub counters: Arc<DnsCounters>,
    pub fake_ttl: u32,
    pub underlay: UnderlayAnswers,
    pub timeout: Duration,
    pub cache: Mutex<AnswerCache>,
    /// The Monitor's choices: a name of a metric rule whose flows it gives
    /// the underlay is answered truly (when `underlay` asks for real
    /// answers), and its flows never touch Oasis.
    pub monitor: Option<Arc<crate::monitor::MonitorLink>>,
    /// Where answers that changed the fake table are written before they
    /// leave (see `journal.rs`).
    pub journal: Option<Arc<super::journal::Journal>>,
}

/// The parts of a response.
pub(super) struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
}

impl Answer {
    pub(super) fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            answers: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
        }
    }
}

impl DnsService {
    /// Where a query from `client` to our listener `listener` is answered.
    /// A stub on this host (a loopback server) is always asked itself, so
    /// its own names resolve, even when resolv.conf names it.
    pub(super) fn route(&self, tcp: bool, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddr> {
        let server = self.origins.get()?.original_server(tcp, client, listener)?;
        if server.ip().to_canonical().is_loopback() {
            return Some(server);
        }
        let system = self.system.read().unwrap_or_else(|e| e.into_inner()).clone();
        (!system.contains(&server.ip())).then_some(server)
    }

    /// Our resolver (and whether it asks a loopback server) and the
    /// host's own servers, after resolv.conf changed.
    pub fn set_upstreams(&self, resolver: Option<(TokioResolver, bool)>, system: Vec<IpAddr>) {
        if let Some((resolver, on_loopback)) = resolver {
            *self.resolver.write().unwrap_or_else(|e| e.into_inner()) = resolver;
            self.resolver_on_loopback
                .store(on_loopback, std::sync::atomic::Ordering::Relaxed);
        }
        *self.system.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(system);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    async fn ask(&self, name: &Name, qtype: RecordType) -> Upstream {
        let resolver = self.resolver.read().unwrap_or_else(|e| e.into_inner()).clone();
        let lookup = match tokio::time::timeout(self.timeout, resolver.lookup(name.clone(), qtype)).await {
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
                        soa: soa
                            .as_ref()
                            .map(|soa| Box::new((**soa).clone().into_record_of_rdata())),
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

    fn loopback_upstream(&self) -> bool {
        self.resolver_on_loopback
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn cached(&self, name: &str, qtype: RecordType) -> Option<Upstream> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name, qtype, Instant::now())
    }

    /// The upstream's answer: from the cache, else asked (and cached).
    async fn fetch(&self, qname: &Name, key: &str, qtype: RecordType) -> Upstream {
        if let Some(hit) = self.cached(key, qtype) {
            return hit;
        }
        // A question we are asking already, through a loopback upstream,
        // has come back to us: a local stub forwarding to us. Break it.
        let looping = self.loopback_upstream();
        if looping {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if !in_flight.insert((key.to_string(), qtype)) {
                self.counters
                    .loops
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(name = %key, ?qtype, "a query came back from our own upstream (a loop through a local stub): answered SERVFAIL");
                return Upstream::Failed;
            }
        }
        let upstream = self.ask(qname, qtype).await;
        if looping {
            self.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(key.to_string(), qtype));
        }
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(key, qtype, &upstream, Instant::now());
        upstream
    }

    /// The answer if it needs nothing that is not cached (no await).
    /// The name as rules see it, the rules, and what to do.
    pub(super) fn prepare(&self, qname: &Name, qtype: RecordType) -> (String, Arc<NameRules>, Plan) {
        let key = crate::names::normalise(&qname.to_utf8());
        let names = snapshot(&self.names);
        let plan = plan(qtype, names.first_match(&key), self.underlay);
        (key, names, plan)
    }

    /// What the broker answers itself, whatever the rules: classes other
    /// than IN (`CH TXT version.bind` is not a question about a name), and
    /// reverse lookups of fake addresses, which mean nothing upstream (on
    /// the Internet they would leak which names the host asked for).
    pub(super) fn local(&self, qname: &Name, qclass: DNSClass, qtype: RecordType) -> Option<Answer> {
        use std::sync::atomic::Ordering::Relaxed;
        if qclass != DNSClass::IN {
            self.counters.refused.fetch_add(1, Relaxed);
            return Some(Answer::code(ResponseCode::Refused));
        }
        let net = qname.parse_arpa_name().ok()?;
        if net.prefix_len() != net.max_prefix_len() {
            return None;
        }
        let addr = net.addr();
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        let (v4, v6) = table.pools();
        let in_pool = match addr {
            IpAddr::V4(a) => v4.contains(&a),
            IpAddr::V6(a) => v6.contains(&a),
        };
        if !in_pool {
            return None;
        }
        self.counters.faked.fetch_add(1, Relaxed);
        let Some(entry) = table.get(addr) else {
            return Some(Answer::code(ResponseCode::NXDomain));
        };
        if qtype != RecordType::PTR {
            return Some(Answer::code(ResponseCode::NoError));
        }
        let target = Name::from_utf8(format!("{}.", entry.name)).ok()?;
        Some(Answer {
            code: ResponseCode::NoError,
            answers: vec![Record::from_rdata(
                qname.clone(),
                self.fake_ttl,
                RData::PTR(PTR(target)),
            )],
            authority: Vec::new(),
            additional: Vec::new(),
        })
    }

    pub(super) fn answer_now(&self, qname: &Name, qclass: DNSClass, qtype: RecordType) -> Option<Answer> {
        if let Some(answer) = self.local(qname, qclass, qtype) {
            return Some(answer);
        }
        let (key, names, plan) = self.prepare(qname, qtype);
        if let Plan::NoData { rule } = plan {
            return Some(self.withheld(&key, qtype, rule));
        }
        let upstream = self.cached(&key, qtype)?;
        Some(self.finish(qname, &key, qtype, &names, plan, upstream))
    }

    pub(super) async fn answer(&self, qname: &Name, qclass: DNSClass, qtype: RecordType) -> Answer {
        if let Some(answer) = self.local(qname, qclass, qtype) {
            return answer;
        }
        let (key, names, plan) = self.prepare(qname, qtype);
        if let Plan::NoData { rule } = plan {
            return self.withheld(&key, qtype, rule);
        }
        let upstream = self.fetch(qname, &key, qtype).await;
        self.finish(qname, &key, qtype, &names, plan, upstream)
    }

    pub(super) fn withheld(&self, name: &str, qtype: RecordType, rule: u32) -> Answer {
        tracing::debug!(%name, ?qtype, rule, "claimed name, type withheld");
        self.counters
            .empty
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Answer::code(ResponseCode::NoError)
    }

    pub(super) fn finish(
        &self,
        qname: &Name,
        key: &str,
        qtype: RecordType,
        names: &NameRules,
        plan: Plan,
        upstream: Upstream,
    ) -> Answer {
        let upstream = match upstream {
            Upstream::Records(records) => Upstream::Records(self.unfake(records)),
            other => other,
        };
        match (plan, upstream) {
            (Plan::Fake { rule, carrier }, Upstream::Records(records))
                if self.underlay_chosen(rule, &carrier, &records, qtype) =>
            {
                self.counters
                    .monitor_real
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.relay(key, qtype, names, Upstream::Records(records))
            }
            (Plan::Fake { rule, carrier }, Upstream::Records(records)) => {
                self.fake(qname, key, None, qtype, &records, rule, &carrier.to_string())
            }
            // The name may be an alias of one a rule claims.
            (Plan::PassThrough, Upstream::Records(records))
                if matches!(qtype, RecordType::A | RecordType::AAAA) =>
            {
                match claim_in_chain(&records, names) {
                    Some((rule, carrier, claimed))
                        if matches!(plan_for(qtype, rule, carrier, self.underlay), Plan::Fake { .. }) =>
                    {
                        self.fake(
                            qname,
                            key,
                            Some(&claimed),
                            qtype,
                            &records,
                            rule,
                            &carrier.to_string(),
                        )
                    }
                    _ => self.relay(key, qtype, names, Upstream::Records(records)),
                }
            }
            (_, upstream) => self.relay(key, qtype, names, upstream),
        }
    }

    /// An upstream's answer with this daemon's own fake addresses in it
    /// given their real ones back: a local stub the daemon asked, which
    /// runs in the redirected cgroup, asked its own server through the
    /// daemon, and got (and cached) the fake answer. The real addresses are
    /// the table's, from when the daemon answered the stub.
    fn unfake(&self, records: Vec<Record>) -> Vec<Record> {
        let (v4, v6) = self.pools;
        let in_pools = |record: &Record| match record.data() {
            RData::A(a) => v4.contains(&a.0),
            RData::AAAA(aaaa) => v6.contains(&aaaa.0),
            _ => false,
        };
        if !records.iter().any(in_pools) {
            return records;
        }
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            if !in_pools(&record) {
                out.push(record);
                continue;
            }
            let fake = match record.data() {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                _ => continue,
            };
            for real in table.get(fake).map(|e| e.real.as_slice()).unwrap_or_default() {
                let data = match real {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                out.push(Record::from_rdata(record.name().clone(), record.ttl(), data));
            }
        }
        out
    }

    /// A metric rule's name whose every real address the Monitor, on
    /// measurements, gives the underlay (paper §2.2.4): the fake address
    /// would only send the flow's first packet through the broker.
    fn underlay_chosen(&self, rule: u32, carrier: &Carrier, records: &[Record], qtype: RecordType) -> bool {
        let Carrier::Monitor(goal) = carrier else {
            return false;
        };
        self.underlay == UnderlayAnswers::Real
            && goal.module.is_none()
            && self
                .monitor
                .as_ref()
                .is_some_and(|m| m.choices().underlay_settled(rule, &addresses(records, qtype)))
    }

    /// What the upstream said, its records in their sections, and no
    /// claimed name's real address in any of them.
    fn relay(&self, qname: &str, qtype: RecordType, names: &NameRules, upstream: Upstream) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        match upstream {
            Upstream::Records(records) => {
                self.counters.passed.fetch_add(1, Relaxed);
                let (answers, additional, withheld) = sections(qname, qtype, records, names);
                if withheld > 0 {
                    tracing::debug!(name = %qname, ?qtype, withheld, "claimed names' addresses withheld from an answer");
                }
                Answer {
                    code: ResponseCode::NoError,
                    answers,
                    authority: Vec::new(),
                    additional,
                }
            }
            Upstream::Negative { code, soa } => {
                self.counters.negative.fetch_add(1, Relaxed);
                Answer {
                    code,
                    answers: Vec::new(),
                    authority: soa.into_iter().map(|soa| *soa).collect(),
                    additional: Vec::new(),
                }
            }
            Upstream::Failed => {
                self.counters.servfail.fetch_add(1, Relaxed);
                Answer::code(ResponseCode::ServFail)
            }
        }
    }

    /// Answers `qname` with its fake address, remembering the real ones
    /// and, for an alias, the name in its chain that a rule claimed.
    #[allow(clippy::too_many_arguments)]
    fn fake(
        &self,
        qname: &Name,
        name: &str,
        claimed: Option<&str>,
        qtype: RecordType,
        records: &[Record],
        rule: u32,
        carrier: &str,
    ) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        let real = addresses(records, qtype);
        if real.is_empty() {
            // An alias chain that ends nowhere, or no address of this
            // family: say what the upstream said.
            return self.relay(
                name,
                qtype,
                &snapshot(&self.names),
                Upstream::Records(records.to_vec()),
            );
        }
        let assigned = self
            .fakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign_journaled(
                name,
                claimed,
                qtype == RecordType::AAAA,
                real,
                carrier,
                unix_now(),
            );
        let fake = match assigned {
            Ok((fake, changed)) => {
                // Written outside the table's lock (the packet path takes
                // it), before the answer leaves.
                if let (Some(changed), Some(journal)) = (changed, &self.journal)
                    && let Err(e) = journal.append(&changed)
                {
                    tracing::warn!(
                        "{e}: the answer for {name} may be forgotten if the daemon dies before the next save"
                    );
                }
                fake
            }
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
            additional: Vec::new(),
        }
    }
}

fn plan_for(
    qtype: RecordType,
    rule: u32,
    carrier: &crate::rules::Carrier,
    underlay: UnderlayAnswers,
) -> Plan {
    plan(qtype, Some((rule, carrier)), underlay)
}

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
                match server {
                    Some(server) => service.answer_over_tcp_from(server, request).await,
                    None => {
                        let name: Name = queries[0].name().into();
                        service
                            .answer(&name, queries[0].query_class(), queries[0].query_type())
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
