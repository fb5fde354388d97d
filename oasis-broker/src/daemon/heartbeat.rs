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
