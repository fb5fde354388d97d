//! Attaching the DNS redirect (oasis-ebpf/src/dns.rs) to a cgroup. The
//! links belong to this process: when the broker dies, the kernel drops
//! them and queries go to the host's servers again.

use std::fs::File;
use std::path::PathBuf;

use aya::Ebpf;
use std::net::IpAddr;
use std::sync::Arc;

use aya::maps::{Array, HashMap, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use oasis_common::{DNS_PROGRAMS, DnsOriginal, DnsSettings, maps};

use super::dns_origins::LinuxOrigins;
use super::sys::{CgroupError, KernelError, take_map};
use crate::platform::{DnsInterception, InterceptSettings, QueryOrigins};

/// The DNS redirect, attached. Dropping it does not detach (the programs
/// own their links); `disable` stops redirecting at once.
pub struct DnsRedirect {
    settings: Array<MapData, DnsSettings>,
    system: HashMap<MapData, [u8; 16], u8>,
    system_now: Vec<[u8; 16]>,
    pub cgroup: PathBuf,
    origins: Arc<LinuxOrigins>,
}

impl DnsRedirect {
    /// Loads the eight programs and attaches them to the cgroup the
    /// settings name (default: the root of the cgroup v2 hierarchy).
    pub(super) fn attach(ebpf: &mut Ebpf, intercept: &InterceptSettings) -> Result<DnsRedirect, KernelError> {
        let cgroup = match &intercept.scope {
            Some(path) => path.clone(),
            None => default_cgroup()?,
        };
        let settings = DnsSettings {
            netns_cookie: netns_cookie().map_err(CgroupError::Netns)?,
            broker_tgid: std::process::id(),
            port: intercept.port,
            explicit_port: crate::dns::listen::explicit_port(intercept.port),
            has_v6: u8::from(intercept.v6),
            _pad: [0; 7],
        };
        let mut settings_map = take_map!(ebpf, maps::DNS_SETTINGS, Array<MapData, DnsSettings>);
        settings_map
            .set(0, settings, 0)
            .map_err(KernelError::map(maps::DNS_SETTINGS.name))?;
        let file = File::open(&cgroup).map_err(|source| CgroupError::Open {
            path: cgroup.clone(),
            source,
        })?;
        for (program, hook) in DNS_PROGRAMS {
            let loaded: &mut CgroupSockAddr = ebpf
                .program_mut(program)
                .ok_or(KernelError::Missing(program))?
                .try_into()
                .map_err(KernelError::program(program))?;
            loaded.load().map_err(KernelError::program(program))?;
            // On kernels with BPF links (5.7+) aya attaches through one, which
            // always runs beside other programs on the cgroup (systemd's, a
            // container runtime's) and takes no mode flags.
            loaded
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| CgroupError::Attach {
                    program,
                    hook,
                    path: cgroup.clone(),
                    source: Box::new(source),
                })?;
        }
        let original = take_map!(ebpf, maps::DNS_ORIGINAL, HashMap<MapData, u64, DnsOriginal>);
        Ok(DnsRedirect {
            settings: settings_map,
            system: take_map!(ebpf, maps::DNS_SYSTEM, HashMap<MapData, [u8; 16], u8>),
            system_now: Vec::new(),
            cgroup,
            origins: Arc::new(LinuxOrigins::new(original)),
        })
    }
}

impl DnsInterception for DnsRedirect {
    /// Stops redirecting (shutdown: answers to queries in flight still
    /// get their source put back).
    fn disable(&mut self) {
        let _ = self.settings.set(
            0,
            DnsSettings {
                port: 0,
                ..DnsSettings::default()
            },
            0,
        );
    }

    fn scope(&self) -> PathBuf {
        self.cgroup.clone()
    }

    fn origins(&self) -> Option<Arc<dyn QueryOrigins>> {
        Some(self.origins.clone())
    }

    fn set_system_servers(&mut self, servers: &[IpAddr]) {
        let keys: Vec<[u8; 16]> = servers
            .iter()
            .take(oasis_common::DNS_SYSTEM_ENTRIES as usize)
            .map(|server| match server.to_canonical() {
                IpAddr::V4(v4) => {
                    let mut key = [0u8; 16];
                    key[..4].copy_from_slice(&v4.octets());
                    key
                }
                IpAddr::V6(v6) => v6.octets(),
            })
            .collect();
        // New ones first: a query in between goes to either port, and
        // either answers it.
        for key in keys.iter().filter(|k| !self.system_now.contains(k)) {
            if let Err(e) = self.system.insert(key, 1, 0) {
                tracing::warn!("{}: {e}", maps::DNS_SYSTEM.name);
            }
        }
        for key in self.system_now.iter().filter(|k| !keys.contains(k)) {
            let _ = self.system.remove(key);
        }
        self.system_now = keys;
    }
}

pub fn default_cgroup() -> Result<PathBuf, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|_| CgroupError::NoHierarchy)?;
    crate::sender::cgroup_root(&text).ok_or(CgroupError::NoHierarchy)
}

/// The kernel's cookie for this process's network namespace.
pub fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
