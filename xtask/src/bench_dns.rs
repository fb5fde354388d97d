//! The DNS half of `cargo xtask bench`: the broker answering with 10,000
//! name rules loaded, against dnsmasq serving the same names from its
//! cache, measured in the same run with dnsperf; and the cost of one
//! lookup through Oasis against the same lookup without it (the overhead
//! the paper measured).
//!
//! Zone: an authoritative dnsmasq on the server holds `server.test` and
//! 1,000 benchmark names, half of them under `claimed.test`, which one of
//! the broker's name rules claims (fake answers), half unclaimed (passed
//! through from the broker's cache).

use std::fmt::Write as _;

use anyhow::{Context, bail};
use oasis_tests::{Daemon, SERVER_V4, Topology};

use crate::bench_common::{Figure, median};

const NAMES: usize = 1_000;
/// 9,900 suffix rules, 50 keyword and 50 regex rules that match no
/// benchmark name, and one suffix rule that claims half of them.
const SUFFIX_RULES: usize = 9_900;
const KEYWORD_RULES: usize = 50;
const REGEX_RULES: usize = 50;
/// dnsmasq's caching forwarder in the client: the peer.
const DNSMASQ_PORT: u16 = 5300;
/// Queries per second of the latency runs: well below either server's limit.
const LATENCY_QPS: &str = "2000";

/// The authoritative server for the benchmark's names (on the server).
pub fn start_zone(net: &mut Topology) -> anyhow::Result<()> {
    let mut hosts = format!("{SERVER_V4} server.test\n");
    for i in 0..NAMES / 2 {
        let _ = writeln!(hosts, "10.77.2.{} n{i}.plain.test", 10 + i % 200);
        let _ = writeln!(hosts, "10.77.2.{} c{i}.claimed.test", 10 + i % 200);
    }
    let file = net.dir.join("zone.hosts");
    std::fs::write(&file, hosts).context("zone file")?;
    net.start_authoritative_dns(&[&format!("--addn-hosts={}", file.display())]);
    Ok(())
}

#[derive(Default)]
struct Samples {
    qps: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

pub fn run(net: &mut Topology, seconds: u32, repeat: u32) -> anyhow::Result<Vec<Figure>> {
    let queries = write_queries(net)?;
    let dnsmasq_cache = (DNSMASQ_PORT.to_string(), "dnsmasq");
    let client = net.client.clone();
    net.spawn(
        &client,
        "dnsmasq-cache",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={}", dnsmasq_cache.0),
            &format!("--server={SERVER_V4}"),
            "--cache-size=10000",
            "--user=root",
            "--pid-file",
        ],
    );
    let _ = std::fs::remove_file(net.dir.join("config.yaml"));
    let config = net.dns_config("underlay_answers: fake\nfake_ttl_secs: 300");
    let daemon = Daemon::start(net, &config);
    load_rules(net, &daemon)?;
    eprintln!("bench: dns: broker has 10,001 name rules; warming both caches");
    for target in [Target::Dnsmasq, Target::Broker] {
        dnsperf(net, target, &queries, &["-n", "1"])?;
    }

    let (mut dnsmasq, mut broker) = loaded_rounds(net, &queries, seconds, repeat)?;
    let uncached = uncached_lookups(net, repeat)?;
    let status = daemon.json(net, &["status", "--json"]);
    let faked = status["dns"]["counters"]["faked"].as_u64().unwrap_or(0);
    if faked == 0 {
        bail!("the broker gave no fake answers: the claimed names were not claimed");
    }
    if !net.process("oasis").terminate(std::time::Duration::from_secs(10)) {
        bail!("the daemon did not stop cleanly");
    }

    Ok(figures(&mut dnsmasq, &mut broker, uncached))
}

