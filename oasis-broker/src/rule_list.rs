//! Rule lists by URL: a rule whose prefixes or names are a list someone
//! publishes (a country's prefixes, a service's or an ad network's
//! domains) that the daemon fetches again every so often. Here: what a
//! list rule says about its source, the list formats read, and the check
//! of a download against a pinned digest. The daemon does the fetching
//! and the swapping (`daemon/lists.rs`).
//!
//! Formats read: one entry per line; blank lines and lines starting with
//! `#`, `!` or `//` skipped. Prefix lists (`cidr`): an address or prefix a
//! line. Name lists: a name a line, also as a hosts file writes it
//! (`0.0.0.0 ads.example.com`); suffix lists also take `*.example.com`,
//! `+.example.com` and `.example.com` (the forms Clash and dnsmasq lists
//! use) and `domain:` / `full:` prefixes (v2ray's text form). Not read:
//! Adblock filter syntax (`||example.com^`), mihomo's binary `.mrs` and
//! sing-box's `.srs` rule sets, YAML or JSON rule-provider payloads.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;

use crate::name_pattern::{NameError, NamePattern};

/// The largest list the daemon downloads: a full-table prefix list or a
/// million-name block list fits.
pub const MAX_LIST_BYTES: usize = 32 * 1024 * 1024;

/// The most entries one name list may hold.
pub const MAX_LIST_NAMES: usize = 1_000_000;

/// The longest line a list may have (a name is at most 253 bytes, a
/// regular expression rarely a hundred): a longer one is not a list.
pub const MAX_LINE: usize = 4096;

/// Refuses text with a line longer than [`MAX_LINE`] before anything
/// reads its lines (or quotes one in an error).
pub fn check_lines(url: &str, text: &str) -> Result<(), ListError> {
    match text.lines().position(|line| line.len() > MAX_LINE) {
        Some(index) => Err(ListError::LongLine {
            url: url.to_string(),
            line: index + 1,
        }),
        None => Ok(()),
    }
}

/// Checks a kept copy's path as a config file gives it: `lists/NAME`.
pub fn check_file(file: &str) -> Result<(), ListError> {
    let name = file.strip_prefix("lists/").unwrap_or("");
    let safe = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if safe {
        Ok(())
    } else {
        Err(ListError::BadFile(file.to_string()))
    }
}

/// How often lists are fetched again unless the rule says: once a day.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Refreshes more often than this would only load the list's server.
pub const MIN_EVERY: Duration = Duration::from_secs(60);

/// What each line of a list is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListKind {
    Cidr,
    Suffix,
    Exact,
    Keyword,
    Regex,
}

impl ListKind {
    /// A name list's entry as a pattern (a prefix list has none).
    fn pattern(self, text: String) -> Option<NamePattern> {
        match self {
            ListKind::Exact => Some(NamePattern::Exact(text)),
            ListKind::Suffix => Some(NamePattern::Suffix(text)),
            ListKind::Keyword => Some(NamePattern::Keyword(text)),
            ListKind::Regex => Some(NamePattern::Regex(text)),
            ListKind::Cidr => None,
        }
    }
}

impl FromStr for ListKind {
    type Err = ListError;
    fn from_str(s: &str) -> Result<ListKind, ListError> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "cidr" => ListKind::Cidr,
            "suffix" => ListKind::Suffix,
            "exact" => ListKind::Exact,
            "keyword" => ListKind::Keyword,
            "regex" => ListKind::Regex,
            _ => return Err(ListError::BadKind(s.to_string())),
        })
    }
}

impl fmt::Display for ListKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListKind::Cidr => "cidr",
            ListKind::Suffix => "suffix",
            ListKind::Exact => "exact",
            ListKind::Keyword => "keyword",
            ListKind::Regex => "regex",
        })
    }
}

/// Where a list rule's entries come from, and how it keeps them current.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListSource {
    pub url: String,
    pub kind: ListKind,
    pub every: Duration,
    /// The download must have this SHA-256 (lower-case hex): a list
    /// pinned to one version, which a refresh can then only confirm.
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("unknown list kind {0:?}: use cidr, suffix, exact, keyword or regex")]
    BadKind(String),
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("bad refresh interval {0:?}: give a number with s, m, h or d (30m, 24h, 7d), at least 1m")]
    BadEvery(String),
    #[error("bad SHA-256 {0:?}: give 64 hexadecimal digits, as sha256sum prints them")]
    BadDigest(String),
    #[error("{url}: the download's SHA-256 is {got}, not the {want} the rule pins")]
    DigestMismatch { url: String, got: String, want: String },
    #[error("{url} is not UTF-8 text")]
    NotText { url: String },
    #[error("{url} line {line}: {source}")]
    BadLine {
        url: String,
        line: usize,
        source: NameError,
    },
    #[error("{url} line {line} is longer than {MAX_LINE} bytes: not a list of the kind the rule says")]
    LongLine { url: String, line: usize },
    #[error(
        "list_file {0:?}: the daemon keeps lists as lists/NAME beside the config file; leave list_file out and it chooses one"
    )]
    BadFile(String),
    #[error("{url} lists no entries")]
    Empty { url: String },
    #[error("{url} lists more than {MAX_LIST_NAMES} names")]
    TooMany { url: String },
}

