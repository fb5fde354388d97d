//! The Monitor's state and its one entry point per input: events from the
//! packet shells (flows started, samples, answers), the time (evaluations,
//! probe timeouts), and requests for probes. No I/O and no clock: the
//! caller says what time it is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::budget::Budget;
use super::choices::{Choices, Chosen};
use super::decide::{Candidate, Choice, DecisionSettings, Why, ranked};
use super::goal::Metric;
use super::health::{Change, Health};
use super::path::{PathFigures, Prefix};
use super::probe::{Outstanding, ProbeKind, ProbeRequest, ProbeTarget, jittered, timeout};
use super::route::MonitorRoute;
use crate::overlay::OverlayTable;
use crate::overlay::Via;

/// Everything about the Monitor a user may set (`monitor:` in the config).
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorSettings {
    pub decisions: DecisionSettings,
    /// All probes together, at most this many a second ...
    pub probes_per_second: u32,
    /// ... and this many bytes a second (encapsulation included).
    pub probe_bytes_per_second: u32,
    /// Figures not refreshed this long count as none.
    pub stale_after: Duration,
    /// Prefixes without a flow this long are no longer measured.
    pub interest: Duration,
}

impl Default for MonitorSettings {
    fn default() -> MonitorSettings {
        MonitorSettings {
            decisions: DecisionSettings::default(),
            probes_per_second: 20,
            probe_bytes_per_second: 8000,
            stale_after: Duration::from_secs(600),
            interest: Duration::from_secs(1800),
        }
    }
}

/// Liveness probes of a carrier that carries traffic go this often ...
pub const LIVENESS_BUSY: Duration = Duration::from_secs(1);
/// ... and of an idle one this often, give or take a fifth.
pub const LIVENESS_IDLE: Duration = Duration::from_secs(30);
/// A carrier that started a flow or answered within this long is busy.
pub const BUSY_FOR: Duration = Duration::from_secs(10);
/// Quality probes of a path without figures go this often at most ...
pub const PROBE_UNKNOWN: Duration = Duration::from_secs(1);
/// ... of a path with figures, this often, unless flows measured it
/// meanwhile ...
pub const PROBE_REFRESH: Duration = Duration::from_secs(5);
/// ... and for `loss` rules, whose decision needs many outcomes: the
/// underlay this often (twice as often until it has enough to decide),
/// the overlays every second.
pub const PROBE_LOSS_UNDERLAY: Duration = Duration::from_millis(200);
/// Switches kept for `oasis monitor` and `oasis status`.
const RECENT_SWITCHES: usize = 32;

/// What a packet shell tells the Monitor.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new flow of metric rule `rule` to `dst` took `via`.
    FlowStarted {
        rule: u32,
        dst: IpAddr,
        proto: u8,
        dport: u16,
        via: Via,
    },
    /// A round trip measured on a flow (handshake or timestamps).
    Rtt { via: Via, dst: IpAddr, rtt: Duration },
    /// Segments a flow sent, and how many of them it sent again.
    Outcomes {
        via: Via,
        dst: IpAddr,
        sent: u64,
        lost: u64,
    },
    /// Goodput of a long transfer.
    Goodput { via: Via, dst: IpAddr, bps: f64 },
    /// A packet came back through the carrier.
    Answered { via: Via },
    /// A new connection retransmitted its SYN with no answer.
    SynFailed { via: Via, dst: IpAddr },
    /// A connection was reset, or an ICMP error reported a destination
    /// unreachable through the carrier.
    Failed { via: Via, dst: IpAddr },
    /// A probe's answer arrived at `at`; `rtt` when the kernel timed it.
    ProbeAnswered {
        id: u64,
        at: Instant,
        rtt: Option<Duration>,
    },
    /// A probe could not be sent at all.
    ProbeUnsent { id: u64 },
    /// The user pins metric rule `rule`'s new flows to `via` while it is
    /// up (None: the Monitor decides again).
    Pin { rule: u32, via: Option<Via> },
}

/// A prefix that had flows of metric rules.
#[derive(Clone, Debug)]
struct Interest {
    last_flow: Instant,
    target: ProbeTarget,
    /// The metric rules whose flows went there.
    rules: HashSet<u32>,
}

/// A probe `poll_probes` found due, before the budget has its say.
struct Due {
    /// Lowest first: 0 liveness of a busy carrier, 1 a path without
    /// figures, 2 liveness of an idle carrier, 3 a refresh.
    priority: u8,
    via: Via,
    prefix: Prefix,
    liveness: bool,
}