/// Rounds of load and of timed queries, alternating which goes first.
fn loaded_rounds(
    net: &Topology,
    queries: &std::path::Path,
    seconds: u32,
    repeat: u32,
) -> anyhow::Result<(Samples, Samples)> {
    let mut dnsmasq = Samples::default();
    let mut broker = Samples::default();
    for round in 0..repeat as usize {
        let order = if round % 2 == 0 {
            [Target::Dnsmasq, Target::Broker]
        } else {
            [Target::Broker, Target::Dnsmasq]
        };
        for target in order {
            let samples = match target {
                Target::Dnsmasq => &mut dnsmasq,
                _ => &mut broker,
            };
            let time = seconds.to_string();
            let load = dnsperf(net, target, queries, &["-l", &time, "-c", "8", "-q", "200"])?;
            let timed = dnsperf(net, target, queries, &["-l", &time, "-Q", LATENCY_QPS, "-v"])?;
            let (p50, p99) = percentiles(timed.latencies_us);
            eprintln!(
                "bench: dns round {}/{repeat}: {}: {:.0} queries/s, p50 {p50:.0} us, p99 {p99:.0} us",
                round + 1,
                target.name(),
                load.qps
            );
            samples.qps.push(load.qps);
            samples.p50_us.push(p50);
            samples.p99_us.push(p99);
        }
    }

    Ok((dnsmasq, broker))
}

/// The median time of an uncached lookup: (direct, through Oasis,
/// through dnsmasq forwarding).
fn uncached_lookups(net: &Topology, repeat: u32) -> anyhow::Result<(f64, f64, f64)> {
    // One lookup's cost: names nobody asked before (no cache anywhere),
    // straight to the authoritative server, through the broker, and
    // through dnsmasq forwarding to the same server (what any forwarder
    // adds on this machine: a hop and two wake-ups), in rounds.
    let (mut direct, mut through, mut forwarder) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..repeat {
        let cold = |target: Target, name: &str| -> anyhow::Result<f64> {
            let queries = write_cold_queries(net, &format!("{name}{round}x"))?;
            let run = dnsperf(net, target, &queries, &["-n", "1", "-Q", "500", "-v"])?;
            Ok(percentiles(run.latencies_us).0)
        };
        direct.push(cold(Target::Authoritative, "direct")?);
        through.push(cold(Target::Broker, "oasis")?);
        forwarder.push(cold(Target::Dnsmasq, "dnsmasq")?);
        eprintln!(
            "bench: dns round {}/{repeat}: an uncached lookup: direct {:.0} us, through oasis {:.0} us, through dnsmasq {:.0} us",
            round + 1,
            direct[direct.len() - 1],
            through[through.len() - 1],
            forwarder[forwarder.len() - 1]
        );
    }
    Ok((median(&mut direct), median(&mut through), median(&mut forwarder)))
}

fn figures(dnsmasq: &mut Samples, broker: &mut Samples, uncached: (f64, f64, f64)) -> Vec<Figure> {
    let (direct_p50, through_p50, forwarder_p50) = uncached;
    let peer = summarise(dnsmasq);
    let ours = summarise(broker);
    let mut figures = Vec::new();
    let mut push = |scenario: &str, metric: &str, value: f64, unit: &str, against: Option<(&str, f64)>| {
        figures.push(Figure {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: against.map(|(name, _)| name.into()),
            ratio: against.map(|(_, base)| value / base),
        });
    };
    push(
        "dns-dnsmasq-cache",
        "dns_queries_per_second",
        peer[0],
        "queries/s",
        None,
    );
    push("dns-dnsmasq-cache", "dns_latency_p50", peer[1], "us", None);
    push("dns-dnsmasq-cache", "dns_latency_p99", peer[2], "us", None);
    let vs = |v: f64| Some(("dns-dnsmasq-cache", v));
    push(
        "dns-broker-10k-rules",
        "dns_queries_per_second",
        ours[0],
        "queries/s",
        vs(peer[0]),
    );
    push(
        "dns-broker-10k-rules",
        "dns_latency_p50",
        ours[1],
        "us",
        vs(peer[1]),
    );
    push(
        "dns-broker-10k-rules",
        "dns_latency_p99",
        ours[2],
        "us",
        vs(peer[2]),
    );
    push(
        "dns-lookup-direct",
        "dns_lookup_uncached_p50",
        direct_p50,
        "us",
        None,
    );
    push(
        "dns-lookup-via-oasis",
        "dns_lookup_uncached_p50",
        through_p50,
        "us",
        Some(("dns-lookup-direct", direct_p50)),
    );
    push(
        "dns-lookup-via-oasis",
        "dns_lookup_added",
        through_p50 - direct_p50,
        "us",
        None,
    );
    push(
        "dns-lookup-via-dnsmasq",
        "dns_lookup_uncached_p50",
        forwarder_p50,
        "us",
        Some(("dns-lookup-direct", direct_p50)),
    );
    push(
        "dns-lookup-via-dnsmasq",
        "dns_lookup_added",
        forwarder_p50 - direct_p50,
        "us",
        None,
    );
    figures
}

