//! `cargo xtask soak --minutes N`: Oasis under a steady mixed load for a
//! long while, in throw-away namespaces, watching for anything that grows
//! without bound. The load: fresh UDP flows through the broker, TCP
//! connections through an exit node, DNS queries for claimed and unclaimed
//! names, header rules added and deleted, an overlay joined and left, the
//! exit restarted, the daemon restarted. Every few seconds it samples the
//! daemon's and the exit's memory and open files and the daemon's tables;
//! at the end it compares the later half of each series with the earlier
//! half (their peaks), fails when one grew, and writes
//! `target/soak/report.json`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use oasis_tests::{CLIENT_V4, Daemon, SERVER_V4, Topology};
use serde_json::{Value, json};

const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RULE_CHURN_EVERY: Duration = Duration::from_secs(5);
const OVERLAY_CHURN_EVERY: Duration = Duration::from_secs(60);
const EXIT_RESTART_EVERY: Duration = Duration::from_secs(90);
const DAEMON_RESTART_EVERY: Duration = Duration::from_secs(150);

/// One series: how it is read, and how much growth is noise.
struct Series {
    name: &'static str,
    unit: &'static str,
    /// Growth of the later half's peak over the earlier half's that is
    /// still noise: this much absolute, plus a quarter.
    slack: f64,
    values: Vec<f64>,
}

pub fn run(minutes: u32) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    if !crate::is_root() {
        bail!("the soak creates network namespaces and needs root: `sudo -E cargo xtask soak`");
    }
    let oasis = crate::build_oasis(true)?;
    // SAFETY: xtask is single-threaded here.
    unsafe {
        std::env::set_var("OASIS_BIN", &oasis);
        std::env::set_var("OASIS_DAEMON_LOG", "info");
    }
    let mut net = Topology::new();
    let (daemon, spec) = prepare(&mut net)?;
    let stop = net.dir.join("soak-stop");
    start_load(&mut net, &stop);
    let mut series = all_series();
    let started = Instant::now();
    let end = started + Duration::from_secs(u64::from(minutes) * 60);
    let mut churn = Churn::new(daemon, spec, started);
    eprintln!(
        "soak: {minutes} min of mixed load; sampling every {} s",
        SAMPLE_EVERY.as_secs()
    );
    while Instant::now() < end {
        let now = Instant::now();
        churn.step(&mut net, now)?;
        if now >= churn.next_sample {
            churn.next_sample += SAMPLE_EVERY;
            churn.sample(&mut net, &mut series, started)?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&stop, b"")?;
    let load = net.process("load").log();
    report(minutes, &series, &churn, load.lines().last())
}

/// The topology's servers and exit, and a daemon with the soak's rules
/// and overlay; the overlay's specification URL.
fn prepare(net: &mut Topology) -> anyhow::Result<(Daemon, String)> {
    crate::bench_dns::start_zone(net)?;
    net.start_echo_server(9090);
    let server = net.server.clone();
    net.spawn(
        &server,
        "udp-sink",
        &[
            "python3",
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5000))\n\
             while True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)\n",
        ],
    );
    net.start_exit(&["--client", CLIENT_V4]);
    net.publish(
        "exit.xml",
        r#"<overlay name="soak"><entry host="10.77.3.2" port="7400"/></overlay>"#,
    );
    let spec = format!("{}/exit.xml", net.start_spec_server());
    let config = net.dns_config("underlay_answers: fake");
    let daemon = Daemon::start(net, &config);
    daemon.ok(net, &["overlay", "add", "exit", &spec]);
    daemon.ok(
        net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "9090", "--via", "exit",
        ],
    );
    daemon.ok(
        net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "5000", "--via", "underlay",
        ],
    );
    daemon.ok(
        net,
        &[
            "rule",
            "add",
            "--name-suffix",
            "claimed.test",
            "--via",
            "underlay",
        ],
    );
    // The server by a claimed name: its flows go to a fake address, then
    // through the in-kernel NAT.
    daemon.ok(
        net,
        &["rule", "add", "--name-exact", "server.test", "--via", "underlay"],
    );
    Ok((daemon, spec))
}

fn all_series() -> Vec<Series> {
    [
        ("daemon RSS", "MB", 8.0),
        ("daemon open files", "", 8.0),
        ("exit RSS", "MB", 4.0),
        ("exit open files", "", 4.0),
        ("broker flows", "", 500.0),
        ("fake-address entries", "", 50.0),
        ("in-kernel NAT flows", "", 50.0),
    ]
    .into_iter()
    .map(|(name, unit, slack)| Series {
        name,
        unit,
        slack,
        values: Vec::new(),
    })
    .collect()
}

