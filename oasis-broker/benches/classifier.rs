//! The classifier's cost per check, as the kernel counts it: its programs
//! run by BPF_PROG_TEST_RUN on synthetic packets, a million times each,
//! under a rule set like the traffic benchmark's `attached-no-match` (a
//! TCP rule that matches none of it). Each kind of packet leaves the
//! program at another point, so the differences between them are what the
//! checks between those points cost. No network, no daemon, no other
//! process: the figures move little with the machine's load.

//!
//! `cargo xtask bench --only classifier` runs this (as root) and reads the
//! figures it prints, one JSON object a line, on stdout. It is a bench
//! target of the broker rather than part of xtask so that xtask builds
//! before `cargo xtask setup` has installed what the kernel programs need.

use anyhow::{Context, bail};

const REPEAT: u32 = 1_000_000;
const CLIENT: [u8; 4] = [10, 0, 0, 2];
const SERVER: [u8; 4] = [203, 0, 113, 9];

/// Each kind of packet, and what it says of the path it takes.
const KINDS: &[(&str, &str)] = &[
    ("not-ip", "an ARP frame: the prologue and the first parse"),
    (
        "proto-unseen",
        "UDP while the rules name TCP only: parse, the fake pools, the seen-protocol check",
    ),
    (
        "recent-hit",
        "a packet of an unclaimed TCP flow, the flow this CPU saw last: the common case",
    ),
    (
        "claimed-cached",
        "a packet of a diverted flow: its verdict from the claimed-flow cache, then the redirect",
    ),
    (
        "new-connection",
        "an unclaimed TCP SYN: the rules matched afresh (every SYN is)",
    ),
    (
        "ingress-idle",
        "the ingress program while the NAT holds no flow and nothing is measured",
    ),
];

