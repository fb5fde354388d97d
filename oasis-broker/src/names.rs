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
use crate::sender::{Asker, SenderMatch};

/// The name rules compiled for lookup: which rule claims a name, and the
/// carrier it asks for.
#[derive(Debug)]
pub struct NameRules {
    matcher: NameMatcher,
    rules: Vec<(u32, Carrier)>,
    /// By rank: the processes a rule claims names for, when it names any.
    senders: Vec<Option<SenderMatch>>,
    any_sender: bool,
}

impl Default for NameRules {
    fn default() -> Self {
        NameRules::compile(&[]).expect("no patterns compile")
    }
}

impl NameRules {
    pub fn compile(rules: &[NameRule]) -> Result<NameRules, NameError> {
        let patterns: Vec<NamePattern> = rules.iter().map(|r| r.pattern.clone()).collect();
        let senders: Vec<Option<SenderMatch>> = rules
            .iter()
            .map(|r| (!r.sender.is_any()).then(|| r.sender.clone()))
            .collect();
        Ok(NameRules {
            matcher: NameMatcher::new(&patterns)?,
            rules: rules.iter().map(|r| (r.id, r.via.clone())).collect(),
            any_sender: senders.iter().any(Option::is_some),
            senders,
        })
    }

    /// The id and carrier of the first rule that claims `name` for the
    /// process that asked (`asker`, looked up only when a rule naming a
    /// sender could claim the name first); and whether the answer depends
    /// on who asked (then it must not be given again to another).
    pub fn first_match_for(
        &self,
        name: &str,
        asker: impl FnOnce() -> Option<Asker>,
    ) -> (Option<(u32, &Carrier)>, bool) {
        if !self.any_sender {
            return (self.first_match(name), false);
        }
        let general = self
            .matcher
            .first_match_where(name, |rank| self.senders[rank].is_none());
        let personal = self
            .matcher
            .first_match_where(name, |rank| self.senders[rank].is_some())
            .is_some_and(|rank| general.is_none_or(|general| rank < general));
        let rank = if personal {
            let asker = asker();
            self.matcher
                .first_match_where(name, |rank| match (&self.senders[rank], &asker) {
                    (None, _) => true,
                    (Some(sender), Some(asker)) => sender.matches_asker(asker),
                    (Some(_), None) => false,
                })
        } else {
            general
        };
        (
            rank.and_then(|rank| self.rules.get(rank))
                .map(|(id, via)| (*id, via)),
            personal,
        )
    }