/// The changes the soak makes on a schedule, and how many it made.
struct Churn {
    daemon: Daemon,
    spec: String,
    next_rule: Instant,
    next_overlay: Instant,
    next_exit: Instant,
    next_daemon: Instant,
    next_sample: Instant,
    rule_changes: u64,
    overlay_churns: u64,
    exit_restarts: u64,
    daemon_restarts: u64,
    cached_max: u64,
}

impl Churn {
    fn new(daemon: Daemon, spec: String, started: Instant) -> Churn {
        Churn {
            daemon,
            spec,
            next_rule: started + RULE_CHURN_EVERY,
            next_overlay: started + OVERLAY_CHURN_EVERY,
            next_exit: started + EXIT_RESTART_EVERY,
            next_daemon: started + DAEMON_RESTART_EVERY,
            next_sample: started,
            rule_changes: 0,
            overlay_churns: 0,
            exit_restarts: 0,
            daemon_restarts: 0,
            cached_max: 0,
        }
    }

    /// Makes the changes that are due.
    fn step(&mut self, net: &mut Topology, now: Instant) -> anyhow::Result<()> {
        if now >= self.next_rule {
            self.next_rule += RULE_CHURN_EVERY;
            let added = self.daemon.json(
                net,
                &[
                    "rule",
                    "add",
                    "--proto",
                    "udp",
                    "--dport",
                    "6000-6100",
                    "--via",
                    "underlay",
                    "--json",
                ],
            );
            let id = added["id"].as_u64().context("rule id")?.to_string();
            self.daemon.ok(net, &["rule", "del", &id]);
            self.rule_changes += 2;
        }
        if now >= self.next_overlay {
            self.next_overlay += OVERLAY_CHURN_EVERY;
            self.daemon.ok(net, &["overlay", "add", "churn", &self.spec]);
            self.daemon.ok(net, &["overlay", "del", "churn"]);
            self.overlay_churns += 1;
        }
        if now >= self.next_exit {
            self.next_exit += EXIT_RESTART_EVERY;
            net.process("oasis-exit").terminate(Duration::from_secs(5));
            net.start_exit(&["--client", CLIENT_V4]);
            self.exit_restarts += 1;
        }
        if now >= self.next_daemon {
            self.next_daemon += DAEMON_RESTART_EVERY;
            if !net.process("oasis").terminate(Duration::from_secs(10)) {
                bail!("the daemon did not stop cleanly: {}", net.process("oasis").log());
            }
            self.daemon = Daemon::start(net, "");
            self.daemon_restarts += 1;
        }
        Ok(())
    }

    /// Reads each series once (in `all_series`' order); a line a minute.
    fn sample(&mut self, net: &mut Topology, series: &mut [Series], started: Instant) -> anyhow::Result<()> {
        let status = self.daemon.json(net, &["status", "--json"]);
        let pid = status["pid"].as_u64().context("daemon pid")? as u32;
        let exit_pid = net.process("oasis-exit").pid();
        let values = [
            rss_mb(pid),
            open_files(pid),
            rss_mb(exit_pid),
            open_files(exit_pid),
            status["broker"]["flows"].as_f64().unwrap_or(0.0),
            status["dns"]["fake_entries"].as_f64().unwrap_or(0.0),
            status["dns"]["kernel_nat_flows"].as_f64().unwrap_or(0.0),
        ];
        for (series, value) in series.iter_mut().zip(values) {
            series.values.push(value);
        }
        self.cached_max = self
            .cached_max
            .max(status["classifier"]["cached_flows"].as_u64().unwrap_or(0));
        let elapsed = started.elapsed().as_secs();
        if elapsed % 60 < SAMPLE_EVERY.as_secs() {
            eprintln!(
                "soak: {} min: daemon {:.1} MB, {} files; broker flows {}; {} rule changes, {} overlay joins, {} exit and {} daemon restarts",
                elapsed / 60,
                values[0],
                values[1],
                values[4],
                self.rule_changes,
                self.overlay_churns,
                self.exit_restarts,
                self.daemon_restarts
            );
        }
        Ok(())
    }
}

