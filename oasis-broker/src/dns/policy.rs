//! What the broker answers for a query: pure decisions, no sockets.
//!
//! A name no rule claims is resolved upstream and answered truthfully. A
//! claimed name gets a fake address for A and AAAA, so its flows come to the
//! broker; for HTTPS and SVCB (whose address hints would let a client skip
//! the fake address) and ANY it gets an empty answer. Other types (MX, TXT,
//! ...) carry no addresses of the name and pass through. When the rule's
//! carrier is the underlay, the real answer is as good as a fake one, and
//! cheaper (paper §2.2.4), unless the configuration asks for fakes anyway.

use std::net::IpAddr;

use hickory_proto::rr::{RData, Record, RecordType};
use serde::{Deserialize, Serialize};

use crate::names::NameRules;
use crate::rules::Carrier;

/// What to answer for names claimed by rules whose carrier is the underlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderlayAnswers {
    /// The real address: the flow then never touches Oasis.
    #[default]
    Real,
    /// A fake address: the flow's first packet comes to the broker, which
    /// hands it to the in-kernel NAT (the name shows in `oasis dns`).
    Fake,
}

/// The plan for one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Ask upstream and answer what it says.
    PassThrough,
    /// Ask upstream for the real addresses, answer with a fake one.
    Fake { rule: u32, carrier: Carrier },
    /// Claimed, but this type would reveal the real address: NOERROR, no records.
    NoData { rule: u32 },
}

pub fn plan(qtype: RecordType, claim: Option<(u32, &Carrier)>, underlay: UnderlayAnswers) -> Plan {
    let Some((rule, carrier)) = claim else {
        return Plan::PassThrough;
    };
    if *carrier == Carrier::Underlay && underlay == UnderlayAnswers::Real {
        return Plan::PassThrough;
    }
    match qtype {
        RecordType::A | RecordType::AAAA => Plan::Fake {
            rule,
            carrier: carrier.clone(),
        },
        RecordType::HTTPS | RecordType::SVCB | RecordType::ANY => Plan::NoData { rule },
        _ => Plan::PassThrough,
    }
}

/// A name claimed only through a CNAME (`www.example.com` is an alias of
/// `shop.cdn.net`, and a rule claims `cdn.net`): the first alias target in
/// the upstream answer that a rule claims, with that rule.
pub fn claim_in_chain<'a>(answers: &[Record], names: &'a NameRules) -> Option<(u32, &'a Carrier, String)> {
    if names.is_empty() {
        return None;
    }
    answers.iter().find_map(|record| match record.data() {
        RData::CNAME(target) => {
            let target = crate::names::normalise(&target.0.to_utf8());
            names
                .first_match(&target)
                .map(|(rule, carrier)| (rule, carrier, target))
        }
        _ => None,
    })
}

/// An upstream answer put back into its sections: the records of the
/// query's name and of its alias chain, of the asked type (and the CNAMEs),
/// answer the question; everything else the upstream added (a SRV or MX
/// target's addresses) is additional data. Addresses of names a rule
/// claims are withheld wherever they sit: a client must ask for them, and
/// get the fake address. Returns (answers, additional, withheld).
pub fn sections(
    qname: &str,
    qtype: RecordType,
    records: Vec<Record>,
    names: &NameRules,
) -> (Vec<Record>, Vec<Record>, usize) {
    let owner = |record: &Record| crate::names::normalise(&record.name().to_utf8());
    // The chain: the query's name and every alias target from it on.
    let mut chain = vec![crate::names::normalise(qname)];
    loop {
        let next = records.iter().find_map(|record| match record.data() {
            RData::CNAME(target) if chain.contains(&owner(record)) => {
                let target = crate::names::normalise(&target.0.to_utf8());
                (!chain.contains(&target)).then_some(target)
            }
            _ => None,
        });
        match next {
            Some(target) => chain.push(target),
            None => break,
        }
    }
    let (mut answers, mut additional, mut withheld) = (Vec::new(), Vec::new(), 0);
    for record in records {
        let name = owner(&record);
        let in_chain = chain.contains(&name);
        let is_address = matches!(record.record_type(), RecordType::A | RecordType::AAAA);
        // The question's own addresses were decided by the plan (a claimed
        // name's never reach here); any other claimed name's are withheld.
        if is_address && !(in_chain && record.record_type() == qtype) && names.first_match(&name).is_some() {
            withheld += 1;
            continue;
        }
        if in_chain
            && (record.record_type() == qtype
                || record.record_type() == RecordType::CNAME
                || qtype == RecordType::ANY)
        {
            answers.push(record);
        } else {
            additional.push(record);
        }
    }
    (answers, additional, withheld)
}

