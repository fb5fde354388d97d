//! WireGuard overlays against a WireGuard we did not write: wireguard-go
//! (configured with wireguard-tools) on the overlay host, which forwards
//! what comes out of its tunnel to the server, masqueraded, as a home
//! router or a VPN provider's server does.

use std::time::{Duration, Instant};

use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, OVERLAY_V6, SERVER_V4, Topology, wg_keys};

const WG_PORT: u16 = 51820;
/// The client's address inside the tunnel.
const TUNNEL: &str = "10.88.0.1";

fn cli_ok(daemon: &Daemon, net: &Topology, args: &[&str]) -> String {
    daemon.ok(net, args)
}

/// A wg-quick file for the client, as a user has one, mode 0600.
fn wg_quick(net: &Topology, private: &str, peer_public: &str) -> std::path::PathBuf {
    wg_quick_to(net, private, peer_public, &format!("{OVERLAY_V4}:{WG_PORT}"))
}

fn wg_quick_to(net: &Topology, private: &str, peer_public: &str, endpoint: &str) -> std::path::PathBuf {
    wg_quick_with(net, private, peer_public, endpoint, ("", ""))
}

/// `extra`: more lines for `[Interface]` and for `[Peer]`.
fn wg_quick_with(
    net: &Topology,
    private: &str,
    peer_public: &str,
    endpoint: &str,
    (interface, peer): (&str, &str),
) -> std::path::PathBuf {
    let path = net.dir.join("home.conf");
    let text = format!(
        "# from the router's web page\n[Interface]\nPrivateKey = {private}\nAddress = {TUNNEL}/32\n{interface}\
         PostUp = echo never run\n\n[Peer]\nPublicKey = {peer_public}\n{peer}\
         Endpoint = {endpoint}\nAllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 25\n"
    );
    std::fs::write(&path, text).expect("wg-quick file");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// The daemon with the peer joined as overlay `home` (`pin`: never the
/// underlay); `peer_public` as the file names it.
fn joined(net: &mut Topology, client_private: &str, peer_public: &str, pin: bool) -> Daemon {
    let file = wg_quick(net, client_private, peer_public);
    let daemon = Daemon::start(net, "");
    let file = file.to_string_lossy().into_owned();
    let mut args = vec!["overlay", "add", "home", "--wireguard", &file];
    if pin {
        args.push("--pin");
    }
    let shown = cli_ok(&daemon, net, &args);
    assert!(shown.contains("our public key"), "{shown}");
    assert!(
        !shown.contains(client_private),
        "the private key is never shown: {shown}"
    );
    daemon
}

/// The daemon with `file` joined as overlay `home`, its peer up.
fn joined_file(net: &mut Topology, file: &std::path::Path) -> Daemon {
    let daemon = Daemon::start(net, "");
    cli_ok(
        &daemon,
        net,
        &["overlay", "add", "home", "--wireguard", &file.to_string_lossy()],
    );
    wait_state(&daemon, net, "up", Duration::from_secs(5));
    daemon
}

fn peer(daemon: &Daemon, net: &Topology) -> serde_json::Value {
    peer_of(daemon, net, "home")
}

fn peer_of(daemon: &Daemon, net: &Topology, overlay: &str) -> serde_json::Value {
    let view = daemon.json(net, &["overlay", "show", overlay, "--json"]);
    view["wireguard"]["peers"][0].clone()
}

/// Waits until the peer's state starts with `state`; how long it took.
fn wait_state(daemon: &Daemon, net: &Topology, state: &str, within: Duration) -> Duration {
    wait_state_of(daemon, net, "home", state, within)
}

fn wait_state_of(daemon: &Daemon, net: &Topology, overlay: &str, state: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let peer = peer_of(daemon, net, overlay);
        if peer["state"].as_str().is_some_and(|s| s.starts_with(state)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "the peer is not {state} after {within:?}: {peer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replays one WireGuard data datagram the peer sent the client, and sends
/// a forged copy of another (one ciphertext byte flipped), from the router
/// onto the client's link.
fn replay_and_forge(net: &Topology) {
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3))\n\
         s.bind(('r0',0));s.settimeout(10)\n\
         done=0\n\
         while done<2:\n  \
           f,a=s.recvfrom(65535)\n  \
           if a[2]!=4 or len(f)<120 or f[23]!=17 or f[34:36]!=({WG_PORT}).to_bytes(2,'big') or f[42]!=4: continue\n  \
           f=bytearray(f);f[40:42]=b'\\0\\0'\n  \
           if done==1: f[80]^=1\n  \
           s.send(bytes(f));done+=1\n\
         print('sent',done)\n"
    );
    let output = net.router.output(&["python3", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "sent 2",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_wireguard_go_peer_carries_tcp_udp_and_ping_and_nothing_goes_in_the_clear() {
    let mut net = Topology::new();
    let (client_private, client_public) = wg_keys(&net.client);
    let peer_public = net.start_wireguard_peer(&client_public, &format!("{TUNNEL}/32"), WG_PORT);
    net.start_echo_server(7200);
    net.start_web_server(80);
    net.web_file("marked", 4 << 20);
    // Every data packet of a plain copy of the file would carry its bytes
    // (`x`) at byte 100 of its UDP datagram: none may cross the router.
    net.router
        .watch("clear", "meta l4proto udp @th,800,64 0x7878787878787878");
    // What reaches the server comes from the overlay host.
    net.server
        .watch("from_overlay", &format!("ip saddr {OVERLAY_V4} tcp dport 7200"));
    net.server
        .watch("from_client", &format!("ip saddr {CLIENT_V4} tcp dport 7200"));

    let mut daemon = joined(&mut net, &client_private, &peer_public, false);
    let took = wait_state(&daemon, &net, "up", Duration::from_secs(5));
    println!("handshake done {took:?} after the join");
    for rule in [
        ["--proto", "tcp", "--dport", "7200"],
        ["--proto", "tcp", "--dport", "80"],
        ["--proto", "udp", "--dport", "5300"],
    ] {
        let mut args = vec!["rule", "add"];
        args.extend(rule);
        args.extend(["--via", "home"]);
        cli_ok(&daemon, &net, &args);
    }
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "icmp", "--dst", SERVER_V4, "--via", "home",
        ],
    );

    net.echo_bulk(7200, 100, "through wireguard-go");
    assert!(net.server.watched("from_overlay") > 1000);
    assert_eq!(
        net.server.watched("from_client"),
        0,
        "nothing leaked onto the underlay"
    );

    let (bytes, _) = net.download(SERVER_V4, 80, "marked").expect("the download");
    assert_eq!(bytes, 4 << 20);
    assert_eq!(net.router.watched("clear"), 0, "plain payload crossed the router");

    let ping = net
        .client
        .output(&["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_V4]);
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));
    let server = net.server.clone();
    net.spawn(
        &server,
        "udp-echo",
        &["python3", "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5300))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)\n"],
    );
    oasis_tests::wait_for_udp_listener(&net.server, 5300);
    let reply = net.client.output(&[
        "python3",
        "-c",
        &format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b'sealed',('{SERVER_V4}',5300))\nprint(s.recvfrom(2048)[0].decode())"),
    ]);
    assert_eq!(String::from_utf8_lossy(&reply.stdout).trim(), "sealed");

    // A replayed and a forged datagram from the peer's address are
    // refused and counted; the tunnel goes on.
    let before = peer(&daemon, &net)["rejected"].as_u64().unwrap();
    let client = net.client.clone();
    let held = format!(
        "import socket,time\n\
         c=socket.create_connection(('{SERVER_V4}',7200),timeout=5)\n\
         while True: c.sendall(b'y'*1000);c.recv(65536);time.sleep(0.01)\n"
    );
    net.spawn(&client, "chatter", &["python3", "-c", &held]);
    replay_and_forge(&net);
    let deadline = Instant::now() + Duration::from_secs(5);
    while peer(&daemon, &net)["rejected"].as_u64().unwrap() < before + 2 {
        assert!(Instant::now() < deadline, "{}", peer(&daemon, &net));
        std::thread::sleep(Duration::from_millis(50));
    }
    net.process("chatter").kill_hard();
    let status = daemon.json(&net, &["status", "--json"]);
    println!("peer: {}\nbroker: {}", peer(&daemon, &net), status["broker"]);
    assert_eq!(
        net.echo(SERVER_V4, 7200, "still sealed").as_deref(),
        Some("still sealed")
    );
    // The key store holds the file, readable by root alone; the config
    // names it and holds no key.
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert!(!config.contains(&client_private), "{config}");
    let kept = net.dir.join("wireguard/home.conf");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(config.contains("wireguard/home.conf"), "{config}");

    // After a restart the overlay is back from the key store.
    net.process("oasis").terminate(Duration::from_secs(5));
    daemon = Daemon::start(&mut net, "");
    wait_state(&daemon, &net, "up", Duration::from_secs(5));
    assert_eq!(net.echo(SERVER_V4, 7200, "again").as_deref(), Some("again"));
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_peer_that_does_not_know_us_is_down_within_five_seconds() {
    for pin in [false, true] {
        let mut net = Topology::new();
        // The peer knows some other client.
        let (_, stranger) = wg_keys(&net.client);
        let (client_private, _) = wg_keys(&net.client);
        let peer_public = net.start_wireguard_peer(&stranger, &format!("{TUNNEL}/32"), WG_PORT);
        net.start_echo_server(7200);
        net.server
            .watch("from_overlay", &format!("ip saddr {OVERLAY_V4} tcp dport 7200"));
        let daemon = joined(&mut net, &client_private, &peer_public, pin);
        let took = wait_state(&daemon, &net, "down", Duration::from_secs(8));
        println!("pinned {pin}: down {took:?} after the join");
        let shown = cli_ok(&daemon, &net, &["overlay", "show", "home"]);
        assert!(shown.contains("does not answer the handshake"), "{shown}");
        cli_ok(
            &daemon,
            &net,
            &[
                "rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "home",
            ],
        );
        if pin {
            // Refused at once (a reset), not left to time out.
            let script = format!(
                "import socket\n\
                 try:\n  socket.create_connection(('{SERVER_V4}',7200),timeout=3);print('connected')\n\
                 except Exception as e: print(type(e).__name__)\n"
            );
            let output = net.client.output(&["python3", "-c", &script]);
            assert_eq!(
                String::from_utf8_lossy(&output.stdout).trim(),
                "ConnectionRefusedError",
                "a pinned overlay's flow is refused: {}",
                net.process("oasis").log()
            );
        } else {
            let echoed = net.echo(SERVER_V4, 7200, "hello");
            assert_eq!(echoed.as_deref(), Some("hello"), "the underlay carries it");
            let flows = cli_ok(&daemon, &net, &["flows"]);
            assert!(flows.contains("WireGuard peer does not answer"), "{flows}");
        }
        assert_eq!(net.server.watched("from_overlay"), 0);
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_bad_wireguard_file_is_refused_with_its_line_and_nothing_joined() {
    let mut net = Topology::new();
    let (client_private, _) = wg_keys(&net.client);
    let daemon = Daemon::start(&mut net, "");
    let file = net.dir.join("bad.conf");
    for (text, expected) in [
        (
            format!(
                "[Interface]\nPrivateKey = {client_private}\nAddress = {TUNNEL}/32\n[Peer]\nPublicKey = abc\n"
            ),
            "line 5: PublicKey: not a WireGuard key",
        ),
        (
            format!(
                "[Interface]\nPrivateKey = {client_private}\nAddress = {TUNNEL}/32\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0\n",
                wg_keys(&net.client).1
            ),
            "[Peer] at line 4 has no Endpoint",
        ),
        (
            format!("[Interface]\nPrivateKey = {client_private}\nAddr"),
            "line 3: expected `Key = Value`",
        ),
    ] {
        std::fs::write(&file, &text).unwrap();
        let output = daemon.cli(
            &net,
            &["overlay", "add", "bad", "--wireguard", &file.to_string_lossy()],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("may be read by others"), "{stderr}");
        assert!(!stderr.contains(&client_private), "{stderr}");
    }
    let list = cli_ok(&daemon, &net, &["overlay", "list"]);
    assert!(list.contains("No overlays joined"), "{list}");
    assert!(!net.dir.join("wireguard/bad.conf").exists());
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_oasis_client_and_oasis_exit_speak_wireguard_and_strangers_get_nothing() {
    let mut net = Topology::new();
    net.start_echo_server(7200);
    let (exit_private, exit_public) = wg_keys(&net.overlay);
    let key_file = net.dir.join("exit.key");
    std::fs::write(&key_file, &exit_private).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (client_private, client_public) = wg_keys(&net.client);
    let key_text = key_file.to_string_lossy().into_owned();
    // With a pre-shared key, as `wg genpsk` makes one: the exit reads it
    // from a file.
    let psk = net.overlay.run(&["wg", "genpsk"]).trim().to_string();
    let psk_file = net.dir.join("client.psk");
    std::fs::write(&psk_file, &psk).unwrap();
    std::fs::set_permissions(&psk_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let peer_arg = format!("{client_public},class=1,psk={}", psk_file.display());
    let stats = net.start_exit(&["--wireguard-key", &key_text, "--peer", &peer_arg]);
    net.server
        .watch("from_exit", &format!("ip saddr {OVERLAY_V4} tcp dport 7200"));
    net.server
        .watch("from_client", &format!("ip saddr {CLIENT_V4} tcp dport 7200"));

    let file = wg_quick_with(
        &net,
        &client_private,
        &exit_public,
        &format!("{OVERLAY_V4}:{WG_PORT}"),
        ("", &format!("PresharedKey = {psk}\n")),
    );
    let daemon = joined_file(&mut net, &file);
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "home",
        ],
    );
    net.echo_bulk(7200, 32, "to oasis-exit over WireGuard");
    assert!(net.server.watched("from_exit") > 100);
    assert_eq!(net.server.watched("from_client"), 0);
    // The exit's counters: the client by its key's address, in its class;
    // the kernel's fast path carries nothing of it (it does not seal).
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        let text = std::fs::read_to_string(&stats).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let carried = json["classes"]["1"]["to_internet"]["bytes"].as_u64().unwrap_or(0);
        if carried >= 32 << 20 {
            break json;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let peer = &exit["wireguard"]["peers"][0];
    assert_eq!(peer["public_key"], client_public.as_str(), "{exit}");
    assert!(peer["handshakes"].as_u64().unwrap() >= 1, "{exit}");
    assert_eq!(exit["fast_flows"], 0, "{exit}");

    // A live download goes on across a restart of the exit: the NAT's
    // state file keeps the client's mapping under its key's address, and
    // the client's next handshake (WireGuard starts one after 15 s
    // without an answer) carries the flow on.
    net.start_web_server(80);
    net.web_file("long", 64 << 20);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "home"],
    );
    net.start_paced_download("paced", SERVER_V4, 80, "long", 1 << 20);
    net.paced_download_goes_on("paced", 2 << 20, "before the exit's restart");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(net.process("oasis-exit").terminate(Duration::from_secs(10)));
    net.start_exit(&["--wireguard-key", &key_text, "--peer", &peer_arg]);
    let from = net.paced_progress("paced");
    let deadline = Instant::now() + Duration::from_secs(40);
    while net.paced_progress("paced") < from + (2 << 20) {
        assert!(
            Instant::now() < deadline,
            "the download did not go on after the exit's restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    net.process("paced").kill_hard();
    cli_ok(&daemon, &net, &["rule", "del", "2"]);

    // A key the exit does not know gets nothing: no handshake, no packet
    // out; the flow is refused (pinned) and counted at the exit.
    cli_ok(&daemon, &net, &["rule", "del", "1"]);
    cli_ok(&daemon, &net, &["overlay", "del", "home"]);
    assert!(
        !net.dir.join("wireguard/home.conf").exists(),
        "a left overlay's keys are removed"
    );
    let (stranger, _) = wg_keys(&net.client);
    let before = net.server.watched("from_exit");
    let file = wg_quick(&net, &stranger, &exit_public);
    cli_ok(
        &daemon,
        &net,
        &[
            "overlay",
            "add",
            "stranger",
            "--wireguard",
            &file.to_string_lossy(),
            "--pin",
        ],
    );
    let start = Instant::now();
    loop {
        let view = daemon.json(&net, &["overlay", "show", "stranger", "--json"]);
        if view["wireguard"]["peers"][0]["up"] == false {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(8), "{view}");
        std::thread::sleep(Duration::from_millis(100));
    }
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "stranger",
        ],
    );
    assert_eq!(net.echo(SERVER_V4, 7200, "let me in"), None);
    assert_eq!(net.server.watched("from_exit"), before);
    let text = std::fs::read_to_string(&stats).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(json["refused_wireguard"].as_u64().unwrap() >= 1, "{text}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_peer_at_an_ipv6_endpoint_carries_ipv4_flows() {
    let mut net = Topology::new();
    let (client_private, client_public) = wg_keys(&net.client);
    let peer_public = net.start_wireguard_peer(&client_public, &format!("{TUNNEL}/32"), WG_PORT);
    net.start_echo_server(7200);
    let file = wg_quick_to(
        &net,
        &client_private,
        &peer_public,
        &format!("[{OVERLAY_V6}]:{WG_PORT}"),
    );
    let daemon = joined_file(&mut net, &file);
    assert_eq!(
        peer(&daemon, &net)["endpoint"],
        format!("[{OVERLAY_V6}]:{WG_PORT}").as_str()
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "home",
        ],
    );
    net.echo_bulk(7200, 16, "through an IPv6 endpoint");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_specification_with_a_wireguard_transport_makes_a_key_pair_to_register() {
    let mut net = Topology::new();
    net.start_echo_server(7200);
    let (exit_private, exit_public) = wg_keys(&net.overlay);
    let key_file = net.dir.join("exit.key");
    std::fs::write(&key_file, &exit_private).unwrap();
    net.publish(
        "wg.xml",
        &format!(
            r#"<overlay name="osp"><entry host="{OVERLAY_V4}" port="51820"/><wireguard public-key="{exit_public}" keepalive="25"/></overlay>"#
        ),
    );
    let base = net.start_spec_server();
    let daemon = Daemon::start(&mut net, "");
    let shown = cli_ok(
        &daemon,
        &net,
        &["overlay", "add", "osp", &format!("{base}/wg.xml")],
    );
    assert!(shown.contains("give its operator the public key"), "{shown}");
    let view = daemon.json(&net, &["overlay", "show", "osp", "--json"]);
    let ours = view["wireguard"]["public_key"].as_str().unwrap().to_string();
    assert!(shown.contains(&ours), "{shown}");
    // The operator registers it.
    let key_text = key_file.to_string_lossy().into_owned();
    let peer = format!("{ours},class=0");
    net.start_exit(&["--wireguard-key", &key_text, "--peer", &peer]);
    wait_state_of(&daemon, &net, "osp", "up", Duration::from_secs(12));
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "7200", "--via", "osp"],
    );
    assert_eq!(
        net.echo(SERVER_V4, 7200, "registered").as_deref(),
        Some("registered")
    );
    // Kept across a restart: the same key, from the key store.
    net.process("oasis").terminate(Duration::from_secs(5));
    let daemon = Daemon::start(&mut net, "");
    let again = daemon.json(&net, &["overlay", "show", "osp", "--json"]);
    assert_eq!(again["wireguard"]["public_key"], ours.as_str());
    wait_state_of(&daemon, &net, "osp", "up", Duration::from_secs(5));
}

/// The protocol rekeys a session two minutes in (REKEY_AFTER_TIME, 120 s,
/// which boringtun does not let a test shorten): a paced download that
/// runs past it sees a second handshake and never stops for long.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_transfer_past_two_minutes_goes_on_through_the_rekey() {
    const RATE: u64 = 256 * 1024;
    let mut net = Topology::new();
    let (client_private, client_public) = wg_keys(&net.client);
    let peer_public = net.start_wireguard_peer(&client_public, &format!("{TUNNEL}/32"), WG_PORT);
    net.start_web_server(80);
    net.web_file("long", (RATE * 160) as usize);
    let daemon = joined(&mut net, &client_private, &peer_public, false);
    wait_state(&daemon, &net, "up", Duration::from_secs(5));
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "home"],
    );
    net.start_paced_download("long", SERVER_V4, 80, "long", RATE);
    let start = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    let mut longest = Duration::ZERO;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let got = net.paced_progress("long");
        if got > last {
            longest = longest.max(moved.elapsed());
            (last, moved) = (got, Instant::now());
        }
        assert!(
            moved.elapsed() < Duration::from_secs(10),
            "the download stopped at {got} bytes, {:?} in: {}",
            start.elapsed(),
            peer(&daemon, &net)
        );
        let handshakes = peer(&daemon, &net)["handshakes"].as_u64().unwrap();
        if handshakes >= 2 && start.elapsed() > Duration::from_secs(125) {
            println!(
                "{handshakes} handshakes, {got} bytes in {:?}; longest wait for data {longest:?}",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "no second handshake after {:?}: {}",
            start.elapsed(),
            peer(&daemon, &net)
        );
    }
}