#[cfg(target_os = "linux")]
fn run(repeat: u32) -> anyhow::Result<()> {
    use aya::programs::{TestRun, TestRunOptions};
    use oasis_broker::compile::compile;
    use oasis_broker::platform::Kernel;
    use oasis_broker::platform::linux::LinuxKernel;
    use oasis_broker::rules::{RuleSet, RuleSpec};
    use oasis_common::{EGRESS_PROGRAM, INGRESS_PROGRAM, Settings};

    let settings = Settings {
        heartbeat_timeout_ns: 3_000_000_000,
        flow_idle_ns: 120_000_000_000,
        tcp_idle_ns: 7_440_000_000_000,
        tun_ifindex: 1,
        bypass_mark: 0x4f41_5349,
        ..Settings::default()
    };
    let mut kernel =
        LinuxKernel::load(oasis_ebpf_object::OBJECT, settings).context("loading the classifier (as root)")?;
    let mut rules = RuleSet::default();
    for (proto, dport) in [("tcp", "9999"), ("tcp", "7000-7010")] {
        let spec = RuleSpec {
            proto: Some(proto.into()),
            dport: Some(dport.into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        let (subset, via) = spec.parse()?;
        rules.add_any(subset, via)?;
    }
    kernel
        .apply(&compile(rules.rules()))
        .map_err(|e| anyhow::anyhow!("the rules: {e}"))?;
    kernel
        .set_fake_pools("198.18.0.0/15".parse()?, "fd4f:4153:4953::/48".parse()?)
        .map_err(|e| anyhow::anyhow!("the fake pools: {e}"))?;

    // With the kernel's run statistics on, every run would also pay for
    // the two clock reads they take (about 70 ns here).
    let _stats_off = StatsOff::new();
    let ctx: Vec<u8> = [0u32, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut measured = 0;
    for (kind, why) in KINDS {
        let (program, packet) = match *kind {
            "not-ip" => (EGRESS_PROGRAM, arp()),
            "proto-unseen" => (EGRESS_PROGRAM, udp(40000, 53)),
            "recent-hit" => (EGRESS_PROGRAM, tcp(40000, 443, false)),
            "claimed-cached" => (EGRESS_PROGRAM, tcp(40001, 9999, false)),
            "new-connection" => (EGRESS_PROGRAM, tcp(40002, 443, true)),
            _ => (INGRESS_PROGRAM, tcp(40000, 443, false)),
        };
        let mut samples = Vec::new();
        for _ in 0..repeat.max(1) {
            // A fresh heartbeat for each million runs (a stale one would
            // let everything pass early).
            kernel
                .heartbeat_map()
                .set(oasis_broker::platform::linux::sys::monotonic_ns())?;
            let classifier = kernel.program(program)?;
            let result = classifier
                .test_run(TestRunOptions {
                    data_in: Some(&packet),
                    ctx_in: Some(&ctx),
                    repeat: REPEAT,
                    ..TestRunOptions::default()
                })
                .with_context(|| format!("BPF_PROG_TEST_RUN of {program} ({kind})"))?;
            samples.push(result.duration.as_nanos() as f64);
        }
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        eprintln!("bench: classifier {kind}: {median:.1} ns per run ({why})");
        let figure = serde_json::json!({
            "scenario": "classifier",
            "metric": format!("test_run_ns {kind}"),
            "value": median,
            "unit": "ns",
        });
        println!("{figure}");
        measured += 1;
    }
    if measured == 0 {
        bail!("nothing measured");
    }

    // A thousand rules a new connection's headers all admit, without and
    // with sender fields: the difference is what rules by application
    // cost a packet that meets the rules. The first rule matches in both
    // (by uid 0 in the second: BPF_PROG_TEST_RUN's socket is root's), so
    // both divert; the others name applications, cgroups at four depths
    // (which do not exist: the ancestor lookups still run) and uids.
    let mut first = Vec::new();
    let mut later = Vec::new();
    for senders in [false, true] {
        let rules = thousand_rules(senders)?;
        kernel
            .apply(&compile(rules.rules()))
            .map_err(|e| anyhow::anyhow!("the rules: {e}"))?;
        let kind = if senders {
            "1000-sender-rules"
        } else {
            "1000-rules"
        };
        // The flow's first packet (a SYN always meets the rules), then its
        // later packets (their verdict from the claimed-flow cache).
        for (packet, what, into) in [
            (tcp(40_100, 443, true), "new-connection", &mut first),
            (tcp(40_100, 443, false), "claimed-cached", &mut later),
        ] {
            let mut samples = Vec::new();
            for _ in 0..repeat.max(1) {
                kernel
                    .heartbeat_map()
                    .set(oasis_broker::platform::linux::sys::monotonic_ns())?;
                let result = kernel
                    .program(EGRESS_PROGRAM)?
                    .test_run(TestRunOptions {
                        data_in: Some(&packet),
                        ctx_in: Some(&ctx),
                        repeat: REPEAT,
                        ..TestRunOptions::default()
                    })
                    .context("BPF_PROG_TEST_RUN of a thousand rules")?;
                if result.return_value != 7 {
                    bail!(
                        "the first of a thousand rules did not divert (verdict {})",
                        result.return_value
                    );
                }
                samples.push(result.duration.as_nanos() as f64);
            }
            samples.sort_by(f64::total_cmp);
            let median = samples[samples.len() / 2];
            eprintln!("bench: classifier {what}, {kind}: {median:.1} ns per run");
            println!(
                "{}",
                serde_json::json!({
                    "scenario": "classifier",
                    "metric": format!("test_run_ns {what} {kind}"),
                    "value": median,
                    "unit": "ns",
                })
            );
            into.push(median);
        }
    }
    for (what, pair) in [("new-connection", &first), ("claimed-cached", &later)] {
        let added = pair[1] - pair[0];
        eprintln!(
            "bench: classifier: sender fields on a thousand rules add {added:.1} ns to a {what} packet"
        );
        println!(
            "{}",
            serde_json::json!({
                "scenario": "classifier",
                "metric": format!("sender_rules_added_ns {what}"),
                "value": added,
                "unit": "ns",
            })
        );
    }
    Ok(())
}

/// Rule `i` admits TCP to port 443 (a range from 443 up, so no two are
/// alike); with `senders`, each also names who sent it.
#[cfg(target_os = "linux")]
fn thousand_rules(senders: bool) -> anyhow::Result<oasis_broker::rules::RuleSet> {
    use oasis_broker::rules::{RuleSet, RuleSpec};
    let mut rules = RuleSet::default();
    for i in 0..1000u32 {
        let mut spec = RuleSpec {
            proto: Some("tcp".into()),
            dport: Some(format!("443-{}", 443 + i)),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        if senders {
            match i % 3 {
                _ if i == 0 => spec.uid = Some("0".into()),
                0 => spec.uid = Some((10_000 + i).to_string()),
                1 => spec.app = Some(format!("app-{i}")),
                _ => {
                    let depth = 1 + (i / 3) % 4;
                    let path: Vec<String> = (0..depth)
                        .map(|level| format!("oasis-bench-{level}-{i}"))
                        .collect();
                    spec.cgroup = Some(path.join("/"));
                }
            }
        }
        let (subset, via) = spec.parse()?;
        rules.add_any(subset, via)?;
    }
    Ok(rules)
}

/// `kernel.bpf_stats_enabled` off while it lives, as it was afterwards.
#[cfg(target_os = "linux")]
struct StatsOff {
    before: Option<String>,
}

#[cfg(target_os = "linux")]
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[cfg(target_os = "linux")]
impl StatsOff {
    fn new() -> StatsOff {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        if before.as_deref().map(str::trim) == Some("1")
            && let Err(e) = std::fs::write(BPF_STATS, "0")
        {
            eprintln!("bench: cannot turn {BPF_STATS} off ({e}): the figures include its clock reads");
        }
        StatsOff { before }
    }
}

#[cfg(target_os = "linux")]
impl Drop for StatsOff {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn run(_repeat: u32) -> anyhow::Result<()> {
    bail!("the classifier runs on Linux")
}

/// `--repeat N`: rounds of a million runs per kind of packet (the median
/// is printed). Other arguments (cargo bench passes `--bench`) are ignored.
fn main() -> anyhow::Result<()> {
    let mut repeat = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--repeat" {
            let value = args.next().context("--repeat needs a number")?;
            repeat = value
                .parse()
                .with_context(|| format!("--repeat {value}: not a number"))?;
        }
    }
    run(repeat)
}

fn frame(
    build: impl FnOnce(etherparse::PacketBuilderStep<etherparse::Ethernet2Header>) -> Vec<u8>,
) -> Vec<u8> {
    build(etherparse::PacketBuilder::ethernet2([2; 6], [4; 6]))
}

fn tcp(sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    frame(|eth| {
        let builder = eth.ipv4(CLIENT, SERVER, 64).tcp(sport, dport, 1, 64000);
        let builder = if syn { builder.syn() } else { builder.ack(1) };
        let mut out = Vec::new();
        builder.write(&mut out, &[0u8; 64]).expect("a TCP packet");
        out
    })
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    frame(|eth| {
        let mut out = Vec::new();
        eth.ipv4(CLIENT, SERVER, 64)
            .udp(sport, dport)
            .write(&mut out, &[0u8; 64])
            .expect("a UDP packet");
        out
    })
}

fn arp() -> Vec<u8> {
    let mut out = vec![4u8; 6];
    out.extend([2u8; 6]);
    out.extend(0x0806u16.to_be_bytes());
    out.extend([0u8; 28]);
    out
}
