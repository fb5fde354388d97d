//! The guest side of the Oasis module contract (docs/modules.md): the host
//! functions a module may call, safe to use, and the buffer the host writes
//! each datagram into. A module implements [`Module`] and names its type
//! with [`export_module!`].
#![no_std]

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
}

/// Why the host refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No entry node has that index.
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

/// The exports the host calls, for the module type `$module`.
#[macro_export]
macro_rules! export_module {
    ($module:ty) => {
        static mut BUFFER: [u8; $crate::MAX_DATAGRAM] = [0; $crate::MAX_DATAGRAM];
        static mut MODULE: Option<$module> = None;

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_buffer() -> i32 {
            // SAFETY: a module is single-threaded; the address is all the host needs.
            unsafe { core::ptr::addr_of_mut!(BUFFER) as i32 }
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_start(entries: i32, shim_len: i32) -> i32 {
            let module = <$module as $crate::Module>::start(entries.max(0) as usize, shim_len.max(0) as usize);
            // SAFETY: single-threaded; set once before any event.
            unsafe { *core::ptr::addr_of_mut!(MODULE) = Some(module) };
            0
        }

        fn with_module(f: impl FnOnce(&mut $module, &[u8])) {
            // SAFETY: single-threaded; the host wrote the datagram into
            // BUFFER before calling, and nothing else touches either.
            unsafe {
                let buffer: &[u8] = &*core::ptr::addr_of!(BUFFER);
                if let Some(module) = (*core::ptr::addr_of_mut!(MODULE)).as_mut() {
                    f(module, buffer);
                }
            }
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_from_host(len: i32) {
            with_module(|m, buffer| $crate::Module::from_host(m, &buffer[..len as usize]));
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_from_entry(entry: i32, len: i32) {
            with_module(|m, buffer| $crate::Module::from_entry(m, entry as usize, &buffer[..len as usize]));
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn oasis_tick(now_ms: i64) {
            with_module(|m, _| $crate::Module::tick(m, now_ms));
        }
    };
}
