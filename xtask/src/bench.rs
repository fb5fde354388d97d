//! `cargo xtask bench`: throughput and latency in network namespaces, each
//! figure compared with a baseline measured in the same run.
//!
//! Scenarios, all client -> router -> server unless said otherwise:
//!   no-oasis           no daemon, no programs: the baseline
//!   attached-no-match  the classifier attached, no rule matching the traffic
//!   diverted-underlay  header rules claim the traffic for the underlay: the
//!                      broker sees each flow's first packet, the kernel
//!                      passes the rest
//!   overlay-exit       a rule carries the traffic over an overlay: client ->
//!                      exit node (overlay host) -> server, and back; the
//!                      exit node's kernel carries the flow (its fast path),
//!                      the client's broker wraps and opens every packet;
//!                      over links that finish checksums and cut datagram
//!                      runs as NICs do
//!   overlay-fast       the same with the client's fast path on too (the
//!                      kernel wraps and opens the flow's packets)
//!   overlay-wireguard  the overlay-exit detour over WireGuard: the client's
//!                      broker seals for oasis-exit --wireguard-key, which
//!                      opens, NATs and seals the replies in user space
//!                      (the kernel's fast paths do not seal)
//!   wireguard-go       the same detour through a wireguard-go tunnel from
//!                      the client to the overlay host: a peer that also does
//!                      TUN and UDP in user space
//!   kernel-vxlan       the same detour through the kernel's own VXLAN
//!                      tunnel, the overlay host masquerading (nftables)
//!                      what it forwards: the anchor of the overlay rows,
//!                      over the same NIC-like links
//!   fake-underlay      a name rule claims the server's name with the
//!                      underlay as carrier and fake answers: the tools talk
//!                      to a fake address, the broker sees each flow's first
//!                      packets, the kernel rewrites the rest
//!
//! For each scenario with a daemon, the kernel's own cost per run of each
//! program (kernel.bpf_stats_enabled on for the benchmark's length).
//!
//! Then the DNS benchmark (bench_dns.rs): the broker with 10,000 name rules
//! against dnsmasq serving the same zone from its cache; and the scale
//! benchmarks (bench_scale.rs): new flows per second through the broker,
//! and an import of a million name rules; and a rule holding 100,000
//! destination prefixes against one holding one.
//!
//! The scenarios run interleaved in rounds, each round starting with a
//! different one, so that drift on a shared machine hits all of them alike.

use std::time::Duration;

use anyhow::bail;
use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, SERVER_V4, Topology};

use crate::bench_common::{Figure, IPERF_PORT, cli, iperf, iperf_at, median, program_stats, write_figures};
use crate::bench_paths::{Carried, Profile, wait_for_exit_stats};

const SOCKPERF_PORT: u16 = 11111;
/// The client's wg-quick file for the exit, in the topology's directory.
const WG_CONF: &str = "exit-wireguard.conf";

/// A file only its owner may read (keys).
fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
const WG_PORT: u16 = 7600;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    NoOasis,
    AttachedNoMatch,
    DivertedUnderlay,
    OverlayExit,
    OverlayFast,
    OverlayModule,
    OverlayWireguard,
    WireguardGo,
    KernelVxlan,
    FakeUnderlay,
    MetricUnderlay,
}

const SCENARIOS: [Scenario; 11] = [
    Scenario::NoOasis,
    Scenario::AttachedNoMatch,
    Scenario::DivertedUnderlay,
    Scenario::OverlayExit,
    Scenario::OverlayFast,
    Scenario::OverlayModule,
    Scenario::OverlayWireguard,
    Scenario::WireguardGo,
    Scenario::KernelVxlan,
    Scenario::FakeUnderlay,
    Scenario::MetricUnderlay,
];

