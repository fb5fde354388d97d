//! A response as the client gets it: refusals of what is not a plain
//! query, the answer cut to what the client takes over UDP, FORMERR for
//! what does not parse.

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};

use super::server::Answer;

/// Without EDNS a UDP answer may be at most 512 bytes (RFC 1035).
const CLASSIC_UDP_LIMIT: u16 = 512;
/// The most we send to EDNS clients, whatever they offer: the size that
/// avoids IP fragmentation on nearly every path.
pub const EDNS_UDP_LIMIT: u16 = 1232;

/// Why a message gets no answer of its own.
pub(super) fn refusal(message_type: MessageType, op_code: OpCode, questions: usize) -> Option<ResponseCode> {
    if op_code != OpCode::Query {
        Some(ResponseCode::NotImp)
    } else if message_type != MessageType::Query || questions != 1 {
        Some(ResponseCode::FormErr)
    } else {
        None
    }
}

/// The response to `request`, cut to what the client can take over UDP:
/// too big, it goes out with no records and the TC flag, and the client
/// asks again over TCP. Returns the bytes and whether it was truncated.
pub(super) fn encode(request: &Message, answer: Answer) -> (Option<Vec<u8>>, bool) {
    let mut header = Header::response_from_request(request.header());
    header.set_recursion_available(true);
    header.set_authoritative(false);
    header.set_response_code(answer.code);
    let mut response = Message::new();
    response.set_header(header);
    response.add_queries(request.queries().iter().cloned());
    let limit = match request.extensions() {
        Some(edns) => {
            let limit = edns.max_payload().clamp(CLASSIC_UDP_LIMIT, EDNS_UDP_LIMIT);
            let mut ours = Edns::new();
            ours.set_max_payload(limit);
            ours.set_version(0);
            // RFC 3225: the DO bit is echoed.
            ours.set_dnssec_ok(edns.flags().dnssec_ok);
            response.set_edns(ours);
            limit
        }
        None => CLASSIC_UDP_LIMIT,
    };
    let had_records = !(answer.answers.is_empty() && answer.authority.is_empty());
    response.add_answers(answer.answers);
    response.add_name_servers(answer.authority);
    response.add_additionals(answer.additional);
    // Additional data is the first to go when the answer does not fit (it
    // needs no TC flag: the client can ask for it).
    if response.additional_count() > 0 && response.to_vec().is_ok_and(|b| b.len() > usize::from(limit)) {
        response.take_additionals();
    }
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= usize::from(limit) || !had_records => (Some(bytes), false),
        Ok(_) => {
            response.take_answers();
            response.take_name_servers();
            response.take_additionals();
            response.set_truncated(true);
            (response.to_vec().ok(), true)
        }
        Err(e) => {
            tracing::debug!("encoding a DNS answer: {e}");
            (format_error_with(request.id(), ResponseCode::ServFail), false)
        }
    }
}

/// FORMERR for a message that does not parse but has a header to answer to.
pub(super) fn format_error(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
        // No header, or a response: silence.
        return None;
    }
    format_error_with(u16::from_be_bytes([bytes[0], bytes[1]]), ResponseCode::FormErr)
}

fn format_error_with(id: u16, code: ResponseCode) -> Option<Vec<u8>> {
    let mut header = Header::new();
    header.set_id(id);
    header.set_message_type(MessageType::Response);
    header.set_response_code(code);
    let mut message = Message::new();
    message.set_header(header);
    message.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    use std::str::FromStr;

    fn query(edns: Option<u16>) -> Message {
        let mut message = Message::new();
        message.set_id(77);
        message.add_query(Query::query(Name::from_str("big.test.").unwrap(), RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            message.set_edns(e);
        }
        message
    }

    fn many(n: u8) -> Answer {
        Answer {
            code: ResponseCode::NoError,
            answers: (0..n)
                .map(|i| {
                    Record::from_rdata(
                        Name::from_str("big.test.").unwrap(),
                        60,
                        RData::A(A::new(10, 0, 0, i)),
                    )
                })
                .collect(),
            authority: Vec::new(),
            additional: Vec::new(),
            keep: None,
        }
    }

    #[test]
    fn big_answers_are_truncated_to_what_the_client_takes() {
        let (bytes, truncated) = encode(&query(None), many(40));
        let reply = Message::from_vec(&bytes.unwrap()).unwrap();
        assert!(truncated && reply.truncated() && reply.answers().is_empty());
        assert_eq!(reply.id(), 77);
        // 40 A records fit an EDNS client's 1232 bytes.
        let (bytes, truncated) = encode(&query(Some(4096)), many(40));
        let reply = Message::from_vec(&bytes.unwrap()).unwrap();
        assert!(!truncated && !reply.truncated());
        assert_eq!(reply.answers().len(), 40);
        assert_eq!(reply.max_payload(), EDNS_UDP_LIMIT);
        let (_, truncated) = encode(&query(Some(4096)), many(120));
        assert!(truncated);
    }

    #[test]
    fn odd_messages_get_errors_or_silence() {
        assert_eq!(refusal(MessageType::Query, OpCode::Query, 1), None);
        assert_eq!(
            refusal(MessageType::Query, OpCode::Query, 2),
            Some(ResponseCode::FormErr)
        );
        assert_eq!(
            refusal(MessageType::Query, OpCode::Update, 1),
            Some(ResponseCode::NotImp)
        );
        let garbage = [0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 9, 9];
        let reply = Message::from_vec(&format_error(&garbage).unwrap()).unwrap();
        assert_eq!(
            (reply.id(), reply.response_code()),
            (0x1234, ResponseCode::FormErr)
        );
        assert!(format_error(&[1, 2, 3]).is_none());
        let response_bit = [0x12, 0x34, 0x81, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(format_error(&response_bit).is_none());
    }
}
