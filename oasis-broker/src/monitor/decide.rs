//! The Monitor's decisions, one per metric rule and destination prefix:
//! which carrier new flows take. The underlay is the incumbent: an overlay
//! takes over only when it is clearly better, at two evaluations some
//! seconds apart, and a choice, once made, is kept for a hold time that
//! doubles with each flip, so nothing flaps. A carrier that goes down
//! loses its flows at once, whatever the hold time.

use std::time::{Duration, Instant};

use super::goal::Metric;
use super::path::Figures;
use crate::overlay::Via;

/// The margins and times of the decisions (`monitor:` in the config file).
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionSettings {
    /// `latency`: an overlay must be faster by at least this much ...
    pub latency_margin: Duration,
    /// ... and by at least this fraction of the underlay's round trip.
    pub latency_margin_fraction: f64,
    /// `throughput`: an overlay must promise this many times the
    /// underlay's goodput.
    pub throughput_factor: f64,
    /// `loss<X%`: the underlay's loss counts once it is over this many outcomes.
    pub loss_min_samples: u64,
    /// `loss<X%`: flows return to the underlay once its loss has stayed
    /// under X/2 this long.
    pub loss_recovery: Duration,
    /// A better carrier must still be better this long later.
    pub confirm_after: Duration,
    /// A choice is kept at least this long after the first flip; each
    /// further flip doubles it, up to `hold_max`.
    pub hold_min: Duration,
    pub hold_max: Duration,
}

impl Default for DecisionSettings {
    fn default() -> DecisionSettings {
        DecisionSettings {
            latency_margin: Duration::from_millis(10),
            latency_margin_fraction: 0.15,
            throughput_factor: 1.25,
            loss_min_samples: 100,
            loss_recovery: Duration::from_secs(60),
            confirm_after: Duration::from_secs(5),
            hold_min: Duration::from_secs(30),
            hold_max: Duration::from_secs(480),
        }
    }
}

impl DecisionSettings {
    /// How much faster than `underlay` an overlay must be.
    pub fn latency_margin(&self, underlay: Duration) -> Duration {
        self.latency_margin
            .max(underlay.mul_f64(self.latency_margin_fraction))
    }
}

/// Why a carrier was chosen, in figures, for `oasis flows` and `oasis
/// monitor`. Round trips in milliseconds, loss as a fraction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Why {
    /// Nothing measured yet or nothing clearly better: the underlay, the
    /// incumbent.
    Incumbent,
    /// `latency`: the overlay's round trip against the underlay's.
    Faster { chosen_ms: f32, underlay_ms: f32 },
    /// `latency`: back to the underlay, the overlay no longer faster by
    /// half the margin (or its figures went stale).
    NoLongerFaster,
    /// `loss`: the underlay's loss reached the limit.
    LessLoss { chosen: f32, underlay: f32 },
    /// `loss`: the underlay's loss stayed under half the limit.
    LossRecovered,
    /// `throughput`: the chosen carrier's goodput (or estimate) against
    /// the underlay's.
    MoreThroughput { factor: f32, estimated: bool },
    /// `throughput`: back to the underlay.
    NoMoreThroughput,
    /// The carrier the choice was on went down.
    Failover,
    /// The flow's handshake went unanswered on the carrier it started on.
    Rescued,
    /// A monitor module decides.
    Module,
    /// The overlay's code module is down (restarting): the underlay, for
    /// a rule that did not pin the overlay.
    ModuleDown,
    /// The overlay's WireGuard peers do not answer: the underlay, for a
    /// rule that did not pin the overlay.
    PeerDown,
    /// The user pinned the rule to the carrier (`oasis rule pin`, the API).
    Pinned,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Incumbent => f.write_str("incumbent: nothing clearly better measured"),
            Why::Faster {
                chosen_ms,
                underlay_ms,
            } => write!(
                f,
                "faster: {chosen_ms:.1} ms against the underlay's {underlay_ms:.1} ms"
            ),
            Why::NoLongerFaster => f.write_str("back: the overlay is no longer clearly faster"),
            Why::LessLoss { chosen, underlay } => write!(
                f,
                "less loss: {:.2}% against the underlay's {:.2}%",
                chosen * 100.0,
                underlay * 100.0
            ),
            Why::LossRecovered => f.write_str("back: the underlay's loss stayed under half the limit"),
            Why::MoreThroughput { factor, estimated } => write!(
                f,
                "more throughput: {factor:.2}x the underlay's{}",
                if *estimated { " (estimated)" } else { "" }
            ),
            Why::NoMoreThroughput => f.write_str("back: the overlay no longer promises more throughput"),
            Why::Failover => f.write_str("failover: the carrier it was on went down"),
            Why::Rescued => f.write_str("rescued: its handshake went unanswered on another carrier"),
            Why::Module => f.write_str("decided by the monitor module"),
            Why::ModuleDown => f.write_str("fallback: the overlay's code module is restarting"),
            Why::PeerDown => f.write_str("fallback: the overlay's WireGuard peer does not answer"),
            Why::Pinned => f.write_str("pinned by the user"),
        }
    }
}

