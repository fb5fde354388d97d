//! A name rule's pattern as the user writes it (`--name`, `--name-suffix`,
//! `--name-keyword`, `--name-regex`), checked, and names as rules compare
//! them (lower case, no trailing dot). The rules hold patterns; names.rs
//! compiles them for lookup.

/// One name pattern, as written on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NamePattern {
    /// Exactly this name.
    Exact(String),
    /// This name and every name below it (`example.org` matches
    /// `example.org` and `www.example.org`, not `badexample.org`).
    Suffix(String),
    /// Names containing this text anywhere.
    Keyword(String),
    /// Names a regular expression matches (case-insensitive; a pattern
    /// matches anywhere unless anchored with `^`/`$`).
    Regex(String),
    /// Names any pattern of a list fetched by URL matches (checked when
    /// the list was read).
    List(std::sync::Arc<crate::rule_list::NameList>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name pattern")]
    Empty,
    #[error("{0:?} is not a DNS name: use letters, digits, '-', '_' and dots, at most 253 characters")]
    BadName(String),
    #[error("bad regular expression {pattern:?}: {reason}")]
    BadRegex { pattern: String, reason: String },
}

/// Lower case, no trailing dot: the form names are compared in.
pub fn normalise(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn checked_name(text: &str) -> Result<String, NameError> {
    let name = normalise(text);
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let valid = name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(NameError::BadName(text.into()));
    }
    Ok(name)
}

impl NamePattern {
    /// Checks and normalises the pattern.
    pub fn validated(self) -> Result<NamePattern, NameError> {
        Ok(match self {
            NamePattern::Exact(name) => NamePattern::Exact(checked_name(&name)?),
            NamePattern::Suffix(name) => NamePattern::Suffix(checked_name(name.trim_start_matches("*."))?),
            NamePattern::Keyword(text) => {
                let text = normalise(&text);
                if text.is_empty() {
                    return Err(NameError::Empty);
                }
                NamePattern::Keyword(text)
            }
            NamePattern::Regex(pattern) => {
                if pattern.trim().is_empty() {
                    return Err(NameError::Empty);
                }
                regex::RegexBuilder::new(&pattern)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| NameError::BadRegex {
                        pattern: pattern.clone(),
                        reason: e.to_string(),
                    })?;
                NamePattern::Regex(pattern)
            }
            NamePattern::List(list) => NamePattern::List(list),
        })
    }

    /// The pattern as written (normalised).
    pub fn text(&self) -> &str {
        match self {
            NamePattern::Exact(t)
            | NamePattern::Suffix(t)
            | NamePattern::Keyword(t)
            | NamePattern::Regex(t) => t,
            NamePattern::List(list) => &list.source.url,
        }
    }

    /// The reference semantics the compiled matcher must reproduce. It
    /// compiles a regex pattern on every call: for checks, not lookups.
    pub fn matches(&self, name: &str) -> bool {
        let name = normalise(name);
        match self {
            NamePattern::Exact(exact) => name == *exact,
            NamePattern::Suffix(suffix) => {
                name == *suffix
                    || name
                        .strip_suffix(suffix.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
            NamePattern::Keyword(text) => name.contains(text.as_str()),
            NamePattern::Regex(pattern) => regex::RegexBuilder::new(pattern)
                .case_insensitive(true)
                .build()
                .is_ok_and(|re| re.is_match(&name)),
            NamePattern::List(list) => list.patterns().iter().any(|p| p.matches(&name)),
        }
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NamePattern::Exact(name) => write!(f, "name-exact {name}"),
            NamePattern::Suffix(name) => write!(f, "name-suffix {name}"),
            NamePattern::Keyword(text) => write!(f, "name-keyword {text}"),
            NamePattern::Regex(pattern) => write!(f, "name ~ {pattern}"),
            NamePattern::List(list) => list.fmt(f),
        }
    }
}
