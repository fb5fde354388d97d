//! Overlay code modules end to end, in network namespaces: the real
//! modules of `overlays/modules` carry web and bulk traffic through the
//! exit node; a digest mismatch is refused with nothing kept; hostile
//! modules are contained, their reasons shown, and while one restarts its
//! overlay's new flows take the underlay and other rules keep working;
//! the detour module and the `fastest` monitor module pick the faster of
//! two paths by what they measure.
//! Needs root and the modules built; `cargo xtask test` does both.

use std::time::{Duration, Instant};

use oasis_broker::module::digest;
use oasis_tests::{CLIENT_V4, Daemon, SERVER_V4, Topology, built_module, hostile_module};
use serde_json::Value;

/// A specification for the exit node with `module` (published beside it)
/// as its code module, with this digest.
fn spec_with_module(module: &str, sha256: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<overlay name="test-exit-module">
  <entry host="10.77.3.2" port="7400"/>
  <module url="http://10.77.3.2:8000/{module}" kind="overlay" sha256="{sha256}"/>
</overlay>"#
    )
}

fn json(daemon: &Daemon, net: &Topology, args: &[&str]) -> Value {
    daemon.json(net, args)
}

/// The exit serving the client, its specification and `module` published,
/// a daemon, and the spec server's base URL.
fn with_exit(net: &mut Topology, module: &str, bytes: &[u8]) -> (Daemon, String) {
    net.start_exit(&["--client", CLIENT_V4]);
    net.publish_bytes(module, bytes);
    net.publish("spec.xml", &spec_with_module(module, &digest(bytes)));
    net.publish(
        "plain.xml",
        r#"<overlay name="plain"><entry host="10.77.3.2" port="7400"/></overlay>"#,
    );
    let base = net.start_spec_server();
    let daemon = Daemon::start(net, "");
    (daemon, base)
}

/// Joins `mod` (the plain specification) running the hostile module
/// `name`, and carries tcp 80 over it.
fn hostile_overlay(daemon: &Daemon, net: &Topology, base: &str, name: &str) {
    let module = hostile_module(name);
    let spec = format!("{base}/plain.xml");
    daemon.ok(
        net,
        &[
            "overlay",
            "add",
            "mod",
            &spec,
            "--module-file",
            &module.to_string_lossy(),
        ],
    );
    daemon.ok(
        net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "mod"],
    );
}

fn module_status(daemon: &Daemon, net: &Topology, overlay: &str) -> Value {
    json(daemon, net, &["overlay", "show", overlay, "--json"])["module_status"].clone()
}

