//! Rule lists by URL, end to end in namespaces: a list served by a web
//! server on the overlay host, imported, changed, refreshed, served
//! unchanged (a 304), served broken and taken away. Needs root; `cargo
//! xtask test` runs these.

use std::time::{Duration, SystemTime};

use oasis_tests::{CLIENT_V4, Daemon, OVERLAY_V4, SERVER_V4, Topology};
use serde_json::Value;

/// Publishes a list with a modification time of its own: the server
/// answers "not modified" by time, to the second.
fn publish_list(net: &Topology, name: &str, text: &str, version: u64) {
    net.publish(name, text);
    let path = net.dir.join("specs").join(name);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now() + Duration::from_secs(10 * version)))
        .expect("setting the list's time");
}

fn the_list(daemon: &Daemon, net: &Topology) -> Value {
    let rules = daemon.json(net, &["rule", "list", "--json"]);
    let list = rules
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r.get("list").is_some()))
        .unwrap_or_else(|| panic!("no list rule: {rules}"));
    list["list"].clone()
}

/// Where the server saw the last request for `/hello.txt` come from.
fn last_source(net: &mut Topology) -> String {
    let log = net.process("web-80").log();
    log.lines()
        .rfind(|line| line.contains("GET /hello.txt "))
        .and_then(|line| line.split_whitespace().next())
        .map(|s| s.trim_start_matches("::ffff:").to_string())
        .unwrap_or_default()
}

/// A log without its colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut rest = log;
    while let Some(at) = rest.find('\x1b') {
        out.push_str(&rest[..at]);
        rest = rest[at..].find('m').map_or("", |end| &rest[at + end + 1..]);
    }
    out.push_str(rest);
    out
}

