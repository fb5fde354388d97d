//! `cargo xtask install | uninstall`: Oasis as a system service. The
//! binaries go to `PREFIX/bin`, the systemd unit to /etc/systemd/system,
//! shell completions where bash, zsh and fish look; every file written is
//! listed in a manifest, and uninstall removes exactly those. The config
//! file and the state (/etc/oasis, /var/lib/oasis) are the user's: kept,
//! unless `--purge`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The programs installed: the daemon and CLI, and the overlay toolkit.
pub const PROGRAMS: &[&str] = &["oasis", "oasis-exit", "oasis-relay"];
const UNIT: &str = include_str!("../../packaging/oasis.service");
const UNIT_PATH: &str = "etc/systemd/system/oasis.service";
/// A manifest line naming a directory install made.
const DIR: &str = "dir ";
/// What the daemon keeps; removed by `--purge` only.
const USER_DATA: &[&str] = &["etc/oasis", "var/lib/oasis"];

/// Where things go: `root` is `/` on a host, a directory when staging.
pub struct Layout {
    pub root: PathBuf,
    pub prefix: PathBuf,
}

impl Layout {
    fn bin_dir(&self) -> PathBuf {
        self.prefix.join("bin")
    }

    /// A path under the root.
    fn at(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    fn manifest(&self) -> PathBuf {
        self.at(&self.prefix.join("share/oasis/installed-files"))
    }

    fn completions(&self) -> [(&'static str, PathBuf); 3] {
        let share = self.prefix.join("share");
        [
            ("bash", share.join("bash-completion/completions/oasis")),
            ("zsh", share.join("zsh/site-functions/_oasis")),
            ("fish", share.join("fish/vendor_completions.d/oasis.fish")),
        ]
    }
}

/// The unit file for binaries in `bin_dir`.
pub fn unit(bin_dir: &Path) -> String {
    UNIT.replace("@BINDIR@", &bin_dir.to_string_lossy())
}

/// Writes everything from the built programs in `built` (a directory
/// holding `oasis`, `oasis-exit`, `oasis-relay`); returns the files written
/// (as they are on the target system).
pub fn install_files(layout: &Layout, built: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    // Directories that were not there before: uninstall takes them away
    // again once empty.
    let mut created: Vec<PathBuf> = Vec::new();
    let mut write = |path: PathBuf, bytes: &[u8], mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let target = layout.at(&path);
        let mut missing = path.parent().map(Path::to_path_buf);
        // The root itself is never Oasis' to remove, even when staging
        // into a directory that install made.
        while let Some(dir) = missing.filter(|d| d.parent().is_some()) {
            if layout.at(&dir).exists() {
                break;
            }
            if !created.contains(&dir) {
                created.push(dir.clone());
            }
            missing = dir.parent().map(Path::to_path_buf);
        }
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // A running binary cannot be overwritten in place: write beside it
        // and rename over it.
        let staging = target.with_extension("oasis-new");
        std::fs::write(&staging, bytes).with_context(|| format!("writing {}", staging.display()))?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staging, &target).with_context(|| format!("installing {}", target.display()))?;
        println!("install: {}", path.display());
        written.push(path);
        Ok(())
    };
    for program in PROGRAMS {
        let source = built.join(program);
        let bytes =
            std::fs::read(&source).with_context(|| format!("reading the built {}", source.display()))?;
        write(layout.bin_dir().join(program), &bytes, 0o755)?;
    }
    write(
        PathBuf::from("/").join(UNIT_PATH),
        unit(&layout.bin_dir()).as_bytes(),
        0o644,
    )?;
    for (shell, path) in layout.completions() {
        let script = Command::new(built.join("oasis"))
            .args(["completions", shell])
            .output()
            .with_context(|| format!("running oasis completions {shell}"))?;
        if !script.status.success() {
            bail!(
                "oasis completions {shell} failed: {}",
                String::from_utf8_lossy(&script.stderr)
            );
        }
        write(path, &script.stdout, 0o644)?;
    }
    let manifest = layout.manifest();
    // An upgrade keeps the directories the first install made.
    let earlier = std::fs::read_to_string(&manifest).unwrap_or_default();
    let mut listed: Vec<String> = earlier
        .lines()
        .filter(|l| l.starts_with(DIR))
        .map(String::from)
        .collect();
    let manifest_path = layout.prefix.join("share/oasis/installed-files");
    let mut missing = manifest_path.parent().map(Path::to_path_buf);
    while let Some(dir) = missing.filter(|d| d.parent().is_some() && !layout.at(d).exists()) {
        created.push(dir.clone());
        missing = dir.parent().map(Path::to_path_buf);
    }
    listed.extend(created.iter().map(|d| format!("{DIR}{}", d.display())));
    listed.extend(written.iter().map(|p| p.display().to_string()));
    listed.push(
        layout
            .prefix
            .join("share/oasis/installed-files")
            .display()
            .to_string(),
    );
    listed.dedup();
    if let Some(dir) = manifest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&manifest, listed.join("\n") + "\n")
        .with_context(|| format!("writing {}", manifest.display()))?;
    Ok(written)
}

