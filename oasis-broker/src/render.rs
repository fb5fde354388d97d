//! Plain-text views for people; `--json` prints the same data for scripts.

use std::fmt::Write as _;

use crate::control::{DnsTableView, FlowView, MonitorView, OverlayView, RuleView, StatusView};

/// 1234567 -> "1.2 MB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// A list rule's list in a line: its entries, age, interval, last error.
fn list_line(list: &crate::control::ListView) -> String {
    let ago = |secs: u64| match secs {
        0..60 => format!("{secs} s ago"),
        60..7200 => format!("{} min ago", secs / 60),
        7200..172_800 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    };
    let mut line = match list.fetched_secs_ago {
        Some(secs) => format!(
            "{} {}: {} entries, current {}, fetched every {}",
            list.kind,
            list.url,
            list.entries,
            ago(secs),
            list.every
        ),
        None => format!("{} {}: never fetched, claims nothing yet", list.kind, list.url),
    };
    if let Some(error) = &list.error {
        let when = list.checked_secs_ago.map(ago).unwrap_or_default();
        let _ = write!(
            line,
            "; last refresh failed {when} (the last good copy stays in effect): {error}"
        );
    }
    line
}

pub fn rule_table(rules: &[RuleView]) -> String {
    if rules.is_empty() {
        return "No rules. Add one with `oasis rule add`, e.g.\n  oasis rule add --proto tcp --dport 8080 --via underlay\n  oasis rule add --name-suffix example.org --via underlay\n".into();
    }
    let width = rules
        .iter()
        .map(|r| r.subset.len())
        .max()
        .unwrap_or(0)
        .max("SUBSET".len());
    let via_width = rules
        .iter()
        .map(|r| r.via.len())
        .max()
        .unwrap_or(0)
        .max("VIA".len());
    // Name rules count DNS answers, header rules packets.
    let names = rules.iter().any(|r| r.answers.is_some());
    let mut out = format!(
        "{:>4}  {:<width$}  {:<via_width$}  {:>10}  {:>10}",
        "ID", "SUBSET", "VIA", "PACKETS", "BYTES"
    );
    if names {
        out.push_str(&format!("  {:>8}", "ANSWERS"));
    }
    out.push('\n');
    for rule in rules {
        let (packets, bytes, answers) = match rule.answers {
            Some(answers) => ("-".to_string(), "-".to_string(), answers.to_string()),
            None => (rule.packets.to_string(), bytes(rule.bytes), "-".to_string()),
        };
        let _ = write!(
            out,
            "{:>4}  {:<width$}  {:<via_width$}  {:>10}  {:>10}",
            rule.id, rule.subset, rule.via, packets, bytes
        );
        if names {
            let _ = write!(out, "  {answers:>8}");
        }
        out.push('\n');
        if let Some(list) = &rule.list {
            let _ = writeln!(out, "      {}", list_line(list));
        }
    }
    out
}

pub fn dns_table(table: &DnsTableView) -> String {
    let mut out = String::new();
    if !table.enabled {
        out.push_str("DNS interception is off (dns.enabled: false in the config file).\n");
    }
    if table.entries.is_empty() {
        out.push_str("No fake addresses given out. Add a name rule, e.g.\n  oasis rule add --name-suffix example.org --via detour\n");
        return out;
    }
    let width = |f: &dyn Fn(&crate::control::FakeView) -> usize, title: &str| {
        table.entries.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let name_w = width(&|e| e.name.len(), "NAME");
    let fake_w = width(&|e| e.fake.len(), "FAKE");
    let real_w = width(&|e| e.real.join(",").len(), "REAL");
    let via_w = width(&|e| e.carrier.len(), "CARRIER");
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<fake_w$}  {:<real_w$}  {:<via_w$}  {:>6}  {:>8}",
        "NAME", "FAKE", "REAL", "CARRIER", "FLOWS", "IDLE"
    );
    for e in &table.entries {
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<fake_w$}  {:<real_w$}  {:<via_w$}  {:>6}  {:>8}",
            e.name,
            e.fake,
            e.real.join(","),
            e.carrier,
            e.live_flows,
            duration(e.idle_secs)
        );
    }
    out
}

