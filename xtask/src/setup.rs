//! `cargo xtask setup`: installs what a fresh machine lacks, idempotently.
//! Every step checks first and only installs what is missing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

pub const BPF_LINKER_VERSION: &str = "0.10.4";

/// The Windows target the broker library is type-checked for (the
/// WinDivert backend's target); its C dependencies (ring) need the mingw
/// cross compiler even for `cargo check`.
pub const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";
/// What overlay code modules are built for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn target_installed(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == target)
        })
}

/// Commands the tests and benchmarks run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("curl", "curl"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    // The benchmark's peer: TUN and UDP in user space too.
    ("wireguard-go", "wireguard-go"),
    ("wg", "wireguard-tools"),
    // DNS: the tests' authoritative server and the benchmark's peer
    // (dnsmasq-base: the binary without a system service), the client
    // tools, and the load generator.
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("dnsperf", "dnsperf"),
    // Packet counters and drops in the Monitor's tests.
    ("nft", "nftables"),
    // The test network's router finishes checksums toward the overlay
    // host, as a NIC would (see `Topology::build`).
    ("ethtool", "ethtool"),
    // The C cross compiler the Windows type-check needs.
    ("x86_64-w64-mingw32-gcc", "gcc-mingw-w64-x86-64"),
    // The check of the systemd unit `cargo xtask install` writes.
    ("systemd-analyze", "systemd"),
    // The web page's tests drive a headless browser.
    ("chromium", "chromium"),
    // libFuzzer, which the fuzz targets link, is C++.
    ("g++", "g++"),
];

struct Step {
    what: &'static str,
    done: fn() -> bool,
    install: fn() -> anyhow::Result<()>,
    /// What the user can do when the automatic install fails.
    hint: &'static str,
}

fn steps() -> Vec<Step> {
    vec![
        Step {
            what: "nightly Rust toolchain (builds the kernel programs)",
            done: || run_quiet("rustup", &["run", "nightly", "rustc", "--version"]),
            install: || {
                run_loud(
                    "rustup",
                    &["toolchain", "install", "nightly", "--profile", "minimal"],
                )
            },
            hint: "install it with `rustup toolchain install nightly`",
        },
        Step {
            what: "rust-src for the nightly (core for the BPF target)",
            done: || nightly_sysroot().is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").exists()),
            install: || {
                run_loud(
                    "rustup",
                    &["component", "add", "rust-src", "--toolchain", "nightly"],
                )
            },
            hint: "install it with `rustup component add rust-src --toolchain nightly`",
        },
        Step {
            what: "bpf-linker 0.10.4 (links BPF objects with the nightly's own LLVM)",
            done: || {
                Command::new("bpf-linker")
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
            },
            install: || {
                run_loud(
                    "cargo",
                    &[
                        "install",
                        "bpf-linker",
                        "--version",
                        BPF_LINKER_VERSION,
                        "--locked",
                        "--force",
                    ],
                )
            },
            hint: "install it with `cargo install bpf-linker --version 0.10.4 --locked` (it needs about 3 minutes)",
        },
        Step {
            what: "the Windows target (the broker library is type-checked for it)",
            done: || target_installed(WINDOWS_TARGET),
            install: || run_loud("rustup", &["target", "add", WINDOWS_TARGET]),
            hint: "install it with `rustup target add x86_64-pc-windows-gnu`",
        },
        Step {
            what: "the WebAssembly target (builds the overlay modules in overlays/modules)",
            done: || target_installed(WASM_TARGET),
            install: || run_loud("rustup", &["target", "add", WASM_TARGET]),
            hint: "install it with `rustup target add wasm32-unknown-unknown`",
        },
        Step {
            what: "test and benchmark tools (iproute2, curl, iputils-ping, python3, iperf3, sockperf, wireguard-go, dnsmasq, dig, dnsperf, nftables, ethtool, mingw-w64)",
            done: || missing_tools().is_empty(),
            install: install_debian_packages,
            hint: "install the Debian packages iproute2 curl iputils-ping python3 iperf3 sockperf wireguard-go wireguard-tools \
                   dnsmasq-base bind9-dnsutils dnsperf nftables gcc-mingw-w64-x86-64",
        },
    ]
}

/// Whether every step is already done (cheap; no installs).
pub fn complete() -> bool {
    steps().iter().all(|step| (step.done)())
}

pub fn run() -> anyhow::Result<()> {
    for step in steps() {
        if (step.done)() {
            println!("setup: ok       {}", step.what);
            continue;
        }
        println!("setup: missing  {}: installing", step.what);
        if let Err(e) = (step.install)() {
            bail!(
                "setup failed at: {}\n  cause: {e:#}\n  to fix: {}",
                step.what,
                step.hint
            );
        }
        if !(step.done)() {
            bail!(
                "setup failed at: {}\n  the install ran but the check still fails\n  to fix: {}",
                step.what,
                step.hint
            );
        }
        println!("setup: ok       {}", step.what);
    }
    Ok(())
}

/// Runs setup when anything is missing.
pub fn ensure() -> anyhow::Result<()> {
    if complete() {
        return Ok(());
    }
    println!("Some of what Oasis needs is missing; running `cargo xtask setup` first.");
    run()
}

fn nightly_sysroot() -> Option<PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

fn missing_tools() -> Vec<&'static str> {
    let mut packages: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| *package)
        .collect();
    packages.dedup();
    packages
}

fn install_debian_packages() -> anyhow::Result<()> {
    apt_install(&missing_tools())
}

/// A tool only some tasks need (`perf` for `bench --profile`): installed
/// the first time one asks for it, not by every setup.
pub fn ensure_optional(tool: &str, package: &str) -> anyhow::Result<()> {
    if on_path(tool) {
        return Ok(());
    }
    println!("setup: missing  {tool} ({package}): installing");
    apt_install(&[package])
        .with_context(|| format!("{tool} is needed here; install the Debian package {package}"))
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if !on_path("apt-get") {
        bail!(
            "no apt-get on this machine; install these packages yourself: {}",
            packages.join(" ")
        );
    }
    if !crate::is_root() {
        bail!("installing packages needs root; run `sudo cargo xtask setup`");
    }
    run_loud("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(packages);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", packages.join(" "));
    }
    Ok(())
}

pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

fn run_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_loud(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
