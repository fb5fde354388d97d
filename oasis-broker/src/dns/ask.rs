//! Questions a DNS thread asks the upstream itself. Handing a miss to the
//! main runtime and the resolver costs a wake-up of another thread there
//! and another back, the better part of an uncached lookup's time on a
//! small machine. So the thread that took the query sends the question to
//! the first upstream server over a socket of its own (a fresh source port
//! and a random ID per question, as a resolver must, against spoofed
//! answers) and answers when the response comes back.
//!
//! What this cannot do well is handed to the resolver on the main runtime
//! (udp.rs `answer_later`), which asks again: a truncated response (TCP),
//! SERVFAIL or REFUSED (the resolver tries the other servers), a response
//! that does not parse, and a server silent for half the upstream timeout,
//! after which the thread leaves misses to the resolver for [`PAUSE`]. The
//! resolver has what is left of the timeout: a silent upstream still gets
//! the client its SERVFAIL within `dns.upstream_timeout_ms`. Upstreams
//! over TCP, TLS or HTTPS and local stubs never come here
//! ([`Resolving::direct`](super::upstream::Resolving)).

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};

use super::cache::Upstream;
use super::message::EDNS_UDP_LIMIT;
use super::wire::{self, QueryView};

/// Most questions one thread has out at once; more go to the resolver.
const MOST_ASKED: usize = 256;
/// How long a thread leaves misses to the resolver after its server did
/// not answer in time.
pub const PAUSE: Duration = Duration::from_secs(10);
/// Room for a response: we offer [`EDNS_UDP_LIMIT`], and a larger one
/// comes truncated; a response cut by this buffer fails to parse.
const RESPONSE_ROOM: usize = 4096;

/// A query the thread took, waiting for its answer.
pub(super) struct Query {
    pub request: Message,
    pub raw: Vec<u8>,
    pub from: SocketAddr,
    pub view: Option<QueryView>,
    /// The service's epoch when it came: an answer is kept under it.
    pub epoch: u64,
    /// When it came: the upstream timeout counts from then.
    pub came: Instant,
}

/// A query whose question the thread asked its server.
pub(super) struct Asked {
    pub query: Query,
    socket: UdpSocket,
    /// The ID of our question, not the client's.
    id: u16,
    deadline: Instant,
}

/// How an asked question ended.
pub(super) enum Settled {
    /// The server's word, to be answered by the policy.
    Answered(Asked, Upstream),
    /// For the resolver to ask.
    HandOver(Asked),
}

/// The questions one thread has out.
pub(super) struct Asking {
    asked: Vec<Asked>,
    paused_until: Option<Instant>,
    response: Vec<u8>,
    #[cfg(unix)]
    polled: Vec<libc::pollfd>,
}

impl Default for Asking {
    fn default() -> Self {
        Asking {
            asked: Vec::new(),
            paused_until: None,
            response: vec![0; RESPONSE_ROOM],
            #[cfg(unix)]
            polled: Vec::new(),
        }
    }
}

impl Asking {
    pub fn is_empty(&self) -> bool {
        self.asked.is_empty()
    }

    /// Whether the thread asks for itself now.
    pub fn open(&self, now: Instant) -> bool {
        cfg!(unix) && self.asked.len() < MOST_ASKED && self.paused_until.is_none_or(|until| now >= until)
    }

    /// Sends the query's question to `server`; gives the query back when
    /// it cannot be sent (the resolver then asks).
    pub fn ask(
        &mut self,
        server: SocketAddr,
        query: Query,
        timeout: Duration,
        now: Instant,
    ) -> Option<Query> {
        let id = rand::random::<u16>();
        let sent = question(&query.request, id).and_then(|bytes| {
            let local: SocketAddr = if server.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(local).ok()?;
            socket.connect(server).ok()?;
            socket.set_nonblocking(true).ok()?;
            socket.send(&bytes).ok()?;
            Some(socket)
        });
        let Some(socket) = sent else {
            return Some(query);
        };
        self.asked.push(Asked {
            query,
            socket,
            id,
            deadline: now + timeout / 2,
        });
        None
    }