/// One candidate as an evaluation sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub via: Via,
    pub up: bool,
    pub figures: Figures,
}

/// The choice for one metric rule and prefix, and what it takes to change it.
#[derive(Clone, Debug)]
pub struct Choice {
    pub via: Via,
    pub why: Why,
    /// When the choice was made.
    pub since: Instant,
    /// How long it is kept (zero for the first, incumbent choice).
    pub hold: Duration,
    pub flips: u32,
    /// A carrier found better, and since when it has been so.
    challenger: Option<(Via, Instant)>,
    /// `loss`: since when the underlay has stayed under half the limit.
    recovering_since: Option<Instant>,
    /// When the flip count last decayed.
    settled: Instant,
}

impl Choice {
    /// The underlay, held for no time: any clearly better overlay may
    /// take over as soon as it is confirmed.
    pub fn incumbent(now: Instant) -> Choice {
        Choice {
            via: Via::Underlay,
            why: Why::Incumbent,
            since: now,
            hold: Duration::ZERO,
            flips: 0,
            challenger: None,
            recovering_since: None,
            settled: now,
        }
    }

    /// The carrier that is better, if one is confirmed as better, since.
    pub fn challenger(&self) -> Option<(Via, Instant)> {
        self.challenger
    }

    /// Evaluates the choice against the candidates (the underlay first,
    /// then the rule's overlays); true when it changed.
    pub fn evaluate(
        &mut self,
        metric: &Metric,
        candidates: &[Candidate],
        settings: &DecisionSettings,
        now: Instant,
    ) -> bool {
        let current_up = candidates
            .iter()
            .find(|c| c.via == self.via)
            .is_some_and(|c| c.up);
        if !current_up {
            let via = failover(metric, candidates, settings, self.via);
            return self.switch(via, Why::Failover, settings, now, false);
        }
        self.decay(now);
        let Some((target, why)) = target(self, metric, candidates, settings, now) else {
            self.challenger = None;
            return false;
        };
        let confirmed = match self.challenger {
            Some((via, first)) if via == target => {
                now.saturating_duration_since(first) >= settings.confirm_after
            }
            _ => {
                self.challenger = Some((target, now));
                settings.confirm_after.is_zero()
            }
        };
        if !confirmed || now.saturating_duration_since(self.since) < self.hold {
            return false;
        }
        self.switch(target, why, settings, now, true)
    }

    fn switch(&mut self, via: Via, why: Why, settings: &DecisionSettings, now: Instant, flip: bool) -> bool {
        self.challenger = None;
        self.recovering_since = None;
        if via == self.via {
            return false;
        }
        self.via = via;
        self.why = why;
        self.since = now;
        self.settled = now;
        if flip {
            self.hold = settings
                .hold_min
                .saturating_mul(1u32 << self.flips.min(16))
                .min(settings.hold_max);
            self.flips += 1;
        }
        true
    }

