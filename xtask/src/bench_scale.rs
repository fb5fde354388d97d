//! The scale half of `cargo xtask bench`:
//!
//! - new flows per second through the first-packet path: a generator in
//!   the client sends one datagram per new 5-tuple as fast as it can to
//!   ports a rule claims; every one is a cache miss in the classifier, is
//!   diverted, and starts a flow in the broker, which sends it on by the
//!   rule's carrier (the underlay, or an overlay through the exit node).
//!   The figure is the broker's rate of started flows while the generator
//!   offers more than it takes. With a metric rule, the Monitor decides
//!   each flow (and the time each decision took is reported);
//! - a name import of 1,000,000 suffix rules through the CLI, timed, with
//!   the heartbeat read from its kernel map every 10 ms throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use oasis_tests::{CLIENT_V4, Daemon, SERVER_V4, Topology, monotonic_ns};
use serde_json::Value;

use crate::bench_common::{Figure, cli, median};

/// The ports the generator spreads flows over, claimed by the rule.
const FLOW_PORTS: &str = "30000-30015";
const IMPORT_RULES: usize = 1_000_000;

fn status(daemon: &Daemon, net: &Topology) -> Value {
    daemon.json(net, &["status", "--json"])
}

/// Runs the generator in the client for `seconds`; datagrams it sent.
fn generate(net: &Topology, seconds: u32) -> anyhow::Result<u64> {
    let xtask = std::env::current_exe().context("the xtask binary")?;
    let output = net.client.output(&[
        &xtask.to_string_lossy(),
        "flowgen",
        "--src",
        CLIENT_V4,
        "--dst",
        SERVER_V4,
        "--ports",
        FLOW_PORTS,
        "--seconds",
        &seconds.to_string(),
    ]);
    if !output.status.success() {
        bail!("flowgen: {}", String::from_utf8_lossy(&output.stderr));
    }
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("flowgen printed no count")
}

/// New flows per second for one carrier, median of `repeat` runs.
pub fn new_flows(
    net: &mut Topology,
    spec_url: &str,
    seconds: u32,
    repeat: u32,
) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for carrier in ["underlay", "exit", "metric"] {
        let mut decision_p50 = Vec::new();
        let mut decision_p99 = Vec::new();
        let mut rates = Vec::new();
        let mut offered = Vec::new();
        for round in 0..repeat {
            let _ = std::fs::remove_file(net.dir.join("config.yaml"));
            let daemon = Daemon::start(net, "");
            if carrier != "underlay" {
                cli(&daemon, net, &["overlay", "add", "exit", spec_url])?;
            }
            // `metric`: the Monitor decides each flow (and, the underlay
            // being as fast as the exit, leaves it to the kernel).
            let carrier_args: &[&str] = match carrier {
                "metric" => &["--metric", "latency"],
                "exit" => &["--via", "exit"],
                _ => &["--via", "underlay"],
            };
            let mut args = vec!["rule", "add", "--proto", "udp", "--dport", FLOW_PORTS];
            args.extend_from_slice(carrier_args);
            cli(&daemon, net, &args)?;
            std::thread::sleep(Duration::from_millis(500));
            let before = status(&daemon, net);
            let started = Instant::now();
            let sent = generate(net, seconds)?;
            let took = started.elapsed().as_secs_f64();
            // Let the queue drain.
            std::thread::sleep(Duration::from_millis(300));
            let after = status(&daemon, net);
            let flows = after["broker"]["flows_started"].as_u64().unwrap_or(0)
                - before["broker"]["flows_started"].as_u64().unwrap_or(0);
            let sent_on = match carrier {
                "exit" => "sent_overlay",
                _ => "sent_underlay",
            };
            if carrier == "metric" {
                let broker = &after["broker"];
                decision_p50.push(broker["decision_p50_us"].as_f64().unwrap_or(0.0));
                decision_p99.push(broker["decision_p99_us"].as_f64().unwrap_or(0.0));
                eprintln!(
                    "bench: decisions on metric flows: {} µs at the median, {} µs at the 99th percentile",
                    broker["decision_p50_us"], broker["decision_p99_us"]
                );
            }
            let carried = after["broker"][sent_on].as_u64().unwrap_or(0)
                - before["broker"][sent_on].as_u64().unwrap_or(0);
            eprintln!(
                "bench: new flows via {carrier}, round {}: {sent} offered, {flows} flows started \
                 ({:.0}/s), {carried} sent on",
                round + 1,
                flows as f64 / took
            );
            if flows == 0 {
                bail!("no flow reached the broker");
            }
            rates.push(flows as f64 / took);
            offered.push(sent as f64 / took);
            if !net.process("oasis").terminate(Duration::from_secs(10)) {
                bail!("the daemon did not stop cleanly");
            }
        }
        let scenario = format!(
            "new-flows-{}",
            match carrier {
                "exit" => "overlay",
                "metric" => "metric-rule",
                _ => "underlay",
            }
        );
        for (metric, values) in [
            ("decision_time_p50", &mut decision_p50),
            ("decision_time_p99", &mut decision_p99),
        ] {
            if !values.is_empty() {
                figures.push(Figure {
                    scenario: scenario.clone(),
                    metric: metric.into(),
                    value: median(values),
                    unit: "us".into(),
                    baseline: None,
                    ratio: None,
                });
            }
        }
        for (metric, values) in [
            ("new_flows_per_second", &mut rates),
            ("offered_flows_per_second", &mut offered),
        ] {
            figures.push(Figure {
                scenario: scenario.clone(),
                metric: metric.into(),
                value: median(values),
                unit: "flows/s".into(),
                baseline: None,
                ratio: None,
            });
        }
    }
    Ok(figures)
}