/// A DNS server in `ns` on `listen` that knows `secret.test` as `address`
/// alone, logging every query.
fn dnsmasq(net: &mut Topology, ns: &oasis_tests::Netns, name: &str, listen: &str, address: &str) {
    let (listen, address) = (
        format!("--listen-address={listen}"),
        format!("--address=/secret.test/{address}"),
    );
    net.spawn(
        ns,
        name,
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &listen,
            &address,
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
        ],
    );
    oasis_tests::wait_for_udp_listener(ns, 53);
}

/// A name the WireGuard overlay claims is resolved by the peer network's
/// own DNS server (`DNS=`), through the tunnel: the host's resolver never
/// sees it, and the far network's answer is the one used.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn names_the_overlay_claims_are_resolved_by_its_dns_server_through_the_tunnel() {
    let mut net = Topology::new();
    let (client_private, client_public) = wg_keys(&net.client);
    let peer_public = net.start_wireguard_peer(&client_public, &format!("{TUNNEL}/32"), WG_PORT);
    net.start_echo_server(7200);
    // The peer network's resolver: it alone knows the name.
    let overlay = net.overlay.clone();
    dnsmasq(&mut net, &overlay, "far-dns", "10.88.0.2", "10.77.2.2");
    // The host's own resolver (the server, as resolv.conf says) must not
    // hear of it.
    let server = net.server.clone();
    dnsmasq(&mut net, &server, "near-dns", SERVER_V4, "10.77.2.99");
    net.server.watch("asked_here", "udp dport 53");
    let file = wg_quick_with(
        &net,
        &client_private,
        &peer_public,
        &format!("{OVERLAY_V4}:{WG_PORT}"),
        ("DNS = 10.88.0.2\n", ""),
    );
    let daemon = joined_file(&mut net, &file);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-exact", "secret.test", "--via", "home"],
    );
    // (The daemon may ask its upstreams of its own at start: counted from
    // here.)
    let asked_before = net.server.watched("asked_here");
    let answer = net.dig(true, &["secret.test", "A"]);
    assert_eq!(answer.status, "NOERROR", "{}", answer.text);
    let fake = answer.answers.first().cloned().unwrap_or_default();
    assert!(fake.starts_with("198.1"), "a fake address: {}", answer.text);
    assert!(
        net.process("far-dns")
            .log()
            .contains("query[A] secret.test from 10.88.0.1"),
        "the peer network's server was asked, from the tunnel address: {}\n{}\n{}",
        net.process("far-dns").log(),
        net.process("near-dns").log(),
        net.process("oasis").log()
    );
    assert_eq!(
        net.server.watched("asked_here"),
        asked_before,
        "the host's resolver heard of the name: {}",
        net.process("near-dns").log()
    );
    // The flow to it goes through the tunnel, to the address the far
    // network gave.
    assert_eq!(net.echo(&fake, 7200, "far").as_deref(), Some("far"));
    // A name the far server does not know: its NXDOMAIN, not the
    // upstreams' answer.
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-exact", "nothing.test", "--via", "home"],
    );
    let none = net.dig(true, &["nothing.test", "A"]);
    assert_eq!(none.status, "REFUSED", "{}", none.text);
    assert_eq!(net.server.watched("asked_here"), asked_before);
}

