//! The exit node's TC ingress program (oasis-ebpf/src/exit.rs): loaded from
//! the shared kernel object and attached to the exit's uplink.
//!
//! Its TCX link is pinned in a BPF file system, so it outlives the process:
//! while no exit runs (a restart, a crash), replies for the NAT's ports are
//! still taken off the uplink, toward a TUN device that is gone, and so
//! dropped, rather than reaching the host's own stack, which would answer
//! each with a reset and end every client's connection. The next exit
//! puts its program in the same link in one step (`bpf_link_update`), with
//! its own TUN in its settings: no moment without steering. `oasis-exit
//! --unpin` removes it when the exit is retired. On kernels before 6.6 (no
//! TCX) the program is a clsact filter owned by the process, as before.

use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifier, SchedClassifierLink, TcAttachOptions, TcAttachType};
use aya::programs::{Link, LinkOrder};
use oasis_common::{EXIT_INGRESS_PROGRAM, ExitSettings, maps};

/// The magic number of a BPF file system (statfs).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error(
        "loading the kernel programs failed: {0} (the exit node needs a kernel with BPF and BTF and must run as root)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no {0}: the exit node and its kernel programs were built apart")]
    Missing(&'static str),
    #[error("writing map {map}: {0}", map = maps::EXIT_SETTINGS.name)]
    Settings(#[source] aya::maps::MapError),
    #[error("loading program {EXIT_INGRESS_PROGRAM}: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("attaching program {EXIT_INGRESS_PROGRAM} to {iface} ingress: {source}")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("the uplink {0} does not exist")]
    NoUplink(String),
    #[error("removing the pinned steering {path}: {source}")]
    Unpin { path: PathBuf, source: std::io::Error },
}

pub struct ExitSteering {
    ebpf: Ebpf,
    /// Where the link is pinned, when it is.
    pub pinned: Option<PathBuf>,
}

/// What the steering program has cost, as the kernel counts it (while
/// `kernel.bpf_stats_enabled` is 1).
#[derive(serde::Serialize, Debug, Clone, Default)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Where the pinned link of the steering on `uplink` lives under `dir`:
/// named by the network namespace and the interface, so exits in other
/// namespaces (or on other uplinks) never take each other's.
pub fn pin_path(dir: &Path, uplink: &str) -> Result<PathBuf, SteerError> {
    use std::os::unix::fs::MetadataExt;
    let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    let name = std::ffi::CString::new(uplink).map_err(|_| SteerError::NoUplink(uplink.into()))?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(SteerError::NoUplink(uplink.into()));
    }
    Ok(dir.join(format!("{netns}-{index}-ingress")))
}

