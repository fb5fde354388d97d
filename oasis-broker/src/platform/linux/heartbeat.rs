//! The heartbeat map: CLOCK_MONOTONIC nanoseconds of the broker's last sign
//! of life, of its packet path (the classifier passes everything once it
//! is older than the configured timeout) and of its DNS service (the DNS
//! hooks redirect nothing once that one is). The heartbeat thread holds its own
//! handle (a second file descriptor of the same map), so writing it never
//! waits for anything else the daemon does.

use std::time::Duration;

use aya::Ebpf;
use aya::maps::{Array, IterableMap, MapData};
use oasis_common::{HEARTBEAT_DNS, HEARTBEAT_PACKETS, maps};

use super::sys::{KernelError, age_of, monotonic_ns, second_handle, take_map};
use crate::platform::{Heartbeat, PlatformError};

pub struct KernelHeartbeat {
    map: Array<MapData, u64>,
}

impl KernelHeartbeat {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<KernelHeartbeat, KernelError> {
        Ok(KernelHeartbeat {
            map: take_map!(ebpf, maps::HEARTBEAT, Array<MapData, u64>),
        })
    }

    /// Another handle on the same map.
    pub fn try_clone(&self) -> Result<KernelHeartbeat, KernelError> {
        let name = maps::HEARTBEAT.name;
        let data = second_handle(IterableMap::<u32, u64>::map(&self.map), name)?;
        Ok(KernelHeartbeat {
            map: Array::try_from(aya::maps::Map::Array(data)).map_err(KernelError::map(name))?,
        })
    }

    /// Writes the packet path's heartbeat time directly (tests use it to
    /// age the broker).
    pub fn set(&mut self, ns: u64) -> Result<(), KernelError> {
        self.set_beat(HEARTBEAT_PACKETS, ns)
    }

    fn set_beat(&mut self, index: u32, ns: u64) -> Result<(), KernelError> {
        self.map
            .set(index, ns, 0)
            .map_err(KernelError::map(maps::HEARTBEAT.name))
    }

    /// The map's kernel id, to read it from outside (`bpftool map lookup id`).
    pub fn map_id(&self) -> Option<u32> {
        IterableMap::<u32, u64>::map(&self.map)
            .info()
            .ok()
            .map(|info| info.id())
    }

    /// The packet path's heartbeat as the map holds it.
    pub fn read(&self) -> u64 {
        self.map.get(&HEARTBEAT_PACKETS, 0).unwrap_or(0)
    }
}

impl Heartbeat for KernelHeartbeat {
    fn beat(&mut self, age: Duration) -> Result<(), PlatformError> {
        Ok(self.set(monotonic_ns().saturating_sub(age.as_nanos() as u64))?)
    }

    fn beat_dns(&mut self, age: Duration) -> Result<(), PlatformError> {
        Ok(self.set_beat(
            HEARTBEAT_DNS,
            monotonic_ns().saturating_sub(age.as_nanos() as u64),
        )?)
    }

    fn age(&self) -> Duration {
        age_of(self.read())
    }

    fn kernel_id(&self) -> Option<u32> {
        self.map_id()
    }
}