/// The server's name in the benchmark's zone.
const SERVER_NAME: &str = "server.test";

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::NoOasis => "no-oasis",
            Scenario::AttachedNoMatch => "attached-no-match",
            Scenario::DivertedUnderlay => "diverted-underlay",
            Scenario::OverlayExit => "overlay-exit",
            Scenario::OverlayFast => "overlay-fast",
            Scenario::OverlayModule => "overlay-module",
            Scenario::OverlayWireguard => "overlay-wireguard",
            Scenario::WireguardGo => "wireguard-go",
            Scenario::KernelVxlan => "kernel-vxlan",
            Scenario::FakeUnderlay => "fake-underlay",
            Scenario::MetricUnderlay => "metric-underlay",
        }
    }

    /// Rules the daemon holds in this scenario; None: no daemon.
    fn rules(self) -> Option<&'static [&'static [&'static str]]> {
        match self {
            Scenario::NoOasis | Scenario::WireguardGo | Scenario::KernelVxlan => None,
            Scenario::AttachedNoMatch => Some(&[&["--proto", "tcp", "--dport", "1", "--via", "underlay"]]),
            Scenario::DivertedUnderlay => Some(&[
                &["--proto", "tcp", "--dport", "5201", "--via", "underlay"],
                &["--proto", "udp", "--dport", "11111", "--via", "underlay"],
            ]),
            Scenario::OverlayExit
            | Scenario::OverlayFast
            | Scenario::OverlayModule
            | Scenario::OverlayWireguard => Some(&[
                &["--proto", "tcp", "--dport", "5201", "--via", "exit"],
                &["--proto", "udp", "--dport", "11111", "--via", "exit"],
            ]),
            Scenario::FakeUnderlay => Some(&[&["--name-exact", SERVER_NAME, "--via", "underlay"]]),
            // The Monitor may choose the exit; the underlay, as fast, stays.
            Scenario::MetricUnderlay => Some(&[
                &["--proto", "tcp", "--dport", "5201", "--metric", "latency"],
                &["--proto", "udp", "--dport", "11111", "--metric", "latency"],
            ]),
        }
    }
}

#[derive(Default)]
struct Samples {
    upload_bps: Vec<f64>,
    download_bps: Vec<f64>,
    /// CPU of the carrier's own processes (broker and exit node, or the two
    /// wireguard-go), percent of one core, during the upload.
    carrier_cpu: Vec<f64>,
    /// The whole host's busy CPU (every process, interrupts and softirqs,
    /// from /proc/stat), percent of one core, during the upload: what a
    /// carrier in the kernel costs shows only here.
    host_cpu: Vec<f64>,
    rtt_p50_us: Vec<f64>,
    rtt_p99_us: Vec<f64>,
    /// Nanoseconds per run of each kernel program, as the kernel counts.
    kernel_ns: std::collections::BTreeMap<String, Vec<f64>>,
    /// The share (percent) of each carrier's packets its kernel carried,
    /// over the whole measurement (see `bench_paths::Carried`).
    kernel_share: std::collections::BTreeMap<&'static str, Vec<f64>>,
    /// The carrier's processes' CPU during an upload paced to 10 Mbit/s,
    /// percent of one core.
    carrier_cpu_10mbit: Vec<f64>,
    /// The Monitor's probe bytes per second, per carrier, in steady state.
    probe_bytes: std::collections::BTreeMap<String, Vec<f64>>,
}

/// The benchmark's parts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Throughput, latency and the kernel programs' cost per scenario.
    Traffic,
    /// DNS against dnsmasq.
    Dns,
    /// New flows per second through the broker.
    Flows,
    /// An import of a million name rules.
    Import,
    /// A rule with 100,000 destination prefixes: load time, classifier cost.
    PrefixSet,
    /// A list of 100,000 prefixes by URL: a changed copy's refresh, from
    /// downloaded to in effect, and that nothing failed open meanwhile.
    ListRefresh,
    /// Overlay code modules: start from the cache, a 1 MB module's compile.
    Modules,
    /// The classifier's cost per check (BPF_PROG_TEST_RUN, no network).
    Classifier,
    /// The REST API with 10,000 live flows: /connections, WebSocket
    /// clients' cost, closing a flow.
    Api,
}