pub fn status(s: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "daemon      running, pid {}, up {}",
        s.pid,
        duration(s.uptime_secs)
    );
    let saved = match (&s.config_error, s.config_saved) {
        (Some(error), _) => format!("NOT SAVED: {error}"),
        (None, true) => "saved".into(),
        (None, false) => "being written".into(),
    };
    let _ = writeln!(out, "config      {} ({saved})", s.config_path.display());
    for (id, list) in &s.lists {
        let _ = writeln!(out, "list        rule {id}: {}", list_line(list));
    }
    let health = if s.heartbeat.alive {
        "alive"
    } else {
        "STALE: the classifier is passing all traffic"
    };
    let _ = writeln!(
        out,
        "heartbeat   {} ms ago, fail-open after {} ms: {health}",
        s.heartbeat.age_ms, s.heartbeat.timeout_ms
    );
    let uplinks: Vec<String> = s
        .uplinks
        .iter()
        .map(|u| format!("{} (ifindex {}, {})", u.name, u.ifindex, u.attach))
        .collect();
    let _ = writeln!(
        out,
        "uplinks     {}",
        if uplinks.is_empty() {
            "none".into()
        } else {
            uplinks.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "tun         {} (ifindex {}, {} queue{}): {} packets, {} diverted to the broker",
        s.tun.name,
        s.tun.ifindex,
        s.tun.queues,
        if s.tun.queues == 1 { "" } else { "s" },
        s.tun.diverted_packets,
        bytes(s.tun.diverted_bytes)
    );
    if s.tun.read_per_queue.len() > 1 {
        let reads: Vec<String> = s.tun.read_per_queue.iter().map(u64::to_string).collect();
        let _ = writeln!(out, "            read per queue: {} packets", reads.join(", "));
    }
    let _ = writeln!(out, "rules       {} (see `oasis rule list`)", s.rules);
    let c = &s.classifier;
    let _ = writeln!(
        out,
        "classifier  {}: {} matched against rules, {} from the flow cache ({} flows cached), {} diverted",
        s.program.name, c.classified, c.cache_hits, c.cached_flows, c.diverted
    );
    let _ = writeln!(
        out,
        "            {} broker packets bypassed, {} passed while fail-open, {} not IP or truncated",
        c.bypassed, c.fail_open, c.unparsed
    );
    let b = &s.broker;
    let _ = writeln!(
        out,
        "broker      {} packets received, {} sent on the underlay, {} into overlays, {} live flows",
        b.received, b.sent_underlay, b.sent_overlay, b.flows
    );
    let _ = writeln!(
        out,
        "            dropped: {} send errors, {} malformed, {} unroutable, {} without carrier; \
         {} too big for their overlay's path (the sender told the MTU)",
        b.send_errors, b.malformed, b.unroutable, b.no_carrier, b.too_big
    );
    let _ = writeln!(
        out,
        "overlays    {} joined, standard port {}: {} packets returned to this host; \
         dropped {} from unknown senders, {} not for this host, {} for no live flow, \
         {} WireGuard datagrams that failed to authenticate; \
         {} live flows taken up again after a restart",
        s.overlays,
        s.overlay_port,
        b.overlay_received,
        b.rejected_sender,
        b.rejected_destination,
        b.returned_for_no_flow,
        b.unauthenticated,
        b.flows_adopted
    );
    if s.fast_path {
        let _ = writeln!(
            out,
            "            fast path: {} flows wrapped in the kernel; {} packets ({}) out, {} packets ({}) in; \
             left to the broker: {} too big, {} without room, {} aggregates",
            s.fast_path_flows,
            c.encap_packets,
            bytes(c.encap_bytes),
            c.decap_packets,
            bytes(c.decap_bytes),
            c.fast_too_big,
            c.fast_no_room,
            c.fast_aggregate
        );
    } else {
        let _ = writeln!(
            out,
            "            fast path: off (overlay_fast_path: false): every packet of an overlay flow crosses the broker"
        );
    }
    let _ = writeln!(
        out,
        "            underlay port {} (modules only): dropped {} from other senders",
        s.underlay_port, b.rejected_module_sender
    );
    status_dns(&mut out, s);
    status_monitor(&mut out, s);
    let costs: Vec<String> = s
        .programs
        .iter()
        .filter(|p| p.run_count > 0)
        .map(|p| format!("{} ({}) {} ns", p.name, p.hook, p.run_time_ns / p.run_count))
        .collect();
    if !costs.is_empty() {
        let _ = writeln!(out, "programs    per run: {}", costs.join(", "));
    }
    let maps: Vec<String> = s
        .program
        .maps
        .iter()
        .map(|m| format!("{} ({} {})", m.name, m.kind, m.max_entries))
        .collect();
    let _ = writeln!(out, "maps        {}", maps.join(", "));
    out
}

