//! The guest side of the Oasis module contract (docs/modules.md): the host
//! functions a module may call, safe to use, and the buffer the host writes
//! each datagram into. An overlay module implements [`Module`] and names
//! its type with [`export_module!`]; a monitor module implements
//! [`Monitor`] and names it with [`export_monitor!`]. A module imports
//! only the host functions it calls, so each keeps its role's contract.
#![cfg_attr(not(test), no_std)]
// The methods are named after the contract's exports (`oasis_from_host`...).
#![allow(clippy::wrong_self_convention)]

pub mod fastest;
pub mod flow;

/// Largest datagram the host hands over.
pub const MAX_DATAGRAM: usize = 65_535;

#[link(wasm_import_module = "oasis")]
unsafe extern "C" {
    #[link_name = "send"]
    fn oasis_send(entry: i32, ptr: *const u8, len: i32) -> i32;
    #[link_name = "to_host"]
    fn oasis_to_host(ptr: *const u8, len: i32) -> i32;
    #[link_name = "to_underlay"]
    fn oasis_to_underlay(ptr: *const u8, len: i32) -> i32;
    #[link_name = "now_ms"]
    fn oasis_now_ms() -> i64;
    #[link_name = "log"]
    fn oasis_log(ptr: *const u8, len: i32);
    #[link_name = "via"]
    fn oasis_via(overlay: i32, ptr: *const u8, len: i32) -> i32;
    #[link_name = "overlays"]
    fn oasis_overlays() -> i32;
    #[link_name = "overlay_name"]
    fn oasis_overlay_name(overlay: i32, ptr: *mut u8, cap: i32) -> i32;
}

/// Why the host refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No entry node (or, for a monitor, no joined overlay) has that index.
    NoSuchEntry,
    /// The event's send budget is spent.
    OverBudget,
    /// The bytes are not in the module's memory, or too many.
    BadBuffer,
}

fn result(code: i32) -> Result<(), Refused> {
    match code {
        0 => Ok(()),
        -1 => Err(Refused::NoSuchEntry),
        -2 => Err(Refused::OverBudget),
        _ => Err(Refused::BadBuffer),
    }
}

/// Sends `datagram` to the overlay's entry node `entry` (0-based, in the
/// specification's order).
pub fn send(entry: usize, datagram: &[u8]) -> Result<(), Refused> {
    // SAFETY: the host reads `len` bytes at `ptr` of this memory, bounds-checked.
    result(unsafe { oasis_send(entry as i32, datagram.as_ptr(), datagram.len() as i32) })
}

/// Hands `[shim][IP packet]` that came over the overlay back to this host.
pub fn to_host(packet: &[u8]) -> Result<(), Refused> {
    // SAFETY: as in `send`.
    result(unsafe { oasis_to_host(packet.as_ptr(), packet.len() as i32) })
}

/// Hands a bare IP packet to the broker, which sends it on the underlay.
pub fn to_underlay(packet: &[u8]) -> Result<(), Refused> {
    // SAFETY: as in `send`.
    result(unsafe { oasis_to_underlay(packet.as_ptr(), packet.len() as i32) })
}

/// Milliseconds since the module started.
pub fn now_ms() -> i64 {
    // SAFETY: no arguments.
    unsafe { oasis_now_ms() }
}

/// A line in the daemon's log (a few a minute; more are dropped).
pub fn log(line: &str) {
    // SAFETY: as in `send`.
    unsafe { oasis_log(line.as_ptr(), line.len() as i32) }
}

/// A monitor module: sends a bare IP packet over the joined overlay
/// `overlay` (an index below [`overlays`]); the host puts that overlay's
/// shim in front.
pub fn via(overlay: usize, packet: &[u8]) -> Result<(), Refused> {
    // SAFETY: as in `send`.
    result(unsafe { oasis_via(overlay as i32, packet.as_ptr(), packet.len() as i32) })
}

/// A monitor module: how many overlay indices there are. An overlay keeps
/// its index while joined; a left one's index is not reused.
pub fn overlays() -> usize {
    // SAFETY: no arguments.
    unsafe { oasis_overlays() }.max(0) as usize
}