/// Removes what the manifest lists, and directories left empty by that;
/// with `purge`, the config and state too. Returns what was removed.
pub fn uninstall_files(layout: &Layout, purge: bool) -> anyhow::Result<Vec<PathBuf>> {
    let manifest = layout.manifest();
    let listed = match std::fs::read_to_string(&manifest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "nothing to uninstall: no {} (was Oasis installed with `cargo xtask install`?)",
                manifest.display()
            )
        }
        Err(e) => return Err(e).context(format!("reading {}", manifest.display())),
    };
    let mut removed = Vec::new();
    let mut directories: Vec<PathBuf> = Vec::new();
    for line in listed.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(dir) = line.strip_prefix(DIR) {
            directories.push(PathBuf::from(dir.trim()));
            continue;
        }
        let path = PathBuf::from(line.trim());
        // Only what install writes: a tampered manifest removes nothing else.
        let ours = PROGRAMS.iter().any(|p| path == layout.bin_dir().join(p))
            || path == Path::new("/").join(UNIT_PATH)
            || layout.completions().iter().any(|(_, c)| *c == path)
            || path == layout.prefix.join("share/oasis/installed-files");
        if !ours {
            eprintln!(
                "uninstall: skipping {} (not a file Oasis installs)",
                path.display()
            );
            continue;
        }
        match std::fs::remove_file(layout.at(&path)) {
            Ok(()) => {
                println!("remove: {}", path.display());
                removed.push(path.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("removing {}", path.display())),
        }
    }
    // The directories install made, deepest first, if nothing else moved in.
    directories.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in directories {
        if std::fs::remove_dir(layout.at(&dir)).is_ok() {
            println!("remove: {}/", dir.display());
        }
    }
    if purge {
        for data in USER_DATA {
            let path = layout.root.join(data);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
                println!("remove: /{data}");
                removed.push(PathBuf::from("/").join(data));
            }
        }
    }
    Ok(removed)
}

fn systemd_running(layout: &Layout) -> bool {
    layout.root == Path::new("/") && Path::new("/run/systemd/system").exists()
}

fn systemctl(args: &[&str]) {
    match Command::new("systemctl").args(args).status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("systemctl {}: {status}", args.join(" ")),
        Err(e) => eprintln!("systemctl {}: {e}", args.join(" ")),
    }
}

pub fn install(root: &Path, prefix: &Path) -> anyhow::Result<()> {
    if root == Path::new("/") && !crate::is_root() {
        bail!(
            "installing into {} needs root: `sudo -E cargo xtask install`",
            prefix.display()
        );
    }
    let oasis = crate::build_oasis(true)?;
    let built = oasis.parent().expect("target/release").to_path_buf();
    let layout = Layout {
        root: root.to_path_buf(),
        prefix: prefix.to_path_buf(),
    };
    install_files(&layout, &built)?;
    if systemd_running(&layout) {
        systemctl(&["daemon-reload"]);
        println!(
            "\nOasis is installed. Start it now and at every boot:\n  sudo systemctl enable --now oasis"
        );
        println!("Its log: journalctl -u oasis -f     Its page: sudo oasis ui");
    } else {
        println!("\nOasis is installed (no systemd running here: start `oasis run` yourself).");
    }
    Ok(())
}

