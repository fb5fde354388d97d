//! Rules by who sent the traffic, end to end in namespaces: the same
//! destination and port over the exit node for one application, user or
//! cgroup and on the underlay for another, at the same time; the server
//! tells them apart by the source it sees. Needs root; `cargo xtask test`
//! runs these.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, SERVER_V4, Topology};

/// Cgroups made below the test's own, removed (emptied by then) at the end.
struct SubCgroups(Vec<PathBuf>);

impl SubCgroups {
    fn make(&mut self, net: &Topology, name: &str) -> PathBuf {
        let path = net.cgroup.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        self.0.push(path.clone());
        path
    }
}

impl Drop for SubCgroups {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(path).is_ok() || !path.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A cgroup's path as a rule names it: below the hierarchy's root (which
/// the tests mount where the daemon sees it too).
fn rule_path(cgroup: &Path) -> String {
    cgroup
        .strip_prefix(oasis_tests::CGROUP2_MOUNT)
        .expect("below the root")
        .to_string_lossy()
        .into_owned()
}

/// `curl` of `/PATH` from the client, in `cgroup`, as `uid` (0: root),
/// with the process named `comm`. Returns whether it got the file.
fn fetch(net: &Topology, cgroup: &Path, uid: u32, comm: &str, path: &str) -> std::thread::JoinHandle<bool> {
    let url = format!("http://{SERVER_V4}/{path}");
    // The process joins the cgroup, gives up root if asked, and runs curl
    // under the name asked (a copy of curl's executable, as a user's
    // program would have its own name).
    let bin = net.dir.join(comm);
    if !bin.exists() {
        std::fs::copy("/usr/bin/curl", &bin).expect("a copy of curl");
    }
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec setpriv --reuid={uid} --regid={uid} --clear-groups {} -sS --max-time 5 -o /dev/null {url}",
        cgroup.display(),
        bin.display(),
    );
    let mut command = net.client.command("sh");
    command.args(["-c", &script]);
    std::thread::spawn(move || command.output().is_ok_and(|o| o.status.success()))
}

/// The source the server saw for each request of `/PATH`.
fn sources(net: &mut Topology, path: &str) -> Vec<String> {
    net.process("web-80")
        .log()
        .lines()
        .filter(|line| line.contains(&format!("GET /{path} ")))
        .filter_map(|line| line.split_whitespace().next())
        .map(|source| source.trim_start_matches("::ffff:").to_string())
        .collect()
}

fn publish_files(net: &Topology, names: &[&str]) {
    for name in names {
        std::fs::write(net.dir.join("www").join(name), "x\n").expect("web file");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn one_cgroup_over_the_exit_and_another_on_the_underlay_at_once() {
    let mut net = Topology::new();
    let (daemon, _) = Daemon::joined_to_exit(&mut net);
    let mut cgroups = SubCgroups(Vec::new());
    let browser = cgroups.make(&net, "browser.scope");
    let backup = cgroups.make(&net, "backup.service");
    let later = net.cgroup.join("later.scope");
    publish_files(&net, &["a.txt", "b.txt", "c.txt"]);
    daemon.ok(
        &net,
        &[
            "rule",
            "add",
            "--cgroup",
            &rule_path(&browser),
            "--proto",
            "tcp",
            "--dport",
            "80",
            "--via",
            "exit",
        ],
    );
    // A unit that has not started yet: the rule waits for its cgroup.
    daemon.ok(
        &net,
        &["rule", "add", "--cgroup", &rule_path(&later), "--via", "exit"],
    );
    let listed = daemon.ok(&net, &["rule", "list"]);
    assert!(listed.contains("cgroup oasis-t-"), "{listed}");

    for round in 0..3 {
        let a = fetch(&net, &browser, 0, "curl", "a.txt");
        let b = fetch(&net, &backup, 0, "curl", "b.txt");
        assert!(a.join().unwrap() && b.join().unwrap(), "round {round}");
    }
    assert_eq!(
        sources(&mut net, "a.txt"),
        vec![OVERLAY_V4; 3],
        "the browser's cgroup goes via the exit"
    );
    assert_eq!(
        sources(&mut net, "b.txt"),
        vec![CLIENT_V4; 3],
        "the backup's cgroup stays on the underlay"
    );

    // The unit starts: within the daemon's check of cgroups (a second),
    // its traffic takes the exit.
    cgroups.make(&net, "later.scope");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(fetch(&net, &later, 0, "curl", "c.txt").join().unwrap());
        if sources(&mut net, "c.txt").last().map(String::as_str) == Some(OVERLAY_V4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a cgroup made after its rule was never followed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = net.process("oasis").log();
    assert!(log.contains("the rules' cgroups have new ids"), "{log}");
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn one_user_and_one_application_over_the_exit_others_on_the_underlay() {
    let mut net = Topology::new();
    let (daemon, _) = Daemon::joined_to_exit(&mut net);
    let cgroup = net.cgroup.clone();
    publish_files(&net, &["u.txt", "r.txt", "app.txt", "other.txt"]);
    daemon.ok(
        &net,
        &[
            "rule", "add", "--uid", "4321", "--proto", "tcp", "--dport", "80", "--via", "exit",
        ],
    );
    let user = fetch(&net, &cgroup, 4321, "curl", "u.txt");
    let root = fetch(&net, &cgroup, 0, "curl", "r.txt");
    assert!(user.join().unwrap() && root.join().unwrap());
    assert_eq!(sources(&mut net, "u.txt"), vec![OVERLAY_V4]);
    assert_eq!(sources(&mut net, "r.txt"), vec![CLIENT_V4]);

    daemon.ok(
        &net,
        &["rule", "add", "--app", "/opt/tools/fetcher", "--via", "exit"],
    );
    let listed = daemon.ok(&net, &["rule", "list"]);
    assert!(listed.contains("app /opt/tools/fetcher"), "{listed}");
    let app = fetch(&net, &cgroup, 0, "fetcher", "app.txt");
    let other = fetch(&net, &cgroup, 0, "other-tool", "other.txt");
    assert!(app.join().unwrap() && other.join().unwrap());
    assert_eq!(
        sources(&mut net, "app.txt"),
        vec![OVERLAY_V4],
        "the application's flows go via the exit"
    );
    assert_eq!(
        sources(&mut net, "other.txt"),
        vec![CLIENT_V4],
        "another program stays on the underlay"
    );

    // A live flow shows who sent it.
    net.web_file("big.bin", 20_000_000);
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec setpriv --reuid=4321 --regid=4321 --clear-groups {} -sS --limit-rate 200k -o /dev/null http://{SERVER_V4}/big.bin",
        cgroup.display(),
        net.dir.join("fetcher").display(),
    );
    let client = net.client.clone();
    net.spawn(&client, "slow-fetch", &["sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let sender = loop {
        let flows = daemon.json(&net, &["flows", "--json"]);
        let found = flows.as_array().into_iter().flatten().find_map(|f| {
            (f["flow"].as_str()?.ends_with(":80") && f["sender"]["uid"] == 4321).then(|| f["sender"].clone())
        });
        if let Some(sender) = found {
            break sender;
        }
        assert!(Instant::now() < deadline, "no flow shows its sender: {flows}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sender["app"], "fetcher", "{sender}");
    let cgroup_name = cgroup.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        sender["cgroup"].as_str().unwrap().ends_with(&cgroup_name),
        "{sender}"
    );
    let table = daemon.ok(&net, &["flows"]);
    assert!(
        table.contains("from uid 4321, cgroup /") && table.contains("app fetcher"),
        "{table}"
    );
}

/// `dig` of `name` from the client, in `cgroup`: the answer's addresses.
fn dig_in(net: &Topology, cgroup: &Path, name: &str) -> Vec<String> {
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec dig +time=3 +tries=1 +short @{SERVER_V4} {name} A",
        cgroup.display()
    );
    let output = net.client.output(&["sh", "-c", &script]);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_name_claimed_for_one_cgroup_is_faked_there_and_true_elsewhere() {
    let mut net = Topology::new();
    let (daemon, _) = Daemon::joined_to_exit(&mut net);
    net.start_authoritative_dns(&[&format!("--host-record=www.app.test,{SERVER_V4}")]);
    let mut cgroups = SubCgroups(Vec::new());
    let browser = cgroups.make(&net, "browser.scope");
    let other = cgroups.make(&net, "other.scope");
    publish_files(&net, &["n1.txt", "n2.txt"]);
    daemon.ok(
        &net,
        &[
            "rule",
            "add",
            "--name-suffix",
            "app.test",
            "--cgroup",
            &rule_path(&browser),
            "--via",
            "exit",
        ],
    );
    for round in 0..2 {
        let faked = dig_in(&net, &browser, "www.app.test");
        assert_eq!(faked.len(), 1, "round {round}: {faked:?}");
        assert!(
            faked[0].starts_with("198.1"),
            "round {round}: a fake address for the browser: {faked:?}"
        );
        // Asked right after by another cgroup: the truth, never the
        // browser's answer given again.
        assert_eq!(
            dig_in(&net, &other, "www.app.test"),
            vec![SERVER_V4.to_string()],
            "round {round}"
        );
    }
    // And the flows follow: the browser's over the exit, the other's direct.
    let url = |path: &str| format!("http://www.app.test/{path}");
    for (cgroup, path) in [(&browser, "n1.txt"), (&other, "n2.txt")] {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec curl -sS --max-time 5 -o /dev/null {}",
            cgroup.display(),
            url(path)
        );
        let output = net.client.output(&["sh", "-c", &script]);
        assert!(output.status.success(), "{output:?}");
    }
    assert_eq!(sources(&mut net, "n1.txt"), vec![OVERLAY_V4]);
    assert_eq!(sources(&mut net, "n2.txt"), vec![CLIENT_V4]);
    let listed = daemon.ok(&net, &["rule", "list"]);
    assert!(
        listed.contains("name-suffix app.test cgroup oasis-t-"),
        "{listed}"
    );
}