/// A metric rule may choose a WireGuard overlay as any other: the
/// Monitor's probes go through the tunnel and their answers come back
/// mapped as the flows' do.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_monitor_measures_a_wireguard_overlay_and_chooses_it_when_faster() {
    let mut net = Topology::new();
    // The underlay 30 ms each way; the peer straight on the overlay host.
    net.underlay_line(30);
    net.start_web_server(8080);
    let (client_private, client_public) = wg_keys(&net.client);
    let peer_public = net.start_wireguard_peer(&client_public, &format!("{TUNNEL}/32"), WG_PORT);
    let daemon = joined(&mut net, &client_private, &peer_public, false);
    wait_state(&daemon, &net, "up", Duration::from_secs(5));
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "8080", "--metric", "latency",
        ],
    );
    let start = Instant::now();
    loop {
        assert!(net.http_get(SERVER_V4, 8080).is_some());
        let log = net.process("web-8080").log();
        let last = log.lines().rev().find(|l| l.contains("GET /")).unwrap_or("");
        if last.trim_start_matches("::ffff:").starts_with(OVERLAY_V4) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "new flows never took the faster WireGuard overlay: {:#}",
            daemon.json(&net, &["monitor", "--json"])
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("new flows took the WireGuard overlay after {:?}", start.elapsed());
    let view = daemon.json(&net, &["monitor", "--json"]);
    let decision = view["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["rule"] == 1)
        .cloned()
        .unwrap_or_default();
    assert_eq!(decision["carrier"], "home", "{view:#}");
}
