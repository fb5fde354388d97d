//! One WireGuard peer's tunnel: boringtun's protocol core (the Noise
//! handshake, cookies, rekeying, keepalives, the AEAD and replay window)
//! behind a lock, and what this host knows of its health. Callers take the
//! lock once per batch of packets, never per packet, and do the I/O.
//!
//! Health is ours, not the protocol's: a peer whose handshake goes
//! unanswered for [`DOWN_AFTER`] is down, so the overlay carries no new
//! flow; while down, a handshake is tried again every [`DOWN_AFTER`].

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// An unanswered handshake marks the peer down after this long.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);
/// What a data message adds to a packet: type, receiver, counter, tag.
pub const DATA_OVERHEAD: usize = 32;
/// The smallest buffer a seal or an open may be given: a handshake
/// initiation is 148 bytes.
pub const MIN_BUFFER: usize = 148;

/// The next tunnel's index: each tunnel of a process has its own, the top
/// 24 bits of its sessions' ids (boringtun keeps the low 8).
static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);

fn next_index() -> u32 {
    let start = NEXT_INDEX.load(Relaxed);
    if start == 0 {
        // A random start: restarts do not reuse the last run's ids.
        let _ = NEXT_INDEX.compare_exchange(0, rand::random::<u32>() & 0x7f_ffff | 1, Relaxed, Relaxed);
    }
    NEXT_INDEX.fetch_add(1, Relaxed) & 0xff_ffff
}

/// How a peer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// A handshake is under way and not yet overdue.
    Connecting,
    /// A session is established.
    Up,
    /// No session and nothing to send: the next packet starts a handshake.
    Idle,
    /// The last handshake went unanswered for [`DOWN_AFTER`].
    Down(DownWhy),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownWhy {
    /// Nothing came back: the peer is not there, a firewall drops the
    /// datagrams, or the peer does not know this host's key.
    NoAnswer,
    /// Datagrams came back and failed to authenticate: a wrong key on
    /// one side, or someone else's datagrams.
    Refused,
}

impl Health {
    /// Whether new flows may take the peer.
    pub fn carries(self) -> bool {
        !matches!(self, Health::Down(_))
    }

    fn code(self) -> u8 {
        match self {
            Health::Connecting => 0,
            Health::Up => 1,
            Health::Idle => 2,
            Health::Down(DownWhy::NoAnswer) => 3,
            Health::Down(DownWhy::Refused) => 4,
        }
    }

    fn from_code(code: u8) -> Health {
        match code {
            0 => Health::Connecting,
            1 => Health::Up,
            2 => Health::Idle,
            3 => Health::Down(DownWhy::NoAnswer),
            _ => Health::Down(DownWhy::Refused),
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Connecting => "handshaking",
            Health::Up => "up",
            Health::Idle => "idle (the next packet starts a handshake)",
            Health::Down(DownWhy::NoAnswer) => {
                "down: the peer does not answer the handshake (is it running, is its Endpoint right, does it know our public key?)"
            }
            Health::Down(DownWhy::Refused) => {
                "down: the peer's answers fail to authenticate (check PublicKey and PresharedKey)"
            }
        })
    }
}

/// What one datagram from the peer was.
#[derive(Debug)]
pub enum Opened<'b> {
    /// A packet from the tunnel.
    Packet(&'b mut [u8]),
    /// A protocol message to send back to the peer (a handshake response,
    /// a cookie, a keepalive); then [`Sealer::flush`] the packets that
    /// waited for the session.
    Reply(&'b [u8]),
    /// Nothing for anyone (a keepalive, a cookie taken).
    Nothing,
    /// Dropped: forged, replayed, or for no session of ours.
    Rejected(WireGuardError),
}

/// Counters and health, readable without the lock.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Packets sealed and datagrams opened into packets.
    pub sealed: AtomicU64,
    pub opened: AtomicU64,
    /// Datagrams dropped as forged, replayed or unknown.
    pub rejected: AtomicU64,
    /// Handshakes completed.
    pub handshakes: AtomicU64,
}

/// A snapshot for `overlay show`.
#[derive(Clone, Debug)]
pub struct TunnelStatus {
    pub health: Health,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub sealed: u64,
    pub opened: u64,
    pub rejected: u64,
    pub handshakes: u64,
}