/// Turns the kernel's per-program run statistics on for the benchmark and
/// back to what they were after.
struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> BpfStats {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        if let Err(e) = std::fs::write(BPF_STATS, "1") {
            eprintln!("bench: cannot enable {BPF_STATS} ({e}); no kernel cost figures");
        }
        BpfStats { before }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

pub fn run(
    seconds: u32,
    repeat: u32,
    only: Option<Part>,
    scenarios: &[String],
    profile: bool,
) -> anyhow::Result<()> {
    for name in scenarios {
        if !SCENARIOS.iter().any(|s| s.name() == name) {
            let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name()).collect();
            bail!(
                "no traffic scenario {name:?}: the scenarios are {}",
                known.join(", ")
            );
        }
    }
    let chosen = |scenario: Scenario| {
        scenarios.is_empty()
            || scenario == Scenario::NoOasis
            || scenarios.iter().any(|n| n == scenario.name())
    };
    crate::setup::ensure()?;
    if !crate::is_root() {
        bail!("the benchmark creates network namespaces and needs root: `sudo -E cargo xtask bench`");
    }
    if only == Some(Part::Classifier) {
        let figures = crate::bench_classifier::run(repeat)?;
        return write_figures(&figures);
    }
    if profile {
        crate::setup::ensure_optional("perf", "linux-perf")?;
    }
    let oasis = crate::build_oasis(true)?;
    // SAFETY: xtask is single-threaded at this point.
    unsafe {
        std::env::set_var("OASIS_BIN", &oasis);
        std::env::set_var("OASIS_DAEMON_LOG", "info");
    }

    let _stats = BpfStats::enable();
    let mut net = Topology::new();
    crate::bench_dns::start_zone(&mut net)?;
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
    // The exit serves the client both ways: the plain format by address,
    // WireGuard by key (overlay-wireguard).
    let (exit_private, exit_public) = oasis_tests::wg_keys(&net.overlay);
    let (client_private, client_public) = oasis_tests::wg_keys(&net.client);
    let exit_key = net.dir.join("exit.key");
    write_secret(&exit_key, &exit_private)?;
    let exit_key = exit_key.to_string_lossy().into_owned();
    net.start_exit(&[
        "--client",
        CLIENT_V4,
        "--wireguard-key",
        &exit_key,
        "--peer",
        &client_public,
    ]);
    write_secret(
        &net.dir.join(WG_CONF),
        &format!(
            "[Interface]\nPrivateKey = {client_private}\nAddress = 10.87.0.1/32\n\
             [Peer]\nPublicKey = {exit_public}\nEndpoint = {OVERLAY_V4}:51820\nAllowedIPs = 0.0.0.0/0\n"
        ),
    )?;
    net.publish(
        "exit.xml",
        r#"<overlay name="bench"><entry host="10.77.3.2" port="7400"/></overlay>"#,
    );
    let spec_url = format!("{}/exit.xml", net.start_spec_server());
    start_wireguard(&mut net)?;
    start_vxlan(&net);
    std::thread::sleep(Duration::from_millis(300));

    let mut samples: Vec<Samples> = SCENARIOS.iter().map(|_| Samples::default()).collect();
    let wanted = |part: Part| only.is_none_or(|only| only == part);
    let traffic_rounds = if wanted(Part::Traffic) { repeat as usize } else { 0 };
    for round in 0..traffic_rounds {
        for offset in 0..SCENARIOS.len() {
            let index = (round + offset) % SCENARIOS.len();
            let scenario = SCENARIOS[index];
            if !chosen(scenario) {
                continue;
            }
            eprintln!(
                "bench: round {}/{repeat}: {} ({seconds} s per measurement)",
                round + 1,
                scenario.name()
            );
            let profile = profile && round == 0;
            if let Err(e) = measure(
                &mut net,
                scenario,
                &spec_url,
                seconds,
                profile,
                &mut samples[index],
            ) {
                // What the carriers said last is what explains a failure.
                for name in ["oasis", "oasis-exit"] {
                    let Some(process) = net.find_process(name) else {
                        continue;
                    };
                    let log = process.log();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    eprintln!("bench: the last lines of {name}'s log:");
                    for line in tail.iter().rev() {
                        eprintln!("  {line}");
                    }
                }
                return Err(e.context(format!("scenario {}", scenario.name())));
            }
        }
    }
    let mut figures = if traffic_rounds > 0 {
        figures(&mut samples)
    } else {
        Vec::new()
    };
    if wanted(Part::Dns) {
        figures.extend(crate::bench_dns::run(&mut net, seconds, repeat)?);
    }
    if wanted(Part::Flows) {
        figures.extend(crate::bench_scale::new_flows(
            &mut net,
            &spec_url,
            seconds.min(2),
            repeat,
        )?);
    }
    if wanted(Part::Import) {
        figures.extend(crate::bench_scale::import(&mut net)?);
    }
    if wanted(Part::Modules) {
        figures.extend(crate::bench_scale::modules(&mut net, &spec_url)?);
    }
    if wanted(Part::PrefixSet) {
        figures.extend(crate::bench_scale::prefix_set(&mut net, seconds, repeat)?);
    }
    if wanted(Part::ListRefresh) {
        let base = spec_url.trim_end_matches("/exit.xml").to_string();
        figures.extend(crate::bench_scale::list_refresh(&mut net, &base, repeat)?);
    }
    if wanted(Part::Api) {
        figures.extend(crate::bench_api::run(&mut net, repeat)?);
    }
    if wanted(Part::Classifier) {
        figures.extend(crate::bench_classifier::run(repeat)?);
    }
    write_figures(&figures)
}

