//! `cargo xtask demo`: Oasis at work in throw-away network namespaces.

use std::time::Duration;

use anyhow::bail;
use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, SERVER_V4, Topology};

pub fn run() -> anyhow::Result<()> {
    crate::setup::ensure()?;
    if !crate::is_root() {
        bail!("the demo creates network namespaces and needs root: `sudo -E cargo xtask demo`");
    }
    let oasis = crate::build_oasis(true)?;
    // SAFETY: xtask is single-threaded here; the harness finds the binary through this variable.
    unsafe { std::env::set_var("OASIS_BIN", &oasis) };

    println!("\n== A client, a router and a server, each its own network namespace");
    let mut net = Topology::new();
    net.start_web_server(8080);
    net.start_echo_server(9090);
    println!("   server {SERVER_V4}: web on tcp 8080, echo on tcp 9090");

    println!("\n== oasis run  (in the client; uplink found from its default route)");
    let daemon = Daemon::start(&mut net, "");
    show(
        &daemon,
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "8080", "--via", "underlay",
        ],
    );
    show(
        &daemon,
        &net,
        &["rule", "add", "--dst", "203.0.113.0/24", "--via", "underlay"],
    );

    println!(
        "\n== curl http://{SERVER_V4}:8080/hello.txt  (claimed by rule 1: its first packet through the broker, the rest in the kernel)"
    );
    for _ in 0..3 {
        match net.http_get(SERVER_V4, 8080) {
            Some(body) => print!("   {body}"),
            None => bail!("the request through the broker failed"),
        }
    }
    println!("\n== echo to {SERVER_V4}:9090  (no rule: stays in the kernel)");
    match net.echo(SERVER_V4, 9090, "untouched by oasis") {
        Some(reply) => println!("   {reply}"),
        None => bail!("the unclaimed request failed"),
    }

    println!(
        "\n== An overlay: an exit node on the overlay host {OVERLAY_V4}, its spec on a web server there"
    );
    net.start_exit(&["--client", CLIENT_V4]);
    net.publish(
        "exit.xml",
        r#"<overlay name="demo-exit"><description>Leave from the overlay host</description><entry host="10.77.3.2" port="7400"/></overlay>"#,
    );
    let spec_url = format!("{}/exit.xml", net.start_spec_server());
    show(&daemon, &net, &["overlay", "add", "exit", &spec_url]);
    net.start_web_server(80);
    show(
        &daemon,
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--via", "exit"],
    );
    println!("\n== curl http://{SERVER_V4}/hello.txt  (rule 3: through the overlay's exit node)");
    match net.http_get(SERVER_V4, 80) {
        Some(body) => print!("   {body}"),
        None => bail!("the request through the overlay failed"),
    }
    let log = net.process("web-80").log();
    let seen = log.lines().rev().find(|l| l.contains("GET")).unwrap_or("");
    println!("   the server logged it as coming from the exit node, not the client:\n   {seen}");

    show(&daemon, &net, &["rule", "list"]);
    show(&daemon, &net, &["overlay", "list"]);
    show(&daemon, &net, &["status"]);

    println!("\n== kill -9 the daemon: the kernel detaches the classifier, traffic flows as before");
    net.process("oasis").kill_hard();
    std::thread::sleep(Duration::from_millis(200));
    match net.http_get(SERVER_V4, 8080) {
        Some(body) => print!("   {body}"),
        None => bail!("traffic did not recover after the daemon died"),
    }
    println!("\nDemo done; namespaces removed.");
    Ok(())
}

fn show(daemon: &Daemon, net: &Topology, args: &[&str]) {
    println!("\n$ oasis {}", args.join(" "));
    let output = daemon.cli(net, args);
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    print!("{}", String::from_utf8_lossy(&output.stdout));
}
