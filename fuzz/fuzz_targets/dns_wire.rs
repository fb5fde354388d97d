//! The DNS threads' own reading of queries and answers (dns/wire.rs),
//! checked against hickory's: a query the fast reading accepts is one
//! hickory reads too, with the same question and EDNS, and an answer
//! fitted to it says what hickory would; TTL offsets found in any bytes
//! lie inside them.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use oasis_broker::dns::wire;

fuzz_target!(|data: &[u8]| {
    let mut ttls = Vec::new();
    if wire::ttl_offsets(data, &mut ttls).is_some() {
        for &at in &ttls {
            assert!(usize::from(at) + 4 <= data.len());
        }
    }
    let Some(view) = wire::read_query(data) else {
        return;
    };
    let message = Message::from_vec(data).expect("hickory reads what the fast reading accepts");
    assert_eq!(message.queries().len(), 1);
    assert_eq!(message.id(), view.id);
    let question = &message.queries()[0];
    // The key starts with the name in lower case, then type and class.
    let mut name = Vec::new();
    for label in question.name().to_lowercase().iter() {
        name.push(label.len() as u8);
        name.extend_from_slice(label);
    }
    name.push(0);
    let key = view.key();
    assert_eq!(&key[..name.len()], &name[..]);
    let rest = &key[name.len()..];
    assert_eq!(u16::from_be_bytes([rest[0], rest[1]]), u16::from(question.query_type()));
    assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), u16::from(question.query_class()));
    match message.extensions() {
        Some(edns) => {
            assert_eq!(rest[4], 1);
            let size = u16::from_be_bytes([rest[5], rest[6]]);
            assert_eq!(size.max(512), edns.max_payload().max(512));
            assert_eq!(rest[7] != 0, edns.flags().dnssec_ok);
        }
        None => assert_eq!(&rest[4..], &[0, 0, 0, 0]),
    }
    assert_eq!(view.name_end, 12 + name.len());
});
