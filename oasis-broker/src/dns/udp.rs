//! DNS over UDP, the way nearly every query comes: a thread per socket
//! (several sockets share the port through SO_REUSEPORT), each taking the
//! queries waiting in one receive and sending their answers in one send
//! (batch.rs). A query asked before is answered from the bytes the thread
//! kept (reuse.rs); one whose answer needs nothing uncached is answered
//! inline; one that must go upstream is asked by the thread itself when
//! it can (ask.rs), else becomes a task on the daemon's main runtime,
//! which answers through a clone of the socket and hands the answer back
//! to be kept. TCP is left to hickory-server (server.rs): it is rare and
//! needs framing.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::Name;

use super::Tally;
use super::ask::{Asking, Query, Settled};
use super::batch::{Incoming, Outgoing};
use super::explicit::Reply;
use super::message::{encode, format_error, refusal};
use super::reuse::{Answers, Keep};
use super::server::{Answer, DnsService, Who};
use super::wire::{self, QueryView};
use crate::fake::unix_now;
use crate::liveness::{TICK_EVERY, Tick};

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
    // The thread blocks in its receive, for a tick at most; answers sent
    // from the main runtime never block (MSG_DONTWAIT).
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(TICK_EVERY))?;
    let listener = socket.local_addr()?;
    let (to_keep, kept) = mpsc::channel();
    let thread = Thread {
        for_misses: Arc::new(socket2::Socket::from(socket.try_clone()?)),
        socket,
        listener,
        service,
        main,
        explicit,
        answers: Answers::default(),
        to_keep,
        kept,
        clock: Clock::new(),
        asking: Asking::default(),
        tally: Tally::default(),
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || thread.serve(&tick))?;
    Ok(())
}

/// A fault the tests can inject (`oasis fault dns-hang`, accepted only by a
/// daemon started with `OASIS_FAULTS=1`): every DNS thread stops answering
/// and ticking, as if stuck.
pub static HANG: AtomicBool = AtomicBool::new(false);

/// What a DNS thread owns: its socket and a clone for answers sent from
/// the main runtime, the answers it keeps, and the channel answers made on
/// the main runtime come back on to be kept.
struct Thread {
    socket: std::net::UdpSocket,
    listener: SocketAddr,
    for_misses: Arc<socket2::Socket>,
    service: Arc<DnsService>,
    main: tokio::runtime::Handle,
    explicit: bool,
    answers: Answers,
    to_keep: mpsc::Sender<ToKeep>,
    kept: mpsc::Receiver<ToKeep>,
    clock: Clock,
    asking: Asking,
    tally: Tally,
}

/// An answer made on the main runtime, for the thread that took its query.
struct ToKeep {
    view: QueryView,
    bytes: Vec<u8>,
    keep: Keep,
    epoch: u64,
    /// When it was made: its TTLs count down from then.
    made: Instant,
}

/// The time, read once a batch: both clocks the answers need (the fake
/// table counts in Unix seconds) from one reading.
struct Clock {
    start: Instant,
    unix_start: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            unix_start: unix_now(),
        }
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_start + now.duration_since(self.start).as_secs()
    }
}

impl Thread {
    fn serve(mut self, tick: &Tick) {
        let mut incoming = Incoming::default();
        let mut outgoing = Outgoing::default();
        let mut settled = Vec::new();
        loop {
            tick.tick();
            if HANG.load(Relaxed) {
                tracing::warn!("DNS thread hanging, as the injected fault asks");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            // Nothing asked: the receive itself waits, one system call.
            let queries_waiting = match self.asking.next_deadline() {
                None => true,
                Some(deadline) => {
                    let longest = deadline.saturating_duration_since(Instant::now()).min(TICK_EVERY);
                    self.asking.wait(&self.socket, longest)
                }
            };
            let n = if queries_waiting {
                match incoming.recv(&self.socket) {
                    Ok(n) => n,
                    Err(e) => {
                        if !matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) {
                            tracing::debug!("DNS socket: {e}");
                        }
                        0
                    }
                }
            } else {
                0
            };
            self.service.counters.queries.fetch_add(n as u64, Relaxed);
            let now = Instant::now();
            // Kept before the batch: its queries may ask them again.
            while let Ok(made) = self.kept.try_recv() {
                self.answers
                    .keep(&made.view, &made.bytes, made.keep, made.epoch, made.made);
            }
            if !self.asking.is_empty() {
                self.asking.settle(now, &mut settled);
                for done in settled.drain(..) {
                    self.settled(done, now, &mut outgoing);
                }
            }
            let epoch = self.service.epoch();
            for i in 0..n {
                if let Some((raw, from)) = incoming.query(i) {
                    self.query(raw, from, now, epoch, &mut outgoing);
                }
            }
            outgoing.send(&self.socket);
            self.service.counters.add(&mut self.tally);
        }
    }

    /// Answers a query whose question the thread asked, or hands it to the
    /// main runtime.
    fn settled(&mut self, done: Settled, now: Instant, outgoing: &mut Outgoing) {
        let (query, upstream) = match done {
            Settled::Answered(asked, upstream) => (asked.query, upstream),
            Settled::HandOver(asked) => {
                return self.answer_later(asked.query, None);
            }
        };
        let question = &query.request.queries()[0];
        let who = self.who(query.from);
        let answer = self
            .service
            .answer_asked(question.name(), question.query_type(), upstream, Some(who));
        let keep = answer.keep.clone();
        let (bytes, truncated) = encode(&query.request, answer);
        if truncated {
            self.service.counters.truncated.fetch_add(1, Relaxed);
        }
        let Some(bytes) = bytes else { return };
        if let (Some(view), Some(keep), false) = (&query.view, keep, truncated) {
            self.answers.keep(view, &bytes, keep, query.epoch, now);
        }
        *outgoing.slot() = bytes;
        outgoing.push(query.from);
    }