struct Inner {
    tunn: Tunn,
    /// When the handshake now unanswered was started; None while a
    /// session is up or nothing was asked.
    attempt_since: Option<Instant>,
    /// Rejected datagrams when that attempt started.
    rejected_at_attempt: u64,
    /// When a handshake was last tried while down.
    last_forced: Option<Instant>,
    /// Whether a handshake was ever tried: the first tick tries one.
    started: bool,
}

pub struct Tunnel {
    inner: Mutex<Inner>,
    peer: PublicKey,
    /// The top 24 bits of this tunnel's session ids: a peer's messages
    /// after the handshake name it.
    index: u32,
    /// This side starts handshakes (a client's tunnel): it starts one on
    /// its first tick and retries while the peer is down. A responder's
    /// tunnel waits for its peer.
    initiator: bool,
    health: AtomicU8,
    pub counters: TunnelCounters,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("peer", &self.peer)
            .field("health", &self.health())
            .finish()
    }
}

impl Tunnel {
    pub fn new(
        own: &PrivateKey,
        peer: PublicKey,
        preshared: Option<&PresharedKey>,
        keepalive: Option<u16>,
    ) -> Tunnel {
        let mut tunnel = Tunnel::with_limiter(own, peer, preshared, keepalive, None);
        tunnel.initiator = true;
        tunnel
    }

    /// A tunnel whose handshakes count against `limiter`, which a
    /// responder shares among its peers (and resets every second).
    pub(crate) fn with_limiter(
        own: &PrivateKey,
        peer: PublicKey,
        preshared: Option<&PresharedKey>,
        keepalive: Option<u16>,
        limiter: Option<std::sync::Arc<boringtun::noise::rate_limiter::RateLimiter>>,
    ) -> Tunnel {
        let index = next_index();
        let tunn = Tunn::new(
            own.x25519(),
            peer.x25519(),
            preshared.map(|k| k.0),
            keepalive,
            index,
            limiter,
        );
        Tunnel {
            inner: Mutex::new(Inner {
                tunn,
                attempt_since: None,
                rejected_at_attempt: 0,
                last_forced: None,
                started: false,
            }),
            peer,
            index,
            initiator: false,
            health: AtomicU8::new(Health::Idle.code()),
            counters: TunnelCounters::default(),
        }
    }

    pub fn peer(&self) -> PublicKey {
        self.peer
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    pub fn health(&self) -> Health {
        Health::from_code(self.health.load(Relaxed))
    }

    /// The tunnel for a batch: one lock for all its packets.
    pub fn lock(&self) -> Sealer<'_> {
        Sealer {
            inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            tunnel: self,
        }
    }

    pub fn status(&self) -> TunnelStatus {
        let sealer = self.lock();
        let (last_handshake, tx, rx, _, _) = sealer.inner.tunn.stats();
        let c = &self.counters;
        TunnelStatus {
            health: self.health(),
            last_handshake,
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            sealed: c.sealed.load(Relaxed),
            opened: c.opened.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            handshakes: c.handshakes.load(Relaxed),
        }
    }
}

/// A tunnel held for a batch.
pub struct Sealer<'t> {
    inner: MutexGuard<'t, Inner>,
    tunnel: &'t Tunnel,
}

fn is_initiation(datagram: &[u8]) -> bool {
    datagram.first() == Some(&1)
}

