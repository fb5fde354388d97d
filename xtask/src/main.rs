//! Project tasks: `cargo xtask setup | run | test | demo | bench | install | uninstall`.

mod bench;
mod bench_api;
mod bench_classifier;
mod bench_common;
mod bench_dns;
mod bench_paths;
mod bench_scale;
mod demo;
mod flowgen;
mod fuzz;
mod install;
mod setup;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark Oasis")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: the nightly toolchain with
    /// rust-src, bpf-linker, and the Debian packages the tests use.
    Setup,
    /// Build everything (kernel programs included) in release mode and run
    /// the daemon on this host with the given arguments (default config
    /// /etc/oasis/config.yaml). Needs root.
    Run {
        /// Arguments for `oasis` after `run`, e.g. `--config my.yaml`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, kernel program tests and the
    /// network-namespace integration tests. Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show Oasis at work in throw-away network namespaces: a daemon, a rule,
    /// diverted and untouched traffic, status. Touches no real interface.
    Demo,
    /// Measure throughput and latency in network namespaces with and without
    /// Oasis; prints a table and writes target/bench/results.json.
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u32,
        /// Measurements per scenario (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeat: u32,
        /// Run one part only.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// Measure only these traffic scenarios (repeatable), beside
        /// no-oasis, the baseline every ratio needs: for a quick A/B of one
        /// path, e.g. `--only traffic --scenario overlay-exit`.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// Also profile each traffic scenario's upload and download once
        /// (extra runs, not measured) with `perf record -a`: the symbols
        /// that cost most go to target/bench/profile-SCENARIO-DIR.txt.
        #[arg(long)]
        profile: bool,
    },
    /// Run Oasis under a steady mixed load (flows, DNS, rule churn, overlay
    /// join and leave, exit and daemon restarts) for a long while and fail
    /// if memory, open files or tables keep growing. Needs root; not in CI.
    Soak {
        /// How long: 5 minutes at least, since the flow tables fill for
        /// their idle lifetime (120 s for UDP) before they level off, and
        /// a shorter soak cannot tell that filling from growth.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(5..))]
        minutes: u32,
    },
    /// Run every fuzz target (cargo-fuzz on the nightly) for a bounded time
    /// from the corpus in fuzz/corpus, after replaying every input that
    /// ever crashed one (fuzz/regressions). Installs cargo-fuzz if missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u32,
    },
    /// Install Oasis as a system service: `oasis`, `oasis-exit` and
    /// `oasis-relay` (release builds) in PREFIX/bin, a systemd unit
    /// (oasis.service: restarts on failure, only the capabilities it
    /// needs, the system read-only but its own directories), and bash, zsh
    /// and fish completions. Then: `sudo systemctl enable --now oasis`.
    /// Needs root.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this directory instead of / (to stage a package).
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Stop and disable the service and remove every file `install`
    /// wrote (it keeps a list). The config and state in /etc/oasis and
    /// /var/lib/oasis stay unless --purge.
    Uninstall {
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Remove /etc/oasis and /var/lib/oasis too.
        #[arg(long)]
        purge: bool,
    },
    /// The benchmark's flow generator (run inside a test namespace).
    #[command(hide = true)]
    Flowgen(flowgen::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Run { args } => run(&args),
        Task::Test { args } => test(&args),
        Task::Demo => demo::run(),
        Task::Bench {
            seconds,
            repeat,
            only,
            scenarios,
            profile,
        } => bench::run(seconds, repeat, only, &scenarios, profile),
        Task::Soak { minutes } => soak::run(minutes),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Flowgen(args) => flowgen::run(args),
        Task::Install { prefix, root } => install::install(&root, &prefix),
        Task::Uninstall { prefix, root, purge } => install::uninstall(&root, &prefix, purge),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: no arguments, no side effects.
    unsafe { libc::geteuid() == 0 }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Builds the `oasis` binary and the overlay toolkit (`oasis-exit`,
/// `oasis-relay`), and returns the path of `oasis`; the others sit beside it.
pub fn build_oasis(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "oasis-broker",
        "--package",
        "oasis-exit",
        "--package",
        "oasis-relay",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!(
            "building oasis failed; if the kernel programs failed, `cargo xtask setup` installs their toolchain"
        );
    }
    build_modules()?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("oasis"))
}

