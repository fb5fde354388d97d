//! Oasis' views in the shapes the Clash REST API gives them, which
//! metacubexd, yacd and zashboard parse: the underlay is `DIRECT`, each
//! overlay a proxy, each metric rule a `URLTest` group, each flow a
//! connection whose chain is `[carrier, rule]`. Pure functions of the
//! views, so every shape is tested without a daemon.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::control::{FlowView, MonitorView, OverlayView, RuleView};

/// The underlay, as the dashboards name it.
pub const DIRECT: &str = "DIRECT";
/// The group dashboards read the order of everything from.
pub const GLOBAL: &str = "GLOBAL";

/// A carrier's name in the API: the underlay is `DIRECT`.
pub fn carrier(name: &str) -> String {
    if name == "underlay" {
        DIRECT.into()
    } else {
        name.into()
    }
}

/// A carrier's name as the daemon knows it.
pub fn daemon_carrier(name: &str) -> String {
    if name == DIRECT {
        "underlay".into()
    } else {
        name.into()
    }
}

/// A metric rule's group name, e.g. `rule 3 (latency)`.
pub fn group_name(rule: &RuleView) -> String {
    format!("rule {} ({})", rule.id, rule.via.trim_start_matches("monitor: "))
}

/// The rule id a group name stands for.
pub fn group_rule(name: &str, rules: &[RuleView]) -> Option<u32> {
    rules
        .iter()
        .find(|r| r.candidates.is_some() && group_name(r) == name)
        .map(|r| r.id)
}

/// Delays measured per carrier, oldest first, as `history` shows them.
#[derive(Clone, Debug, Default)]
pub struct History {
    samples: HashMap<String, VecDeque<(SystemTime, u32)>>,
}

/// Samples a carrier keeps.
const HISTORY: usize = 10;

impl History {
    pub fn record(&mut self, carrier: &str, at: SystemTime, delay_ms: u32) {
        let samples = self.samples.entry(carrier.to_string()).or_default();
        if samples.len() == HISTORY {
            samples.pop_front();
        }
        samples.push_back((at, delay_ms));
    }

    /// Takes the Monitor's round trips: each carrier's best smoothed round
    /// trip over its measured paths, once per call.
    pub fn sample(&mut self, monitor: &MonitorView, at: SystemTime) {
        for (carrier, ms) in best_rtts(monitor) {
            self.record(&carrier, at, ms.round().max(1.0) as u32);
        }
    }

    fn of(&self, carrier: &str) -> Value {
        let samples = self.samples.get(carrier).into_iter().flatten();
        Value::Array(
            samples
                .map(|(at, delay)| json!({"time": rfc3339(*at), "delay": delay}))
                .collect(),
        )
    }
}

/// Each carrier's lowest smoothed round trip in the Monitor's figures, in
/// milliseconds (by the daemon's carrier names).
pub fn best_rtts(monitor: &MonitorView) -> BTreeMap<String, f64> {
    let mut best = BTreeMap::new();
    for path in &monitor.paths {
        if let Some(ms) = path.srtt_ms {
            best.entry(path.carrier.clone())
                .and_modify(|b: &mut f64| *b = b.min(ms))
                .or_insert(ms);
        }
    }
    best
}

pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// `GET /proxies`: `DIRECT`, each overlay, each metric rule's group, and
/// `GLOBAL` listing them all.
pub fn proxies(
    overlays: &[OverlayView],
    rules: &[RuleView],
    monitor: &MonitorView,
    history: &History,
) -> Value {
    let up: HashMap<&str, bool> = monitor.carriers.iter().map(|c| (c.name.as_str(), c.up)).collect();
    let alive = |name: &str| up.get(name).copied().unwrap_or(true);
    let mut proxies = serde_json::Map::new();
    let mut all = vec![DIRECT.to_string()];
    proxies.insert(
        DIRECT.into(),
        proxy(
            DIRECT,
            "Direct",
            alive("underlay"),
            history.of("underlay"),
            json!({}),
        ),
    );
    for overlay in overlays {
        let kind = if overlay.wireguard.is_some() {
            "WireGuard"
        } else {
            "Oasis"
        };
        let extra = json!({
            "oasis": {
                "entries": overlay.entries,
                "rules": overlay.rules,
                "live_flows": overlay.live_flows,
                "pinned": overlay.pinned,
                "module": overlay.module_status.as_ref().map(|m| format!("{m:?}")),
            }
        });
        let mut entry = proxy(
            &overlay.name,
            kind,
            alive(&overlay.name),
            history.of(&overlay.name),
            extra,
        );
        entry["udp"] = json!(true);
        proxies.insert(overlay.name.clone(), entry);
        all.push(overlay.name.clone());
    }
    let pins: HashMap<u32, &str> = monitor.pins.iter().map(|(rule, c)| (*rule, c.as_str())).collect();
    for rule in rules {
        let Some(candidates) = &rule.candidates else {
            continue;
        };
        let name = group_name(rule);
        let now = pins
            .get(&rule.id)
            .map(|c| c.to_string())
            .or_else(|| latest_choice(monitor, rule.id))
            .unwrap_or_else(|| "underlay".into());
        let mut group = proxy(
            &name,
            "URLTest",
            true,
            history.of(&now),
            json!({"oasis": {"rule": rule.id, "metric": rule.via, "pinned": pins.contains_key(&rule.id)}}),
        );
        group["now"] = json!(carrier(&now));
        group["all"] = json!(candidates.iter().map(|c| carrier(c)).collect::<Vec<_>>());
        group["fixed"] = json!(pins.get(&rule.id).map(|c| carrier(c)).unwrap_or_default());
        group["testUrl"] = json!("");
        proxies.insert(name.clone(), group);
        all.push(name);
    }
    let mut global = proxy(GLOBAL, "Selector", true, json!([]), json!({}));
    global["now"] = json!(DIRECT);
    // Groups first: the dashboards show GLOBAL's order.
    all.sort_by_key(|n| !n.starts_with("rule "));
    global["all"] = json!(all);
    proxies.insert(GLOBAL.into(), global);
    json!({ "proxies": proxies })
}

/// The carrier of a metric rule's most recent decision.
fn latest_choice(monitor: &MonitorView, rule: u32) -> Option<String> {
    monitor
        .decisions
        .iter()
        .filter(|d| d.rule == rule)
        .min_by(|a, b| a.since_secs.total_cmp(&b.since_secs))
        .map(|d| d.carrier.clone())
}

fn proxy(name: &str, kind: &str, alive: bool, history: Value, extra: Value) -> Value {
    json!({
        "name": name,
        "type": kind,
        "alive": alive,
        "history": history,
        "extra": extra,
        "udp": kind == "Direct",
        "xudp": false,
        "tfo": false,
        "mptcp": false,
        "smux": false,
        "interface": "",
        "dialer-proxy": "",
        "routing-mark": 0,
        "provider-name": "",
        "id": name,
    })
}

/// `GET /rules`: hits are the kernel's per-rule packet counters (every
/// packet the rule claimed, in the kernel or not), or for a name rule the
/// DNS answers it gave.
pub fn rules(rules: &[RuleView]) -> Value {
    let list: Vec<Value> = rules
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let hits = rule.answers.unwrap_or(rule.packets);
            let proxy = match &rule.candidates {
                Some(_) => group_name(rule),
                None => carrier(&rule.via),
            };
            json!({
                "index": index,
                "type": rule_type(rule),
                "payload": rule.subset,
                "proxy": proxy,
                "size": rule.list.as_ref().map_or(-1, |l| l.entries as i64),
                "extra": {
                    "disabled": false,
                    "hitCount": hits,
                    "hitAt": "",
                    "missCount": 0,
                    "missAt": "",
                    "oasis": {"id": rule.id, "packets": rule.packets, "bytes": rule.bytes, "answers": rule.answers},
                },
            })
        })
        .collect();
    json!({ "rules": list })
}

/// A rule's type in Clash's words, where one fits.
fn rule_type(rule: &RuleView) -> &'static str {
    let first = rule.subset.split_whitespace().next().unwrap_or("");
    match (rule.name_rule, first) {
        (true, "name-suffix") => "DomainSuffix",
        (true, "name") => "Domain",
        (true, "name-keyword") => "DomainKeyword",
        (true, "name-regex") => "DomainRegex",
        (true, _) => "DomainSet",
        (false, _) if rule.list.is_some() => "IPSet",
        (false, _) => "Oasis",
    }
}

/// Names by fake address, from the fake-address table.
pub type Hosts = HashMap<IpAddr, String>;

/// One flow in Clash's connection shape. Typed, and written straight to
/// text: ten thousand of them are six megabytes, which a tree of JSON
/// values would take ten times as long to build.
#[derive(serde::Serialize)]
pub struct Connection<'a> {
    id: &'a str,
    metadata: Metadata<'a>,
    upload: u64,
    download: u64,
    start: String,
    chains: [String; 2],
    rule: &'a str,
    #[serde(rename = "rulePayload")]
    rule_payload: &'a str,
    oasis: Extra<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Metadata<'a> {
    network: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "sourceIP")]
    source_ip: String,
    #[serde(rename = "destinationIP")]
    destination_ip: String,
    source_port: String,
    destination_port: String,
    #[serde(rename = "inboundIP")]
    inbound_ip: &'static str,
    inbound_port: &'static str,
    inbound_name: &'static str,
    inbound_user: &'static str,
    host: &'a str,
    dns_mode: &'static str,
    uid: u32,
    process: &'a str,
    process_path: &'a str,
    special_proxy: &'static str,
    special_rules: &'static str,
    remote_destination: String,
    sniff_host: &'static str,
}