    /// Answers one query into `outgoing`, or hands it to the main runtime
    /// when the answer waits for the network.
    fn query(&mut self, raw: &[u8], from: SocketAddr, now: Instant, epoch: u64, outgoing: &mut Outgoing) {
        let service = &self.service;
        // Sent to a server of the application's choosing: that server
        // answers.
        let server = if self.explicit {
            service.route(false, from, self.listener)
        } else {
            None
        };
        let mut view = wire::read_query(raw);
        if let Some(view) = &mut view {
            if let Some(server) = server {
                view.for_server(server);
            }
            let unix = self.clock.unix(now);
            let holds = |outcome: &_| service.still_holds(outcome, unix);
            if let Some(outcome) = self.answers.answer(raw, view, epoch, now, holds, outgoing.slot()) {
                self.tally.again(outcome, server.is_some());
                outgoing.push(from);
                return;
            }
        }
        let request = match Message::from_vec(raw) {
            Ok(request) => request,
            Err(_) => {
                service.counters.refused.fetch_add(1, Relaxed);
                if let Some(reply) = format_error(raw) {
                    *outgoing.slot() = reply;
                    outgoing.push(from);
                }
                return;
            }
        };
        // Answers are never answered: two servers could bounce them forever.
        if request.message_type() == MessageType::Response {
            return;
        }
        if let Some(code) = refusal(request.message_type(), request.op_code(), request.queries().len()) {
            service.counters.refused.fetch_add(1, Relaxed);
            if let (Some(bytes), _) = encode(&request, Answer::code(code)) {
                *outgoing.slot() = bytes;
                outgoing.push(from);
            }
            return;
        }
        let query = &request.queries()[0];
        let (name, qclass, qtype): (Name, _, _) =
            (query.name().clone(), query.query_class(), query.query_type());
        if server.is_none()
            && let Some(answer) = service.answer_now(&name, qclass, qtype, Some(self.who(from)))
        {
            let keep = answer.keep.clone();
            let (bytes, truncated) = encode(&request, answer);
            if truncated {
                service.counters.truncated.fetch_add(1, Relaxed);
            }
            if let Some(bytes) = bytes {
                if let (Some(view), Some(keep), false) = (&view, keep, truncated) {
                    self.answers.keep(view, &bytes, keep, epoch, now);
                }
                *outgoing.slot() = bytes;
                outgoing.push(from);
            }
            return;
        }
        let query = Query {
            request,
            raw: raw.to_vec(),
            from,
            view,
            epoch,
            came: now,
        };
        // Asked of the upstream by this thread: not a name whose carrier
        // resolves it (a WireGuard overlay's own server, through the tunnel).
        if server.is_none()
            && let Some(direct) = self.service.direct()
            && self.asking.open(now)
            && !self.service.resolved_by_carrier(&name, qtype)
        {
            if let Some(query) = self.asking.ask(direct, query, service.timeout, now) {
                self.answer_later(query, None);
            }
            return;
        }
        self.answer_later(query, server);
    }

    fn who(&self, client: SocketAddr) -> Who {
        Who {
            tcp: false,
            client,
            listener: self.listener,
        }
    }

    /// The answer waits for the network: made on the main runtime, sent
    /// from there, and handed back to this thread to be kept.
    fn answer_later(&self, query: Query, server: Option<SocketAddr>) {
        let Query {
            request,
            raw,
            from,
            view,
            epoch,
            came,
        } = query;
        let budget = self.service.timeout.saturating_sub(came.elapsed());
        let who = Some(self.who(from));
        let (socket, service, to_keep) = (
            self.for_misses.clone(),
            self.service.clone(),
            self.to_keep.clone(),
        );
        self.main.spawn(async move {
            let (bytes, keep) = match server {
                Some(server) => match service.answer_from(server, &request, &raw, who).await {
                    Reply::Raw { bytes, personal } => {
                        let keep = super::reuse::raw_keep(&bytes, Instant::now()).filter(|_| !personal);
                        (Some(bytes), keep)
                    }
                    Reply::Answer(answer) => {
                        let keep = answer.keep.clone();
                        (encode(&request, answer).0, keep)
                    }
                },
                None => {
                    let query = &request.queries()[0];
                    let name: Name = query.name().clone();
                    let answer = service
                        .answer(&name, query.query_class(), query.query_type(), budget, who)
                        .await;
                    let keep = answer.keep.clone();
                    let (bytes, truncated) = encode(&request, answer);
                    if truncated {
                        service.counters.truncated.fetch_add(1, Relaxed);
                    }
                    (bytes, keep.filter(|_| !truncated))
                }
            };
            let Some(bytes) = bytes else {
                return;
            };
            // Handed back before the client has it: its next query finds
            // it kept.
            if let (Some(view), Some(keep)) = (view, keep) {
                let _ = to_keep.send(ToKeep {
                    view,
                    bytes: bytes.clone(),
                    keep,
                    epoch,
                    made: Instant::now(),
                });
            }
            // A full socket buffer drops the answer, as a busy network
            // would; the client asks again.
            if let Err(e) = socket.send_to_with_flags(&bytes, &from.into(), DONTWAIT) {
                tracing::debug!(%from, "sending a DNS answer: {e}");
            }
        });
    }
}

#[cfg(unix)]
const DONTWAIT: libc::c_int = libc::MSG_DONTWAIT;
/// Windows has no per-call flag; its sends of a datagram do not wait.
#[cfg(not(unix))]
const DONTWAIT: std::ffi::c_int = 0;
