//! Every map of the programs, declared from the one table in
//! `oasis_common::maps`, which the broker opens them by.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap};

macro_rules! declare {
    ($($(#[$doc:meta])* $id:ident, $name:tt, $kind:ident<$($arg:ty),+>, $size:expr;)*) => {
        $(
            $(#[$doc])*
            #[map(name = $name)]
            pub(crate) static $id: $kind<$($arg),+> = $kind::with_max_entries($size, 0);
        )*
    };
}

oasis_common::kernel_maps!(declare);
