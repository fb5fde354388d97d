//! Passive measurement of the flows of metric rules that the broker itself
//! carries (over overlays): the same figures the kernel takes of flows it
//! carries on the underlay (`oasis-ebpf/src/measure.rs`). The packet thread
//! that sends a flow's packets and the thread that receives its answers
//! share one [`FlowProbe`] of atomics; each keeps its own part without one.
//!
//! - the handshake's round trip, unless the SYN went twice (Karn),
//! - timestamp round trips, one per flow every 100 ms at most,
//! - data segments and how many were sent again,
//! - goodput of long transfers: bytes received, or bytes acknowledged,
//! - resets.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use etherparse::{SlicedPacket, TcpOptionElement, TransportSlice};

use super::routes::Via;
use crate::monitor::Event;

/// One round-trip sample per flow this often at most.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A timestamp sample unanswered this long is given up.
const SAMPLE_GIVE_UP: Duration = Duration::from_secs(1);
/// A transfer counts for goodput once it moved this much in a report
/// interval.
pub const GOODPUT_MIN_BYTES: u64 = 256 * 1024;

/// What a TCP segment says, for measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub rst: bool,
    pub fin: bool,
    pub data: u32,
    /// (TSval, TSecr)
    pub timestamps: Option<(u32, u32)>,
}

impl Segment {
    /// The TCP segment in an IP packet, if it is one.
    pub fn of(packet: &[u8]) -> Option<Segment> {
        let sliced = SlicedPacket::from_ip(packet).ok()?;
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            return None;
        };
        let timestamps = tcp.options_iterator().find_map(|option| match option {
            Ok(TcpOptionElement::Timestamp(value, echo)) => Some((value, echo)),
            _ => None,
        });
        Some(Segment {
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            syn: tcp.syn(),
            ack_flag: tcp.ack(),
            rst: tcp.rst(),
            fin: tcp.fin(),
            data: tcp.payload().len() as u32,
            timestamps,
        })
    }
}

/// `a` comes after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The part of a flow's measurement both threads see.
#[derive(Debug)]
pub struct FlowProbe {
    pub via: Via,
    pub dst: IpAddr,
    epoch: Instant,
    /// ns after `epoch` + 1 the first SYN left; 0: none on its way.
    syn_sent: AtomicU64,
    /// The handshake was answered.
    answered: AtomicBool,
    ts_val: AtomicU32,
    /// ns after `epoch` + 1 `ts_val` left; 0: none on its way.
    ts_sent: AtomicU64,
    sampled: AtomicU64,
    /// Payload bytes received, and bytes the peer acknowledged.
    received: AtomicU64,
    last_ack: AtomicU32,
    acked: AtomicU64,
}

impl FlowProbe {
    pub fn new(via: Via, dst: IpAddr, epoch: Instant) -> FlowProbe {
        FlowProbe {
            via,
            dst,
            epoch,
            syn_sent: AtomicU64::new(0),
            answered: AtomicBool::new(false),
            ts_val: AtomicU32::new(0),
            ts_sent: AtomicU64::new(0),
            sampled: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_ack: AtomicU32::new(0),
            acked: AtomicU64::new(0),
        }
    }

    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    fn since(&self, stamp: u64, now: Instant) -> Duration {
        Duration::from_nanos(self.stamp(now).saturating_sub(stamp))
    }

    pub fn answered(&self) -> bool {
        self.answered.load(Relaxed)
    }

    /// An answer came back: what it tells the Monitor, if anything.
    pub fn inbound(&self, segment: &Segment, now: Instant) -> Option<Event> {
        if segment.rst {
            self.syn_sent.store(0, Relaxed);
            return Some(Event::Failed {
                via: self.via,
                dst: self.dst,
            });
        }
        self.received.fetch_add(u64::from(segment.data), Relaxed);
        if segment.syn && segment.ack_flag {
            self.answered.store(true, Relaxed);
            self.last_ack.store(segment.ack, Relaxed);
            let sent = self.syn_sent.swap(0, Relaxed);
            // An answer after a second may be the peer's SYN-ACK sent again.
            if sent != 0 && self.since(sent, now) < Duration::from_secs(1) {
                self.sampled.store(self.stamp(now), Relaxed);
                return Some(Event::Rtt {
                    via: self.via,
                    dst: self.dst,
                    rtt: self.since(sent, now),
                });
            }
            return None;
        }
        if segment.ack_flag {
            let last = self.last_ack.load(Relaxed);
            if last != 0 && after(segment.ack, last) {
                self.acked
                    .fetch_add(u64::from(segment.ack.wrapping_sub(last)), Relaxed);
            }
            if last == 0 || after(segment.ack, last) {
                self.last_ack.store(segment.ack, Relaxed);
            }
        }
        let sent = self.ts_sent.load(Relaxed);
        if sent != 0
            && let Some((_, echo)) = segment.timestamps
            && echo == self.ts_val.load(Relaxed)
            && self.ts_sent.swap(0, Relaxed) == sent
        {
            self.sampled.store(self.stamp(now), Relaxed);
            return Some(Event::Rtt {
                via: self.via,
                dst: self.dst,
                rtt: self.since(sent, now),
            });
        }
        None
    }
}