    /// When the next question times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.asked.iter().map(|asked| asked.deadline).min()
    }

    /// Waits up to `longest` for queries on `listener` or responses to what
    /// was asked; returns whether queries are waiting.
    #[cfg(unix)]
    pub fn wait(&mut self, listener: &UdpSocket, longest: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let polled = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        self.polled.clear();
        self.polled.push(polled(listener.as_raw_fd()));
        self.polled
            .extend(self.asked.iter().map(|asked| polled(asked.socket.as_raw_fd())));
        let millis = longest.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `polled` is a live array of as many pollfds as passed.
        let ready = unsafe {
            libc::poll(
                self.polled.as_mut_ptr(),
                self.polled.len() as libc::nfds_t,
                millis,
            )
        };
        ready > 0 && self.polled[0].revents != 0
    }

    #[cfg(not(unix))]
    pub fn wait(&mut self, _listener: &UdpSocket, _longest: Duration) -> bool {
        true
    }

    /// The questions that got their response or ran out of time, into
    /// `settled`.
    pub fn settle(&mut self, now: Instant, settled: &mut Vec<Settled>) {
        let mut i = 0;
        while i < self.asked.len() {
            match self.response_to(i) {
                Some(Some(upstream)) => settled.push(Settled::Answered(self.asked.swap_remove(i), upstream)),
                Some(None) => settled.push(Settled::HandOver(self.asked.swap_remove(i))),
                None if now >= self.asked[i].deadline => {
                    tracing::debug!(
                        server = ?self.asked[i].socket.peer_addr().ok(),
                        "the upstream did not answer in time: misses go to the resolver for a while"
                    );
                    self.paused_until = Some(now + PAUSE);
                    settled.push(Settled::HandOver(self.asked.swap_remove(i)));
                }
                None => i += 1,
            }
        }
    }

    /// Question `i`'s response if one came: the server's word, or None when
    /// the resolver must ask. Datagrams that are not the response (another
    /// ID, another question) are dropped.
    fn response_to(&mut self, i: usize) -> Option<Option<Upstream>> {
        let asked = &self.asked[i];
        loop {
            let len = match asked.socket.recv(&mut self.response) {
                Ok(len) => len,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                // Refused (ICMP unreachable) or worse: the resolver asks.
                Err(_) => return Some(None),
            };
            let bytes = &self.response[..len];
            if len < wire::HEADER || u16::from_be_bytes([bytes[0], bytes[1]]) != asked.id {
                continue;
            }
            if wire::truncated(bytes) {
                return Some(None);
            }
            let Ok(response) = Message::from_vec(bytes) else {
                return Some(None);
            };
            if response.message_type() != MessageType::Response
                || response.queries() != asked.query.request.queries()
            {
                continue;
            }
            return match response.response_code() {
                ResponseCode::ServFail | ResponseCode::Refused => Some(None),
                _ => Some(Some(Upstream::from_response(&response))),
            };
        }
    }
}

/// Our question for `request`'s: as the resolver would ask it (recursion
/// desired, EDNS with our size), not the client's bytes, whose flags and
/// options would shape an answer that the cache then gives to everyone.
fn question(request: &Message, id: u16) -> Option<Vec<u8>> {
    question_of(request.queries().first()?.clone(), id)
}

/// Our question about `query`, with `id` (also for a carrier's own server,
/// dns/carrier.rs).
pub(super) fn question_of(query: hickory_proto::op::Query, id: u16) -> Option<Vec<u8>> {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_UDP_LIMIT);
    edns.set_version(0);
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(query)
        .set_edns(edns);
    message.to_vec().ok()
}

