//! Overlays end to end, in network namespaces: client (daemon) ── router ──
//! server, with the overlay host (exit node, relay, specification server)
//! on the router. Needs root; `cargo xtask test` runs these.

use std::time::{Duration, Instant};

use oasis_tests::{CLIENT_V4, CLIENT_V6, Daemon, OVERLAY_V4, OVERLAY_V6, SERVER_V4, SERVER_V6, Topology};
use serde_json::Value;

const EXIT_SPEC: &str = r#"<?xml version="1.0"?>
<overlay name="test-exit">
  <description>Straight to the exit node</description>
  <entry host="10.77.3.2" port="7400"/>
</overlay>"#;

fn json(daemon: &Daemon, net: &Topology, args: &[&str]) -> Value {
    daemon.json(net, args)
}

fn cli_ok(daemon: &Daemon, net: &Topology, args: &[&str]) -> String {
    daemon.ok(net, args)
}

/// A network with the exit node serving the client, its spec published,
/// and a daemon that joined it as `exit`.
fn joined(net: &mut Topology, exit_clients: &[&str]) -> Daemon {
    joined_with(net, exit_clients, false)
}

/// As `joined`; `fast`: with the client's fast path on, over links that
/// behave as NICs do (`Topology::links_like_nics`).
fn joined_with(net: &mut Topology, exit_clients: &[&str], fast: bool) -> Daemon {
    let mut args = Vec::new();
    for client in exit_clients {
        args.extend(["--client", client]);
    }
    net.start_exit(&args);
    net.publish("exit.xml", EXIT_SPEC);
    let base = net.start_spec_server();
    net.links_like_nics(fast);
    let daemon = Daemon::start(net, &format!("overlay_fast_path: {fast}\n"));
    cli_ok(
        &daemon,
        net,
        &["overlay", "add", "exit", &format!("{base}/exit.xml")],
    );
    daemon
}

/// A web server on port 80 and a daemon carrying tcp 80 over the exit.
fn web_via_exit(net: &mut Topology) -> Daemon {
    net.start_web_server(80);
    let daemon = joined(net, &[CLIENT_V4]);
    cli_ok(
        &daemon,
        net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "exit"],
    );
    daemon
}

fn exit_stats(net: &Topology) -> Value {
    // The exit writes its counters every second.
    std::thread::sleep(Duration::from_millis(1200));
    let text = std::fs::read_to_string(net.dir.join("exit-stats.json")).expect("exit stats file");
    serde_json::from_str(&text).expect("exit stats JSON")
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn web_traffic_leaves_from_the_exit_node() {
    let mut net = Topology::new();
    let daemon = web_via_exit(&mut net);
    for _ in 0..3 {
        assert_eq!(
            net.http_get(SERVER_V4, 80).as_deref(),
            Some("hello from the server\n")
        );
    }
    // IPv6 inside, carried over the IPv4 overlay, leaves from the exit's IPv6 address.
    assert_eq!(
        net.http_get(SERVER_V6, 80).as_deref(),
        Some("hello from the server\n")
    );

    let web_log = net.process("web-80").log();
    assert!(
        web_log.contains(OVERLAY_V4),
        "the server did not see the exit's address:\n{web_log}"
    );
    assert!(
        web_log.contains("fd77:3::2"),
        "the server did not see the exit's IPv6 address:\n{web_log}"
    );
    assert!(
        !web_log.contains(CLIENT_V4) && !web_log.contains("fd77:1::2"),
        "traffic crossed the underlay directly:\n{web_log}"
    );

    let status = json(&daemon, &net, &["status", "--json"]);
    assert!(status["broker"]["sent_overlay"].as_u64().unwrap() >= 12);
    assert!(status["broker"]["overlay_received"].as_u64().unwrap() >= 12);
    assert_eq!(status["broker"]["sent_underlay"].as_u64(), Some(0));
    assert_eq!(
        status["classifier"]["encap_packets"].as_u64(),
        Some(0),
        "the fast path is off by default"
    );
    let overlay = json(&daemon, &net, &["overlay", "show", "exit", "--json"]);
    assert!(overlay["packets_sent"].as_u64().unwrap() >= 12);
    assert_eq!(overlay["rules"], serde_json::json!([1]));
    let stats = exit_stats(&net);
    assert!(
        stats["classes"]["0"]["to_internet"]["packets"].as_u64().unwrap() >= 12,
        "{stats}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn ping_and_udp_through_the_exit() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let daemon = joined(&mut net, &[CLIENT_V4]);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "exit",
        ],
    );
    let ping = net
        .client
        .output(&["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_V4]);
    assert!(
        ping.status.success(),
        "ping through the exit: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // A UDP exchange: the server echoes one datagram back.
    let server = net.server.clone();
    net.spawn(
        &server,
        "udp-echo",
        &["python3", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5300))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)\n"],
    );
    oasis_tests::wait_for_udp_listener(&net.server, 5300);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "5300", "--via", "exit",
        ],
    );
    let reply = net.client.output(&[
        "python3",
        "-c",
        &format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'via exit',('{SERVER_V4}',5300))\nprint(s.recvfrom(2048)[0].decode())"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "via exit",
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );
    let stats = exit_stats(&net);
    assert!(stats["nat_flows"].as_u64().unwrap() >= 2, "{stats}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_client_not_on_the_allow_list_gets_nothing_through() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let daemon = joined(&mut net, &["10.99.0.0/24"]);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "exit"],
    );
    assert_eq!(net.http_get(SERVER_V4, 80), None);
    let stats = exit_stats(&net);
    assert!(stats["refused_unknown_sender"].as_u64().unwrap() > 0, "{stats}");
    assert_eq!(stats["nat_flows"].as_u64(), Some(0));
    assert!(
        !net.process("web-80").log().contains("GET"),
        "the server saw a request"
    );
}

