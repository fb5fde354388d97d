//! A monitor module: each new connection of the metric rules that name it
//! goes over the joined overlay with the lowest measured round-trip time
//! (SYN to SYN-ACK through each, see `oasis_guest::fastest`), whatever the
//! metric's text; with no overlay joined, over the underlay. It cannot
//! measure the underlay (answers there reach the host directly), so it
//! picks among overlays: a rule that wants the underlay compared uses the
//! built-in Monitor.
#![no_std]

use oasis_guest::fastest::{Fastest, MAX_PATHS};
use oasis_guest::{Monitor, export_monitor, now_ms, overlay_name, overlays, to_host, to_underlay, via};

struct FastestOverlay {
    shim_len: usize,
    fastest: Fastest,
    /// Which overlay indices are joined now, read every tick.
    joined: [bool; MAX_PATHS],
}

impl FastestOverlay {
    fn look(&mut self) {
        let count = overlays().min(MAX_PATHS);
        let mut name = [0u8; 64];
        for (i, joined) in self.joined.iter_mut().enumerate() {
            *joined = i < count && overlay_name(i, &mut name).is_some();
        }
        self.fastest.set_paths(count);
    }
}

impl Monitor for FastestOverlay {
    fn start(_overlays: usize, shim_len: usize) -> Self {
        let mut monitor = FastestOverlay {
            shim_len,
            fastest: Fastest::new(0),
            joined: [false; MAX_PATHS],
        };
        monitor.look();
        monitor
    }

    fn from_host(&mut self, packet: &[u8]) {
        let inner = packet.get(self.shim_len..).unwrap_or_default();
        let joined = self.joined;
        match self.fastest.route(inner, now_ms(), |i| joined[i]) {
            Some(overlay) => {
                let _ = via(overlay, inner);
            }
            None => {
                let _ = to_underlay(inner);
            }
        }
    }

    fn from_overlay(&mut self, overlay: usize, packet: &[u8]) {
        let inner = packet.get(self.shim_len..).unwrap_or_default();
        self.fastest.answered(overlay, inner, now_ms());
        let _ = to_host(packet);
    }

    fn tick(&mut self, now_ms: i64) {
        self.look();
        self.fastest.tick(now_ms);
    }
}

export_monitor!(FastestOverlay);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
