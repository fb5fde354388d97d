//! The kernel datapath end to end, in network namespaces: the daemon in the
//! client diverts what rules claim, reinjects it on the underlay, leaves
//! everything else alone, fails open when killed and restores its rules
//! after a restart. Needs root; `cargo xtask test` runs these.

use std::time::{Duration, Instant};

use oasis_tests::{Daemon, SERVER_V4, SERVER_V6, Topology, prefix_list};
use serde_json::Value;

const DIVERTED_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;

fn status(daemon: &Daemon, topology: &Topology) -> Value {
    daemon.json(topology, &["status", "--json"])
}

fn diverted(daemon: &Daemon, topology: &Topology) -> u64 {
    status(daemon, topology)["tun"]["diverted_packets"]
        .as_u64()
        .expect("tun.diverted_packets")
}

fn rule_packets(daemon: &Daemon, topology: &Topology, id: u64) -> u64 {
    let rules = daemon.json(topology, &["rule", "list", "--json"]);
    rules
        .as_array()
        .expect("a list")
        .iter()
        .find(|r| r["id"] == id)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("rule {id} with a packet count: {rules}"))
}

/// A network with a web server on 8080 and a daemon diverting tcp 8080.
fn diverting_web(net: &mut Topology) -> Daemon {
    net.start_web_server(DIVERTED_PORT);
    let daemon = Daemon::start(net, "");
    add_rule(
        &daemon,
        net,
        &["--proto", "tcp", "--dport", "8080", "--via", "underlay"],
    );
    daemon
}