#[derive(serde::Serialize)]
struct Extra<'a> {
    why: Option<&'a str>,
    fake: Option<&'a str>,
    in_kernel: bool,
    packets: u64,
    idle_secs: f64,
}

pub fn connection<'a>(
    flow: &'a FlowView,
    hosts: &'a Hosts,
    rules: &HashMap<u32, &'a RuleView>,
    now: SystemTime,
) -> Connection<'a> {
    let network = match flow.proto {
        6 => "tcp",
        17 => "udp",
        1 | 58 => "icmp",
        _ => "ip",
    };
    let fake: Option<IpAddr> = flow.fake.as_deref().and_then(|f| f.parse().ok());
    let host = fake.and_then(|f| hosts.get(&f)).map_or("", String::as_str);
    let rule = flow.rule.and_then(|id| rules.get(&id).copied());
    let rule_label = rule.map_or_else(|| "Match".to_string(), |r| format!("rule {}", r.id));
    let start = now
        .checked_sub(Duration::from_secs_f64(flow.age_secs.max(0.0)))
        .unwrap_or(now);
    let sender = flow.sender.as_ref();
    Connection {
        id: &flow.id,
        metadata: Metadata {
            network,
            kind: "Oasis",
            source_ip: flow.src.ip().to_string(),
            destination_ip: flow.dst.ip().to_string(),
            source_port: flow.src.port().to_string(),
            destination_port: flow.dst.port().to_string(),
            inbound_ip: "",
            inbound_port: "",
            inbound_name: "",
            inbound_user: "",
            host,
            dns_mode: if fake.is_some() { "fake-ip" } else { "normal" },
            uid: sender.map_or(0, |s| s.uid),
            process: sender.and_then(|s| s.app.as_deref()).unwrap_or(""),
            process_path: sender.and_then(|s| s.cgroup.as_deref()).unwrap_or(""),
            special_proxy: "",
            special_rules: "",
            remote_destination: flow.dst.ip().to_string(),
            sniff_host: "",
        },
        upload: 0,
        download: 0,
        start: rfc3339(start),
        chains: [carrier(&flow.carrier), rule_label],
        rule: rule.map_or("Match", rule_type),
        rule_payload: rule.map_or("", |r| r.subset.as_str()),
        oasis: Extra {
            why: flow.why.as_deref(),
            fake: flow.fake.as_deref(),
            in_kernel: flow.in_kernel,
            packets: flow.packets,
            idle_secs: flow.idle_secs,
        },
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Connections<'a> {
    download_total: u64,
    upload_total: u64,
    connections: Vec<Connection<'a>>,
    memory: u64,
}

