//! Lists fetched by URL (`rule_list.rs`), kept current: downloading one
//! (conditionally, so an unchanged list costs a 304 and nothing else),
//! checking it off every lock, keeping the last good copy beside the
//! config file, and when each list is due again. The swap into the rules
//! is `state.rs`'s (one commit, like any rule change).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{LISTS_DIR, list_content};
use crate::control::ListView;
use crate::overlay::fetch::{Fetched, Validators, fetch_if_changed};
use crate::rule_list::{ListContent, ListSource, MAX_LIST_BYTES, every_text};

/// A download has this long in all.
const DOWNLOAD_TIME: Duration = Duration::from_secs(60);

/// A list whose last refresh failed is tried again this soon (or at its
/// interval, when that is shorter).
const RETRY: Duration = Duration::from_secs(300);

/// What the daemon knows of one list rule's list.
#[derive(Clone, Debug, Default)]
pub(super) struct ListStatus {
    /// When the copy in effect was last found current (downloaded, or
    /// confirmed unchanged).
    pub fetched: Option<SystemTime>,
    /// When a refresh last ended, well or not.
    pub checked: Option<SystemTime>,
    /// Why the last refresh failed; the last good copy stays in effect.
    pub error: Option<String>,
    pub validators: Validators,
    /// How long the last new copy took from downloaded to in effect.
    pub last_change_ms: Option<u64>,
}

impl ListStatus {
    pub fn due(&self, every: Duration, now: SystemTime) -> bool {
        let since = |at: Option<SystemTime>| {
            at.map_or(Duration::MAX, |at| now.duration_since(at).unwrap_or_default())
        };
        if self.error.is_some() {
            return since(self.checked) >= every.min(RETRY);
        }
        since(self.fetched) >= every
    }

    pub fn view(&self, source: &ListSource, file: &str, entries: usize, now: SystemTime) -> ListView {
        let age = |at: Option<SystemTime>| at.map(|at| now.duration_since(at).unwrap_or_default().as_secs());
        ListView {
            url: source.url.clone(),
            kind: source.kind.to_string(),
            every: every_text(source.every),
            file: file.to_string(),
            entries,
            fetched_secs_ago: age(self.fetched),
            checked_secs_ago: age(self.checked),
            error: self.error.clone(),
            last_change_ms: self.last_change_ms,
        }
    }
}

/// What is kept beside a list's copy, so a restarted daemon asks the
/// server "changed since?" rather than downloading again.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Kept {
    url: String,
    #[serde(flatten)]
    validators: Validators,
    /// Seconds since the Unix epoch.
    fetched: u64,
}

fn meta_path(base: &Path, file: &str) -> PathBuf {
    base.join(format!("{file}.json"))
}

/// The status a list starts with: from what was kept beside its copy, if
/// that is the same list's.
pub(super) fn kept_status(config_path: &Path, source: &ListSource, file: &str) -> ListStatus {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let kept: Option<Kept> = std::fs::read_to_string(meta_path(base, file))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .filter(|k: &Kept| k.url == source.url && base.join(file).exists());
    match kept {
        Some(kept) => ListStatus {
            fetched: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(kept.fetched)),
            validators: kept.validators,
            ..ListStatus::default()
        },
        None => ListStatus::default(),
    }
}