impl Sealer<'_> {
    /// Starts a handshake now (joining does, so the first packet finds a
    /// session and the overlay's health is known within [`DOWN_AFTER`]).
    pub fn start<'b>(&mut self, out: &'b mut [u8], now: Instant) -> Option<&'b [u8]> {
        self.inner.started = true;
        let sent = match self.inner.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(datagram) => Some(&*datagram),
            _ => None,
        };
        self.sent(sent.is_some_and(is_initiation), now);
        sent
    }

    /// Seals one packet: the datagram to send (the packet, or a handshake
    /// initiation while the packet waits for the session), or None while
    /// a handshake is under way (the packet waits; up to 256 do).
    /// `out` must hold the packet and [`DATA_OVERHEAD`], and at least
    /// [`MIN_BUFFER`].
    pub fn seal<'b>(&mut self, packet: &[u8], out: &'b mut [u8], now: Instant) -> Option<&'b [u8]> {
        self.inner.started = true;
        let sent = match self.inner.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => Some(&*datagram),
            _ => None,
        };
        match sent {
            Some(datagram) if is_initiation(datagram) => self.sent(true, now),
            Some(_) => {
                self.tunnel.counters.sealed.fetch_add(1, Relaxed);
            }
            None => {}
        }
        sent
    }

    /// Opens one datagram from the peer at `from`.
    pub fn open<'b>(&mut self, from: IpAddr, datagram: &[u8], out: &'b mut [u8], now: Instant) -> Opened<'b> {
        self.inner.started = true;
        let counters = &self.tunnel.counters;
        // A handshake message answered (an initiation with a response, a
        // response with the keepalive that confirms it) is a session made:
        // the first, and each rekey's.
        let handshake = matches!(datagram.first(), Some(1 | 2));
        let opened = match self.inner.tunn.decapsulate(Some(from), datagram, out) {
            TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                counters.opened.fetch_add(1, Relaxed);
                Opened::Packet(packet)
            }
            TunnResult::WriteToNetwork(reply) => Opened::Reply(reply),
            TunnResult::Done => Opened::Nothing,
            TunnResult::Err(error) => {
                counters.rejected.fetch_add(1, Relaxed);
                Opened::Rejected(error)
            }
        };
        if handshake && matches!(opened, Opened::Reply(_)) {
            counters.handshakes.fetch_add(1, Relaxed);
        }
        self.refresh(now);
        opened
    }

    /// The next packet that waited for the session, sealed; None when
    /// none is left.
    pub fn flush<'b>(&mut self, out: &'b mut [u8]) -> Option<&'b [u8]> {
        match self.inner.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(datagram) => {
                self.tunnel.counters.sealed.fetch_add(1, Relaxed);
                Some(datagram)
            }
            _ => None,
        }
    }

    /// The protocol's timers (retries, rekeying, keepalives), to run about
    /// every quarter second: a datagram to send, if any. The first tick of
    /// an initiator's tunnel starts its handshake; while its peer is down,
    /// a handshake is tried again every [`DOWN_AFTER`].
    pub fn tick<'b>(&mut self, out: &'b mut [u8], now: Instant) -> Option<&'b [u8]> {
        if !self.inner.started && self.tunnel.initiator {
            let len = self.start(out, now).map(<[u8]>::len);
            return len.map(|len| &out[..len]);
        }
        self.refresh(now);
        let len = match self.inner.tunn.update_timers(out) {
            TunnResult::WriteToNetwork(datagram) => Some(datagram.len()),
            // A connection given up (no answer for 90 s, or keys too old)
            // is tried again below while it is down.
            _ => None,
        };
        let forced_due = self.tunnel.initiator
            && matches!(self.tunnel.health(), Health::Down(_))
            && self
                .inner
                .last_forced
                .is_none_or(|at| now.saturating_duration_since(at) >= DOWN_AFTER);
        let len = match len {
            Some(len) => Some(len),
            None if forced_due => {
                self.inner.last_forced = Some(now);
                match self.inner.tunn.format_handshake_initiation(out, true) {
                    TunnResult::WriteToNetwork(datagram) => Some(datagram.len()),
                    _ => None,
                }
            }
            None => None,
        };
        let sent = len.map(|len| &out[..len]);
        if let Some(datagram) = sent {
            self.sent(is_initiation(datagram), now);
        }
        sent
    }

    /// Notes a datagram sent: an initiation starts an attempt when none is
    /// under way.
    fn sent(&mut self, initiation: bool, now: Instant) {
        if initiation && self.inner.attempt_since.is_none() {
            self.inner.attempt_since = Some(now);
            self.inner.rejected_at_attempt = self.tunnel.counters.rejected.load(Relaxed);
        }
        self.refresh(now);
    }

    fn refresh(&mut self, now: Instant) {
        let inner = &mut *self.inner;
        let live = inner.tunn.time_since_last_handshake().is_some();
        if live {
            inner.attempt_since = None;
            inner.last_forced = None;
        }
        let health = match inner.attempt_since {
            _ if live => Health::Up,
            Some(since) if now.saturating_duration_since(since) >= DOWN_AFTER => {
                let refused = self.tunnel.counters.rejected.load(Relaxed) > inner.rejected_at_attempt;
                Health::Down(if refused {
                    DownWhy::Refused
                } else {
                    DownWhy::NoAnswer
                })
            }
            Some(_) => Health::Connecting,
            None => Health::Idle,
        };
        self.tunnel.health.store(health.code(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Tunnel, Tunnel) {
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        (
            Tunnel::new(&a, b.public(), None, None),
            Tunnel::new(&b, a.public(), None, None),
        )
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    /// A minimal IPv4 packet boringtun accepts as one.
    fn packet(marker: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[39] = marker;
        p
    }

    #[test]
    fn two_tunnels_handshake_and_carry_packets_both_ways() {
        let (client, server) = pair();
        let now = Instant::now();
        let (mut buf, mut back, mut out) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
        // The first packet waits for the session; the initiation goes.
        let init = client.lock().seal(&packet(1), &mut buf, now).unwrap().to_vec();
        assert_eq!(client.health(), Health::Connecting);
        let response = match server.lock().open(FROM, &init, &mut back, now) {
            Opened::Reply(r) => r.to_vec(),
            other => panic!("{other:?}"),
        };
        // The client's keepalive confirms the session to the server.
        let keepalive = match client.lock().open(FROM, &response, &mut out, now) {
            Opened::Reply(k) => k.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(client.health(), Health::Up);
        assert!(matches!(
            server.lock().open(FROM, &keepalive, &mut back, now),
            Opened::Nothing
        ));
        // The waiting packet goes now.
        let waited = client.lock().flush(&mut buf).unwrap().to_vec();
        assert!(client.lock().flush(&mut buf).is_none());
        match server.lock().open(FROM, &waited, &mut back, now) {
            Opened::Packet(p) => assert_eq!(p, packet(1).as_slice()),
            other => panic!("{other:?}"),
        }
        // Later packets are sealed at once, and the plain bytes are not in them.
        let sealed = client.lock().seal(&packet(0xab), &mut buf, now).unwrap().to_vec();
        assert_eq!(sealed.len(), 40 + DATA_OVERHEAD);
        assert!(!sealed.windows(4).any(|w| w == [10, 0, 0, 1]));
        match server.lock().open(FROM, &sealed, &mut back, now) {
            Opened::Packet(p) => assert_eq!(p[39], 0xab),
            other => panic!("{other:?}"),
        }
        // A replay is rejected and counted; so is a forgery.
        assert!(matches!(
            server.lock().open(FROM, &sealed, &mut back, now),
            Opened::Rejected(_)
        ));
        let mut forged = client.lock().seal(&packet(2), &mut buf, now).unwrap().to_vec();
        forged[20] ^= 1;
        assert!(matches!(
            server.lock().open(FROM, &forged, &mut back, now),
            Opened::Rejected(_)
        ));
        assert_eq!(server.status().rejected, 2);
        assert_eq!(client.status().handshakes, 1);
        assert_eq!(server.status().opened, 2);
    }

    #[test]
    fn an_unanswered_handshake_is_down_after_five_seconds() {
        let (client, _) = pair();
        let start = Instant::now();
        let mut buf = vec![0u8; 2048];
        assert!(client.lock().start(&mut buf, start).is_some());
        assert_eq!(client.health(), Health::Connecting);
        client.lock().tick(&mut buf, start + Duration::from_secs(4));
        assert_eq!(client.health(), Health::Connecting);
        assert!(client.health().carries());
        // Down, it tries again at once, then every five seconds.
        let retry = client
            .lock()
            .tick(&mut buf, start + DOWN_AFTER)
            .map(<[u8]>::to_vec);
        assert_eq!(client.health(), Health::Down(DownWhy::NoAnswer));
        assert!(!client.health().carries());
        assert!(retry.is_some_and(|d| is_initiation(&d)));
        assert!(
            client
                .lock()
                .tick(&mut buf, start + Duration::from_secs(9))
                .is_none()
        );
        assert!(
            client
                .lock()
                .tick(&mut buf, start + Duration::from_secs(10))
                .is_some()
        );
    }

    #[test]
    fn a_peer_that_does_not_know_our_key_never_answers() {
        // The server knows a different client.
        let (client, _) = pair();
        let stranger = PrivateKey::generate();
        let server_key = PrivateKey::generate();
        let server = Tunnel::new(&server_key, stranger.public(), None, None);
        let now = Instant::now();
        let (mut buf, mut back) = (vec![0u8; 2048], vec![0u8; 2048]);
        let init = client.lock().start(&mut buf, now).unwrap().to_vec();
        assert!(matches!(
            server.lock().open(FROM, &init, &mut back, now),
            Opened::Rejected(_)
        ));
        client.lock().tick(&mut buf, now + DOWN_AFTER);
        assert_eq!(client.health(), Health::Down(DownWhy::NoAnswer));
    }
}