/// A monitor module: the name of overlay `overlay`, written into `buf`;
/// None when no joined overlay has the index (or the name does not fit).
pub fn overlay_name(overlay: usize, buf: &mut [u8]) -> Option<&str> {
    // SAFETY: the host writes at most `cap` bytes at `ptr`, bounds-checked.
    let len = unsafe { oasis_overlay_name(overlay as i32, buf.as_mut_ptr(), buf.len() as i32) };
    let len = usize::try_from(len).ok().filter(|len| *len <= buf.len())?;
    core::str::from_utf8(&buf[..len]).ok()
}

/// What a module does with each event.
pub trait Module {
    /// Called once, with the overlay's entry node count and shim length.
    fn start(entries: usize, shim_len: usize) -> Self;
    /// A packet of this host for the overlay: `[shim][IP packet]`.
    fn from_host(&mut self, packet: &[u8]);
    /// A datagram from entry node `entry`.
    fn from_entry(&mut self, entry: usize, datagram: &[u8]);
    /// Every 100 ms.
    fn tick(&mut self, _now_ms: i64) {}
}

/// The exports every module has (`oasis_buffer`, `oasis_start`,
/// `oasis_from_host`, `oasis_tick`) for the type `$state` of role `$role`
/// (`Module` or `Monitor`), and `with_state` for the role's own export.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_common {
    ($state:ty, $role:ident) => {
        static mut BUFFER: [u8; $crate::MAX_DATAGRAM] = [0; $crate::MAX_DATAGRAM];
        // Not an Option: its None may be a niche value, which would put the
        // whole zeroed state into the module's data section.
        static mut STATE: core::mem::MaybeUninit<$state> = core::mem::MaybeUninit::uninit();
        static mut STARTED: bool = false;

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_buffer() -> i32 {
            // SAFETY: a module is single-threaded; the address is all the host needs.
            unsafe { core::ptr::addr_of_mut!(BUFFER) as i32 }
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_start(peers: i32, shim_len: i32) -> i32 {
            let state = <$state as $crate::$role>::start(peers.max(0) as usize, shim_len.max(0) as usize);
            // SAFETY: single-threaded; set once before any event.
            unsafe {
                (*core::ptr::addr_of_mut!(STATE)).write(state);
                STARTED = true;
            }
            0
        }

        fn with_state(f: impl FnOnce(&mut $state, &[u8])) {
            // SAFETY: single-threaded; the host wrote the datagram into
            // BUFFER before calling, and nothing else touches either.
            unsafe {
                let buffer: &[u8] = &*core::ptr::addr_of!(BUFFER);
                if STARTED {
                    f((*core::ptr::addr_of_mut!(STATE)).assume_init_mut(), buffer);
                }
            }
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_from_host(len: i32) {
            with_state(|m, buffer| $crate::$role::from_host(m, &buffer[..len as usize]));
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_tick(now_ms: i64) {
            with_state(|m, _| $crate::$role::tick(m, now_ms));
        }
    };
}

/// The exports the host calls, for the module type `$module`.
#[macro_export]
macro_rules! export_module {
    ($module:ty) => {
        $crate::__export_common!($module, Module);

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_from_entry(entry: i32, len: i32) {
            with_state(|m, buffer| $crate::Module::from_entry(m, entry as usize, &buffer[..len as usize]));
        }
    };
}

/// What a monitor module does with each event.
pub trait Monitor {
    /// Called once, with the number of overlay indices and the monitor's
    /// own shim length (the longest metric a rule may give it).
    fn start(overlays: usize, shim_len: usize) -> Self;
    /// A packet of a metric rule's flow: `[metric, zero-padded][IP packet]`.
    fn from_host(&mut self, packet: &[u8]);
    /// A packet that came back over overlay `overlay`, as `[zeroed
    /// shim][IP packet]`: what [`to_host`] takes.
    fn from_overlay(&mut self, overlay: usize, packet: &[u8]);
    /// Every 100 ms.
    fn tick(&mut self, _now_ms: i64) {}
}

/// The exports the host calls, for the monitor module type `$monitor`.
#[macro_export]
macro_rules! export_monitor {
    ($monitor:ty) => {
        $crate::__export_common!($monitor, Monitor);

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_from_overlay(overlay: i32, len: i32) {
            with_state(|m, buffer| {
                $crate::Monitor::from_overlay(m, overlay as usize, &buffer[..len as usize])
            });
        }
    };
}