impl ListSource {
    /// Checks what a rule says of its list; `every` and `sha256` optional.
    pub fn parse(
        url: &str,
        kind: &str,
        every: Option<&str>,
        sha256: Option<&str>,
    ) -> Result<ListSource, ListError> {
        let url = url.trim();
        let parsed = reqwest::Url::parse(url).map_err(|_| ListError::BadUrl(url.into()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(ListError::BadUrl(url.into()));
        }
        let every = every.map(parse_every).transpose()?.unwrap_or(DEFAULT_EVERY);
        let sha256 = sha256
            .map(|hex| {
                let hex = hex.trim().to_ascii_lowercase();
                (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then_some(hex.clone())
                    .ok_or(ListError::BadDigest(hex))
            })
            .transpose()?;
        Ok(ListSource {
            url: url.to_string(),
            kind: kind.parse()?,
            every,
            sha256,
        })
    }

    /// Refuses a download whose digest is not the pinned one.
    pub fn check_digest(&self, body: &[u8]) -> Result<(), ListError> {
        let Some(want) = &self.sha256 else {
            return Ok(());
        };
        let got = hex::encode(sha2::Sha256::digest(body));
        if &got != want {
            return Err(ListError::DigestMismatch {
                url: self.url.clone(),
                got,
                want: want.clone(),
            });
        }
        Ok(())
    }

    /// A file name for the kept copy: the URL's last part, made safe, and
    /// a digest of the whole URL (two lists named alike stay apart).
    pub fn file_name(&self) -> String {
        let tail = self
            .url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("list")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect::<String>();
        let digest = hex::encode(&sha2::Sha256::digest(self.url.as_bytes())[..4]);
        format!("{}-{digest}.txt", tail.trim_start_matches('.'))
    }
}

/// `30m`, `24h`, `7d`, `90s`: at least [`MIN_EVERY`], at most a year.
pub fn parse_every(text: &str) -> Result<Duration, ListError> {
    let bad = || ListError::BadEvery(text.to_string());
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60).ok_or_else(bad)?,
        "h" => number.checked_mul(3600).ok_or_else(bad)?,
        "d" => number.checked_mul(86_400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let every = Duration::from_secs(seconds);
    if every < MIN_EVERY || every > Duration::from_secs(366 * 86_400) {
        return Err(bad());
    }
    Ok(every)
}

/// The interval as a rule writes it.
pub fn every_text(every: Duration) -> String {
    let s = every.as_secs();
    if s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A name list: every entry a pattern of the list's kind, all of them one
/// rule (one place in the rule order, one id, one counter).
#[derive(Clone, Debug)]
pub struct NameList {
    pub source: ListSource,
    /// Where the daemon keeps the last good copy, relative to the config
    /// file's directory.
    pub file: String,
    patterns: Vec<NamePattern>,
}

impl NameList {
    /// Reads a list's text; the first bad line refuses it all.
    pub fn parse(source: ListSource, file: String, text: &str) -> Result<NameList, ListError> {
        let mut patterns = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let Some(entry) = entry(source.kind, line) else {
                continue;
            };
            let Some(pattern) = source.kind.pattern(entry.to_string()) else {
                return Err(ListError::BadKind(source.kind.to_string()));
            };
            let pattern = pattern.validated().map_err(|e| ListError::BadLine {
                url: source.url.clone(),
                line: number + 1,
                source: e,
            })?;
            if patterns.len() == MAX_LIST_NAMES {
                return Err(ListError::TooMany { url: source.url });
            }
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return Err(ListError::Empty { url: source.url });
        }
        Ok(NameList {
            source,
            file,
            patterns,
        })
    }

    /// A list not fetched yet: it claims nothing.
    pub fn unfetched(source: ListSource, file: String) -> NameList {
        NameList {
            source,
            file,
            patterns: Vec::new(),
        }
    }

    pub fn patterns(&self) -> &[NamePattern] {
        &self.patterns
    }
}

/// A list is known by where it comes from: the same URL twice is one list.
impl PartialEq for NameList {
    fn eq(&self, other: &Self) -> bool {
        self.source.url == other.source.url && self.source.kind == other.source.kind
    }
}

impl Eq for NameList {}

impl std::hash::Hash for NameList {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.source.url.hash(state);
        self.source.kind.hash(state);
    }
}

impl fmt::Display for NameList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "name-{} list {} ({} entries)",
            self.source.kind,
            self.source.url,
            self.patterns.len()
        )
    }
}

/// The entry a line holds, if any: comments and blank lines hold none.
fn entry(kind: ListKind, line: &str) -> Option<&str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || line.starts_with('!') || line.starts_with("//") {
        return None;
    }
    if kind == ListKind::Regex || kind == ListKind::Keyword {
        return Some(line);
    }
    // A hosts file: an address, then the name (and maybe aliases, which
    // such lists do not use).
    let mut words = line.split_whitespace();
    let first = words.next()?;
    let name = match words.next() {
        Some(name) if first.parse::<std::net::IpAddr>().is_ok() => name,
        _ => first,
    };
    let name = name
        .strip_prefix("domain:")
        .or_else(|| name.strip_prefix("full:"))
        .unwrap_or(name);
    Some(match kind {
        ListKind::Suffix => name
            .strip_prefix("*.")
            .or_else(|| name.strip_prefix("+."))
            .or_else(|| name.strip_prefix('.'))
            .unwrap_or(name),
        _ => name,
    })
}

