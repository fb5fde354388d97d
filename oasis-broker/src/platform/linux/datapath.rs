//! The kernel half: loads the classifier, attaches it to the uplinks (TCX
//! egress), and keeps its maps in step with the rule list.
//!
//! The links are owned by this process's file descriptors and not pinned:
//! when the broker dies, even by SIGKILL, the kernel detaches the classifier
//! and traffic flows as if Oasis were not installed. The heartbeat covers
//! the remaining case, a broker that is alive but stuck.

use std::collections::BTreeMap;
use std::time::Duration;

use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::ProgramError;
use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::tc::{SchedClassifier, TcAttachType};
use std::path::Path;

use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{
    Counters, DnsSettings, EGRESS_PROGRAM, FlowEntry, FlowKey, INGRESS_PROGRAM, MAX_RULES, NatEntry,
    PortBytes, RuleAction, RuleSet, Settings, maps, stat,
};

use super::dns_redirect::DnsRedirect;
use super::fake_path::NatMaps;

use crate::compile::{MapImage, Prefix};
use crate::control::ClassifierCounters;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the kernel programs failed: {0}\n(Oasis needs a kernel with BPF and BTF, run as root; \
         `RUST_LOG=debug` shows the verifier log)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel object has no {0}: the broker and its kernel programs were built apart")]
    Missing(&'static str),
    #[error("kernel program {EGRESS_PROGRAM}: {0}")]
    Program(#[source] ProgramError),
    #[error("attaching the classifier to {iface} egress failed: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("writing classifier map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("kernel program {program}: {source}")]
    Named {
        program: &'static str,
        source: ProgramError,
    },
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

/// The loaded classifier and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// Uplink name, ifindex, how it is attached, and the links (egress, ingress).
    links: Vec<(
        String,
        u32,
        &'static str,
        SchedClassifierLinkId,
        SchedClassifierLinkId,
    )>,
    fake_v4: LpmTrie<MapData, [u8; 4], u8>,
    fake_v6: LpmTrie<MapData, [u8; 16], u8>,
    nat: Option<NatMaps>,
    settings: Array<MapData, Settings>,
    heartbeat: Array<MapData, u64>,
    proto: Array<MapData, RuleSet>,
    dst_v4: LpmTrie<MapData, [u8; 4], RuleSet>,
    dst_v6: LpmTrie<MapData, [u8; 16], RuleSet>,
    dport: LpmTrie<MapData, PortBytes, RuleSet>,
    sport: LpmTrie<MapData, PortBytes, RuleSet>,
    portless: Array<MapData, RuleSet>,
    actions: Array<MapData, RuleAction>,
    counters: PerCpuHashMap<MapData, u32, Counters>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    stats: PerCpuArray<MapData, u64>,
    /// What the rule maps hold now, so updates write only the difference.
    image: Option<MapImage>,
    cpus: usize,
}

macro_rules! take {
    ($ebpf:expr, $name:expr, $ty:ty) => {{
        let map = $ebpf.take_map($name).ok_or(DatapathError::Missing($name))?;
        <$ty>::try_from(map).map_err(map_error($name))?
    }};
}

impl Datapath {
    /// Loads the programs and writes the settings. Nothing is attached yet.
    pub fn load(object: &[u8], settings: Settings) -> Result<Datapath, DatapathError> {
        let mut ebpf = Ebpf::load(object).map_err(DatapathError::Load)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(EGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(EGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)?;
        program.load().map_err(DatapathError::Program)?;
        let ingress: &mut SchedClassifier = ebpf
            .program_mut(INGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(INGRESS_PROGRAM))?
            .try_into()
            .map_err(|source| DatapathError::Named {
                program: INGRESS_PROGRAM,
                source,
            })?;
        ingress.load().map_err(|source| DatapathError::Named {
            program: INGRESS_PROGRAM,
            source,
        })?;
        let nat = NatMaps {
            out: take!(ebpf, maps::NAT_OUT.name, HashMap<MapData, FlowKey, NatEntry>),
            inbound: take!(ebpf, maps::NAT_IN.name, HashMap<MapData, FlowKey, NatEntry>),
        };
        let mut datapath = Datapath {
            fake_v4: take!(ebpf, maps::FAKE_V4.name, LpmTrie<MapData, [u8; 4], u8>),
            fake_v6: take!(ebpf, maps::FAKE_V6.name, LpmTrie<MapData, [u8; 16], u8>),
            nat: Some(nat),
            settings: take!(ebpf, maps::SETTINGS.name, Array<MapData, Settings>),
            heartbeat: take!(ebpf, maps::HEARTBEAT.name, Array<MapData, u64>),
            proto: take!(ebpf, maps::PROTO.name, Array<MapData, RuleSet>),
            dst_v4: take!(ebpf, maps::DST_V4.name, LpmTrie<MapData, [u8; 4], RuleSet>),
            dst_v6: take!(ebpf, maps::DST_V6.name, LpmTrie<MapData, [u8; 16], RuleSet>),
            dport: take!(ebpf, maps::DPORT.name, LpmTrie<MapData, PortBytes, RuleSet>),
            sport: take!(ebpf, maps::SPORT.name, LpmTrie<MapData, PortBytes, RuleSet>),
            portless: take!(ebpf, maps::PORTLESS.name, Array<MapData, RuleSet>),
            actions: take!(ebpf, maps::ACTIONS.name, Array<MapData, RuleAction>),
            counters: take!(ebpf, maps::COUNTERS.name, PerCpuHashMap<MapData, u32, Counters>),
            flows: take!(ebpf, maps::FLOWS.name, HashMap<MapData, FlowKey, FlowEntry>),
            stats: take!(ebpf, maps::STATS.name, PerCpuArray<MapData, u64>),
            ebpf,
            links: Vec::new(),
            image: None,
            cpus: aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
                map: maps::COUNTERS.name,
                source: MapError::IoError(e),
            })?,
        };
        datapath
            .settings
            .set(0, settings, 0)
            .map_err(map_error(maps::SETTINGS.name))?;
        datapath.beat()?;
        Ok(datapath)
    }

    /// The program, for tests that run it on synthetic packets.
    pub fn program(&self) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(EGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(EGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)
    }

    /// The uplinks' ingress program, for tests that run it on synthetic packets.
    pub fn ingress_program(&self) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(INGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(INGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)
    }

    /// Attaches at TC egress (TCX on kernels >= 6.6, else a clsact filter).
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        let attach_error = |source| DatapathError::Attach {
            iface: iface.to_string(),
            source,
        };
        let ifindex = ifindex(iface).ok_or_else(|| {
            attach_error(ProgramError::IOError(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no interface named {iface}"),
            )))
        })?;
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(EGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(EGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)?;
        let tcx =
            aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Older kernels attach through a clsact qdisc (it may exist
            // already). Unlike a TCX link, such a filter outlives a crashed
            // daemon: remove any left by an earlier run before adding ours.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            if aya::programs::tc::qdisc_detach_program(iface, TcAttachType::Egress, EGRESS_PROGRAM).is_ok() {
                tracing::info!(%iface, "removed a classifier filter left by an earlier run");
            }
        }
        let link = program
            .attach(iface, TcAttachType::Egress)
            .map_err(attach_error)?;
        let ingress: &mut SchedClassifier = self
            .ebpf
            .program_mut(INGRESS_PROGRAM)
            .ok_or(DatapathError::Missing(INGRESS_PROGRAM))?
            .try_into()
            .map_err(DatapathError::Program)?;
        if !tcx {
            let _ = aya::programs::tc::qdisc_detach_program(iface, TcAttachType::Ingress, INGRESS_PROGRAM);
        }
        let ingress_link = match ingress.attach(iface, TcAttachType::Ingress) {
            Ok(link) => link,
            Err(source) => {
                if let Some(program) = self.ebpf.program_mut(EGRESS_PROGRAM)
                    && let Ok(program) = <&mut SchedClassifier>::try_from(program)
                {
                    let _ = program.detach(link);
                }
                return Err(attach_error(source));
            }
        };
        let mode = if tcx {
            "tcx egress+ingress"
        } else {
            "tc egress+ingress (clsact)"
        };
        self.links
            .push((iface.to_string(), ifindex, mode, link, ingress_link));
        Ok(())
    }

    /// Makes packets to these prefixes the broker's (the fake pools).
    pub fn set_fake_pools(&mut self, v4: Ipv4Net, v6: Ipv6Net) -> Result<(), DatapathError> {
        self.fake_v4
            .insert(&Key::new(u32::from(v4.prefix_len()), v4.network().octets()), 1, 0)
            .map_err(map_error(maps::FAKE_V4.name))?;
        self.fake_v6
            .insert(&Key::new(u32::from(v6.prefix_len()), v6.network().octets()), 1, 0)
            .map_err(map_error(maps::FAKE_V6.name))
    }

    /// The NAT maps, for the packet threads (once).
    pub fn take_nat_maps(&mut self) -> Option<NatMaps> {
        self.nat.take()
    }

    /// Loads the DNS redirect and attaches it to `cgroup`.
    pub fn redirect_dns(
        &mut self,
        cgroup: &Path,
        settings: DnsSettings,
    ) -> Result<DnsRedirect, DatapathError> {
        DnsRedirect::attach(&mut self.ebpf, cgroup, settings)
    }

    /// Detaches from every uplink; dropping the datapath does the same.
    pub fn detach_all(&mut self) {
        let Some(program) = self.ebpf.program_mut(EGRESS_PROGRAM) else {
            return;
        };
        let Ok(program): Result<&mut SchedClassifier, _> = program.try_into() else {
            return;
        };
        let mut ingress_links = Vec::new();
        for (iface, _, _, link, ingress) in self.links.drain(..) {
            if let Err(e) = program.detach(link) {
                tracing::warn!(%iface, "detaching the classifier failed: {e}");
            }
            ingress_links.push((iface, ingress));
        }
        if let Some(program) = self.ebpf.program_mut(INGRESS_PROGRAM)
            && let Ok(program) = <&mut SchedClassifier>::try_from(program)
        {
            for (iface, link) in ingress_links {
                if let Err(e) = program.detach(link) {
                    tracing::warn!(%iface, "detaching the ingress program failed: {e}");
                }
            }
        }
    }

    /// Each uplink's name, ifindex and attach mode.
    pub fn attached(&self) -> impl Iterator<Item = (&str, u32, &'static str)> {
        self.links
            .iter()
            .map(|(name, index, mode, _, _)| (name.as_str(), *index, *mode))
    }

    /// Tells the classifier the broker is alive.
    pub fn beat(&mut self) -> Result<(), DatapathError> {
        self.heartbeat
            .set(0, monotonic_ns(), 0)
            .map_err(map_error(maps::HEARTBEAT.name))
    }

    /// Writes a heartbeat time directly (tests use it to age the broker).
    pub fn set_heartbeat(&mut self, ns: u64) -> Result<(), DatapathError> {
        self.heartbeat.set(0, ns, 0).map_err(map_error(maps::HEARTBEAT.name))
    }

    pub fn heartbeat_age(&self) -> Duration {
        let last = self.heartbeat.get(&0, 0).unwrap_or(0);
        Duration::from_nanos(monotonic_ns().saturating_sub(last))
    }

    /// Brings the rule maps to `image`, writing new entries before removing
    /// stale ones. Per-rule counters are created for new rules and dropped
    /// for deleted ones; the flow cache is left alone, so live flows keep
    /// their verdict (a new TCP connection is always matched afresh).
    pub fn apply(&mut self, image: &MapImage) -> Result<(), DatapathError> {
        let old = self.image.take();
        let old_ids: Vec<u32> = old
            .iter()
            .flat_map(|i| i.actions.iter().map(|a| a.rule_id))
            .collect();
        let new_ids: Vec<u32> = image.actions.iter().map(|a| a.rule_id).collect();
        for id in new_ids.iter().filter(|id| !old_ids.contains(id)) {
            let zero = PerCpuValues::try_from(vec![Counters::default(); self.cpus]).map_err(|e| {
                DatapathError::Map {
                    map: maps::COUNTERS.name,
                    source: MapError::IoError(e),
                }
            })?;
            self.counters
                .insert(id, zero, 0)
                .map_err(map_error(maps::COUNTERS.name))?;
        }
        for rank in 0..MAX_RULES {
            let action = image.actions.get(rank).copied().unwrap_or_default();
            let before = old
                .as_ref()
                .and_then(|i| i.actions.get(rank).copied())
                .unwrap_or_default();
            if old.is_none() || action != before {
                self.actions
                    .set(rank as u32, action, 0)
                    .map_err(map_error(maps::ACTIONS.name))?;
            }
        }
        for (number, set) in image.proto.iter().enumerate() {
            if old.as_ref().is_none_or(|i| i.proto[number] != *set) {
                self.proto
                    .set(number as u32, *set, 0)
                    .map_err(map_error(maps::PROTO.name))?;
            }
        }
        self.portless
            .set(0, image.portless, 0)
            .map_err(map_error(maps::PORTLESS.name))?;
        let empty = MapImage::default();
        let old_ref = old.as_ref().unwrap_or(&empty);
        sync_trie(&mut self.dst_v4, &old_ref.dst_v4, &image.dst_v4).map_err(map_error(maps::DST_V4.name))?;
        sync_trie(&mut self.dst_v6, &old_ref.dst_v6, &image.dst_v6).map_err(map_error(maps::DST_V6.name))?;
        sync_trie(&mut self.dport, &old_ref.dport, &image.dport).map_err(map_error(maps::DPORT.name))?;
        sync_trie(&mut self.sport, &old_ref.sport, &image.sport).map_err(map_error(maps::SPORT.name))?;
        for id in old_ids.iter().filter(|id| !new_ids.contains(id)) {
            let _ = self.counters.remove(id);
        }
        self.image = Some(image.clone());
        Ok(())
    }

    /// A rule's packets and bytes, summed over CPUs.
    pub fn rule_counters(&self, rule_id: u32) -> Counters {
        self.counters
            .get(&rule_id, 0)
            .map(|values| {
                values.iter().fold(Counters::default(), |sum, c| Counters {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                })
            })
            .unwrap_or_default()
    }

    pub fn classifier_counters(&self) -> ClassifierCounters {
        let sum = |index: u32| -> u64 { self.stats.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        ClassifierCounters {
            bypassed: sum(stat::BYPASSED),
            fail_open: sum(stat::FAIL_OPEN),
            cache_hits: sum(stat::CACHE_HIT),
            classified: sum(stat::CLASSIFIED),
            diverted: sum(stat::DIVERTED),
            unparsed: sum(stat::UNPARSED),
            fake_diverted: sum(stat::FAKE_DIVERTED),
            nat_egress: sum(stat::NAT_EGRESS),
            nat_ingress: sum(stat::NAT_INGRESS),
            cached_flows: self.flows.keys().filter(Result::is_ok).count() as u64,
        }
    }

    /// The cached verdict for one flow, if the classifier has one.
    pub fn cached_flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn sync_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], RuleSet>,
    old: &BTreeMap<Prefix<N>, RuleSet>,
    new: &BTreeMap<Prefix<N>, RuleSet>,
) -> Result<(), MapError> {
    for (&(len, bytes), set) in new {
        if old.get(&(len, bytes)) != Some(set) {
            trie.insert(&Key::new(len, bytes), set, 0)?;
        }
    }
    for &(len, bytes) in old.keys().filter(|k| !new.contains_key(k)) {
        trie.remove(&Key::new(len, bytes))?;
    }
    Ok(())
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

pub fn ifindex(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
