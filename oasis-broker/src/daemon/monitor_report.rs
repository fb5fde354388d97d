//! The Monitor's state in words and figures, for `oasis monitor` and
//! `oasis status`: made by the control plane from what the Monitor
//! publishes and its state, so the Monitor knows nothing of views.

use std::time::Instant;

use super::views::carrier_name;
use crate::control::{CarrierView, DecisionView, MonitorView, PathView, SwitchView};
use crate::engine::Routes;
use crate::monitor::path::Figures;
use crate::monitor::state::Monitor;
use crate::monitor::{Metric, MonitorLink};
use crate::overlay::Via;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How the candidates compare in the metric's own figures, e.g.
/// `underlay 40.1 ms, detour 33.2 ms`.
pub fn comparison(metric: &Metric, candidates: &[(String, Figures)]) -> String {
    let part = |(name, f): &(String, Figures)| -> String {
        let figure = match metric {
            Metric::Latency | Metric::Other(_) => f.srtt.map(|d| format!("{:.1} ms", ms(d))),
            Metric::Loss { .. } => f.loss.map(|(rate, n)| format!("{:.2}% of {n}", rate * 100.0)),
            Metric::Throughput => match (f.goodput_bps, f.throughput(false)) {
                (Some(g), _) => Some(format!("{:.1} Mbit/s", g / 1e6)),
                (None, Some(e)) => Some(format!("~{:.1} Mbit/s (estimated)", e / 1e6)),
                (None, None) => None,
            },
        };
        format!("{name} {}", figure.unwrap_or_else(|| "not measured yet".into()))
    };
    candidates.iter().map(part).collect::<Vec<_>>().join(", ")
}

pub fn render(monitor: &Monitor, routes: &Routes, link: &MonitorLink, now: Instant) -> MonitorView {
    let name = |via: Via| carrier_name(&routes.overlays, via);
    let mut carriers: Vec<Via> = vec![Via::Underlay];
    carriers.extend(
        routes
            .overlays
            .iter()
            .filter(|o| !o.monitor)
            .map(|o| Via::Overlay(o.id)),
    );
    carriers.sort_by_key(|v| match v {
        Via::Underlay => 0,
        Via::Overlay(id) => u64::from(id.0) + 1,
        Via::Unavailable => u64::MAX,
    });
    let health: std::collections::HashMap<Via, &crate::monitor::health::Health> =
        monitor.health_of().map(|(v, h)| (*v, h)).collect();
    let carrier_views = carriers
        .iter()
        .map(|via| {
            let h = health.get(via);
            CarrierView {
                name: name(*via),
                up: h.is_none_or(|h| h.is_up()),
                down_secs: h
                    .and_then(|h| h.down_since())
                    .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                down_reason: h
                    .filter(|h| !h.is_up())
                    .and_then(|h| h.reason)
                    .map(|r| r.text().to_string()),
                downs: h.map_or(0, |h| h.downs),
                last_answer_secs: h
                    .and_then(|h| h.last_answer())
                    .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                probe_bytes_per_second: monitor.probe_rate(*via, now),
            }
        })
        .collect();
    let stale = monitor.settings.stale_after;
    let mut paths: Vec<PathView> = monitor
        .paths()
        .map(|((via, prefix), path)| {
            let f = path.figures(now, stale);
            PathView {
                carrier: name(*via),
                prefix: prefix.to_string(),
                srtt_ms: f.srtt.map(ms),
                rttvar_ms: f.rttvar.map(ms),
                min_rtt_ms: f.min_rtt.map(ms),
                rtt_samples: f.rtt_samples,
                loss_percent: f.loss.map(|(rate, _)| rate * 100.0),
                loss_samples: f.loss.map_or(0, |(_, n)| n),
                goodput_mbps: f.goodput_bps.map(|b| b / 1e6),
                age_secs: f.age.map(|a| a.as_secs_f64()),
                probe_bytes: path.probe_bytes,
            }
        })
        .collect();
    paths.sort_by(|a, b| a.prefix.cmp(&b.prefix).then_with(|| a.carrier.cmp(&b.carrier)));
    let mut decisions: Vec<DecisionView> = monitor
        .decisions()
        .filter_map(|((rule, prefix), choice)| {
            let route = monitor.rule(*rule)?;
            let mut candidates = vec![(name(Via::Underlay), monitor.figures(Via::Underlay, *prefix, now))];
            candidates.extend(route.candidates.iter().map(|id| {
                let via = Via::Overlay(*id);
                (name(via), monitor.figures(via, *prefix, now))
            }));
            Some(DecisionView {
                rule: *rule,
                prefix: prefix.to_string(),
                metric: route.goal.metric.to_string(),
                carrier: name(choice.via),
                why: choice.why.to_string(),
                comparison: comparison(&route.goal.metric, &candidates),
                since_secs: now.saturating_duration_since(choice.since).as_secs_f64(),
                hold_secs: choice.hold.as_secs_f64(),
                flips: choice.flips,
                challenger: choice.challenger().map(|(via, since)| {
                    format!(
                        "{} better for {:.0} s",
                        name(via),
                        now.saturating_duration_since(since).as_secs_f64()
                    )
                }),
            })
        })
        .collect();
    decisions.sort_by(|a, b| a.rule.cmp(&b.rule).then_with(|| a.prefix.cmp(&b.prefix)));
    let switches = monitor
        .switches()
        .rev()
        .map(|s| SwitchView {
            ago_secs: now.saturating_duration_since(s.at).as_secs_f64(),
            rule: s.rule,
            prefix: s.prefix.to_string(),
            from: name(s.from),
            to: name(s.to),
            why: s.why.to_string(),
        })
        .collect();
    let mut pins: Vec<(u32, String)> = monitor
        .pins()
        .iter()
        .map(|(rule, via)| (*rule, name(*via)))
        .collect();
    pins.sort();
    let budget = monitor.budget();
    let (probes_limit, bytes_limit) = budget.limits();
    MonitorView {
        rules: routes.monitored_rules().filter(|r| r.module.is_none()).count(),
        probes_per_second_limit: probes_limit as u32,
        probe_bytes_per_second_limit: bytes_limit as u32,
        probes_sent: budget.spent_probes,
        probe_bytes_sent: budget.spent_bytes,
        probe_bytes_per_second: carriers.iter().map(|v| monitor.probe_rate(*v, now)).sum(),
        events_dropped: link.dropped.load(std::sync::atomic::Ordering::Relaxed),
        carriers: carrier_views,
        paths,
        decisions,
        switches,
        pins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn comparisons_speak_the_metrics_figures() {
        let measured = Figures {
            srtt: Some(Duration::from_micros(40_100)),
            loss: Some((0.05, 120)),
            goodput_bps: Some(20e6),
            ..Figures::default()
        };
        let unknown = Figures::default();
        let both = [
            ("underlay".to_string(), measured),
            ("detour".to_string(), unknown),
        ];
        assert_eq!(
            comparison(&Metric::Latency, &both),
            "underlay 40.1 ms, detour not measured yet"
        );
        assert_eq!(
            comparison(
                &Metric::Loss {
                    max: crate::monitor::LossLimit(100)
                },
                &both
            ),
            "underlay 5.00% of 120, detour not measured yet"
        );
        assert_eq!(
            comparison(&Metric::Throughput, &both[..1]),
            "underlay 20.0 Mbit/s"
        );
    }
}
