//! The Monitor end to end, in network namespaces: metric rules choose among
//! the underlay (client ── router ── server, through a delay line in the
//! router) and overlays (through relays and the exit node on the overlay
//! host), from what the daemon measures. Needs root; `cargo xtask test`
//! runs these.

use std::time::{Duration, Instant};

use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, SERVER_V4, Topology};
use serde_json::Value;

/// An overlay straight to the exit node, and one through a relay.
fn spec(port: u16) -> String {
    format!(
        r#"<?xml version="1.0"?>
<overlay name="test-{port}">
  <entry host="{OVERLAY_V4}" port="{port}"/>
</overlay>"#
    )
}

/// A network whose underlay is `underlay_ms` each way, an exit node, and
/// a daemon that joined `overlays` (name, entry port) with a web server on
/// 8080 claimed by a metric rule.
fn setup(net: &mut Topology, underlay_ms: u32, overlays: &[(&str, u16)], metric: &str) -> Daemon {
    net.underlay_line(underlay_ms);
    net.start_web_server(8080);
    net.start_exit(&["--client", CLIENT_V4]);
    for (name, port) in overlays {
        net.publish(&format!("{name}.xml"), &spec(*port));
    }
    let base = net.start_spec_server();
    let daemon = Daemon::start(net, "");
    for (name, _) in overlays {
        daemon.ok(net, &["overlay", "add", name, &format!("{base}/{name}.xml")]);
    }
    daemon.ok(
        net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "8080", "--metric", metric,
        ],
    );
    daemon
}

/// Where the server saw the last request come from: the client's own
/// address (the underlay) or the exit node's (an overlay).
fn last_source(net: &mut Topology) -> String {
    let log = net.process("web-8080").log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("GET /hello.txt"))
        .unwrap_or("");
    line.split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("::ffff:")
        .to_string()
}

/// Fetches from the web server once a second until `done` says the source
/// is the one wanted, or `within` passes; the seconds it took.
fn until_source(net: &mut Topology, wanted: &str, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if net.http_get(SERVER_V4, 8080).is_some() && last_source(net) == wanted {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    None
}

fn monitor(daemon: &Daemon, net: &Topology) -> Value {
    daemon.json(net, &["monitor", "--json"])
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_clearly_faster_overlay_takes_new_flows_and_old_ones_stay() {
    let mut net = Topology::new();
    // Underlay 30 ms each way; the overlay through the exit node, direct.
    let daemon = setup(&mut net, 30, &[("exit", 7400)], "latency");
    // The first flow: nothing measured yet, so the underlay.
    assert!(net.http_get(SERVER_V4, 8080).is_some());
    assert_eq!(last_source(&mut net), CLIENT_V4);
    let took = until_source(&mut net, OVERLAY_V4, Duration::from_secs(15));
    let view = monitor(&daemon, &net);
    assert!(
        took.is_some(),
        "new flows never took the faster overlay: {view:#}"
    );
    let decision = &view["decisions"][0];
    assert_eq!(decision["carrier"], "exit", "{view:#}");
    assert!(
        decision["why"].as_str().unwrap().starts_with("faster"),
        "{view:#}"
    );
    let status = daemon.ok(&net, &["status"]);
    assert!(status.contains("monitor     1 metric rules"), "{status}");
    println!(
        "switched after {took:?}\n{}\n{}\n{status}",
        daemon.ok(&net, &["monitor"]),
        daemon.ok(&net, &["flows"])
    );
}
