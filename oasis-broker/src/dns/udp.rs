//! DNS over UDP, the way nearly every query comes: a thread per socket
//! (several sockets share the port through SO_REUSEPORT), each with a
//! single-threaded runtime of its own, so a query wakes the thread that
//! answers it and no other. A query whose answer needs nothing uncached is
//! answered inline, without a task or a channel; one that must go upstream
//! becomes a task on the daemon's main runtime, which answers through a
//! plain clone of the socket. TCP is left to hickory-server (server.rs): it
//! is rare and needs framing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::Name;
use tokio::net::UdpSocket;

use super::explicit::Reply;
use super::server::{Answer, DnsService};
use crate::liveness::{TICK_EVERY, Tick};

/// Without EDNS a UDP answer may be at most 512 bytes (RFC 1035).
const CLASSIC_UDP_LIMIT: u16 = 512;
/// The most we send to EDNS clients, whatever they offer: the size that
/// avoids IP fragmentation on nearly every path.
pub const EDNS_UDP_LIMIT: u16 = 1232;
const RECEIVE_BUFFER: usize = 4096;

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

/// Runs one socket's loop on a thread of its own until the process ends.
/// The loop ticks `tick` at least every [`TICK_EVERY`]: a thread that
/// stops answering stops the DNS heartbeat, and the DNS hooks fail open.
pub fn spawn_thread(
    name: String,
    socket: std::net::UdpSocket,
    service: Arc<DnsService>,
    main: tokio::runtime::Handle,
    explicit: bool,
    tick: Tick,
) -> std::io::Result<()> {
    let for_misses = Arc::new(socket.try_clone()?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new().name(name).spawn(move || {
        runtime.block_on(async move {
            match UdpSocket::from_std(socket) {
                Ok(socket) => serve(socket, for_misses, service, main, explicit, tick).await,
                Err(e) => tracing::error!("DNS socket: {e}"),
            }
        })
    })?;
    Ok(())
}

/// A fault the tests can inject (`oasis fault dns-hang`, accepted only by a
/// daemon started with `OASIS_FAULTS=1`): every DNS thread stops answering
/// and ticking, as if stuck.
pub static HANG: AtomicBool = AtomicBool::new(false);

async fn serve(
    socket: UdpSocket,
    for_misses: Arc<std::net::UdpSocket>,
    service: Arc<DnsService>,
    main: tokio::runtime::Handle,
    explicit: bool,
    tick: Tick,
) {
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    let Ok(listener) = socket.local_addr() else {
        return;
    };
    loop {
        tick.tick();
        if HANG.load(Relaxed) {
            tracing::warn!("DNS thread hanging, as the injected fault asks");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let received = tokio::time::timeout(TICK_EVERY, socket.recv_from(&mut buf)).await;
        let (len, from) = match received {
            Err(_) => continue,
            Ok(Ok(received)) => received,
            Ok(Err(e)) => {
                tracing::debug!("DNS socket: {e}");
                continue;
            }
        };
        service.counters.queries.fetch_add(1, Relaxed);
        let request = match Message::from_vec(&buf[..len]) {
            Ok(request) => request,
            Err(_) => {
                service.counters.refused.fetch_add(1, Relaxed);
                if let Some(reply) = format_error(&buf[..len]) {
                    let _ = socket.send_to(&reply, from).await;
                }
                continue;
            }
        };
        // Answers are never answered: two servers could bounce them forever.
        if request.message_type() == MessageType::Response {
            continue;
        }
        if let Some(code) = refusal(request.message_type(), request.op_code(), request.queries().len()) {
            service.counters.refused.fetch_add(1, Relaxed);
            send(&socket, &service, &request, Answer::code(code), from).await;
            continue;
        }
        // Sent to a server of the application's choosing: that server
        // answers (on the main runtime: it waits for the network).
        if explicit && let Some(server) = service.route(false, from, listener) {
            let (socket, service, raw) = (for_misses.clone(), service.clone(), buf[..len].to_vec());
            main.spawn(async move {
                let bytes = match service.answer_from(server, &request, &raw).await {
                    Reply::Raw(bytes) => Some(bytes),
                    Reply::Answer(answer) => encode(&request, answer).0,
                };
                if let Some(bytes) = bytes
                    && let Err(e) = socket.send_to(&bytes, from)
                {
                    tracing::debug!(%from, "sending a DNS answer: {e}");
                }
            });
            continue;
        }
        let query = &request.queries()[0];
        let (name, qclass, qtype): (Name, _, _) =
            (query.name().clone(), query.query_class(), query.query_type());
        match service.answer_now(&name, qclass, qtype) {
            Some(answer) => send(&socket, &service, &request, answer, from).await,
            None => {
                let socket = for_misses.clone();
                let service = service.clone();
                main.spawn(async move {
                    let answer = service.answer(&name, qclass, qtype).await;
                    let (bytes, truncated) = encode(&request, answer);
                    if truncated {
                        service.counters.truncated.fetch_add(1, Relaxed);
                    }
                    // A non-blocking send: a full socket buffer drops the
                    // answer, as a busy network would; the client retries.
                    if let Some(bytes) = bytes
                        && let Err(e) = socket.send_to(&bytes, from)
                    {
                        tracing::debug!(%from, "sending a DNS answer: {e}");
                    }
                });
            }
        }
    }
}

async fn send(socket: &UdpSocket, service: &DnsService, request: &Message, answer: Answer, to: SocketAddr) {
    let (bytes, truncated) = encode(request, answer);
    if truncated {
        service.counters.truncated.fetch_add(1, Relaxed);
    }
    if let Some(bytes) = bytes
        && let Err(e) = socket.send_to(&bytes, to).await
    {
        tracing::debug!(%to, "sending a DNS answer: {e}");
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
fn format_error(bytes: &[u8]) -> Option<Vec<u8>> {
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
