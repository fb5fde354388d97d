//! Prefix sets: one header rule claiming traffic to any of many destination
//! prefixes, such as a country's or an autonomous system's address list.
//!
//! A set is read from text with one prefix per line (the form such lists
//! are published in); `#` starts a comment. It is kept aggregated (sorted,
//! disjoint, adjacent prefixes merged), which matches exactly the same
//! addresses with fewer classifier entries and lets [`PrefixSet::contains`]
//! answer by binary search.

use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Most prefixes of one family all rules together may hold: the size of
/// the classifier's destination tries, less the entry of rules without a
/// destination.
pub const MAX_PREFIXES: usize = oasis_common::MAX_DST_PREFIXES as usize - 1;

#[derive(Clone, Debug)]
pub struct PrefixSet {
    /// Where the set is kept: in the config file's `dst_set`, a path
    /// relative to the config file's directory (or absolute).
    file: String,
    /// The URL it is fetched from again, for a list rule.
    source: Option<std::sync::Arc<crate::rule_list::ListSource>>,
    /// Prefixes the text listed, before aggregation.
    listed: usize,
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixSetError {
    #[error(
        "{file} line {line}: {text:?} is not a prefix (one per line, such as 203.0.113.0/24 or \
         2001:db8::/32; '#' starts a comment)"
    )]
    BadPrefix { file: String, line: usize, text: String },
    #[error(
        "{file} line {line}: {given} has host bits set: write {network} for the network, or \
         {host} for the one address"
    )]
    HostBits {
        file: String,
        line: usize,
        given: String,
        network: String,
        host: String,
    },
    #[error("{file} lists no prefixes")]
    Empty { file: String },
    #[error(
        "{file} holds {count} IPv{family} prefixes (after merging), more than the {MAX_PREFIXES} \
         the classifier holds"
    )]
    TooMany { file: String, family: u8, count: usize },
    #[error("cannot read the prefix set {file}: {reason}")]
    Read { file: String, reason: String },
}

impl PrefixSet {
    /// Reads `text`; `file` names it in errors and is where it is kept.
    pub fn parse(file: &str, text: &str) -> Result<PrefixSet, PrefixSetError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let content = line.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let bad = || PrefixSetError::BadPrefix {
                file: file.to_string(),
                line: index + 1,
                text: content.to_string(),
            };
            let net = match content.parse::<IpNet>() {
                Ok(net) if net.trunc() != net => {
                    return Err(PrefixSetError::HostBits {
                        file: file.to_string(),
                        line: index + 1,
                        given: content.to_string(),
                        network: net.trunc().to_string(),
                        host: IpNet::from(net.addr()).to_string(),
                    });
                }
                Ok(net) => net,
                Err(_) => content.parse::<IpAddr>().map(IpNet::from).map_err(|_| bad())?,
            };
            match net {
                IpNet::V4(net) => v4.push(net),
                IpNet::V6(net) => v6.push(net),
            }
        }
        let listed = v4.len() + v6.len();
        if listed == 0 {
            return Err(PrefixSetError::Empty { file: file.into() });
        }
        let mut v4 = Ipv4Net::aggregate(&v4);
        let mut v6 = Ipv6Net::aggregate(&v6);
        v4.sort_unstable();
        v6.sort_unstable();
        for (family, count) in [(4, v4.len()), (6, v6.len())] {
            if count > MAX_PREFIXES {
                return Err(PrefixSetError::TooMany {
                    file: file.into(),
                    family,
                    count,
                });
            }
        }
        Ok(PrefixSet {
            file: file.to_string(),
            source: None,
            listed,
            v4,
            v6,
        })
    }

    /// A set with no prefix yet: a list rule's before its first download.
    pub fn empty(file: String) -> PrefixSet {
        PrefixSet {
            file,
            source: None,
            listed: 0,
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }

    /// Whether any prefix of the set holds `addr`.
    pub fn contains(&self, addr: IpAddr) -> bool {
        // Disjoint and sorted: only the last prefix starting at or below
        // the address can hold it.
        match addr {
            IpAddr::V4(addr) => {
                let at = self.v4.partition_point(|net| net.network() <= addr);
                at > 0 && self.v4[at - 1].contains(&addr)
            }
            IpAddr::V6(addr) => {
                let at = self.v6.partition_point(|net| net.network() <= addr);
                at > 0 && self.v6[at - 1].contains(&addr)
            }
        }
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// The same set, kept in another file.
    pub fn kept_in(mut self, file: String) -> PrefixSet {
        self.file = file;
        self
    }

    /// The same set, fetched from `source` and kept current.
    pub fn from_source(mut self, source: crate::rule_list::ListSource) -> PrefixSet {
        self.source = Some(std::sync::Arc::new(source));
        self
    }

    /// Where a list rule's set is fetched from.
    pub fn source(&self) -> Option<&crate::rule_list::ListSource> {
        self.source.as_deref()
    }

    /// The prefixes as listed, before merging.
    pub fn listed(&self) -> usize {
        self.listed
    }

    /// The merged prefixes, as the classifier holds them.
    pub fn v4(&self) -> &[Ipv4Net] {
        &self.v4
    }

    pub fn v6(&self) -> &[Ipv6Net] {
        &self.v6
    }
}

/// Two sets are the same subset when they hold the same addresses,
/// wherever they are kept.
impl PartialEq for PrefixSet {
    fn eq(&self, other: &Self) -> bool {
        // Two lists are two subsets even while they hold the same.
        self.v4 == other.v4
            && self.v6 == other.v6
            && self.source.as_ref().map(|s| &s.url) == other.source.as_ref().map(|s| &s.url)
    }
}

impl Eq for PrefixSet {}

impl std::hash::Hash for PrefixSet {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.v4.len().hash(state);
        self.v6.len().hash(state);
        self.v4.first().hash(state);
        self.v6.first().hash(state);
    }
}

