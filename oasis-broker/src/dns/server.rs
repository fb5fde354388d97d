//! The DNS service: answers a question by the policy in `policy.rs`, with
//! fake addresses from the fake table and everything else from the
//! upstream resolver, through its answer cache. The listeners (listen.rs)
//! and the UDP threads (udp.rs) bring it the questions.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::ProtoErrorKind;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::DnsCounters;
use super::cache::{AnswerCache, Upstream};
use super::policy::{Plan, UnderlayAnswers, addresses, claim_in_chain, plan, remaining_ttl, sections};
use super::reuse::{Keep, Outcome};
use super::upstream::Resolving;
use crate::fake::{FakeError, FakeTable, unix_now};
use crate::names::NameRules;
use crate::rules::Carrier;
use crate::shared::{Shared, snapshot};

pub struct DnsService {
    /// Our own resolver (the configured upstreams, or resolv.conf's,
    /// followed when the file changes).
    pub resolving: RwLock<Resolving>,
    /// The host's own servers (resolv.conf's, and the configured
    /// upstreams): queries sent to them, or whose server is unknown, are
    /// ours to resolve; any other server answers its own.
    pub system: RwLock<Arc<Vec<IpAddr>>>,
    /// Which server a redirected query was sent to (set once the
    /// interception is attached).
    pub origins: std::sync::OnceLock<Arc<dyn crate::platform::QueryOrigins>>,
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
    /// Bumped when what answers depend on changes (the name rules, the
    /// upstreams): the answers the DNS threads kept (reuse.rs) are
    /// forgotten.
    pub epoch: std::sync::atomic::AtomicU64,
    /// Carriers that resolve the names they claim themselves (WireGuard
    /// overlays with `DNS=`, over the tunnel; see carrier.rs): set once the
    /// packet path runs, unless `dns.through_wireguard` is off.
    pub carriers: std::sync::OnceLock<Arc<dyn super::carrier::CarrierDns>>,
}

/// The parts of a response.
pub(super) struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
    /// Whether, and on what terms, the answer may be given again as it is.
    pub keep: Option<Keep>,
}

impl Answer {
    pub(super) fn code(code: ResponseCode) -> Answer {
        Answer {
            code,
            answers: Vec::new(),
            authority: Vec::new(),
            additional: Vec::new(),
            keep: None,
        }
    }

    fn kept(mut self, keep: Option<Keep>) -> Answer {
        self.keep = keep;
        self
    }

    /// An answer for one asker (`personal`) is never given to another.
    pub(super) fn personal(mut self, personal: bool) -> Answer {
        if personal {
            self.keep = None;
        }
        self
    }
}

