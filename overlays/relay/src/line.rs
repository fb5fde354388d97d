//! `oasis-relay --tun NAME`: a delay line for IP packets, the tests' stand-in
//! for `netem` (which this kernel lacks). Routes send packets into the TUN;
//! the relay holds each for the delay, drops a share of them, paces them to
//! a rate with a bounded queue, and writes them back into the TUN, where the
//! kernel forwards them on (policy routing by incoming interface keeps them
//! from coming straight back). Delay, loss and rate can change while it
//! runs, from a control file.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The path's properties now; changed by the control file.
#[derive(Debug, Default)]
pub struct Shape {
    delay_us: AtomicU64,
    /// Loss in millionths.
    loss_ppm: AtomicU64,
    /// Bits per second; 0: no limit.
    rate_bps: AtomicU64,
}

impl Shape {
    pub fn new(delay_ms: f64, loss_percent: f64, rate_mbit: f64) -> Arc<Shape> {
        let shape = Arc::new(Shape::default());
        shape.set(delay_ms, loss_percent, rate_mbit);
        shape
    }

    fn set(&self, delay_ms: f64, loss_percent: f64, rate_mbit: f64) {
        self.delay_us.store((delay_ms * 1000.0) as u64, Relaxed);
        self.loss_ppm.store((loss_percent * 10_000.0) as u64, Relaxed);
        self.rate_bps.store((rate_mbit * 1e6) as u64, Relaxed);
    }

    /// Reads `delay_ms=40 loss_percent=1 rate_mbit=20` (any of them,
    /// whitespace-separated); keys left out keep their value.
    pub fn apply(&self, text: &str) -> anyhow::Result<()> {
        let mut delay = self.delay_us.load(Relaxed) as f64 / 1000.0;
        let mut loss = self.loss_ppm.load(Relaxed) as f64 / 10_000.0;
        let mut rate = self.rate_bps.load(Relaxed) as f64 / 1e6;
        for word in text.split_whitespace() {
            let (key, value) = word
                .split_once('=')
                .with_context(|| format!("{word:?}: expected key=value"))?;
            let value: f64 = value.parse().with_context(|| format!("{word:?}: not a number"))?;
            match key {
                "delay_ms" => delay = value,
                "loss_percent" => loss = value,
                "rate_mbit" => rate = value,
                other => anyhow::bail!("unknown key {other:?}: use delay_ms, loss_percent or rate_mbit"),
            }
        }
        self.set(delay, loss, rate);
        Ok(())
    }
}

/// A packet waiting in the line, and when it may leave.
struct Held {
    due: Instant,
    packet: Vec<u8>,
}

/// The queue the reader fills and the writer drains.
#[derive(Default)]
struct Line {
    queue: Mutex<VecDeque<Held>>,
    ready: Condvar,
}

/// The longest a rate-limited queue holds before it drops (a bottleneck's
/// buffer, so TCP over it sees losses as on a real one).
const QUEUE_LIMIT: Duration = Duration::from_millis(100);

pub fn run(name: &str, shape: Arc<Shape>, control: Option<PathBuf>) -> anyhow::Result<()> {
    let device = Arc::new(
        tun_rs::DeviceBuilder::new()
            .name(name)
            .mtu(1500)
            .build_sync()
            .with_context(|| format!("creating TUN {name} (as root)"))?,
    );
    // Packets written back arrive on the TUN from anywhere: no reverse-path
    // check may drop them.
    for key in ["rp_filter", "accept_local"] {
        let path = format!("/proc/sys/net/ipv4/conf/{name}/{key}");
        let value = if key == "rp_filter" { "0" } else { "1" };
        std::fs::write(&path, value).with_context(|| format!("setting {path}"))?;
    }
    let line = Arc::new(Line::default());
    if let Some(path) = control {
        let shape = shape.clone();
        std::thread::spawn(move || watch(&path, &shape));
    }
    let counters = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    {
        let (device, line, counters) = (device.clone(), line.clone(), counters.clone());
        std::thread::spawn(move || write_out(&device, &line, &counters));
    }
    tracing::info!(tun = %name, "oasis-relay delay line ready");
    let mut buf = vec![0u8; 65_536];
    // When the rate-limited queue next has room: the pacing clock.
    let mut next_free = Instant::now();
    loop {
        let len = device.recv(&mut buf).context("reading the TUN")?;
        let now = Instant::now();
        let loss = shape.loss_ppm.load(Relaxed);
        if loss > 0 && rand::random::<u64>() % 1_000_000 < loss {
            counters.1.fetch_add(1, Relaxed);
            continue;
        }
        let delay = Duration::from_micros(shape.delay_us.load(Relaxed));
        let rate = shape.rate_bps.load(Relaxed);
        let due = match (len as u64 * 8 * 1_000_000_000).checked_div(rate) {
            None => now + delay,
            // Serialised at the rate behind what is queued already; beyond
            // the buffer, dropped.
            Some(serialise_ns) => {
                let start = next_free.max(now);
                if start.saturating_duration_since(now) > QUEUE_LIMIT {
                    counters.1.fetch_add(1, Relaxed);
                    continue;
                }
                next_free = start + Duration::from_nanos(serialise_ns);
                next_free + delay
            }
        };
        let mut queue = line.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.push_back(Held {
            due,
            packet: buf[..len].to_vec(),
        });
        drop(queue);
        line.ready.notify_one();
    }
}

/// Writes packets back when they are due, in the order they came.
fn write_out(device: &tun_rs::SyncDevice, line: &Line, counters: &(AtomicU64, AtomicU64)) {
    let mut reported = Instant::now();
    loop {
        let held = {
            let mut queue = line.queue.lock().unwrap_or_else(|e| e.into_inner());
            while queue.is_empty() {
                queue = line.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            queue.pop_front().expect("not empty")
        };
        let wait = held.due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if device.send(&held.packet).is_ok() {
            counters.0.fetch_add(1, Relaxed);
        }
        if reported.elapsed() > Duration::from_secs(10) {
            tracing::info!(
                forwarded = counters.0.load(Relaxed),
                dropped = counters.1.load(Relaxed),
                "delay line counters"
            );
            reported = Instant::now();
        }
    }
}

/// Applies the control file whenever it changes.
fn watch(path: &std::path::Path, shape: &Shape) {
    let mut last = String::new();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text != last
        {
            match shape.apply(&text) {
                Ok(()) => tracing::info!(shape = %text.trim(), "delay line reshaped"),
                Err(e) => tracing::warn!(path = %path.display(), "bad control file: {e:#}"),
            }
            last = text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_file_changes_only_what_it_names() {
        let shape = Shape::new(20.0, 0.0, 0.0);
        shape.apply("delay_ms=45").unwrap();
        assert_eq!(shape.delay_us.load(Relaxed), 45_000);
        shape.apply("loss_percent=5 rate_mbit=20\n").unwrap();
        assert_eq!(shape.delay_us.load(Relaxed), 45_000);
        assert_eq!(shape.loss_ppm.load(Relaxed), 50_000);
        assert_eq!(shape.rate_bps.load(Relaxed), 20_000_000);
        assert!(shape.apply("jitter_ms=3").is_err());
        assert!(shape.apply("delay_ms=x").is_err());
        assert_eq!(shape.delay_us.load(Relaxed), 45_000, "a bad file changes nothing");
    }
}
