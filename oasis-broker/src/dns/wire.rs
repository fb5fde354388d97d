//! DNS messages as bytes, as far as giving an answer again needs them: a
//! query's question read in place (the key its answer is kept under), and
//! where the TTLs of an encoded response lie. hickory reads and writes
//! messages everywhere else; it has no way to do these two without
//! building a whole message, which is what a repeated query must not cost.
//! Whatever reads here as unusual (compression in a question, several
//! questions, records in a query, an EDNS version other than 0) is `None`,
//! and goes the whole way through hickory.

use std::net::SocketAddr;

/// The fixed header.
pub const HEADER: usize = 12;
const MAX_NAME: usize = 255;
/// Room before the question for the server a query was sent to (a family
/// byte, 16 address bytes, the port).
const SERVER_ROOM: usize = 1 + 16 + 2;
/// Server, name, type, class, EDNS (marker, UDP size, DO).
const MAX_KEY: usize = SERVER_ROOM + MAX_NAME + 2 + 2 + 4;
const OPT: u16 = 41;
/// The EDNS option of RFC 7871.
const CLIENT_SUBNET: u16 = 8;

/// Header bits of byte 2 and 3.
const QR: u8 = 0x80;
const OPCODE: u8 = 0x78;
const TC: u8 = 0x02;
const RD: u8 = 0x01;
const CD: u8 = 0x10;

/// A query's question as read from its bytes, and the key its answer is
/// kept under: the name in lower case, type, class, and what the query
/// said of EDNS (an answer's size limit and OPT record follow from it).
pub struct QueryView {
    pub id: u16,
    /// The query's RD and CD bits, which an answer echoes.
    flags: (u8, u8),
    /// Where the question's name ends (it starts at [`HEADER`]).
    pub name_end: usize,
    key: [u8; MAX_KEY],
    key_start: usize,
    key_len: usize,
}

impl QueryView {
    /// The key: the question as the answer depends on it, led by the
    /// server the query was sent to once [`for_server`](Self::for_server)
    /// said which.
    pub fn key(&self) -> &[u8] {
        &self.key[self.key_start..self.key_len]
    }