/// The DNS lines of `oasis status`.
fn status_dns(out: &mut String, s: &StatusView) {
    match &s.dns {
        None => {
            let _ = writeln!(out, "dns         off: name rules have no effect");
        }
        Some(d) => {
            let _ = writeln!(
                out,
                "dns         queries to port 53 from cgroup {} answered on {}, upstream {}",
                d.cgroup.display(),
                d.listen.join(" and "),
                d.upstreams.join(", ")
            );
            let q = &d.counters;
            let _ = writeln!(
                out,
                "            {} queries: {} fake, {} passed, {} withheld, {} negative, {} servfail, {} truncated, {} refused",
                q.queries, q.faked, q.passed, q.empty, q.negative, q.servfail, q.truncated, q.refused
            );
            if q.reused > 0 || q.explicit > 0 {
                let _ = writeln!(
                    out,
                    "            {} answered again from kept answers; {} sent to servers of the application's choosing",
                    q.reused, q.explicit
                );
            }
            if q.monitor_real > 0 {
                let _ = writeln!(
                    out,
                    "            {} names of metric rules answered truly: the Monitor leaves their flows on the underlay",
                    q.monitor_real
                );
            }
            let _ = writeln!(
                out,
                "fake pool   {} and {}: {} of {} addresses given out, {} exhausted; {} flows, {} of them in the kernel",
                d.fake_v4,
                d.fake_v6,
                d.fake_entries,
                d.fake_capacity,
                q.exhausted,
                d.fake_flows,
                d.kernel_nat_flows
            );
            let c = &s.classifier;
            let _ = writeln!(
                out,
                "            kernel NAT: {} packets out, {} in; {} first packets to the broker, {} to unknown fakes",
                c.nat_egress, c.nat_ingress, c.fake_diverted, d.unknown_fake_packets
            );
        }
    }
}

/// The Monitor's lines of `oasis status`.
fn status_monitor(out: &mut String, s: &StatusView) {
    let b = &s.broker;
    if let Some(m) = &s.monitor {
        let _ = writeln!(
            out,
            "monitor     {} metric rules, {} decisions; probes {} B/s of {} B/s allowed ({} sent, at most {}/s); {} flows measured in the kernel",
            m.rules,
            m.decisions,
            m.probe_bytes_per_second.round(),
            m.probe_bytes_per_second_limit,
            m.probes_sent,
            m.probes_per_second_limit,
            m.measured_in_kernel
        );
        let down = if m.carriers_down.is_empty() {
            "none".to_string()
        } else {
            m.carriers_down.join(", ")
        };
        let _ = writeln!(
            out,
            "            carriers up: {}; down: {down}",
            m.carriers_up.join(", ")
        );
        for switch in &m.switches {
            let _ = writeln!(
                out,
                "            {} ago: rule {} {} {} -> {} ({})",
                duration(switch.ago_secs as u64),
                switch.rule,
                switch.prefix,
                switch.from,
                switch.to,
                switch.why
            );
        }
        let c = &s.classifier;
        let _ = writeln!(
            out,
            "            kernel measurement: {} packets out, {} in, {} measurements lost; {} connections rescued",
            c.measured_egress, c.measured_ingress, c.events_lost, b.rescued
        );
        if let (Some(p50), Some(p99)) = (b.decision_p50_us, b.decision_p99_us) {
            let _ = writeln!(
                out,
                "            {} new flows decided: {p50:.1} µs at the median, {p99:.1} µs at the 99th percentile",
                b.monitor_decisions
            );
        }
    }
}

pub fn overlay_table(overlays: &[OverlayView]) -> String {
    if overlays.is_empty() {
        return "No overlays joined. Join one with `oasis overlay add NAME URL`.\n".into();
    }
    let width = overlays
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(0)
        .max("NAME".len());
    let mut out = format!(
        "{:<width$}  {:>7}  {:>10}  {:>10}  {:<8}  URL\n",
        "NAME", "ENTRIES", "SENT", "RECEIVED", "RULES"
    );
    for o in overlays {
        let rules: Vec<String> = o.rules.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>10}  {:>10}  {:<8}  {}",
            o.name,
            o.entries.len(),
            o.packets_sent,
            o.packets_received,
            if rules.is_empty() {
                "-".into()
            } else {
                rules.join(",")
            },
            o.url
        );
    }
    out
}

