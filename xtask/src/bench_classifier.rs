//! The classifier's cost per check (oasis-broker/benches/classifier.rs):
//! built and run by cargo, its figures read from what it prints. xtask
//! does not link the broker, so it builds on a machine where `cargo xtask
//! setup` has not yet installed what the kernel programs need.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::bench_common::Figure;

pub fn run(repeat: u32) -> anyhow::Result<Vec<Figure>> {
    let output = Command::new(env!("CARGO"))
        .args([
            "bench",
            "--quiet",
            "--package",
            "oasis-broker",
            "--bench",
            "classifier",
            "--",
        ])
        .args(["--repeat", &repeat.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    if !output.status.success() {
        bail!(
            "the classifier's bench failed ({}); what it printed is above",
            output.status
        );
    }
    let figures = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("a figure of the classifier's bench: {line}"))
        })
        .collect::<anyhow::Result<Vec<Figure>>>()?;
    if figures.is_empty() {
        bail!("the classifier's bench printed no figure");
    }
    Ok(figures)
}
