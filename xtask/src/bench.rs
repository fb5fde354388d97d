//! `cargo xtask bench`: throughput and latency in network namespaces, each
//! figure a ratio to a baseline measured in the same run.
//!
//! Scenarios, all client -> router -> server:
//!   no-oasis           no daemon, no programs (the baseline)
//!   attached-no-match  the classifier attached, no rule matching the traffic
//!   diverted-underlay  a rule diverts the traffic to the broker, which sends
//!                      it on the underlay through its raw socket

use std::time::Duration;

use anyhow::{Context, bail};
use oasis_tests::{Daemon, SERVER_V4, Topology};
use serde::Serialize;
use serde_json::Value;

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;

#[derive(Serialize, Clone, Debug)]
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

struct Scenario {
    name: &'static str,
    /// Rules the daemon holds; None: no daemon at all.
    rules: Option<&'static [&'static [&'static str]]>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "no-oasis",
        rules: None,
    },
    Scenario {
        name: "attached-no-match",
        rules: Some(&[&["--proto", "tcp", "--dport", "1", "--via", "underlay"]]),
    },
    Scenario {
        name: "diverted-underlay",
        rules: Some(&[
            &["--proto", "tcp", "--dport", "5201", "--via", "underlay"],
            &["--proto", "udp", "--dport", "11111", "--via", "underlay"],
        ]),
    },
];

#[derive(Default)]
struct Samples {
    upload_bps: Vec<f64>,
    sender_cpu: Vec<f64>,
    broker_cpu: Vec<f64>,
    rtt_p50_us: Vec<f64>,
    rtt_p99_us: Vec<f64>,
}

struct Measured {
    /// Lowest and highest sample, to show the run's noise.
    upload_spread: (f64, f64),
    rtt_p50_spread: (f64, f64),
    upload_bps: f64,
    sender_cpu: f64,
    broker_cpu: Option<f64>,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
}