/// The sending thread's part of a flow's measurement.
#[derive(Debug)]
pub struct OutboundMeasure {
    pub probe: Arc<FlowProbe>,
    seq_next: Option<u32>,
    segments: u64,
    retransmits: u64,
    reported: Instant,
    moved_at_report: u64,
    syns: u32,
}

/// What a flow's outgoing packet showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Nothing,
    /// The SYN went again, and the handshake has no answer yet.
    SynUnanswered,
}

impl OutboundMeasure {
    pub fn new(probe: Arc<FlowProbe>, now: Instant) -> OutboundMeasure {
        OutboundMeasure {
            probe,
            seq_next: None,
            segments: 0,
            retransmits: 0,
            reported: now,
            moved_at_report: 0,
            syns: 0,
        }
    }

    pub fn outbound(&mut self, segment: &Segment, now: Instant) -> Seen {
        let probe = &self.probe;
        if segment.syn && !segment.ack_flag {
            self.syns += 1;
            if self.syns == 1 {
                probe.syn_sent.store(probe.stamp(now), Relaxed);
                return Seen::Nothing;
            }
            // Sent again: its answer could be to either copy.
            probe.syn_sent.store(0, Relaxed);
            return if probe.answered() {
                Seen::Nothing
            } else {
                Seen::SynUnanswered
            };
        }
        if segment.data > 0 || segment.fin {
            // A FIN takes a sequence number of its own.
            let end = segment.seq.wrapping_add(segment.data + u32::from(segment.fin));
            match self.seq_next {
                Some(next) if !after(end, next) => self.retransmits += 1,
                _ => self.seq_next = Some(end),
            }
            self.segments += 1;
        }
        let idle = {
            let sent = probe.ts_sent.load(Relaxed);
            sent == 0 || probe.since(sent, now) > SAMPLE_GIVE_UP
        };
        let last = probe.sampled.load(Relaxed);
        if idle
            && (last == 0 || probe.since(last, now) >= SAMPLE_EVERY)
            && let Some((value, _)) = segment.timestamps
        {
            probe.ts_val.store(value, Relaxed);
            probe.ts_sent.store(probe.stamp(now), Relaxed);
        }
        Seen::Nothing
    }

    /// What the flow did since the last report: outcomes, and goodput
    /// when it moved enough to tell. Called when the sending thread sweeps.
    pub fn report(&mut self, now: Instant, out: &mut impl FnMut(Event)) {
        let probe = &self.probe;
        if self.segments > 0 {
            out(Event::Outcomes {
                via: probe.via,
                dst: probe.dst,
                sent: self.segments,
                lost: self.retransmits,
            });
        }
        self.segments = 0;
        self.retransmits = 0;
        let moved = probe.received.load(Relaxed).max(probe.acked.load(Relaxed));
        let over = now.saturating_duration_since(self.reported);
        let delta = moved.saturating_sub(self.moved_at_report);
        if delta >= GOODPUT_MIN_BYTES && over >= Duration::from_millis(500) {
            out(Event::Goodput {
                via: probe.via,
                dst: probe.dst,
                bps: delta as f64 * 8.0 / over.as_secs_f64(),
            });
        }
        self.moved_at_report = moved;
        self.reported = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, TcpOptionElement};

    const HOST: [u8; 4] = [10, 0, 0, 2];
    const SERVER: [u8; 4] = [203, 0, 113, 9];