fn wireguard(out: &mut String, wg: &crate::control::WireGuardView, pinned: bool) {
    let _ = writeln!(out, "wireguard   our public key {}", wg.public_key);
    let _ = writeln!(
        out,
        "            tunnel address {}{}{}",
        wg.tunnel_addresses.join(", "),
        wg.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default(),
        if wg.dns.is_empty() {
            String::new()
        } else {
            format!(", DNS {}", wg.dns.join(", "))
        }
    );
    let _ = writeln!(out, "            keys kept in {} (mode 0600)", wg.key_file);
    for peer in &wg.peers {
        let _ = writeln!(out, "peer        {} at {}", peer.public_key, peer.endpoint);
        let _ = writeln!(out, "            allowed {}", peer.allowed_ips.join(", "));
        let handshake = match peer.last_handshake_secs {
            Some(secs) => format!("last handshake {secs} s ago"),
            None => "no handshake yet".into(),
        };
        let _ = writeln!(out, "            {}; {handshake}", peer.state);
        let _ = writeln!(
            out,
            "            {} sent, {} received; {} handshakes; {} datagrams refused (forged or replayed)",
            bytes(peer.tx_bytes),
            bytes(peer.rx_bytes),
            peer.handshakes,
            peer.rejected
        );
    }
    if pinned {
        let _ = writeln!(
            out,
            "            pinned: flows wait for the peer rather than take the underlay"
        );
    }
}

pub fn overlay(o: &OverlayView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "name        {}", o.name);
    let _ = writeln!(out, "url         {}", o.url);
    if let Some(name) = &o.spec_name {
        let _ = writeln!(out, "spec name   {name}");
    }
    if let Some(description) = &o.description {
        let _ = writeln!(out, "about       {description}");
    }
    let resolved = if o.resolved.is_empty() {
        "(not resolved: this overlay carries nothing)".to_string()
    } else {
        o.resolved.join(", ")
    };
    if o.module_status.is_some() {
        // The table's peer is the module's own port: the entry nodes are
        // the module's to reach.
        let _ = writeln!(
            out,
            "entries     {} (reached by its module, on {})",
            o.entries.join(", "),
            resolved
        );
    } else {
        let _ = writeln!(out, "entries     {} -> {}", o.entries.join(", "), resolved);
    }
    if let Some(wg) = &o.wireguard {
        wireguard(&mut out, wg, o.pinned);
    } else {
        let _ = writeln!(
            out,
            "shim        {} bytes{}",
            o.shim_len,
            if o.token { ", carrying your token" } else { "" }
        );
    }
    if let Some(module) = &o.module {
        let _ = writeln!(
            out,
            "module      {:?} {} (sha256 {})",
            module.kind, module.url, module.sha256
        );
    }
    if let Some(m) = &o.module_status {
        // A monitor module's far side is the joined overlays.
        let monitor = o
            .module
            .as_ref()
            .is_some_and(|m| m.kind == crate::overlay::ModuleKind::Monitor);
        let (far, unknown) = match monitor {
            true => ("over overlays", "overlays not joined"),
            false => ("to entry nodes", "undeclared entries"),
        };
        let _ = writeln!(
            out,
            "            {}; {} restarts{}; {}",
            m.state,
            m.restarts,
            m.last_stop
                .as_ref()
                .map(|why| format!(" (last: {why})"))
                .unwrap_or_default(),
            m.compile
        );
        let _ = writeln!(
            out,
            "            packets: {} from this host, {} {far}, {} from them, {} back to this host, \
             {} to the underlay; {} dropped while down",
            m.from_host, m.to_entries, m.from_entries, m.to_host, m.to_underlay, m.dropped_while_down
        );
        let r = &m.refusals;
        let _ = writeln!(
            out,
            "            refused: {} sends to {unknown}, {} over the per-event budget, {} bad buffers, \
             {} log lines; {} datagrams from strangers",
            r.bad_entry, r.over_budget, r.bad_buffer, r.log_dropped, m.refused_senders
        );
        let c = &m.confined;
        let via = if monitor {
            format!("{} over overlays, ", c.via)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "            {} live flows handed to it; refused: packets of flows it was not handed \
             ({via}{} to the underlay), {} not answering them to this host, {} datagrams {far} \
             past its byte budget",
            m.flows, c.to_underlay, c.to_host, c.over_rate
        );
        if o.pinned {
            let _ = writeln!(
                out,
                "            pinned: flows wait for the module rather than take the underlay"
            );
        }
    }
    let rules: Vec<String> = o.rules.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "rules       {}",
        if rules.is_empty() {
            "none".into()
        } else {
            rules.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "traffic     {} packets sent, {} received; {} live flows",
        o.packets_sent, o.packets_received, o.live_flows
    );
    if let Some(mtu) = o.path_mtu {
        let _ = writeln!(out, "path MTU    {mtu} (new flows' MSS fits it)");
    }
    out
}

