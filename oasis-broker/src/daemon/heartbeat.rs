//! The heartbeat thread: tells the classifier the broker is alive, with a
//! map handle of its own, on a thread that takes no lock any request or
//! packet holds. It beats only while every packet loop makes progress, so
//! a hung packet thread lets the classifier fail open as a dead daemon does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::liveness::Liveness;
use crate::platform::Heartbeat;

pub fn spawn(
    mut heartbeat: Box<dyn Heartbeat>,
    liveness: Arc<Liveness>,
    every: Duration,
    stall_limit: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("oasis-heartbeat".into())
        .spawn(move || {
            let mut stalled: Option<String> = None;
            while !stop.load(Relaxed) {
                match liveness.stalled(stall_limit) {
                    None => {
                        if let Some(name) = stalled.take() {
                            tracing::info!(thread = %name, "the thread makes progress again; heartbeat resumed");
                        }
                        if let Err(e) = heartbeat.beat() {
                            tracing::warn!("heartbeat: {e}");
                        }
                    }
                    Some((name, silent)) => {
                        if stalled.as_deref() != Some(&name) {
                            tracing::error!(
                                thread = %name,
                                silent_ms = silent.as_millis() as u64,
                                "a packet thread makes no progress: the heartbeat stops, and the classifier \
                                 will pass all traffic until it recovers"
                            );
                        }
                        stalled = Some(name);
                    }
                }
                std::thread::sleep(every);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Counts beats.
    struct Counted(Arc<AtomicU64>);

    impl Heartbeat for Counted {
        fn beat(&mut self) -> Result<(), crate::platform::PlatformError> {
            self.0.fetch_add(1, Relaxed);
            Ok(())
        }
        fn age(&self) -> Duration {
            Duration::ZERO
        }
        fn kernel_id(&self) -> Option<u32> {
            None
        }
    }

    #[test]
    fn beats_stop_while_a_packet_thread_is_stuck_and_resume_after() {
        let beats = Arc::new(AtomicU64::new(0));
        let liveness = Arc::new(Liveness::new());
        let worker = liveness.register("oasis-queue-0");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(
            Box::new(Counted(beats.clone())),
            liveness,
            Duration::from_millis(5),
            Duration::from_millis(60),
            stop.clone(),
        )
        .unwrap();
        // Working: the thread ticks, the heartbeat beats.
        for _ in 0..10 {
            worker.tick();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(beats.load(Relaxed) > 5);
        // Stuck: no tick for longer than the limit, no beat after it.
        std::thread::sleep(Duration::from_millis(120));
        let stalled = beats.load(Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(beats.load(Relaxed), stalled, "a beat while the thread was stuck");
        // Working again.
        worker.tick();
        std::thread::sleep(Duration::from_millis(30));
        assert!(beats.load(Relaxed) > stalled);
        stop.store(true, Relaxed);
        thread.join().unwrap();
    }
}
