//! For exit nodes: loads the ingress steering program and attaches it to
//! the exit's uplink. Like the classifier, its link belongs to this process
//! and goes away with it.

use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya::programs::tc::{SchedClassifier, TcAttachType};
use oasis_common::{EXIT_INGRESS_PROGRAM, ExitSettings, maps};

use super::datapath::DatapathError;

pub struct ExitSteering {
    _ebpf: Ebpf,
}

impl ExitSteering {
    pub fn attach(
        object: &[u8],
        uplink: &str,
        settings: ExitSettings,
    ) -> Result<ExitSteering, DatapathError> {
        let mut ebpf = Ebpf::load(object).map_err(DatapathError::Load)?;
        let map = ebpf
            .take_map(maps::EXIT_SETTINGS.name)
            .ok_or(DatapathError::Missing(maps::EXIT_SETTINGS.name))?;
        let mut settings_map: Array<MapData, ExitSettings> =
            Array::try_from(map).map_err(|source| DatapathError::Map {
                map: maps::EXIT_SETTINGS.name,
                source,
            })?;
        settings_map
            .set(0, settings, 0)
            .map_err(|source| DatapathError::Map {
                map: maps::EXIT_SETTINGS.name,
                source,
            })?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(EXIT_INGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(EXIT_INGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;
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
            .map_err(|source| DatapathError::Attach {
                iface: uplink.to_string(),
                source,
            })?;
        Ok(ExitSteering { _ebpf: ebpf })
    }
}
