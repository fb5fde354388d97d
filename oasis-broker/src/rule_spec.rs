//! A rule as the user writes it (the CLI's flags, a config file's entry, a
//! control request): text fields, parsed into a rule by `rules.rs`. The
//! ground floor: the control protocol and the config file speak it, and it
//! imports nothing of the broker.

use serde::{Deserialize, Serialize};

/// A rule as the user wrote it, before it has an id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// A file of destination prefixes, one per line: the rule claims
    /// traffic to any of them. Relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_set: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "port_text"
    )]
    pub dport: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "port_text"
    )]
    pub sport: Option<String>,
    /// Who sent it: the user owning the sending socket (a name or uid).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "uid_text"
    )]
    pub uid: Option<String>,
    /// Who sent it: a cgroup v2 path (a systemd unit, slice or scope), with
    /// everything below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Who sent it: the executable's name (or a path, for its file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Name rules: a regular expression over DNS names (the paper's form),
    /// or an exact name, a suffix, a keyword. One of them, and no header field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_keyword: Option<String>,
    /// A list fetched from this URL (http or https) and fetched again
    /// every so often: its prefixes or names are the rule's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// What each line of `list` is: cidr, suffix, exact, keyword, regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_kind: Option<String>,
    /// How often `list` is fetched again (30m, 24h, 7d); a day if left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Pins `list` to one download, by its SHA-256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where the daemon keeps the last good copy of `list` (it writes
    /// this), relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_file: Option<String>,
    /// The carrier, for a rule with a fixed one; empty for a metric rule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    /// Metric rules: what the Monitor optimises (latency, loss<X%,
    /// throughput; any text for a monitor module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Metric rules: the overlays to choose from besides the underlay,
    /// comma-separated; left out, every joined overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub among: Option<String>,
    /// Metric rules: the joined overlay whose monitor module decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<String>,
}

/// Accepts `uid: 1000` as well as `uid: alice` in the YAML file.
fn uid_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    port_text(d)
}

/// Accepts `dport: 8080` as well as `dport: "1000-2000"` in the YAML file.
fn port_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        Number(u64),
        Text(String),
    }
    Ok(Option::<Text>::deserialize(d)?.map(|t| match t {
        Text::Number(n) => n.to_string(),
        Text::Text(s) => s,
    }))
}
