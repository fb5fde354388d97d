//! `cargo xtask fuzz`: every fuzz target of `fuzz/` (cargo-fuzz on the
//! nightly), each for a bounded time, from the corpus kept in the repo;
//! first, every input that ever crashed one (`fuzz/regressions/<target>/`)
//! is replayed, so a fixed crash stays fixed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// The targets, and what each covers.
pub const TARGETS: &[(&str, &str)] = &[
    ("packet", "packet reader and rewriter, checked against etherparse"),
    ("compile", "classifier compiler: map image against first match"),
    (
        "dns",
        "upstream answers: alias chains, sections, claimed addresses",
    ),
    (
        "dns_wire",
        "the DNS threads' reading of queries and answers, against hickory's",
    ),
    ("spec", "overlay specifications"),
    ("config", "the config file"),
    ("control", "the control protocol"),
    ("exit", "the exit node's NAT both ways, replies to what left"),
];

pub fn run(seconds: u32) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    if !Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("fuzz: installing cargo-fuzz");
        let status = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .context("running cargo install")?;
        if !status.success() {
            bail!(
                "installing cargo-fuzz failed; install it with `cargo install cargo-fuzz --locked` and try again"
            );
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fuzz = root.join("fuzz");
    for (target, what) in TARGETS {
        let regressions = fuzz.join("regressions").join(target);
        let crashed = regressions
            .read_dir()
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))));
        if crashed {
            eprintln!("fuzz: {target}: replaying the inputs that once crashed it");
            cargo_fuzz(
                &fuzz,
                target,
                &[regressions.to_str().context("path")?],
                &["-runs=0"],
            )?;
        }
        eprintln!("fuzz: {target} ({what}), {seconds} s");
        // New inputs go to a scratch directory; the repo's corpus is read.
        let scratch = root.join("target").join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        // A target without a kept corpus starts from nothing rather than
        // failing on a missing directory.
        let corpus = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        cargo_fuzz(
            &fuzz,
            target,
            &[
                scratch.to_str().context("path")?,
                corpus.to_str().context("path")?,
            ],
            &[&format!("-max_total_time={seconds}")],
        )?;
    }
    Ok(())
}

fn cargo_fuzz(dir: &Path, target: &str, corpora: &[&str], options: &[&str]) -> anyhow::Result<()> {
    let artifacts = dir.join("artifacts").join(target);
    let found = || -> std::collections::BTreeSet<std::path::PathBuf> {
        artifacts
            .read_dir()
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let before = found();
    let status = Command::new("cargo")
        .current_dir(dir)
        .env("OASIS_NO_KERNEL_OBJECT", "1")
        .args(["+nightly", "fuzz", "run", "-O", target])
        .args(corpora)
        .arg("--")
        .args(options)
        .status()
        .context("running cargo fuzz")?;
    if status.success() {
        return Ok(());
    }
    let new: Vec<_> = found().difference(&before).cloned().collect();
    match new.first() {
        Some(input) => bail!(
            "fuzz target {target} failed on {}: `cargo +nightly fuzz fmt {target} <file>` shows the \
             input. Fix the bug, copy the input into fuzz/regressions/{target}/ so it is replayed from \
             now on, and add a unit test.",
            input.display()
        ),
        // No input was saved: the target did not build or run (see cargo's
        // messages above), which is no finding of the fuzzer.
        None => bail!("fuzz target {target} did not build or run; cargo's messages above say why"),
    }
}
