//! The Monitor's threads: one runs the Monitor (events in, decisions
//! published, probes out); one reads what the kernel measured; one reads
//! echo replies to probes on the underlay. None of them is a packet thread:
//! if one stalls, flows keep their carriers and new ones take the last
//! published choices.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oasis_common::{FlowKey, MonitorEvent, monitor_event};

use super::monitor_report::render;
use crate::control::MonitorView;
use crate::engine::measure::GOODPUT_MIN_BYTES;
use crate::engine::packet::flow_dst;
use crate::engine::{Engine, KernelOp, Outbound, SharedTables, Via};
use crate::forward::{OverlaySockets, SendScratch, send_decided};
use crate::monitor::{Event, Monitor, MonitorLink, MonitorSettings, ProbeRequest};
use crate::platform::{DatagramSocket, MonitorEvents, ProbeSockets, UnderlaySender};
use crate::shared::Shared;

/// Decisions are evaluated this often (and at once when a carrier goes
/// down or comes back).
const EVALUATE_EVERY: Duration = Duration::from_secs(1);
/// The longest the Monitor thread sleeps between looks at its queue.
const WAKE_EVERY: Duration = Duration::from_millis(50);
/// Events handled per wake-up at most, so probes and evaluations never
/// wait behind a flood.
const EVENTS_PER_ROUND: usize = 10_000;
/// After a round that had events, the thread naps this long before it
/// looks again rather than waiting on the queue: a waiting receiver costs
/// every sender a wake-up (a system call and a switch, on the packet
/// thread, per new flow of a metric rule), a napping one costs nothing,
/// and what arrives meanwhile is taken in one go.
const NAP_AFTER_EVENTS: Duration = Duration::from_millis(2);

/// Probes without sockets (the platform could not give any): every probe
/// goes unsent, and the Monitor decides on what flows measure alone.
pub struct NoProbes;

impl ProbeSockets for NoProbes {
    fn ports(&self) -> Vec<u16> {
        Vec::new()
    }

    fn source_for(&self, _dst: IpAddr) -> Option<IpAddr> {
        None
    }

    fn echo_replies(&self, timeout: Duration, _out: &mut Vec<crate::platform::EchoReply>) -> io::Result<()> {
        std::thread::sleep(timeout);
        Ok(())
    }
}

/// What the Monitor's threads need.
pub struct MonitorParts<U, S> {
    pub settings: MonitorSettings,
    pub engine: Arc<Engine>,
    /// The kernel's tables: probes on the underlay are timed there.
    pub tables: SharedTables,
    pub events: Receiver<(Instant, Event)>,
    pub underlay: Arc<U>,
    pub overlay: Arc<OverlaySockets<S>>,
    pub sockets: Arc<dyn ProbeSockets>,
    pub kernel_events: Option<Box<dyn MonitorEvents>>,
    /// Where `oasis monitor` reads the Monitor's state.
    pub view: Shared<MonitorView>,
}

