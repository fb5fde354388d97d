//! The exit node's TC ingress program (oasis-ebpf/src/exit.rs): loaded from
//! the shared kernel object and attached to the exit's uplink. Like the
//! broker's classifier, its link belongs to this process and goes away
//! with it.

use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya::programs::tc::{SchedClassifier, TcAttachType};
use oasis_common::{EXIT_INGRESS_PROGRAM, ExitSettings, maps};

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
}

pub struct ExitSteering {
    ebpf: Ebpf,
}

/// What the steering program has cost, as the kernel counts it (while
/// `kernel.bpf_stats_enabled` is 1).
#[derive(serde::Serialize, Debug, Clone, Default)]
pub struct ProgramStats {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ExitSteering {
    pub fn attach(uplink: &str, settings: ExitSettings) -> Result<ExitSteering, SteerError> {
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
        let tcx =
            aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // A clsact filter outlives a crashed exit node: remove any left.
            let _ = aya::programs::tc::qdisc_add_clsact(uplink);
            let _ =
                aya::programs::tc::qdisc_detach_program(uplink, TcAttachType::Ingress, EXIT_INGRESS_PROGRAM);
        }
        program
            .attach(uplink, TcAttachType::Ingress)
            .map_err(|source| SteerError::Attach {
                iface: uplink.to_string(),
                source,
            })?;
        Ok(ExitSteering { ebpf })
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