fn figure(value: Option<f64>, unit: &str, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}{unit}"))
}

pub fn monitor(m: &MonitorView) -> String {
    let mut out = String::new();
    if m.rules == 0 {
        out.push_str(
            "No metric rules: the Monitor measures nothing. Add one, e.g.\n  \
             oasis rule add --proto tcp --dport 443 --metric latency\n",
        );
        return out;
    }
    let _ = writeln!(
        out,
        "Probes: {:.0} B/s now, at most {} B/s and {} probes/s; {} sent ({}) since the start; {} measurements lost to a full queue",
        m.probe_bytes_per_second,
        m.probe_bytes_per_second_limit,
        m.probes_per_second_limit,
        m.probes_sent,
        bytes(m.probe_bytes_sent),
        m.events_dropped
    );
    out.push_str("\nCARRIER      STATE  LAST ANSWER  PROBE B/s  DOWNS\n");
    for c in &m.carriers {
        let state = if c.up { "up" } else { "DOWN" };
        let _ = write!(
            out,
            "{:<12} {:<5}  {:>11}  {:>9.0}  {:>5}",
            c.name,
            state,
            c.last_answer_secs
                .map_or_else(|| "-".into(), |s| format!("{s:.1}s ago")),
            c.probe_bytes_per_second,
            c.downs
        );
        if let (Some(reason), Some(secs)) = (&c.down_reason, c.down_secs) {
            let _ = write!(out, "  ({reason}, for {})", duration(secs as u64));
        }
        out.push('\n');
    }
    if !m.paths.is_empty() {
        out.push_str("\nPREFIX               CARRIER       SRTT ms  MIN ms  RTTVAR  SAMPLES  LOSS       GOODPUT      AGE\n");
        for p in &m.paths {
            let loss = p
                .loss_percent
                .map_or_else(|| "-".into(), |l| format!("{l:.2}%/{}", p.loss_samples));
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:>8} {:>7} {:>7} {:>8}  {:<10} {:>11}  {:>5}",
                p.prefix,
                p.carrier,
                figure(p.srtt_ms, "", 1),
                figure(p.min_rtt_ms, "", 1),
                figure(p.rttvar_ms, "", 1),
                p.rtt_samples,
                loss,
                figure(p.goodput_mbps, " Mb/s", 1),
                p.age_secs.map_or_else(|| "-".into(), |a| duration(a as u64)),
            );
        }
    }
    if m.decisions.is_empty() {
        out.push_str("\nNo decisions yet: no flow of a metric rule has started.\n");
    } else {
        out.push_str("\nDecisions (new flows of each rule, per destination prefix):\n");
        for d in &m.decisions {
            let _ = writeln!(
                out,
                "  rule {} {} ({}): {} since {}, {}",
                d.rule,
                d.prefix,
                d.metric,
                d.carrier,
                duration(d.since_secs as u64),
                d.why
            );
            let _ = writeln!(out, "      now: {}", d.comparison);
            if let Some(challenger) = &d.challenger {
                let _ = writeln!(
                    out,
                    "      {challenger}; held at least {}",
                    duration(d.hold_secs as u64)
                );
            }
        }
    }
    if !m.switches.is_empty() {
        out.push_str("\nRecent switches:\n");
        for s in &m.switches {
            let _ = writeln!(
                out,
                "  {} ago  rule {} {}: {} -> {} ({})",
                duration(s.ago_secs as u64),
                s.rule,
                s.prefix,
                s.from,
                s.to,
                s.why
            );
        }
    }
    out
}