/// What a refresh found.
pub(super) enum Refreshed {
    Unchanged,
    Changed {
        content: ListContent,
        text: String,
        /// When the download was complete (its check and parse follow).
        received: std::time::Instant,
    },
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ListFetchError {
    #[error(transparent)]
    Fetch(#[from] crate::overlay::fetch::FetchError),
    #[error(transparent)]
    Rule(#[from] crate::rules::RuleError),
    #[error(transparent)]
    List(#[from] crate::rule_list::ListError),
}

/// Downloads `source` if it changed since `since`, and checks it: digest,
/// text, every line. Parsing runs off the async threads.
pub(super) async fn download(
    source: &ListSource,
    file: &str,
    since: &Validators,
) -> Result<(Refreshed, Validators), ListFetchError> {
    let (body, validators) = match fetch_if_changed(&source.url, MAX_LIST_BYTES, DOWNLOAD_TIME, since).await?
    {
        Fetched::NotModified => return Ok((Refreshed::Unchanged, since.clone())),
        Fetched::Changed { body, validators } => (body, validators),
    };
    let received = std::time::Instant::now();
    source.check_digest(&body)?;
    let text = String::from_utf8(body).map_err(|_| crate::rule_list::ListError::NotText {
        url: source.url.clone(),
    })?;
    let (source, file) = (source.clone(), file.to_string());
    let parsed = tokio::task::spawn_blocking(move || {
        let content = list_content(source, file, Some(&text));
        content.map(|content| (content, text))
    })
    .await
    .map_err(|e| crate::rule_list::ListError::NotText { url: e.to_string() })?;
    let (content, text) = parsed?;
    Ok((
        Refreshed::Changed {
            content,
            text,
            received,
        },
        validators,
    ))
}

/// Where a new list rule keeps its copy.
pub(super) fn file_for(source: &ListSource) -> String {
    format!("{LISTS_DIR}/{}", source.file_name())
}

/// Writes a list's copy and what to ask its server next time; each file
/// is complete before it is visible.
pub(super) fn keep(
    config_path: &Path,
    file: &str,
    text: Option<&str>,
    url: &str,
    validators: &Validators,
    fetched: SystemTime,
) -> std::io::Result<()> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(base.join(LISTS_DIR))?;
    if let Some(text) = text {
        write_whole(&base.join(file), text.as_bytes())?;
    }
    let kept = Kept {
        url: url.to_string(),
        validators: validators.clone(),
        fetched: fetched
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    };
    write_whole(
        &meta_path(base, file),
        serde_json::to_string(&kept).unwrap_or_default().as_bytes(),
    )
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.partial"));
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

/// Removes a deleted list rule's copy.
pub(super) fn forget(config_path: &Path, file: &str) {
    let base = config_path.parent().unwrap_or(Path::new("."));
    if !file.starts_with(&format!("{LISTS_DIR}/")) || file.contains("..") {
        return;
    }
    let _ = std::fs::remove_file(base.join(file));
    let _ = std::fs::remove_file(meta_path(base, file));
}

/// Each list rule's status, by rule id.
pub(super) type ListStatuses = HashMap<u32, ListStatus>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_due_at_its_interval_and_sooner_after_a_failure() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let every = Duration::from_secs(3600);
        assert!(ListStatus::default().due(every, now), "never fetched");
        let fresh = ListStatus {
            fetched: Some(now - Duration::from_secs(60)),
            ..ListStatus::default()
        };
        assert!(!fresh.due(every, now));
        assert!(fresh.due(every, now + every));
        let failed = ListStatus {
            error: Some("cannot connect".into()),
            checked: Some(now - Duration::from_secs(60)),
            ..fresh.clone()
        };
        assert!(!failed.due(every, now));
        assert!(
            failed.due(every, now + RETRY),
            "a failure is retried before the interval"
        );
    }

    #[test]
    fn kept_copies_are_whole_and_carry_their_validators() {
        let dir = std::env::temp_dir().join(format!("oasis-lists-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        let source = ListSource::parse("https://lists.example/ads.txt", "suffix", None, None).unwrap();
        let file = file_for(&source);
        let validators = Validators {
            etag: Some("\"v1\"".into()),
            last_modified: None,
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        keep(
            &config,
            &file,
            Some("example.org\n"),
            &source.url,
            &validators,
            at,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(&file)).unwrap(), "example.org\n");
        let status = kept_status(&config, &source, &file);
        assert_eq!(status.validators, validators);
        assert_eq!(status.fetched, Some(at));
        // Another list under the same file name is not taken for this one.
        let other = ListSource::parse("https://elsewhere.example/ads.txt", "suffix", None, None).unwrap();
        assert!(kept_status(&config, &other, &file).fetched.is_none());
        forget(&config, &file);
        assert!(!dir.join(&file).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