pub fn run(seconds: u32, repeat: u32) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    if !crate::is_root() {
        bail!("the benchmark creates network namespaces and needs root: `sudo -E cargo xtask bench`");
    }
    let oasis = crate::build_oasis(true)?;
    // SAFETY: xtask is single-threaded at this point.
    unsafe { std::env::set_var("OASIS_BIN", &oasis) };

    // One network for every scenario, and the scenarios interleaved in each
    // round, so that drift on a shared machine hits all of them alike.
    let mut net = Topology::new();
    net.start_iperf_server(IPERF_PORT);
    let server = net.server.clone();
    net.spawn(
        &server,
        "sockperf",
        &[
            "sockperf",
            "server",
            "-i",
            SERVER_V4,
            "-p",
            &SOCKPERF_PORT.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut samples: Vec<Samples> = SCENARIOS.iter().map(|_| Samples::default()).collect();
    for round in 0..repeat as usize {
        // Each round starts with a different scenario, so none always
        // follows another's start-up or tear-down.
        for offset in 0..SCENARIOS.len() {
            let index = (round + offset) % SCENARIOS.len();
            let scenario = &SCENARIOS[index];
            eprintln!(
                "bench: round {}/{repeat}: {} ({seconds} s per tool)",
                round + 1,
                scenario.name
            );
            measure(&mut net, scenario, seconds, &mut samples[index])?;
        }
    }
    let measured: Vec<Measured> = samples
        .iter_mut()
        .map(|s| Measured {
            upload_spread: spread(&s.upload_bps),
            rtt_p50_spread: spread(&s.rtt_p50_us),
            upload_bps: median(&mut s.upload_bps),
            sender_cpu: median(&mut s.sender_cpu),
            broker_cpu: (!s.broker_cpu.is_empty()).then(|| median(&mut s.broker_cpu)),
            rtt_p50_us: median(&mut s.rtt_p50_us),
            rtt_p99_us: median(&mut s.rtt_p99_us),
        })
        .collect();
    let figures = figures(&measured);
    print_table(&figures);
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// One sample of each metric for one scenario. A scenario with rules gets a
/// fresh daemon (and config), stopped again afterwards.
fn measure(
    net: &mut Topology,
    scenario: &Scenario,
    seconds: u32,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let daemon = match scenario.rules {
        None => None,
        Some(rules) => {
            let _ = std::fs::remove_file(net.dir.join("config.yaml"));
            let daemon = Daemon::start(net, "");
            for rule in rules {
                let mut args = vec!["rule", "add"];
                args.extend_from_slice(rule);
                let output = daemon.cli(net, &args);
                if !output.status.success() {
                    bail!(
                        "adding rule {rule:?}: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            }
            // Let the program load's after-effects (JIT, RCU work) pass.
            std::thread::sleep(Duration::from_secs(1));
            Some(daemon)
        }
    };
    let daemon_pid = daemon.as_ref().map(|_| net.process("oasis").pid());

    let before = daemon_pid.map(cpu_ticks);
    let (bps, cpu) = iperf_upload(net, seconds)?;
    if let (Some(pid), Some(before)) = (daemon_pid, before) {
        let ticks = cpu_ticks(pid) - before;
        samples
            .broker_cpu
            .push(100.0 * ticks as f64 / (ticks_per_second() * f64::from(seconds)));
    }
    samples.upload_bps.push(bps);
    samples.sender_cpu.push(cpu);
    let (p50, p99) = sockperf_rtt(net, seconds)?;
    eprintln!(
        "bench:   upload {:.2} Gbit/s, rtt p50 {p50:.2} us, p99 {p99:.2} us",
        bps / 1e9
    );
    samples.rtt_p50_us.push(p50);
    samples.rtt_p99_us.push(p99);

    if let Some(daemon) = &daemon {
        let status = daemon.json(net, &["status", "--json"]);
        let diverted = status["tun"]["diverted_packets"].as_u64().unwrap_or(0);
        if scenario.name == "diverted-underlay" && diverted == 0 {
            bail!("the diverted scenario diverted nothing; the measurement would be meaningless");
        }
        if scenario.name == "attached-no-match" && diverted != 0 {
            bail!("the no-match scenario diverted {diverted} packets");
        }
        if !net.process("oasis").terminate(Duration::from_secs(10)) {
            bail!("the daemon did not stop cleanly");
        }
    }
    Ok(())
}

/// One iperf3 TCP upload; bits per second received and the sender's CPU.
fn iperf_upload(net: &Topology, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let output = net.client.output(&[
        "iperf3",
        "-c",
        SERVER_V4,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON")?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no bits_per_second")?;
    let cpu = report["end"]["cpu_utilization_percent"]["host_total"]
        .as_f64()
        .unwrap_or(0.0);
    Ok((bps, cpu))
}

/// sockperf UDP ping-pong; full round-trip p50 and p99 in microseconds.
fn sockperf_rtt(net: &Topology, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let output = net.client.output(&[
        "sockperf",
        "ping-pong",
        "-i",
        SERVER_V4,
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "--full-rtt",
    ]);
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    let percentile = |p: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    match (percentile("50.000"), percentile("99.000")) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("sockperf printed no percentiles:\n{text}"),
    }
}

fn figures(measured: &[Measured]) -> Vec<Figure> {
    let base = &measured[0];
    let base_name = SCENARIOS[0].name.to_string();
    let mut out = Vec::new();
    for (scenario, m) in SCENARIOS.iter().zip(measured) {
        let compared = scenario.name != base_name;
        let figure = |metric: &str, value: f64, unit: &str, base_value: Option<f64>| Figure {
            scenario: scenario.name.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: base_value.filter(|_| compared).map(|_| base_name.clone()),
            ratio: base_value.filter(|_| compared).map(|b| value / b),
        };
        out.push(figure(
            "tcp_upload_throughput",
            m.upload_bps / 1e9,
            "Gbit/s",
            Some(base.upload_bps / 1e9),
        ));
        out.push(figure(
            "tcp_upload_throughput_min",
            m.upload_spread.0 / 1e9,
            "Gbit/s",
            None,
        ));
        out.push(figure(
            "tcp_upload_throughput_max",
            m.upload_spread.1 / 1e9,
            "Gbit/s",
            None,
        ));
        out.push(figure("iperf3_sender_cpu", m.sender_cpu, "%", None));
        if let Some(cpu) = m.broker_cpu {
            out.push(figure("broker_cpu", cpu, "% of one core", None));
        }
        out.push(figure("udp_rtt_p50", m.rtt_p50_us, "us", Some(base.rtt_p50_us)));
        out.push(figure("udp_rtt_p50_min", m.rtt_p50_spread.0, "us", None));
        out.push(figure("udp_rtt_p50_max", m.rtt_p50_spread.1, "us", None));
        out.push(figure("udp_rtt_p99", m.rtt_p99_us, "us", Some(base.rtt_p99_us)));
        if compared {
            out.push(Figure {
                scenario: scenario.name.into(),
                metric: "udp_rtt_p50_added".into(),
                value: m.rtt_p50_us - base.rtt_p50_us,
                unit: "us".into(),
                baseline: Some(base_name.clone()),
                ratio: None,
            });
        }
    }
    out
}

fn print_table(figures: &[Figure]) {
    println!(
        "\n{:<20} {:<24} {:>12} {:<14} {:>10}",
        "scenario", "metric", "value", "unit", "ratio"
    );
    for f in figures {
        let ratio = f.ratio.map(|r| format!("{r:.3}")).unwrap_or_default();
        println!(
            "{:<20} {:<24} {:>12.3} {:<14} {:>10}",
            f.scenario, f.metric, f.value, f.unit, ratio
        );
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no side effects.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