pub fn flows(flows: &[FlowView]) -> String {
    if flows.is_empty() {
        return "No live flows: no diverted flow has been active lately.\n".into();
    }
    let width = flows.iter().map(|f| f.flow.len()).max().unwrap_or(0).max(4);
    let carrier_width = flows.iter().map(|f| f.carrier.len()).max().unwrap_or(0).max(7);
    let mut out = format!(
        "{:<8}  {:<width$}  {:>4}  {:<carrier_width$}  {:>7}  {:>6}  {:>8}  WHY\n",
        "ID", "FLOW", "RULE", "CARRIER", "AGE", "IDLE", "PACKETS"
    );
    for f in flows {
        let mut why = f.why.clone().unwrap_or_default();
        if f.in_kernel {
            why = if why.is_empty() {
                "in the kernel".into()
            } else {
                format!("{why}; in the kernel")
            };
        }
        if let Some(fake) = &f.fake {
            why = format!("{why} (fake {fake})").trim_start().to_string();
        }
        // The id's start: `oasis flows --end` takes any unique prefix.
        let _ = writeln!(
            out,
            "{:<8}  {:<width$}  {:>4}  {:<carrier_width$}  {:>7}  {:>6}  {:>8}  {}",
            f.id.get(..8).unwrap_or(&f.id),
            f.flow,
            f.rule.map_or_else(|| "-".into(), |r| r.to_string()),
            f.carrier,
            duration(f.age_secs as u64),
            duration(f.idle_secs as u64),
            f.packets,
            why
        );
        if let Some(sender) = &f.sender {
            let _ = writeln!(out, "    from {}", sender_text(sender));
        }
    }
    out
}

/// Who sent a flow: `uid 1000, cgroup /user.slice/..., app curl`.
fn sender_text(sender: &crate::control::SenderView) -> String {
    let mut parts = vec![format!("uid {}", sender.uid)];
    if let Some(cgroup) = &sender.cgroup {
        parts.push(format!("cgroup {cgroup}"));
    }
    if let Some(app) = &sender.app {
        parts.push(format!("app {app}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_234_567), "1.2 MB");
        assert_eq!(duration(3725), "1h 2m");
    }

    #[test]
    fn rule_table_aligns_columns() {
        let rules = vec![
            RuleView {
                id: 1,
                subset: "tcp dport 8080".into(),
                via: "underlay".into(),
                packets: 10,
                bytes: 15_000,
                answers: None,
                list: None,
                name_rule: false,
                candidates: None,
            },
            RuleView {
                id: 12,
                subset: "dst 203.0.113.0/24".into(),
                via: "underlay".into(),
                packets: 0,
                bytes: 0,
                answers: None,
                list: None,
                name_rule: false,
                candidates: None,
            },
        ];
        let table = rule_table(&rules);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("tcp dport 8080") && lines[1].contains("15.0 kB"));
        assert_eq!(lines[0].find("VIA"), lines[2].find("underlay"));
        assert!(rule_table(&[]).contains("oasis rule add"));
    }

    #[test]
    fn status_shows_program_costs_and_whether_the_config_is_saved() {
        let mut status = StatusView {
            config_path: "/etc/oasis/config.yaml".into(),
            config_saved: true,
            programs: vec![crate::control::ProgramStatsView {
                name: "oasis_egress".into(),
                hook: "tc egress".into(),
                run_count: 4,
                run_time_ns: 600,
            }],
            ..StatusView::default()
        };
        let text = self::status(&status);
        assert!(text.contains("/etc/oasis/config.yaml (saved)"), "{text}");
        assert!(text.contains("oasis_egress (tc egress) 150 ns"), "{text}");
        status.config_error = Some("cannot write config file: disk full".into());
        assert!(self::status(&status).contains("NOT SAVED: cannot write config file: disk full"));
    }

    #[test]
    fn status_shows_the_fast_path() {
        let off = self::status(&StatusView::default());
        assert!(off.contains("fast path: off (overlay_fast_path: false)"), "{off}");
        let mut status = StatusView {
            fast_path: true,
            fast_path_flows: 3,
            ..StatusView::default()
        };
        status.classifier.encap_packets = 4500;
        status.classifier.encap_bytes = 16 << 20;
        status.classifier.decap_packets = 13_000;
        status.classifier.fast_aggregate = 7;
        let text = self::status(&status);
        let line = text
            .lines()
            .find(|l| l.contains("fast path:"))
            .expect("a fast path line");
        assert!(line.contains("3 flows wrapped in the kernel"), "{line}");
        assert!(
            line.contains("4500 packets (16.8 MB) out, 13000 packets"),
            "{line}"
        );
        assert!(line.contains("7 aggregates"), "{line}");
    }
}