/// A list rule's entries, as the rule holds them.
#[derive(Clone, Debug)]
pub enum ListContent {
    Prefixes(Arc<crate::prefix_set::PrefixSet>),
    Names(Arc<NameList>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: &str) -> ListSource {
        ListSource::parse("https://lists.example/ads.txt", kind, None, None).unwrap()
    }

    #[test]
    fn sources_are_checked() {
        let s = ListSource::parse("https://lists.example/x.txt", "suffix", Some("12h"), None).unwrap();
        assert_eq!(s.every, Duration::from_secs(12 * 3600));
        assert_eq!(s.kind, ListKind::Suffix);
        assert_eq!(source("cidr").every, DEFAULT_EVERY);
        for bad in ["file:///etc/passwd", "ftp://x/y", "lists.example/x", "https://"] {
            assert_eq!(
                ListSource::parse(bad, "suffix", None, None),
                Err(ListError::BadUrl(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            ListSource::parse("https://a/b", "domains", None, None),
            Err(ListError::BadKind(_))
        ));
        for bad in ["10", "5s", "1y", "h", "99999999999999999999d", "0m"] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_every("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(every_text(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(every_text(Duration::from_secs(90 * 60)), "90m");
        assert!(matches!(
            ListSource::parse("https://a/b", "cidr", None, Some("abc")),
            Err(ListError::BadDigest(_))
        ));
    }

    #[test]
    fn a_pinned_digest_refuses_any_other_download() {
        let body = b"example.org\n";
        let digest = hex::encode(sha2::Sha256::digest(body));
        let pinned = ListSource::parse("https://a/b", "suffix", None, Some(&digest.to_uppercase())).unwrap();
        assert_eq!(pinned.check_digest(body), Ok(()));
        assert!(matches!(
            pinned.check_digest(b"example.net\n"),
            Err(ListError::DigestMismatch { .. })
        ));
        assert_eq!(source("suffix").check_digest(b"anything"), Ok(()));
    }

    #[test]
    fn the_formats_peers_publish_are_read() {
        let text = "\
# a comment
! an adblock-style comment

example.org
*.ads.example
+.tracker.example
.cdn.example
0.0.0.0 hosts.example
127.0.0.1   other.example
domain:v2ray.example
";
        let list = NameList::parse(source("suffix"), "lists/x".into(), text).unwrap();
        let names: Vec<&str> = list.patterns().iter().map(NamePattern::text).collect();
        assert_eq!(
            names,
            [
                "example.org",
                "ads.example",
                "tracker.example",
                "cdn.example",
                "hosts.example",
                "other.example",
                "v2ray.example"
            ]
        );
        let exact = NameList::parse(source("exact"), "f".into(), "full:www.example.org\n").unwrap();
        assert_eq!(exact.patterns()[0], NamePattern::Exact("www.example.org".into()));
    }

    #[test]
    fn garbage_is_refused_with_its_line() {
        let err = NameList::parse(source("suffix"), "f".into(), "example.org\n<html><body>\n").unwrap_err();
        assert!(matches!(err, ListError::BadLine { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(matches!(
            NameList::parse(source("suffix"), "f".into(), "# nothing\n\n"),
            Err(ListError::Empty { .. })
        ));
        assert!(matches!(
            NameList::parse(source("regex"), "f".into(), "(unclosed\n"),
            Err(ListError::BadLine { line: 1, .. })
        ));
    }

    #[test]
    fn long_lines_and_stray_files_are_refused() {
        let long = format!("example.org\n{}\n", "a".repeat(MAX_LINE + 1));
        assert_eq!(
            check_lines("https://a/b", &long),
            Err(ListError::LongLine {
                url: "https://a/b".into(),
                line: 2
            })
        );
        assert_eq!(check_lines("u", "example.org\n"), Ok(()));
        for bad in [
            "/etc/shadow",
            "lists/../config.yaml",
            "lists/a/b",
            "lists/",
            "lists/.x",
            "sets/x.txt",
        ] {
            assert!(check_file(bad).is_err(), "{bad}");
        }
        assert_eq!(check_file("lists/ads.txt-1a2b3c4d.txt"), Ok(()));
    }

    #[test]
    fn kept_copies_are_named_safely_and_apart() {
        let a = ListSource::parse("https://a.example/../lists/ads.txt?x=1", "suffix", None, None).unwrap();
        let b = ListSource::parse("https://b.example/ads.txt", "suffix", None, None).unwrap();
        assert!(!a.file_name().contains('/') && !a.file_name().starts_with('.'));
        assert_ne!(a.file_name(), b.file_name());
        assert!(b.file_name().starts_with("ads.txt-"));
    }
}