pub fn uninstall(root: &Path, prefix: &Path, purge: bool) -> anyhow::Result<()> {
    if root == Path::new("/") && !crate::is_root() {
        bail!(
            "uninstalling from {} needs root: `sudo -E cargo xtask uninstall`",
            prefix.display()
        );
    }
    let layout = Layout {
        root: root.to_path_buf(),
        prefix: prefix.to_path_buf(),
    };
    if systemd_running(&layout) {
        systemctl(&["disable", "--now", "oasis"]);
    }
    uninstall_files(&layout, purge)?;
    if systemd_running(&layout) {
        systemctl(&["daemon-reload"]);
    }
    if !purge {
        println!("kept /etc/oasis and /var/lib/oasis (your config and state); `--purge` removes them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `dir`, relative to it.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path.clone());
                }
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
        found.sort();
        found
    }

    /// Stands in for the built programs: `oasis completions` must answer.
    fn fake_build(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        for program in PROGRAMS {
            let path = dir.join(program);
            std::fs::write(&path, "#!/bin/sh\necho \"# completion for $2\"\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn install_then_uninstall_leaves_the_root_as_it_was() {
        let base = std::env::temp_dir().join(format!("oasis-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, built) = (base.join("root"), base.join("built"));
        fake_build(&built);
        // What the system had before: the prefix's bin and a user's config.
        std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
        std::fs::write(root.join("usr/local/bin/other-tool"), "x").unwrap();
        std::fs::create_dir_all(root.join("etc/oasis")).unwrap();
        std::fs::write(root.join("etc/oasis/config.yaml"), "rules: []\n").unwrap();
        let before = files(&root);

        let layout = Layout {
            root: root.clone(),
            prefix: PathBuf::from("/usr/local"),
        };
        let written = install_files(&layout, &built).unwrap();
        assert_eq!(written.len(), 3 + 1 + 3);
        let unit_text = std::fs::read_to_string(root.join(UNIT_PATH)).unwrap();
        assert!(unit_text.contains("ExecStart=/usr/local/bin/oasis --config /etc/oasis/config.yaml run"));
        let bash =
            std::fs::read_to_string(root.join("usr/local/share/bash-completion/completions/oasis")).unwrap();
        assert!(bash.contains("completion for bash"));
        // Installing again (an upgrade) writes the same files.
        install_files(&layout, &built).unwrap();

        let removed = uninstall_files(&layout, false).unwrap();
        assert_eq!(removed.len(), written.len() + 1, "the files and the manifest");
        assert_eq!(
            files(&root),
            before,
            "nothing left behind, the user's config kept"
        );
        assert!(
            uninstall_files(&layout, false)
                .unwrap_err()
                .to_string()
                .contains("nothing to uninstall")
        );

        install_files(&layout, &built).unwrap();
        uninstall_files(&layout, true).unwrap();
        assert!(!root.join("etc/oasis").exists(), "--purge takes the config");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_tampered_manifest_removes_nothing_oasis_did_not_install() {
        let base = std::env::temp_dir().join(format!("oasis-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let layout = Layout {
            root: root.clone(),
            prefix: PathBuf::from("/usr/local"),
        };
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0").unwrap();
        let manifest = layout.manifest();
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::write(&manifest, "/etc/passwd\n/usr/local/share/oasis/installed-files\n").unwrap();
        uninstall_files(&layout, false).unwrap();
        assert!(root.join("etc/passwd").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// systemd's own check of the unit (Debian's `systemd` package, which
    /// setup installs): directives, and the binary it starts.
    #[test]
    fn the_unit_passes_systemd_analyze_verify() {
        let dir = std::env::temp_dir().join(format!("oasis-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        fake_build(&dir.join("bin"));
        let unit_path = dir.join("oasis.service");
        std::fs::write(&unit_path, unit(&dir.join("bin"))).unwrap();
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .expect("systemd-analyze (cargo xtask setup installs it)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Units it refers to that this machine lacks are not the unit's fault.
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("network-online.target") && !l.contains("multi-user.target"))
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(output.status.success() && problems.is_empty(), "{stderr}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