/// The overlay code modules of `overlays/modules`, for WebAssembly, into
/// `target/modules/` (where the tests and the benchmark take them from).
fn build_modules() -> anyhow::Result<()> {
    let root = workspace_root();
    let status = cargo()
        .args([
            "build",
            "--release",
            "--target",
            setup::WASM_TARGET,
            "--manifest-path",
        ])
        .arg(root.join("overlays/modules/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/modules"))
        .status()
        .context("running cargo build for the overlay modules")?;
    if !status.success() {
        bail!(
            "building the overlay modules failed; `cargo xtask setup` installs the {} target",
            setup::WASM_TARGET
        );
    }
    Ok(())
}

fn run(args: &[String]) -> anyhow::Result<()> {
    setup::ensure()?;
    let oasis = build_oasis(true)?;
    let mut cmd = if is_root() {
        Command::new(&oasis)
    } else {
        println!("The daemon needs root; running it with sudo.");
        let mut sudo = Command::new("sudo");
        sudo.arg("--preserve-env=RUST_LOG,OASIS_CONFIG").arg(&oasis);
        sudo
    };
    // Global options (e.g. --config) go before the subcommand.
    cmd.args(args).arg("run");
    let status = cmd.status().context("starting the daemon")?;
    if !status.success() {
        bail!("the daemon exited with {status}");
    }
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::ensure()?;
    if !is_root() {
        bail!(
            "the kernel program and network-namespace tests need root: run `sudo -E cargo xtask test` \
             (or `cargo test --workspace --exclude oasis-ebpf` for the unit tests alone)"
        );
    }
    for stale in oasis_tests::remove_stale_namespaces() {
        println!("removed namespace {stale} left by an earlier, killed test run");
    }
    let oasis = build_oasis(false)?;
    let mut totals = TestTotals::default();
    let mut workspace = cargo();
    workspace
        .args(["test", "--no-fail-fast", "--workspace", "--exclude", "oasis-ebpf"])
        .args(args)
        .args(["--", "--include-ignored"])
        .env("OASIS_BIN", &oasis);
    let status = run_tests(workspace, &mut totals)?;
    // The modules' own workspace builds for WebAssembly; the plain logic
    // its guest library shares (path choice, packet parsing) is tested on
    // this host.
    let mut guest = cargo();
    guest
        .args([
            "test",
            "--no-fail-fast",
            "--package",
            "oasis-guest",
            "--manifest-path",
        ])
        .arg(workspace_root().join("overlays/modules/Cargo.toml"))
        .arg("--target-dir")
        .arg(workspace_root().join("target/modules"));
    let guest = run_tests(guest, &mut totals)?;
    // The decision core and the platform seam must build for Windows too
    // (the WinDivert backend will plug in there).
    println!(
        "\nType-checking the broker library for {}:",
        setup::WINDOWS_TARGET
    );
    let windows = cargo()
        .args([
            "check",
            "--package",
            "oasis-broker",
            "--lib",
            "--target",
            setup::WINDOWS_TARGET,
        ])
        .status()
        .context("running cargo check for Windows")?;
    // The DNS tests mount the cgroup hierarchy where `ip netns exec` can see
    // it; with every test done, take that mount away again.
    let cgroup_mount = oasis_tests::CGROUP2_MOUNT;
    if std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(cgroup_mount))
    }) {
        let _ = std::process::Command::new("umount").arg(cgroup_mount).status();
    }
    println!(
        "\ntotal: {} passed, {} failed, {} skipped; Windows type-check {}",
        totals.passed,
        totals.failed,
        totals.ignored,
        if windows.success() { "passed" } else { "FAILED" }
    );
    if !totals.failures.is_empty() {
        println!("failed:");
        for failure in &totals.failures {
            println!("  {failure}");
        }
    }
    if !status.success() || !guest.success() {
        bail!("tests failed");
    }
    if !windows.success() {
        bail!("the broker library does not build for {}", setup::WINDOWS_TARGET);
    }
    Ok(())
}

