use std::path::PathBuf;

/// Rebuild the kernel object whenever the BPF linker changes, since it decides
/// what ends up in the object (BTF, relocations).
fn main() {
    let bpf_linker = which::which("bpf-linker").unwrap_or_else(|_| PathBuf::from("bpf-linker"));
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
