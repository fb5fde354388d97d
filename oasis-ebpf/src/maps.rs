//! Every map of the programs, declared from the one table in
//! `oasis_common::maps`, which the broker opens them by.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf};

macro_rules! declare {
    ($($(#[$doc:meta])* $id:ident, $name:tt, $kind:ident<$($arg:ty),+>, $size:expr;)*) => {
        $( declare_one!($(#[$doc])* $id, $name, $kind<$($arg),+>, $size); )*
    };
}

macro_rules! declare_one {
    // A ring buffer is sized in bytes and has no key or value type; the
    // table names what it carries for the reader.
    ($(#[$doc:meta])* $id:ident, $name:tt, RingBuf<$item:ty>, $size:expr) => {
        $(#[$doc])*
        #[map(name = $name)]
        pub(crate) static $id: RingBuf = RingBuf::with_byte_size($size, 0);
    };
    ($(#[$doc:meta])* $id:ident, $name:tt, SparseHashMap<$key:ty, $value:ty>, $size:expr) => {
        $(#[$doc])*
        #[map(name = $name)]
        pub(crate) static $id: HashMap<$key, $value> =
            HashMap::with_max_entries($size, aya_ebpf::bindings::BPF_F_NO_PREALLOC);
    };
    ($(#[$doc:meta])* $id:ident, $name:tt, $kind:ident<$($arg:ty),+>, $size:expr) => {
        $(#[$doc])*
        #[map(name = $name)]
        pub(crate) static $id: $kind<$($arg),+> = $kind::with_max_entries($size, 0);
    };
}

oasis_common::kernel_maps!(declare);

/// Counts one event of `index` (`oasis_common::stat`) in this CPU's slot of
/// STATS: every program counts there.
#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}
