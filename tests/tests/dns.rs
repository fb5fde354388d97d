//! Name rules end to end, in network namespaces: the client's queries go to
//! the daemon (only those of processes in the test's cgroup), an
//! authoritative server for `test.` runs on the server, flows to fake
//! addresses take overlays or the underlay (rewritten in the kernel).
//! Needs root; `cargo xtask test` runs these.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use oasis_tests::{CLIENT_V4, Daemon, DnsAnswer, SERVER_V4, SERVER_V6, Topology};
use serde_json::Value;

const EXIT_SPEC: &str = r#"<?xml version="1.0"?>
<overlay name="test-exit">
  <entry host="10.77.3.2" port="7400"/>
</overlay>"#;

/// The test zone: names on the server, an alias, one name with 40
/// addresses (too big for a classic UDP answer), an HTTPS record.
fn zone() -> Vec<String> {
    let mut records = vec![
        format!("--host-record=web.test,{SERVER_V4},{SERVER_V6}"),
        format!("--host-record=www.detour.test,{SERVER_V4},{SERVER_V6}"),
        format!("--host-record=other.detour.test,{SERVER_V4}"),
        format!("--host-record=late1.detour.test,{SERVER_V4}"),
        format!("--host-record=late2.detour.test,{SERVER_V4}"),
        format!("--host-record=plain.test,{SERVER_V4},{SERVER_V6}"),
        "--cname=alias.test,www.detour.test".to_string(),
        // SRV records whose targets' addresses come as additional data:
        // one target claimed, one not.
        "--srv-host=_sip._udp.test,www.detour.test,5060".to_string(),
        "--srv-host=_sip._udp.test,plain.test,5061".to_string(),
        // HTTPS (type 65) for www.detour.test: priority 1, target ".", with
        // an ipv4hint of the real address: what a fake answer must withhold.
        "--dns-rr=www.detour.test,65,000100000400040a4d0202".to_string(),
    ];
    for i in 1..=40 {
        records.push(format!("--host-record=big.test,10.77.2.{}", 100 + i));
    }
    for name in ["a", "b", "c", "d"] {
        records.push(format!("--host-record={name}.pool.test,{SERVER_V4}"));
    }
    records
}

fn start_zone(net: &mut Topology) {
    let zone = zone();
    let refs: Vec<&str> = zone.iter().map(String::as_str).collect();
    net.start_authoritative_dns(&refs);
}

fn cli_ok(daemon: &Daemon, net: &Topology, args: &[&str]) -> String {
    daemon.ok(net, args)
}

/// The exit node serving the client, joined as `exit`, with `dns_extra`
/// added to the daemon's dns section.
fn with_exit(net: &mut Topology, dns_extra: &str) -> Daemon {
    net.start_exit(&["--client", CLIENT_V4, "--client", "fd77:1::2"]);
    net.publish("exit.xml", EXIT_SPEC);
    let base = net.start_spec_server();
    let config = net.dns_config(dns_extra);
    let daemon = Daemon::start(net, &config);
    cli_ok(
        &daemon,
        net,
        &["overlay", "add", "exit", &format!("{base}/exit.xml")],
    );
    daemon
}

/// The zone, the exit joined, and `detour.test` and below claimed for it.
fn claiming_detour(net: &mut Topology) -> Daemon {
    start_zone(net);
    let daemon = with_exit(net, "");
    cli_ok(
        &daemon,
        net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "exit"],
    );
    daemon
}

fn in_pool(addr: &str) -> bool {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18,
        Ok(IpAddr::V6(v6)) => v6.segments()[..3] == [0xfd4f, 0x4153, 0x4953],
        Err(_) => false,
    }
}

fn dns_table(daemon: &Daemon, net: &Topology) -> Vec<Value> {
    daemon.json(net, &["dns", "--json"])["entries"]
        .as_array()
        .expect("entries")
        .clone()
}

