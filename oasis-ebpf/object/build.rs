//! Builds the kernel programs (oasis-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes!`. `cargo xtask setup` installs what this needs.
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return Ok(());
    }
    // Builds that never load the programs (the fuzz targets, built with
    // sanitizer flags the BPF target cannot take) get an empty object.
    println!("cargo:rerun-if-env-changed=OASIS_NO_KERNEL_OBJECT");
    if std::env::var_os("OASIS_NO_KERNEL_OBJECT").is_some() {
        let out = PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("oasis-ebpf"), [])?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("..").canonicalize()?;
    // The object is named after the programs' binary target there.
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("Cargo.toml").display());
    // The programs' maps, layouts and constants live in oasis-common: a
    // change there alone must rebuild the object too (a map's size in the
    // object and in the broker's table would differ otherwise).
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("../oasis-common/src").display()
    );
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let package = aya_build::Package {
        name: "oasis-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).map_err(|e| {
        anyhow::anyhow!(
            "building the kernel programs failed: {e:#}\n\
             They need the nightly toolchain with rust-src and bpf-linker; \
             `cargo xtask setup` installs both."
        )
    })
}