/// Waits until the overlay's module state starts with `prefix`.
fn wait_state(daemon: &Daemon, net: &Topology, overlay: &str, prefix: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = module_status(daemon, net, overlay);
        if status["state"].as_str().is_some_and(|s| s.starts_with(prefix)) {
            return status;
        }
        assert!(Instant::now() < deadline, "module never {prefix}: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn web_and_bulk_traffic_go_through_the_real_modules() {
    for module in ["pass_through", "duplicator", "detour"] {
        let mut net = Topology::new();
        net.start_web_server(80);
        net.web_file("big.bin", 4 << 20);
        let bytes = built_module(module);
        let (daemon, base) = with_exit(&mut net, &format!("{module}.wasm"), &bytes);
        let joined = json(
            &daemon,
            &net,
            &["overlay", "add", "mod", &format!("{base}/spec.xml"), "--json"],
        );
        assert_eq!(joined["module"]["sha256"].as_str(), Some(digest(&bytes).as_str()));
        daemon.ok(
            &net,
            &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "mod"],
        );
        wait_state(&daemon, &net, "mod", "running");
        assert_eq!(
            net.http_get(SERVER_V4, 80).as_deref(),
            Some("hello from the server\n"),
            "{module}"
        );
        let (size, secs) = net
            .download(SERVER_V4, 80, "big.bin")
            .unwrap_or_else(|| panic!("a bulk download through {module}"));
        assert_eq!(size, 4 << 20);
        println!("{module}: 4 MiB in {secs:.2} s");
        let status = module_status(&daemon, &net, "mod");
        // Few acknowledgements go up for a download: the returns reach the
        // client coalesced.
        assert!(status["to_entries"].as_u64().unwrap() > 10, "{status}");
        assert!(status["to_host"].as_u64().unwrap() > 100, "{status}");
        assert_eq!(status["restarts"].as_u64(), Some(0), "{status}");
        let shown = daemon.ok(&net, &["overlay", "show", "mod"]);
        println!("{shown}");
        assert!(
            shown.contains("running; 0 restarts") && shown.contains("to entry nodes"),
            "{shown}"
        );
        // The server saw the exit, not the client.
        let log = net.process("web-80").log();
        assert!(
            log.contains("10.77.3.2"),
            "the server did not see the exit: {log}"
        );
        // A restart of the daemon takes the kept module, compiled.
        assert!(net.process("oasis").terminate(Duration::from_secs(10)));
        let daemon = Daemon::start(&mut net, "");
        let status = wait_state(&daemon, &net, "mod", "running");
        assert!(
            status["compile"].as_str().unwrap().starts_with("from the cache"),
            "{status}"
        );
        assert!(net.http_get(SERVER_V4, 80).is_some(), "{module} after a restart");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_module_that_is_not_what_the_specification_says_is_refused() {
    let mut net = Topology::new();
    let bytes = built_module("pass_through");
    let (daemon, base) = with_exit(&mut net, "pass_through.wasm", &bytes);
    // Another digest.
    net.publish(
        "wrong.xml",
        &spec_with_module("pass_through.wasm", &"ab".repeat(32)),
    );
    let out = daemon.cli(&net, &["overlay", "add", "mod", &format!("{base}/wrong.xml")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SHA-256") && stderr.contains(&digest(&bytes)),
        "{stderr}"
    );
    // A module importing a file system.
    let file = std::fs::read(hostile_module("file")).unwrap();
    net.publish_bytes("file.wat", &file);
    net.publish("file.xml", &spec_with_module("file.wat", &digest(&file)));
    let out = daemon.cli(&net, &["overlay", "add", "mod", &format!("{base}/file.xml")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wasi_snapshot_preview1::path_open"), "{stderr}");
    // Nothing joined, nothing kept.
    assert_eq!(
        json(&daemon, &net, &["overlay", "list", "--json"]),
        Value::Array(vec![])
    );
    let kept = std::fs::read_dir(net.dir.join("modules"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(kept, 0, "a refused module was kept");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_spinning_module_is_restarted_and_meanwhile_its_flows_take_the_underlay() {
    let mut net = Topology::new();
    net.start_web_server(80);
    net.start_web_server(8080);
    let (daemon, base) = with_exit(&mut net, "unused.wasm", b"unused");
    daemon.ok(&net, &["overlay", "add", "plain", &format!("{base}/plain.xml")]);
    hostile_overlay(&daemon, &net, &base, "spin");
    daemon.ok(
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "8080", "--via", "plain",
        ],
    );
    wait_state(&daemon, &net, "mod", "running");
    // The first packet makes it spin: stopped at its CPU bound. That
    // connection is lost with it (it keeps its carrier).
    let _ = net.http_get(SERVER_V4, 80);
    let status = wait_state(&daemon, &net, "mod", "stopped");
    assert!(
        status["last_stop"].as_str().unwrap().contains("CPU bound"),
        "{status}"
    );
    // Down: new flows of its rule take the underlay and work; the other
    // overlay's rule is untouched. (On a slow machine the module may be
    // back before the request: it spins again, and the next pause is
    // twice as long.)
    let fell_back = (0..4).any(|_| {
        wait_state(&daemon, &net, "mod", "stopped");
        net.http_get(SERVER_V4, 80).as_deref() == Some("hello from the server\n")
    });
    assert!(fell_back, "no new flow worked while the module was down");
    assert!(net.http_get(SERVER_V4, 8080).is_some(), "the other overlay");
    let flows = json(&daemon, &net, &["flows", "--json"]);
    assert!(
        flows.to_string().contains("restarting"),
        "no flow fell back: {flows}"
    );
    // And it comes back, to be stopped again: restarts counted.
    let deadline = Instant::now() + Duration::from_secs(20);
    while module_status(&daemon, &net, "mod")["restarts"].as_u64() < Some(2) {
        let _ = net.http_get(SERVER_V4, 80);
        assert!(Instant::now() < deadline, "never restarted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = json(&daemon, &net, &["status", "--json"]);
    assert_eq!(status["heartbeat"]["alive"].as_bool(), Some(true));
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_module_forging_another_hosts_packets_is_refused() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let (daemon, base) = with_exit(&mut net, "unused.wasm", b"unused");
    hostile_overlay(&daemon, &net, &base, "forge");
    wait_state(&daemon, &net, "mod", "running");
    let _ = net.http_get(SERVER_V4, 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let module = module_status(&daemon, &net, "mod");
        if module["confined"]["to_underlay"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the forgery was not refused: {module}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let module = module_status(&daemon, &net, "mod");
    assert_eq!(module["to_underlay"].as_u64(), Some(0), "{module}");
}

/// A module may hand the underlay the packets it was given (the paper's
/// OC0), and nothing else: packets of its own making with this host's
/// address, to other hosts and ports, never leave.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_module_reaches_no_host_beyond_the_flows_it_was_handed() {
    let mut net = Topology::new();
    net.start_web_server(80);
    net.router.watch("ssh", "tcp dport 22");
    net.server.watch("discard", "udp dport 9");
    net.server.watch("web", "tcp dport 80");
    let (daemon, base) = with_exit(&mut net, "unused.wasm", b"unused");
    hostile_overlay(&daemon, &net, &base, "reach");
    wait_state(&daemon, &net, "mod", "running");
    // The host's own request, carried by the module to the underlay.
    assert_eq!(
        net.http_get(SERVER_V4, 80).as_deref(),
        Some("hello from the server\n")
    );
    // Its tick has tried its own packets many times meanwhile.
    let deadline = Instant::now() + Duration::from_secs(15);
    let module = loop {
        let module = module_status(&daemon, &net, "mod");
        if module["confined"]["to_underlay"].as_u64() >= Some(20) {
            break module;
        }
        assert!(
            Instant::now() < deadline,
            "the module's packets were not refused: {module}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(module["to_underlay"].as_u64() >= Some(3), "{module}");
    assert!(net.server.watched("web") >= 3, "the host's own request went out");
    assert_eq!(
        net.router.watched("ssh"),
        0,
        "a module's SYN reached the router's port 22"
    );
    assert_eq!(
        net.server.watched("discard"),
        0,
        "a module's datagram reached the server"
    );
    let shown = daemon.ok(&net, &["overlay", "show", "mod"]);
    assert!(shown.contains("packets of flows it was not handed"), "{shown}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_monitor_module_forging_packets_over_an_overlay_is_refused() {
    let mut net = Topology::new();
    let base = slow_and_fast_paths(&mut net, 0);
    net.publish(
        "mon.xml",
        &format!(
            r#"<overlay name="m"><shim length="16"/>
  <module url="http://10.77.3.2:8000/none.wasm" kind="monitor" sha256="{}"/></overlay>"#,
            "ab".repeat(32)
        ),
    );
    let daemon = Daemon::start(&mut net, "");
    daemon.ok(&net, &["overlay", "add", "fast", &format!("{base}/fast.xml")]);
    let module = hostile_module("forge-via");
    daemon.ok(
        &net,
        &[
            "overlay",
            "add",
            "mon",
            &format!("{base}/mon.xml"),
            "--module-file",
            &module.to_string_lossy(),
        ],
    );
    wait_state(&daemon, &net, "mon", "running");
    web_to_monitor(&daemon, &net, "mon");
    // The host's own packets go to the underlay as the module asks; the
    // forged one it sends with each never leaves.
    assert_eq!(
        net.http_get(SERVER_V4, 80).as_deref(),
        Some("hello from the server\n")
    );
    let status = module_status(&daemon, &net, "mon");
    assert!(status["confined"]["via"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["to_entries"].as_u64(), Some(0), "{status}");
    assert_eq!(
        net.overlay_port_counts()[&7502],
        0,
        "a forged packet reached the overlay"
    );
    let shown = daemon.ok(&net, &["overlay", "show", "mon"]);
    assert!(shown.contains("over overlays, "), "{shown}");
}

/// Hands web traffic to the monitor module of `monitor` (metric latency).
fn web_to_monitor(daemon: &Daemon, net: &Topology, monitor: &str) {
    daemon.ok(
        net,
        &[
            "rule",
            "add",
            "--proto",
            "tcp",
            "--dport",
            "80",
            "--metric",
            "latency",
            "--monitor",
            monitor,
        ],
    );
}

/// Loss of `count` pings to the server, in percent.
fn ping_loss(net: &Topology, count: u32) -> f64 {
    let output = net.client.output(&[
        "ping",
        "-n",
        "-q",
        "-i",
        "0.01",
        "-W",
        "1",
        "-c",
        &count.to_string(),
        SERVER_V4,
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix("% packet loss"))
        .and_then(|loss| loss.trim().parse().ok())
        .unwrap_or_else(|| panic!("no loss figure: {text}"))
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_duplicator_cuts_loss_over_two_lossy_paths() {
    let mut net = Topology::new();
    // Two relays to the exit, each losing 10% each way.
    net.start_exit(&["--client", CLIENT_V4, "--client", oasis_tests::OVERLAY_V4]);
    for port in [7501, 7502] {
        net.start_lossy_relay(port, "10.77.3.2:7400", 0, 10.0);
    }
    net.publish(
        "two.xml",
        r#"<overlay name="two-paths">
  <entry host="10.77.3.2" port="7501"/>
  <entry host="10.77.3.2" port="7502"/>
</overlay>"#,
    );
    let base = net.start_spec_server();
    // Pings are one flow to the server, whatever their identifier: let it
    // end between the rounds, so the second takes the second rule.
    let daemon = Daemon::start(&mut net, "flow_idle_timeout_secs: 1\n");
    let dir = net.dir.join("built");
    std::fs::create_dir_all(&dir).unwrap();
    let mut loss = Vec::new();
    for module in ["pass_through", "duplicator"] {
        let file = dir.join(format!("{module}.wasm"));
        std::fs::write(&file, built_module(module)).unwrap();
        daemon.ok(
            &net,
            &[
                "overlay",
                "add",
                module,
                &format!("{base}/two.xml"),
                "--module-file",
                &file.to_string_lossy(),
            ],
        );
        wait_state(&daemon, &net, module, "running");
        let rule = json(
            &daemon,
            &net,
            &["rule", "add", "--proto", "icmp", "--via", module, "--json"],
        );
        loss.push(ping_loss(&net, 400));
        daemon.ok(&net, &["rule", "del", &rule["id"].to_string()]);
        std::thread::sleep(Duration::from_secs(3));
    }
    println!(
        "ping loss: {:.1}% through one path, {:.1}% duplicated",
        loss[0], loss[1]
    );
    // One path: 1 - 0.9² = 19% expected; duplicated: 0.19² = 3.6%.
    assert!(loss[0] > 8.0, "the paths were not lossy: {loss:?}");
    assert!(
        loss[1] < loss[0] / 2.0,
        "the duplicator did not cut loss: {loss:?}"
    );
}

/// Two relays to the exit on the overlay host: 7501 slow (`slow_ms` each
/// way), 7502 fast; the datagrams reaching each are counted. Returns the
/// spec server's base URL.
fn slow_and_fast_paths(net: &mut Topology, slow_ms: u32) -> String {
    net.start_web_server(80);
    net.start_exit(&["--client", CLIENT_V4, "--client", oasis_tests::OVERLAY_V4]);
    net.start_relay(7501, "10.77.3.2:7400", slow_ms);
    net.start_relay(7502, "10.77.3.2:7400", 0);
    net.count_overlay_ports(&[7501, 7502]);
    net.publish(
        "two.xml",
        r#"<overlay name="two-paths">
  <entry host="10.77.3.2" port="7501"/>
  <entry host="10.77.3.2" port="7502"/>
</overlay>"#,
    );
    for (name, port) in [("slow", 7501), ("fast", 7502)] {
        net.publish(
            &format!("{name}.xml"),
            &format!(r#"<overlay name="{name}"><entry host="10.77.3.2" port="{port}"/></overlay>"#),
        );
    }
    net.start_spec_server()
}

/// Opens `count` connections one after another (web requests) whose
/// module is `overlay`'s; each must succeed. Returns the datagrams each
/// relay saw meanwhile.
fn connections(net: &Topology, daemon: &Daemon, overlay: &str, count: usize) -> (u64, u64) {
    let before = net.overlay_port_counts();
    for i in 0..count {
        let started = Instant::now();
        let got = net.http_get(SERVER_V4, 80);
        if got.as_deref() != Some("hello from the server\n") {
            panic!(
                "request {i} of {count} failed after {:?}: {got:?}; relays {before:?} then {:?}\n{}\n{}",
                started.elapsed(),
                net.overlay_port_counts(),
                daemon.ok(net, &["overlay", "show", overlay]),
                daemon.ok(net, &["status"]),
            );
        }
    }
    let after = net.overlay_port_counts();
    (after[&7501] - before[&7501], after[&7502] - before[&7502])
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_detour_module_takes_the_entry_node_with_the_shortest_round_trip() {
    let mut net = Topology::new();
    let base = slow_and_fast_paths(&mut net, 40);
    let daemon = Daemon::start(&mut net, "");
    let dir = net.dir.join("built");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("detour.wasm");
    std::fs::write(&file, built_module("detour")).unwrap();
    daemon.ok(
        &net,
        &[
            "overlay",
            "add",
            "detour",
            &format!("{base}/two.xml"),
            "--module-file",
            &file.to_string_lossy(),
        ],
    );
    wait_state(&daemon, &net, "detour", "running");
    daemon.ok(
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "80", "--via", "detour",
        ],
    );
    // The first connections measure both entry nodes; then the fast one
    // carries the new ones.
    let (slow, fast) = connections(&net, &daemon, "detour", 30);
    println!("datagrams to the slow entry node: {slow}, to the fast one: {fast}");
    assert!(slow > 0, "the slow entry node was never measured");
    assert!(
        fast > 4 * slow,
        "new connections did not keep to the fast entry: {slow} vs {fast}"
    );
    // The paths change places: once the module's figures for the (now)
    // slow path age, it re-measures and moves. That takes 30 s by design;
    // a dead path is left much sooner.
    net.process("relay-7502").kill_hard();
    let mut failed = 0;
    let start = Instant::now();
    let mut recovered = None;
    while start.elapsed() < Duration::from_secs(30) {
        match net.http_get(SERVER_V4, 80) {
            Some(_) => {
                recovered = Some(start.elapsed());
                break;
            }
            None => failed += 1,
        }
    }
    let recovered = recovered.expect("new connections found the live entry node within 30 s");
    println!("fast entry node killed: {failed} requests failed, the next succeeded after {recovered:?}");
    let (slow, _) = connections(&net, &daemon, "detour", 5);
    assert!(slow > 0);
    let status = module_status(&daemon, &net, "detour");
    assert_eq!(status["restarts"].as_u64(), Some(0), "{status}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_fastest_monitor_module_sends_a_metric_rules_flows_over_the_faster_overlay() {
    let mut net = Topology::new();
    let base = slow_and_fast_paths(&mut net, 40);
    let module = built_module("fastest");
    net.publish_bytes("fastest.wasm", &module);
    net.publish(
        "mon.xml",
        &format!(
            r#"<overlay name="fastest"><shim length="16"/>
  <module url="http://10.77.3.2:8000/fastest.wasm" kind="monitor" sha256="{}"/></overlay>"#,
            digest(&module)
        ),
    );
    let daemon = Daemon::start(&mut net, "");
    for name in ["slow", "fast", "mon"] {
        daemon.ok(&net, &["overlay", "add", name, &format!("{base}/{name}.xml")]);
    }
    wait_state(&daemon, &net, "mon", "running");
    web_to_monitor(&daemon, &net, "mon");
    let (slow, fast) = connections(&net, &daemon, "mon", 30);
    println!("datagrams over the slow overlay: {slow}, over the fast one: {fast}");
    assert!(slow > 0, "the slow overlay was never measured");
    assert!(
        fast > 4 * slow,
        "new connections did not keep to the fast overlay: {slow} vs {fast}"
    );
    // The server saw the exit: the flows went over overlays, not the
    // underlay.
    let log = net.process("web-80").log();
    let flows = daemon.ok(&net, &["flows"]);
    assert!(
        !log.contains(CLIENT_V4),
        "a flow left on the underlay: {log}\n{flows}"
    );
    let status = module_status(&daemon, &net, "mon");
    assert!(status["from_entries"].as_u64().unwrap() > 30, "{status}");
    // Bulk: the segments fit the overlay (the module's SYNs had their MSS
    // clamped), and the answers come back through the module.
    net.web_file("big.bin", 4 << 20);
    let (size, secs) = net
        .download(SERVER_V4, 80, "big.bin")
        .expect("a bulk download through the monitor module");
    assert_eq!(size, 4 << 20);
    println!("4 MiB through the monitor module in {secs:.2} s");
    // The module is told when an overlay is left; until then nothing
    // changes, after it new connections still work over what remains.
    daemon.ok(&net, &["overlay", "del", "fast"]);
    std::thread::sleep(Duration::from_millis(300));
    let (slow, fast) = connections(&net, &daemon, "mon", 3);
    assert!(slow > 0 && fast == 0, "after `fast` was left: {slow} vs {fast}");
    // A restarted daemon runs the kept module again, which finds the
    // overlays joined as the daemon loads them.
    assert!(net.process("oasis").terminate(Duration::from_secs(10)));
    let daemon = Daemon::start(&mut net, "");
    let status = wait_state(&daemon, &net, "mon", "running");
    assert!(
        status["compile"].as_str().unwrap().starts_with("from the cache"),
        "{status}"
    );
    let (slow, _) = connections(&net, &daemon, "mon", 3);
    assert!(slow > 0, "after a restart nothing went over the overlay");
    let log = net.process("web-80").log();
    assert!(
        !log.contains(CLIENT_V4),
        "a flow left on the underlay after a restart: {log}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bulk_through_a_monitor_module_fits_a_narrow_path() {
    let mut net = Topology::new();
    let base = slow_and_fast_paths(&mut net, 0);
    net.web_file("big.bin", 8 << 20);
    net.start_echo_server(7200);
    let module = built_module("fastest");
    net.publish_bytes("fastest.wasm", &module);
    net.publish(
        "mon.xml",
        &format!(
            r#"<overlay name="fastest"><shim length="16"/>
  <module url="http://10.77.3.2:8000/fastest.wasm" kind="monitor" sha256="{}"/></overlay>"#,
            digest(&module)
        ),
    );
    let daemon = Daemon::start(&mut net, "");
    for name in ["fast", "mon"] {
        daemon.ok(&net, &["overlay", "add", name, &format!("{base}/{name}.xml")]);
    }
    wait_state(&daemon, &net, "mon", "running");
    // The overlay host's link is narrower than the client's uplink.
    net.router.run(&["ip", "link", "set", "r2", "mtu", "1280"]);
    net.overlay.run(&["ip", "link", "set", "o0", "mtu", "1280"]);
    web_to_monitor(&daemon, &net, "mon");
    daemon.ok(
        &net,
        &[
            "rule",
            "add",
            "--proto",
            "tcp",
            "--dport",
            "7200",
            "--metric",
            "latency",
            "--monitor",
            "mon",
        ],
    );
    let (size, secs) = net
        .download(SERVER_V4, 80, "big.bin")
        .expect("a download through the monitor module over a narrow path");
    assert_eq!(size, 8 << 20);
    let script = format!(
        "import socket,threading\n\
         c=socket.create_connection(('{SERVER_V4}',7200),timeout=10)\n\
         data=b'u'*(8<<20)\n\
         threading.Thread(target=lambda:(c.sendall(data),c.shutdown(socket.SHUT_WR)),daemon=True).start()\n\
         got=0\n\
         while (d:=c.recv(1<<16)): got+=len(d)\n\
         print(got)\n"
    );
    let output = net.client.output(&["python3", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        (8 << 20).to_string(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = module_status(&daemon, &net, "mon");
    println!("8 MiB down in {secs:.2} s and 8 MiB echoed through the monitor over MTU 1280: {status}");
    assert!(status["to_entries"].as_u64().unwrap() > 1000, "{status}");
}

/// A WebAssembly module of `functions` functions of type `() -> ()`, each
/// `i32.const 1; drop` `body` times: built by hand, to be as large as a
/// test needs at no cost.
fn functions_module(functions: u32, body: usize) -> Vec<u8> {
    fn leb(mut n: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(content.len() as u64, out);
        out.extend_from_slice(content);
    }
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module);
    let mut declared = Vec::new();
    leb(u64::from(functions), &mut declared);
    declared.extend(std::iter::repeat_n(0u8, functions as usize));
    section(3, &declared, &mut module);
    let mut one = vec![0u8];
    for _ in 0..body {
        one.extend_from_slice(&[0x41, 0x01, 0x1a]);
    }
    one.push(0x0b);
    let mut code = Vec::new();
    leb(u64::from(functions), &mut code);
    for _ in 0..functions {
        leb(one.len() as u64, &mut code);
        code.extend_from_slice(&one);
    }
    section(10, &code, &mut module);
    module
}

/// The daemon's resident memory, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib >> 10)
}

/// `oasis overlay add` of `module` as a local build; the CLI's output.
fn add_module_file(
    daemon: &Daemon,
    net: &Topology,
    base: &str,
    name: &str,
    module: &[u8],
) -> std::process::Output {
    let file = net.dir.join(format!("{name}.wasm"));
    std::fs::write(&file, module).unwrap();
    daemon.cli(
        net,
        &[
            "overlay",
            "add",
            name,
            &format!("{base}/plain.xml"),
            "--module-file",
            &file.to_string_lossy(),
        ],
    )
}

/// A module built to make the compiler take minutes and gigabytes (a
/// million small functions, 4 MB) is refused before any compiling, naming
/// the limit; one that passes the counts but compiles too long is killed
/// at its deadline; and a daemon stopped while it compiles stops at once,
/// its compiler with it.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn compiling_a_module_is_bounded_in_size_time_and_memory() {
    let mut net = Topology::new();
    net.start_exit(&["--client", CLIENT_V4]);
    net.publish(
        "plain.xml",
        r#"<overlay name="plain"><entry host="10.77.3.2" port="7400"/></overlay>"#,
    );
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "modules: { compile_secs: 1 }\n");
    let pid = net.process("oasis").pid();
    let before = rss_mib(pid);

    let bomb = functions_module(1_000_000, 1);
    assert!(bomb.len() > 3_000_000, "{} bytes", bomb.len());
    let started = Instant::now();
    let out = add_module_file(&daemon, &net, &base, "bomb", &bomb);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("1000000 functions") && stderr.contains("modules.max_functions"),
        "{stderr}"
    );
    println!("a million functions refused in {:?}", started.elapsed());

    // Within every count, but far more than a second of compiling for
    // this debug build.
    let slow = functions_module(40_000, 30);
    let out = add_module_file(&daemon, &net, &base, "slow", &slow);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("longer than 1 s (modules.compile_secs)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("compiling the module"),
        "the progress said what it did: {stderr}"
    );
    let after = rss_mib(pid);
    assert!(
        after < before + 64,
        "the daemon grew from {before} to {after} MiB while a module compiled"
    );
    assert_eq!(
        json(&daemon, &net, &["overlay", "list", "--json"]),
        Value::Array(vec![])
    );

    // A daemon told to stop while a compile runs stops at once.
    std::fs::write(
        &daemon.config,
        std::fs::read_to_string(&daemon.config)
            .unwrap()
            .replace("compile_secs: 1", "compile_secs: 120"),
    )
    .unwrap();
    net.process("oasis").terminate(Duration::from_secs(10));
    let daemon = Daemon::start(&mut net, "");
    let pid = net.process("oasis").pid();
    let file = net.dir.join("slow.wasm");
    let mut adding = net
        .client
        .command(&oasis_tests::oasis_bin().to_string_lossy())
        .args([
            "--config",
            &daemon.config.to_string_lossy(),
            "--socket",
            &daemon.socket.to_string_lossy(),
        ])
        .args([
            "overlay",
            "add",
            "slow",
            &format!("{base}/plain.xml"),
            "--module-file",
            &file.to_string_lossy(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let compilers = loop {
        let compilers = children_compiling(pid);
        if !compilers.is_empty() {
            break compilers;
        }
        assert!(Instant::now() < deadline, "no compile started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopping = Instant::now();
    assert!(
        net.process("oasis").terminate(Duration::from_secs(10)),
        "the daemon did not stop cleanly"
    );
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(2), "the daemon took {took:?} to stop");
    let deadline = Instant::now() + Duration::from_secs(2);
    while compilers
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(Instant::now() < deadline, "the compiler outlived the daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = adding.wait();
}

/// The `compile-module` children of process `parent`.
fn children_compiling(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the comm may hold spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("compile-module")
        })
        .collect()
}