/// `GET /connections` as text: every live flow. Byte totals are the
/// claimed traffic the kernel counted, by rule.
pub fn connections(
    flows: &[FlowView],
    hosts: &Hosts,
    rules: &[RuleView],
    memory: u64,
    now: SystemTime,
) -> String {
    let by_id: HashMap<u32, &RuleView> = rules.iter().map(|r| (r.id, r)).collect();
    let all = Connections {
        download_total: 0,
        upload_total: rules.iter().map(|r| r.bytes).sum(),
        connections: flows.iter().map(|f| connection(f, hosts, &by_id, now)).collect(),
        memory,
    };
    serde_json::to_string(&all).unwrap_or_else(|e| format!(r#"{{"message":"{e}"}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{CarrierView, DecisionView, PathView, SenderView};

    fn rule(id: u32, subset: &str, via: &str, candidates: Option<Vec<&str>>) -> RuleView {
        RuleView {
            id,
            subset: subset.into(),
            via: via.into(),
            name_rule: subset.starts_with("name"),
            packets: 40,
            bytes: 4000,
            answers: subset.starts_with("name").then_some(3),
            list: None,
            candidates: candidates.map(|c| c.into_iter().map(String::from).collect()),
        }
    }

    fn overlay(name: &str) -> OverlayView {
        OverlayView {
            name: name.into(),
            ..OverlayView::default()
        }
    }

    #[test]
    fn proxies_name_the_underlay_direct_and_each_metric_rule_a_group() {
        let rules = vec![
            rule(1, "tcp dport 443", "detour", None),
            rule(
                2,
                "dst 203.0.113.0/24",
                "latency",
                Some(vec!["underlay", "detour"]),
            ),
        ];
        let monitor = MonitorView {
            carriers: vec![CarrierView {
                name: "detour".into(),
                up: false,
                ..CarrierView::default()
            }],
            paths: vec![PathView {
                carrier: "detour".into(),
                srtt_ms: Some(12.4),
                ..PathView::default()
            }],
            decisions: vec![DecisionView {
                rule: 2,
                carrier: "detour".into(),
                since_secs: 3.0,
                ..DecisionView::default()
            }],
            ..MonitorView::default()
        };
        let mut history = History::default();
        history.sample(&monitor, SystemTime::UNIX_EPOCH);
        let shown = proxies(&[overlay("detour")], &rules, &monitor, &history);
        let all = &shown["proxies"];
        assert_eq!(all["DIRECT"]["type"], "Direct");
        assert_eq!(all["detour"]["type"], "Oasis");
        assert_eq!(all["detour"]["alive"], false);
        assert_eq!(all["detour"]["history"][0]["delay"], 12);
        assert_eq!(all["detour"]["history"][0]["time"], "1970-01-01T00:00:00.000Z");
        let group = &all["rule 2 (latency)"];
        assert_eq!(group["type"], "URLTest");
        assert_eq!(group["now"], "detour");
        assert_eq!(group["all"], json!(["DIRECT", "detour"]));
        assert_eq!(
            all["GLOBAL"]["all"],
            json!(["rule 2 (latency)", "DIRECT", "detour"])
        );
        assert_eq!(group_rule("rule 2 (latency)", &rules), Some(2));
        assert_eq!(group_rule("rule 1 (detour)", &rules), None, "not a metric rule");
        // A pin wins over the latest decision.
        let pinned = MonitorView {
            pins: vec![(2, "underlay".into())],
            ..monitor
        };
        let shown = proxies(&[overlay("detour")], &rules, &pinned, &history);
        assert_eq!(shown["proxies"]["rule 2 (latency)"]["now"], "DIRECT");
        assert_eq!(shown["proxies"]["rule 2 (latency)"]["fixed"], "DIRECT");
    }

    #[test]
    fn rules_carry_the_kernels_hits_and_a_clash_type() {
        let shown = rules(&[
            rule(1, "tcp dport 443", "underlay", None),
            rule(2, "name-suffix example.org", "detour", None),
        ]);
        let list = shown["rules"].as_array().unwrap();
        assert_eq!(list[0]["proxy"], "DIRECT");
        assert_eq!(list[0]["extra"]["hitCount"], 40);
        assert_eq!(list[0]["size"], -1);
        assert_eq!(list[1]["type"], "DomainSuffix");
        assert_eq!(
            list[1]["extra"]["hitCount"], 3,
            "a name rule's hits are its answers"
        );
    }

    #[test]
    fn a_connection_has_string_ports_its_host_and_a_carrier_rule_chain() {
        let flow = FlowView {
            id: "abc".into(),
            flow: "tcp 10.0.0.2:40000 -> 203.0.113.9:443".into(),
            proto: 6,
            src: "10.0.0.2:40000".parse().unwrap(),
            dst: "203.0.113.9:443".parse().unwrap(),
            rule: Some(2),
            carrier: "underlay".into(),
            fake: Some("198.18.0.5".into()),
            age_secs: 2.0,
            sender: Some(SenderView {
                uid: 1000,
                cgroup: Some("/user.slice".into()),
                app: Some("curl".into()),
            }),
            ..FlowView::default()
        };
        let hosts = Hosts::from([("198.18.0.5".parse().unwrap(), "www.example.org".to_string())]);
        let rules = vec![rule(2, "name-suffix example.org", "underlay", None)];
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let shown: Value = serde_json::from_str(&connections(&[flow], &hosts, &rules, 5, now)).unwrap();
        let c = &shown["connections"][0];
        assert_eq!(c["metadata"]["sourcePort"], "40000");
        assert_eq!(c["metadata"]["destinationPort"], "443");
        assert_eq!(c["metadata"]["host"], "www.example.org");
        assert_eq!(c["metadata"]["dnsMode"], "fake-ip");
        assert_eq!(c["metadata"]["process"], "curl");
        assert_eq!(c["chains"], json!(["DIRECT", "rule 2"]));
        assert_eq!(c["rule"], "DomainSuffix");
        assert_eq!(c["start"], "1970-01-01T00:00:08.000Z");
        assert_eq!(shown["uploadTotal"], 4000);
        assert_eq!(shown["memory"], 5);
    }
}
