//! DNS in the test network: an authoritative server for the `test` zone
//! on the server (dnsmasq), the client's resolv.conf, the test's cgroup
//! (whose processes' queries the daemon redirects), and `dig`.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::{Netns, SERVER_V4, SERVER_V6, Topology, wait_for_udp_listener};

/// Prefix of the cgroups the harness creates (then the creating PID).
pub const CGROUP_PREFIX: &str = "oasis-t";

/// Where the tests see the cgroup v2 hierarchy. `ip netns exec` mounts a
/// fresh /sys, hiding /sys/fs/cgroup from the daemon and the commands it
/// runs; a mount of the hierarchy outside /sys stays visible to them.
/// `cargo xtask test` unmounts it when the run ends.
pub const CGROUP2_MOUNT: &str = "/run/oasis-tests/cgroup2";

fn cgroup2_root() -> PathBuf {
    let root = PathBuf::from(CGROUP2_MOUNT);
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(CGROUP2_MOUNT));
    if !mounted {
        std::fs::create_dir_all(&root).expect("cgroup mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none", CGROUP2_MOUNT])
            .status()
            .expect("mount");
        // A parallel test may have mounted it first; that is as good.
        let now_mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .any(|line| line.split_whitespace().nth(4) == Some(CGROUP2_MOUNT));
        assert!(
            status.success() || now_mounted,
            "mounting cgroup2 at {CGROUP2_MOUNT} failed"
        );
    }
    root
}

pub(crate) fn create_cgroup(id: &str) -> PathBuf {
    let root = cgroup2_root();
    remove_stale_cgroups(&root);
    let path = root.join(id);
    std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
    path
}

pub(crate) fn remove_cgroup(path: &Path) {
    // Emptied by then: the topology killed its processes first.
    for _ in 0..50 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Cgroups left by test runs that died.
fn remove_stale_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{CGROUP_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

pub fn write_resolv_conf(ns: &Netns, server: &str) {
    let dir = Path::new("/etc/netns").join(&ns.name);
    std::fs::create_dir_all(&dir).expect("/etc/netns");
    std::fs::write(
        dir.join("resolv.conf"),
        format!("nameserver {server}\noptions timeout:2 attempts:1\n"),
    )
    .expect("resolv.conf");
}

/// The namespace's own /etc/nsswitch.conf (what `ip netns exec` shows its
/// processes), with this hosts line.
pub fn write_nsswitch(ns: &Netns, hosts: &str) {
    let dir = Path::new("/etc/netns").join(&ns.name);
    std::fs::create_dir_all(&dir).expect("/etc/netns");
    std::fs::write(
        dir.join("nsswitch.conf"),
        format!(
            "hosts: {hosts}
"
        ),
    )
    .expect("nsswitch.conf");
}

pub(crate) fn remove_resolv_conf(ns: &Netns) {
    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&ns.name));
}

/// What `dig` printed, in parts.
#[derive(Debug, Clone)]
pub struct DnsAnswer {
    pub status: String,
    pub flags: String,
    /// The answer section's data fields (addresses, alias targets).
    pub answers: Vec<String>,
    pub text: String,
}

impl DnsAnswer {
    fn parse(text: &str) -> DnsAnswer {
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or("")
            .to_string();
        let flags = text
            .split("flags: ")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or("")
            .to_string();
        let mut answers = Vec::new();
        let mut in_answer = false;
        for line in text.lines() {
            if line.starts_with(";; ANSWER SECTION") {
                in_answer = true;
                continue;
            }
            if in_answer {
                if line.trim().is_empty() {
                    break;
                }
                if let Some(data) = line.split_whitespace().nth(4) {
                    answers.push(data.trim_end_matches('.').to_string());
                }
            }
        }
        DnsAnswer {
            status,
            flags,
            answers,
            text: text.to_string(),
        }
    }
}

impl Topology {
    /// The `dns:` section every test daemon gets, plus `extra` lines
    /// (each `key: value`, unindented).
    pub fn dns_config(&self, extra: &str) -> String {
        let mut text = format!(
            "dns:\n  cgroup: {}\n  state_file: {}\n  upstreams: [\"{SERVER_V4}\"]\n",
            self.cgroup.display(),
            self.dir.join("fake-addresses.json").display()
        );
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            text.push_str("  ");
            text.push_str(line.trim());
            text.push('\n');
        }
        text
    }

    /// An authoritative server for `test.` on the server (port 53, v4 and
    /// v6), with `records` as dnsmasq options (`--host-record=...`).
    pub fn start_authoritative_dns(&mut self, records: &[&str]) {
        let server = self.server.clone();
        let mut args = vec![
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            "--log-facility=-",
            "--log-queries",
            "--listen-address",
            SERVER_V4,
            "--listen-address",
            SERVER_V6,
            // Names under test. that are not listed do not exist.
            "--local=/test/",
            // Records with a lifetime, as on the Internet (dnsmasq's own
            // default of 0 would keep every cache empty).
            "--local-ttl=300",
            "--neg-ttl=60",
        ];
        args.extend_from_slice(records);
        self.spawn(&server, "dnsmasq", &args);
        wait_for_udp_listener(&self.server, 53);
    }

    /// A command in the client namespace, inside the test's cgroup: its
    /// DNS queries go to the daemon.
    pub fn client_in_cgroup(&self, args: &[&str]) -> Output {
        let mut cmd = self.client.command("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.cgroup.display()
            ))
            .arg("sh")
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("running {args:?} in the cgroup: {e}"))
    }

    /// `dig` from the client, in the cgroup (intercepted) or not.
    pub fn dig(&self, intercepted: bool, args: &[&str]) -> DnsAnswer {
        let mut full = vec!["dig", "+time=3", "+tries=1"];
        full.extend_from_slice(args);
        let output = if intercepted {
            self.client_in_cgroup(&full)
        } else {
            self.client.output(&full)
        };
        DnsAnswer::parse(&String::from_utf8_lossy(&output.stdout))
    }
}
