//! What every part of `cargo xtask bench` measures with and reports in:
//! figures, their table and results.json, the median of rounds, the
//! daemon's CLI, an iperf3 transfer, the kernel's run counts of the
//! daemon's programs.

use anyhow::{Context, bail};
use oasis_tests::{Daemon, Topology};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The port iperf3 servers of the benchmark listen on.
pub const IPERF_PORT: u16 = 5201;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Figure {
    /// A figure with no baseline to compare with.
    pub(crate) fn plain(scenario: &str, metric: &str, value: f64, unit: &str) -> Figure {
        Figure {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit: unit.into(),
            baseline: None,
            ratio: None,
        }
    }
}

/// (program, run count, run time ns) of the daemon's programs and, for the
/// overlay, the exit node's.
pub(crate) fn program_stats(daemon: &Daemon, net: &Topology, exit: bool) -> Vec<(String, u64, u64)> {
    let status = daemon.json(net, &["status", "--json"]);
    let mut out: Vec<(String, u64, u64)> = status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                format!(
                    "{} ({})",
                    p["name"].as_str().unwrap_or("?"),
                    p["hook"].as_str().unwrap_or("?")
                ),
                p["run_count"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    if exit
        && let Ok(text) = std::fs::read_to_string(net.dir.join("exit-stats.json"))
        && let Ok(stats) = serde_json::from_str::<Value>(&text)
    {
        let p = &stats["program"];
        out.push((
            format!("{} (exit node)", p["name"].as_str().unwrap_or("?")),
            p["run_count"].as_u64().unwrap_or(0),
            p["run_time_ns"].as_u64().unwrap_or(0),
        ));
    }
    out
}

/// Prints the table and writes target/bench/results.json.
pub(crate) fn write_figures(figures: &[Figure]) -> anyhow::Result<()> {
    print_table(figures);
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(figures)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// `oasis ARGS` in the client; its standard output, or its error.
pub(crate) fn cli(daemon: &Daemon, net: &Topology, args: &[&str]) -> anyhow::Result<String> {
    let output = daemon.cli(net, args);
    if !output.status.success() {
        bail!(
            "oasis {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One iperf3 TCP transfer (client to server, or back with `reverse`);
/// bits per second received.
pub(crate) fn iperf(net: &Topology, target: &str, seconds: u32, reverse: bool) -> anyhow::Result<f64> {
    iperf_at(net, target, seconds, reverse, None)
}

/// As [`iperf`], paced to `rate` (iperf3's `-b`, e.g. "10M") when given.
pub(crate) fn iperf_at(
    net: &Topology,
    target: &str,
    seconds: u32,
    reverse: bool,
    rate: Option<&str>,
) -> anyhow::Result<f64> {
    let port = IPERF_PORT.to_string();
    let time = seconds.to_string();
    let mut args = vec!["iperf3", "-c", target, "-p", &port, "-t", &time, "-J"];
    if reverse {
        args.push("-R");
    }
    if let Some(rate) = rate {
        args.extend(["-b", rate]);
    }
    let output = net.client.output(&args);
    let report: Value = serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON")?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no bits_per_second")
}

pub(crate) fn print_table(figures: &[Figure]) {
    println!(
        "\n{:<20} {:<44} {:>10} {:<26} {:>8}  to",
        "scenario", "metric", "value", "unit", "ratio"
    );
    for f in figures {
        let ratio = f.ratio.map(|r| format!("{r:.3}")).unwrap_or_default();
        let to = f.baseline.as_deref().unwrap_or("");
        println!(
            "{:<20} {:<44} {:>10.3} {:<26} {:>8}  {to}",
            f.scenario, f.metric, f.value, f.unit, ratio
        );
    }
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}
