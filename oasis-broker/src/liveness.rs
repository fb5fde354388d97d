//! Whether the daemon's working threads still make progress. Each packet
//! loop ticks at least every [`TICK_EVERY`], traffic or not; the heartbeat
//! thread beats only while every registered thread ticked recently. So a
//! packet thread that hangs (not just a process that stops) lets the
//! classifier fail open, as a dead daemon does.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a registered thread may go without ticking at most while it
/// works normally: the longest wait of any loop.
pub const TICK_EVERY: Duration = Duration::from_millis(250);

/// One thread's tick.
#[derive(Clone)]
pub struct Tick {
    name: Arc<str>,
    /// Milliseconds since the registry's start at the last tick.
    at: Arc<AtomicU64>,
    start: Instant,
}

impl Tick {
    pub fn tick(&self) {
        self.at.store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

pub struct Liveness {
    ticks: Mutex<Vec<Tick>>,
    start: Instant,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new()
    }
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            ticks: Mutex::new(Vec::new()),
            start: Instant::now(),
        }
    }

    /// A tick for a thread to keep; it counts as fresh from now.
    pub fn register(&self, name: &str) -> Tick {
        let tick = Tick {
            name: name.into(),
            at: Arc::new(AtomicU64::new(0)),
            start: self.start,
        };
        tick.tick();
        self.ticks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tick.clone());
        tick
    }

    /// The thread silent the longest, and for how long; None while none
    /// is registered.
    pub fn quietest(&self) -> Option<(String, Duration)> {
        let now = self.start.elapsed().as_millis() as u64;
        let ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        ticks
            .iter()
            .map(|tick| (tick, now.saturating_sub(tick.at.load(Relaxed))))
            .max_by_key(|(_, silent)| *silent)
            .map(|(tick, silent)| (tick.name.to_string(), Duration::from_millis(silent)))
    }

    /// The first thread that has not ticked for longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<(String, Duration)> {
        let now = self.start.elapsed().as_millis() as u64;
        let limit = limit.as_millis() as u64;
        let ticks = self.ticks.lock().unwrap_or_else(|e| e.into_inner());
        ticks.iter().find_map(|tick| {
            let silent = now.saturating_sub(tick.at.load(Relaxed));
            (silent > limit).then(|| (tick.name.to_string(), Duration::from_millis(silent)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_ticking_is_named() {
        let liveness = Liveness::new();
        let busy = liveness.register("busy");
        let _stuck = liveness.register("stuck");
        assert_eq!(liveness.stalled(Duration::from_millis(50)), None);
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(15));
            busy.tick();
        }
        let (name, silent) = liveness.stalled(Duration::from_millis(50)).expect("stalled");
        assert_eq!(name, "stuck");
        assert!(silent >= Duration::from_millis(100));
    }
}
