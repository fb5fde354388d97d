//! The control plane under load, in network namespaces: while a large name
//! import and a churn of header rules run, the heartbeat (read straight
//! from the kernel's map, not through the daemon) stays fresh and a
//! diverted flow never fails open. Needs root; `cargo xtask test` runs
//! these.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use oasis_broker::control::{Request, Response, call};
use oasis_broker::rules::RuleSpec;
use oasis_tests::{Daemon, SERVER_V4, Topology, monotonic_ns};

const HEARTBEAT_MS: u64 = 1000;
const NAME_RULES: usize = 200_000;
const CHURN_THREADS: usize = 8;
/// Add and delete pairs per churn thread at least (2,000 header rule
/// changes in all); they go on until the import is done.
const CHURN_PAIRS: usize = 125;

/// The heartbeat map, opened by its id as any outside tool would.
fn heartbeat_map(id: u32) -> aya::maps::Array<aya::maps::MapData, u64> {
    let data = aya::maps::MapData::from_id(id).expect("the heartbeat map");
    aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array of u64")
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_heartbeat_stays_fresh_while_rules_change_at_scale() {
    let mut net = Topology::new();
    let daemon = Daemon::start(&mut net, &format!("heartbeat_timeout_ms: {HEARTBEAT_MS}\n"));
    let claimed = daemon.json(
        &net,
        &[
            "rule", "add", "--proto", "udp", "--dport", "9999", "--via", "underlay", "--json",
        ],
    )["id"]
        .as_u64()
        .expect("the rule's id") as u32;
    let status = daemon.json(&net, &["status", "--json"]);
    let map_id = status["heartbeat"]["map_id"]
        .as_u64()
        .expect("the heartbeat map's id") as u32;
    let diverted_before = status["tun"]["diverted_packets"].as_u64().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // The heartbeat, read every 10 ms.
    let oldest = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, oldest) = (stop.clone(), oldest.clone());
        std::thread::spawn(move || {
            let map = heartbeat_map(map_id);
            let mut samples = 0u64;
            while !stop.load(Relaxed) {
                let beat = map.get(&0, 0).expect("read the heartbeat");
                let age = monotonic_ns().saturating_sub(beat) / 1_000_000;
                oldest.fetch_max(age, Relaxed);
                samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        })
    };
    // A diverted flow: a datagram every 5 ms to a port the rule claims.
    let sent = Arc::new(AtomicU64::new(0));
    let flow = {
        let (stop, sent, client) = (stop.clone(), sent.clone(), net.client.clone());
        std::thread::spawn(move || {
            let script = format!(
                "import socket,sys,time\n\
                 s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 n=0\n\
                 for line in sys.stdin:\n  \
                   s.sendto(b'x',('{SERVER_V4}',9999));n+=1\n\
                 print(n)\n"
            );
            let mut child = client
                .command("python3")
                .args(["-u", "-c", &script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("the sender");
            let mut stdin = child.stdin.take().unwrap();
            while !stop.load(Relaxed) {
                use std::io::Write;
                if stdin.write_all(b"\n").is_err() {
                    break;
                }
                sent.fetch_add(1, Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(stdin);
            let output = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
    };

    // The import, through the CLI as a user runs it.
    let file = net.dir.join("names.txt");
    let names: String = (0..NAME_RULES)
        .map(|i| format!("site{i}.example.com\n"))
        .collect();
    std::fs::write(&file, names).unwrap();
    let import = {
        let (file, config, socket) = (
            file.to_string_lossy().into_owned(),
            daemon.config.clone(),
            daemon.socket.clone(),
        );
        let (client, bin) = (net.client.clone(), oasis_tests::oasis_bin());
        std::thread::spawn(move || {
            let started = Instant::now();
            let output = client
                .command(&bin.to_string_lossy())
                .arg("--config")
                .arg(&config)
                .arg("--socket")
                .arg(&socket)
                .args(["rule", "import", "--kind", "suffix", "--via", "underlay", &file])
                .output()
                .expect("the CLI");
            (output, started.elapsed())
        })
    };
    // Let the import get under way; then header rules added and deleted
    // from several clients at once, through the control protocol.
    std::thread::sleep(Duration::from_millis(300));
    let imported = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..CHURN_THREADS)
        .map(|t| {
            let (socket, imported) = (daemon.socket.clone(), imported.clone());
            std::thread::spawn(move || {
                let mut changes = 0;
                let mut i = 0;
                while i < CHURN_PAIRS || !imported.load(Relaxed) {
                    let port = 20_000 + t * 1000 + i % 1000;
                    i += 1;
                    let spec = RuleSpec {
                        proto: Some("tcp".into()),
                        dport: Some(port.to_string()),
                        via: "underlay".into(),
                        ..RuleSpec::default()
                    };
                    let id = match call(
                        &socket,
                        &Request::AddRule {
                            spec: Box::new(spec),
                            dst_set: None,
                        },
                        |_| {},
                    )
                    .expect("add")
                    {
                        Response::Rule { rule } => rule.id,
                        other => panic!("adding a rule: {other:?}"),
                    };
                    match call(&socket, &Request::DelRule { id }, |_| {}).expect("delete") {
                        Response::Rule { .. } => {}
                        other => panic!("deleting rule {id}: {other:?}"),
                    }
                    changes += 2;
                }
                changes
            })
        })
        .collect();
    let (output, import_took) = import.join().unwrap();
    imported.store(true, Relaxed);
    let changes: usize = churn.into_iter().map(|t| t.join().unwrap()).sum();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Relaxed);
    let samples = watcher.join().unwrap();
    let received_by_sender = flow.join().unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(&format!("imported {NAME_RULES} rules")),
        "the import: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(changes >= 2 * CHURN_THREADS * CHURN_PAIRS);
    // A long import tells the user what it is doing (short requests stay
    // silent for their first 300 ms, so only a long one must show it).
    let stderr = String::from_utf8_lossy(&output.stderr);
    if import_took > Duration::from_millis(600) {
        assert!(
            // The CLI's own "importing N rules ..." aside: the daemon's
            // stages (checking, compiling, writing the config file).
            stderr
                .lines()
                .any(|l| !l.starts_with("importing ") && l.ends_with(" ...")),
            "an import of {import_took:?} showed no progress: {stderr}"
        );
    }
    let status = daemon.json(&net, &["status", "--json"]);
    let oldest = oldest.load(Relaxed);
    println!(
        "import of {NAME_RULES} name rules: {import_took:?}; {changes} header rule changes; \
         heartbeat read {samples} times, at most {oldest} ms old (timeout {HEARTBEAT_MS} ms); \
         {received_by_sender} datagrams of the diverted flow sent"
    );
    assert!(samples > 100, "the heartbeat was hardly read");
    assert!(
        oldest < HEARTBEAT_MS,
        "the heartbeat went {oldest} ms without a beat: the classifier failed open"
    );
    assert_eq!(
        status["classifier"]["fail_open"].as_u64(),
        Some(0),
        "packets passed while failing open: {}",
        status["classifier"]
    );
    // The broker saw the claimed flow's first datagram and left the rest
    // to the kernel, where its rule counted every one: none passed while
    // failing open, which skips the rules.
    let diverted = status["tun"]["diverted_packets"].as_u64().unwrap() - diverted_before;
    assert!(diverted >= 1, "the claimed flow never reached the broker");
    let counted = match call(&daemon.socket, &Request::ListRules, |_| {}).expect("the rule list") {
        Response::Rules { rules } => rules
            .iter()
            .find(|r| r.id == claimed)
            .map(|r| r.packets)
            .expect("the claimed flow's rule"),
        other => panic!("listing rules: {other:?}"),
    };
    assert!(
        received_by_sender > 100 && counted >= received_by_sender,
        "every datagram of the claimed flow was its rule's: {counted} of {received_by_sender}"
    );
    assert_eq!(status["rules"].as_u64(), Some(NAME_RULES as u64 + 1));
    assert_eq!(status["config_saved"].as_bool(), Some(true));

    // A long listing cut short by its reader ends quietly, not in a panic.
    let cut = net
        .client
        .command("sh")
        .arg("-c")
        .arg(format!(
            "{} --config {} --socket {} rule list | head -n 1",
            oasis_tests::oasis_bin().display(),
            daemon.config.display(),
            daemon.socket.display()
        ))
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&cut.stderr);
    assert!(
        cut.status.success() && !stderr.contains("panicked") && cut.stdout.ends_with(b"\n"),
        "`oasis rule list | head -n 1`: {stderr}"
    );
    // And the file holds them: a restart brings them back.
    assert!(
        net.process("oasis").terminate(Duration::from_secs(30)),
        "a clean stop"
    );
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    assert_eq!(config.matches("name_suffix:").count(), NAME_RULES);
}

/// A second daemon, started while the first runs (or is still exiting),
/// says that another daemon holds what it needs, not that it lacks root.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_second_daemon_says_another_one_is_running() {
    let mut net = Topology::new();
    let daemon = Daemon::start(&mut net, "");
    let second = net
        .client
        .command(&oasis_tests::oasis_bin().to_string_lossy())
        .args(["--config", &daemon.config.to_string_lossy(), "run"])
        .output()
        .expect("a second oasis run");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second daemon started: {stderr}");
    assert!(
        stderr.to_lowercase().contains("another oasis daemon") && !stderr.contains("must run as root"),
        "{stderr}"
    );
    // The first is untouched.
    assert!(daemon.cli(&net, &["status"]).status.success());
    // While the first is exiting (its socket gone, its devices maybe not
    // yet): whatever the second meets, it is not a lack of root.
    let pid = net.process("oasis").pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let mut second = net
        .client
        .command(&oasis_tests::oasis_bin().to_string_lossy())
        .args(["--config", &daemon.config.to_string_lossy(), "run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("a second oasis run");
    std::thread::sleep(std::time::Duration::from_secs(3));
    if second.try_wait().expect("wait").is_none() {
        // It started once the first was gone: fine.
        let _ = second.kill();
    }
    let output = second.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("must run as root"), "{stderr}");
}
