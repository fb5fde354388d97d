//! The heartbeat thread: tells the classifier the broker is alive, with a
//! map handle of its own, on a thread that takes no lock any request or
//! packet holds. What it writes is when the quietest packet loop last made
//! progress, so a hung packet thread lets the classifier fail open
//! `heartbeat_timeout_ms` after it stopped, as a dead daemon does. A second
//! beat tells when the packet loops and the DNS service's threads last all
//! made progress: a DNS service that stops answering lets the DNS hooks
//! fail open (queries go to the host's own servers again) while the packet
//! path goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::liveness::{Liveness, TICK_EVERY};
use crate::platform::Heartbeat;

/// What must make progress for each beat.
pub struct Watched {
    /// The packet loops.
    pub packets: Arc<Liveness>,
    /// The DNS service's threads and the runtime its upstream queries and
    /// TCP listener run on.
    pub dns: Arc<Liveness>,
}

pub fn spawn(
    mut heartbeat: Box<dyn Heartbeat>,
    watched: Watched,
    every: Duration,
    stall_limit: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("oasis-heartbeat".into())
        .spawn(move || {
            let mut stalled: Option<String> = None;
            let mut dns_stalled: Option<String> = None;
            while !stop.load(Relaxed) {
                let packets = watched.packets.quietest();
                // The DNS beat needs the packet path too: fake addresses
                // handed out while the classifier passes everything would
                // lead nowhere.
                let dns = [packets.clone(), watched.dns.quietest()]
                    .into_iter()
                    .flatten()
                    .max_by_key(|(_, silent)| *silent);
                note(
                    &mut stalled,
                    &packets,
                    stall_limit,
                    "a packet thread",
                    "the classifier will pass all traffic",
                );
                note(
                    &mut dns_stalled,
                    &dns,
                    stall_limit,
                    "the DNS service",
                    "DNS queries will go to the host's own servers",
                );
                if let Err(e) = heartbeat.beat(age(&packets)) {
                    tracing::warn!("heartbeat: {e}");
                }
                if let Err(e) = heartbeat.beat_dns(age(&dns)) {
                    tracing::warn!("DNS heartbeat: {e}");
                }
                std::thread::sleep(every);
            }
        })
}

/// How long ago the quietest thread last made progress, beyond the
/// longest a working thread waits between ticks.
fn age(quietest: &Option<(String, Duration)>) -> Duration {
    quietest
        .as_ref()
        .map_or(Duration::ZERO, |(_, silent)| silent.saturating_sub(TICK_EVERY))
}

/// Logs a part's stall when it starts, and its recovery.
fn note(
    last: &mut Option<String>,
    quietest: &Option<(String, Duration)>,
    limit: Duration,
    part: &str,
    consequence: &str,
) {
    match quietest.as_ref().filter(|(_, silent)| *silent > limit) {
        None => {
            if let Some(name) = last.take() {
                tracing::info!(thread = %name, "{part} makes progress again; its heartbeat resumed");
            }
        }
        Some((name, silent)) => {
            if last.as_deref() != Some(name.as_str()) {
                tracing::error!(
                    thread = %name,
                    silent_ms = silent.as_millis() as u64,
                    "{part} makes no progress: its heartbeat grows old, and {consequence} until it recovers"
                );
            }
            *last = Some(name.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The ages written, of each kind.
    #[derive(Clone, Default)]
    struct Ages(Arc<Mutex<(Duration, Duration)>>);

    impl Heartbeat for Ages {
        fn beat(&mut self, age: Duration) -> Result<(), crate::platform::PlatformError> {
            self.0.lock().unwrap().0 = age;
            Ok(())
        }
        fn beat_dns(&mut self, age: Duration) -> Result<(), crate::platform::PlatformError> {
            self.0.lock().unwrap().1 = age;
            Ok(())
        }
        fn age(&self) -> Duration {
            Duration::ZERO
        }
        fn kernel_id(&self) -> Option<u32> {
            None
        }
    }

    fn start(ages: &Ages) -> (Arc<Liveness>, Arc<Liveness>, Arc<AtomicBool>, JoinHandle<()>) {
        let (packets, dns) = (Arc::new(Liveness::new()), Arc::new(Liveness::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(
            Box::new(ages.clone()),
            Watched {
                packets: packets.clone(),
                dns: dns.clone(),
            },
            Duration::from_millis(5),
            Duration::from_millis(60),
            stop.clone(),
        )
        .unwrap();
        (packets, dns, stop, thread)
    }

    /// Ticks `ticks` until `done` holds of the ages written, within a
    /// deadline.
    fn until(ages: &Ages, ticks: &[&crate::liveness::Tick], done: impl Fn(Duration, Duration) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            for tick in ticks {
                tick.tick();
            }
            let (packets, dns) = *ages.0.lock().unwrap();
            if done(packets, dns) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never: packet beat {packets:?} old, DNS beat {dns:?} old"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    const STUCK: Duration = Duration::from_millis(500);

    #[test]
    fn a_stuck_packet_thread_ages_both_beats_until_it_works_again() {
        let ages = Ages::default();
        let (packets, dns, stop, thread) = start(&ages);
        let worker = packets.register("oasis-queue-0");
        let resolver = dns.register("oasis-dns-v4-0");
        // Working: fresh beats.
        until(&ages, &[&worker, &resolver], |p, d| p.is_zero() && d.is_zero());
        // Stuck: its beat, and the DNS beat with it, grow old.
        until(&ages, &[&resolver], |p, d| p >= STUCK && d >= STUCK);
        // Working again.
        until(&ages, &[&worker, &resolver], |p, d| p.is_zero() && d.is_zero());
        stop.store(true, Relaxed);
        thread.join().unwrap();
    }

    #[test]
    fn a_stuck_dns_service_ages_only_the_dns_beat() {
        let ages = Ages::default();
        let (packets, dns, stop, thread) = start(&ages);
        let worker = packets.register("oasis-queue-0");
        let resolver = dns.register("oasis-dns-v4-0");
        until(&ages, &[&worker, &resolver], |p, d| p.is_zero() && d.is_zero());
        until(&ages, &[&worker], |p, d| p.is_zero() && d >= STUCK);
        until(&ages, &[&worker, &resolver], |p, d| p.is_zero() && d.is_zero());
        stop.store(true, Relaxed);
        thread.join().unwrap();
    }
}