fn status(daemon: &Daemon, net: &Topology) -> Value {
    daemon.json(net, &["status", "--json"])
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn claimed_names_get_fake_addresses_and_the_rest_the_truth() {
    let mut net = Topology::new();
    let daemon = claiming_detour(&mut net);

    // Claimed: a fake address per family, the same over UDP, TCP and an
    // IPv6 transport, and again on a second query.
    let a = net.dig(true, &[&format!("@{SERVER_V4}"), "www.detour.test", "A"]);
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert_eq!(a.answers.len(), 1, "{}", a.text);
    let fake = a.answers[0].clone();
    assert!(in_pool(&fake), "not a fake address: {}", a.text);
    let tcp = net.dig(true, &["+tcp", &format!("@{SERVER_V4}"), "www.detour.test", "A"]);
    assert_eq!(tcp.answers, vec![fake.clone()], "{}", tcp.text);
    let over_v6 = net.dig(true, &[&format!("@{SERVER_V6}"), "www.detour.test", "A"]);
    assert_eq!(over_v6.answers, vec![fake.clone()], "{}", over_v6.text);
    let aaaa = net.dig(true, &[&format!("@{SERVER_V4}"), "www.detour.test", "AAAA"]);
    assert_eq!(aaaa.answers.len(), 1, "{}", aaaa.text);
    assert!(in_pool(&aaaa.answers[0]), "{}", aaaa.text);
    // The server the application asked still appears to answer.
    assert!(a.text.contains(&format!("SERVER: {SERVER_V4}#53")), "{}", a.text);

    // HTTPS would carry the real address as a hint: withheld.
    let https = net.dig(true, &[&format!("@{SERVER_V4}"), "www.detour.test", "TYPE65"]);
    assert_eq!(https.status, "NOERROR", "{}", https.text);
    assert!(https.answers.is_empty(), "{}", https.text);
    let https_direct = net.dig(false, &[&format!("@{SERVER_V4}"), "www.detour.test", "TYPE65"]);
    assert_eq!(https_direct.answers.len(), 1, "{}", https_direct.text);

    // An alias of a claimed name is claimed too (a fake of its own, for
    // the same real address), and the alias chain stays hidden.
    let alias = net.dig(true, &[&format!("@{SERVER_V4}"), "alias.test", "A"]);
    assert_eq!(alias.answers.len(), 1, "{}", alias.text);
    assert!(in_pool(&alias.answers[0]), "{}", alias.text);

    // Unclaimed: the truth, NXDOMAIN included.
    let plain = net.dig(true, &[&format!("@{SERVER_V4}"), "plain.test", "A"]);
    assert_eq!(plain.answers, vec![SERVER_V4.to_string()], "{}", plain.text);
    let plain6 = net.dig(true, &[&format!("@{SERVER_V4}"), "plain.test", "AAAA"]);
    assert_eq!(plain6.answers, vec![SERVER_V6.to_string()], "{}", plain6.text);
    let missing = net.dig(true, &[&format!("@{SERVER_V4}"), "missing.test", "A"]);
    assert_eq!(missing.status, "NXDOMAIN", "{}", missing.text);

    // Truncation: 40 addresses do not fit 512 bytes; TCP gets them all.
    let big = net.dig(
        true,
        &["+noedns", "+ignore", &format!("@{SERVER_V4}"), "big.test", "A"],
    );
    assert!(big.flags.contains("tc"), "no TC flag: {}", big.text);
    let big_tcp = net.dig(true, &["+tcp", &format!("@{SERVER_V4}"), "big.test", "A"]);
    assert_eq!(big_tcp.answers.len(), 40, "{}", big_tcp.text);

    // A process outside the cgroup is not intercepted: it sees the truth.
    let outside = net.dig(false, &[&format!("@{SERVER_V4}"), "www.detour.test", "A"]);
    assert_eq!(outside.answers, vec![SERVER_V4.to_string()], "{}", outside.text);

    let table = dns_table(&daemon, &net);
    let entry = table
        .iter()
        .find(|e| e["name"] == "www.detour.test" && e["fake"] == fake.as_str())
        .unwrap_or_else(|| panic!("no table entry for www.detour.test: {table:?}"));
    assert_eq!(entry["real"], serde_json::json!([SERVER_V4]));
    assert_eq!(entry["carrier"], "exit");
    assert!(
        table
            .iter()
            .any(|e| e["name"] == "alias.test" && e["real"] == serde_json::json!([SERVER_V4])),
        "{table:?}"
    );
    let counters = &status(&daemon, &net)["dns"]["counters"];
    assert!(counters["faked"].as_u64().unwrap() >= 5, "{counters}");
    assert!(counters["truncated"].as_u64().unwrap() >= 1, "{counters}");
    let text = cli_ok(&daemon, &net, &["dns"]);
    assert!(text.contains("www.detour.test") && text.contains(&fake), "{text}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_web_request_to_a_claimed_name_goes_through_the_overlay() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let daemon = claiming_detour(&mut net);

    // curl resolves through the C library, which asks the server in the
    // client's resolv.conf: the daemon answers instead. alias.test is
    // claimed only through its CNAME (www.detour.test): its flows must
    // take that rule's overlay too.
    for (family, url) in [
        ("-4", "http://www.detour.test/hello.txt"),
        ("-6", "http://www.detour.test/hello.txt"),
        ("-4", "http://alias.test/hello.txt"),
    ] {
        let output = net.client_in_cgroup(&[
            "curl",
            "-sS",
            family,
            "--max-time",
            "5",
            "-w",
            "\n%{remote_ip}",
            url,
        ]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.starts_with("hello from the server"),
            "curl {family} {url}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let peer = text.lines().last().unwrap_or("");
        assert!(
            in_pool(peer),
            "curl {family} talked to {peer}, not a fake address"
        );
    }
    // The server saw the exit node, not the client.
    let log = net.process("web-80").log();
    assert!(log.contains("10.77.3.2"), "server log: {log}");
    assert!(
        !log.contains(CLIENT_V4),
        "the client reached the server directly: {log}"
    );
    let s = status(&daemon, &net);
    assert!(s["broker"]["sent_overlay"].as_u64().unwrap() > 0, "{s}");
    assert!(s["dns"]["fake_flows"].as_u64().unwrap() >= 1, "{s}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_underlay_flow_to_a_fake_address_is_rewritten_in_the_kernel() {
    let mut net = Topology::new();
    start_zone(&mut net);
    net.start_web_server(80);
    // A 16 MB file: thousands of packets, of which the broker must see only
    // the first. (The server's TCP sends bursts of up to 64 KB that cross
    // the veths whole: 4 MB could be fewer than a hundred of them.)
    let body = vec![b'x'; 16 << 20];
    std::fs::write(net.dir.join("www").join("big.bin"), &body).expect("big file");
    let config = net.dns_config("underlay_answers: fake");
    let daemon = Daemon::start(&mut net, &config);
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-exact", "web.test", "--via", "underlay"],
    );

    let before = status(&daemon, &net);
    let output = net.client_in_cgroup(&[
        "curl",
        "-sS",
        "-4",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{remote_ip}",
        "http://web.test/big.bin",
    ]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (size, peer) = text.split_once(' ').expect("size and peer");
    assert_eq!(size, (16 << 20).to_string());
    assert!(in_pool(peer), "curl talked to {peer}, not a fake address");
    let after = status(&daemon, &net);

    let delta = |path: &[&str]| {
        // A key that is not there (renamed, say) fails the test rather
        // than reading as a count of nothing.
        let get = |v: &Value| {
            path.iter()
                .fold(v, |v, k| &v[*k])
                .as_u64()
                .unwrap_or_else(|| panic!("status has no count at {path:?}: {v}"))
        };
        get(&after) - get(&before)
    };
    let to_broker = delta(&["tun", "diverted_packets"]);
    let rewritten_out = delta(&["classifier", "nat_egress"]);
    let rewritten_in = delta(&["classifier", "nat_ingress"]);
    assert!(to_broker <= 3, "the broker saw {to_broker} packets of the flow");
    assert!(
        rewritten_in > 100,
        "the kernel rewrote only {rewritten_in} replies"
    );
    assert!(
        rewritten_out > 10,
        "the kernel rewrote only {rewritten_out} packets out"
    );
    // The server saw the client itself: the underlay.
    let log = net.process("web-80").log();
    assert!(log.contains(CLIENT_V4), "server log: {log}");
    assert_eq!(after["dns"]["kernel_nat_flows"].as_u64(), Some(1), "{after}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_table_survives_a_restart_and_unknown_fakes_are_unreachable() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let _daemon = claiming_detour(&mut net);
    let fake = net.dig(true, &["www.detour.test", "A"]).answers[0].clone();
    assert!(in_pool(&fake));

    // Give the daemon its save interval, then restart it.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        net.process("oasis").terminate(Duration::from_secs(5)),
        "the daemon did not stop"
    );
    let daemon = Daemon::start(&mut net, "");
    let table = dns_table(&daemon, &net);
    assert!(
        table
            .iter()
            .any(|e| e["fake"] == fake.as_str() && e["name"] == "www.detour.test"),
        "the fake address was forgotten: {table:?}"
    );
    // An application that cached the answer still gets through.
    let body = net.http_get(&fake, 80);
    assert_eq!(body.as_deref(), Some("hello from the server\n"));
    // The same name keeps its address.
    let again = net.dig(true, &["www.detour.test", "A"]);
    assert_eq!(again.answers, vec![fake.clone()], "{}", again.text);

    // An address of the pool nobody was given: refused at once, not a hang.
    let started = Instant::now();
    let output = net
        .client
        .output(&["curl", "-sS", "--max-time", "5", "http://198.19.255.254/"]);
    assert!(!output.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "curl took {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        status(&daemon, &net)["dns"]["unknown_fake_packets"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

/// A SRV answer keeps its sections, and the real address of a claimed
/// target is in none of them (before, the resolver's additional data came
/// back in the answer section, the claimed name's real address with it).
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_srv_answer_keeps_its_sections_and_gives_no_claimed_address_away() {
    let mut net = Topology::new();
    let _daemon = claiming_detour(&mut net);
    let direct = net.dig(false, &["@10.77.2.2", "_sip._udp.test", "SRV"]);
    assert!(
        direct.text.contains("ADDITIONAL SECTION") && direct.text.contains(SERVER_V4),
        "the zone gives the targets' addresses as additional data: {}",
        direct.text
    );
    let answer = net.dig(true, &["_sip._udp.test", "SRV"]);
    assert_eq!(answer.status, "NOERROR", "{}", answer.text);
    assert_eq!(answer.answers.len(), 2, "{}", answer.text);
    assert!(
        answer.answers.iter().all(|a| !a.contains("10.77.")),
        "addresses in the answer section: {}",
        answer.text
    );
    let additional = answer.text.split(";; ADDITIONAL SECTION").nth(1).unwrap_or("");
    assert!(
        additional.contains("plain.test"),
        "the unclaimed target's address is additional data: {}",
        answer.text
    );
    for line in answer.text.lines().filter(|l| l.starts_with("www.detour.test")) {
        assert!(
            !line.contains(SERVER_V4) && !line.contains(SERVER_V6),
            "a claimed name's real address: {line}"
        );
    }
    // Its address, asked for, is the fake one.
    let fake = net.dig(true, &["www.detour.test", "A"]);
    assert!(in_pool(&fake.answers[0]), "{}", fake.text);
}

/// `kill -9` right after an answer, before the table's next save: the
/// address is not forgotten (the journal had it before the answer left),
/// and no other name is given it.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_address_answered_just_before_a_crash_is_never_given_to_another_name() {
    let mut net = Topology::new();
    net.start_web_server(80);
    let _daemon = claiming_detour(&mut net);
    // Saved with the table: an answer from before, then one the save missed.
    let first = net.dig(true, &["other.detour.test", "A"]).answers[0].clone();
    std::thread::sleep(Duration::from_secs(3));
    let fake = net.dig(true, &["www.detour.test", "A"]).answers[0].clone();
    net.process("oasis").kill_hard();
    assert!(in_pool(&fake) && fake != first);

    let daemon = Daemon::start(&mut net, "");
    let table = dns_table(&daemon, &net);
    assert!(
        table
            .iter()
            .any(|e| e["fake"] == fake.as_str() && e["name"] == "www.detour.test"),
        "the answer given just before the crash was forgotten: {table:?}"
    );
    // New names get new addresses; the old ones keep theirs.
    for name in ["late1.detour.test", "late2.detour.test"] {
        let answer = net.dig(true, &[name, "A"]);
        assert!(
            answer.answers.len() == 1 && in_pool(&answer.answers[0]),
            "{name}: {}",
            answer.text
        );
        assert!(
            ![&fake, &first].contains(&&answer.answers[0]),
            "{name} got an address in use: {}",
            answer.text
        );
    }
    for entry in dns_table(&daemon, &net) {
        let name = entry["name"].as_str().unwrap_or("");
        if entry["fake"] == fake.as_str() {
            assert_eq!(name, "www.detour.test", "{fake} was given to {name}");
        }
        if entry["fake"] == first.as_str() {
            assert_eq!(name, "other.detour.test", "{first} was given to {name}");
        }
    }
    assert_eq!(
        net.dig(true, &["www.detour.test", "A"]).answers,
        vec![fake.clone()]
    );
    // An application that cached the answer still gets through.
    assert_eq!(
        net.http_get(&fake, 80).as_deref(),
        Some("hello from the server\n")
    );
}

/// A daemon whose name rules send `pool.test` names to the underlay with
/// fake answers, from a pool of three addresses.
fn small_pool(net: &mut Topology) -> Daemon {
    start_zone(net);
    let config = net.dns_config("underlay_answers: fake\nfake_v4: 198.18.0.0/30");
    let daemon = Daemon::start(net, &config);
    cli_ok(
        &daemon,
        net,
        &["rule", "add", "--name-suffix", "pool.test", "--via", "underlay"],
    );
    daemon
}

fn fake_of(net: &Topology, name: &str) -> String {
    let answer = net.dig(true, &[name, "A"]);
    assert_eq!(answer.answers.len(), 1, "{}", answer.text);
    assert!(in_pool(&answer.answers[0]), "{}", answer.text);
    answer.answers[0].clone()
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn an_exhausted_pool_reuses_idle_addresses_and_never_those_in_use() {
    let mut net = Topology::new();
    let daemon = small_pool(&mut net);
    let a = fake_of(&net, "a.pool.test");
    let b = fake_of(&net, "b.pool.test");
    let c = fake_of(&net, "c.pool.test");
    assert!(a != b && b != c && a != c);
    // A fourth name takes the least recently used address, a's.
    let d = fake_of(&net, "d.pool.test");
    assert_eq!(d, a);
    let table = dns_table(&daemon, &net);
    assert!(!table.iter().any(|e| e["name"] == "a.pool.test"), "{table:?}");

    // Live connections to all three addresses: none may be taken now.
    net.start_echo_server(7000);
    let script = format!(
        "import socket,time\n\
         held=[socket.create_connection((a,7000),timeout=3) for a in ('{b}','{c}','{d}')]\n\
         print('connected',flush=True)\n\
         time.sleep(30)\n"
    );
    let client = net.client.clone();
    net.spawn(&client, "holder", &["python3", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !net.process("holder").log().contains("connected") {
        assert!(
            Instant::now() < deadline,
            "holder: {}",
            net.process("holder").log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = net.dig(true, &["a.pool.test", "A"]);
    assert_eq!(refused.status, "SERVFAIL", "{}", refused.text);
    let s = status(&daemon, &net);
    assert!(s["dns"]["counters"]["exhausted"].as_u64().unwrap() >= 1, "{s}");
    // The held names still answer as before.
    assert_eq!(fake_of(&net, "b.pool.test"), b);
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_header_rules_flow_to_the_real_address_of_a_claimed_name_comes_back_as_it_is() {
    // A claimed name's real address is also reached by its own address,
    // over a header rule: its answers come back from that address, on the
    // daemon that gave the fake address and on one started afresh with the
    // table it saved.
    let mut net = Topology::new();
    net.start_web_server(8080);
    let daemon = claiming_detour(&mut net);
    let answer = net.dig(true, &["www.detour.test", "A"]);
    assert!(
        answer.answers.first().is_some_and(|a| in_pool(a)),
        "{}",
        answer.text
    );
    cli_ok(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "8080", "--via", "exit",
        ],
    );
    for attempt in 0..3 {
        let got = net.http_get(SERVER_V4, 8080);
        assert!(
            got.as_deref()
                .is_some_and(|t| t.contains("hello from the server")),
            "attempt {attempt}: {got:?}; {}",
            status(&daemon, &net)["broker"]
        );
    }
    // The table is saved within 2 s of a change.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        net.process("oasis").terminate(Duration::from_secs(5)),
        "the daemon did not stop"
    );
    let daemon = Daemon::start(&mut net, "");
    let got = net.http_get(SERVER_V4, 8080);
    assert!(
        got.as_deref()
            .is_some_and(|t| t.contains("hello from the server")),
        "after a restart: {got:?}; {}",
        status(&daemon, &net)["broker"]
    );
    let log = net.process("web-8080").log();
    assert!(
        !log.contains(CLIENT_V4),
        "the request went around the exit: {log}"
    );
}

/// Asks `name` (type A) `times` times, each from a new port (so both DNS
/// threads get to answer it); returns the answers.
fn ask_often(net: &Topology, name: &str, times: usize) -> Vec<DnsAnswer> {
    (0..times).map(|_| net.dig(true, &[name, "A"])).collect()
}

fn reused(daemon: &Daemon, net: &Topology) -> u64 {
    status(daemon, net)["dns"]["counters"]["reused"]
        .as_u64()
        .expect("dns.counters.reused in status")
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_question_asked_again_is_answered_from_what_was_kept_while_it_holds() {
    let mut net = Topology::new();
    let daemon = small_pool(&mut net);
    // Kept: the same fake address every time, most of them given again
    // without a full answer (the first on each DNS thread is a full one).
    let answers = ask_often(&net, "a.pool.test", 6);
    let a = answers[0].answers.clone();
    assert!(answers.iter().all(|x| x.answers == a), "{answers:?}");
    assert!(reused(&daemon, &net) >= 4, "{}", status(&daemon, &net));
    // The upstream's records count down in a kept answer as in a full one.
    let first = net.dig(true, &["+noall", "+answer", "plain.test", "A"]).text;
    std::thread::sleep(Duration::from_millis(2100));
    let ttl = |text: &str| -> u32 {
        text.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    };
    for again in (0..4).map(|_| net.dig(true, &["+noall", "+answer", "plain.test", "A"]).text) {
        assert!(
            ttl(&again) + 2 <= ttl(&first) && ttl(&again) > 0,
            "{first} then {again}"
        );
    }

    // The pool gives a's address to another name: a kept answer must not
    // hand it out for a any more. (a may get it back, d's in turn, when d
    // is the least recently used: what counts is what the table says.)
    for name in ["b.pool.test", "c.pool.test"] {
        fake_of(&net, name);
    }
    let d = fake_of(&net, "d.pool.test");
    assert_eq!(vec![d.clone()], a, "d takes a's address, the least recently used");
    let again = ask_often(&net, "a.pool.test", 4);
    let table = dns_table(&daemon, &net);
    let now_a = table
        .iter()
        .find(|e| e["name"] == "a.pool.test")
        .and_then(|e| e["fake"].as_str())
        .unwrap_or_else(|| panic!("a is in the table again: {table:?}"));
    for answer in &again {
        assert_eq!(
            answer.answers,
            vec![now_a.to_string()],
            "{}\n{table:?}",
            answer.text
        );
    }

    // Rules change: no kept answer outlives them.
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    let id = rules["rules"][0]["id"]
        .as_u64()
        .or_else(|| rules[0]["id"].as_u64())
        .expect("rule id");
    daemon.ok(&net, &["rule", "del", &id.to_string()]);
    for again in ask_often(&net, "a.pool.test", 4) {
        assert_eq!(again.answers, vec![SERVER_V4.to_string()], "{}", again.text);
    }
}

/// `oasis rule import --kind KIND --via underlay` of `lines`, from a file.
fn import(net: &Topology, daemon: &Daemon, kind: &str, lines: &str) -> std::process::Output {
    let file = net.dir.join(format!("{kind}-rules.txt"));
    std::fs::write(&file, lines).expect("rules file");
    daemon.cli(
        net,
        &[
            "rule",
            "import",
            "--kind",
            kind,
            "--via",
            "underlay",
            &file.to_string_lossy(),
        ],
    )
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn ten_thousand_name_rules_load_in_one_step_and_answer() {
    let mut net = Topology::new();
    let mut zone = zone();
    zone.push(format!("--host-record=www.site9999.test,{SERVER_V4}"));
    zone.push(format!("--host-record=cdn.regex42.test,{SERVER_V4}"));
    let refs: Vec<&str> = zone.iter().map(String::as_str).collect();
    net.start_authoritative_dns(&refs);
    let config = net.dns_config("underlay_answers: fake");
    let daemon = Daemon::start(&mut net, &config);

    let suffixes: String = (0..10_000).map(|i| format!("site{i}.test\n")).collect();
    let output = import(
        &net,
        &daemon,
        "suffix",
        &format!("# ten thousand names\n{suffixes}"),
    );
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(out.contains("imported 10000 rules"), "{out}");
    let regexes: String = (0..100).map(|i| format!("^cdn\\.regex{i}\\.test$\n")).collect();
    let output = import(&net, &daemon, "regex", &regexes);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    assert_eq!(rules.as_array().unwrap().len(), 10_100);

    assert!(in_pool(&fake_of(&net, "www.site9999.test")));
    assert!(in_pool(&fake_of(&net, "cdn.regex42.test")));
    let plain = net.dig(true, &["plain.test", "A"]);
    assert_eq!(plain.answers, vec![SERVER_V4.to_string()], "{}", plain.text);

    // A bad line refuses the whole import and changes nothing.
    let output = import(&net, &daemon, "suffix", "good.test\nnot a name!\n");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 2"));
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    assert_eq!(rules.as_array().unwrap().len(), 10_100);
}

/// Sends raw datagrams to the DNS server the client's resolver names (the
/// daemon takes them) and prints, per datagram, the reply's response code
/// or "none".
const HOSTILE: &str = r#"
import socket, struct, random, sys
random.seed(7)
def header(id, flags, qd, an=0, ns=0, ar=0):
    return struct.pack('>HHHHHH', id, flags, qd, an, ns, ar)
q = b'\x03www\x06detour\x04test\x00\x00\x01\x00\x01'
cases = [
    b'',
    b'\x01\x02\x03',
    header(1, 0x0100, 1),                       # a question promised, none there
    header(2, 0x0100, 1) + b'\xc0\x0c\x00\x01\x00\x01',   # a name pointing at itself
    header(3, 0x0100, 2) + q + q,               # two questions
    header(4, 0x2100, 1) + q,                   # opcode NOTIFY
    header(5, 0x2900, 1) + q,                   # opcode UPDATE
    header(6, 0x8100, 1) + q,                   # a response, not a query
    header(7, 0x0100, 1) + b'\x40' + b'a' * 64 + b'\x00\x00\x01\x00\x01',   # label too long
    header(8, 0x0100, 1) + q[:-3],              # cut short
] + [bytes(random.getrandbits(8) for _ in range(random.randint(1, 600))) for _ in range(200)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.1)
for case in cases:
    s.sendto(case, (sys.argv[1], 53))
    try:
        data, _ = s.recvfrom(4096)
        print(data[3] & 0x0f if len(data) >= 4 else 'short')
    except socket.timeout:
        print('none')
# TCP: a length prefix promising more than comes, then a close.
t = socket.create_connection((sys.argv[1], 53), timeout=2)
t.sendall(b'\xff\xff' + b'\x00' * 10)
t.close()
print('done')
"#;

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn malformed_and_hostile_queries_get_errors_or_nothing() {
    let mut net = Topology::new();
    let _daemon = claiming_detour(&mut net);
    let output = net.client_in_cgroup(&["python3", "-c", HOSTILE, SERVER_V4]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && text.ends_with("done\n"),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let codes: Vec<&str> = text.lines().collect();
    // FORMERR (1), SERVFAIL (2), NOTIMP (4), REFUSED (5) or silence: never an answer.
    for (i, code) in codes.iter().take(10).enumerate() {
        assert!(
            matches!(*code, "1" | "2" | "4" | "5" | "none"),
            "hostile case {i} got response code {code}: {text}"
        );
    }
    assert!(net.process("oasis").is_running(), "the daemon died");
    let fine = net.dig(true, &["www.detour.test", "A"]);
    assert!(in_pool(&fine.answers[0]), "{}", fine.text);
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_dead_upstream_gives_servfail_in_bounded_time_and_a_dead_daemon_gives_dns_back() {
    let mut net = Topology::new();
    start_zone(&mut net);
    // Nobody answers at .99: every query times out upstream.
    let config = format!(
        "dns:\n  cgroup: {}\n  state_file: {}\n  upstreams: [\"10.77.2.99\"]\n  upstream_timeout_ms: 1000\n",
        net.cgroup.display(),
        net.dir.join("fake.json").display()
    );
    let _daemon = Daemon::start(&mut net, &config);
    let started = Instant::now();
    let answer = net.dig(true, &["+time=5", "plain.test", "A"]);
    assert_eq!(answer.status, "SERVFAIL", "{}", answer.text);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // kill -9: the kernel drops the redirect with the daemon's links, and
    // the client's queries reach its own server again.
    net.process("oasis").kill_hard();
    let answer = net.dig(true, &["plain.test", "A"]);
    assert_eq!(answer.answers, vec![SERVER_V4.to_string()], "{}", answer.text);
}

/// A DNS service that stops answering (its threads hang: an injected
/// fault) gives the host its own servers back within the heartbeat's
/// timeout, while the packet path goes on.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_hung_dns_service_lets_queries_reach_the_hosts_servers() {
    let mut net = Topology::new();
    let daemon = claiming_detour(&mut net);
    let fake = net.dig(true, &["www.detour.test", "A"]);
    assert!(in_pool(&fake.answers[0]), "{}", fake.text);
    let claimed = daemon.json(
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "9999", "--via", "underlay", "--json",
        ],
    )["id"]
        .clone();
    // Packets of the rule's flows, counted in the kernel: failing open
    // passes packets before any rule sees them.
    let counted = || {
        let rules = daemon.json(&net, &["rule", "list", "--json"]);
        rules
            .as_array()
            .and_then(|all| all.iter().find(|r| r["id"] == claimed))
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("rule {claimed} with a packet count: {rules}"))
    };
    let before = counted();

    daemon.ok(&net, &["fault", "dns-hang"]);
    let hung = Instant::now();
    // Queries meet a hung daemon and time out; within the heartbeat's
    // timeout (3 s), they go to the server the client names, which
    // answers the truth.
    let deadline = hung + Duration::from_secs(10);
    loop {
        let answer = net.dig(true, &["+time=1", "www.detour.test", "A"]);
        if answer.answers == [SERVER_V4] {
            break;
        }
        assert!(Instant::now() < deadline, "DNS never came back: {}", answer.text);
    }
    println!(
        "DNS answered by the host's server {:?} after the hang",
        hung.elapsed()
    );
    // The packet path did not fail open: a claimed flow is still its
    // rule's.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for i in range(5): s.sendto(b'x',('{SERVER_V4}',9999))\n"
    );
    net.client.run(&["python3", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted() < before + 5 {
        assert!(
            Instant::now() < deadline,
            "the claimed flow's packets passed as if no rule claimed them"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = net.process("oasis").log();
    assert!(log.contains("the DNS service makes no progress"), "{log}");
}

/// A server on port 2222 that greets, stays silent for `quiet_secs`, then
/// speaks first again and echoes what follows: an SSH session left idle.
fn start_quiet_server(net: &mut Topology, quiet_secs: u64) {
    let script = format!(
        "import socket,threading,time\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_STREAM)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
         s.bind(('::',2222));s.listen(16)\n\
         def h(c):\n  \
           with c:\n    \
             c.sendall(b'hello\\n');time.sleep({quiet_secs});c.sendall(b'after the silence\\n')\n    \
             while (d:=c.recv(65536)): c.sendall(d)\n\
         while True:\n  \
           c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n"
    );
    let server = net.server.clone();
    net.spawn(&server, "quiet-2222", &["python3", "-c", &script]);
    oasis_tests::wait_for_listener(&net.server, 2222);
}

/// Connects to `name`:2222 from the cgroup (the daemon answers the name),
/// waits for the server to speak after its silence, and echoes a line.
/// What the client saw, and where it connected.
fn quiet_session(net: &Topology, name: &str, quiet_secs: u64) -> String {
    let script = format!(
        "import socket\n\
         c=socket.create_connection(('{name}',2222),timeout=10)\n\
         f=c.makefile('rb')\n\
         print(f.readline().decode().strip(),c.getpeername()[0],flush=True)\n\
         c.settimeout({quiet_secs}+60)\n\
         print(f.readline().decode().strip(),flush=True)\n\
         c.settimeout(10);c.sendall(b'still here\\n')\n\
         print(f.readline().decode().strip(),flush=True)\n"
    );
    let output = net.client_in_cgroup(&["python3", "-c", &script]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A connection through a name rule may be quiet much longer than
/// `flow_idle_timeout_secs` (120 s): when the server speaks first after
/// ten minutes, it still reaches the application, through the in-kernel
/// NAT of an underlay flow and through an overlay (the broker's mapping
/// and the exit's NAT) alike. `OASIS_QUIET_SECS` shortens the silence for
/// a quick run by hand.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_quiet_session_through_a_name_rule_hears_the_server_after_ten_minutes() {
    let quiet_secs: u64 = std::env::var("OASIS_QUIET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mut net = Topology::new();
    start_zone(&mut net);
    start_quiet_server(&mut net, quiet_secs);
    let daemon = with_exit(&mut net, "underlay_answers: fake");
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "exit"],
    );
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-exact", "web.test", "--via", "underlay"],
    );

    let sessions = std::thread::scope(|scope| {
        let net = &net;
        let overlay = scope.spawn(move || quiet_session(net, "www.detour.test", quiet_secs));
        let underlay = scope.spawn(move || quiet_session(net, "web.test", quiet_secs));
        [
            ("overlay", overlay.join().expect("overlay session")),
            ("underlay", underlay.join().expect("underlay session")),
        ]
    });
    for (path, seen) in sessions {
        let lines: Vec<&str> = seen.lines().collect();
        assert!(
            lines.len() >= 3 && lines[1] == "after the silence" && lines[2] == "still here",
            "{path}: the session did not survive {quiet_secs} s of silence: {seen}"
        );
        let peer = lines[0].split_whitespace().nth(1).unwrap_or("");
        assert!(in_pool(peer), "{path}: connected to {peer}, not a fake address");
    }
    let s = status(&daemon, &net);
    assert_eq!(s["dns"]["kernel_nat_flows"].as_u64(), Some(1), "{s}");
}

/// The DO bit is echoed (RFC 3225); a CHAOS query is not taken for a name
/// (REFUSED); reverse lookups of fake addresses are answered from the
/// table, never upstream; a dual-stack socket asking a v4-mapped server
/// sees the answer come from that server.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn small_things_of_dns_are_right() {
    let mut net = Topology::new();
    let daemon = claiming_detour(&mut net);

    let signed = net.dig(true, &["+dnssec", "web.test", "A"]);
    assert!(
        signed.text.contains("flags: do;"),
        "the DO bit was not echoed: {}",
        signed.text
    );
    let chaos = net.dig(true, &["CH", "TXT", "version.bind"]);
    assert_eq!(chaos.status, "REFUSED", "{}", chaos.text);

    let fake = net.dig(true, &["www.detour.test", "A"]).answers[0].clone();
    let passed = |s: Value| {
        s["dns"]["counters"]["passed"]
            .as_u64()
            .unwrap_or_else(|| panic!("dns.counters.passed: {s}"))
    };
    let before = passed(status(&daemon, &net));
    let reverse = net.dig(true, &["-x", &fake]);
    assert_eq!(
        reverse.answers,
        vec!["www.detour.test".to_string()],
        "{}",
        reverse.text
    );
    let unknown = net.dig(true, &["-x", "198.19.255.254"]);
    assert_eq!(unknown.status, "NXDOMAIN", "{}", unknown.text);
    let after = passed(status(&daemon, &net));
    assert_eq!(before, after, "a reverse lookup of the fake pool went upstream");

    // A dual-stack UDP socket, unconnected, asking the server by its
    // v4-mapped address.
    let script = format!(
        "import socket\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
         s.settimeout(3)\n\
         q=bytes.fromhex('abcd01000001000000000000')+b''.join(bytes([len(p)])+p.encode() for p in 'web.test'.split('.'))+bytes.fromhex('0000010001')\n\
         s.sendto(q,('::ffff:{SERVER_V4}',53))\n\
         d,a=s.recvfrom(4096)\n\
         print(a[0],a[1],d[:2].hex())\n"
    );
    let output = net.client_in_cgroup(&["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        text.trim(),
        format!("::ffff:{SERVER_V4} 53 abcd"),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A second DNS server on the server's host, at 10.77.2.3, that knows
/// `split.test` differently from the zone (split-horizon DNS) and
/// `www.detour.test` too.
fn start_second_server(net: &mut Topology) {
    net.server
        .run(&["ip", "addr", "add", "10.77.2.3/24", "dev", "s0"]);
    let server = net.server.clone();
    net.spawn(
        &server,
        "dnsmasq-second",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            "--log-facility=-",
            "--log-queries",
            "--listen-address=10.77.2.3",
            "--local=/test/",
            "--local-ttl=300",
            "--host-record=split.test,10.77.2.77",
            "--host-record=www.detour.test,10.77.2.78",
            "--txt-record=who.test,second",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
}

/// `dig @server`: a query the application sent to a server of its own
/// choosing is answered by that server, exactly as without Oasis (its
/// records, its TXT, its version.bind), while a claimed name still gets
/// its fake address, the real one asked of that server.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_query_to_a_server_of_the_applications_choosing_is_answered_by_that_server() {
    let mut net = Topology::new();
    start_zone(&mut net);
    net.start_web_server(80);
    start_second_server(&mut net);
    let daemon = with_exit(&mut net, "");
    cli_ok(
        &daemon,
        &net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "exit"],
    );

    // Unclaimed names: the server asked answers, not the daemon's upstream.
    let split = net.dig(true, &["@10.77.2.3", "split.test", "A"]);
    assert_eq!(split.answers, vec!["10.77.2.77".to_string()], "{}", split.text);
    assert!(split.text.contains("SERVER: 10.77.2.3#53"), "{}", split.text);
    let who = net.dig(true, &["@10.77.2.3", "who.test", "TXT"]);
    assert_eq!(who.answers, vec!["\"second\"".to_string()], "{}", who.text);
    let chaos = net.dig(true, &["@10.77.2.3", "CH", "TXT", "version.bind"]);
    assert_eq!(chaos.status, "NOERROR", "the server's own answer: {}", chaos.text);
    // The host's own server still answers through the daemon.
    let plain = net.dig(true, &["split.test", "A"]);
    assert_eq!(
        plain.status, "NXDOMAIN",
        "the zone has no split.test: {}",
        plain.text
    );

    // A claimed name: a fake address, standing for what that server said.
    let fake = net.dig(true, &["@10.77.2.3", "www.detour.test", "A"]);
    assert!(in_pool(&fake.answers[0]), "{}", fake.text);
    let table = dns_table(&daemon, &net);
    let entry = table
        .iter()
        .find(|e| e["fake"] == fake.answers[0].as_str())
        .expect("in the table");
    assert_eq!(entry["real"], serde_json::json!(["10.77.2.78"]), "{entry}");
    // Over TCP too.
    let tcp = net.dig(true, &["+tcp", "@10.77.2.3", "split.test", "A"]);
    assert_eq!(tcp.answers, vec!["10.77.2.77".to_string()], "{}", tcp.text);
    assert!(
        status(&daemon, &net)["dns"]["counters"]["explicit"]
            .as_u64()
            .unwrap_or(0)
            >= 5
    );
}

/// A caching stub on the host (dnsmasq on 127.0.0.1, named in resolv.conf,
/// inside the redirected cgroup), with the default configuration: the
/// stub gets the applications' queries untouched, its own queries to its
/// server are the ones the daemon takes, so names resolve and claimed ones
/// are faked; a stub pointed back at the daemon makes a loop, which is
/// broken at once; and the daemon follows resolv.conf when it changes.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_local_caching_stub_works_and_a_loop_through_it_is_broken() {
    let mut net = Topology::new();
    start_zone(&mut net);
    oasis_tests::dns::write_resolv_conf(&net.client, "127.0.0.1");
    let stub = |net: &mut Topology, name: &str, upstream: &str| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec dnsmasq --keep-in-foreground --no-resolv --no-hosts \
             --bind-interfaces --listen-address=127.0.0.1 --user=root --pid-file --log-facility=- \
             --log-queries --server={upstream}",
            net.cgroup.display()
        );
        let client = net.client.clone();
        net.spawn(&client, name, &["sh", "-c", &script]);
        std::thread::sleep(Duration::from_millis(300));
    };
    stub(&mut net, "stub", SERVER_V4);
    // The default DNS section: upstreams from resolv.conf (the stub).
    let config = format!(
        "dns:\n  cgroup: {}\n  state_file: {}\n  underlay_answers: fake\n",
        net.cgroup.display(),
        net.dir.join("fake-addresses.json").display()
    );
    let daemon = Daemon::start(&mut net, &config);
    with_rule(&daemon, &net);

    let started = Instant::now();
    for name in ["web.test", "plain.test", "other.detour.test"] {
        let answer = net.dig(true, &[name, "A"]);
        assert_eq!(answer.status, "NOERROR", "{name}: {}", answer.text);
        assert!(
            answer.text.contains("SERVER: 127.0.0.1#53"),
            "asked the stub: {}",
            answer.text
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let claimed = net.dig(true, &["www.detour.test", "A"]);
    assert!(
        in_pool(&claimed.answers[0]),
        "a claimed name through the stub: {}",
        claimed.text
    );
    let s = status(&daemon, &net);
    assert_eq!(s["dns"]["counters"]["loops"].as_u64(), Some(0), "{s}");
    assert!(
        s["dns"]["counters"]["explicit"].as_u64().unwrap_or(0) >= 1,
        "the stub's queries reached the daemon: {s}"
    );
    let forwarded = net.process("stub").log().matches("forwarded").count();
    assert!(
        forwarded <= 8,
        "the stub forwarded {forwarded} queries for 4 asked"
    );

    // resolv.conf changes: the daemon resolves with the new server.
    oasis_tests::dns::write_resolv_conf(&net.client, SERVER_V4);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let upstreams = status(&daemon, &net)["dns"]["upstreams"].to_string();
        if upstreams.contains(SERVER_V4) {
            break;
        }
        assert!(Instant::now() < deadline, "resolv.conf not followed: {upstreams}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A stub that forwards to the daemon itself, and the daemon's
    // upstream is that stub: every query would go round. It is answered
    // SERVFAIL after one turn, and DNS for the rest keeps working.
    net.process("stub").kill_hard();
    oasis_tests::dns::write_resolv_conf(&net.client, "127.0.0.1");
    stub(&mut net, "stub-loop", "127.0.0.1#7453");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status(&daemon, &net)["dns"]["upstreams"]
        .to_string()
        .contains("127.0.0.1")
    {
        assert!(
            Instant::now() < deadline,
            "resolv.conf not followed back to the stub"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    let looped = net.dig(true, &["+tries=1", "+time=5", "nowhere.test", "A"]);
    assert_eq!(looped.status, "SERVFAIL", "{}", looped.text);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        status(&daemon, &net)["dns"]["counters"]["loops"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );
    let forwarded = net.process("stub-loop").log().matches("forwarded").count();
    assert!(forwarded <= 6, "the loop went round {forwarded} times");
}

fn with_rule(daemon: &Daemon, net: &Topology) {
    cli_ok(
        daemon,
        net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "underlay"],
    );
}

/// A download of a claimed name through the exit (its flows rewritten by
/// the daemon both ways) goes on after the daemon is killed with SIGKILL
/// and started again at once, as a supervisor would: the fake-address
/// table and the exit's NAT survived, and the restarted daemon takes the
/// flow up again, whichever end speaks first. Started right after the
/// kill, the daemon waits for the old TUN to go rather than failing.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_live_overlay_flow_of_a_claimed_name_survives_a_daemon_restart() {
    let mut net = Topology::new();
    let _daemon = claiming_detour(&mut net);
    net.start_web_server(80);
    net.web_file("huge.bin", 200 << 20);
    let fake = net.dig(true, &["www.detour.test", "A"]).answers[0].clone();
    assert!(in_pool(&fake), "{fake}");
    net.start_paced_download("paced", &fake, 80, "huge.bin", 4_000_000);
    net.paced_download_goes_on("paced", 8 << 20, "before the restart");
    // Let the table be saved (it is, within 2 s of a change) so the
    // restart does not lean on the journal alone.
    std::thread::sleep(Duration::from_millis(2500));
    net.process("oasis").kill_hard();
    let _daemon = Daemon::start(&mut net, "");
    net.paced_download_goes_on("paced", 8 << 20, "after the daemon's restart");
    // A supervisor restarting it at once, again and again: each start
    // succeeds (waiting for the last TUN to go if it must).
    for _ in 0..3 {
        net.process("oasis").kill_hard();
        let _daemon = Daemon::start(&mut net, "");
    }
    net.paced_download_goes_on("paced", 8 << 20, "after quick restarts");
    // The last daemon holds the flow by its fake address: taken up from
    // the server's reply (adopted) or started again from the client's
    // next segment, whichever came first, which the test cannot choose
    // (a paced reader sends window updates while the daemon is down).
    let status = status(&_daemon, &net);
    assert!(status["dns"]["fake_flows"].as_u64() >= Some(1), "{status}");
    println!(
        "after the last restart: {} adopted, {} started",
        status["broker"]["flows_adopted"], status["broker"]["flows_started"]
    );
}

/// The same across a daemon restart for a claimed name's flow on the
/// underlay, rewritten in the kernel: it goes on, or the application
/// hears a reset at once; it never hangs.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_live_underlay_flow_of_a_claimed_name_goes_on_or_ends_across_a_daemon_restart() {
    let mut net = Topology::new();
    start_zone(&mut net);
    net.start_web_server(80);
    net.web_file("huge.bin", 200 << 20);
    let config = net.dns_config("underlay_answers: fake");
    let daemon = Daemon::start(&mut net, &config);
    daemon.ok(
        &net,
        &["rule", "add", "--name-exact", "web.test", "--via", "underlay"],
    );
    let fake = net.dig(true, &["web.test", "A"]).answers[0].clone();
    assert!(in_pool(&fake), "{fake}");
    net.start_paced_download("paced", &fake, 80, "huge.bin", 4_000_000);
    net.paced_download_goes_on("paced", 8 << 20, "before the restart");
    std::thread::sleep(Duration::from_millis(2500));
    let from = net.paced_progress("paced");
    net.process("oasis").kill_hard();
    let _daemon = Daemon::start(&mut net, "");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = net.process("paced").log();
        let got: u64 = log
            .lines()
            .filter_map(|l| l.strip_prefix("got ")?.parse().ok())
            .next_back()
            .unwrap_or(0);
        if log.contains("Error") {
            // Ended: the application heard of it at once.
            assert!(
                log.contains("ConnectionResetError") || log.contains("ConnectionAbortedError"),
                "{log}"
            );
            break;
        }
        if got >= from + (8 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "the flow hangs: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A caching stub on the host that runs outside the redirected cgroup
/// (dnsmasq on 127.0.0.53, named in resolv.conf, as systemd-resolved's stub
/// is), with names of its own: processes in the cgroup still never get a
/// claimed name's real address, the stub's own names still resolve, and
/// processes outside the cgroup get the stub's answers as they are.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_stub_outside_the_cgroup_hands_out_no_claimed_real_address() {
    let mut net = Topology::new();
    start_zone(&mut net);
    oasis_tests::dns::write_resolv_conf(&net.client, "127.0.0.53");
    // Outside the cgroup: not started through client_in_cgroup.
    let client = net.client.clone();
    net.spawn(
        &client,
        "stub",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.53",
            "--user=root",
            "--pid-file",
            "--log-facility=-",
            "--log-queries",
            &format!("--server={SERVER_V4}"),
            "--address=/intranet.lan/10.9.9.9",
        ],
    );
    oasis_tests::wait_for_udp_listener(&net.client, 53);
    let daemon = claiming_detour(&mut net);
    // The stub learns the real address first, from outside the cgroup.
    let outside = net.dig(false, &["www.detour.test", "A"]);
    assert_eq!(outside.answers, [SERVER_V4], "{}", outside.text);
    // Inside: the claimed name is faked, through the stub the
    // application asked.
    let claimed = net.dig(true, &["www.detour.test", "A"]);
    assert!(in_pool(&claimed.answers[0]), "{}", claimed.text);
    assert!(claimed.text.contains("SERVER: 127.0.0.53#53"), "{}", claimed.text);
    // The stub's own names, and the rest, as the stub says.
    let own = net.dig(true, &["intranet.lan", "A"]);
    assert_eq!(own.answers, ["10.9.9.9"], "{}", own.text);
    let plain = net.dig(true, &["plain.test", "A"]);
    assert_eq!(plain.answers, [SERVER_V4], "{}", plain.text);
    // A flow to the claimed name goes through the overlay: the server
    // sees the exit, never the client.
    net.start_web_server(80);
    let body = net.client_in_cgroup(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://www.detour.test/hello.txt",
    ]);
    assert_eq!(String::from_utf8_lossy(&body.stdout), "hello from the server\n");
    let log = net.process("web-80").log();
    assert!(
        log.contains(oasis_tests::OVERLAY_V4) || log.contains(oasis_tests::OVERLAY_V6),
        "{log}"
    );
    assert!(!log.contains(CLIENT_V4) && !log.contains("fd77:1::2"), "{log}");
    let _ = daemon;
}

/// A resolver daemon that answers applications without port 53
/// (systemd-resolved through nsswitch's `resolve`) and runs outside the
/// redirected cgroup: name rules could leak there, so they are refused,
/// at `rule add` and at start, saying what to change.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn name_rules_are_refused_where_a_resolver_outside_the_cgroup_answers_without_port_53() {
    let mut net = Topology::new();
    start_zone(&mut net);
    // Written before the daemon starts, so `ip netns exec` shows it the
    // file (edited in place later, it sees the edits).
    oasis_tests::dns::write_nsswitch(&net.client, "files resolve [!UNAVAIL=return] dns");
    let daemon = with_exit(&mut net, "");
    // A process the host would take for systemd-resolved, outside the
    // cgroup, in the client's namespace.
    let resolved = net.dir.join("systemd-resolve");
    std::fs::copy("/bin/sleep", &resolved).unwrap();
    let client = net.client.clone();
    net.spawn(&client, "resolved", &[resolved.to_str().unwrap(), "600"]);
    std::thread::sleep(Duration::from_millis(200));
    let refused = daemon.cli(
        &net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "exit"],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("systemd-resolve") && stderr.contains("take `resolve` off the hosts line"),
        "{stderr}"
    );
    // Header rules are not affected.
    daemon.ok(
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "9999", "--via", "underlay",
        ],
    );
    // Without `resolve` on the hosts line, its stub is what applications
    // ask, on port 53: covered.
    oasis_tests::dns::write_nsswitch(&net.client, "files dns");
    daemon.ok(
        &net,
        &["rule", "add", "--name-suffix", "detour.test", "--via", "exit"],
    );
    // A daemon started with name rules in such a setup refuses to start.
    oasis_tests::dns::write_nsswitch(&net.client, "files resolve dns");
    net.process("oasis").kill_hard();
    let config = net.dir.join("config.yaml");
    let output = net
        .client
        .command(&oasis_tests::oasis_bin().to_string_lossy())
        .args(["--config", &config.to_string_lossy(), "run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("name rules cannot be kept on this host"),
        "{stderr}"
    );
}
