//! What a change of the rules makes of the rules there are, decided apart
//! from the kernel, the files and the locks that `state.rs` handles: a
//! batch of rules is checked as a whole (all of them or none), an
//! overlay's rules are found by name, a prefix set is kept while a rule
//! still names it.

use super::errors::RequestError;
use crate::overlay::{StoredOverlay, check_carrier};
use crate::rule_list::ListContent;
use crate::rules::{AnyRule, RuleSet, RuleSpec, Subset};

/// Rules checked against the current ones, not yet in effect.
#[derive(Debug)]
pub(super) struct Checked {
    /// The rule list with the new rules at its end.
    pub next: RuleSet,
    pub added: Vec<AnyRule>,
    /// A name rule is among them: the DNS side must compile and publish.
    pub names_changed: bool,
}

/// Checks `specs` in order against `current` and the joined overlays;
/// the first bad one refuses the lot, naming its line when `import`.
/// `progress(done, total)` is told every 50,000 rules.
pub(super) fn check_rules(
    current: &RuleSet,
    specs: Vec<(RuleSpec, Option<ListContent>)>,
    joined: &[StoredOverlay],
    import: bool,
    progress: impl Fn(u64, u64),
) -> Result<Checked, RequestError> {
    let total = specs.len() as u64;
    let mut next = current.clone();
    let mut added = Vec::with_capacity(specs.len());
    let mut names_changed = false;
    for (index, (spec, set)) in specs.into_iter().enumerate() {
        let at = |source| {
            if import {
                RequestError::Import {
                    line: index + 1,
                    source,
                }
            } else {
                RequestError::Rule(source)
            }
        };
        let (subset, via) = spec.parse_content(set).map_err(at)?;
        check_carrier(&via, joined).map_err(at)?;
        names_changed |= matches!(subset, Subset::Name(..));
        added.push(next.add_any(subset, via).map_err(at)?);
        if index % 50_000 == 49_999 {
            progress(index as u64 + 1, total);
        }
    }
    Ok(Checked {
        next,
        added,
        names_changed,
    })
}