fn add_rule(daemon: &Daemon, topology: &Topology, args: &[&str]) -> u64 {
    let mut full = vec!["rule", "add"];
    full.extend_from_slice(args);
    full.push("--json");
    daemon.json(topology, &full)["id"].as_u64().expect("rule id")
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn only_claimed_traffic_reaches_the_broker() {
    let mut net = Topology::new();
    net.start_web_server(DIVERTED_PORT);
    net.start_echo_server(OTHER_PORT);
    let daemon = Daemon::start(&mut net, "");
    let id = add_rule(
        &daemon,
        &net,
        &["--proto", "tcp", "--dport", "8080", "--via", "underlay"],
    );

    let before = diverted(&daemon, &net);
    for _ in 0..5 {
        assert_eq!(
            net.http_get(SERVER_V4, DIVERTED_PORT).as_deref(),
            Some("hello from the server\n")
        );
    }
    assert_eq!(
        net.http_get(SERVER_V6, DIVERTED_PORT).as_deref(),
        Some("hello from the server\n"),
        "IPv6 too"
    );
    let after = status(&daemon, &net);
    let diverted_now = after["tun"]["diverted_packets"].as_u64().unwrap();
    // The underlay needs nothing of the broker after a flow's first packet:
    // the rule counts every packet, the broker sees each connection's SYN.
    let counted = rule_packets(&daemon, &net, id);
    assert!(
        diverted_now >= before + 6,
        "each request's first packet is diverted: {before} -> {diverted_now}"
    );
    assert!(counted >= 6 * 3, "the rule counts every packet: {counted}");
    assert!(
        diverted_now - before < counted,
        "the rest passed in the kernel: {} of {counted} diverted",
        diverted_now - before
    );
    assert!(after["broker"]["sent_underlay"].as_u64().unwrap() >= 6);
    assert_eq!(after["broker"]["send_errors"].as_u64(), Some(0));
    assert_eq!(after["heartbeat"]["alive"].as_bool(), Some(true));
    assert_eq!(after["uplinks"][0]["name"].as_str(), Some("c0"));

    // Unclaimed traffic works and never reaches user space.
    let before_other = diverted(&daemon, &net);
    for i in 0..5 {
        let message = format!("echo {i}");
        assert_eq!(
            net.echo(SERVER_V4, OTHER_PORT, &message).as_deref(),
            Some(message.as_str())
        );
    }
    assert_eq!(net.echo(SERVER_V6, OTHER_PORT, "v6").as_deref(), Some("v6"));
    assert_eq!(
        diverted(&daemon, &net),
        before_other,
        "the broker saw packets of an unclaimed flow"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_underlay_rules_bulk_upload_passes_in_the_kernel() {
    let mut net = Topology::new();
    net.start_iperf_server(5201);
    let daemon = Daemon::start(&mut net, "");
    let id = add_rule(
        &daemon,
        &net,
        &["--proto", "tcp", "--dport", "5201", "--via", "underlay"],
    );
    let output = net
        .client
        .run(&["iperf3", "-c", SERVER_V4, "-p", "5201", "-t", "2", "-J"]);
    let report: Value = serde_json::from_str(&output).expect("iperf3 JSON");
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("bytes received");
    assert!(received > 1_000_000, "the upload moved only {received} bytes");
    let status = status(&daemon, &net);
    let through_broker = status["tun"]["diverted_bytes"].as_u64().unwrap();
    assert!(
        through_broker < received / 100,
        "{through_broker} of {received} bytes went through the broker"
    );
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    let counted = rules[0]["bytes"].as_u64().expect("rule bytes");
    assert_eq!(rules[0]["id"].as_u64(), Some(id));
    assert!(
        counted >= received,
        "the rule counted {counted} of {received} bytes"
    );
    assert_eq!(status["broker"]["send_errors"].as_u64(), Some(0));
    let flows = || daemon.json(&net, &["flows", "--json"]);
    let listed = flows();
    let all = listed.as_array().expect("a list of flows");
    assert!(
        !all.is_empty() && all.iter().all(|f| f["in_kernel"] == true),
        "{listed}"
    );
    // iperf3 closed its connections: the kernel saw their FINs, so the
    // broker forgets them once quiet for TCP's closing lifetime (10 s),
    // not its idle one (two hours).
    let deadline = Instant::now() + Duration::from_secs(40);
    while flows().as_array().is_some_and(|all| !all.is_empty()) {
        assert!(Instant::now() < deadline, "closed flows still held: {}", flows());
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn deleting_a_rule_stops_diversion_of_new_flows() {
    let mut net = Topology::new();
    let daemon = diverting_web(&mut net);
    let id = 1;
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    assert!(diverted(&daemon, &net) > 0);

    let deleted = daemon.cli(&net, &["rule", "del", &id.to_string()]);
    assert!(deleted.status.success());
    assert!(String::from_utf8_lossy(&deleted.stdout).contains("deleted rule"));
    let before = diverted(&daemon, &net);
    for _ in 0..3 {
        assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    }
    assert_eq!(diverted(&daemon, &net), before);
    assert_eq!(
        daemon.json(&net, &["rule", "list", "--json"]),
        Value::Array(vec![])
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn killed_daemon_fails_open_within_five_seconds() {
    let mut net = Topology::new();
    let _daemon = diverting_web(&mut net);
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());

    net.process("oasis").kill_hard();
    let killed = Instant::now();
    let mut recovered = None;
    while killed.elapsed() < Duration::from_secs(5) {
        if net.http_get(SERVER_V4, DIVERTED_PORT).is_some() {
            recovered = Some(killed.elapsed());
            break;
        }
    }
    let recovered = recovered.expect("traffic on the diverted port did not flow again within 5 s of kill -9");
    println!("traffic flowed again {recovered:?} after kill -9");
    // Nothing of the dead daemon is left to divert: no TUN.
    let links = net.client.run(&["ip", "-o", "link"]);
    assert!(!links.contains("oasis0"), "the TUN outlived the daemon: {links}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn restart_restores_rules_from_the_config() {
    let mut net = Topology::new();
    let daemon = diverting_web(&mut net);
    add_rule(&daemon, &net, &["--dst", "203.0.113.0/24", "--via", "underlay"]);
    let rules_before = daemon.json(&net, &["rule", "list", "--json"]);

    assert!(
        net.process("oasis").terminate(Duration::from_secs(10)),
        "SIGTERM did not stop the daemon cleanly"
    );
    let links = net.client.run(&["ip", "-o", "link"]);
    assert!(!links.contains("oasis0"), "the TUN outlived a clean stop");
    assert!(
        !daemon.socket.exists(),
        "the control socket outlived a clean stop"
    );
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert!(
        config.contains("203.0.113.0/24") && config.contains("8080"),
        "{config}"
    );

    let daemon = Daemon::start(&mut net, "");
    let rules_after = daemon.json(&net, &["rule", "list", "--json"]);
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["id"].clone(), r["subset"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&rules_after), ids(&rules_before));
    let before = diverted(&daemon, &net);
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    assert!(diverted(&daemon, &net) > before, "the restored rule diverts");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bad_input_is_refused_and_changes_nothing() {
    let mut net = Topology::new();
    let daemon = Daemon::start(&mut net, "");
    add_rule(
        &daemon,
        &net,
        &["--proto", "tcp", "--dport", "8080", "--via", "underlay"],
    );
    let config_before = std::fs::read_to_string(&daemon.config).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--proto", "tpc", "--via", "underlay"], "unknown protocol"),
        (
            &["--dst", "10.0.0.0/33", "--via", "underlay"],
            "bad destination prefix",
        ),
        (
            &["--proto", "tcp", "--dport", "70000", "--via", "underlay"],
            "out of range",
        ),
        (
            &["--proto", "tcp", "--dport", "8080", "--via", "underlay"],
            "rule 1 already claims",
        ),
        (
            &["--proto", "tcp", "--dport", "80", "--via", "nosuchoverlay"],
            "no overlay named",
        ),
        (&["--via", "underlay"], "at least one of"),
    ];
    for (args, expected) in cases {
        let mut full = vec!["rule", "add"];
        full.extend_from_slice(args);
        let output = daemon.cli(&net, &full);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr:?}"
        );
    }
    let deleted = daemon.cli(&net, &["rule", "del", "42"]);
    assert!(String::from_utf8_lossy(&deleted.stderr).contains("no rule with id 42"));
    assert_eq!(
        daemon
            .json(&net, &["rule", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(std::fs::read_to_string(&daemon.config).unwrap(), config_before);

    net.process("oasis").terminate(Duration::from_secs(10));
    let output = daemon.cli(&net, &["status"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("daemon is not running"));
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn works_on_a_host_without_ipv6() {
    let mut net = Topology::new();
    for scope in ["all", "default", "lo", "c0"] {
        net.client
            .run(&["sysctl", "-qw", &format!("net.ipv6.conf.{scope}.disable_ipv6=1")]);
    }
    let daemon = diverting_web(&mut net);
    let before = diverted(&daemon, &net);
    assert_eq!(
        net.http_get(SERVER_V4, DIVERTED_PORT).as_deref(),
        Some("hello from the server\n")
    );
    assert!(diverted(&daemon, &net) > before, "the IPv4 rule still diverts");
    assert!(
        net.process("oasis").log().contains("no IPv6"),
        "the daemon says what it left out"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn several_tun_queues_carry_traffic() {
    let mut net = Topology::new();
    net.start_web_server(DIVERTED_PORT);
    net.start_iperf_server(5201);
    let daemon = Daemon::start(&mut net, "tun:\n  queues: 2\n");
    add_rule(
        &daemon,
        &net,
        &["--proto", "tcp", "--dport", "8080", "--via", "underlay"],
    );
    add_rule(
        &daemon,
        &net,
        &["--proto", "tcp", "--dport", "5201", "--via", "underlay"],
    );
    assert_eq!(status(&daemon, &net)["tun"]["queues"].as_u64(), Some(2));
    // Each connection's first packet reaches the broker through the queue
    // its addresses and ports hash to: with 25 connections, the chance
    // that one queue got none is 2 in 2^25.
    for _ in 0..20 {
        assert_eq!(
            net.http_get(SERVER_V4, DIVERTED_PORT).as_deref(),
            Some("hello from the server\n")
        );
    }
    let output = net.client.run(&[
        "iperf3", "-c", SERVER_V4, "-p", "5201", "-t", "1", "-P", "4", "-J",
    ]);
    let report: Value = serde_json::from_str(&output).expect("iperf3 JSON");
    assert!(report["end"]["sum_received"]["bytes"].as_u64().unwrap() > 1_000_000);
    let status = status(&daemon, &net);
    assert_eq!(status["broker"]["send_errors"].as_u64(), Some(0));
    let reads: Vec<u64> = status["tun"]["read_per_queue"]
        .as_array()
        .expect("tun.read_per_queue")
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(reads.len(), 2, "{status}");
    assert!(reads.iter().all(|n| *n > 0), "a queue read nothing: {reads:?}");
    // Every connection's SYN is diverted: 20 requests, iperf3's control
    // connection and its 4 streams.
    assert!(reads.iter().sum::<u64>() >= 25, "{reads:?}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_prefix_set_of_a_hundred_thousand_claims_its_destinations() {
    let mut net = Topology::new();
    net.start_web_server(DIVERTED_PORT);
    net.start_echo_server(OTHER_PORT);
    let daemon = Daemon::start(&mut net, "");
    let file = net.dir.join("world.txt");
    // A country list's worth, the server's prefixes among them.
    let world_set = || prefix_list(100_000, &["10.77.2.0/24", "fd77:2::/64", "2001:db8::/32"]);
    std::fs::write(&file, world_set()).unwrap();

    // A bad line: refused with its number, nothing kept, nothing changed.
    let bad = net.dir.join("bad.txt");
    std::fs::write(&bad, "192.0.2.0/24\n198.51.100.0/33\n").unwrap();
    let out = daemon.cli(
        &net,
        &[
            "rule",
            "import",
            "--kind",
            "cidr",
            "--via",
            "underlay",
            &bad.to_string_lossy(),
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("198.51.100.0/33"),
        "{stderr}"
    );
    assert_eq!(
        daemon.json(&net, &["rule", "list", "--json"]),
        serde_json::json!([])
    );

    let started = Instant::now();
    let added = daemon.json(
        &net,
        &[
            "rule",
            "add",
            "--dst-set",
            &file.to_string_lossy(),
            "--proto",
            "tcp",
            "--dport",
            "8080",
            "--via",
            "underlay",
            "--json",
        ],
    );
    eprintln!(
        "100,000 prefixes in one rule, in effect after {:?}",
        started.elapsed()
    );
    let id = added["id"].as_u64().unwrap();
    assert!(
        added["subset"]
            .as_str()
            .unwrap()
            .contains("world.txt (100003 prefixes)"),
        "{added}"
    );
    let kept = net.dir.join("sets/world.txt");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), world_set());
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert!(config.contains("dst_set: sets/world.txt"), "{config}");

    // The web server's port on the server, in the set, is claimed over
    // both families; another port of the server is not.
    let before = rule_packets(&daemon, &net, id);
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    assert!(net.http_get(SERVER_V6, DIVERTED_PORT).is_some());
    assert!(rule_packets(&daemon, &net, id) >= before + 6);
    let before_other = diverted(&daemon, &net);
    assert_eq!(net.echo(SERVER_V4, OTHER_PORT, "other").as_deref(), Some("other"));
    assert_eq!(
        diverted(&daemon, &net),
        before_other,
        "port {OTHER_PORT} is not in the rule"
    );

    // A restart reads the set back from the daemon's copy, even with the
    // user's file gone.
    std::fs::remove_file(&file).unwrap();
    assert!(net.process("oasis").terminate(Duration::from_secs(10)));
    let daemon = Daemon::start(&mut net, "");
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    assert_eq!(rules[0]["id"].as_u64(), Some(id), "{rules}");
    let before = rule_packets(&daemon, &net, id);
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    assert!(
        rule_packets(&daemon, &net, id) > before,
        "the restored set claims"
    );

    // Deleting the rule lets the traffic be and removes the copy.
    daemon.ok(&net, &["rule", "del", &id.to_string()]);
    assert!(!kept.exists(), "the set's copy outlived its rule");
    let before = diverted(&daemon, &net);
    assert!(net.http_get(SERVER_V4, DIVERTED_PORT).is_some());
    assert_eq!(diverted(&daemon, &net), before);
}
