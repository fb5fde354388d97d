//! The loaded kernel object (oasis-ebpf): its programs and their
//! attachment to the uplinks, and the map families the other files of this
//! module hold. Implements the platform's [`Kernel`].
//!
//! The links are owned by this process's file descriptors and not pinned:
//! when the broker dies, even by SIGKILL, the kernel detaches every program
//! and traffic flows as if Oasis were not installed. The heartbeat covers
//! the remaining case, a broker that is alive but stuck.

use aya::Ebpf;
use aya::maps::{Array, MapData};
use aya::programs::ProgramInfo;
use aya::programs::tc::{SchedClassifier, SchedClassifierLinkId, TcAttachType};
use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{Counters, DNS_PROGRAMS, EGRESS_PROGRAM, INGRESS_PROGRAM, Settings, maps};

use super::classifier::ClassifierMaps;
use super::dns_redirect::DnsRedirect;
use super::encap::KernelEncap;
use super::heartbeat::KernelHeartbeat;
use super::monitor_events::KernelEvents;
use super::nat::KernelNat;
use super::pins::KernelPins;
pub use super::sys::KernelError;
use super::sys::{ifindex, monotonic_ns, take_map};
use crate::compile::MapImage;
use crate::control::{ClassifierCounters, ProgramStatsView, UplinkView};
use crate::engine::{EncapTable, FlowPins, NatTable};
use crate::platform::{DnsInterception, Heartbeat, InterceptSettings, Kernel, MonitorEvents, PlatformError};

/// One uplink with the programs attached to it.
struct Uplink {
    name: String,
    index: u32,
    mode: &'static str,
    egress: SchedClassifierLinkId,
    ingress: SchedClassifierLinkId,
}

pub struct LinuxKernel {
    ebpf: Ebpf,
    settings: Array<MapData, Settings>,
    heartbeat: KernelHeartbeat,
    classifier: ClassifierMaps,
    nat: Option<KernelNat>,
    pins: Option<KernelPins>,
    encap: Option<KernelEncap>,
    events: Option<KernelEvents>,
    uplinks: Vec<Uplink>,
    dns_attached: bool,
    senders: super::senders::Senders,
}

impl LinuxKernel {
    /// Loads the programs and writes the settings; nothing is attached yet.
    pub fn load(object: &[u8], settings: Settings) -> Result<LinuxKernel, KernelError> {
        let mut ebpf = Ebpf::load(object).map_err(KernelError::Load)?;
        for program in [EGRESS_PROGRAM, INGRESS_PROGRAM] {
            sched_classifier(&mut ebpf, program)?
                .load()
                .map_err(KernelError::program(program))?;
        }
        let mut settings_map = take_map!(ebpf, maps::SETTINGS, Array<MapData, Settings>);
        settings_map
            .set(0, settings, 0)
            .map_err(KernelError::map(maps::SETTINGS.name))?;
        let mut heartbeat = KernelHeartbeat::take(&mut ebpf)?;
        // Alive from the start: the heartbeat thread takes over from here.
        heartbeat.set(monotonic_ns())?;
        let classifier = ClassifierMaps::take(&mut ebpf)?;
        let pins = KernelPins::take(&mut ebpf, classifier.claimed_map())?;
        let apps = take_map!(ebpf, maps::SOCKET_APP, aya::maps::HashMap<MapData, u64, oasis_common::AppName>);
        Ok(LinuxKernel {
            senders: super::senders::Senders::new(apps),
            classifier,
            nat: Some(KernelNat::take(&mut ebpf)?),
            pins: Some(pins),
            encap: Some(KernelEncap::take(
                &mut ebpf,
                settings.overlay_port,
                settings.bypass_mark,
            )?),
            events: Some(KernelEvents::take(&mut ebpf)?),
            settings: settings_map,
            heartbeat,
            ebpf,
            uplinks: Vec::new(),
            dns_attached: false,
        })
    }

    /// A program, for tests that run it on synthetic packets.
    pub fn program(&self, name: &'static str) -> Result<&SchedClassifier, KernelError> {
        self.ebpf
            .program(name)
            .ok_or(KernelError::Missing(name))?
            .try_into()
            .map_err(KernelError::program(name))
    }

    pub fn classifier(&self) -> &ClassifierMaps {
        &self.classifier
    }

    /// The settings the programs run with.
    pub fn settings(&self) -> Result<Settings, KernelError> {
        self.settings
            .get(&0, 0)
            .map_err(KernelError::map(maps::SETTINGS.name))
    }

    /// The NAT table, for tests that look at it after starting flows.
    pub fn nat(&mut self) -> Option<&mut KernelNat> {
        self.nat.as_mut()
    }

    /// The heartbeat map (tests age the broker through it).
    pub fn heartbeat_map(&mut self) -> &mut KernelHeartbeat {
        &mut self.heartbeat
    }

    fn attach_one(&mut self, iface: &str) -> Result<Uplink, KernelError> {
        let index = ifindex(iface).ok_or_else(|| KernelError::NoInterface(iface.into()))?;
        let tcx =
            aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let egress = attach_tc(&mut self.ebpf, EGRESS_PROGRAM, iface, TcAttachType::Egress, tcx)?;
        let ingress = match attach_tc(&mut self.ebpf, INGRESS_PROGRAM, iface, TcAttachType::Ingress, tcx) {
            Ok(link) => link,
            Err(e) => {
                if let Ok(program) = sched_classifier(&mut self.ebpf, EGRESS_PROGRAM) {
                    let _ = program.detach(egress);
                }
                return Err(e);
            }
        };
        Ok(Uplink {
            name: iface.to_string(),
            index,
            mode: if tcx {
                "tcx egress+ingress"
            } else {
                "tc egress+ingress (clsact)"
            },
            egress,
            ingress,
        })
    }
}