/// Whether `figures` hold what the metric compares.
fn measured_for(metric: &Metric, figures: &super::path::Figures) -> bool {
    match metric {
        Metric::Latency | Metric::Other(_) => figures.srtt.is_some(),
        Metric::Loss { .. } => figures.loss.is_some(),
        Metric::Throughput => figures.throughput(false).is_some() || figures.goodput_bps.is_some(),
    }
}

/// A switch of a decision, for `oasis monitor`.
#[derive(Clone, Debug, PartialEq)]
pub struct Switch {
    pub at: Instant,
    pub rule: u32,
    pub prefix: Prefix,
    pub from: Via,
    pub to: Via,
    pub why: Why,
}

pub struct Monitor {
    pub settings: MonitorSettings,
    paths: HashMap<(Via, Prefix), PathFigures>,
    health: HashMap<Via, Health>,
    interest: HashMap<Prefix, Interest>,
    choices: HashMap<(u32, Prefix), Choice>,
    /// When each path was last probed or measured by its flows: it is due
    /// a quality probe an interval later (the interval depends on the
    /// rules, which may change meanwhile).
    last_quality: HashMap<(Via, Prefix), Instant>,
    /// When each carrier is next due a liveness probe, and the round.
    next_liveness: HashMap<Via, (Instant, u64)>,
    /// When a flow last started on each carrier.
    busy: HashMap<Via, Instant>,
    outstanding: HashMap<u64, Outstanding>,
    next_probe_id: u64,
    budget: Budget,
    /// Probe bytes per carrier, (when, bytes), the last [`BUSY_FOR`].
    probe_bytes: HashMap<Via, VecDeque<(Instant, u32)>>,
    /// Overhead each overlay adds to a probe (outer IP, UDP, shim).
    overhead: HashMap<Via, u32>,
    /// The metric rules as the routes last had them.
    rules: HashMap<u32, Arc<MonitorRoute>>,
    switches: VecDeque<Switch>,
    /// Carriers the user pinned metric rules to.
    pins: HashMap<u32, Via>,
}

impl Monitor {
    pub fn new(settings: MonitorSettings, now: Instant) -> Monitor {
        let budget = Budget::new(settings.probes_per_second, settings.probe_bytes_per_second, now);
        Monitor {
            settings,
            paths: HashMap::new(),
            health: HashMap::new(),
            interest: HashMap::new(),
            choices: HashMap::new(),
            last_quality: HashMap::new(),
            next_liveness: HashMap::new(),
            busy: HashMap::new(),
            outstanding: HashMap::new(),
            next_probe_id: 1,
            budget,
            probe_bytes: HashMap::new(),
            overhead: HashMap::new(),
            rules: HashMap::new(),
            switches: VecDeque::new(),
            pins: HashMap::new(),
        }
    }

    fn path(&mut self, via: Via, dst: IpAddr) -> &mut PathFigures {
        self.paths.entry((via, Prefix::of(dst))).or_default()
    }

    fn health(&mut self, via: Via) -> &mut Health {
        self.health.entry(via).or_default()
    }

    /// Takes in what a packet shell saw. True when a carrier went down or
    /// came back: the choices should be published again at once.
    pub fn handle(&mut self, event: Event, now: Instant) -> bool {
        match event {
            Event::FlowStarted {
                rule,
                dst,
                proto,
                dport,
                via,
            } => {
                let prefix = Prefix::of(dst);
                let interest = self.interest.entry(prefix).or_insert_with(|| Interest {
                    last_flow: now,
                    target: ProbeTarget::of_flow(dst, proto, dport),
                    rules: HashSet::new(),
                });
                interest.last_flow = now;
                interest.target = ProbeTarget::of_flow(dst, proto, dport);
                interest.rules.insert(rule);
                self.choices
                    .entry((rule, prefix))
                    .or_insert_with(|| Choice::incumbent(now));
                // A carrier that starts carrying traffic is watched closely
                // from now on.
                self.busy.insert(via, now);
                if let Some((next, _)) = self.next_liveness.get_mut(&via) {
                    *next = (*next).min(now + LIVENESS_BUSY);
                }
                false
            }
            Event::Rtt { via, dst, rtt } => {
                self.path(via, dst).rtt.sample(rtt, now);
                self.postpone_quality(via, dst, now);
                self.answered(via, now)
            }
            Event::Outcomes { via, dst, sent, lost } => {
                self.path(via, dst).loss.outcomes(sent, lost, now);
                false
            }
            Event::Goodput { via, dst, bps } => {
                self.path(via, dst).goodput.sample(bps, now);
                false
            }
            Event::Answered { via } => self.answered(via, now),
            Event::SynFailed { via, dst } => {
                self.path(via, dst).loss.outcomes(1, 1, now);
                self.changed(via, |h| h.syn_failed(now))
            }
            Event::Failed { via, dst } => {
                self.path(via, dst).loss.outcomes(1, 1, now);
                false
            }
            Event::ProbeAnswered { id, at, rtt } => {
                let Some(probe) = self.outstanding.remove(&id) else {
                    return false;
                };
                let path = self.paths.entry((probe.via, probe.prefix)).or_default();
                let rtt = rtt.unwrap_or_else(|| at.saturating_duration_since(probe.sent));
                path.rtt.sample(rtt, at);
                path.loss.outcomes(1, 0, at);
                self.answered(probe.via, at)
            }
            Event::ProbeUnsent { id } => {
                // Not the path's fault: forget it without counting a loss.
                self.outstanding.remove(&id);
                false
            }
            Event::Pin { rule, via } => {
                match via {
                    Some(via) => self.pins.insert(rule, via),
                    None => self.pins.remove(&rule),
                };
                true
            }
        }
    }