/// A million suffix rules through `oasis rule import`, timed, with the
/// heartbeat read from its map all the while.
pub fn import(net: &mut Topology) -> anyhow::Result<Vec<Figure>> {
    let _ = std::fs::remove_file(net.dir.join("config.yaml"));
    let daemon = Daemon::start(net, "");
    let map_id = status(&daemon, net)["heartbeat"]["map_id"]
        .as_u64()
        .context("the heartbeat map's id")? as u32;
    let timeout_ms = status(&daemon, net)["heartbeat"]["timeout_ms"]
        .as_u64()
        .unwrap_or(3000);
    let file = net.dir.join("million.txt");
    let names: String = (0..IMPORT_RULES)
        .map(|i| format!("site{i}.example.com\n"))
        .collect();
    std::fs::write(&file, names)?;

    let stop = Arc::new(AtomicBool::new(false));
    let oldest = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, oldest) = (stop.clone(), oldest.clone());
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let data = aya::maps::MapData::from_id(map_id).context("opening the heartbeat map")?;
            let map: aya::maps::Array<_, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
            let mut reads = 0;
            while !stop.load(Relaxed) {
                let beat = map.get(&0, 0)?;
                oldest.fetch_max(monotonic_ns().saturating_sub(beat) / 1_000_000, Relaxed);
                reads += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(reads)
        })
    };
    eprintln!("bench: importing {IMPORT_RULES} suffix rules");
    let started = Instant::now();
    let out = cli(
        &daemon,
        net,
        &[
            "rule",
            "import",
            "--kind",
            "suffix",
            "--via",
            "underlay",
            &file.to_string_lossy(),
        ],
    )?;
    let took = started.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let reads = watcher.join().expect("the watcher")?;
    if !out.contains(&format!("imported {IMPORT_RULES} rules")) {
        bail!("the import said: {out}");
    }
    let after = status(&daemon, net);
    let oldest = oldest.load(Relaxed);
    eprintln!(
        "bench: import took {took:.2} s; heartbeat read {reads} times, at most {oldest} ms old; \
         fail-open packets {}",
        after["classifier"]["fail_open"]
    );
    if !net.process("oasis").terminate(Duration::from_secs(60)) {
        bail!("the daemon did not stop cleanly after the import");
    }
    let figure = |metric: &str, value: f64, unit: &str| Figure {
        scenario: "import-1m-suffix".into(),
        metric: metric.into(),
        value,
        unit: unit.into(),
        baseline: None,
        ratio: None,
    };
    Ok(vec![
        figure("import_seconds", took, "s"),
        figure("heartbeat_oldest", oldest as f64, "ms"),
        figure("heartbeat_timeout", timeout_ms as f64, "ms"),
    ])
}

/// Prefixes in the benchmark's set: a large country's list.
const SET_PREFIXES: u32 = 100_000;

