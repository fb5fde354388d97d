//! The kernel's side of the flows the broker pins: claimed flows whose
//! verdict it cached so they pass (or are measured) in the kernel. Both
//! uplink programs note a pinned flow's FIN or RST here.

use oasis_common::{FLOW_CLOSING, FlowKey, Verdict};

use crate::maps::CLAIMED;

/// A FIN or RST of a claimed flow the broker left to the kernel (`key`:
/// the flow as it leaves this host), either way: noted in its verdict,
/// which the broker reads when it sweeps its flows.
#[inline(never)]
pub fn closing(key: &FlowKey) {
    if let Some(entry) = CLAIMED.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; plain bytes.
        unsafe {
            if (*entry).verdict != Verdict::Divert as u8 {
                (*entry).flags |= FLOW_CLOSING;
            }
        }
    }
}