    /// A choice that stayed put for twice its hold time forgets a flip.
    fn decay(&mut self, now: Instant) {
        if self.flips > 0 && now.saturating_duration_since(self.settled) >= self.hold * 2 {
            self.flips -= 1;
            self.settled = now;
            self.hold = if self.flips == 0 {
                Duration::ZERO
            } else {
                self.hold / 2
            };
        }
    }
}

fn underlay(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates.iter().find(|c| c.via == Via::Underlay)
}

fn overlays(candidates: &[Candidate]) -> impl Iterator<Item = &Candidate> {
    candidates.iter().filter(|c| c.via != Via::Underlay && c.up)
}

fn ms(d: Duration) -> f32 {
    d.as_secs_f32() * 1000.0
}

/// Where the choice should go now, and why; None to stay.
fn target(
    choice: &mut Choice,
    metric: &Metric,
    candidates: &[Candidate],
    settings: &DecisionSettings,
    now: Instant,
) -> Option<(Via, Why)> {
    let under = underlay(candidates)?;
    let current = candidates.iter().find(|c| c.via == choice.via)?;
    match metric {
        Metric::Latency => by_latency(choice, under, current, candidates, settings),
        Metric::Loss { max } => by_loss(choice, max.fraction(), under, candidates, settings, now),
        Metric::Throughput => by_throughput(choice, under, current, candidates, settings),
        // An external module decides; nothing to evaluate here.
        Metric::Other(_) => None,
    }
}

/// Lower smoothed RTT by the margin; back to the underlay once the lead is
/// under half of it.
fn by_latency(
    choice: &Choice,
    under: &Candidate,
    current: &Candidate,
    candidates: &[Candidate],
    settings: &DecisionSettings,
) -> Option<(Via, Why)> {
    let srtt = |c: &Candidate| c.figures.srtt;
    let best = overlays(candidates)
        .filter_map(|c| Some((c, srtt(c)?)))
        .min_by_key(|(_, rtt)| *rtt);
    if choice.via == Via::Underlay {
        let u = srtt(under)?;
        let (best, b) = best?;
        (u.saturating_sub(b) >= settings.latency_margin(u)).then_some((
            best.via,
            Why::Faster {
                chosen_ms: ms(b),
                underlay_ms: ms(u),
            },
        ))
    } else {
        let Some(o) = srtt(current) else {
            return Some((Via::Underlay, Why::NoLongerFaster));
        };
        if let Some((best, b)) = best
            && best.via != current.via
            && o.saturating_sub(b) >= settings.latency_margin(o)
        {
            return Some((
                best.via,
                Why::Faster {
                    chosen_ms: ms(b),
                    underlay_ms: srtt(under).map_or(0.0, ms),
                },
            ));
        }
        let u = srtt(under)?;
        (u.saturating_sub(o) < settings.latency_margin(u) / 2).then_some((Via::Underlay, Why::NoLongerFaster))
    }
}

/// Off an underlay that loses past the limit, to the overlay that loses
/// least; back once the underlay has stayed under half the limit.
fn by_loss(
    choice: &mut Choice,
    limit: f64,
    under: &Candidate,
    candidates: &[Candidate],
    settings: &DecisionSettings,
    now: Instant,
) -> Option<(Via, Why)> {
    let (u_loss, u_n) = under.figures.loss?;
    if choice.via == Via::Underlay {
        if u_n < settings.loss_min_samples || u_loss < limit {
            return None;
        }
        let rtt = |c: &Candidate| c.figures.srtt.unwrap_or(Duration::MAX);
        let (best, b_loss) = overlays(candidates)
            .filter_map(|c| Some((c, c.figures.loss?.0)))
            .min_by(|(a, la), (b, lb)| la.total_cmp(lb).then_with(|| rtt(a).cmp(&rtt(b))))?;
        (b_loss < u_loss).then_some((
            best.via,
            Why::LessLoss {
                chosen: b_loss as f32,
                underlay: u_loss as f32,
            },
        ))
    } else {
        if u_loss < limit / 2.0 {
            let since = *choice.recovering_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= settings.loss_recovery {
                return Some((Via::Underlay, Why::LossRecovered));
            }
        } else {
            choice.recovering_since = None;
        }
        None
    }
}