/// Runs `cargo test` as `cmd` says (with `--no-fail-fast`, so one failing
/// test binary does not keep the others from running), passing its output
/// through and adding every test binary's result line to `totals`, so a
/// run ends with one total and every failure instead of the last binary's.
fn run_tests(
    mut cmd: std::process::Command,
    totals: &mut TestTotals,
) -> anyhow::Result<std::process::ExitStatus> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let stderr = child.stderr.take().context("cargo test stderr")?;
    // cargo names the test binaries, and those that crashed, on stderr.
    let errors = std::thread::spawn(move || {
        let mut binaries = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            eprintln!("{line}");
            binaries.push(line);
        }
        crashed_binaries(&binaries)
    });
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if let Ok(crashed) = errors.join() {
        totals.add_failed_binaries(crashed);
    }
    Ok(status)
}

/// The test targets cargo lists at the end of a `--no-fail-fast` run as
/// failed (`error: 2 targets failed:` and one line each), and those that
/// did not build (`error: could not compile ...`).
fn crashed_binaries(stderr: &[String]) -> Vec<String> {
    let mut failed: Vec<String> = stderr
        .iter()
        .filter_map(|l| l.strip_prefix("error: could not compile "))
        .map(|l| format!("did not build: {l}"))
        .collect();
    if let Some(start) = stderr
        .iter()
        .position(|l| l.starts_with("error: ") && l.contains(" failed:"))
    {
        failed.extend(
            stderr[start + 1..]
                .iter()
                .map_while(|l| l.strip_prefix("    "))
                .map(|l| l.trim().trim_matches('`').to_string()),
        );
    }
    failed
}

#[derive(Default, Debug, PartialEq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Every failed test by name, then every failed test binary as cargo
    /// names it (one that crashed has no failed test of its own).
    failures: Vec<String>,
}

impl TestTotals {
    /// Takes in one line of `cargo test`'s standard output.
    fn add_line(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failures.push(name.to_string());
        }
        self.add_result_line(line);
    }

    /// The binaries cargo reported failed, after the tests named.
    fn add_failed_binaries(&mut self, binaries: Vec<String>) {
        for binary in binaries {
            self.failures.push(format!("test binary: {binary}"));
        }
    }

    /// Adds `test result: ok. 9 passed; 0 failed; 1 ignored; ...`.
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_result_lines() {
        let mut totals = TestTotals::default();
        totals.add_result_line(
            "test result: ok. 9 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.84s",
        );
        totals.add_result_line(
            "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        totals.add_result_line("running 3 tests");
        assert_eq!(
            totals,
            TestTotals {
                passed: 14,
                failed: 2,
                ignored: 1,
                failures: Vec::new(),
            }
        );
    }

    #[test]
    fn every_failure_is_listed_with_the_binaries_that_failed() {
        let mut totals = TestTotals::default();
        for line in [
            "test engine::tests::a ... ok",
            "test engine::tests::b ... FAILED",
            "test no_packet_allocates_in_steady_state ... FAILED",
        ] {
            totals.add_line(line);
        }
        let stderr: Vec<String> = [
            "     Running tests/dns.rs (target/debug/deps/dns-1234)",
            "error: could not compile `xtask` (bin \"xtask\" test) due to 2 previous errors",
            "error: 2 targets failed:",
            "    `-p oasis-broker --lib`",
            "    `-p oasis-tests --test allocations`",
            "error: test failed",
        ]
        .map(String::from)
        .into();
        totals.add_failed_binaries(crashed_binaries(&stderr));
        assert_eq!(
            totals.failures,
            [
                "engine::tests::b",
                "no_packet_allocates_in_steady_state",
                "test binary: did not build: `xtask` (bin \"xtask\" test) due to 2 previous errors",
                "test binary: -p oasis-broker --lib",
                "test binary: -p oasis-tests --test allocations",
            ]
        );
        assert!(crashed_binaries(&["error: test failed".into()]).is_empty());
    }
}