impl fmt::Display for PrefixSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = std::path::Path::new(&self.file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.file.clone());
        match &self.source {
            Some(source) => write!(f, "list {} ({} prefixes)", source.url, self.listed),
            None => write!(f, "{name} ({} prefixes)", self.listed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> PrefixSet {
        PrefixSet::parse("test.txt", text).expect("valid set")
    }

    #[test]
    fn lines_comments_and_bare_addresses() {
        let s = set("# a country\n\n203.0.113.0/24  # web\n198.51.100.7\n2001:db8::/32\n");
        assert_eq!(s.listed(), 3);
        assert_eq!(s.v4().len(), 2);
        assert_eq!(s.v6().len(), 1);
        assert!(s.contains("203.0.113.200".parse().unwrap()));
        assert!(s.contains("198.51.100.7".parse().unwrap()));
        assert!(!s.contains("198.51.100.8".parse().unwrap()));
        assert!(s.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn bad_lines_are_named_by_number() {
        let err = PrefixSet::parse("cn.txt", "1.0.0.0/24\n\nnot-a-prefix\n").unwrap_err();
        assert_eq!(
            err,
            PrefixSetError::BadPrefix {
                file: "cn.txt".into(),
                line: 3,
                text: "not-a-prefix".into()
            }
        );
        let err = PrefixSet::parse("cn.txt", "1.0.0.5/24\n").unwrap_err();
        assert!(matches!(err, PrefixSetError::HostBits { line: 1, .. }), "{err}");
        assert!(err.to_string().contains("1.0.0.0/24"), "{err}");
        assert_eq!(
            PrefixSet::parse("e.txt", "# nothing\n").unwrap_err(),
            PrefixSetError::Empty { file: "e.txt".into() }
        );
        assert!(PrefixSet::parse("x", "10.0.0.0/8 10.1.0.0/16\n").is_err());
    }

    #[test]
    fn overlapping_and_adjacent_prefixes_merge() {
        let s = set("10.0.0.0/24\n10.0.1.0/24\n10.0.0.128/25\n10.0.0.0/8\n192.0.2.0/24\n");
        assert_eq!(
            s.v4(),
            &["10.0.0.0/8".parse().unwrap(), "192.0.2.0/24".parse().unwrap()]
        );
        assert_eq!(s.listed(), 5);
    }

    /// Binary search against a plain scan of what was listed.
    #[test]
    fn contains_agrees_with_a_scan() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut listed = Vec::new();
        for _ in 0..300 {
            let len = 8 + (next() % 25) as u8;
            let addr = std::net::Ipv4Addr::from((next() as u32) & 0x0fff_ffff);
            listed.push(Ipv4Net::new(addr, len).unwrap().trunc());
        }
        let text: String = listed.iter().map(|n| format!("{n}\n")).collect();
        let s = set(&text);
        for _ in 0..20_000 {
            let addr = std::net::Ipv4Addr::from((next() as u32) & 0x0fff_ffff);
            let expected = listed.iter().any(|n| n.contains(&addr));
            assert_eq!(s.contains(IpAddr::V4(addr)), expected, "{addr}");
        }
    }

    #[test]
    fn equal_by_content_not_by_file() {
        let a = PrefixSet::parse("a.txt", "10.0.0.0/24\n10.0.1.0/24\n").unwrap();
        let b = PrefixSet::parse("b.txt", "10.0.0.0/23\n").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "a.txt (2 prefixes)");
    }
}
