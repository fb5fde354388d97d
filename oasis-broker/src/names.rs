//! Matching DNS names against name rules (for the DNS-name subsets of the
//! fake-address work): exact names, suffixes (`example.org` and everything
//! below it), keywords (a substring anywhere) and regular expressions (the
//! paper's syntax). Rules are compiled into one matcher per kind (a hash
//! map, a label-suffix map, an Aho-Corasick automaton and a regex set), so
//! a lookup costs about the same for ten rules or ten thousand.
//!
//! Precedence is the same as for header rules: the rule added first wins,
//! whatever its kind.

use std::collections::HashMap;

use aho_corasick::AhoCorasick;
use regex::RegexSet;

pub use crate::name_pattern::{NameError, NamePattern, normalise};
use crate::rules::{Carrier, NameRule};

/// The name rules compiled for lookup: which rule claims a name, and the
/// carrier it asks for.
#[derive(Debug)]
pub struct NameRules {
    matcher: NameMatcher,
    rules: Vec<(u32, Carrier)>,
}

impl Default for NameRules {
    fn default() -> Self {
        NameRules::compile(&[]).expect("no patterns compile")
    }
}

impl NameRules {
    pub fn compile(rules: &[NameRule]) -> Result<NameRules, NameError> {
        let patterns: Vec<NamePattern> = rules.iter().map(|r| r.pattern.clone()).collect();
        Ok(NameRules {
            matcher: NameMatcher::new(&patterns)?,
            rules: rules.iter().map(|r| (r.id, r.via.clone())).collect(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The id and carrier of the first rule that claims `name` (normalised:
    /// lower case, no final dot; see [`normalise`]).
    pub fn first_match(&self, name: &str) -> Option<(u32, &Carrier)> {
        if self.rules.is_empty() {
            return None;
        }
        let rank = self.matcher.first_match_normalised(name)?;
        self.rules.get(rank).map(|(id, via)| (*id, via))
    }
}

/// Name patterns compiled for lookup; rank = position in the rule list.
#[derive(Debug)]
pub struct NameMatcher {
    exact: HashMap<String, usize>,
    suffix: HashMap<String, usize>,
    keywords: Option<(AhoCorasick, Vec<usize>)>,
    regexes: Option<(RegexSet, Vec<usize>)>,
}

impl NameMatcher {
    /// Compiles validated patterns, in precedence order.
    pub fn new(patterns: &[NamePattern]) -> Result<NameMatcher, NameError> {
        let mut exact = HashMap::new();
        let mut suffix = HashMap::new();
        let (mut keyword_texts, mut keyword_ranks) = (Vec::new(), Vec::new());
        let (mut regex_texts, mut regex_ranks) = (Vec::new(), Vec::new());
        for (rank, pattern) in patterns.iter().enumerate() {
            let mut add = |pattern: &NamePattern| match pattern {
                // An earlier rule with the same text keeps precedence.
                NamePattern::Exact(name) => {
                    exact.entry(name.clone()).or_insert(rank);
                }
                NamePattern::Suffix(name) => {
                    suffix.entry(name.clone()).or_insert(rank);
                }
                NamePattern::Keyword(text) => {
                    keyword_texts.push(text.clone());
                    keyword_ranks.push(rank);
                }
                NamePattern::Regex(pattern) => {
                    regex_texts.push(format!("(?i:{pattern})"));
                    regex_ranks.push(rank);
                }
                // Lists hold no lists.
                NamePattern::List(_) => {}
            };
            match pattern {
                // Every entry of a list at the list rule's one rank.
                NamePattern::List(list) => list.patterns().iter().for_each(&mut add),
                single => add(single),
            }
        }
        let keywords = if keyword_texts.is_empty() {
            None
        } else {
            let automaton = AhoCorasick::new(&keyword_texts).map_err(|e| NameError::BadRegex {
                pattern: "keywords".into(),
                reason: e.to_string(),
            })?;
            Some((automaton, keyword_ranks))
        };
        let regexes = if regex_texts.is_empty() {
            None
        } else {
            let set = RegexSet::new(&regex_texts).map_err(|e| NameError::BadRegex {
                pattern: "regex set".into(),
                reason: e.to_string(),
            })?;
            Some((set, regex_ranks))
        };
        Ok(NameMatcher {
            exact,
            suffix,
            keywords,
            regexes,
        })
    }

    /// The rank of the first pattern that matches `name`.
    pub fn first_match(&self, name: &str) -> Option<usize> {
        self.first_match_normalised(&normalise(name))
    }

    /// As `first_match`, for a name already normalised.
    pub fn first_match_normalised(&self, name: &str) -> Option<usize> {
        let mut best = self.exact.get(name).copied();
        let mut consider = |rank: usize| best = Some(best.map_or(rank, |b| b.min(rank)));
        // Every label boundary starts a suffix that may be a rule.
        let mut rest = name;
        loop {
            if let Some(&rank) = self.suffix.get(rest) {
                consider(rank);
            }
            match rest.split_once('.') {
                Some((_, tail)) => rest = tail,
                None => break,
            }
        }
        if let Some((automaton, ranks)) = &self.keywords {
            for found in automaton.find_overlapping_iter(name) {
                consider(ranks[found.pattern().as_usize()]);
            }
        }
        if let Some((set, ranks)) = &self.regexes {
            for index in set.matches(name).iter() {
                consider(ranks[index]);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: &str, text: &str) -> NamePattern {
        match kind {
            "exact" => NamePattern::Exact(text.into()),
            "suffix" => NamePattern::Suffix(text.into()),
            "keyword" => NamePattern::Keyword(text.into()),
            _ => NamePattern::Regex(text.into()),
        }
        .validated()
        .unwrap()
    }

    #[test]
    fn each_kind_matches_as_documented() {
        assert!(p("exact", "Example.ORG.").matches("example.org"));
        assert!(!p("exact", "example.org").matches("www.example.org"));
        let suffix = p("suffix", "*.example.org");
        assert!(suffix.matches("example.org") && suffix.matches("a.b.example.org"));
        assert!(!suffix.matches("badexample.org"));
        assert!(p("keyword", "video").matches("cdn.video-host.net"));
        let regex = p("regex", r".*\.edu$");
        assert!(regex.matches("cs.Stanford.EDU.") && !regex.matches("edu.example.com"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert_eq!(
            NamePattern::Exact("bad name!".into()).validated(),
            Err(NameError::BadName("bad name!".into()))
        );
        assert_eq!(
            NamePattern::Suffix("a..b".into()).validated(),
            Err(NameError::BadName("a..b".into()))
        );
        assert_eq!(
            NamePattern::Keyword(" ".into()).validated(),
            Err(NameError::Empty)
        );
        assert!(matches!(
            NamePattern::Regex("(unclosed".into()).validated(),
            Err(NameError::BadRegex { .. })
        ));
    }

    #[test]
    fn the_rule_added_first_wins_across_kinds() {
        let patterns = [
            p("regex", r"\.edu$"),
            p("suffix", "stanford.edu"),
            p("exact", "cs.stanford.edu"),
            p("keyword", "stan"),
        ];
        let matcher = NameMatcher::new(&patterns).unwrap();
        assert_eq!(matcher.first_match("cs.stanford.edu"), Some(0));
        let matcher = NameMatcher::new(&patterns[1..]).unwrap();
        assert_eq!(matcher.first_match("CS.Stanford.edu."), Some(0));
        assert_eq!(matcher.first_match("stanley.com"), Some(2));
        assert_eq!(matcher.first_match("example.com"), None);
    }

    /// The compiled matcher agrees with checking patterns one by one, on a
    /// list of ten thousand rules.
    #[test]
    fn ten_thousand_rules_agree_with_the_reference() {
        let mut patterns = Vec::new();
        // Mostly suffixes and names, some keywords, 1% regexes.
        for i in 0..10_000 {
            patterns.push(match (i % 4, i % 100) {
                (_, 3) => p("regex", &format!(r"^r{i}\.[a-z]+\.test$")),
                (0, _) => p("suffix", &format!("site{i}.example")),
                (1, _) => p("exact", &format!("host{i}.example")),
                (2, _) => p("keyword", &format!("kw{i}x")),
                _ => p("suffix", &format!("zone{i}.example")),
            });
        }
        let matcher = NameMatcher::new(&patterns).unwrap();
        // The reference, one pattern at a time, with each regex compiled once.
        type Check = Box<dyn Fn(&str) -> bool>;
        let reference: Vec<Check> = patterns
            .iter()
            .map(|pattern| -> Check {
                match pattern {
                    NamePattern::Regex(text) => {
                        let re = regex::RegexBuilder::new(text)
                            .case_insensitive(true)
                            .build()
                            .unwrap();
                        Box::new(move |name| re.is_match(&normalise(name)))
                    }
                    other => {
                        let other = other.clone();
                        Box::new(move |name| other.matches(name))
                    }
                }
            })
            .collect();
        let names = [
            "site4.example",
            "www.site4.example",
            "www.site40.example",
            "host9.example",
            "a.host9.example",
            "zzkw6xzz.org",
            "kw62x.kw6x.net",
            "r3.abc.test",
            "r3.abc.test.org",
            "r103.xyz.test",
            "a.zone7.example",
            "nothing.here",
            "site9996.example",
        ];
        for name in names {
            let expected = reference.iter().position(|matches| matches(name));
            assert_eq!(matcher.first_match(name), expected, "{name}");
        }
    }
}