/// A raw IPv4/UDP packet, checksummed (UDP checksum left out, which IPv4 allows).
fn udp_packet_script(src: &str, dst: &str, dport: u16, payload: &str) -> String {
    format!(
        "import socket,struct\n\
         def csum(b):\n s=sum(struct.unpack('!%dH'%(len(b)//2),b))\n s=(s>>16)+(s&0xffff);s+=s>>16\n return ~s&0xffff\n\
         payload=b'{payload}'\n\
         udp=struct.pack('!HHHH',5000,{dport},8+len(payload),0)+payload\n\
         ip=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),1,0,64,17,0,socket.inet_aton('{src}'),socket.inet_aton('{dst}'))\n\
         ip=ip[:10]+struct.pack('!H',csum(ip))+ip[12:]\n\
         packet=ip+udp\n"
    )
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn only_entry_nodes_may_hand_packets_to_this_host() {
    let mut net = Topology::new();
    net.publish("exit.xml", EXIT_SPEC);
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "");
    cli_ok(
        &daemon,
        &net,
        &["overlay", "add", "exit", &format!("{base}/exit.xml")],
    );
    // An application on the client waiting for UDP on 5555.
    let client = net.client.clone();
    net.spawn(
        &client,
        "listener",
        &["python3", "-u", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5555))\nwhile True:\n print('got',s.recv(2048).decode())\n"],
    );
    oasis_tests::wait_for_udp_listener(&net.client, 5555);

    // Forged: from the server, a stranger to the overlay.
    let forge = udp_packet_script(SERVER_V4, CLIENT_V4, 5555, "forged")
        + &format!(
            "o=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\no.sendto(packet,('{CLIENT_V4}',7400))\n"
        );
    net.server.run(&["python3", "-c", &forge]);
    // From the real entry node, but addressed to another host.
    let elsewhere = udp_packet_script(SERVER_V4, "10.77.9.9", 5555, "elsewhere")
        + &format!(
            "o=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\no.bind(('{OVERLAY_V4}',7400))\no.sendto(packet,('{CLIENT_V4}',7400))\n"
        );
    net.overlay.run(&["python3", "-c", &elsewhere]);
    // From the real entry node, to this host: delivered.
    let genuine = udp_packet_script(SERVER_V4, CLIENT_V4, 5555, "genuine")
        + &format!(
            "o=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\no.bind(('{OVERLAY_V4}',7400))\no.sendto(packet,('{CLIENT_V4}',7400))\n"
        );
    net.overlay.run(&["python3", "-c", &genuine]);

    std::thread::sleep(Duration::from_millis(500));
    let received = net.process("listener").log();
    assert!(
        received.contains("got genuine"),
        "the genuine packet was not delivered: {received:?}"
    );
    assert!(
        !received.contains("forged") && !received.contains("elsewhere"),
        "{received:?}"
    );
    let status = json(&daemon, &net, &["status", "--json"]);
    assert_eq!(status["broker"]["rejected_sender"].as_u64(), Some(1), "{status}");
    assert_eq!(
        status["broker"]["rejected_destination"].as_u64(),
        Some(1),
        "{status}"
    );
    assert_eq!(status["broker"]["overlay_received"].as_u64(), Some(1), "{status}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bad_specifications_are_refused_with_the_field_named() {
    let mut net = Topology::new();
    net.publish(
        "bad-port.xml",
        r#"<overlay><entry host="10.77.3.2" port="99999"/></overlay>"#,
    );
    net.publish("no-entry.xml", r#"<overlay name="x"></overlay>"#);
    net.publish("not-xml.xml", "this is not XML");
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "");
    let config_before = std::fs::read_to_string(&daemon.config).unwrap();
    let cases = [
        (format!("{base}/bad-port.xml"), "<entry> 1: port"),
        (format!("{base}/no-entry.xml"), "no <entry>"),
        (format!("{base}/not-xml.xml"), "not well-formed"),
        (format!("{base}/missing.xml"), "answered 404"),
        (
            "ftp://10.77.3.2/x.xml".to_string(),
            "not an http:// or https:// URL",
        ),
        ("http://10.77.3.2:1/x.xml".to_string(), "fetching"),
    ];
    for (url, expected) in &cases {
        let output = daemon.cli(&net, &["overlay", "add", "bad", url]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{url} was accepted");
        assert!(
            stderr.contains(expected),
            "{url}: expected {expected:?} in {stderr:?}"
        );
    }
    assert_eq!(
        json(&daemon, &net, &["overlay", "list", "--json"]),
        Value::Array(vec![])
    );
    assert_eq!(std::fs::read_to_string(&daemon.config).unwrap(), config_before);
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_overlay_in_use_cannot_be_left_and_survives_a_restart() {
    let mut net = Topology::new();
    let daemon = web_via_exit(&mut net);
    let refused = daemon.cli(&net, &["overlay", "del", "exit"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("carries rules [1]"));

    assert!(net.process("oasis").terminate(Duration::from_secs(10)));
    let daemon = Daemon::start(&mut net, "");
    let overlays = json(&daemon, &net, &["overlay", "list", "--json"]);
    assert_eq!(overlays[0]["name"], "exit");
    assert_eq!(overlays[0]["resolved"][0], "10.77.3.2:7400");
    assert_eq!(
        net.http_get(SERVER_V4, 80).as_deref(),
        Some("hello from the server\n")
    );

    cli_ok(&daemon, &net, &["rule", "del", "1"]);
    cli_ok(&daemon, &net, &["overlay", "del", "exit"]);
    assert_eq!(
        json(&daemon, &net, &["overlay", "list", "--json"]),
        Value::Array(vec![])
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn restarting_the_exit_node_lets_new_flows_through() {
    let mut net = Topology::new();
    let _daemon = web_via_exit(&mut net);
    assert!(net.http_get(SERVER_V4, 80).is_some());
    net.process("oasis-exit").kill_hard();
    assert_eq!(net.http_get(SERVER_V4, 80), None, "no exit, no path");
    net.start_exit(&["--client", CLIENT_V4]);
    assert_eq!(
        net.http_get(SERVER_V4, 80).as_deref(),
        Some("hello from the server\n")
    );
}

/// Round trip of one message on an established TCP connection, in ms.
fn echo_round_trip_ms(net: &Topology, port: u16) -> f64 {
    let script = format!(
        "import socket,time\n\
         c=socket.create_connection(('{SERVER_V4}',{port}),timeout=5)\n\
         best=1e9\n\
         for i in range(5):\n c.sendall(b'x');t=time.monotonic();c.recv(16);best=min(best,time.monotonic()-t)\n\
         print(best*1000)\n"
    );
    let output = net.client.output(&["python3", "-c", &script]);
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("echo timing failed: {}", String::from_utf8_lossy(&output.stderr)))
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_relay_detour_adds_its_delay() {
    let mut net = Topology::new();
    net.start_echo_server(9090);
    net.start_echo_server(9091);
    // The exit serves the client directly and the relay (for the detour).
    net.start_exit(&["--client", CLIENT_V4, "--client", OVERLAY_V4]);
    net.start_relay(7500, "10.77.3.2:7400", 40);
    net.publish("exit.xml", EXIT_SPEC);
    net.publish(
        "detour.xml",
        r#"<overlay name="detour"><entry host="10.77.3.2" port="7500"/></overlay>"#,
    );
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "");
    cli_ok(
        &daemon,
        &net,
        &["overlay", "add", "exit", &format!("{base}/exit.xml")],
    );
    cli_ok(
        &daemon,
        &net,
        &["overlay", "add", "detour", &format!("{base}/detour.xml")],
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "9090", "--via", "detour",
        ],
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "9091", "--via", "exit",
        ],
    );

    let direct = echo_round_trip_ms(&net, 9091);
    let detour = echo_round_trip_ms(&net, 9090);
    println!("round trip via the exit: {direct:.2} ms, via the 40 ms relay detour: {detour:.2} ms");
    assert!(detour >= 78.0, "the relay's 2 x 40 ms did not show: {detour} ms");
    // Best of five each: noise only adds, so the difference is the relay.
    assert!(
        detour - direct >= 60.0,
        "the exit's path went round the relay too: {direct} ms against {detour} ms"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_underlay_port_admits_no_stranger() {
    let mut net = Topology::new();
    let daemon = Daemon::start(&mut net, "");
    // Any local process could try to have the broker send a packet for it.
    let attempt = udp_packet_script(CLIENT_V4, SERVER_V4, 5556, "spoofed")
        + "o=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\no.sendto(packet,('127.0.0.1',7401))\n";
    net.client.run(&["python3", "-c", &attempt]);
    std::thread::sleep(Duration::from_millis(300));
    let status = json(&daemon, &net, &["status", "--json"]);
    assert_eq!(status["underlay_port"].as_u64(), Some(7401));
    assert_eq!(
        status["broker"]["rejected_module_sender"].as_u64(),
        Some(1),
        "{status}"
    );
    assert_eq!(status["broker"]["sent_underlay"].as_u64(), Some(0), "{status}");
}

/// Packets from the client's own address reaching the server, counted by
/// nftables there: a claimed flow that leaks shows up here.
fn count_from_client(net: &Topology) {
    net.server.run(&["nft", "add", "table", "inet", "leak"]);
    net.server.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "leak",
        "in",
        "{ type filter hook prerouting priority -400 ; }",
    ]);
    net.server.run(&[
        "nft", "add", "rule", "inet", "leak", "in", "ip", "saddr", CLIENT_V4, "counter",
    ]);
}

fn leaked(net: &Topology) -> u64 {
    let text = net.server.run(&["nft", "list", "chain", "inet", "leak", "in"]);
    text.split("packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("counter")
}

/// Fragmented datagrams of a claimed flow: every fragment goes through
/// the exit (none leaves from the client's address), the server gets the
/// whole datagram from the exit, and its fragmented answer comes back
/// whole. The same for a fragmented ping.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn fragmented_datagrams_of_a_claimed_flow_all_take_the_overlay() {
    let mut net = Topology::new();
    let daemon = joined(&mut net, &[CLIENT_V4]);
    count_from_client(&net);
    let server = net.server.clone();
    net.spawn(
        &server,
        "udp-big",
        &[
            "python3",
            "-u",
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5400))\n\
             while True:\n d,a=s.recvfrom(65535)\n print(a[0],len(d),flush=True)\n s.sendto(b'r'*5000,a)\n",
        ],
    );
    oasis_tests::wait_for_udp_listener(&net.server, 5400);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "5400", "--via", "exit",
        ],
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "exit",
        ],
    );

    let reply = net.client.output(&[
        "python3",
        "-c",
        &format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\n\
             s.sendto(b'x'*4000,('{SERVER_V4}',5400))\nprint(len(s.recvfrom(65535)[0]))"
        ),
    ]);
    let log = net.process("udp-big").log();
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "5000",
        "the fragmented answer: {}; server: {log}; broker: {}; exit: {}",
        String::from_utf8_lossy(&reply.stderr),
        json(&daemon, &net, &["status", "--json"])["broker"],
        exit_stats(&net)
    );
    assert!(
        log.contains(&format!("{OVERLAY_V4} 4000")),
        "the server got it whole, from the exit: {log}"
    );

    let ping = net
        .client
        .output(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "4000", SERVER_V4]);
    assert!(
        ping.status.success(),
        "a fragmented ping through the exit: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert_eq!(leaked(&net), 0, "fragments left from the client's own address");
}