fn summarise(samples: &mut Samples) -> [f64; 3] {
    [
        median(&mut samples.qps),
        median(&mut samples.p50_us),
        median(&mut samples.p99_us),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The broker, the way applications reach it: a query to port 53 from
    /// a process in the redirected cgroup.
    Broker,
    Dnsmasq,
    /// The authoritative server itself, without Oasis.
    Authoritative,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Broker => "broker",
            Target::Dnsmasq => "dnsmasq",
            Target::Authoritative => "authoritative",
        }
    }
}

struct Run {
    qps: f64,
    latencies_us: Vec<f64>,
}

fn dnsperf(net: &Topology, target: Target, queries: &std::path::Path, extra: &[&str]) -> anyhow::Result<Run> {
    let file = queries.to_string_lossy().into_owned();
    let port = DNSMASQ_PORT.to_string();
    let mut args = vec!["dnsperf", "-d", &file];
    match target {
        Target::Dnsmasq => args.extend(["-s", "127.0.0.1", "-p", &port]),
        Target::Broker | Target::Authoritative => args.extend(["-s", SERVER_V4, "-p", "53"]),
    }
    args.extend_from_slice(extra);
    let output = match target {
        Target::Broker => net.client_in_cgroup(&args),
        _ => net.client.output(&args),
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "dnsperf against {}: {text}{}",
            target.name(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("dnsperf printed no rate:\n{text}"))?;
    let latencies_us = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    let lost = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or("")
        .trim()
        .to_string();
    if !lost.starts_with("0 ") {
        eprintln!("bench: dns: {}: lost {lost}", target.name());
    }
    Ok(Run { qps, latencies_us })
}

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

fn write_queries(net: &Topology) -> anyhow::Result<std::path::PathBuf> {
    let mut text = String::new();
    // Interleaved: every other query is for a claimed name.
    for i in 0..NAMES / 2 {
        let _ = writeln!(text, "n{i}.plain.test A");
        let _ = writeln!(text, "c{i}.claimed.test A");
    }
    let path = net.dir.join("queries.txt");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Names asked once each: NXDOMAIN from the authoritative server, never
/// in any cache. A prefix per use keeps the two runs apart.
fn write_cold_queries(net: &Topology, prefix: &str) -> anyhow::Result<std::path::PathBuf> {
    let text: String = (0..1000).map(|i| format!("{prefix}{i}.cold.test A\n")).collect();
    let path = net.dir.join(format!("cold-{prefix}.txt"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn load_rules(net: &Topology, daemon: &Daemon) -> anyhow::Result<()> {
    let import = |kind: &str, name: &str, lines: String| -> anyhow::Result<()> {
        let path = net.dir.join(name);
        std::fs::write(&path, lines)?;
        let output = daemon.cli(
            net,
            &[
                "rule",
                "import",
                "--kind",
                kind,
                "--via",
                "underlay",
                &path.to_string_lossy(),
            ],
        );
        if !output.status.success() {
            bail!("rule import: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    };
    import(
        "suffix",
        "suffix-rules.txt",
        (0..SUFFIX_RULES).map(|i| format!("site{i}.example\n")).collect(),
    )?;
    import(
        "keyword",
        "keyword-rules.txt",
        (0..KEYWORD_RULES).map(|i| format!("tracker{i}\n")).collect(),
    )?;
    import(
        "regex",
        "regex-rules.txt",
        (0..REGEX_RULES)
            .map(|i| format!("^cdn[0-9]+\\.edge{i}\\.net$\n"))
            .collect(),
    )?;
    import("suffix", "claimed.txt", "claimed.test\n".into())
}