/// Who sent a query, to be looked up should a rule for some processes
/// only claim its name: the query's two ends, as the listener saw them.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    pub tcp: bool,
    pub client: SocketAddr,
    pub listener: SocketAddr,
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

    /// How we resolve, and the host's own servers, after resolv.conf changed.
    pub fn set_upstreams(&self, resolving: Option<Resolving>, system: Vec<IpAddr>) {
        if let Some(resolving) = resolving {
            *self.resolving.write().unwrap_or_else(|e| e.into_inner()) = resolving;
        }
        *self.system.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(system);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.answers_changed();
    }

    /// What answers depend on changed: no kept answer is given again.
    pub fn answers_changed(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether a kept answer still holds beyond its terms: a fake address
    /// must still stand for its name (the table may have given it to
    /// another since), and its use is noted as a full answer notes it.
    /// `unix`: the time, in Unix seconds.
    pub(super) fn still_holds(&self, outcome: &Outcome, unix: u64) -> bool {
        match outcome {
            Outcome::Faked { fake, name, .. } => self
                .fakes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .answered_again(*fake, name, unix),
            _ => true,
        }
    }

    /// Asks the resolver, waiting at most `budget`.
    async fn ask(&self, name: &Name, qtype: RecordType, budget: Duration) -> Upstream {
        let resolver = self
            .resolving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .resolver
            .clone();
        let lookup = match tokio::time::timeout(budget, resolver.lookup(name.clone(), qtype)).await {
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
        self.resolving
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .on_loopback
    }

    pub(super) fn cached(&self, name: &str, qtype: RecordType) -> Option<(Upstream, Instant)> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name, qtype, Instant::now())
    }

    /// The upstream's answer: from the cache, else asked (and cached);
    /// and until when it holds, when it is cached.
    async fn fetch(
        &self,
        qname: &Name,
        key: &str,
        qtype: RecordType,
        budget: Duration,
    ) -> (Upstream, Option<Instant>) {
        if let Some((hit, until)) = self.cached(key, qtype) {
            return (hit, Some(until));
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
                return (Upstream::Failed, None);
            }
        }
        let upstream = self.ask(qname, qtype, budget).await;
        if looping {
            self.in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(key.to_string(), qtype));
        }
        let until =
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(key, qtype, &upstream, Instant::now());
        (upstream, until)
    }

    /// The name as rules see it, the rules, what to do, and whether that
    /// depends on who asked (`who`, looked up only when a rule for some
    /// processes could claim the name): such an answer is never kept.
    pub(super) fn prepare(
        &self,
        qname: &Name,
        qtype: RecordType,
        who: Option<Who>,
    ) -> (String, Arc<NameRules>, Plan, bool) {
        let key = crate::names::normalise(&qname.to_utf8());
        let names = snapshot(&self.names);
        let asker = || {
            let who = who?;
            self.origins.get()?.asker(who.tcp, who.client, who.listener)
        };
        let (claim, personal) = names.first_match_for(&key, asker);
        let plan = plan(qtype, claim, self.underlay);
        (key, names, plan, personal)
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
            keep: None,
        })
    }

    pub(super) fn answer_now(
        &self,
        qname: &Name,
        qclass: DNSClass,
        qtype: RecordType,
        who: Option<Who>,
    ) -> Option<Answer> {
        if let Some(answer) = self.local(qname, qclass, qtype) {
            return Some(answer);
        }
        let (key, names, plan, personal) = self.prepare(qname, qtype, who);
        if let Plan::NoData { rule } = plan {
            return Some(self.withheld(&key, qtype, rule).personal(personal));
        }
        let (upstream, until) = match self.through_carrier(&plan) {
            Some((_, overlay)) => self.cached(&Self::carrier_key(overlay, &key), qtype)?,
            None => self.cached(&key, qtype)?,
        };
        Some(
            self.finish(qname, &key, qtype, &names, plan, upstream, Some(until))
                .personal(personal),
        )
    }

    /// The server a DNS thread may ask itself, if any.
    pub(super) fn direct(&self) -> Option<SocketAddr> {
        self.resolving.read().unwrap_or_else(|e| e.into_inner()).direct
    }

    /// The answer from what the server a DNS thread asked itself said
    /// (`upstream`), kept in the answer cache as the resolver's answers are.
    pub(super) fn answer_asked(
        &self,
        qname: &Name,
        qtype: RecordType,
        upstream: Upstream,
        who: Option<Who>,
    ) -> Answer {
        let (key, names, plan, personal) = self.prepare(qname, qtype, who);
        if let Plan::NoData { rule } = plan {
            return self.withheld(&key, qtype, rule).personal(personal);
        }
        let until =
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(&key, qtype, &upstream, Instant::now());
        self.finish(qname, &key, qtype, &names, plan, upstream, until)
            .personal(personal)
    }

    /// The answer, asking the upstream when nothing cached gives it, for
    /// at most `budget`.
    pub(super) async fn answer(
        &self,
        qname: &Name,
        qclass: DNSClass,
        qtype: RecordType,
        budget: Duration,
        who: Option<Who>,
    ) -> Answer {
        if let Some(answer) = self.local(qname, qclass, qtype) {
            return answer;
        }
        let (key, names, plan, personal) = self.prepare(qname, qtype, who);
        if let Plan::NoData { rule } = plan {
            return self.withheld(&key, qtype, rule).personal(personal);
        }
        let (upstream, until) = match self.through_carrier(&plan) {
            Some((carrier, overlay)) => {
                let carrier = carrier.clone();
                self.fetch_through(&carrier, overlay, qname, &key, qtype, budget)
                    .await
            }
            None => self.fetch(qname, &key, qtype, budget).await,
        };
        self.finish(qname, &key, qtype, &names, plan, upstream, until)
            .personal(personal)
    }

    pub(super) fn withheld(&self, name: &str, qtype: RecordType, rule: u32) -> Answer {
        tracing::debug!(%name, ?qtype, rule, "claimed name, type withheld");
        self.counters
            .empty
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // It follows from the rules alone, which the epoch stands for.
        Answer::code(ResponseCode::NoError).kept(Some(Keep {
            outcome: Outcome::Empty,
            until: Instant::now() + Duration::from_secs(u64::from(self.fake_ttl)),
            ages: false,
        }))
    }

    /// The answer by `plan` from what the upstream said, which holds
    /// `until` (when known: the answer may then be kept as long).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish(
        &self,
        qname: &Name,
        key: &str,
        qtype: RecordType,
        names: &NameRules,
        plan: Plan,
        upstream: Upstream,
        until: Option<Instant>,
    ) -> Answer {
        let (upstream, until) = match upstream {
            Upstream::Records(records) => {
                let (records, unfaked) = self.unfake(records);
                // Our own fake addresses came back: the table's word, now.
                (Upstream::Records(records), until.filter(|_| !unfaked))
            }
            other => (other, until),
        };
        // A metric rule's answer may turn real when the Monitor settles.
        let until = until.filter(|_| {
            !matches!(
                plan,
                Plan::Fake {
                    carrier: Carrier::Monitor(_),
                    ..
                }
            )
        });
        match (plan, upstream) {
            (Plan::Fake { rule, carrier }, Upstream::Records(records))
                if self.underlay_chosen(rule, &carrier, &records, qtype) =>
            {
                self.counters
                    .monitor_real
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.relay(key, qtype, names, Upstream::Records(records), None)
            }
            (Plan::Fake { rule, carrier }, Upstream::Records(records)) => self.fake(
                qname,
                key,
                None,
                qtype,
                &records,
                rule,
                &carrier.to_string(),
                until,
            ),
            // The name may be an alias of one a rule claims.
            (Plan::PassThrough, Upstream::Records(records))
                if matches!(qtype, RecordType::A | RecordType::AAAA) =>
            {
                match claim_in_chain(&records, names) {
                    Some((rule, carrier, claimed))
                        if matches!(plan_for(qtype, rule, carrier, self.underlay), Plan::Fake { .. }) =>
                    {
                        // A metric rule's alias: as the name itself.
                        let until = until.filter(|_| !matches!(carrier, Carrier::Monitor(_)));
                        self.fake(
                            qname,
                            key,
                            Some(&claimed),
                            qtype,
                            &records,
                            rule,
                            &carrier.to_string(),
                            until,
                        )
                    }
                    _ => self.relay(key, qtype, names, Upstream::Records(records), until),
                }
            }
            (_, upstream) => self.relay(key, qtype, names, upstream, until),
        }
    }

    /// An upstream's answer with this daemon's own fake addresses in it
    /// given their real ones back: a local stub the daemon asked, which
    /// runs in the redirected cgroup, asked its own server through the
    /// daemon, and got (and cached) the fake answer. The real addresses are
    /// the table's, from when the daemon answered the stub.
    /// Also says whether any was found.
    fn unfake(&self, records: Vec<Record>) -> (Vec<Record>, bool) {
        let (v4, v6) = self.pools;
        let in_pools = |record: &Record| match record.data() {
            RData::A(a) => v4.contains(&a.0),
            RData::AAAA(aaaa) => v6.contains(&aaaa.0),
            _ => false,
        };
        if !records.iter().any(in_pools) {
            return (records, false);
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
        (out, true)
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
    /// claimed name's real address in any of them; kept `until`.
    fn relay(
        &self,
        qname: &str,
        qtype: RecordType,
        names: &NameRules,
        upstream: Upstream,
        until: Option<Instant>,
    ) -> Answer {
        use std::sync::atomic::Ordering::Relaxed;
        let keep = |outcome| {
            until.map(|until| Keep {
                outcome,
                until,
                ages: true,
            })
        };
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
                    keep: keep(Outcome::Passed),
                }
            }
            Upstream::Negative { code, soa } => {
                self.counters.negative.fetch_add(1, Relaxed);
                Answer {
                    code,
                    answers: Vec::new(),
                    authority: soa.into_iter().map(|soa| *soa).collect(),
                    additional: Vec::new(),
                    keep: keep(Outcome::Negative),
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
        until: Option<Instant>,
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
                until,
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
            keep: until.map(|until| Keep {
                outcome: Outcome::Faked {
                    rule,
                    fake,
                    name: name.into(),
                },
                until,
                ages: false,
            }),
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