/// `overlay del` with live flows says how many, and ends them cleanly: a
/// TCP connection's next send meets a reset, a UDP socket's next send an
/// ICMP unreachable, at once, instead of a silent black hole.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn leaving_an_overlay_ends_its_live_flows_cleanly() {
    // Through the broker, and with the kernel wrapping the flows.
    for fast in [false, true] {
        leaving_ends_live_flows(fast);
    }
}

fn leaving_ends_live_flows(fast: bool) {
    let mut net = Topology::new();
    net.start_echo_server(7000);
    let daemon = joined_with(&mut net, &[CLIENT_V4], fast);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7000", "--via", "exit",
        ],
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "7001", "--via", "exit",
        ],
    );
    let trigger = net.dir.join("overlay-left");
    let script = format!(
        "import socket,os,time\n\
         t=socket.create_connection(('{SERVER_V4}',7000),timeout=5)\n\
         t.sendall(b'one');print(t.recv(16).decode(),flush=True)\n\
         u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.connect(('{SERVER_V4}',7001));u.send(b'x')\n\
         print('ready',flush=True)\n\
         while not os.path.exists('{trigger}'): time.sleep(0.05)\n\
         start=time.monotonic()\n\
         try:\n  t.sendall(b'two');t.recv(16);print('tcp alive')\n\
         except OSError as e: print('tcp',type(e).__name__)\n\
         u.settimeout(3)\n\
         try:\n  u.send(b'y');time.sleep(0.3);u.send(b'z');u.recv(16);print('udp alive')\n\
         except OSError as e: print('udp',type(e).__name__)\n\
         print('took',round(time.monotonic()-start,1))\n",
        trigger = trigger.display()
    );
    let client = net.client.clone();
    net.spawn(&client, "session", &["python3", "-u", "-c", &script]);
    wait_for_session(&mut net, "ready");
    cli_ok(&daemon, &net, &["rule", "del", "1"]);
    cli_ok(&daemon, &net, &["rule", "del", "2"]);
    let left = cli_ok(&daemon, &net, &["overlay", "del", "exit"]);
    assert!(left.contains("its 2 live flows end"), "{left}");
    std::fs::write(&trigger, b"").unwrap();
    wait_for_session(&mut net, "took");
    let log = net.process("session").log();
    assert!(log.contains("tcp ConnectionResetError"), "{log}");
    assert!(
        log.contains("udp ") && !log.contains("udp alive") && !log.contains("udp TimeoutError"),
        "{log}"
    );
    assert_quick(&log);
}

