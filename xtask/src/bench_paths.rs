//! What the traffic benchmark learns about where an overlay flow's packets
//! go and what they cost: the share each carrier's kernel carried (the
//! fast paths' hit ratio) and a system-wide `perf` profile of each path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use oasis_tests::{Daemon, Topology};
use serde_json::Value;

/// What a carrier's kernel and its user space carried, in one unit.
#[derive(Clone, Copy, Default, Debug)]
pub struct Split {
    pub kernel: u64,
    pub user: u64,
}

impl Split {
    fn since(self, before: Split) -> Split {
        Split {
            kernel: self.kernel.saturating_sub(before.kernel),
            user: self.user.saturating_sub(before.user),
        }
    }

    /// The kernel's share, in percent; None when nothing passed.
    fn share(self) -> Option<f64> {
        let all = self.kernel + self.user;
        (all > 0).then(|| 100.0 * self.kernel as f64 / all as f64)
    }
}

/// Where the client's and the exit's packets went, each way.
#[derive(Clone, Copy, Default, Debug)]
pub struct Carried {
    /// Client, out: bytes the kernel wrapped against bytes through the TUN.
    pub client_up: Split,
    /// Client, in: datagrams the kernel opened against those the broker's
    /// socket received.
    pub client_down: Split,
    /// Exit, toward the Internet and toward the client: bytes.
    pub exit_up: Split,
    pub exit_down: Split,
}

impl Carried {
    /// Reads the counters now: the daemon's status and the exit's stats
    /// file (written once a second).
    pub fn read(net: &Topology, daemon: &Daemon) -> Carried {
        let status = daemon.json(net, &["status", "--json"]);
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let mut carried = Carried {
            client_up: Split {
                kernel: n(&status["classifier"]["encap_bytes"]),
                user: n(&status["tun"]["diverted_bytes"]),
            },
            client_down: Split {
                kernel: n(&status["classifier"]["decap_packets"]),
                user: n(&status["broker"]["overlay_received"]),
            },
            ..Carried::default()
        };
        let exit: Value = std::fs::read(net.dir.join("exit-stats.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(Value::Null);
        for class in exit["classes"].as_object().into_iter().flatten() {
            carried.exit_up.user += n(&class.1["to_internet"]["bytes"]);
            carried.exit_down.user += n(&class.1["to_client"]["bytes"]);
        }
        carried.exit_up.kernel = n(&exit["fast_path"]["to_internet"]["bytes"]);
        carried.exit_down.kernel = n(&exit["fast_path"]["to_client"]["bytes"]);
        carried
    }

    /// The kernel's share of each count since `before`, named as figures;
    /// a count that did not move is left out.
    pub fn shares_since(self, before: Carried) -> Vec<(&'static str, f64)> {
        [
            ("kernel_share_client_up", self.client_up.since(before.client_up)),
            (
                "kernel_share_client_down",
                self.client_down.since(before.client_down),
            ),
            ("kernel_share_exit_up", self.exit_up.since(before.exit_up)),
            ("kernel_share_exit_down", self.exit_down.since(before.exit_down)),
        ]
        .into_iter()
        .filter_map(|(name, split)| split.share().map(|share| (name, share)))
        .collect()
    }
}

/// The exit's stats file is rewritten once a second: waits for a version
/// newer than now, so a reading after traffic includes all of it.
pub fn wait_for_exit_stats(net: &Topology) {
    let path = net.dir.join("exit-stats.json");
    let modified = || std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let Some(start) = modified() else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline && modified() == Some(start) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A system-wide profile taken while `work` runs: `perf record` on every
/// CPU at 999 Hz, then the symbols that took at least 0.5% of the samples,
/// written to `target/bench/profile-NAME.txt`.
pub struct Profile {
    data: PathBuf,
    text: PathBuf,
    recorder: std::process::Child,
}

impl Profile {
    /// Starts recording; errors when `perf` cannot run (it comes with
    /// Debian's `linux-perf`).
    pub fn start(dir: &Path, name: &str, seconds: u32) -> anyhow::Result<Profile> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join(format!("profile-{name}.data"));
        let recorder = Command::new("perf")
            .args(["record", "-a", "-F", "999", "-q", "-o"])
            .arg(&data)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running perf (apt install linux-perf) for --profile")?;
        Ok(Profile {
            data,
            text: dir.join(format!("profile-{name}.txt")),
            recorder,
        })
    }

    /// Waits for the recording to end and writes the report.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        let status = self.recorder.wait()?;
        if !status.success() {
            bail!("perf record failed ({status})");
        }
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--sort",
                "sym",
                "--percent-limit",
                "0.5",
                "-i",
            ])
            .arg(&self.data)
            .output()
            .context("perf report")?;
        if !report.status.success() {
            bail!("perf report: {}", String::from_utf8_lossy(&report.stderr));
        }
        std::fs::write(&self.text, &report.stdout)?;
        let _ = std::fs::remove_file(&self.data);
        Ok(std::mem::take(&mut self.text))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        // Only if `finish` was not reached: a recorder of ours outliving
        // the benchmark would profile nothing of use.
        if let Ok(None) = self.recorder.try_wait() {
            let _ = self.recorder.kill();
            let _ = self.recorder.wait();
        }
    }
}