    /// Whether some rule claims names for some processes only.
    pub fn by_sender(&self) -> bool {
        self.any_sender
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The id and carrier of the first rule that claims `name` (normalised:
    /// lower case, no final dot; see [`normalise`]) for whoever asks: a
    /// rule that claims names for some processes only is passed over.
    pub fn first_match(&self, name: &str) -> Option<(u32, &Carrier)> {
        if self.rules.is_empty() {
            return None;
        }
        let rank = if self.any_sender {
            self.matcher
                .first_match_where(name, |rank| self.senders[rank].is_none())?
        } else {
            self.matcher.first_match_normalised(name)?
        };
        self.rules.get(rank).map(|(id, via)| (*id, via))
    }

    /// As `first_match`, with rules for some processes only counted in:
    /// for a flow to a fake address, which only processes a rule claimed
    /// the name for were given.
    pub fn first_match_any_sender(&self, name: &str) -> Option<(u32, &Carrier)> {
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
    /// Later ranks of texts already in `exact` or `suffix` (rules for
    /// different senders): rarely any.
    exact_more: HashMap<String, Vec<usize>>,
    suffix_more: HashMap<String, Vec<usize>>,
    keywords: Option<(AhoCorasick, Vec<usize>)>,
    regexes: Option<(RegexSet, Vec<usize>)>,
}

impl NameMatcher {
    /// Compiles validated patterns, in precedence order.
    pub fn new(patterns: &[NamePattern]) -> Result<NameMatcher, NameError> {
        let mut exact = HashMap::new();
        let mut suffix = HashMap::new();
        let mut exact_more: HashMap<String, Vec<usize>> = HashMap::new();
        let mut suffix_more: HashMap<String, Vec<usize>> = HashMap::new();
        let (mut keyword_texts, mut keyword_ranks) = (Vec::new(), Vec::new());
        let (mut regex_texts, mut regex_ranks) = (Vec::new(), Vec::new());
        for (rank, pattern) in patterns.iter().enumerate() {
            let mut add = |pattern: &NamePattern| match pattern {
                // An earlier rule with the same text keeps precedence.
                NamePattern::Exact(name) => {
                    if *exact.entry(name.clone()).or_insert(rank) != rank {
                        exact_more.entry(name.clone()).or_default().push(rank);
                    }
                }
                NamePattern::Suffix(name) => {
                    if *suffix.entry(name.clone()).or_insert(rank) != rank {
                        suffix_more.entry(name.clone()).or_default().push(rank);
                    }
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
            exact_more,
            suffix_more,
            keywords,
            regexes,
        })
    }

    /// The rank of the first pattern that matches `name`.
    pub fn first_match(&self, name: &str) -> Option<usize> {
        self.first_match_normalised(&normalise(name))
    }

    /// As `first_match_normalised`, among the ranks `allowed` admits.
    pub fn first_match_where(&self, name: &str, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<usize> = None;
        let mut consider = |rank: usize| {
            if allowed(rank) {
                best = Some(best.map_or(rank, |b| b.min(rank)));
            }
        };
        let mut from = |map: &HashMap<String, usize>, more: &HashMap<String, Vec<usize>>, key: &str| {
            if let Some(&rank) = map.get(key) {
                consider(rank);
                more.get(key)
                    .into_iter()
                    .flatten()
                    .for_each(|&rank| consider(rank));
            }
        };
        from(&self.exact, &self.exact_more, name);
        // Every label boundary starts a suffix that may be a rule.
        let mut rest = name;
        loop {
            from(&self.suffix, &self.suffix_more, rest);
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

    /// As `first_match`, for a name already normalised.
    pub fn first_match_normalised(&self, name: &str) -> Option<usize> {
        self.first_match_where(name, |_| true)
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
    fn rules_for_some_processes_claim_their_names_for_them_only() {
        use crate::sender::{App, CgroupPath, SenderMatch};
        let rule = |id, pattern, via: &str, sender: SenderMatch| NameRule {
            id,
            pattern,
            via: via.parse().unwrap(),
            sender,
        };
        let browser = SenderMatch {
            cgroup: Some(CgroupPath::parse("user.slice/browser.scope").unwrap()),
            ..SenderMatch::default()
        };
        let curl = SenderMatch {
            app: Some(App::parse("curl").unwrap()),
            ..SenderMatch::default()
        };
        let rules = NameRules::compile(&[
            rule(1, p("suffix", "example.org"), "detour", browser),
            rule(2, p("suffix", "example.org"), "exit", curl),
            rule(
                3,
                p("exact", "www.example.org"),
                "underlay",
                SenderMatch::default(),
            ),
            rule(4, p("suffix", "example.net"), "exit", SenderMatch::default()),
        ])
        .unwrap();
        let asker = |cgroup: &str, app: &str| Asker {
            uid: 1000,
            cgroup: Some(cgroup.into()),
            app: App::parse(app).unwrap().key(),
        };
        let claim = |name: &str, who: Option<Asker>| {
            let (claim, personal) = rules.first_match_for(name, || who);
            (claim.map(|(id, _)| id), personal)
        };
        assert_eq!(
            claim(
                "www.example.org",
                Some(asker("user.slice/browser.scope", "firefox"))
            ),
            (Some(1), true)
        );
        assert_eq!(
            claim("www.example.org", Some(asker("user.slice/other.scope", "curl"))),
            (Some(2), true)
        );
        assert_eq!(
            claim("www.example.org", Some(asker("user.slice/other.scope", "wget"))),
            (Some(3), true)
        );
        assert_eq!(claim("mail.example.org", Some(asker("/", "wget"))), (None, true));
        assert_eq!(
            claim("mail.example.org", None),
            (None, true),
            "an asker not known is no one's"
        );
        // A name no rule for some processes claims first: not looked up.
        let (claim, personal) = rules.first_match_for("www.example.net", || panic!("asked who asked"));
        assert_eq!((claim.map(|(id, _)| id), personal), (Some(4), false));
        // Whoever asks: rules for some processes only are passed over; a
        // flow to a fake address counts them in.
        assert_eq!(rules.first_match("www.example.org").map(|(id, _)| id), Some(3));
        assert_eq!(
            rules.first_match_any_sender("www.example.org").map(|(id, _)| id),
            Some(1)
        );
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