fn sched_classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, KernelError> {
    ebpf.program_mut(program)
        .ok_or(KernelError::Missing(program))?
        .try_into()
        .map_err(KernelError::program(program))
}

/// Attaches at TC `hook`: TCX on kernels >= 6.6, else a clsact filter.
fn attach_tc(
    ebpf: &mut Ebpf,
    program: &'static str,
    iface: &str,
    hook: TcAttachType,
    tcx: bool,
) -> Result<SchedClassifierLinkId, KernelError> {
    let classifier = sched_classifier(ebpf, program)?;
    if !tcx {
        // Older kernels attach through a clsact qdisc (it may exist
        // already). Unlike a TCX link, such a filter outlives a crashed
        // daemon: remove any left by an earlier run before adding ours.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        if aya::programs::tc::qdisc_detach_program(iface, hook, program).is_ok() {
            tracing::info!(%iface, program, "removed a filter left by an earlier run");
        }
    }
    classifier
        .attach(iface, hook)
        .map_err(|source| KernelError::Attach {
            program,
            hook: match hook {
                TcAttachType::Ingress => "ingress",
                TcAttachType::Egress => "egress",
                TcAttachType::Custom(_) => "custom",
            },
            iface: iface.to_string(),
            source: Box::new(source),
        })
}

impl Kernel for LinuxKernel {
    fn attach(&mut self, uplink: &str) -> Result<(), PlatformError> {
        let attached = self.attach_one(uplink)?;
        self.uplinks.push(attached);
        Ok(())
    }

    fn detach_all(&mut self) {
        for uplink in std::mem::take(&mut self.uplinks) {
            for (program, link) in [(EGRESS_PROGRAM, uplink.egress), (INGRESS_PROGRAM, uplink.ingress)] {
                let detached = sched_classifier(&mut self.ebpf, program)
                    .map_err(|e| e.to_string())
                    .and_then(|p| p.detach(link).map_err(|e| e.to_string()));
                if let Err(e) = detached {
                    tracing::warn!(iface = %uplink.name, program, "detaching: {e}");
                }
            }
        }
    }

    fn attached(&self) -> Vec<UplinkView> {
        self.uplinks
            .iter()
            .map(|u| UplinkView {
                name: u.name.clone(),
                ifindex: u.index,
                attach: u.mode.into(),
            })
            .collect()
    }

    fn apply(&mut self, image: &MapImage) -> Result<(), PlatformError> {
        Ok(self.classifier.apply(image)?)
    }

    fn rule_counters(&self, rule: u32) -> Counters {
        self.classifier.rule_counters(rule)
    }

    fn counters(&self) -> ClassifierCounters {
        self.classifier.counters()
    }

    fn senders(
        &self,
        sockets: &[(u8, std::net::SocketAddr, std::net::SocketAddr)],
    ) -> Vec<Option<crate::control::SenderView>> {
        self.senders.of(sockets)
    }

    fn programs(&self) -> Vec<ProgramStatsView> {
        let uplinks = !self.uplinks.is_empty();
        let mut programs = vec![
            (EGRESS_PROGRAM, "tc egress", uplinks),
            (INGRESS_PROGRAM, "tc ingress", uplinks),
        ];
        programs.extend(
            DNS_PROGRAMS
                .iter()
                .map(|(name, hook)| (*name, *hook, self.dns_attached)),
        );
        programs
            .into_iter()
            .filter(|(_, _, attached)| *attached)
            .filter_map(|(name, hook, _)| {
                let info: ProgramInfo = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramStatsView {
                    name: name.into(),
                    hook: hook.into(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }

    fn set_fake_pools(&mut self, v4: Ipv4Net, v6: Ipv6Net) -> Result<(), PlatformError> {
        let mut settings = self.settings()?;
        settings.set_fake_pools(
            (v4.network().octets(), v4.prefix_len()),
            (v6.network().octets(), v6.prefix_len()),
        );
        self.settings
            .set(0, settings, 0)
            .map_err(KernelError::map(maps::SETTINGS.name))?;
        Ok(())
    }

    fn take_nat(&mut self) -> Option<Box<dyn NatTable>> {
        self.nat.take().map(|nat| Box::new(nat) as Box<dyn NatTable>)
    }

    fn take_pins(&mut self) -> Option<Box<dyn FlowPins>> {
        self.pins.take().map(|pins| Box::new(pins) as Box<dyn FlowPins>)
    }

    fn take_encap(&mut self) -> Option<Box<dyn EncapTable>> {
        self.encap
            .take()
            .map(|encap| Box::new(encap) as Box<dyn EncapTable>)
    }

    fn take_monitor_events(&mut self) -> Option<Box<dyn MonitorEvents>> {
        self.events
            .take()
            .map(|events| Box::new(events) as Box<dyn MonitorEvents>)
    }

    fn heartbeat(&self) -> Result<Box<dyn Heartbeat>, PlatformError> {
        Ok(Box::new(self.heartbeat.try_clone()?))
    }

    fn intercept_dns(
        &mut self,
        settings: &InterceptSettings,
    ) -> Result<Box<dyn DnsInterception>, PlatformError> {
        let redirect = DnsRedirect::attach(&mut self.ebpf, settings)?;
        self.dns_attached = true;
        Ok(Box::new(redirect))
    }
}

impl Drop for LinuxKernel {
    fn drop(&mut self) {
        self.detach_all();
    }
}