/// Throughput by the factor, measured against measured or estimate
/// against estimate.
fn by_throughput(
    choice: &Choice,
    under: &Candidate,
    current: &Candidate,
    candidates: &[Candidate],
    settings: &DecisionSettings,
) -> Option<(Via, Why)> {
    // Like with like: measured goodput when both have it, else the
    // estimate for both.
    let score = |c: &Candidate| -> Option<(f64, bool)> {
        match (c.figures.throughput(true), under.figures.throughput(true)) {
            (Some(g), Some(_)) => Some((g, false)),
            _ => Some((c.figures.throughput(false)?, true)),
        }
    };
    let u_score = |c: &Candidate| -> Option<f64> {
        match (c.figures.throughput(true), under.figures.throughput(true)) {
            (Some(_), Some(u)) => Some(u),
            _ => under.figures.throughput(false),
        }
    };
    let best = overlays(candidates)
        .filter_map(|c| Some((c, score(c)?, u_score(c)?)))
        .max_by(|a, b| (a.1.0 / a.2).total_cmp(&(b.1.0 / b.2)));
    if choice.via == Via::Underlay {
        let (best, (s, estimated), u) = best?;
        (s >= settings.throughput_factor * u).then_some((
            best.via,
            Why::MoreThroughput {
                factor: (s / u) as f32,
                estimated,
            },
        ))
    } else {
        let Some(((o, _), u)) = score(current).zip(u_score(current)) else {
            return Some((Via::Underlay, Why::NoMoreThroughput));
        };
        if let Some((best, (s, estimated), bu)) = best
            && best.via != current.via
            && s / bu >= settings.throughput_factor * (o / u)
        {
            return Some((
                best.via,
                Why::MoreThroughput {
                    factor: (s / bu) as f32,
                    estimated,
                },
            ));
        }
        // Halfway (in ratio) back to even: return.
        (o < settings.throughput_factor.sqrt() * u).then_some((Via::Underlay, Why::NoMoreThroughput))
    }
}

/// The carrier to leave a down one for: the best of those up by the
/// metric's figures, else the underlay if it is up, else any that is up,
/// else the underlay (as if Oasis were not there).
fn failover(metric: &Metric, candidates: &[Candidate], settings: &DecisionSettings, from: Via) -> Via {
    ranked(metric, candidates, settings)
        .into_iter()
        .find(|via| *via != from)
        .unwrap_or(Via::Underlay)
}