/// A wireguard-go tunnel client (10.88.0.1) <-> overlay host (10.88.0.2);
/// the router sends replies for 10.88.0.0/24 back through the overlay host.
/// Traffic takes the tunnel only while the wireguard-go scenario routes the
/// server's address into it.
fn start_wireguard(net: &mut Topology) -> anyhow::Result<()> {
    let (client_key, client_pub) = oasis_tests::wg_keys(&net.client);
    let (overlay_key, overlay_pub) = oasis_tests::wg_keys(&net.overlay);
    let (client_if, overlay_if) = wireguard_interfaces();
    for (ns, process, iface) in [
        (net.client.clone(), "wg-client", &client_if),
        (net.overlay.clone(), "wg-overlay", &overlay_if),
    ] {
        net.start_wireguard_go(&ns, process, iface);
    }
    let configure = |ns: &oasis_tests::Netns,
                     iface: &str,
                     private: &str,
                     address: &str,
                     peer: &str,
                     allowed: &str,
                     endpoint: Option<String>| {
        let key_file = net.dir.join(format!("{}.key", ns.name));
        std::fs::write(&key_file, private).expect("key file");
        let mut args = vec![
            "wg".to_string(),
            "set".into(),
            iface.into(),
            "private-key".into(),
            key_file.to_string_lossy().into_owned(),
            "listen-port".into(),
            WG_PORT.to_string(),
            "peer".into(),
            peer.into(),
            "allowed-ips".into(),
            allowed.into(),
        ];
        if let Some(endpoint) = endpoint {
            args.extend(["endpoint".into(), endpoint]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ns.run(&args);
        ns.run(&["ip", "addr", "add", address, "dev", iface]);
        ns.run(&["ip", "link", "set", iface, "up"]);
    };
    configure(
        &net.client,
        &client_if,
        &client_key,
        "10.88.0.1/24",
        &overlay_pub,
        "0.0.0.0/0",
        Some(format!("{OVERLAY_V4}:{WG_PORT}")),
    );
    configure(
        &net.overlay,
        &overlay_if,
        &overlay_key,
        "10.88.0.2/24",
        &client_pub,
        "10.88.0.1/32",
        None,
    );
    net.overlay.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    net.router
        .run(&["ip", "route", "add", "10.88.0.0/24", "via", OVERLAY_V4]);
    Ok(())
}

/// The kernel's own tunnel over the same detour, the anchor of the overlay
/// rows: VXLAN client (10.89.0.1) <-> overlay host (10.89.0.2), which
/// masquerades what it forwards toward the server (nftables), as the exit
/// node does. Traffic takes it only while the kernel-vxlan scenario
/// routes the server's address into it.
fn start_vxlan(net: &Topology) {
    for (ns, local, remote, address) in [
        (&net.client, CLIENT_V4, OVERLAY_V4, "10.89.0.1/24"),
        (&net.overlay, OVERLAY_V4, CLIENT_V4, "10.89.0.2/24"),
    ] {
        ns.run(&[
            "ip", "link", "add", VXLAN_IF, "type", "vxlan", "id", "42", "local", local, "remote", remote,
            "dstport", "4789",
        ]);
        ns.run(&["ip", "addr", "add", address, "dev", VXLAN_IF]);
        ns.run(&["ip", "link", "set", VXLAN_IF, "up"]);
    }
    net.overlay.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    net.overlay.run(&[
        "nft",
        "add table ip oasis_bench; \
         add chain ip oasis_bench post { type nat hook postrouting priority 100; }; \
         add rule ip oasis_bench post ip saddr 10.89.0.0/24 oifname o0 masquerade",
    ]);
}

const VXLAN_IF: &str = "vxbench";

/// Interface names for the client's and the overlay host's wireguard-go.
fn wireguard_interfaces() -> (String, String) {
    let id = std::process::id() % 100_000;
    (format!("wgc{id}"), format!("wgo{id}"))
}

/// One sample of each metric for one scenario.
fn measure(
    net: &mut Topology,
    scenario: Scenario,
    spec_url: &str,
    seconds: u32,
    profile: bool,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    // The overlays over links that behave as NICs do (see
    // `Topology::links_like_nics`): the fast paths leave checksums to the
    // device. Every other scenario over plain veth.
    net.links_like_nics(matches!(
        scenario,
        Scenario::OverlayExit | Scenario::OverlayFast | Scenario::OverlayModule | Scenario::KernelVxlan
    ));
    let daemon = start_daemon(net, scenario, spec_url)?;
    if scenario == Scenario::KernelVxlan {
        net.client.run(&[
            "ip",
            "route",
            "add",
            &format!("{SERVER_V4}/32"),
            "via",
            "10.89.0.2",
            "dev",
            VXLAN_IF,
        ]);
    }
    if scenario == Scenario::WireguardGo {
        net.client.run(&[
            "ip",
            "route",
            "add",
            &format!("{SERVER_V4}/32"),
            "dev",
            &wireguard_interfaces().0,
        ]);
    }
    // The tools talk to the server's address, or in fake-underlay to the
    // fake address its name resolves to through the broker.
    let target = if scenario == Scenario::FakeUnderlay {
        let answer = net.dig(true, &[SERVER_NAME, "A"]);
        match answer.answers.first() {
            Some(fake) if fake.starts_with("198.1") => fake.clone(),
            _ => bail!("{SERVER_NAME} got no fake address:\n{}", answer.text),
        }
    } else {
        SERVER_V4.to_string()
    };
    let carrier_pids: Vec<u32> = match scenario {
        Scenario::NoOasis => vec![],
        Scenario::WireguardGo => vec![net.process("wg-client").pid(), net.process("wg-overlay").pid()],
        Scenario::OverlayExit
        | Scenario::OverlayFast
        | Scenario::OverlayModule
        | Scenario::OverlayWireguard => {
            vec![net.process("oasis").pid(), net.process("oasis-exit").pid()]
        }
        _ => vec![net.process("oasis").pid()],
    };

    let overlay = matches!(
        scenario,
        Scenario::OverlayExit | Scenario::OverlayFast | Scenario::OverlayModule | Scenario::OverlayWireguard
    );
    let programs_before = daemon
        .as_ref()
        .map(|d| program_stats(d, net, overlay))
        .unwrap_or_default();
    let carried_before = daemon.as_ref().filter(|_| overlay).map(|d| Carried::read(net, d));
    let before: u64 = carrier_pids.iter().map(|pid| cpu_ticks(*pid)).sum();
    let host_before = host_busy_ticks();
    let upload = iperf(net, &target, seconds, false)?;
    let host_ticks = host_busy_ticks().saturating_sub(host_before);
    let ticks: u64 = carrier_pids.iter().map(|pid| cpu_ticks(*pid)).sum::<u64>() - before;
    samples
        .carrier_cpu
        .push(100.0 * ticks as f64 / (ticks_per_second() * f64::from(seconds)));
    samples
        .host_cpu
        .push(100.0 * host_ticks as f64 / (ticks_per_second() * f64::from(seconds)));
    let download = iperf(net, &target, seconds, true)?;
    let (p50, p99) = sockperf_rtt(net, &target, seconds)?;
    eprintln!(
        "bench:   upload {:.2} Gbit/s, download {:.2} Gbit/s, rtt p50 {p50:.2} us, p99 {p99:.2} us",
        upload / 1e9,
        download / 1e9
    );
    samples.upload_bps.push(upload);
    samples.download_bps.push(download);
    samples.rtt_p50_us.push(p50);
    samples.rtt_p99_us.push(p99);
    if let (Some(before), Some(daemon)) = (carried_before, &daemon) {
        wait_for_exit_stats(net);
        for (name, share) in Carried::read(net, daemon).shares_since(before) {
            samples.kernel_share.entry(name).or_default().push(share);
        }
    }
    if !carrier_pids.is_empty() {
        // The paper's figure: a carrier's CPU at a rate an ordinary user
        // uploads at, long enough for the 10 ms ticks to mean something.
        let paced = seconds.max(5);
        let before: u64 = carrier_pids.iter().map(|pid| cpu_ticks(*pid)).sum();
        iperf_at(net, &target, paced, false, Some("10M"))?;
        let ticks = carrier_pids.iter().map(|pid| cpu_ticks(*pid)).sum::<u64>() - before;
        samples
            .carrier_cpu_10mbit
            .push(100.0 * ticks as f64 / (ticks_per_second() * f64::from(paced)));
    }
    if profile {
        // Extra runs, not measured: perf costs CPU of its own.
        for reverse in [false, true] {
            let name = format!("{}-{}", scenario.name(), if reverse { "down" } else { "up" });
            let recording = Profile::start(&crate::workspace_root().join("target/bench"), &name, seconds)?;
            iperf(net, &target, seconds, reverse)?;
            eprintln!("bench:   profile: {}", recording.finish()?.display());
        }
    }

    if scenario == Scenario::KernelVxlan {
        net.client
            .run(&["ip", "route", "del", &format!("{SERVER_V4}/32"), "dev", VXLAN_IF]);
    }
    if scenario == Scenario::WireguardGo {
        net.client.run(&[
            "ip",
            "route",
            "del",
            &format!("{SERVER_V4}/32"),
            "dev",
            &wireguard_interfaces().0,
        ]);
    }
    if let Some(daemon) = &daemon {
        kernel_costs(&programs_before, &program_stats(daemon, net, overlay), samples);
        check_scenario(net, daemon, scenario, samples)?;
        if !net.process("oasis").terminate(Duration::from_secs(10)) {
            bail!("the daemon did not stop cleanly");
        }
    }
    Ok(())
}

/// The daemon of a scenario with its overlay and rules, or none.
fn start_daemon(net: &mut Topology, scenario: Scenario, spec_url: &str) -> anyhow::Result<Option<Daemon>> {
    Ok(match scenario.rules() {
        None => None,
        Some(rules) => {
            let _ = std::fs::remove_file(net.dir.join("config.yaml"));
            let extra = match scenario {
                Scenario::FakeUnderlay => net.dns_config("underlay_answers: fake"),
                Scenario::OverlayFast => "overlay_fast_path: true\n".to_string(),
                // The client's broker wraps every packet (the exit's kernel
                // still carries the flow), against which the fast path is
                // measured.
                Scenario::OverlayExit => "overlay_fast_path: false\n".to_string(),
                _ => String::new(),
            };
            let daemon = Daemon::start(net, &extra);
            if matches!(
                scenario,
                Scenario::OverlayExit | Scenario::OverlayFast | Scenario::MetricUnderlay
            ) {
                cli(&daemon, net, &["overlay", "add", "exit", spec_url])?;
            }
            if scenario == Scenario::OverlayWireguard {
                let file = net.dir.join(WG_CONF).to_string_lossy().into_owned();
                cli(&daemon, net, &["overlay", "add", "exit", "--wireguard", &file])?;
            }
            if scenario == Scenario::OverlayModule {
                let module = crate::workspace_root()
                    .join("target/modules/wasm32-unknown-unknown/release/pass_through.wasm");
                cli(
                    &daemon,
                    net,
                    &[
                        "overlay",
                        "add",
                        "exit",
                        spec_url,
                        "--module-file",
                        &module.to_string_lossy(),
                    ],
                )?;
            }
            for rule in rules {
                let mut args = vec!["rule", "add"];
                args.extend_from_slice(rule);
                cli(&daemon, net, &args)?;
            }
            // Let the program load's after-effects (JIT, RCU work) pass.
            std::thread::sleep(Duration::from_secs(1));
            Some(daemon)
        }
    })
}

/// Each program's cost per run over the measurement, from the kernel's
/// run counts before and after.
fn kernel_costs(before: &[(String, u64, u64)], after: &[(String, u64, u64)], samples: &mut Samples) {
    for (name, count, ns) in after {
        let Some((_, count_before, ns_before)) = before.iter().find(|(n, _, _)| n == name) else {
            continue;
        };
        let runs = count.saturating_sub(*count_before);
        if runs > 0 {
            let per_run = ns.saturating_sub(*ns_before) as f64 / runs as f64;
            eprintln!("bench:   kernel: {name}: {per_run:.0} ns per run over {runs} runs");
            samples.kernel_ns.entry(name.clone()).or_default().push(per_run);
        }
    }
}

/// What must hold after a scenario's run for its figures to mean
/// anything (traffic diverted, or not; carried by the overlay or the
/// module; left in the kernel), and the scenario's own figures.
fn check_scenario(
    net: &Topology,
    daemon: &Daemon,
    scenario: Scenario,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let status = daemon.json(net, &["status", "--json"]);
    let diverted = status["tun"]["diverted_packets"].as_u64().unwrap_or(0);
    match scenario {
        Scenario::AttachedNoMatch if diverted != 0 => {
            bail!("the no-match scenario diverted {diverted} packets")
        }
        Scenario::DivertedUnderlay
        | Scenario::OverlayExit
        | Scenario::OverlayFast
        | Scenario::OverlayModule
        | Scenario::OverlayWireguard
            if diverted == 0 =>
        {
            bail!("nothing was diverted; the measurement would be meaningless")
        }
        Scenario::OverlayExit | Scenario::OverlayModule | Scenario::OverlayWireguard
            if status["broker"]["overlay_received"].as_u64().unwrap_or(0) == 0 =>
        {
            bail!("nothing came back through the overlay")
        }
        Scenario::OverlayFast if status["classifier"]["encap_packets"].as_u64().unwrap_or(0) == 0 => {
            bail!("the kernel wrapped nothing: {}", status["classifier"])
        }
        Scenario::OverlayModule => {
            let module = &daemon.json(net, &["overlay", "show", "exit", "--json"])["module_status"];
            if module["to_entries"].as_u64().unwrap_or(0) == 0 {
                bail!("the module carried nothing: {module}");
            }
        }
        Scenario::MetricUnderlay => {
            let measured = status["classifier"]["measured_egress"].as_u64().unwrap_or(0);
            if measured == 0 || diverted > 100 {
                bail!(
                    "the Monitor's flows did not stay in the kernel: {diverted} packets reached the broker, \
                     {measured} were measured in the kernel"
                );
            }
            let view = daemon.json(net, &["monitor", "--json"]);
            for carrier in view["carriers"].as_array().into_iter().flatten() {
                let name = carrier["name"].as_str().unwrap_or("?").to_string();
                let rate = carrier["probe_bytes_per_second"].as_f64().unwrap_or(0.0);
                samples.probe_bytes.entry(name).or_default().push(rate);
            }
            eprintln!(
                "bench:   {diverted} packets reached the broker, {measured} were measured in the kernel; \
                 probes {:.0} B/s",
                view["probe_bytes_per_second"].as_f64().unwrap_or(0.0)
            );
        }
        Scenario::FakeUnderlay => {
            let rewritten = status["classifier"]["nat_egress"].as_u64().unwrap_or(0);
            if rewritten == 0 {
                bail!("the kernel rewrote nothing: the flows did not take the in-kernel NAT");
            }
            eprintln!(
                "bench:   {diverted} packets reached the broker, {rewritten} were rewritten in the kernel"
            );
        }
        _ => {}
    }
    Ok(())
}

/// sockperf UDP ping-pong; full round-trip p50 and p99 in microseconds.
fn sockperf_rtt(net: &Topology, target: &str, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let output = net.client.output(&[
        "sockperf",
        "ping-pong",
        "-i",
        target,
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

fn figures(samples: &mut [Samples]) -> Vec<Figure> {
    let medians: Vec<[f64; 6]> = samples
        .iter_mut()
        .map(|s| {
            [
                median(&mut s.upload_bps) / 1e9,
                median(&mut s.download_bps) / 1e9,
                median(&mut s.carrier_cpu),
                median(&mut s.rtt_p50_us),
                median(&mut s.rtt_p99_us),
                median(&mut s.host_cpu),
            ]
        })
        .collect();
    let index = |s: Scenario| SCENARIOS.iter().position(|x| *x == s).expect("listed");
    let base = medians[index(Scenario::NoOasis)];
    let mut out = Vec::new();
    let was_measured: Vec<bool> = samples.iter().map(|s| !s.upload_bps.is_empty()).collect();
    let measured = |s: Scenario| was_measured[index(s)];
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        if !measured(*scenario) {
            continue;
        }
        let [upload, download, cpu, p50, p99, host] = medians[i];
        let (lo, hi) = spread(&samples[i].upload_bps);
        let mut push = |metric: &str, value: f64, unit: &str, against: Option<(Scenario, f64)>| {
            out.push(Figure {
                scenario: scenario.name().into(),
                metric: metric.into(),
                value,
                unit: unit.into(),
                baseline: against.map(|(s, _)| s.name().into()),
                ratio: against.map(|(_, b)| value / b),
            });
        };
        let compared = *scenario != Scenario::NoOasis;
        let vs_base = |b: f64| compared.then_some((Scenario::NoOasis, b));
        push("tcp_upload_throughput", upload, "Gbit/s", vs_base(base[0]));
        push("tcp_upload_throughput_min", lo / 1e9, "Gbit/s", None);
        push("tcp_upload_throughput_max", hi / 1e9, "Gbit/s", None);
        push("tcp_download_throughput", download, "Gbit/s", vs_base(base[1]));
        push("upload_download_ratio", upload / download, "", None);
        if *scenario != Scenario::NoOasis {
            push("carrier_cpu_upload", cpu, "% of one core", None);
            push(
                "carrier_cpu_per_gbit",
                cpu / upload,
                "% of one core per Gbit/s",
                None,
            );
        }
        push(
            "host_cpu_per_gbit",
            host / upload,
            "% of one core per Gbit/s",
            vs_base(base[5] / base[0]),
        );
        push("udp_rtt_p50", p50, "us", vs_base(base[3]));
        push("udp_rtt_p99", p99, "us", vs_base(base[4]));
        if compared {
            push("udp_rtt_p50_added", p50 - base[3], "us", None);
        }
        for (program, values) in samples[i].kernel_ns.iter_mut() {
            push(
                &format!("kernel_ns_per_run {program}"),
                median(values),
                "ns",
                None,
            );
        }
        for (name, values) in samples[i].kernel_share.iter_mut() {
            push(name, median(values), "% of the carrier's traffic", None);
        }
        if !samples[i].carrier_cpu_10mbit.is_empty() {
            push(
                "carrier_cpu_at_10mbit",
                median(&mut samples[i].carrier_cpu_10mbit),
                "% of one core",
                None,
            );
        }
        for (carrier, values) in samples[i].probe_bytes.iter_mut() {
            push(
                &format!("probe_bytes_per_second {carrier}"),
                median(values),
                "B/s",
                None,
            );
        }
        // Throughput and the round trip added, against another carrier.
        let mut against = |other: Scenario| {
            let theirs = medians[index(other)];
            let vs = |v: f64| Some((other, v));
            push("tcp_upload_throughput", upload, "Gbit/s", vs(theirs[0]));
            push("tcp_download_throughput", download, "Gbit/s", vs(theirs[1]));
            push("udp_rtt_p50_added", p50 - base[3], "us", vs(theirs[3] - base[3]));
            push(
                "carrier_cpu_per_gbit",
                cpu / upload,
                "% of one core per Gbit/s",
                vs(theirs[2] / theirs[0]),
            );
            push(
                "host_cpu_per_gbit",
                host / upload,
                "% of one core per Gbit/s",
                vs(theirs[5] / theirs[0]),
            );
        };
        if *scenario == Scenario::OverlayFast && measured(Scenario::OverlayExit) {
            against(Scenario::OverlayExit);
        }
        if matches!(scenario, Scenario::OverlayFast | Scenario::OverlayExit)
            && measured(Scenario::KernelVxlan)
        {
            against(Scenario::KernelVxlan);
        }
        if matches!(scenario, Scenario::OverlayExit | Scenario::OverlayWireguard)
            && measured(Scenario::WireguardGo)
        {
            against(Scenario::WireguardGo);
        }
        if *scenario == Scenario::OverlayModule && measured(Scenario::OverlayExit) {
            let plain = medians[index(Scenario::OverlayExit)];
            let vs_plain = |v: f64| Some((Scenario::OverlayExit, v));
            push("tcp_upload_throughput", upload, "Gbit/s", vs_plain(plain[0]));
            push("tcp_download_throughput", download, "Gbit/s", vs_plain(plain[1]));
            push("udp_rtt_p50_added_by_module", p50 - plain[3], "us", None);
        }
    }
    out
}

fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// The host's busy time over all CPUs, in clock ticks: every field of
/// /proc/stat's `cpu` line but idle and iowait.
fn host_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum()
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

pub(crate) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no side effects.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}
