//! Flows left to the kernel: a header rule's flow on the underlay gets the
//! cached verdict `Pass` under its rule among the claimed flows' verdicts
//! (it passes, counted by the rule); a metric rule's flow on the underlay
//! gets `Measure` (it passes, and is measured for the Monitor,
//! oasis-ebpf/src/measure.rs) and an entry in `MONITORED` that the programs
//! fill; the Monitor's TCP probes get that entry too. `MONITOR_ACTIVE` and
//! `PINNED_ACTIVE` tell the uplinks' ingress program whether there is
//! anything to look for (answers to measure; FINs and RSTs of pinned
//! flows).

use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{Array, HashMap, IterableMap, MapData};
use oasis_common::{FLOW_CLOSING, FlowEntry, FlowKey, Measure, Verdict, maps, measure_flag};

use super::sys::{ActiveCount, KernelError, monotonic_ns, second_handle, take_map};
use crate::engine::KernelSeen;
use crate::engine::{FlowPins, TableError};

pub struct KernelPins {
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    monitored: HashMap<MapData, FlowKey, Measure>,
    /// `MONITOR_ACTIVE`: the flows measured.
    measured: ActiveCount,
    /// `PINNED_ACTIVE`: the flows pinned (an upper bound: the kernel may
    /// have evicted some, and a pin made again counts again).
    pinned: ActiveCount,
}

/// A CLOCK_MONOTONIC time from an `Instant`.
fn monotonic_of(at: Instant) -> u64 {
    let now = Instant::now();
    let ns = monotonic_ns();
    if at <= now {
        ns.saturating_sub(now.duration_since(at).as_nanos() as u64)
    } else {
        ns + at.duration_since(now).as_nanos() as u64
    }
}

impl KernelPins {
    /// `claimed`: the classifier's verdicts of claimed flows (a second
    /// handle is taken).
    pub(super) fn take(
        ebpf: &mut Ebpf,
        claimed: &HashMap<MapData, FlowKey, FlowEntry>,
    ) -> Result<KernelPins, KernelError> {
        let data = second_handle(
            IterableMap::<FlowKey, FlowEntry>::map(claimed),
            maps::CLAIMED.name,
        )?;
        let measured = take_map!(ebpf, maps::MONITOR_ACTIVE, Array<MapData, u32>);
        let pinned = take_map!(ebpf, maps::PINNED_ACTIVE, Array<MapData, u32>);
        Ok(KernelPins {
            flows: HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(KernelError::map(maps::CLAIMED.name))?,
            monitored: take_map!(ebpf, maps::MONITORED, HashMap<MapData, FlowKey, Measure>),
            measured: ActiveCount::new(measured, maps::MONITOR_ACTIVE.name)?,
            pinned: ActiveCount::new(pinned, maps::PINNED_ACTIVE.name)?,
        })
    }

    fn refused(map: &'static str) -> impl Fn(aya::maps::MapError) -> TableError {
        move |e| TableError {
            table: map,
            reason: e.to_string(),
        }
    }
}

/// BPF_NOEXIST: an update that only creates.
const CREATE_ONLY: u64 = 1;

fn already_there(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(call) if call.io_error.raw_os_error() == Some(libc::EEXIST))
}

impl FlowPins for KernelPins {
    fn pin(&mut self, flow: &FlowKey, rule: u32, measured: bool) -> Result<(), TableError> {
        let verdict = if measured { Verdict::Measure } else { Verdict::Pass };
        let entry = FlowEntry {
            last_seen_ns: monotonic_ns(),
            rule_id: rule,
            verdict: verdict as u8,
            flags: 0,
            _pad: [0; 2],
        };
        // Counted before the entry exists, so the ingress program never
        // skips a pinned flow's FIN. A pin made again (the kernel lost the
        // verdict) counts twice: the count only says whether to look.
        self.pinned.add();
        self.flows
            .insert(flow, entry, 0)
            .map_err(Self::refused(maps::CLAIMED.name))
    }

    fn measure(&mut self, flow: &FlowKey, syn_sent: Option<Instant>, probe: bool) -> Result<(), TableError> {
        let entry = Measure {
            syn_ns: syn_sent.map_or(0, monotonic_of),
            flags: if probe { measure_flag::PROBE } else { 0 },
            ..Measure::default()
        };
        // One system call for a new flow (the common case), two for one
        // measured again.
        match self.monitored.insert(flow, entry, CREATE_ONLY) {
            Ok(()) => {
                // Counted after the entry exists: the ingress program never
                // skips an answer whose entry is there.
                self.measured.add();
                Ok(())
            }
            Err(e) if already_there(&e) => self
                .monitored
                .insert(flow, entry, 0)
                .map_err(Self::refused(maps::MONITORED.name)),
            Err(e) => Err(Self::refused(maps::MONITORED.name)(e)),
        }
    }

    fn forget(&mut self, flow: &FlowKey) {
        if self
            .flows
            .get(flow, 0)
            .is_ok_and(|e| e.verdict != Verdict::Divert as u8)
            && self.flows.remove(flow).is_ok()
        {
            self.pinned.sub();
        }
        if self.monitored.remove(flow).is_ok() {
            self.measured.sub();
        }
    }

    fn last_seen(&self, flow: &FlowKey) -> Option<KernelSeen> {
        let entry = self.flows.get(flow, 0).ok()?;
        let seen = entry.last_seen_ns;
        let closing = entry.flags & FLOW_CLOSING != 0
            || self
                .monitored
                .get(flow, 0)
                .is_ok_and(|m| m.flags & measure_flag::CLOSING != 0);
        let at = Instant::now().checked_sub(Duration::from_nanos(monotonic_ns().saturating_sub(seen)))?;
        Some(KernelSeen { at, closing })
    }

    fn answered(&self, flow: &FlowKey) -> bool {
        self.monitored
            .get(flow, 0)
            .is_ok_and(|m| m.flags & measure_flag::ANSWERED != 0)
    }

    fn measured(&self) -> usize {
        self.measured.count() as usize
    }

    fn claimed_by(&self, flow: &FlowKey) -> Option<u32> {
        self.flows
            .get(flow, 0)
            .ok()
            .filter(|e| e.verdict == Verdict::Divert as u8 && e.rule_id != 0)
            .map(|e| e.rule_id)
    }
}