    fn answered(&mut self, via: Via, now: Instant) -> bool {
        self.changed(via, |h| h.answered(now))
    }

    fn changed(&mut self, via: Via, update: impl FnOnce(&mut Health) -> Option<Change>) -> bool {
        match update(self.health(via)) {
            Some(Change::Down(reason)) => {
                tracing::warn!(?via, reason = reason.text(), "carrier down: new flows leave it");
                true
            }
            Some(Change::Up) => {
                tracing::info!(?via, "carrier up again");
                true
            }
            None => false,
        }
    }

    /// Flows measured the path: its next quality probe can wait.
    fn postpone_quality(&mut self, via: Via, dst: IpAddr, now: Instant) {
        self.last_quality.insert((via, Prefix::of(dst)), now);
    }

    /// When a path is next due a quality probe.
    fn quality_due(&self, via: Via, prefix: Prefix, known: bool) -> Option<Instant> {
        let last = self.last_quality.get(&(via, prefix))?;
        Some(*last + self.quality_interval(via, prefix, known))
    }

    /// How often a path with (or without) figures is probed.
    fn quality_interval(&self, via: Via, prefix: Prefix, known: bool) -> Duration {
        let loss_rule = self.interest.get(&prefix).is_some_and(|interest| {
            interest.rules.iter().any(|rule| {
                self.rules
                    .get(rule)
                    .is_some_and(|r| matches!(r.goal.metric, Metric::Loss { .. }))
            })
        });
        match (loss_rule, via) {
            // Until the underlay's loss rests on enough outcomes to decide,
            // twice as often.
            (true, Via::Underlay)
                if self.loss_outcomes(via, prefix) < self.settings.decisions.loss_min_samples =>
            {
                PROBE_LOSS_UNDERLAY / 2
            }
            (true, Via::Underlay) => PROBE_LOSS_UNDERLAY,
            (true, _) => PROBE_UNKNOWN,
            (false, _) if !known => PROBE_UNKNOWN,
            (false, _) => PROBE_REFRESH,
        }
    }

    /// Outcomes the path's loss rate rests on now.
    fn loss_outcomes(&self, via: Via, prefix: Prefix) -> u64 {
        self.paths
            .get(&(via, prefix))
            .and_then(|p| p.loss.rate(p.loss.updated()?))
            .map_or(0, |(_, n)| n)
    }
}