/// Makes `dir` a directory on a BPF file system: mounts one at `dir` when
/// it is an empty directory that is not (`/sys/fs/bpf` where systemd did
/// not mount it). Why not, when it cannot.
fn bpf_dir(dir: &Path) -> Result<(), String> {
    let on_bpffs = |path: &Path| {
        let Ok(text) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: a zeroed statfs is a valid out-parameter.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid path and out-parameter.
        (unsafe { libc::statfs(text.as_ptr(), &mut stat) } == 0) && stat.f_type as i64 == BPF_FS_MAGIC
    };
    if on_bpffs(dir) {
        return Ok(());
    }
    // The directory may be new, below a BPF file system.
    if let Some(parent) = dir.parent()
        && on_bpffs(parent)
    {
        return std::fs::create_dir_all(dir).map_err(|e| e.to_string());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid C strings; mounting a BPF file system changes nothing
    // else.
    let mounted = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if mounted != 0 {
        return Err(format!(
            "{} is no BPF file system and mounting one there failed: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

impl ExitSteering {
    /// Loads the program and attaches it to `uplink`'s ingress: into the
    /// link pinned under `pins` when an earlier exit left one, else a new
    /// link, pinned there. Without a BPF file system (or before TCX) the
    /// link is the process's own, and the log says what that costs.
    pub fn attach(
        uplink: &str,
        settings: ExitSettings,
        pins: Option<&Path>,
    ) -> Result<ExitSteering, SteerError> {
        let mut ebpf = Ebpf::load(oasis_ebpf_object::OBJECT).map_err(SteerError::Load)?;
        let map = ebpf
            .take_map(maps::EXIT_SETTINGS.name)
            .ok_or(SteerError::Missing(maps::EXIT_SETTINGS.name))?;
        let mut settings_map: Array<MapData, ExitSettings> =
            Array::try_from(map).map_err(SteerError::Settings)?;
        settings_map.set(0, settings, 0).map_err(SteerError::Settings)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(EXIT_INGRESS_PROGRAM)
            .ok_or(SteerError::Missing(EXIT_INGRESS_PROGRAM))?
            .try_into()
            .map_err(SteerError::Program)?;
        program.load().map_err(SteerError::Program)?;
        let attach_error = |source| SteerError::Attach {
            iface: uplink.to_string(),
            source,
        };
        let tcx =
            aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // A clsact filter outlives a crashed exit node: remove any left.
            let _ = aya::programs::tc::qdisc_add_clsact(uplink);
            let _ =
                aya::programs::tc::qdisc_detach_program(uplink, TcAttachType::Ingress, EXIT_INGRESS_PROGRAM);
            program
                .attach(uplink, TcAttachType::Ingress)
                .map_err(attach_error)?;
            tracing::warn!(
                "this kernel has no TCX (before 6.6): while no exit runs, replies for the NAT's ports \
                 reach this host's stack, which resets them"
            );
            return Ok(ExitSteering { ebpf, pinned: None });
        }
        let path = match pins {
            None => None,
            Some(dir) => match bpf_dir(dir) {
                Ok(()) => Some(pin_path(dir, uplink)?),
                Err(why) => {
                    tracing::warn!(
                        "the steering program is not pinned ({why}): while no exit runs, replies for \
                         the NAT's ports reach this host's stack, which resets them; give --pin-dir a \
                         directory on a BPF file system"
                    );
                    None
                }
            },
        };
        let Some(path) = path else {
            program
                .attach(uplink, TcAttachType::Ingress)
                .map_err(attach_error)?;
            return Ok(ExitSteering { ebpf, pinned: None });
        };
        // An earlier exit's link: this program takes its place in one step.
        match PinnedLink::from_pin(&path) {
            Ok(old) => {
                let replaced = SchedClassifierLink::try_from(FdLink::from(old))
                    .map_err(|e| e.to_string())
                    .and_then(|link| program.attach_to_link(link).map_err(|e| e.to_string()));
                match replaced {
                    Ok(_) => {
                        tracing::info!(path = %path.display(), "took over the pinned steering of the last exit");
                        return Ok(ExitSteering {
                            ebpf,
                            pinned: Some(path),
                        });
                    }
                    // Its interface went away since (the link is defunct):
                    // a new link.
                    Err(e) => {
                        tracing::info!(path = %path.display(), "the pinned steering cannot be taken over ({e}); attaching anew");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), "reading the pinned steering: {e}; attaching anew");
                let _ = std::fs::remove_file(&path);
            }
        }
        let id = program
            .attach_with_options(
                uplink,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_error)?;
        let link = program.take_link(id).map_err(attach_error)?;
        let pinned = FdLink::try_from(link)
            .map_err(|e| e.to_string())
            .and_then(|link| link.pin(&path).map_err(|e| e.to_string()));
        match pinned {
            // The pin keeps the link (and the program) attached; the
            // process's descriptor may go.
            Ok(pinned) => {
                drop(pinned);
                Ok(ExitSteering {
                    ebpf,
                    pinned: Some(path),
                })
            }
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "pinning the steering failed ({e}): attached for this process only; while no exit \
                     runs, replies for the NAT's ports will draw resets"
                );
                program
                    .attach(uplink, TcAttachType::Ingress)
                    .map_err(attach_error)?;
                Ok(ExitSteering { ebpf, pinned: None })
            }
        }
    }

    /// Removes the steering pinned for `uplink` under `dir`, which detaches
    /// it: for an exit that is retired. Whether there was one.
    pub fn unpin(dir: &Path, uplink: &str) -> Result<bool, SteerError> {
        let path = pin_path(dir, uplink)?;
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                let link = link.unpin().map_err(|source| SteerError::Unpin {
                    path: path.clone(),
                    source,
                })?;
                let _ = link.detach();
                Ok(true)
            }
            Err(_) if !path.exists() => Ok(false),
            Err(_) => std::fs::remove_file(&path)
                .map(|()| true)
                .map_err(|source| SteerError::Unpin { path, source }),
        }
    }

    /// The loaded object, for the maps other parts of the exit use.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn stats(&self) -> Option<ProgramStats> {
        let info = self.ebpf.program(EXIT_INGRESS_PROGRAM)?.info().ok()?;
        Some(ProgramStats {
            name: EXIT_INGRESS_PROGRAM,
            run_count: info.run_count(),
            run_time_ns: info.run_time().as_nanos() as u64,
        })
    }
}