/// Compares each series' halves, prints the table, writes
/// target/soak/report.json; fails when one grew or a cache overflowed.
fn report(minutes: u32, series: &[Series], churn: &Churn, load: Option<&str>) -> anyhow::Result<()> {
    let mut report = String::new();
    let mut grown = Vec::new();
    let mut rows = Vec::new();
    for series in series {
        let (before, after) = halves(&series.values);
        let limit = before * 1.25 + series.slack;
        let grew = after > limit;
        if grew {
            grown.push(series.name);
        }
        let _ = writeln!(
            report,
            "{:<22} {:>10.1} -> {:>10.1} {:<3} (limit {:.1}){}",
            series.name,
            before,
            after,
            series.unit,
            limit,
            if grew { "  GREW" } else { "" }
        );
        rows.push(json!({"series": series.name, "unit": series.unit, "earlier": before, "later": after, "limit": limit, "grew": grew}));
    }
    let cached_max = churn.cached_max;
    let capacity = u64::from(oasis_common::FLOW_CACHE_ENTRIES + oasis_common::CLAIMED_ENTRIES);
    let _ = writeln!(
        report,
        "{:<22} {:>10} at most (LRU caches, {capacity} entries)",
        "cached verdicts", cached_max
    );
    let _ = writeln!(
        report,
        "{} rule changes, {} overlay joins and leaves, {} exit restarts, {} daemon restarts; load: {}",
        churn.rule_changes,
        churn.overlay_churns,
        churn.exit_restarts,
        churn.daemon_restarts,
        load.unwrap_or("no report")
    );
    print!("{report}");
    let dir = std::path::Path::new("target/soak");
    std::fs::create_dir_all(dir)?;
    let json = json!({"minutes": minutes, "series": rows, "cached_verdicts_max": cached_max,
        "rule_changes": churn.rule_changes, "overlay_churns": churn.overlay_churns,
        "exit_restarts": churn.exit_restarts, "daemon_restarts": churn.daemon_restarts, "load": load});
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty::<Value>(&json)?,
    )?;
    if cached_max > capacity {
        bail!("the verdict caches held {cached_max} entries, more than their {capacity}");
    }
    if !grown.is_empty() {
        bail!("grew during the soak: {}", grown.join(", "));
    }
    Ok(())
}

/// The steady load, one process in the client (in the test's cgroup, so
/// its DNS goes to the daemon): every second 100 DNS queries, 100 new UDP
/// flows through the broker, 20 to a claimed name's fake address (the
/// in-kernel NAT), 10 TCP connections through the exit.
fn start_load(net: &mut Topology, stop: &std::path::Path) {
    let script = format!(
        "import socket,os,random,time,struct\n\
         def query(name):\n  \
           q=struct.pack('>HHHHHH',random.randrange(65536),0x100,1,0,0,0)\n  \
           q+=b''.join(bytes([len(p)])+p.encode() for p in name.split('.'))+b'\\x00\\x00\\x01\\x00\\x01'\n  \
           return q\n\
         stats={{'dns':0,'udp':0,'fake':0,'tcp':0,'errors':0}}\n\
         while not os.path.exists('{stop}'):\n  \
           t=time.monotonic()\n  \
           d=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);d.settimeout(0.5)\n  \
           for i in range(100):\n    \
             n=random.randrange(500);name=('c%d.claimed.test' if i%2 else 'n%d.plain.test')%n\n    \
             try: d.sendto(query(name),('{SERVER_V4}',53));d.recv(2048);stats['dns']+=1\n    \
             except OSError: stats['errors']+=1\n  \
           d.close()\n  \
           for i in range(100):\n    \
             u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(0.2)\n    \
             try: u.sendto(b'x',('{SERVER_V4}',5000));u.recv(16);stats['udp']+=1\n    \
             except OSError: stats['errors']+=1\n    \
             u.close()\n  \
           try: fake=socket.getaddrinfo('server.test',5000,socket.AF_INET,socket.SOCK_DGRAM)[0][4]\n  \
           except OSError: fake=None;stats['errors']+=1\n  \
           for i in range(20 if fake else 0):\n    \
             u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.settimeout(0.2)\n    \
             try: u.sendto(b'f',fake);u.recv(16);stats['fake']+=1\n    \
             except OSError: stats['errors']+=1\n    \
             u.close()\n  \
           for i in range(10):\n    \
             try:\n      \
               c=socket.create_connection(('{SERVER_V4}',9090),timeout=1);c.sendall(b'hi');c.recv(16);c.close();stats['tcp']+=1\n    \
             except OSError: stats['errors']+=1\n  \
           print(stats,flush=True)\n  \
           time.sleep(max(0,1-(time.monotonic()-t)))\n",
        stop = stop.display()
    );
    let cgroup = net.cgroup.display().to_string();
    let client = net.client.clone();
    net.spawn(
        &client,
        "load",
        &[
            "sh",
            "-c",
            &format!("echo $$ > {cgroup}/cgroup.procs && exec python3 -c \"$0\""),
            &script,
        ],
    );
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn open_files(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0.0, |dir| dir.count() as f64)
}

/// The peaks of the earlier and the later half of a series, leaving out
/// its first fifth (start-up: caches and tables filling). Peaks, not
/// medians: the daemon's restarts make its series a sawtooth, whose
/// halves catch it at different phases; a leak raises every peak.
fn halves(values: &[f64]) -> (f64, f64) {
    let settled = &values[values.len() / 5..];
    let (earlier, later) = settled.split_at(settled.len() / 2);
    let peak = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    (peak(earlier), peak(later))
}