/// The addresses of the asked type in an upstream answer (the end of any
/// CNAME chain).
pub fn addresses(answers: &[Record], qtype: RecordType) -> Vec<IpAddr> {
    answers
        .iter()
        .filter_map(|record| match (record.data(), qtype) {
            (RData::A(a), RecordType::A) => Some(IpAddr::V4(a.0)),
            (RData::AAAA(a), RecordType::AAAA) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// The TTL to hand out for upstream records: what is left of their cache
/// lifetime, never more than the record says.
pub fn remaining_ttl(record_ttl: u32, left_secs: u64) -> u32 {
    record_ttl.min(u32::try_from(left_secs).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::NamePattern;
    use crate::rules::NameRule;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, CNAME};
    use std::str::FromStr;

    fn overlay() -> Carrier {
        Carrier::Overlay("detour".into())
    }

    #[test]
    fn unclaimed_names_pass_through() {
        for qtype in [RecordType::A, RecordType::AAAA, RecordType::HTTPS, RecordType::MX] {
            assert_eq!(plan(qtype, None, UnderlayAnswers::Real), Plan::PassThrough);
        }
    }

    #[test]
    fn claimed_names_get_fakes_for_addresses_and_nothing_that_leaks() {
        let via = overlay();
        let claim = Some((7, &via));
        let fake = Plan::Fake {
            rule: 7,
            carrier: via.clone(),
        };
        assert_eq!(plan(RecordType::A, claim, UnderlayAnswers::Real), fake);
        assert_eq!(plan(RecordType::AAAA, claim, UnderlayAnswers::Real), fake);
        for qtype in [RecordType::HTTPS, RecordType::SVCB, RecordType::ANY] {
            assert_eq!(
                plan(qtype, claim, UnderlayAnswers::Real),
                Plan::NoData { rule: 7 }
            );
        }
        assert_eq!(
            plan(RecordType::TXT, claim, UnderlayAnswers::Real),
            Plan::PassThrough
        );
    }

    #[test]
    fn underlay_rules_answer_real_addresses_unless_asked_otherwise() {
        let claim = Some((3, &Carrier::Underlay));
        assert_eq!(
            plan(RecordType::A, claim, UnderlayAnswers::Real),
            Plan::PassThrough
        );
        assert_eq!(
            plan(RecordType::A, claim, UnderlayAnswers::Fake),
            Plan::Fake {
                rule: 3,
                carrier: Carrier::Underlay
            }
        );
    }

    #[test]
    fn a_claimed_alias_target_claims_the_query() {
        let names = NameRules::compile(&[NameRule {
            id: 4,
            pattern: NamePattern::Suffix("cdn.net".into()),
            via: overlay(),
            sender: Default::default(),
        }])
        .unwrap();
        let www = Name::from_str("www.example.com.").unwrap();
        let mid = Name::from_str("edge.example.com.").unwrap();
        let shop = Name::from_str("shop.cdn.net.").unwrap();
        // Two links: the claimed name sits at the end of the chain.
        let answers = vec![
            Record::from_rdata(www.clone(), 60, RData::CNAME(CNAME(mid.clone()))),
            Record::from_rdata(mid, 60, RData::CNAME(CNAME(shop.clone()))),
            Record::from_rdata(shop, 60, RData::A(A::new(192, 0, 2, 7))),
        ];
        assert_eq!(
            claim_in_chain(&answers, &names),
            Some((4, &overlay(), "shop.cdn.net".to_string())),
            "the claimed name is what the carrier comes from"
        );
        assert_eq!(
            addresses(&answers, RecordType::A),
            vec![IpAddr::from([192, 0, 2, 7])]
        );
        assert!(addresses(&answers, RecordType::AAAA).is_empty());
        let plain = vec![Record::from_rdata(www, 60, RData::A(A::new(192, 0, 2, 8)))];
        assert_eq!(claim_in_chain(&plain, &names), None);
    }

    #[test]
    fn ttls_never_outlive_the_cache() {
        assert_eq!(remaining_ttl(300, 20), 20);
        assert_eq!(remaining_ttl(30, 200), 30);
        assert_eq!(remaining_ttl(30, u64::MAX), 30);
    }

    #[test]
    fn srv_targets_go_to_additional_and_claimed_ones_are_withheld() {
        let names = NameRules::compile(&[NameRule {
            id: 4,
            pattern: NamePattern::Suffix("detour.test".into()),
            via: overlay(),
            sender: Default::default(),
        }])
        .unwrap();
        let srv_name = Name::from_str("_sip._udp.example.test.").unwrap();
        let claimed = Name::from_str("www.detour.test.").unwrap();
        let plain = Name::from_str("sip.example.test.").unwrap();
        let srv = |target: &Name| {
            Record::from_rdata(
                srv_name.clone(),
                60,
                RData::SRV(hickory_proto::rr::rdata::SRV::new(0, 0, 5060, target.clone())),
            )
        };
        let records = vec![
            srv(&claimed),
            srv(&plain),
            Record::from_rdata(claimed.clone(), 60, RData::A(A::new(10, 77, 2, 2))),
            Record::from_rdata(plain.clone(), 60, RData::A(A::new(192, 0, 2, 9))),
        ];
        let (answers, additional, withheld) =
            sections("_sip._udp.example.test", RecordType::SRV, records, &names);
        assert_eq!(answers.len(), 2);
        assert!(answers.iter().all(|r| r.record_type() == RecordType::SRV));
        assert_eq!(
            additional.len(),
            1,
            "the unclaimed target's address, as additional data"
        );
        assert_eq!(additional[0].name(), &plain);
        assert_eq!(withheld, 1, "the claimed target's real address never leaves");

        // An A query of an unclaimed name keeps its chain in the answer.
        let alias = Name::from_str("alias.example.test.").unwrap();
        let records = vec![
            Record::from_rdata(alias, 60, RData::CNAME(CNAME(plain.clone()))),
            Record::from_rdata(plain, 60, RData::A(A::new(192, 0, 2, 9))),
        ];
        let (answers, additional, withheld) = sections("alias.example.test", RecordType::A, records, &names);
        assert_eq!((answers.len(), additional.len(), withheld), (2, 0, 0));
    }
}
