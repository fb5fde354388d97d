//! What the kernel parts of this platform share: their errors, taking a
//! typed map out of the loaded object, a second handle on a map, and the
//! clock the kernel programs keep (CLOCK_MONOTONIC). kernel.rs loads and
//! attaches; the other files each hold their maps; all of them use these.

use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{Array, MapData, MapError};
use aya::programs::ProgramError;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading the kernel programs failed: {0}\n(Oasis needs a kernel with BPF and BTF and must run as root; \
         `RUST_LOG=debug` shows the verifier log)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no {0}: the broker and its kernel programs were built apart")]
    Missing(&'static str),
    #[error("kernel program {program}: {source}")]
    Program {
        program: &'static str,
        source: Box<ProgramError>,
    },
    #[error("attaching kernel program {program} to {iface} {hook}: {source}")]
    Attach {
        program: &'static str,
        hook: &'static str,
        iface: String,
        source: Box<ProgramError>,
    },
    #[error("kernel map {map}: {source}")]
    Map {
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("no interface named {0}")]
    NoInterface(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

impl KernelError {
    pub(super) fn map(map: &'static str) -> impl Fn(MapError) -> KernelError {
        move |source| KernelError::Map {
            map,
            source: Box::new(source),
        }
    }

    pub(super) fn program(program: &'static str) -> impl Fn(ProgramError) -> KernelError {
        move |source| KernelError::Program {
            program,
            source: Box::new(source),
        }
    }
}

/// Takes a map out of the object, typed.
macro_rules! take_map {
    ($ebpf:expr, $def:expr, $ty:ty) => {{
        let def: oasis_common::maps::MapDef = $def;
        let map = $ebpf.take_map(def.name).ok_or(KernelError::Missing(def.name))?;
        <$ty>::try_from(map).map_err(KernelError::map(def.name))?
    }};
}
pub(super) use take_map;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); set dns.cgroup")]
    NoHierarchy,
    #[error("opening cgroup {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("reading the network namespace cookie: {0}")]
    Netns(std::io::Error),
    #[error("attaching kernel program {program} to cgroup {path} ({hook}): {source}")]
    Attach {
        program: &'static str,
        hook: &'static str,
        path: PathBuf,
        source: Box<aya::programs::ProgramError>,
    },
}

/// A second handle (file descriptor) on a map another part holds.
pub(super) fn second_handle(data: &MapData, name: &'static str) -> Result<MapData, KernelError> {
    use std::os::fd::AsFd;
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| KernelError::Map {
            map: name,
            source: Box::new(aya::maps::MapError::IoError(e)),
        })?;
    MapData::from_fd(fd).map_err(KernelError::map(name))
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How long ago a CLOCK_MONOTONIC time was.
pub fn age_of(ns: u64) -> Duration {
    Duration::from_nanos(monotonic_ns().saturating_sub(ns))
}

pub fn ifindex(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A count the uplinks' ingress program reads only as "is there anything
/// to look for": it goes to the kernel when it changes between zero and
/// not zero, not with every flow.
pub(super) struct ActiveCount {
    map: Array<MapData, u32>,
    count: u32,
}

impl ActiveCount {
    pub(super) fn new(mut map: Array<MapData, u32>, name: &'static str) -> Result<ActiveCount, KernelError> {
        map.set(0, 0, 0).map_err(KernelError::map(name))?;
        Ok(ActiveCount { map, count: 0 })
    }

    pub(super) fn add(&mut self) {
        self.count = self.count.saturating_add(1);
        if self.count == 1 {
            let _ = self.map.set(0, self.count, 0);
        }
    }

    pub(super) fn sub(&mut self) {
        if self.count == 1 {
            let _ = self.map.set(0, 0, 0);
        }
        self.count = self.count.saturating_sub(1);
    }

    pub(super) fn count(&self) -> u32 {
        self.count
    }
}