fn served(net: &mut Topology, status: &str) -> usize {
    net.process("spec-server")
        .log()
        .lines()
        .filter(|l| l.contains("GET /route.cidr ") && l.contains(&format!("\" {status} ")))
        .count()
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_prefix_list_stays_current_and_its_last_good_copy_outlives_failures() {
    let mut net = Topology::new();
    let (daemon, base) = Daemon::joined_to_exit(&mut net);
    let url = format!("{base}/route.cidr");
    let rules_before = daemon.json(&net, &["rule", "list", "--json"]);

    // A list that is not there, or not a list: refused, nothing changes.
    let missing = daemon.cli(
        &net,
        &[
            "rule",
            "import",
            "--url",
            &format!("{base}/none.cidr"),
            "--kind",
            "cidr",
            "--via",
            "exit",
        ],
    );
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("404"),
        "{missing:?}"
    );
    publish_list(&net, "bad.cidr", "10.77.2.0/24\nnot a prefix\n", 0);
    let bad = daemon.cli(
        &net,
        &[
            "rule",
            "import",
            "--url",
            &format!("{base}/bad.cidr"),
            "--kind",
            "cidr",
            "--via",
            "exit",
        ],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 2"), "{bad:?}");
    assert_eq!(daemon.json(&net, &["rule", "list", "--json"]), rules_before);
    assert!(
        !net.dir.join("lists").exists() || std::fs::read_dir(net.dir.join("lists")).unwrap().count() == 0
    );

    publish_list(&net, "route.cidr", &format!("# the server\n{SERVER_V4}/32\n"), 1);
    daemon.ok(
        &net,
        &[
            "rule", "import", "--url", &url, "--kind", "cidr", "--via", "exit", "--every", "1h",
        ],
    );
    let list = the_list(&daemon, &net);
    assert_eq!(list["entries"], 1, "{list}");
    assert_eq!(list["every"], "1h", "{list}");
    assert!(net.http_get(SERVER_V4, 80).is_some());
    assert_eq!(
        last_source(&mut net),
        OVERLAY_V4,
        "the listed server is reached via the exit"
    );

    // A live flow across a changed list.
    net.web_file("big.bin", 40_000_000);
    net.start_paced_download("dl", SERVER_V4, 80, "big.bin", 400_000);
    net.paced_download_goes_on("dl", 400_000, "before the refresh");
    publish_list(
        &net,
        "route.cidr",
        &format!("{SERVER_V4}/32\n203.0.113.0/24\n"),
        2,
    );
    daemon.ok(&net, &["rule", "refresh"]);
    assert_eq!(the_list(&daemon, &net)["entries"], 2);
    net.paced_download_goes_on("dl", 400_000, "across the swap");

    // Unchanged: the server says so, and nothing is compiled again.
    let log_before = net.process("oasis").log();
    daemon.ok(&net, &["rule", "refresh"]);
    assert_eq!(
        served(&mut net, "304"),
        1,
        "a refresh of an unchanged list asks with If-Modified-Since"
    );
    let log = net.process("oasis").log();
    let new = plain(&log[log_before.len()..]);
    assert!(new.contains("changed=false"), "{new}");
    assert!(!new.contains("loading the classifier"), "{new}");

    // Garbage, then nothing at all: the last good copy stays, with why.
    publish_list(&net, "route.cidr", "<html><body>maintenance</body></html>\n", 3);
    let refreshed = daemon.ok(&net, &["rule", "refresh"]);
    assert!(refreshed.contains("last refresh failed"), "{refreshed}");
    let list = the_list(&daemon, &net);
    assert!(list["error"].as_str().unwrap().contains("line 1"), "{list}");
    assert_eq!(list["entries"], 2, "{list}");
    let status = daemon.ok(&net, &["status"]);
    assert!(
        status.contains("list        rule 1: cidr") && status.contains("last refresh failed"),
        "{status}"
    );
    assert!(net.http_get(SERVER_V4, 80).is_some());
    assert_eq!(
        last_source(&mut net),
        OVERLAY_V4,
        "the last good list is still in effect"
    );
    std::fs::remove_file(net.dir.join("specs/route.cidr")).unwrap();
    daemon.ok(&net, &["rule", "refresh"]);
    assert!(the_list(&daemon, &net)["error"].as_str().unwrap().contains("404"));
    net.paced_download_goes_on("dl", 400_000, "after the failed refreshes");

    // The list served again, without the server: new flows take the
    // underlay. And it survives a restart from its kept copy.
    publish_list(&net, "route.cidr", "203.0.113.0/24\n", 4);
    daemon.ok(&net, &["rule", "refresh"]);
    let list = the_list(&daemon, &net);
    assert!(list.get("error").is_none(), "{list}");
    assert!(net.http_get(SERVER_V4, 80).is_some());
    assert_eq!(last_source(&mut net), CLIENT_V4);
    let kept = std::fs::read_to_string(net.dir.join(list["file"].as_str().unwrap())).unwrap();
    assert_eq!(kept, "203.0.113.0/24\n");
    let config = std::fs::read_to_string(net.dir.join("config.yaml")).unwrap();
    assert!(
        config.contains(&format!("list: {url}")) && config.contains("list_kind: cidr"),
        "{config}"
    );
    assert!(
        !config.contains("203.0.113.0"),
        "the config names the list, not its entries:\n{config}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_name_list_claims_its_names_until_it_changes() {
    let mut net = Topology::new();
    let (daemon, base) = Daemon::joined_to_exit(&mut net);
    net.start_authoritative_dns(&[
        &format!("--host-record=www.listed.test,{SERVER_V4}"),
        &format!("--host-record=www.other.test,{SERVER_V4}"),
    ]);
    let url = format!("{base}/names.txt");
    publish_list(&net, "names.txt", "# claimed\n0.0.0.0 listed.test\n", 1);
    daemon.ok(
        &net,
        &[
            "rule", "import", "--url", &url, "--kind", "suffix", "--via", "exit",
        ],
    );
    let listed = net.dig(true, &[&format!("@{SERVER_V4}"), "www.listed.test", "A"]);
    assert!(
        listed.answers[0].starts_with("198.1"),
        "a fake address: {}",
        listed.text
    );
    let other = net.dig(true, &[&format!("@{SERVER_V4}"), "www.other.test", "A"]);
    assert_eq!(other.answers, vec![SERVER_V4.to_string()], "{}", other.text);

    publish_list(&net, "names.txt", "+.other.test\n", 2);
    daemon.ok(&net, &["rule", "refresh"]);
    let listed = net.dig(true, &[&format!("@{SERVER_V4}"), "www.listed.test", "A"]);
    assert_eq!(listed.answers, vec![SERVER_V4.to_string()], "{}", listed.text);
    let other = net.dig(true, &[&format!("@{SERVER_V4}"), "www.other.test", "A"]);
    assert!(other.answers[0].starts_with("198.1"), "{}", other.text);
    let table = daemon.ok(&net, &["rule", "list"]);
    assert!(
        table.contains("name-suffix list") && table.contains("1 entries"),
        "{table}"
    );
}