/// The rules that send traffic over `overlay` (as a carrier, among a
/// metric rule's candidates, or as its monitor module), by id.
pub(super) fn rules_using(rules: &RuleSet, overlay: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = rules
        .carriers()
        .filter(|(_, via)| via.overlays().contains(&overlay))
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Whether a rule still claims destinations from the set kept as `file`
/// (when none does, the copy beside the config file goes).
pub(super) fn set_in_use(rules: &RuleSet, file: &str) -> bool {
    rules
        .rules()
        .iter()
        .any(|r| r.subset.dst_set.as_ref().is_some_and(|s| s.file() == file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OverlaySpec;
    use crate::prefix_set::PrefixSet;
    use crate::rules::RuleError;

    fn overlay(name: &str) -> StoredOverlay {
        StoredOverlay {
            name: name.into(),
            url: "http://x/spec.xml".into(),
            token: None,
            pinned: false,
            spec: OverlaySpec::parse(r#"<overlay><entry host="192.0.2.1" port="7400"/></overlay>"#).unwrap(),
            wireguard: None,
        }
    }

    fn header(dport: &str, via: &str) -> (RuleSpec, Option<ListContent>) {
        let spec = RuleSpec {
            proto: Some("tcp".into()),
            dport: Some(dport.into()),
            via: via.into(),
            ..RuleSpec::default()
        };
        (spec, None)
    }

    fn name(suffix: &str, via: &str) -> (RuleSpec, Option<ListContent>) {
        let spec = RuleSpec {
            name_suffix: Some(suffix.into()),
            via: via.into(),
            ..RuleSpec::default()
        };
        (spec, None)
    }

    fn add(rules: &mut RuleSet, specs: Vec<(RuleSpec, Option<ListContent>)>, joined: &[StoredOverlay]) {
        *rules = check_rules(rules, specs, joined, false, |_, _| {}).unwrap().next;
    }

    #[test]
    fn a_batch_is_added_whole_after_the_rules_there_are() {
        let mut current = RuleSet::default();
        add(&mut current, vec![header("80", "underlay")], &[]);
        let checked = check_rules(
            &current,
            vec![header("443", "exit"), header("8443", "underlay")],
            &[overlay("exit")],
            false,
            |_, _| {},
        )
        .unwrap();
        assert_eq!(checked.added.len(), 2);
        assert!(!checked.names_changed, "header rules only");
        let ids: Vec<u32> = checked.next.rules().iter().map(|r| r.id).collect();
        let added: Vec<u32> = checked.added.iter().map(AnyRule::id).collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(&ids[1..], &added[..], "the new rules come after the old one");
        assert_eq!(current.rules().len(), 1, "the current rules are untouched");
    }

    #[test]
    fn one_bad_rule_refuses_the_lot_and_an_import_names_its_line() {
        let current = RuleSet::default();
        let specs = || {
            vec![
                header("80", "underlay"),
                header("81", "nowhere"),
                header("82", "underlay"),
            ]
        };
        match check_rules(&current, specs(), &[], true, |_, _| {}) {
            Err(RequestError::Import {
                line: 2,
                source: RuleError::UnknownOverlay(name),
            }) => assert_eq!(name, "nowhere"),
            other => panic!("expected line 2's unknown overlay, got {other:?}"),
        }
        match check_rules(&current, specs(), &[], false, |_, _| {}) {
            Err(RequestError::Rule(RuleError::UnknownOverlay(_))) => {}
            other => panic!("expected the unknown overlay, got {other:?}"),
        }
        let bad_port = vec![header("80", "underlay"), header("99999", "underlay")];
        assert!(matches!(
            check_rules(&current, bad_port, &[], true, |_, _| {}),
            Err(RequestError::Import { line: 2, .. })
        ));
    }

    #[test]
    fn a_name_rule_among_them_tells_the_dns_side() {
        let checked = check_rules(
            &RuleSet::default(),
            vec![header("80", "underlay"), name("example.com", "underlay")],
            &[],
            false,
            |_, _| {},
        )
        .unwrap();
        assert!(checked.names_changed);
        assert_eq!(checked.next.names().len(), 1);
    }

    #[test]
    fn progress_is_told_every_50000_rules() {
        // Header rules are few (a kernel limit); an import of many is names.
        let told = std::cell::RefCell::new(Vec::new());
        let specs: Vec<_> = (0..100_001u32)
            .map(|i| name(&format!("n{i}.example"), "underlay"))
            .collect();
        check_rules(&RuleSet::default(), specs, &[], true, |done, total| {
            told.borrow_mut().push((done, total))
        })
        .unwrap();
        assert_eq!(told.into_inner(), vec![(50_000, 100_001), (100_000, 100_001)]);
    }

    #[test]
    fn an_overlays_rules_are_those_that_name_it() {
        let joined = [overlay("a"), overlay("b")];
        let mut rules = RuleSet::default();
        add(
            &mut rules,
            vec![
                header("1", "a"),
                header("2", "b"),
                header("3", "underlay"),
                header("4", "a"),
            ],
            &joined,
        );
        let ids: Vec<u32> = rules.rules().iter().map(|r| r.id).collect();
        assert_eq!(rules_using(&rules, "a"), vec![ids[0], ids[3]]);
        assert_eq!(rules_using(&rules, "b"), vec![ids[1]]);
        assert!(rules_using(&rules, "c").is_empty());
    }

    #[test]
    fn a_set_is_in_use_while_a_rule_names_it() {
        let set = std::sync::Arc::new(PrefixSet::parse("office-1.txt", "192.0.2.0/24\n").unwrap());
        let with_set = RuleSpec {
            dst_set: Some("office-1.txt".into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        let mut rules = RuleSet::default();
        add(
            &mut rules,
            vec![
                (with_set, Some(ListContent::Prefixes(set))),
                header("80", "underlay"),
            ],
            &[],
        );
        assert!(set_in_use(&rules, "office-1.txt"));
        assert!(!set_in_use(&rules, "other.txt"));
        let id = rules.rules()[0].id;
        rules.remove(id).unwrap();
        assert!(!set_in_use(&rules, "office-1.txt"));
    }
}