pub fn spawn<U, S>(parts: MonitorParts<U, S>, stop: Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>>
where
    U: UnderlaySender + 'static,
    S: DatagramSocket + 'static,
{
    let mut threads = Vec::new();
    let link = parts.engine.monitor.clone();
    if let Some(mut kernel_events) = parts.kernel_events {
        let (engine, tables, stop) = (parts.engine.clone(), parts.tables.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("oasis-monitor-kernel".into())
                .spawn(move || {
                    let mut batch = Vec::with_capacity(256);
                    while !stop.load(Relaxed) {
                        batch.clear();
                        if let Err(e) = kernel_events.read(WAKE_EVERY * 2, &mut batch) {
                            tracing::warn!("reading the kernel's measurements: {e}");
                            std::thread::sleep(WAKE_EVERY * 2);
                        }
                        let now = Instant::now();
                        for event in &batch {
                            kernel_event(&engine, &tables, event, now);
                        }
                    }
                })?,
        );
    }
    {
        let (sockets, link, stop) = (parts.sockets.clone(), link.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name("oasis-monitor-echo".into())
                .spawn(move || {
                    let mut replies = Vec::new();
                    while !stop.load(Relaxed) {
                        replies.clear();
                        if let Err(e) = sockets.echo_replies(WAKE_EVERY * 2, &mut replies) {
                            tracing::warn!("reading echo replies: {e}");
                            std::thread::sleep(WAKE_EVERY * 2);
                        }
                        for reply in &replies {
                            if let Some(sent) = link.probes.echo_answered(reply.from, reply.id, reply.seq) {
                                link.report(
                                    reply.at,
                                    Event::ProbeAnswered {
                                        id: sent.id,
                                        at: reply.at,
                                        rtt: None,
                                    },
                                );
                            }
                        }
                    }
                })?,
        );
    }
    let mut prober = Prober {
        engine: parts.engine.clone(),
        tables: parts.tables.clone(),
        underlay: parts.underlay,
        overlay: parts.overlay,
        sockets: parts.sockets,
        packet: Vec::with_capacity(128),
        work: Vec::with_capacity(2),
        scratch: SendScratch::default(),
    };
    let (engine, events, view, settings) = (parts.engine, parts.events, parts.view, parts.settings);
    threads.push(
        std::thread::Builder::new()
            .name("oasis-monitor".into())
            .spawn(move || run(settings, engine, events, &mut prober, view, stop))?,
    );
    Ok(threads)
}

fn run<U: UnderlaySender, S: DatagramSocket>(
    settings: MonitorSettings,
    engine: Arc<Engine>,
    events: Receiver<(Instant, Event)>,
    prober: &mut Prober<U, S>,
    view: Shared<MonitorView>,
    stop: Arc<AtomicBool>,
) {
    let link = engine.monitor.clone();
    let mut monitor = Monitor::new(settings, Instant::now());
    let mut evaluated = Instant::now() - EVALUATE_EVERY;
    let mut received: HashMap<Via, u64> = HashMap::new();
    let mut probes: Vec<ProbeRequest> = Vec::new();
    let mut expired: Vec<FlowKey> = Vec::new();
    // Events came in the last round: nap rather than wait on the queue.
    let mut busy = false;
    while !stop.load(Relaxed) {
        let now = Instant::now();
        let wait = monitor
            .next_deadline(now)
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(5), WAKE_EVERY);
        let mut urgent = false;
        let first = if busy {
            std::thread::sleep(NAP_AFTER_EVENTS.min(wait));
            events.try_recv().map_err(|e| match e {
                TryRecvError::Empty => RecvTimeoutError::Timeout,
                TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            events.recv_timeout(wait)
        };
        match first {
            Ok((at, event)) => {
                busy = true;
                urgent |= monitor.handle(event, at);
                for (at, event) in events.try_iter().take(EVENTS_PER_ROUND) {
                    urgent |= monitor.handle(event, at);
                }
            }
            Err(RecvTimeoutError::Timeout) => busy = false,
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        if urgent || now.saturating_duration_since(evaluated) >= EVALUATE_EVERY {
            let routes = engine.routes();
            monitor.update_routes(routes.monitored_rules(), &routes.overlays);
            // Packets returned through an overlay show it alive.
            for overlay in routes.overlays.iter() {
                let count = overlay.received.load(Relaxed);
                let via = Via::Overlay(overlay.id);
                if received.insert(via, count).is_some_and(|before| count > before) {
                    monitor.handle(Event::Answered { via }, now);
                }
            }
            link.publish(monitor.evaluate(now));
            *view.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(render(&monitor, &routes, &link, now));
            evaluated = now;
        }
        probes.clear();
        monitor.poll_probes(now, &mut probes);
        for probe in &probes {
            tracing::trace!(id = probe.id, via = ?probe.via, dst = %probe.target.dst, "probe");
            if !prober.send(probe, &link, now) {
                monitor.handle(Event::ProbeUnsent { id: probe.id }, now);
            }
        }
        expired.clear();
        link.probes.expire(now, &mut expired);
        if !expired.is_empty() {
            let mut tables = prober.tables.lock();
            expired.iter().for_each(|key| tables.pins.forget(key));
        }
    }
}

/// Sends probes, on the underlay through the raw sockets, through an
/// overlay by its socket.
struct Prober<U: UnderlaySender, S: DatagramSocket> {
    engine: Arc<Engine>,
    tables: SharedTables,
    underlay: Arc<U>,
    overlay: Arc<OverlaySockets<S>>,
    sockets: Arc<dyn ProbeSockets>,
    packet: Vec<u8>,
    /// The kernel work of the probe at hand.
    work: Vec<KernelOp>,
    scratch: SendScratch<U, S>,
}

impl<U: UnderlaySender, S: DatagramSocket> Prober<U, S> {
    /// False when the probe could not be sent. The engine says where it
    /// goes and what the kernel must do first; this carries both out as
    /// the packet loops do.
    fn send(&mut self, probe: &ProbeRequest, link: &MonitorLink, now: Instant) -> bool {
        let Some(src) = self.sockets.source_for(probe.target.dst) else {
            tracing::debug!(dst = %probe.target.dst, "no route for a probe");
            return false;
        };
        let Some(key) = link.probes.build(probe, src, now, &mut self.packet) else {
            return false;
        };
        let routes = self.engine.routes();
        self.work.clear();
        let outbound = self
            .engine
            .probe(&routes, probe.via, &key, &mut self.packet, now, &mut self.work);
        let refused = self
            .work
            .iter()
            .find_map(|op| self.tables.lock().carry_out(op).err());
        if let Some(e) = &refused {
            tracing::debug!(dst = %probe.target.dst, "the kernel cannot time a probe: {e}");
        }
        let sent = refused.is_none() && !matches!(outbound, Outbound::Drop(_)) && {
            let once = std::iter::once((outbound, self.packet.as_slice()));
            let sent = send_decided(
                &routes,
                once,
                self.underlay.as_ref(),
                &self.overlay,
                &mut self.scratch,
            );
            sent.underlay + sent.overlay == 1
        };
        if !sent {
            link.probes.unsent(&key);
            if !self.work.is_empty() {
                self.tables.lock().pins.forget(&key);
            }
        }
        sent
    }
}

/// What a kernel measurement tells the Monitor: an answer to one of its
/// probes, or figures of a flow on the underlay.
fn kernel_event(engine: &Engine, tables: &SharedTables, event: &MonitorEvent, now: Instant) {
    let link = &engine.monitor;
    let key = event.key;
    let rtt = Duration::from_nanos(event.rtt_ns());
    if matches!(event.kind, monitor_event::SYN_ACK | monitor_event::RESET)
        && let Some(sent) = link.probes.answered(&key)
    {
        tables.lock().pins.forget(&key);
        let rtt = (event.rtt_ns() > 0).then_some(rtt);
        link.report(
            now,
            Event::ProbeAnswered {
                id: sent.id,
                at: now,
                rtt,
            },
        );
        return;
    }
    translate(event, &mut |e| link.report(now, e));
}

/// A kernel measurement of a flow on the underlay, as Monitor events.
pub fn translate(event: &MonitorEvent, out: &mut impl FnMut(Event)) {
    let via = Via::Underlay;
    let dst: IpAddr = flow_dst(&event.key);
    match event.kind {
        monitor_event::SYN_ACK | monitor_event::TS_RTT => out(Event::Rtt {
            via,
            dst,
            rtt: Duration::from_nanos(event.rtt_ns()),
        }),
        monitor_event::RESET | monitor_event::UNREACHABLE => out(Event::Failed { via, dst }),
        monitor_event::COUNTS => {
            if event.segments() > 0 {
                out(Event::Outcomes {
                    via,
                    dst,
                    sent: event.segments(),
                    lost: event.resent(),
                });
            }
            if event.bytes() >= GOODPUT_MIN_BYTES && event.over_ns() > 0 {
                out(Event::Goodput {
                    via,
                    dst,
                    bps: event.bytes() as f64 * 8.0 / Duration::from_nanos(event.over_ns()).as_secs_f64(),
                });
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oasis_common::FlowKey;

    #[test]
    fn kernel_measurements_become_monitor_events() {
        let key = FlowKey::v4([10, 0, 0, 2], [203, 0, 113, 9], 6, 40000, 443);
        let event = |kind, a, b, c, d| match kind {
            monitor_event::COUNTS => MonitorEvent::counts(key, a, b, c, d),
            kind => MonitorEvent::round_trip(key, kind, a),
        };
        let dst: IpAddr = "203.0.113.9".parse().unwrap();
        let all = |e: MonitorEvent| {
            let mut out = Vec::new();
            translate(&e, &mut |x| out.push(x));
            out
        };
        assert_eq!(
            all(event(monitor_event::TS_RTT, 25_000_000, 0, 0, 0)),
            [Event::Rtt {
                via: Via::Underlay,
                dst,
                rtt: Duration::from_millis(25)
            }]
        );
        assert_eq!(
            all(event(monitor_event::COUNTS, 100, 3, 1000, 1_000_000_000)),
            [Event::Outcomes {
                via: Via::Underlay,
                dst,
                sent: 100,
                lost: 3
            }]
        );
        let counts = all(event(monitor_event::COUNTS, 100, 0, 1_000_000, 500_000_000));
        assert!(matches!(
            counts[0],
            Event::Outcomes {
                sent: 100,
                lost: 0,
                ..
            }
        ));
        assert_eq!(
            counts[1],
            Event::Goodput {
                via: Via::Underlay,
                dst,
                bps: 16e6
            }
        );
        assert!(matches!(
            all(event(monitor_event::RESET, 0, 0, 0, 0))[..],
            [Event::Failed { .. }]
        ));
        assert!(all(event(99, 0, 0, 0, 0)).is_empty());
    }
}
