//! The fast path's maps in the exit's kernel program (`oasis-ebpf`'s
//! `exit_fast.rs`): the core's kernel work written into them, the kernel's
//! last-seen times and counters read out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, PerCpuArray};
use oasis_common::{ExitBack, ExitFastCounts, ExitFlowKey, ExitOut, FlowKey, exit_miss, maps};
use oasis_exit::core::Traffic;
use oasis_exit::fast::{FastEntry, FastWork};
use serde::Serialize;

pub struct FastMaps {
    out: HashMap<MapData, ExitFlowKey, ExitOut>,
    back: HashMap<MapData, FlowKey, ExitBack>,
    counts: PerCpuArray<MapData, ExitFastCounts>,
    misses: PerCpuArray<MapData, u64>,
}

/// What the kernel carried, for the stats file.
#[derive(Serialize, Debug, Clone, Default)]
pub struct FastStats {
    pub to_internet: Traffic,
    pub to_client: Traffic,
    pub classes: BTreeMap<u8, FastClass>,
    /// Packets of carried flows that went through user space after all.
    pub to_user_space: BTreeMap<&'static str, u64>,
    /// Kernel writes that failed (a full map), each leaving its flow to
    /// user space.
    pub install_failures: u64,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct FastClass {
    pub to_internet: Traffic,
    pub to_client: Traffic,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> anyhow::Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow::anyhow!("the kernel object has no map {name}"))?;
    T::try_from(map).map_err(|e| anyhow::anyhow!("map {name}: {e}"))
}

impl FastMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<FastMaps> {
        Ok(FastMaps {
            out: take(ebpf, maps::EXIT_OUT.name)?,
            back: take(ebpf, maps::EXIT_BACK.name)?,
            counts: take(ebpf, maps::EXIT_FAST_COUNTS.name)?,
            misses: take(ebpf, maps::EXIT_FAST_MISSES.name)?,
        })
    }

    /// Carries out the core's work in order; returns how many installs
    /// failed (their flows stay with user space: the kernel finds no entry).
    pub fn apply(&mut self, work: &[FastWork]) -> u64 {
        let mut failed = 0;
        for item in work {
            match item {
                FastWork::Install(entry) => {
                    // The reply's entry first: the kernel learns into it
                    // from the first datagram it opens.
                    let done = self.back.insert(entry.reply, entry.back, 0).is_ok()
                        && self.out.insert(entry.key, entry.out, 0).is_ok();
                    if !done {
                        let _ = self.back.remove(&entry.reply);
                        failed += 1;
                        tracing::debug!(?entry.key, "the kernel took no fast-path entry (full?)");
                    }
                }
                FastWork::Remove(entry) => {
                    let _ = self.out.remove(&entry.key);
                    let _ = self.back.remove(&entry.reply);
                }
            }
        }
        failed
    }

    /// When the kernel last carried a packet of the flow either way, if it
    /// ever did.
    pub fn last_seen(&self, entry: &FastEntry, now: Instant) -> Option<Instant> {
        let out = self.out.get(&entry.key, 0).map_or(0, |e| e.last_seen_ns);
        let back = self.back.get(&entry.reply, 0).map_or(0, |e| e.last_seen_ns);
        let latest = out.max(back);
        if latest == 0 {
            return None;
        }
        let age = monotonic_ns().saturating_sub(latest);
        now.checked_sub(Duration::from_nanos(age))
    }

    pub fn stats(&self, install_failures: u64) -> FastStats {
        let mut stats = FastStats {
            install_failures,
            ..FastStats::default()
        };
        for class in 0..oasis_common::EXIT_FAST_CLASSES {
            let Ok(per_cpu) = self.counts.get(&class, 0) else {
                continue;
            };
            let mut sum = ExitFastCounts::default();
            for c in per_cpu.iter() {
                sum.to_internet_packets += c.to_internet_packets;
                sum.to_internet_bytes += c.to_internet_bytes;
                sum.to_client_packets += c.to_client_packets;
                sum.to_client_bytes += c.to_client_bytes;
            }
            if sum == ExitFastCounts::default() {
                continue;
            }
            let entry = FastClass {
                to_internet: Traffic {
                    packets: sum.to_internet_packets,
                    bytes: sum.to_internet_bytes,
                },
                to_client: Traffic {
                    packets: sum.to_client_packets,
                    bytes: sum.to_client_bytes,
                },
            };
            stats.to_internet.packets += sum.to_internet_packets;
            stats.to_internet.bytes += sum.to_internet_bytes;
            stats.to_client.packets += sum.to_client_packets;
            stats.to_client.bytes += sum.to_client_bytes;
            stats.classes.insert(class as u8, entry);
        }
        for reason in 0..exit_miss::COUNT {
            let total: u64 = self
                .misses
                .get(&reason, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            stats
                .to_user_space
                .insert(exit_miss::NAMES[reason as usize], total);
        }
        stats
    }
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's last-seen times.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
