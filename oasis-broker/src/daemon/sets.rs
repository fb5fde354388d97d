//! The daemon's copies of prefix sets, in `sets/` beside the config file.
//!
//! A `--dst-set` rule's file is sent whole by the CLI and kept here, so
//! the rule survives the user moving or editing their file, and the config
//! file names a set the daemon can always read (`dst_set: sets/nl.txt`).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::control::SetUpload;
use crate::prefix_set::PrefixSet;

/// The directory copies live in, and the prefix of the paths the config
/// file gives them.
const DIR: &str = "sets";

#[derive(Debug, thiserror::Error)]
#[error("cannot keep the prefix set in {path}: {source}")]
pub(super) struct KeepError {
    path: PathBuf,
    source: std::io::Error,
}

/// Writes `upload`'s text under a name of its own in `sets/` and returns
/// `set` as kept there. The file is complete before it is visible.
pub(super) fn keep(config_path: &Path, upload: &SetUpload, set: PrefixSet) -> Result<PrefixSet, KeepError> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let dir = base.join(DIR);
    let at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeepError { path, source }
    };
    // Two requests at once must not pick the same free name.
    static NAMING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _naming = NAMING.lock().unwrap_or_else(|e| e.into_inner());
    std::fs::create_dir_all(&dir).map_err(at(&dir))?;
    let name = free_name(&dir, &file_name(&upload.name));
    let path = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    let mut file = std::fs::File::create(&partial).map_err(at(&partial))?;
    file.write_all(upload.text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(at(&partial))?;
    std::fs::rename(&partial, &path).map_err(at(&path))?;
    Ok(set.kept_in(format!("{DIR}/{name}")))
}

/// Removes a copy no rule uses any more. Sets the user keeps elsewhere
/// (a config file may name any path) are left alone.
pub(super) fn forget(config_path: &Path, file: &str) {
    let Some(name) = file.strip_prefix(&format!("{DIR}/")) else {
        return;
    };
    if name.contains('/') || name.starts_with('.') {
        return;
    }
    let base = config_path.parent().unwrap_or(Path::new("."));
    let path = base.join(DIR).join(name);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "removing an unused prefix set: {e}");
    }
}

/// A safe file name from the user's: letters, digits, '.', '-' and '_'.
fn file_name(given: &str) -> String {
    let name: String = given
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let name = name.trim_start_matches('.');
    if name.is_empty() {
        "prefixes.txt".into()
    } else {
        name.into()
    }
}

/// `name`, or `stem-2.ext`, `stem-3.ext`, ... when taken.
fn free_name(dir: &Path, name: &str) -> String {
    if !dir.join(name).exists() {
        return name.into();
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, format!(".{ext}")),
        _ => (name, String::new()),
    };
    (2..)
        .map(|n| format!("{stem}-{n}{ext}"))
        .find(|candidate| !dir.join(candidate).exists())
        .expect("some number is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_safe_and_never_overwrite() {
        assert_eq!(file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(file_name(".hidden"), "hidden");
        assert_eq!(file_name("nl ipv4.txt"), "nl_ipv4.txt");
        assert_eq!(file_name(""), "prefixes.txt");

        let dir = std::env::temp_dir().join(format!("oasis-sets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        let upload = |text: &str| SetUpload {
            name: "nl.txt".into(),
            text: text.into(),
        };
        let set = |text: &str| PrefixSet::parse("nl.txt", text).unwrap();
        let first = keep(&config, &upload("10.0.0.0/8\n"), set("10.0.0.0/8\n")).unwrap();
        let second = keep(&config, &upload("192.0.2.0/24\n"), set("192.0.2.0/24\n")).unwrap();
        assert_eq!(first.file(), "sets/nl.txt");
        assert_eq!(second.file(), "sets/nl-2.txt");
        assert_eq!(
            std::fs::read_to_string(dir.join("sets/nl.txt")).unwrap(),
            "10.0.0.0/8\n"
        );
        forget(&config, "sets/nl.txt");
        forget(&config, "/etc/hostname");
        assert!(!dir.join("sets/nl.txt").exists());
        assert!(dir.join("sets/nl-2.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