/// The candidates that are up, best first by the metric (those without
/// figures last, the underlay first among equals).
pub fn ranked(metric: &Metric, candidates: &[Candidate], _settings: &DecisionSettings) -> Vec<Via> {
    let mut up: Vec<&Candidate> = candidates.iter().filter(|c| c.up).collect();
    let key = |c: &Candidate| -> f64 {
        match metric {
            Metric::Latency | Metric::Other(_) => c.figures.srtt.map_or(f64::MAX, |d| d.as_secs_f64()),
            Metric::Loss { .. } => c.figures.loss.map_or(f64::MAX, |(l, _)| l),
            Metric::Throughput => c
                .figures
                .throughput(c.figures.goodput_bps.is_some())
                .map_or(f64::MAX, |t| -t),
        }
    };
    // Stable: among equals (all without figures), the underlay stays first.
    up.sort_by(|a, b| key(a).total_cmp(&key(b)));
    up.into_iter().map(|c| c.via).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::goal::LossLimit;
    use crate::overlay::OverlayId;

    const O1: Via = Via::Overlay(OverlayId(1));
    const O2: Via = Via::Overlay(OverlayId(2));

    fn rtt(via: Via, ms: u64) -> Candidate {
        Candidate {
            via,
            up: true,
            figures: Figures {
                srtt: Some(Duration::from_millis(ms)),
                ..Figures::default()
            },
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Evaluates once a second from `from` for `seconds`; the times it changed.
    fn run(
        choice: &mut Choice,
        metric: &Metric,
        start: Instant,
        seconds: std::ops::Range<u64>,
        candidates: impl Fn(u64) -> Vec<Candidate>,
    ) -> Vec<(u64, Via)> {
        let settings = DecisionSettings::default();
        let mut changes = Vec::new();
        for s in seconds {
            if choice.evaluate(metric, &candidates(s), &settings, start + secs(s)) {
                changes.push((s, choice.via));
            }
        }
        changes
    }

    #[test]
    fn a_slightly_faster_overlay_never_takes_over() {
        let t = Instant::now();
        let mut choice = Choice::incumbent(t);
        let changes = run(&mut choice, &Metric::Latency, t, 0..300, |_| {
            vec![rtt(Via::Underlay, 20), rtt(O1, 18)]
        });
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(choice.why, Why::Incumbent);
    }

    #[test]
    fn a_clearly_faster_overlay_takes_over_once_confirmed() {
        let t = Instant::now();
        let mut choice = Choice::incumbent(t);
        let changes = run(&mut choice, &Metric::Latency, t, 0..60, |_| {
            vec![rtt(Via::Underlay, 60), rtt(O1, 20), rtt(O2, 25)]
        });
        assert_eq!(changes, [(5, O1)], "confirmed 5 s after it was first seen better");
        assert_eq!(
            choice.why,
            Why::Faster {
                chosen_ms: 20.0,
                underlay_ms: 60.0
            }
        );
        assert_eq!(choice.hold, secs(30));
    }

    #[test]
    fn a_path_that_swings_around_the_margin_causes_no_switch() {
        // The underlay swings between 40 and 45 ms every 5 s; the overlay
        // is at 33 ms, so it is 7 or 12 ms faster: better by the margin
        // half of the time, never for 5 s on end.
        let t = Instant::now();
        let mut choice = Choice::incumbent(t);
        let changes = run(&mut choice, &Metric::Latency, t, 0..120, |s| {
            let u = if (s / 5) % 2 == 0 { 40 } else { 45 };
            vec![rtt(Via::Underlay, u), rtt(O1, 33)]
        });
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn each_flip_doubles_the_hold() {
        let t = Instant::now();
        let mut choice = Choice::incumbent(t);
        // Good, bad, good, ... every 20 s: flips only as the hold allows.
        let changes = run(&mut choice, &Metric::Latency, t, 0..400, |s| {
            let o = if (s / 20) % 2 == 0 { 10 } else { 60 };
            vec![rtt(Via::Underlay, 40), rtt(O1, o)]
        });
        let times: Vec<u64> = changes.iter().map(|(s, _)| *s).collect();
        assert!(times.len() >= 3, "{changes:?}");
        for pair in times.windows(2).enumerate() {
            let (i, w) = pair;
            let hold = 30u64 << i.min(4);
            assert!(w[1] - w[0] >= hold.min(480), "flip {i}: {changes:?}");
        }
    }

    #[test]
    fn a_carrier_that_goes_down_loses_the_choice_at_once() {
        let t = Instant::now();
        let mut choice = Choice::incumbent(t);
        run(&mut choice, &Metric::Latency, t, 0..10, |_| {
            vec![rtt(Via::Underlay, 60), rtt(O1, 20), rtt(O2, 30)]
        });
        assert_eq!(choice.via, O1);
        let mut down = rtt(O1, 20);
        down.up = false;
        let settings = DecisionSettings::default();
        assert!(choice.evaluate(
            &Metric::Latency,
            &[rtt(Via::Underlay, 60), down, rtt(O2, 30)],
            &settings,
            t + secs(11)
        ));
        assert_eq!(
            (choice.via, choice.why),
            (O2, Why::Failover),
            "the next best, hold or not"
        );
    }

    #[test]
    fn loss_leaves_the_underlay_at_the_limit_and_returns_after_it_heals() {
        let t = Instant::now();
        let metric = Metric::Loss { max: LossLimit(100) };
        let lossy = |loss: f64, n: u64, via: Via| Candidate {
            via,
            up: true,
            figures: Figures {
                loss: Some((loss, n)),
                srtt: Some(Duration::from_millis(30)),
                ..Figures::default()
            },
        };
        let mut choice = Choice::incumbent(t);
        // 5% loss, but over too few outcomes yet.
        assert!(
            run(&mut choice, &metric, t, 0..10, |_| vec![
                lossy(0.05, 60, Via::Underlay),
                lossy(0.0, 40, O1)
            ])
            .is_empty()
        );
        let changes = run(&mut choice, &metric, t, 10..20, |_| {
            vec![lossy(0.05, 150, Via::Underlay), lossy(0.0, 40, O1)]
        });
        assert_eq!(changes, [(15, O1)]);
        // Healed to 0.4% (< 0.5%): back after 60 s of it, not before.
        let changes = run(&mut choice, &metric, t, 20..120, |s| {
            let loss = if s < 30 { 0.008 } else { 0.004 };
            vec![lossy(loss, 200, Via::Underlay), lossy(0.0, 40, O1)]
        });
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            (95..=100).contains(&changes[0].0) && changes[0].1 == Via::Underlay,
            "{changes:?}"
        );
    }

    #[test]
    fn throughput_needs_a_quarter_more() {
        let t = Instant::now();
        let goodput = |via: Via, mbit: f64| Candidate {
            via,
            up: true,
            figures: Figures {
                goodput_bps: Some(mbit * 1e6),
                srtt: Some(Duration::from_millis(5)),
                loss: Some((0.0, 100)),
                ..Figures::default()
            },
        };
        let mut choice = Choice::incumbent(t);
        assert!(
            run(&mut choice, &Metric::Throughput, t, 0..30, |_| vec![
                goodput(Via::Underlay, 100.0),
                goodput(O1, 120.0)
            ])
            .is_empty()
        );
        let changes = run(&mut choice, &Metric::Throughput, t, 30..60, |_| {
            vec![goodput(Via::Underlay, 100.0), goodput(O1, 130.0)]
        });
        assert_eq!(changes, [(35, O1)]);
        assert!(matches!(choice.why, Why::MoreThroughput { estimated: false, .. }));
    }

    #[test]
    fn a_slow_lossy_overlay_is_never_promised_more_throughput() {
        // No transfer has gone over the overlay: it is judged by the
        // Mathis estimate, and so is the underlay, like with like.
        let t = Instant::now();
        let path = |via: Via, ms: u64, loss: f64, goodput: Option<f64>| Candidate {
            via,
            up: true,
            figures: Figures {
                srtt: Some(Duration::from_millis(ms)),
                loss: Some((loss, 200)),
                goodput_bps: goodput,
                ..Figures::default()
            },
        };
        let mut choice = Choice::incumbent(t);
        let changes = run(&mut choice, &Metric::Throughput, t, 0..120, |_| {
            vec![path(Via::Underlay, 2, 0.0, Some(20e6)), path(O1, 80, 0.02, None)]
        });
        assert!(changes.is_empty(), "{changes:?}");
        // A short, clean overlay path promises more than a 20 ms lossy underlay.
        let changes = run(&mut choice, &Metric::Throughput, t, 120..140, |_| {
            vec![path(Via::Underlay, 20, 0.01, Some(20e6)), path(O1, 1, 0.0, None)]
        });
        assert_eq!(changes, [(125, O1)]);
    }

    #[test]
    fn candidates_rank_by_the_metric() {
        let settings = DecisionSettings::default();
        let mut down = rtt(O2, 1);
        down.up = false;
        assert_eq!(
            ranked(
                &Metric::Latency,
                &[rtt(Via::Underlay, 40), rtt(O1, 20), down],
                &settings
            ),
            [O1, Via::Underlay]
        );
        let bare = |via| Candidate {
            via,
            up: true,
            figures: Figures::default(),
        };
        assert_eq!(
            ranked(&Metric::Latency, &[bare(Via::Underlay), bare(O1)], &settings),
            [Via::Underlay, O1]
        );
    }
}
