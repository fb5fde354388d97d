//! DNS handling of arbitrary messages: what the broker does with an
//! upstream's answer (the alias chain, the sections, claimed names'
//! addresses withheld) never panics, and never lets a claimed name's
//! address through.
#![no_main]

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};
use libfuzzer_sys::fuzz_target;
use oasis_broker::dns::policy::{addresses, claim_in_chain, sections};
use oasis_broker::names::NameRules;
use oasis_broker::names::NamePattern;
use oasis_broker::rules::NameRule;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_vec(data) else {
        return;
    };
    let names = NameRules::compile(&[NameRule {
        id: 1,
        pattern: NamePattern::Suffix("claimed.test".into()),
        via: oasis_broker::rules::Carrier::Underlay,
        sender: Default::default(),
    }])
    .unwrap();
    let mut records = message.answers().to_vec();
    records.extend(message.additionals().iter().cloned());
    let qname = message
        .queries()
        .first()
        .map(|q| q.name().to_utf8())
        .unwrap_or_else(|| "x.test".into());
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::SRV, RecordType::MX] {
        let _ = addresses(&records, qtype);
        let _ = claim_in_chain(&records, &names);
        let (answers, additional, _) = sections(&qname, qtype, records.clone(), &names);
        for record in answers.iter().chain(&additional) {
            let owner = oasis_broker::names::normalise(&record.name().to_utf8());
            let is_address = matches!(record.data(), RData::A(_) | RData::AAAA(_));
            let the_question = owner == oasis_broker::names::normalise(&qname) && record.record_type() == qtype;
            if is_address && !the_question {
                assert!(names.first_match(&owner).is_none(), "a claimed name's address got through: {owner}");
            }
        }
    }
});