/// What the classifier holds in one configuration of the prefix-set
/// benchmark; neither claims the traffic, so every packet is classified
/// and passes.
#[derive(Clone, Copy, PartialEq)]
enum Holding {
    OnePrefix,
    PrefixSet,
}

/// A rule with a 100,000-prefix set against a rule with one prefix: how
/// long the set takes to load through the CLI, and what the classifier
/// costs per packet with each, as the kernel counts it, for packets of
/// new flows (each a full lookup, the trie walked) and of a TCP upload
/// (flow cache hits).
pub fn prefix_set(net: &mut Topology, seconds: u32, repeat: u32) -> anyhow::Result<Vec<Figure>> {
    let file = net.dir.join("world.txt");
    std::fs::write(&file, oasis_tests::prefix_list(SET_PREFIXES, &["2001:db8::/32"]))?;
    let mut load = Vec::new();
    let mut new_flow_ns: [Vec<f64>; 2] = Default::default();
    let mut cached_ns: [Vec<f64>; 2] = Default::default();
    let mut upload: [Vec<f64>; 2] = Default::default();
    for round in 0..repeat {
        // Alternate which goes first, so drift hits both alike.
        let order = if round % 2 == 0 {
            [Holding::OnePrefix, Holding::PrefixSet]
        } else {
            [Holding::PrefixSet, Holding::OnePrefix]
        };
        for holding in order {
            let slot = holding as usize;
            let _ = std::fs::remove_dir_all(net.dir.join("sets"));
            let _ = std::fs::remove_file(net.dir.join("config.yaml"));
            let daemon = Daemon::start(net, "");
            match holding {
                Holding::OnePrefix => {
                    cli(
                        &daemon,
                        net,
                        &["rule", "add", "--dst", "203.0.113.0/24", "--via", "underlay"],
                    )?;
                }
                Holding::PrefixSet => {
                    let started = Instant::now();
                    let out = cli(
                        &daemon,
                        net,
                        &[
                            "rule",
                            "import",
                            "--kind",
                            "cidr",
                            "--via",
                            "underlay",
                            &file.to_string_lossy(),
                        ],
                    )?;
                    let took = started.elapsed().as_secs_f64();
                    if !out.contains("added rule") {
                        bail!("the set's import said: {out}");
                    }
                    eprintln!("bench: {SET_PREFIXES} prefixes in one rule, in effect after {took:.2} s");
                    load.push(took);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
            let egress = |daemon: &Daemon| -> (u64, u64) {
                crate::bench_common::program_stats(daemon, net, false)
                    .into_iter()
                    .filter(|(name, _, _)| name.starts_with("oasis_egress"))
                    .fold((0, 0), |(c, t), (_, count, ns)| (c + count, t + ns))
            };
            let per_run = |before: (u64, u64), after: (u64, u64)| {
                (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64
            };
            let before = egress(&daemon);
            generate(net, seconds.min(2))?;
            let after = egress(&daemon);
            new_flow_ns[slot].push(per_run(before, after));
            let before = egress(&daemon);
            upload[slot].push(crate::bench_common::iperf(net, SERVER_V4, seconds, false)? / 1e9);
            let after = egress(&daemon);
            cached_ns[slot].push(per_run(before, after));
            eprintln!(
                "bench: {}: classifier {:.0} ns per new-flow packet, {:.0} ns per upload packet",
                if holding == Holding::PrefixSet {
                    "prefix set"
                } else {
                    "one prefix"
                },
                new_flow_ns[slot].last().unwrap(),
                cached_ns[slot].last().unwrap()
            );
            if status(&daemon, net)["tun"]["diverted_packets"].as_u64() != Some(0) {
                bail!("the prefix-set benchmark diverted traffic: its rules must not match");
            }
            if !net.process("oasis").terminate(Duration::from_secs(10)) {
                bail!("the daemon did not stop cleanly");
            }
        }
    }
    let mut figures = vec![Figure {
        scenario: "prefix-set-100k".into(),
        metric: "load_seconds".into(),
        value: median(&mut load),
        unit: "s".into(),
        baseline: None,
        ratio: None,
    }];
    for (metric, values, unit) in [
        ("classifier_ns_per_new_flow_packet", &mut new_flow_ns, "ns"),
        ("classifier_ns_per_upload_packet", &mut cached_ns, "ns"),
        ("tcp_upload_throughput", &mut upload, "Gbit/s"),
    ] {
        let base = median(&mut values[Holding::OnePrefix as usize]);
        let with_set = median(&mut values[Holding::PrefixSet as usize]);
        figures.push(Figure {
            scenario: "prefix-set-100k".into(),
            metric: metric.into(),
            value: with_set,
            unit: unit.into(),
            baseline: Some(format!("one prefix ({base:.2})")),
            ratio: Some(with_set / base),
        });
    }
    Ok(figures)
}

/// A list of [`SET_PREFIXES`] prefixes served by URL, imported, then
/// changed and refreshed `repeat` times: how long each new copy took from
/// downloaded to in effect (checked, compiled, in the kernel's maps), as
/// the daemon measures it, and whether the classifier failed open (its
/// heartbeat stale) meanwhile.
pub fn list_refresh(net: &mut Topology, base: &str, repeat: u32) -> anyhow::Result<Vec<Figure>> {
    // Each version a list of its own: every prefix of the old copy leaves
    // the classifier's trie and every one of the new copy enters it.
    let publish = |net: &Topology, version: u32| -> anyhow::Result<()> {
        let mut seed = 0x2545_f491_4f6c_dd1du64 ^ u64::from(version + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut text = String::with_capacity(SET_PREFIXES as usize * 16);
        for _ in 0..SET_PREFIXES {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let block = 0x0b00_0000 + (seed % (0xdf00_0000 - 0x0b00_0000)) as u32;
            text.push_str(&format!("{}/24\n", std::net::Ipv4Addr::from(block & 0xffff_ff00)));
        }
        net.publish("world.cidr", &text);
        // The server answers "not modified" by time, to the second.
        std::fs::File::options()
            .write(true)
            .open(net.dir.join("specs/world.cidr"))?
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(10 * u64::from(version)))?;
        Ok(())
    };
    let _ = std::fs::remove_file(net.dir.join("config.yaml"));
    let daemon = Daemon::start(net, "");
    publish(net, 0)?;
    let url = format!("{base}/world.cidr");
    let started = Instant::now();
    cli(
        &daemon,
        net,
        &[
            "rule", "import", "--url", &url, "--kind", "cidr", "--via", "underlay",
        ],
    )?;
    eprintln!(
        "bench: a list of {SET_PREFIXES} prefixes by URL imported in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let fail_open = |daemon: &Daemon| {
        status(daemon, net)["classifier"]["fail_open"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut in_effect = Vec::new();
    for round in 1..=repeat.max(1) {
        publish(net, round)?;
        let before = fail_open(&daemon);
        let out = cli(&daemon, net, &["rule", "refresh", "--json"])?;
        let rules: Value = serde_json::from_str(&out).context("rule refresh --json")?;
        let list = &rules[0]["list"];
        if let Some(error) = list["error"].as_str() {
            bail!("the list's refresh failed: {error}");
        }
        let ms = list["last_change_ms"]
            .as_u64()
            .with_context(|| format!("no new copy was taken: {list}"))?;
        if fail_open(&daemon) != before {
            bail!("the classifier failed open while a list was refreshed");
        }
        eprintln!(
            "bench: list refresh {round}: a changed copy of {SET_PREFIXES} prefixes in effect {ms} ms after its download"
        );
        in_effect.push(ms as f64 / 1000.0);
    }
    if !net.process("oasis").terminate(Duration::from_secs(10)) {
        bail!("the daemon did not stop cleanly");
    }
    Ok(vec![Figure {
        scenario: "list-refresh-100k".into(),
        metric: "in_effect_after_download_seconds".into(),
        value: median(&mut in_effect),
        unit: "s".into(),
        baseline: None,
        ratio: None,
    }])
}

/// A module of about a megabyte of code: many small functions, as a
/// compiled-from-Rust overlay protocol would have, keeping the contract.
fn megabyte_module() -> anyhow::Result<Vec<u8>> {
    let mut text = String::from(
        "(module\n (import \"oasis\" \"send\" (func $send (param i32 i32 i32) (result i32)))\n \
         (memory (export \"memory\") 2)\n \
         (func (export \"oasis_buffer\") (result i32) (i32.const 0))\n \
         (func (export \"oasis_from_entry\") (param i32 i32))\n",
    );
    let functions = 9_000;
    for i in 0..functions {
        text.push_str(&format!(
            " (func $f{i} (param $x i32) (result i32)\n  (local $a i32) (local.set $a (i32.mul (local.get $x) (i32.const {})))\n",
            i + 3
        ));
        for j in 0..8 {
            text.push_str(&format!(
                "  (local.set $a (i32.xor (i32.add (local.get $a) (i32.const {})) (i32.shr_u (local.get $a) (i32.const {}))))\n",
                i * 8 + j,
                1 + j % 7
            ));
        }
        text.push_str("  (if (result i32) (i32.gt_u (local.get $a) (i32.const 100)) (then (local.get $a)) (else (i32.const 0))))\n");
    }
    text.push_str(" (func (export \"oasis_from_host\") (param $len i32)\n  (drop (call $send (i32.const 0) (i32.const 0) (local.get $len)))\n");
    for i in (0..functions).step_by(97) {
        text.push_str(&format!("  (drop (call $f{i} (local.get $len)))\n"));
    }
    text.push_str(" ))\n");
    Ok(wat::parse_str(&text)?)
}

/// Module start with its compiled code from the cache (after a daemon
/// restart), and the first compile of a module of about 1 MB.
pub fn modules(net: &mut Topology, spec_url: &str) -> anyhow::Result<Vec<Figure>> {
    let module =
        crate::workspace_root().join("target/modules/wasm32-unknown-unknown/release/pass_through.wasm");
    let big = net.dir.join("megabyte.wasm");
    let bytes = megabyte_module()?;
    std::fs::write(&big, &bytes)?;
    let _ = std::fs::remove_file(net.dir.join("config.yaml"));
    let daemon = Daemon::start(net, "");
    let show = |daemon: &Daemon, net: &Topology, name: &str| -> Value {
        daemon.json(net, &["overlay", "show", name, "--json"])["module_status"].clone()
    };
    let running = |daemon: &Daemon, net: &Topology, name: &str| -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = show(daemon, net, name);
            if status["state"] == "running" {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("module {name} did not start: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    cli(
        &daemon,
        net,
        &[
            "overlay",
            "add",
            "pass",
            spec_url,
            "--module-file",
            &module.to_string_lossy(),
        ],
    )?;
    cli(
        &daemon,
        net,
        &[
            "overlay",
            "add",
            "big",
            spec_url,
            "--module-file",
            &big.to_string_lossy(),
        ],
    )?;
    let first = running(&daemon, net, "big")?;
    eprintln!("bench: a {} byte module: {}", bytes.len(), first["compile"]);
    let compile_ms =
        number_before(first["compile"].as_str().unwrap_or(""), " ms").context("the compile time")?;
    if !net.process("oasis").terminate(Duration::from_secs(10)) {
        bail!("the daemon did not stop cleanly");
    }
    let daemon = Daemon::start(net, "");
    let mut figures = Vec::new();
    let figure = Figure::plain;
    for name in ["pass", "big"] {
        let status = running(&daemon, net, name)?;
        let text = status["compile"].as_str().unwrap_or("");
        if !text.starts_with("from the cache") {
            bail!("module {name} was not taken from the cache: {text}");
        }
        let load_ms = number_before(text, " ms").context("the cache load time")?;
        let start_ms = status["start_us"].as_f64().unwrap_or(0.0) / 1000.0;
        eprintln!("bench: module {name} from the cache in {load_ms} ms, started in {start_ms:.2} ms");
        let scenario = format!("module-start-{name}");
        figures.push(figure(&scenario, "cached_compile_load", load_ms, "ms"));
        figures.push(figure(&scenario, "instantiate_and_start", start_ms, "ms"));
        figures.push(figure(&scenario, "start_total", load_ms + start_ms, "ms"));
    }
    figures.push(figure(
        "module-compile-1mb",
        "module_bytes",
        bytes.len() as f64,
        "bytes",
    ));
    figures.push(figure("module-compile-1mb", "first_compile", compile_ms, "ms"));
    if !net.process("oasis").terminate(Duration::from_secs(10)) {
        bail!("the daemon did not stop cleanly");
    }
    Ok(figures)
}

/// The number just before `unit` in `text` ("compiled in 412 ms").
fn number_before(text: &str, unit: &str) -> Option<f64> {
    let head = &text[..text.find(unit)?];
    head.rsplit(' ').next()?.parse().ok()
}