    /// Keys the question to `server` as well: an answer a server of the
    /// application's choosing gave is that server's alone.
    pub fn for_server(&mut self, server: SocketAddr) {
        let mut room = [0u8; SERVER_ROOM];
        match server.ip().to_canonical() {
            std::net::IpAddr::V4(v4) => {
                room[0] = 4;
                room[1..5].copy_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => {
                room[0] = 6;
                room[1..17].copy_from_slice(&v6.octets());
            }
        }
        room[17..].copy_from_slice(&server.port().to_be_bytes());
        self.key[..SERVER_ROOM].copy_from_slice(&room);
        self.key_start = 0;
    }
}

/// Reads a plain query: one question, no answer or authority records, at
/// most an OPT record of EDNS version 0, nothing after it.
pub fn read_query(bytes: &[u8]) -> Option<QueryView> {
    if bytes.len() < HEADER {
        return None;
    }
    let (flags, counts) = (&bytes[2..4], &bytes[4..HEADER]);
    if flags[0] & (QR | OPCODE | TC) != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([counts[2 * i], counts[2 * i + 1]]);
    if count(0) != 1 || count(1) != 0 || count(2) != 0 || count(3) > 1 {
        return None;
    }
    let mut view = QueryView {
        id: u16::from_be_bytes([bytes[0], bytes[1]]),
        flags: (flags[0] & RD, flags[1] & CD),
        name_end: 0,
        key: [0; MAX_KEY],
        key_start: SERVER_ROOM,
        key_len: SERVER_ROOM,
    };
    let mut at = HEADER;
    loop {
        let len = usize::from(*bytes.get(at)?);
        // A pointer or a reserved label type: nobody compresses a question.
        if len > 63 || view.key_len - SERVER_ROOM + len + 1 > MAX_NAME {
            return None;
        }
        let label = bytes.get(at..at + 1 + len)?;
        for &byte in label {
            view.key[view.key_len] = byte.to_ascii_lowercase();
            view.key_len += 1;
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    view.name_end = at;
    let type_class = bytes.get(at..at + 4)?;
    view.key[view.key_len..view.key_len + 4].copy_from_slice(type_class);
    view.key_len += 4;
    at += 4;
    let mut edns = [0u8; 4];
    if count(3) == 1 {
        // The root name, type OPT, the UDP size, extended RCODE 0,
        // version 0, the flags, and options (which no answer echoes).
        let opt = bytes.get(at..at + 11)?;
        if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != OPT || opt[5] != 0 || opt[6] != 0 {
            return None;
        }
        let options = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        at += 11;
        let end = at + options;
        while at < end {
            // Code, length, data: each option whole, inside the record.
            let head = bytes.get(at..at + 4)?;
            // Client Subnet is the one option hickory reads (and refuses
            // when malformed); a query with it is left to hickory.
            if u16::from_be_bytes([head[0], head[1]]) == CLIENT_SUBNET {
                return None;
            }
            at += 4 + usize::from(u16::from_be_bytes([head[2], head[3]]));
        }
        if at != end {
            return None;
        }
        edns = [1, opt[3], opt[4], opt[7] & 0x80];
    }
    if at != bytes.len() {
        return None;
    }
    view.key[view.key_len..view.key_len + 4].copy_from_slice(&edns);
    view.key_len += 4;
    Some(view)
}

/// Makes `answer` (a response to a query with the same key) the answer to
/// `query`: its ID, its RD and CD bits, its question's name as it was
/// written (a resolver that varies the case checks it).
pub fn fit(answer: &mut [u8], query: &[u8], view: &QueryView) {
    answer[..2].copy_from_slice(&view.id.to_be_bytes());
    answer[2] = (answer[2] & !RD) | view.flags.0;
    answer[3] = (answer[3] & !CD) | view.flags.1;
    answer[HEADER..view.name_end].copy_from_slice(&query[HEADER..view.name_end]);
}

/// The offsets of the TTL of every record in `response` but OPT's, added
/// to `ttls`; None when the bytes do not read as a response that asks one
/// question, or a TTL lies beyond 64 KiB.
pub fn ttl_offsets(response: &[u8], ttls: &mut Vec<u16>) -> Option<()> {
    if response.len() < HEADER || response[2] & QR == 0 {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([response[4 + 2 * i], response[5 + 2 * i]]));
    if count(0) != 1 {
        return None;
    }
    let mut at = skip_name(response, HEADER)? + 4;
    for _ in 0..count(1) + count(2) + count(3) {
        at = skip_name(response, at)?;
        let fixed = response.get(at..at + 10)?;
        if u16::from_be_bytes([fixed[0], fixed[1]]) != OPT {
            ttls.push(u16::try_from(at + 4).ok()?);
        }
        at += 10 + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    }
    (at == response.len()).then_some(())
}

/// Where the name that starts at `at` ends.
fn skip_name(bytes: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *bytes.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=63 => at += 1 + usize::from(len),
            // A pointer ends the name.
            0xc0..=0xff => {
                bytes.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// The TTL at `offset`.
pub fn ttl_at(bytes: &[u8], offset: u16) -> u32 {
    let at = usize::from(offset);
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

pub fn set_ttl(bytes: &mut [u8], offset: u16, ttl: u32) {
    let at = usize::from(offset);
    bytes[at..at + 4].copy_from_slice(&ttl.to_be_bytes());
}

/// The response code in the header (its low four bits).
pub fn response_code(bytes: &[u8]) -> u8 {
    bytes[3] & 0x0f
}

pub fn truncated(bytes: &[u8]) -> bool {
    bytes[2] & TC != 0
}

pub fn answer_count(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[6], bytes[7]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;

    fn query(name: &str, qtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(0x1234).set_recursion_desired(true);
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some((size, dnssec)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(dnssec);
            message.set_edns(e);
        }
        message.to_vec().unwrap()
    }

    #[test]
    fn a_query_is_keyed_by_its_question_in_lower_case_and_its_edns() {
        let plain = read_query(&query("Www.Example.TEST.", RecordType::A, None)).unwrap();
        let lower = read_query(&query("www.example.test.", RecordType::A, None)).unwrap();
        assert_eq!(plain.key(), lower.key());
        assert_eq!(plain.id, 0x1234);
        for other in [
            query("www.example.test.", RecordType::AAAA, None),
            query("www.example.test.", RecordType::A, Some((1232, false))),
            query("www.example.test.", RecordType::A, Some((1232, true))),
            query("www.example.test.", RecordType::A, Some((4096, false))),
            query("ww.example.test.", RecordType::A, None),
        ] {
            assert_ne!(read_query(&other).unwrap().key(), lower.key());
        }
        let mut to_server = read_query(&query("www.example.test.", RecordType::A, None)).unwrap();
        to_server.for_server("192.0.2.1:53".parse().unwrap());
        assert_ne!(to_server.key(), lower.key());
        assert!(to_server.key().ends_with(lower.key()));
    }

    #[test]
    fn unusual_queries_are_left_to_hickory() {
        let good = query("a.test.", RecordType::A, Some((1232, false)));
        assert!(read_query(&good).is_some());
        // Trailing bytes, a cut message, a response, two questions.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(read_query(&trailing).is_none());
        assert!(read_query(&good[..good.len() - 1]).is_none());
        let mut response = good.clone();
        response[2] |= QR;
        assert!(read_query(&response).is_none());
        let mut two = good.clone();
        two[5] = 2;
        assert!(read_query(&two).is_none());
        // A compression pointer in the question.
        let mut pointer = query("a.test.", RecordType::A, None);
        pointer[HEADER] = 0xc0;
        assert!(read_query(&pointer).is_none());
        // A Client Subnet option (even a malformed one, which hickory
        // answers with FORMERR); a cookie is fine.
        let mut with_option = good.clone();
        let opt = with_option.len() - 11;
        with_option[opt + 10] = 4;
        let mut subnet = with_option.clone();
        subnet.extend_from_slice(&[0, 8, 0, 0]);
        assert!(read_query(&subnet).is_none());
        let mut cookie = with_option;
        cookie.extend_from_slice(&[0, 10, 0, 0]);
        assert!(read_query(&cookie).is_some());
        // EDNS version 1.
        let mut version = good.clone();
        let opt = version.len() - 11;
        version[opt + 6] = 1;
        assert!(read_query(&version).is_none());
        assert!(read_query(&[]).is_none());
    }

    #[test]
    fn an_answer_is_fitted_to_the_query_and_its_ttls_found() {
        let asked = query("Www.Example.TEST.", RecordType::A, None);
        let view = read_query(&asked).unwrap();
        let mut response = Message::new();
        response
            .set_id(9)
            .set_message_type(hickory_proto::op::MessageType::Response);
        response.add_query(Query::query(
            Name::from_str("www.example.test.").unwrap(),
            RecordType::A,
        ));
        let owner = Name::from_str("www.example.test.").unwrap();
        response.add_answer(Record::from_rdata(
            owner.clone(),
            300,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        response.add_answer(Record::from_rdata(owner, 60, RData::A(A::new(192, 0, 2, 2))));
        let soa = SOA::new(
            Name::from_str("example.test.").unwrap(),
            Name::from_str("admin.example.test.").unwrap(),
            1,
            2,
            3,
            4,
            5,
        );
        response.add_name_server(Record::from_rdata(
            Name::from_str("example.test.").unwrap(),
            30,
            RData::SOA(soa),
        ));
        response.set_edns(Edns::new());
        let mut bytes = response.to_vec().unwrap();
        let mut ttls = Vec::new();
        ttl_offsets(&bytes, &mut ttls).unwrap();
        let found: Vec<u32> = ttls.iter().map(|&at| ttl_at(&bytes, at)).collect();
        assert_eq!(found, [300, 60, 30], "the OPT record's TTL field is not a TTL");
        for &at in &ttls {
            let ttl = ttl_at(&bytes, at) - 10;
            set_ttl(&mut bytes, at, ttl);
        }
        fit(&mut bytes, &asked, &view);
        let fitted = Message::from_vec(&bytes).unwrap();
        assert_eq!(fitted.id(), 0x1234);
        assert!(fitted.recursion_desired());
        assert_eq!(fitted.queries()[0].name().to_string(), "Www.Example.TEST.");
        let ttls: Vec<u32> = fitted.answers().iter().map(Record::ttl).collect();
        assert_eq!(ttls, [290, 50]);
        assert_eq!(fitted.name_servers()[0].ttl(), 20);
        assert!(ttl_offsets(&bytes[..bytes.len() - 1], &mut Vec::new()).is_none());
    }
}