/// Waits (10 s at most) until the "session" process has printed `text`.
fn wait_for_session(net: &mut Topology, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !net.process("session").log().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            net.process("session").log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The session's application heard within 2 s (its `took N` line).
fn assert_quick(log: &str) {
    let took: f64 = log
        .split("took ")
        .nth(1)
        .and_then(|t| t.trim().parse().ok())
        .expect("took");
    assert!(took < 2.0, "the application waited {took} s: {log}");
}

/// An exit restart keeps its clients' connections (the NAT's mappings in
/// its state file); one that lost them resets the connection at once
/// rather than leaving the application hanging.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_exit_restart_keeps_connections_or_resets_them() {
    let mut net = Topology::new();
    net.start_echo_server(7100);
    let daemon = joined(&mut net, &[CLIENT_V4]);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7100", "--via", "exit",
        ],
    );
    let (first, second) = (net.dir.join("restarted"), net.dir.join("forgotten"));
    let script = format!(
        "import socket,os,time\n\
         t=socket.create_connection(('{SERVER_V4}',7100),timeout=5)\n\
         def echo(m):\n  t.sendall(m);return t.recv(16).decode()\n\
         print('one',echo(b'a'),flush=True)\n\
         while not os.path.exists('{first}'): time.sleep(0.05)\n\
         print('two',echo(b'b'),flush=True)\n\
         while not os.path.exists('{second}'): time.sleep(0.05)\n\
         start=time.monotonic()\n\
         try: print('three',echo(b'c'))\n\
         except OSError as e: print('three',type(e).__name__)\n\
         print('took',round(time.monotonic()-start,1))\n",
        first = first.display(),
        second = second.display()
    );
    let client = net.client.clone();
    net.spawn(&client, "session", &["python3", "-u", "-c", &script]);
    wait_for_session(&mut net, "one a");
    // The state is written within a second of a change.
    std::thread::sleep(Duration::from_millis(1500));
    net.process("oasis-exit").kill_hard();
    net.start_exit(&["--client", CLIENT_V4]);
    std::fs::write(&first, b"").unwrap();
    wait_for_session(&mut net, "two b");
    // Restarted without its state: the next send meets a reset.
    net.process("oasis-exit").kill_hard();
    let _ = std::fs::remove_file(net.dir.join("exit-nat.json"));
    net.start_exit(&["--client", CLIENT_V4]);
    std::fs::write(&second, b"").unwrap();
    wait_for_session(&mut net, "took");
    let log = net.process("session").log();
    assert!(log.contains("three ConnectionResetError"), "{log}");
    assert_quick(&log);
}