    fn tcp(
        edit: impl FnOnce(
            etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
        ts: Option<(u32, u32)>,
        payload: &[u8],
        out: bool,
    ) -> Vec<u8> {
        let (src, dst, sport, dport) = if out {
            (HOST, SERVER, 40000, 443)
        } else {
            (SERVER, HOST, 443, 40000)
        };
        let mut builder = edit(PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535));
        if let Some((value, echo)) = ts {
            builder = builder
                .options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(value, echo),
                ])
                .unwrap();
        }
        let mut packet = Vec::new();
        builder.write(&mut packet, payload).unwrap();
        packet
    }

    fn seg(packet: &[u8]) -> Segment {
        Segment::of(packet).unwrap()
    }

    fn setup() -> (Instant, Arc<FlowProbe>, OutboundMeasure) {
        let t = Instant::now();
        let probe = Arc::new(FlowProbe::new(Via::Underlay, IpAddr::from(SERVER), t));
        let out = OutboundMeasure::new(probe.clone(), t);
        (t, probe, out)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_handshake_is_timed_unless_the_syn_went_twice() {
        let (t, probe, mut out) = setup();
        let syn = tcp(|b| b.syn(), None, b"", true);
        assert_eq!(out.outbound(&seg(&syn), t), Seen::Nothing);
        let synack = tcp(|b| b.syn().ack(1001), None, b"", false);
        let Some(Event::Rtt { rtt, .. }) = probe.inbound(&seg(&synack), t + ms(30)) else {
            panic!("a sample")
        };
        assert_eq!(rtt, ms(30));
        assert!(probe.answered());

        let (t, probe, mut out) = setup();
        out.outbound(&seg(&syn), t);
        assert_eq!(out.outbound(&seg(&syn), t + ms(1000)), Seen::SynUnanswered);
        assert_eq!(
            probe.inbound(&seg(&synack), t + ms(1030)),
            None,
            "Karn: no sample"
        );
    }

    #[test]
    fn timestamps_give_one_sample_per_100_ms() {
        let (t, probe, mut out) = setup();
        let data = |ts| tcp(|b| b.ack(1), Some((ts, 7)), b"data", true);
        let echo = |ts| tcp(|b| b.ack(1005), Some((99, ts)), b"", false);
        out.outbound(&seg(&data(500)), t);
        out.outbound(&seg(&data(501)), t + ms(5)); // a sample is on its way
        assert!(probe.inbound(&seg(&echo(501)), t + ms(20)).is_none());
        let Some(Event::Rtt { rtt, .. }) = probe.inbound(&seg(&echo(500)), t + ms(25)) else {
            panic!("a sample")
        };
        assert_eq!(rtt, ms(25));
        out.outbound(&seg(&data(502)), t + ms(50)); // too soon after the last
        assert!(probe.inbound(&seg(&echo(502)), t + ms(70)).is_none());
        out.outbound(&seg(&data(503)), t + ms(200));
        assert!(probe.inbound(&seg(&echo(503)), t + ms(240)).is_some());
    }

    #[test]
    fn segments_sent_again_are_counted_and_goodput_reported() {
        let (t, probe, mut out) = setup();
        // The third segment goes again: its end is not after the highest sent.
        for seq in [1000u32, 2000, 3000, 2000, 4000] {
            let mut packet = tcp(|b| b.ack(1), None, &[0u8; 1000], true);
            // The sequence number sits 4 bytes into the TCP header.
            packet[24..28].copy_from_slice(&seq.to_be_bytes());
            out.outbound(&seg(&packet), t);
        }
        // 400 KB acknowledged over 1 s.
        let ack = |n: u32| tcp(move |b| b.ack(n), None, b"", false);
        probe.inbound(&seg(&ack(1_000)), t);
        probe.inbound(&seg(&ack(401_000)), t + ms(900));
        let mut events = Vec::new();
        out.report(t + ms(1000), &mut |e| events.push(e));
        assert_eq!(
            events[0],
            Event::Outcomes {
                via: Via::Underlay,
                dst: IpAddr::from(SERVER),
                sent: 5,
                lost: 1
            }
        );
        let Event::Goodput { bps, .. } = events[1] else {
            panic!("{events:?}")
        };
        assert!((bps - 3.2e6).abs() < 1.0, "{bps}");
        // Data, then its FIN: neither is sent again.
        let (_, _, mut fresh) = setup();
        for (seq, fin) in [(1000u32, false), (2000, true)] {
            let mut packet = if fin {
                tcp(|b| b.ack(1).fin(), None, b"", true)
            } else {
                tcp(|b| b.ack(1), None, &[0u8; 1000], true)
            };
            packet[24..28].copy_from_slice(&seq.to_be_bytes());
            fresh.outbound(&seg(&packet), t);
        }
        let mut counted = Vec::new();
        fresh.report(t, &mut |e| counted.push(e));
        assert!(
            matches!(counted[0], Event::Outcomes { sent: 2, lost: 0, .. }),
            "{counted:?}"
        );
        let reset = tcp(|b| b.rst(), None, b"", false);
        assert!(matches!(
            probe.inbound(&seg(&reset), t),
            Some(Event::Failed { .. })
        ));
    }
}