#[cfg(all(test, unix))]
mod tests {
    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};

    use super::*;

    /// A server on loopback for the questions, and a query for `name` from
    /// an application.
    fn setup(name: &str) -> (UdpSocket, Query) {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = Message::new();
        request
            .set_id(4242)
            .set_recursion_desired(true)
            .add_query(Question::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let raw = request.to_vec().unwrap();
        let query = Query {
            request,
            raw,
            from: "127.0.0.1:9".parse().unwrap(),
            view: None,
            epoch: 7,
            came: Instant::now(),
        };
        (server, query)
    }

    /// What the server received, and from where.
    fn received(server: &UdpSocket) -> (Message, SocketAddr) {
        let mut buf = [0u8; 4096];
        let (len, from) = server.recv_from(&mut buf).unwrap();
        (Message::from_vec(&buf[..len]).unwrap(), from)
    }

    fn response_to(question: &Message, code: ResponseCode, address: Option<[u8; 4]>) -> Vec<u8> {
        let mut response = Message::new();
        response
            .set_id(question.id())
            .set_message_type(MessageType::Response)
            .set_response_code(code)
            .add_queries(question.queries().iter().cloned());
        if let Some(address) = address {
            response.add_answer(Record::from_rdata(
                question.queries()[0].name().clone(),
                60,
                RData::A(A::from(std::net::Ipv4Addr::from(address))),
            ));
        }
        response.to_vec().unwrap()
    }

    /// Settles until something settles or five seconds pass.
    fn settle(asking: &mut Asking, now: Instant) -> Vec<Settled> {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut settled = Vec::new();
        let until = Instant::now() + Duration::from_secs(5);
        while settled.is_empty() && Instant::now() < until {
            asking.wait(&listener, Duration::from_millis(100));
            asking.settle(now, &mut settled);
        }
        settled
    }

    #[test]
    fn the_answer_comes_to_our_question_only() {
        let (server, query) = setup("www.example.com.");
        let mut asking = Asking::default();
        let now = Instant::now();
        assert!(asking.open(now));
        let server_addr = server.local_addr().unwrap();
        assert!(
            asking
                .ask(server_addr, query, Duration::from_secs(2), now)
                .is_none()
        );
        let (question, from) = received(&server);
        assert_ne!(question.id(), 4242, "the client's ID must not be the question's");
        assert!(question.recursion_desired());
        assert_eq!(question.max_payload(), EDNS_UDP_LIMIT);
        // A datagram with another ID (a spoofing attempt) is not the answer.
        let mut spoofed = response_to(&question, ResponseCode::NoError, Some([6, 6, 6, 6]));
        spoofed[..2].copy_from_slice(&question.id().wrapping_add(1).to_be_bytes());
        server.send_to(&spoofed, from).unwrap();
        server
            .send_to(
                &response_to(&question, ResponseCode::NoError, Some([192, 0, 2, 1])),
                from,
            )
            .unwrap();
        let settled = settle(&mut asking, now);
        let [Settled::Answered(asked, Upstream::Records(records))] = &settled[..] else {
            panic!("not answered with records");
        };
        assert_eq!(asked.query.epoch, 7);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].data(), &RData::A(A::new(192, 0, 2, 1)));
        assert!(asking.is_empty());
    }

    #[test]
    fn what_the_resolver_does_better_is_handed_over() {
        let (server, query) = setup("nxdomain.example.");
        let server_addr = server.local_addr().unwrap();
        let mut asking = Asking::default();
        let now = Instant::now();
        // NXDOMAIN is the server's word, answered here.
        asking.ask(server_addr, query, Duration::from_secs(2), now);
        let (question, from) = received(&server);
        server
            .send_to(&response_to(&question, ResponseCode::NXDomain, None), from)
            .unwrap();
        let settled = settle(&mut asking, now);
        assert!(matches!(
            &settled[..],
            [Settled::Answered(
                _,
                Upstream::Negative {
                    code: ResponseCode::NXDomain,
                    ..
                }
            )]
        ));
        // SERVFAIL and a truncated answer go to the resolver.
        for truncate in [false, true] {
            let (_, query) = setup("again.example.");
            asking.ask(server_addr, query, Duration::from_secs(2), now);
            let (question, from) = received(&server);
            let mut bytes = response_to(
                &question,
                if truncate {
                    ResponseCode::NoError
                } else {
                    ResponseCode::ServFail
                },
                None,
            );
            if truncate {
                bytes[2] |= 0x02;
            }
            server.send_to(&bytes, from).unwrap();
            let settled = settle(&mut asking, now);
            assert!(
                matches!(&settled[..], [Settled::HandOver(_)]),
                "truncated: {truncate}"
            );
        }
        assert!(asking.open(now), "answers that came do not pause asking");
    }

    #[test]
    fn a_silent_server_hands_over_and_pauses_asking() {
        let (server, query) = setup("slow.example.");
        let mut asking = Asking::default();
        let now = Instant::now();
        asking.ask(
            server.local_addr().unwrap(),
            query,
            Duration::from_millis(100),
            now,
        );
        assert_eq!(
            asking.next_deadline(),
            Some(now + Duration::from_millis(50)),
            "half the timeout"
        );
        let mut settled = Vec::new();
        asking.settle(now, &mut settled);
        assert!(settled.is_empty(), "settled before its time");
        asking.settle(now + Duration::from_millis(50), &mut settled);
        assert!(matches!(&settled[..], [Settled::HandOver(_)]));
        let later = now + Duration::from_millis(50);
        assert!(!asking.open(later), "a silent server must pause asking");
        assert!(asking.open(later + PAUSE));
    }
}