/// ICMP errors about a flow carried by the exit come back to the client,
/// about the packet as it sent it: a UDP send to a closed port is refused
/// (ECONNREFUSED), and a packet whose TTL runs out on the way draws the
/// router's "time exceeded" (what traceroute reads).
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn icmp_errors_come_back_through_the_exit() {
    let mut net = Topology::new();
    let daemon = joined(&mut net, &[CLIENT_V4]);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "7999", "--via", "exit",
        ],
    );
    let script = format!(
        "import socket,errno\n\
         def attempt(ttl):\n  \
           s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n  \
           s.setsockopt(socket.IPPROTO_IP,11,1)  # IP_RECVERR\n  \
           if ttl: s.setsockopt(socket.IPPROTO_IP,socket.IP_TTL,ttl)\n  \
           s.connect(('{SERVER_V4}',7999));s.send(b'x')\n  \
           try: s.recv(16);return 'answer'\n  \
           except OSError as e: return errno.errorcode.get(e.errno,'timeout')\n\
         print('closed',attempt(0))\n\
         print('ttl',attempt(1))\n"
    );
    let output = net.client.output(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("closed ECONNREFUSED"),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("ttl EHOSTUNREACH"),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A path toward the entry node narrower than the uplink (MTU 1280 on the
/// exit's link): bulk TCP both ways through the overlay completes, a TCP
/// connection older than the narrowing finds the path MTU, and a ping with
/// DF that the path beyond the exit takes is carried.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_narrow_path_to_the_entry_node_does_not_stall_overlay_tcp() {
    // Through the broker, and with the kernel wrapping the flows.
    for fast in [false, true] {
        narrow_path(fast);
    }
}

fn narrow_path(fast: bool) {
    let mut net = Topology::new();
    net.start_echo_server(7200);
    net.start_web_server(80);
    net.web_file("big.bin", 8 << 20);
    let daemon = joined_with(&mut net, &[CLIENT_V4], fast);
    net.router.run(&["ip", "link", "set", "r2", "mtu", "1280"]);
    net.overlay.run(&["ip", "link", "set", "o0", "mtu", "1280"]);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "exit"],
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "exit",
        ],
    );
    let (size, secs) = net
        .download(SERVER_V4, 80, "big.bin")
        .expect("the download through a narrow path");
    assert_eq!(size, 8 << 20);
    // Upload: 8 MB echoed back.
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
    println!("download {secs} s");
    // A connection opened now, while the broker knows no narrower path:
    // its MSS fits the uplink, not the path that is about to narrow.
    let go = net.dir.join("go");
    let client = net.client.clone();
    let script = format!(
        "import socket,os,time,threading\n\
         c=socket.create_connection(('{SERVER_V4}',7200),timeout=20)\n\
         c.sendall(b'hello');c.recv(5)\n\
         while not os.path.exists('{}'): time.sleep(0.05)\n\
         data=b'p'*(1<<20)\n\
         threading.Thread(target=lambda:(c.sendall(data),c.shutdown(socket.SHUT_WR)),daemon=True).start()\n\
         got=0\n\
         while (d:=c.recv(1<<16)): got+=len(d)\n\
         print('echoed',got,flush=True)\n",
        go.display()
    );
    net.spawn(&client, "early", &["python3", "-u", "-c", &script]);
    std::thread::sleep(Duration::from_millis(500));
    // The path MTU the OS knows toward the entry node is followed (new
    // flows are clamped to it): here a route with its own MTU, which the
    // OS reports whether or not PMTU discovery learnt anything yet.
    net.client.run(&[
        "ip",
        "route",
        "add",
        "10.77.3.0/24",
        "via",
        "10.77.1.1",
        "mtu",
        "1280",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let overlays = json(&daemon, &net, &["overlay", "list", "--json"]);
        if overlays[0]["path_mtu"].as_u64() == Some(1280) {
            break;
        }
        assert!(Instant::now() < deadline, "path MTU not followed: {overlays}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // A ping with DF too large to fit the narrow path once encapsulated
    // (1,280 less 32 bytes), though the path beyond the exit takes it
    // (1,280): it is carried, its encapsulation fragmented, and answered.
    // (Before the connection below teaches this host's stack a smaller
    // path MTU toward the server.)
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "icmp", "--via", "exit"],
    );
    let ping = net.client.output(&[
        "ping", "-n", "-c", "2", "-W", "2", "-M", "do", "-s", "1230", SERVER_V4,
    ]);
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "a 1,258-byte ping with DF: {text}"
    );

    // The early connection's segments no longer fit once encapsulated and
    // may not be fragmented: TCP hears the MTU that fits (path MTU
    // discovery), sends smaller, and its megabyte comes back whole.
    std::fs::write(&go, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !net.process("early").log().contains("echoed") {
        assert!(
            Instant::now() < deadline,
            "the early connection stalled: {}",
            net.process("early").log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        net.process("early")
            .log()
            .contains(&format!("echoed {}", 1 << 20)),
        "{}",
        net.process("early").log()
    );
    let status = json(&daemon, &net, &["status", "--json"]);
    assert!(status["broker"]["too_big"].as_u64().unwrap() >= 1, "{status}");
}

/// An unmodified UDP application sending datagrams as large as its link
/// takes (1,472 bytes, DF set as Linux does) keeps working through an
/// overlay: the encapsulation is fragmented, the application never hears
/// "message too long". TCP's path MTU discovery still works, and a ping
/// with DF that fits goes through.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn datagrams_as_large_as_the_link_takes_go_through_an_overlay() {
    let mut net = Topology::new();
    net.start_iperf_server(5201);
    net.start_web_server(80);
    net.web_file("big.bin", 4 << 20);
    let server = net.server.clone();
    net.spawn(
        &server,
        "udp-sink",
        &[
            "python3",
            "-u",
            "-c",
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5402))\n\
             while True:\n d,a=s.recvfrom(65535)\n print(a[0],len(d),flush=True)\n",
        ],
    );
    oasis_tests::wait_for_udp_listener(&net.server, 5402);
    let daemon = joined(&mut net, &[CLIENT_V4]);
    for args in [
        ["--proto", "udp", "--dport", "5402"],
        ["--proto", "udp", "--dport", "5201"],
        ["--proto", "tcp", "--dport", "5201"],
        ["--proto", "tcp", "--dport", "80"],
    ] {
        let mut full = vec!["rule", "add"];
        full.extend(args);
        full.extend(["--via", "exit"]);
        cli_ok(&daemon, &net, &full);
    }
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "exit",
        ],
    );
    let iperf = net.client.output(&[
        "iperf3", "-c", SERVER_V4, "-p", "5201", "-u", "-l", "1472", "-b", "20M", "-t", "2", "-J",
    ]);
    let report: Value = serde_json::from_slice(&iperf.stdout).unwrap_or(Value::Null);
    assert!(
        iperf.status.success() && report["error"].is_null(),
        "iperf3 -u -l 1472 through the overlay: {}{}",
        String::from_utf8_lossy(&iperf.stdout),
        String::from_utf8_lossy(&iperf.stderr)
    );
    let received = report["end"]["sum"]["packets"].as_u64().unwrap_or(0)
        - report["end"]["sum"]["lost_packets"].as_u64().unwrap_or(0);
    assert!(received > 0, "no datagram arrived: {report}");
    // A connected socket with DF asked for (IP_PMTUDISC_DO): a
    // "fragmentation needed" answer would fail its next send.
    let sender = net.client.output(&[
        "python3",
        "-c",
        &format!(
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.setsockopt(socket.IPPROTO_IP,10,2)\ns.connect(('{SERVER_V4}',5402))\n\
             for i in range(5):\n s.send(b'x'*1472)\n time.sleep(0.1)\n"
        ),
    ]);
    assert!(
        sender.status.success(),
        "a connected DF socket: {}",
        String::from_utf8_lossy(&sender.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while net
        .process("udp-sink")
        .log()
        .matches(&format!("{OVERLAY_V4} 1472"))
        .count()
        < 5
    {
        assert!(
            Instant::now() < deadline,
            "the datagrams did not all arrive whole from the exit: {}",
            net.process("udp-sink").log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ping = net.client.output(&[
        "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", "1372", SERVER_V4,
    ]);
    assert!(
        ping.status.success(),
        "a 1,400-byte ping with DF: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // TCP: its MSS clamped to the overlay, a bulk download whole.
    let size = net.client.output(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{SERVER_V4}/big.bin"),
    ]);
    assert_eq!(String::from_utf8_lossy(&size.stdout), (4 << 20).to_string());
    let status = json(&daemon, &net, &["status", "--json"]);
    assert_eq!(status["broker"]["too_big"].as_u64(), Some(0), "{status}");
}

/// Each ping session is a flow of its own: a ping started after the rules
/// changed takes the new carrier while a running one keeps its own (before,
/// every echo between two hosts was one flow, and a new ping inherited
/// the old session's carrier for as long as any ping to that host went on).
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn each_ping_session_takes_the_carrier_of_its_time() {
    let mut net = Topology::new();
    net.server.watch(
        "from-client",
        &format!("ip saddr {CLIENT_V4} icmp type echo-request"),
    );
    net.server.watch(
        "from-exit",
        &format!("ip saddr {OVERLAY_V4} icmp type echo-request"),
    );
    let daemon = joined(&mut net, &[CLIENT_V4]);
    let added = daemon.json(
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "exit", "--json",
        ],
    );
    let id = added["id"].as_u64().unwrap().to_string();
    let client = net.client.clone();
    net.spawn(&client, "ping-a", &["ping", "-n", "-i", "0.2", SERVER_V4]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.server.watched("from-exit") < 3 {
        assert!(
            Instant::now() < deadline,
            "the first ping never went through the exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cli_ok(&daemon, &net, &["rule", "del", &id]);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "underlay",
        ],
    );
    let before = (net.server.watched("from-client"), net.server.watched("from-exit"));
    let second = net
        .client
        .output(&["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", SERVER_V4]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    let after = (net.server.watched("from-client"), net.server.watched("from-exit"));
    assert!(
        after.0 >= before.0 + 5,
        "the new ping did not take the underlay: {before:?} {after:?}"
    );
    assert!(
        after.1 > before.1,
        "the running ping left the exit: {before:?} {after:?}"
    );
}

/// A paced download through the exit (an application reading at 4 MB/s)
/// goes on across restarts of the exit, graceful and hard: the server's
/// packets that reach the exit's address while no exit runs must not draw
/// resets from its host's stack.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_paced_download_survives_restarts_of_the_exit() {
    // Through the exit's process, then with both kernels carrying the
    // download (the exit's program outlives the process, and the next
    // exit takes over with the mappings it restores).
    for fast in [false, true] {
        paced_download_through_restarts(fast);
    }
}

fn paced_download_through_restarts(fast: bool) {
    let mut net = Topology::new();
    net.start_web_server(80);
    net.web_file("huge.bin", 200 << 20);
    let daemon = joined_with(&mut net, &[CLIENT_V4], fast);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "exit"],
    );
    net.start_paced_download("paced", SERVER_V4, 80, "huge.bin", 4_000_000);
    let goes_on = |net: &mut Topology, what: &str| net.paced_download_goes_on("paced", 8 << 20, what);
    goes_on(&mut net, "before any restart");
    if fast {
        let stats = exit_stats(&net);
        assert!(
            stats["fast_path"]["to_client"]["bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "the exit's kernel carries the download: {stats}"
        );
    }
    // The state is written within a second of a change.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        net.process("oasis-exit").terminate(Duration::from_secs(10)),
        "the exit did not stop cleanly"
    );
    std::thread::sleep(Duration::from_millis(300));
    net.start_exit(&["--client", CLIENT_V4]);
    goes_on(&mut net, "after a graceful restart of the exit");
    net.process("oasis-exit").kill_hard();
    std::thread::sleep(Duration::from_millis(300));
    net.start_exit(&["--client", CLIENT_V4]);
    goes_on(&mut net, "after a hard restart of the exit");
}

/// Bulk TCP both ways over overlays whose shims are 0, 16 and 64 bytes:
/// after the handshake the client's kernel wraps the flow's packets itself
/// (the broker's TUN reads a handful while megabytes go out), every byte
/// comes back as it was sent (hashed), and `oasis status` counts the fast
/// path.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bulk_overlay_tcp_takes_the_kernels_fast_path_on_the_client() {
    const MB: usize = 16;
    // Last, over plain veth to the exit on this same host: nothing cuts
    // the client's wrapped GSO packets or finishes their checksums on the
    // way, and the exit's process does it.
    for (shim, like_nics) in [(0usize, true), (16, true), (64, true), (16, false)] {
        let mut net = Topology::new();
        net.start_echo_server(7200);
        let daemon = fast_overlay(&mut net, CLIENT_V4, shim, true, None);
        net.links_like_nics(like_nics);
        cli_ok(
            &daemon,
            &net,
            &["rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "x"],
        );
        let what = format!("shim {shim}, links like NICs {like_nics}");
        net.echo_bulk(7200, MB, &what);
        let status = json(&daemon, &net, &["status", "--json"]);
        let classifier = &status["classifier"];
        let count = |field: &str| classifier[field].as_u64().unwrap();
        assert!(
            count("encap_bytes") >= (MB as u64) << 20,
            "{what}: the upload did not take the fast path: {classifier}"
        );
        let tun_packets = status["tun"]["diverted_packets"].as_u64().unwrap();
        assert!(
            tun_packets < 100,
            "{what}: {tun_packets} packets crossed the broker: {status}"
        );
        assert_eq!(count("fast_no_room"), 0, "{what}: {classifier}");
        println!(
            "{what}: {} packets wrapped, {} opened, {} aggregates left to the broker, {tun_packets} through the TUN",
            count("encap_packets"),
            count("decap_packets"),
            count("fast_aggregate")
        );
        if shim == 0 {
            // kill -9 while the kernel wraps a live connection: nothing of
            // the daemon stays behind to black-hole traffic; a new
            // connection goes on the underlay as if Oasis were not there.
            let client = net.client.clone();
            let held = format!(
                "import socket,time\n\
                 c=socket.create_connection(('{SERVER_V4}',7200),timeout=5)\n\
                 c.sendall(b'x'*100000);print('live',flush=True);time.sleep(30)\n"
            );
            net.spawn(&client, "held", &["python3", "-u", "-c", &held]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !net.process("held").log().contains("live") {
                assert!(Instant::now() < deadline, "{}", net.process("held").log());
                std::thread::sleep(Duration::from_millis(50));
            }
            let now = json(&daemon, &net, &["status", "--json"]);
            assert!(
                now["classifier"]["encap_packets"].as_u64().unwrap() > count("encap_packets"),
                "the held connection is wrapped in the kernel: {}",
                now["classifier"]
            );
            net.process("oasis").kill_hard();
            assert_eq!(
                net.echo(SERVER_V4, 7200, "after").as_deref(),
                Some("after"),
                "a new connection after kill -9"
            );
        }
    }
}

/// An entry node on IPv6: the client's kernel wraps in IPv6 (UDP checksum
/// zero) and opens the entry node's IPv6 datagrams, with IPv4 inside; the
/// exit's kernel opens the client's IPv6 datagrams and wraps the replies in
/// IPv6.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bulk_overlay_tcp_to_an_ipv6_entry_node_takes_both_fast_paths() {
    const MB: usize = 64;
    let mut net = Topology::new();
    net.start_echo_server(7200);
    net.start_exit(&["--client", CLIENT_V6, "--listen", "[::]:7400", "--shim-len", "16"]);
    net.publish(
        "x6.xml",
        &format!(
            r#"<overlay name="x6"><shim length="16"/><entry host="{OVERLAY_V6}" port="7400"/></overlay>"#
        ),
    );
    net.links_like_nics(true);
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "overlay_fast_path: true\n");
    cli_ok(&daemon, &net, &["overlay", "add", "x", &format!("{base}/x6.xml")]);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "x"],
    );
    net.echo_bulk(7200, MB, "over an IPv6 entry node");
    let status = json(&daemon, &net, &["status", "--json"]);
    let classifier = &status["classifier"];
    let count = |field: &str| classifier[field].as_u64().unwrap();
    assert!(
        count("encap_bytes") >= (MB as u64) << 20,
        "the upload did not take the fast path: {classifier}"
    );
    assert!(
        count("decap_packets") > 1000,
        "the download was not opened in the kernel: {classifier}"
    );
    let tun_packets = status["tun"]["diverted_packets"].as_u64().unwrap();
    assert!(
        tun_packets < 100,
        "{tun_packets} packets crossed the broker: {status}"
    );
    // The exit's kernel carried it both ways, its process saw the IPv6
    // client open and close the connection, no more.
    let stats = exit_stats(&net);
    let carried = |way: &str| stats["fast_path"][way]["bytes"].as_u64().unwrap_or(0);
    assert!(
        carried("to_internet") >= (MB as u64) << 20 && carried("to_client") >= (MB as u64) << 20,
        "the exit's kernel did not carry the echo: {stats}"
    );
    let user_space = &stats["clients"][format!("[{CLIENT_V6}]:7400")];
    let seen = |way: &str| user_space[way]["packets"].as_u64().unwrap_or(0);
    assert!(
        seen("to_internet") > 0 && seen("to_internet") < 20 && seen("to_client") < 20,
        "the exit's process saw more than the IPv6 client's handshake: {stats}"
    );
}