impl Monitor {
    /// Takes the metric rules and the joined overlays the packet path is
    /// routed by now: decisions of rules that are gone are forgotten, and
    /// each overlay's probe overhead noted.
    pub fn update_routes<'r>(
        &mut self,
        rules: impl Iterator<Item = &'r Arc<MonitorRoute>>,
        overlays: &OverlayTable,
    ) {
        self.rules = rules
            .filter(|r| r.module.is_none())
            .map(|r| (r.rule, r.clone()))
            .collect();
        self.choices.retain(|(rule, _), _| self.rules.contains_key(rule));
        for interest in self.interest.values_mut() {
            interest.rules.retain(|rule| self.rules.contains_key(rule));
        }
        // Carriers of overlays that were left are forgotten.
        let joined = |via: &Via| match via {
            Via::Overlay(id) => overlays.get(*id).is_some(),
            _ => true,
        };
        self.health.retain(|via, _| joined(via));
        self.busy.retain(|via, _| joined(via));
        self.next_liveness.retain(|via, _| joined(via));
        self.probe_bytes.retain(|via, _| joined(via));
        self.paths.retain(|(via, _), _| joined(via));
        self.last_quality.retain(|(via, _), _| joined(via));
        self.overhead = overlays
            .iter()
            .map(|o| {
                let outer_v6 = o.path.peers().first().is_some_and(|p| p.is_ipv6());
                let outer = if outer_v6 { 48 } else { 28 };
                (Via::Overlay(o.id), outer + o.shim.len() as u32)
            })
            .collect();
    }

    /// The carriers a prefix's rules may choose from, the underlay first.
    fn candidates_of(&self, prefix: Prefix) -> Vec<Via> {
        let mut out = vec![Via::Underlay];
        if let Some(interest) = self.interest.get(&prefix) {
            for rule in &interest.rules {
                if let Some(route) = self.rules.get(rule) {
                    for id in &route.candidates {
                        let via = Via::Overlay(*id);
                        if !out.contains(&via) {
                            out.push(via);
                        }
                    }
                }
            }
        }
        out
    }

    fn candidate(&self, via: Via, prefix: Prefix, now: Instant) -> Candidate {
        Candidate {
            via,
            up: self.health.get(&via).is_none_or(Health::is_up),
            figures: self
                .paths
                .get(&(via, prefix))
                .map(|p| p.figures(now, self.settings.stale_after))
                .unwrap_or_default(),
        }
    }

    /// Times out probes, forgets prefixes without flows, and evaluates
    /// every decision. Returns the choices for the packet threads.
    pub fn evaluate(&mut self, now: Instant) -> Arc<Choices> {
        self.expire_probes(now);
        let interest_for = self.settings.interest;
        self.interest
            .retain(|_, i| now.saturating_duration_since(i.last_flow) <= interest_for && !i.rules.is_empty());
        let interest = &self.interest;
        self.choices
            .retain(|(_, prefix), _| interest.contains_key(prefix));
        // Figures of prefixes no flow went to lately are kept while they
        // count, so a flow coming back finds them; then forgotten.
        let stale = self.settings.stale_after;
        self.paths.retain(|(_, prefix), path| {
            interest.contains_key(prefix) || path.figures(now, stale).age.is_some_and(|age| age <= stale)
        });
        self.last_quality
            .retain(|(_, prefix), _| interest.contains_key(prefix));

        let mut chosen = HashMap::with_capacity(self.choices.len());
        let keys: Vec<(u32, Prefix)> = self.choices.keys().copied().collect();
        for (rule, prefix) in keys {
            let Some(route) = self.rules.get(&rule).cloned() else {
                continue;
            };
            let mut candidates = vec![self.candidate(Via::Underlay, prefix, now)];
            candidates.extend(
                route
                    .candidates
                    .iter()
                    .map(|id| self.candidate(Via::Overlay(*id), prefix, now)),
            );
            let settings = self.settings.decisions.clone();
            let choice = self.choices.get_mut(&(rule, prefix)).expect("key from the map");
            let from = choice.via;
            if choice.evaluate(&route.goal.metric, &candidates, &settings, now) {
                tracing::info!(
                    rule,
                    %prefix,
                    ?from,
                    to = ?choice.via,
                    why = %choice.why,
                    "monitor: new flows switch carrier"
                );
                if self.switches.len() == RECENT_SWITCHES {
                    self.switches.pop_front();
                }
                self.switches.push_back(Switch {
                    at: now,
                    rule,
                    prefix,
                    from,
                    to: choice.via,
                    why: choice.why,
                });
            }
            let settled = candidates
                .iter()
                .filter(|c| c.up)
                .all(|c| measured_for(&route.goal.metric, &c.figures));
            chosen.insert(
                (rule, prefix),
                Chosen {
                    via: choice.via,
                    why: choice.why,
                    ranked: ranked(&route.goal.metric, &candidates, &settings),
                    settled,
                },
            );
        }
        let down = self
            .health
            .iter()
            .filter(|(_, h)| !h.is_up())
            .map(|(via, _)| *via)
            .collect();
        // Pins of rules that are gone go with them.
        let rules = &self.rules;
        self.pins.retain(|rule, _| rules.contains_key(rule));
        Arc::new(Choices::new(chosen, down).with_pins(self.pins.clone()))
    }

    /// The carriers the user pinned metric rules to.
    pub fn pins(&self) -> &HashMap<u32, Via> {
        &self.pins
    }

    fn expire_probes(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let probe = self.outstanding.remove(&id).expect("listed");
            self.paths
                .entry((probe.via, probe.prefix))
                .or_default()
                .loss
                .outcomes(1, 1, now);
            if probe.liveness {
                self.changed(probe.via, |h| h.missed(now));
            }
        }
    }

    /// The probes due now that the budget allows, most needed first:
    /// liveness of busy carriers, paths without figures, liveness of idle
    /// carriers, then refreshes.
    pub fn poll_probes(&mut self, now: Instant, out: &mut Vec<ProbeRequest>) {
        // Paths with a probe on its way, and carriers with a liveness probe
        // on its way.
        let mut pending: HashSet<(Via, Prefix)> = HashSet::new();
        let mut alive_pending: HashSet<Via> = HashSet::new();
        for probe in self.outstanding.values() {
            pending.insert((probe.via, probe.prefix));
            if probe.liveness {
                alive_pending.insert(probe.via);
            }
        }
        let mut due = Vec::new();
        self.liveness_due(now, &alive_pending, &mut due);
        self.quality_probes_due(now, &pending, &mut due);
        due.sort_by_key(|d| d.priority);
        for d in due {
            let Some(target) = self.interest.get(&d.prefix).map(|i| i.target) else {
                continue;
            };
            let bytes = target.packet_bytes() + self.overhead.get(&d.via).copied().unwrap_or(0);
            if !self.budget.take(bytes, now) {
                break;
            }
            out.push(self.sent_probe(d, target, bytes, now));
        }
    }

    fn busy(&self, via: Via, now: Instant) -> bool {
        self.busy
            .get(&via)
            .is_some_and(|at| now.saturating_duration_since(*at) <= BUSY_FOR)
    }

    fn liveness_interval(&self, via: Via, now: Instant, round: u64) -> Duration {
        if self.busy(via, now) {
            LIVENESS_BUSY
        } else {
            jittered(LIVENESS_IDLE, via, round)
        }
    }

    /// Liveness: per carrier, towards its most recently used prefix.
    fn liveness_due(&mut self, now: Instant, alive_pending: &HashSet<Via>, due: &mut Vec<Due>) {
        let mut latest: HashMap<Via, (Instant, Prefix)> = HashMap::new();
        for (prefix, interest) in &self.interest {
            for via in self.candidates_of(*prefix) {
                let entry = latest.entry(via).or_insert((interest.last_flow, *prefix));
                if interest.last_flow > entry.0 {
                    *entry = (interest.last_flow, *prefix);
                }
            }
        }
        for (via, (_, prefix)) in latest {
            let (next, round) = *self.next_liveness.entry(via).or_insert((now, 0));
            if next > now || alive_pending.contains(&via) {
                continue;
            }
            let interval = self.liveness_interval(via, now, round);
            // An answer within the interval shows it alive: no probe.
            let answered = self
                .health
                .get(&via)
                .and_then(Health::last_answer)
                .is_some_and(|at| now.saturating_duration_since(at) < interval);
            if answered && self.health.get(&via).is_none_or(Health::is_up) {
                self.next_liveness.insert(via, (now + interval, round + 1));
                continue;
            }
            due.push(Due {
                priority: if self.busy(via, now) { 0 } else { 2 },
                via,
                prefix,
                liveness: true,
            });
        }
    }

    /// Quality: every candidate path of every prefix with flows lately.
    /// The schedule paces them; a path without figures yet has one probe
    /// on its way at a time (its interval is shorter than a probe's
    /// timeout, and more would tell nothing new).
    fn quality_probes_due(&self, now: Instant, pending: &HashSet<(Via, Prefix)>, due: &mut Vec<Due>) {
        for prefix in self.interest.keys() {
            for via in self.candidates_of(*prefix) {
                let known = self
                    .paths
                    .get(&(via, *prefix))
                    .is_some_and(|p| p.figures(now, self.settings.stale_after).srtt.is_some());
                if (!known && pending.contains(&(via, *prefix)))
                    || due.iter().any(|d| d.via == via && d.prefix == *prefix)
                {
                    continue;
                }
                let next = self.quality_due(via, *prefix, known).unwrap_or(now);
                if next <= now {
                    due.push(Due {
                        priority: if known { 3 } else { 1 },
                        via,
                        prefix: *prefix,
                        liveness: false,
                    });
                }
            }
        }
    }

    /// Books a probe the budget allowed: outstanding, its schedule, its
    /// bytes.
    fn sent_probe(&mut self, d: Due, target: ProbeTarget, bytes: u32, now: Instant) -> ProbeRequest {
        let Due {
            via,
            prefix,
            liveness,
            ..
        } = d;
        let id = self.next_probe_id;
        self.next_probe_id += 1;
        let srtt = self
            .paths
            .get(&(via, prefix))
            .and_then(|p| p.figures(now, self.settings.stale_after).srtt);
        self.outstanding.insert(
            id,
            Outstanding {
                via,
                prefix,
                sent: now,
                deadline: now + timeout(srtt),
                liveness,
            },
        );
        self.last_quality.insert((via, prefix), now);
        if liveness {
            let round = self.next_liveness.get(&via).map_or(0, |(_, r)| *r) + 1;
            let every = self.liveness_interval(via, now, round);
            self.next_liveness.insert(via, (now + every, round));
        }
        self.paths.entry((via, prefix)).or_default().probe_bytes += u64::from(bytes);
        let window = self.probe_bytes.entry(via).or_default();
        window.push_back((now, bytes));
        while window
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > BUSY_FOR)
        {
            window.pop_front();
        }
        ProbeRequest {
            id,
            via,
            target,
            bytes,
        }
    }

    /// Probe bytes a second each carrier used lately.
    pub fn probe_rate(&self, via: Via, now: Instant) -> f64 {
        self.probe_bytes.get(&via).map_or(0.0, |window| {
            let bytes: u64 = window
                .iter()
                .filter(|(at, _)| now.saturating_duration_since(*at) <= BUSY_FOR)
                .map(|(_, b)| u64::from(*b))
                .sum();
            bytes as f64 / BUSY_FOR.as_secs_f64()
        })
    }

    /// The soonest a probe could be due or time out: when to call
    /// [`Monitor::poll_probes`] and [`Monitor::evaluate`] next at the latest.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let probe = self.outstanding.values().map(|p| p.deadline).min();
        let quality = self
            .interest
            .keys()
            .flat_map(|prefix| {
                self.candidates_of(*prefix)
                    .into_iter()
                    .map(move |via| (via, *prefix))
            })
            .map(|(via, prefix)| self.quality_due(via, prefix, true).unwrap_or(now))
            .min();
        let liveness = self.next_liveness.values().map(|(at, _)| *at).min();
        [probe, quality, liveness]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(1))
            .max(now)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn switches(&self) -> impl DoubleEndedIterator<Item = &Switch> {
        self.switches.iter()
    }

    pub fn health_of(&self) -> impl Iterator<Item = (&Via, &Health)> {
        self.health.iter()
    }

    pub fn paths(&self) -> impl Iterator<Item = (&(Via, Prefix), &PathFigures)> {
        self.paths.iter()
    }

    pub fn decisions(&self) -> impl Iterator<Item = (&(u32, Prefix), &Choice)> {
        self.choices.iter()
    }

    pub fn rule(&self, rule: u32) -> Option<&Arc<MonitorRoute>> {
        self.rules.get(&rule)
    }

    /// Whether any prefix has flows of a metric rule lately.
    pub fn is_idle(&self) -> bool {
        self.interest.is_empty()
    }

    /// A carrier's figures towards a prefix now, stale ones left out.
    pub fn figures(&self, via: Via, prefix: Prefix, now: Instant) -> super::path::Figures {
        self.candidate(via, prefix, now).figures
    }

    pub fn is_up(&self, via: Via) -> bool {
        self.health.get(&via).is_none_or(Health::is_up)
    }

    /// The probe kind a prefix's probes use (for reports).
    pub fn target_of(&self, prefix: Prefix) -> Option<ProbeKind> {
        self.interest.get(&prefix).map(|i| i.target.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::goal::Goal;
    use crate::overlay::{OverlayId, test_overlay};

    const O1: Via = Via::Overlay(OverlayId(1));
    const DST: &str = "203.0.113.10";

    /// One metric rule (id 1, `metric`) over overlay 1, as the routes give
    /// it to the Monitor.
    fn update(monitor: &mut Monitor, metric: Metric) {
        let overlays = OverlayTable::new([test_overlay(1, "detour", &["192.0.2.1:7400"], 0)]);
        let rule = Arc::new(MonitorRoute {
            rule: 1,
            goal: Goal {
                metric,
                among: None,
                module: None,
            },
            candidates: vec![OverlayId(1)],
            module: None,
            module_shim: Vec::new(),
        });
        monitor.update_routes([&rule].into_iter(), &overlays);
    }

    /// A simulated network: each carrier's round trip (None: it answers
    /// nothing), probes answered after it.
    struct Sim {
        monitor: Monitor,
        start: Instant,
        answers: Vec<(Instant, u64)>,
        sent: Vec<(Instant, ProbeRequest)>,
    }

    impl Sim {
        fn new(metric: Metric) -> Sim {
            let start = Instant::now();
            let mut monitor = Monitor::new(MonitorSettings::default(), start);
            update(&mut monitor, metric);
            Sim {
                monitor,
                start,
                answers: Vec::new(),
                sent: Vec::new(),
            }
        }

        fn flow(&mut self, at: Duration) {
            self.flow_on(at, Via::Underlay);
        }

        fn flow_on(&mut self, at: Duration, via: Via) {
            let now = self.start + at;
            self.monitor.handle(
                Event::FlowStarted {
                    rule: 1,
                    dst: DST.parse().unwrap(),
                    proto: 6,
                    dport: 443,
                    via,
                },
                now,
            );
        }

        /// Runs from `from` to `to` in 100 ms steps; `rtt(via, t)` says how
        /// long an answer takes at time t. The last choices.
        fn run(
            &mut self,
            from: Duration,
            to: Duration,
            rtt: impl Fn(Via, Duration) -> Option<Duration>,
        ) -> Arc<Choices> {
            let mut choices = Arc::new(Choices::default());
            let mut t = from;
            while t < to {
                let now = self.start + t;
                let mut due = Vec::new();
                self.answers.retain(|(at, id)| {
                    if *at <= now {
                        due.push((*at, *id));
                        false
                    } else {
                        true
                    }
                });
                for (at, id) in due {
                    self.monitor
                        .handle(Event::ProbeAnswered { id, at, rtt: None }, now);
                }
                let mut probes = Vec::new();
                self.monitor.poll_probes(now, &mut probes);
                for probe in probes {
                    if let Some(rtt) = rtt(probe.via, t) {
                        self.answers.push((now + rtt, probe.id));
                    }
                    self.sent.push((now, probe));
                }
                if t.as_millis().is_multiple_of(1000) {
                    choices = self.monitor.evaluate(now);
                }
                t += Duration::from_millis(100);
            }
            choices
        }

        fn route(&self) -> Arc<MonitorRoute> {
            self.monitor.rule(1).unwrap().clone()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_faster_overlay_takes_new_flows_within_seconds() {
        let mut sim = Sim::new(Metric::Latency);
        sim.flow(Duration::ZERO);
        let rtts = |via: Via, _| Some(if via == Via::Underlay { ms(60) } else { ms(20) });
        let early = sim.run(Duration::ZERO, ms(2000), rtts);
        let dst: IpAddr = DST.parse().unwrap();
        assert_eq!(
            early.choose(&sim.route(), dst, None).0,
            Via::Underlay,
            "confirmation pending"
        );
        let later = sim.run(ms(2000), Duration::from_secs(15), rtts);
        let (via, why) = later.choose(&sim.route(), dst, None);
        assert_eq!(via, O1, "{why}");
        assert!(matches!(why, Why::Faster { .. }));
        // Both carriers were measured before anything was trusted.
        assert!(sim.sent.iter().any(|(_, p)| p.via == Via::Underlay));
        assert!(sim.sent.iter().any(|(_, p)| p.via == O1));
        assert!(
            sim.sent
                .iter()
                .all(|(_, p)| p.target.kind == ProbeKind::TcpSyn { dport: 443 })
        );
    }

    #[test]
    fn a_slightly_faster_overlay_leaves_flows_on_the_underlay() {
        let mut sim = Sim::new(Metric::Latency);
        sim.flow(Duration::ZERO);
        let choices = sim.run(Duration::ZERO, Duration::from_secs(120), |via, _| {
            Some(if via == Via::Underlay { ms(20) } else { ms(18) })
        });
        assert_eq!(
            choices.choose(&sim.route(), DST.parse().unwrap(), None).0,
            Via::Underlay
        );
        assert_eq!(sim.monitor.switches().count(), 0);
    }

    #[test]
    fn a_dead_overlay_is_down_after_two_missed_liveness_probes() {
        let mut sim = Sim::new(Metric::Latency);
        sim.flow(Duration::ZERO);
        let alive = |via: Via, _| Some(if via == Via::Underlay { ms(60) } else { ms(20) });
        let choices = sim.run(Duration::ZERO, Duration::from_secs(20), alive);
        let dst: IpAddr = DST.parse().unwrap();
        assert_eq!(choices.choose(&sim.route(), dst, None).0, O1);
        // The overlay dies at 20 s while new flows keep taking it: it is
        // busy, so probed every second.
        let dead = |via: Via, _| (via == Via::Underlay).then_some(ms(60));
        let mut down_at = None;
        for second in 20..30 {
            sim.flow_on(Duration::from_secs(second), O1);
            let choices = sim.run(Duration::from_secs(second), Duration::from_secs(second + 1), dead);
            if down_at.is_none() && choices.is_down(O1) {
                down_at = Some(second);
                assert_eq!(choices.choose(&sim.route(), dst, None).0, Via::Underlay);
            }
        }
        let down_at = down_at.expect("the overlay went down");
        assert!(down_at <= 24, "down only at {down_at} s");
        // It comes back with its first answer.
        let choices = sim.run(Duration::from_secs(30), Duration::from_secs(40), alive);
        assert!(!choices.is_down(O1));
    }

    #[test]
    fn probes_stay_within_the_budget() {
        let start = Instant::now();
        let mut monitor = Monitor::new(MonitorSettings::default(), start);
        update(
            &mut monitor,
            Metric::Loss {
                max: crate::monitor::LossLimit(100),
            },
        );
        // Many prefixes with flows: far more probes due than allowed.
        for i in 0..200u32 {
            let dst = IpAddr::from([10, (i / 256) as u8, (i % 256) as u8, 1]);
            monitor.handle(
                Event::FlowStarted {
                    rule: 1,
                    dst,
                    proto: 17,
                    dport: 3478,
                    via: Via::Underlay,
                },
                start,
            );
        }
        let mut probes = Vec::new();
        for step in 0..600u64 {
            let now = start + Duration::from_millis(step * 100);
            monitor.poll_probes(now, &mut probes);
            if step % 10 == 0 {
                monitor.evaluate(now);
            }
        }
        let bytes: u64 = probes.iter().map(|p| u64::from(p.bytes)).sum();
        // 60 s at 20 probes and 8000 bytes a second, plus one second's bucket.
        assert!(probes.len() <= 61 * 20, "{} probes", probes.len());
        assert!(bytes <= 61 * 8000, "{bytes} bytes");
        assert!(probes.len() > 50 * 20 / 2, "the budget is used: {}", probes.len());
        assert!(probes.iter().all(|p| p.target.kind == ProbeKind::Echo));
    }

    #[test]
    fn flows_answering_make_liveness_probes_unneeded() {
        // The probes sent in 20 s after a warm-up, with the flows' own
        // answers measuring both carriers or not.
        let probes = |flows_answer: bool| {
            let mut sim = Sim::new(Metric::Latency);
            sim.flow(Duration::ZERO);
            sim.run(Duration::ZERO, Duration::from_secs(10), |_, _| Some(ms(10)));
            let before = sim.sent.len();
            for second in 10..30u64 {
                let now = sim.start + Duration::from_secs(second);
                for via in [Via::Underlay, O1] {
                    if flows_answer {
                        sim.monitor.handle(
                            Event::Rtt {
                                via,
                                dst: DST.parse().unwrap(),
                                rtt: ms(10),
                            },
                            now,
                        );
                    }
                }
                sim.run(
                    Duration::from_secs(second),
                    Duration::from_secs(second + 1),
                    |_, _| Some(ms(10)),
                );
            }
            sim.sent.len() - before
        };
        let (measured, unmeasured) = (probes(true), probes(false));
        assert!(
            unmeasured >= 4,
            "with no flow measuring the carriers, the Monitor probes them: {unmeasured} probes"
        );
        assert!(
            measured * 4 <= unmeasured,
            "{measured} probes though flows measured both paths ({unmeasured} when they did not)"
        );
    }

    #[test]
    fn loss_rules_probe_the_underlay_five_times_a_second() {
        let mut sim = Sim::new(Metric::Loss {
            max: crate::monitor::LossLimit(100),
        });
        sim.flow(Duration::ZERO);
        sim.run(Duration::ZERO, Duration::from_secs(10), |_, _| Some(ms(10)));
        let underlay = sim.sent.iter().filter(|(_, p)| p.via == Via::Underlay).count();
        assert!(underlay >= 45, "{underlay} underlay probes in 10 s");
    }

    #[test]
    fn prefixes_without_flows_for_half_an_hour_are_forgotten() {
        let mut sim = Sim::new(Metric::Latency);
        sim.flow(Duration::ZERO);
        sim.run(Duration::ZERO, Duration::from_secs(5), |_, _| Some(ms(10)));
        let now = sim.start + Duration::from_secs(1801);
        sim.monitor.evaluate(now);
        assert!(sim.monitor.is_idle());
        assert_eq!(sim.monitor.paths().count(), 0, "and their figures, long stale");
        let mut probes = Vec::new();
        sim.monitor.poll_probes(now, &mut probes);
        assert!(probes.is_empty());
    }

    #[test]
    fn an_overlay_left_is_forgotten() {
        let mut sim = Sim::new(Metric::Latency);
        sim.flow(Duration::ZERO);
        sim.run(Duration::ZERO, Duration::from_secs(5), |_, _| Some(ms(10)));
        assert!(sim.monitor.paths().any(|((via, _), _)| *via == O1));
        sim.monitor
            .update_routes(std::iter::empty(), &OverlayTable::default());
        assert!(sim.monitor.paths().all(|((via, _), _)| *via == Via::Underlay));
        assert!(sim.monitor.decisions().next().is_none(), "its rule went too");
    }
}