/// An exit node serving the client (`--client CLIENT`) with a shim of
/// `shim` bytes, its overlay `x` joined by a daemon with the client's fast
/// path `client_fast`, over links that behave as NICs do; `token`: the
/// shim the daemon sends starts with it (zeros after).
fn fast_overlay(
    net: &mut Topology,
    client: &str,
    shim: usize,
    client_fast: bool,
    token: Option<&str>,
) -> Daemon {
    net.start_exit(&["--client", client, "--shim-len", &shim.to_string()]);
    net.publish(
        "x.xml",
        &format!(
            r#"<overlay name="x"><shim length="{shim}"/><entry host="10.77.3.2" port="7400"/></overlay>"#
        ),
    );
    net.links_like_nics(true);
    let base = net.start_spec_server();
    let daemon = Daemon::start(net, &format!("overlay_fast_path: {client_fast}\n"));
    let url = format!("{base}/x.xml");
    let mut add = vec!["overlay", "add", "x", &url];
    let padded = token.map(|t| format!("{t:0<width$}", width = shim * 2));
    if let Some(padded) = &padded {
        add.extend(["--token", padded]);
    }
    cli_ok(&daemon, net, &add);
    daemon
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn bulk_overlay_tcp_takes_the_exits_fast_path_both_ways() {
    // With both fast paths a gigabyte each way: with shims of 0, 16 (its
    // start the client's token) and 64 bytes; with segmentation offloads
    // off on the client and the server, so every packet is the size of
    // the wire; and over a path of MTU 1280 between the client and the
    // router. Then, smaller, with the client's fast path off (the broker
    // wraps).
    const GB: usize = 1024;
    struct Variant {
        client_fast: bool,
        shim: usize,
        token: Option<&'static str>,
        offloads: bool,
        mtu: Option<u32>,
        mb: usize,
    }
    let both = |shim, token| Variant {
        client_fast: true,
        shim,
        token,
        offloads: true,
        mtu: None,
        mb: GB,
    };
    for Variant {
        client_fast,
        shim,
        token,
        offloads,
        mtu,
        mb,
    } in [
        both(0, None),
        both(16, Some("a1b2c3d4")),
        both(64, None),
        Variant {
            offloads: false,
            ..both(0, None)
        },
        Variant {
            mtu: Some(1280),
            ..both(16, None)
        },
        Variant {
            client_fast: false,
            mb: 32,
            ..both(0, None)
        },
    ] {
        let what = format!(
            "client fast path {client_fast}, shim {shim}, token {token:?}, offloads {offloads}, mtu {mtu:?}"
        );
        let mut net = Topology::new();
        if !offloads {
            net.client
                .run(&["ethtool", "-K", "c0", "tso", "off", "gso", "off"]);
            net.server
                .run(&["ethtool", "-K", "s0", "tso", "off", "gso", "off"]);
        }
        if let Some(mtu) = mtu {
            let mtu = mtu.to_string();
            net.client.run(&["ip", "link", "set", "c0", "mtu", &mtu]);
            net.router.run(&["ip", "link", "set", "r0", "mtu", &mtu]);
        }
        net.start_echo_server(7200);
        let client = match token {
            Some(token) => format!("{CLIENT_V4},class=2,token={token}"),
            None => format!("{CLIENT_V4},class=2"),
        };
        let daemon = fast_overlay(&mut net, &client, shim, client_fast, token);
        cli_ok(
            &daemon,
            &net,
            &["rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "x"],
        );
        let started = Instant::now();
        net.echo_bulk(7200, mb, &what);
        println!("{what}: {mb} MB each way in {:.1?}", started.elapsed());
        let stats = exit_stats(&net);
        let fast = &stats["fast_path"];
        let user_space = &stats["clients"][format!("{CLIENT_V4}:7400")];
        let carried = |way: &str| fast[way]["bytes"].as_u64().unwrap_or(0);
        assert!(
            carried("to_internet") >= (mb as u64) << 20 && carried("to_client") >= (mb as u64) << 20,
            "{what}: the kernel did not carry the echo: {stats}"
        );
        // The exit's process saw the connection open and close, and the
        // packets whose finished checksum happens to look unfinished (one
        // in 65,536 by chance, so about a dozen of a gigabyte's: allowed
        // four times that), no more.
        let seen = |way: &str| user_space[way]["packets"].as_u64().unwrap_or(0);
        let by_chance = 4 * fast["to_client"]["packets"].as_u64().unwrap_or(0) / 65_536;
        assert!(
            seen("to_internet") < 20 + by_chance && seen("to_client") < 20 + by_chance,
            "{what}: packets crossed the exit's user space: {stats}"
        );
        assert!(
            fast["classes"]["2"]["to_client"]["packets"].as_u64().unwrap_or(0) > 0,
            "{what}: counted in the client's class: {fast}"
        );
        if client_fast {
            let status = json(&daemon, &net, &["status", "--json"]);
            let tun_packets = status["tun"]["diverted_packets"].as_u64().unwrap();
            assert!(
                tun_packets < 100,
                "{what}: {tun_packets} packets crossed the client's broker"
            );
        }
        println!("{what}: {fast}");
    }
}

/// Two clients of the exit in different classes send more than the
/// exit's uplink takes, through the kernel's fast path: the higher class
/// gets the uplink, the lower what is left (the htb qdisc of
/// `--uplink-rate`, fed by the priority the kernel gives each packet).
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_higher_class_gets_a_contended_uplink_through_the_fast_path() {
    let mut net = Topology::new();
    net.client
        .run(&["ip", "addr", "add", "10.77.1.3/24", "dev", "c0"]);
    net.start_exit(&[
        "--client",
        "10.77.1.2,class=0",
        "--client",
        "10.77.1.3,class=3",
        "--uplink-rate",
        "8mbit",
    ]);
    net.links_like_nics(true);
    let counts = net.dir.join("sink.json");
    let sink = format!(
        "import socket,select,time,json,os\n\
         socks={{}}\n\
         for p in (9001,9002):\n  \
           s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('{SERVER_V4}',p));s.setblocking(False);socks[s]=p\n\
         counts={{9001:0,9002:0}}\n\
         while True:\n  \
           r,_,_=select.select(list(socks),[],[],0.2)\n  \
           for s in r:\n    \
             while True:\n      \
               try: counts[socks[s]]+=len(s.recv(2048))\n      \
               except BlockingIOError: break\n  \
           open('{path}.tmp','w').write(json.dumps(counts));os.rename('{path}.tmp','{path}')\n",
        path = counts.display()
    );
    let server = net.server.clone();
    net.spawn(&server, "sink", &["python3", "-c", &sink]);
    // Each client wraps its own UDP packets (no shim) and sends them as
    // fast as it can for 4 s: far more than 8 Mbit/s each.
    let senders = format!(
        "import socket,struct,threading,time\n\
         def packet(src,sport,dport):\n  \
           body=b'p'*1000;udp=struct.pack('!HHHH',sport,dport,8+len(body),0)+body\n  \
           h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(udp),0,0,64,17,0,socket.inet_aton(src),socket.inet_aton('{SERVER_V4}'))\n  \
           s=sum(struct.unpack('!10H',h));s=(s&0xffff)+(s>>16);s=(s&0xffff)+(s>>16)\n  \
           return h[:10]+struct.pack('!H',~s&0xffff)+h[12:]+udp\n\
         def send(src,dport):\n  \
           s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind((src,0))\n  \
           p=packet(src,40000,dport);end=time.time()+4\n  \
           while time.time()<end: s.sendto(p,('{OVERLAY_V4}',7400))\n\
         t=[threading.Thread(target=send,args=a) for a in (('10.77.1.2',9001),('10.77.1.3',9002))]\n\
         [x.start() for x in t];[x.join() for x in t];print('sent')\n"
    );
    let output = net.client.output(&["python3", "-c", &senders]);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("sent"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // What arrived while both sent. (Each class's queue still holds a
    // backlog, which drains afterwards in class order: not counted.)
    std::thread::sleep(Duration::from_millis(300));
    let got: Value =
        serde_json::from_str(&std::fs::read_to_string(&counts).expect("sink counts")).expect("JSON");
    let (high, low) = (got["9001"].as_u64().unwrap(), got["9002"].as_u64().unwrap());
    let stats = exit_stats(&net);
    let classes = &stats["fast_path"]["classes"];
    assert!(
        classes["0"]["to_internet"]["packets"].as_u64().unwrap_or(0) > 0
            && classes["3"]["to_internet"]["packets"].as_u64().unwrap_or(0) > 0,
        "both classes through the kernel: {stats}"
    );
    assert!(
        high > 0 && high >= 4 * low,
        "class 0 got {high} bytes through, class 3 {low}: {stats}"
    );
    println!("class 0: {high} bytes, class 3: {low} bytes");
}

/// RFC 6935/6936 let tunnels send IPv6 UDP with a zero checksum, and IPv6
/// sockets drop such datagrams unless told otherwise. The broker's overlay
/// sockets are told; a plain socket beside them shows what would happen.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn ipv6_overlay_sockets_take_datagrams_with_a_zero_udp_checksum() {
    use oasis_broker::platform::DatagramSocket;
    use oasis_broker::platform::linux::socket::UdpSocket as OverlaySocket;
    use std::net::{Ipv6Addr, SocketAddr, UdpSocket};

    let lone = oasis_tests::LoneNetns::new("csum0");
    let net = lone.ns.name.clone();
    std::thread::spawn(move || {
        lone.enter();
        let overlay = OverlaySocket::open(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)), 0, false).unwrap();
        let overlay_port = overlay.local_addr().unwrap().port();
        let plain = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let plain_port = plain.local_addr().unwrap().port();

        // SAFETY: plain socket calls on a descriptor this thread owns.
        let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP) };
        assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let send_zero_checksum = |port: u16, payload: &[u8]| {
            let mut datagram = Vec::new();
            datagram.extend_from_slice(&4242u16.to_be_bytes());
            datagram.extend_from_slice(&port.to_be_bytes());
            datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            datagram.extend_from_slice(&[0, 0]);
            datagram.extend_from_slice(payload);
            // SAFETY: a zeroed sockaddr_in6 filled in below.
            let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            to.sin6_family = libc::AF_INET6 as u16;
            to.sin6_addr.s6_addr = Ipv6Addr::LOCALHOST.octets();
            // SAFETY: the buffer and address live across the call.
            let sent = unsafe {
                libc::sendto(
                    raw,
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                    (&to as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                )
            };
            assert_eq!(
                sent,
                datagram.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
        };

        send_zero_checksum(plain_port, b"zero to plain");
        send_zero_checksum(overlay_port, b"zero to overlay");
        // A checksummed datagram after the zero one: the plain socket's first
        // datagram is this one if, and only if, the kernel dropped the other.
        UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))
            .unwrap()
            .send_to(b"checksummed", (Ipv6Addr::LOCALHOST, plain_port))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = plain.recv_from(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"checksummed",
            "a plain IPv6 socket took a zero checksum"
        );

        let mut scratch = Default::default();
        let mut bufs = vec![vec![0u8; 2048]];
        let mut out = vec![Default::default()];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = 0;
        while got == 0 && Instant::now() < deadline {
            got = overlay
                .recv(&mut scratch, &mut bufs, &mut out, Duration::from_millis(200))
                .unwrap();
        }
        assert_eq!(got, 1, "the overlay socket dropped a zero-checksum datagram");
        assert_eq!(&bufs[0][..out[0].len], b"zero to overlay");
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(raw) };
    })
    .join()
    .unwrap_or_else(|_| panic!("in {net}"));
}

/// The paper's plain format is neither private nor authenticated beyond
/// addresses: every byte a flow carries crosses the path in the clear.
/// This is the case the WireGuard tests' "nothing in the clear" check must
/// be able to catch (tests/tests/wireguard.rs uses the same match).
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_plain_format_carries_payloads_in_the_clear() {
    let mut net = Topology::new();
    let _daemon = web_via_exit(&mut net);
    net.web_file("marked", 4 << 20);
    net.router
        .watch("clear", "meta l4proto udp @th,800,64 0x7878787878787878");
    let (bytes, _) = net.download(SERVER_V4, 80, "marked").expect("the download");
    assert_eq!(bytes, 4 << 20);
    let clear = net.router.watched("clear");
    println!("{clear} datagrams on the router showed the file's bytes");
    assert!(clear > 0, "the plain format's payload was not seen");
}
