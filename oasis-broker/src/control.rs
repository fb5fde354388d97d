//! The control protocol between the CLI and the daemon: one JSON request
//! per line over a local socket; back come progress lines while a long
//! request runs (at least every few seconds), then one response line.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rule_spec::RuleSpec;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    AddRule {
        spec: Box<RuleSpec>,
        /// A `--dst-set` rule's prefixes, as the user's file holds them:
        /// the daemon keeps its own copy beside the config file.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dst_set: Option<SetUpload>,
    },
    DelRule {
        id: u32,
    },
    /// Adds all these rules in one step, or none.
    ImportRules {
        specs: Vec<RuleSpec>,
    },
    ListRules,
    /// Fetches list rules' lists now: one, or every one.
    RefreshLists {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
    },
    Status,
    /// The fake-address table.
    Dns,
    /// Fetch a specification from `url`, check it and join under `name`.
    OverlayAdd {
        name: String,
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// A module author's build, run instead of the module the
        /// specification names.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        module_file: Option<ModuleUpload>,
        /// Flows never fall back to the underlay, even while the
        /// overlay's code module restarts.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pinned: bool,
        /// A WireGuard overlay: its wg-quick file (`url` is then unused).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wireguard: Option<WireGuardUpload>,
    },
    OverlayList,
    OverlayShow {
        name: String,
    },
    OverlayDel {
        name: String,
    },
    /// What the Monitor measured and decided.
    Monitor,
    /// Pins metric rule `rule`'s new flows to `carrier` (an overlay's name
    /// or `underlay`) while it is up; None: the Monitor decides again.
    Pin {
        rule: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        carrier: Option<String>,
    },
    /// Forgets every fake address, unless live flows hold some.
    FlushFakes,
    /// Where the REST API and the web page are, and their secret.
    Api,
    /// Ends live flows: their sockets are closed (the application hears
    /// ECONNABORTED, a TCP peer a reset). By id (`FlowView::id`); none:
    /// every flow.
    EndFlows {
        #[serde(default)]
        ids: Option<Vec<String>>,
    },
    /// The live flows of the packet threads: asked of them now, or a
    /// listing at most `max_age_ms` old (the API's readers share one).
    Flows {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_age_ms: Option<u64>,
    },
    /// Injects a fault, for the tests: refused unless the daemon was
    /// started with `OASIS_FAULTS=1` in its environment.
    Fault {
        name: String,
    },
}

/// A module file, sent whole (the daemon may not see the author's files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleUpload {
    pub name: String,
    /// The bytes, in hex.
    pub hex: String,
}

/// A wg-quick file, sent whole over the control socket (root's alone):
/// the daemon keeps it in its key store. It holds a private key, so its
/// `Debug` shows the name alone.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WireGuardUpload {
    pub name: String,
    pub text: String,
}

impl std::fmt::Debug for WireGuardUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WireGuardUpload({:?}, {} bytes)", self.name, self.text.len())
    }
}

/// A prefix set's file, sent whole: the daemon may not see the user's
/// files (another mount namespace, a private /tmp).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetUpload {
    /// The file's name, which the daemon's copy is named after.
    pub name: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Rule {
        rule: RuleView,
    },
    Rules {
        rules: Vec<RuleView>,
    },
    /// An import's outcome: how many rules, the first and last new id.
    Imported {
        count: usize,
        first: Option<u32>,
        last: Option<u32>,
    },
    Status {
        status: Box<StatusView>,
    },
    Overlay {
        overlay: Box<OverlayView>,
    },
    Overlays {
        overlays: Vec<OverlayView>,
    },
    Dns {
        dns: Box<DnsTableView>,
    },
    Monitor {
        monitor: Box<MonitorView>,
    },
    Flows {
        flows: Vec<FlowView>,
    },
    /// The REST API: where the page is, and the secret it asks for.
    Api {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// Done, and nothing to show.
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    /// Not the answer yet: the request is still being worked on.
    Progress {
        progress: Progress,
    },
}

/// What `oasis monitor` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorView {
    /// Metric rules the built-in Monitor decides for.
    pub rules: usize,
    pub probes_per_second_limit: u32,
    pub probe_bytes_per_second_limit: u32,
    /// Probes sent since the start, and their bytes.
    pub probes_sent: u64,
    pub probe_bytes_sent: u64,
    /// Probe bytes per second, all carriers, over the last 10 s.
    pub probe_bytes_per_second: f64,
    /// Measurements the packet threads could not queue.
    pub events_dropped: u64,
    pub carriers: Vec<CarrierView>,
    pub paths: Vec<PathView>,
    pub decisions: Vec<DecisionView>,
    pub switches: Vec<SwitchView>,
    /// Metric rules the user pinned to a carrier: (rule, carrier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<(u32, String)>,
}

/// A carrier's health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CarrierView {
    pub name: String,
    pub up: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_reason: Option<String>,
    pub downs: u64,
    /// Since anything last came back through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_answer_secs: Option<f64>,
    pub probe_bytes_per_second: f64,
}

/// One carrier's figures towards one destination prefix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathView {
    pub carrier: String,
    pub prefix: String,
    pub srtt_ms: Option<f64>,
    pub rttvar_ms: Option<f64>,
    pub min_rtt_ms: Option<f64>,
    pub rtt_samples: u64,
    pub loss_percent: Option<f64>,
    pub loss_samples: u64,
    pub goodput_mbps: Option<f64>,
    /// Since the path last learnt anything.
    pub age_secs: Option<f64>,
    pub probe_bytes: u64,
}

/// A metric rule's decision for one prefix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionView {
    pub rule: u32,
    pub prefix: String,
    pub metric: String,
    pub carrier: String,
    pub why: String,
    /// How the candidates compare now, in the metric's figures.
    pub comparison: String,
    pub since_secs: f64,
    pub hold_secs: f64,
    pub flips: u32,
    /// A carrier found better, waiting for confirmation or the hold time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenger: Option<String>,
}

/// A recent switch of a decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SwitchView {
    pub ago_secs: f64,
    pub rule: u32,
    pub prefix: String,
    pub from: String,
    pub to: String,
    pub why: String,
}

/// A live flow, as `oasis flows` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    /// Names the flow while it lives (`oasis flows --end ID`, the API).
    #[serde(default)]
    pub id: String,
    /// `tcp 10.0.0.2:40000 -> 203.0.113.9:443`
    pub flow: String,
    /// The same, in parts: the protocol's number, the source and the
    /// (real) destination; ports are 0 for protocols without them.
    #[serde(default)]
    pub proto: u8,
    #[serde(default = "unspecified")]
    pub src: std::net::SocketAddr,
    #[serde(default = "unspecified")]
    pub dst: std::net::SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    pub carrier: String,
    /// For a metric rule's flow: why the Monitor chose the carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The fake address the application talks to, for a name rule's flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fake: Option<String>,
    /// Carried by the kernel after its first packets.
    pub in_kernel: bool,
    pub age_secs: f64,
    pub idle_secs: f64,
    /// Packets the broker saw of it.
    pub packets: u64,
    /// Who sent it, as far as the OS tells (this host's own flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<SenderView>,
}

fn unspecified() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([0, 0, 0, 0], 0))
}

impl Default for FlowView {
    fn default() -> FlowView {
        FlowView {
            id: String::new(),
            flow: String::new(),
            proto: 0,
            src: unspecified(),
            dst: unspecified(),
            rule: None,
            carrier: String::new(),
            why: None,
            fake: None,
            in_kernel: false,
            age_secs: 0.0,
            idle_secs: 0.0,
            packets: 0,
            sender: None,
        }
    }
}

/// The process behind a flow: its socket's owner, cgroup and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderView {
    pub uid: u32,
    /// Its cgroup v2 path, `/system.slice/backup.service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The process name the socket hooks recorded (while a rule by
    /// application is there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// The DNS service's query counters, for `oasis status` and `oasis rule
/// list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCountersView {
    pub queries: u64,
    /// Answered with a fake address.
    pub faked: u64,
    /// Answered with the upstream's records.
    pub passed: u64,
    /// Claimed names asked for types that would leak the real address.
    pub empty: u64,
    /// NXDOMAIN or no data, as the upstream said.
    pub negative: u64,
    /// Upstream failed or timed out.
    pub servfail: u64,
    /// Too big for the client's UDP size: sent with TC so it retries on TCP.
    pub truncated: u64,
    /// Not a standard query (opcode, several questions).
    pub refused: u64,
    /// No fake address free: every one is held by a live flow.
    pub exhausted: u64,
    /// Names of metric rules answered truly: the Monitor gives their
    /// flows the underlay (of those counted as passed).
    #[serde(default)]
    pub monitor_real: u64,
    /// Queries sent to a server other than the host's own, answered by
    /// that server (or faked, for claimed names).
    #[serde(default)]
    pub explicit: u64,
    /// Queries that came back from our own upstream (a loop through a
    /// local stub), answered SERVFAIL to break it.
    #[serde(default)]
    pub loops: u64,
    /// Answered from the bytes a DNS thread kept of the same question's
    /// answer (counted under their kind as well).
    #[serde(default)]
    pub reused: u64,
}

/// How far a long request has come.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// What the daemon is doing, e.g. `checking rules`.
    pub stage: String,
    pub done: u64,
    /// 0 when not known.
    pub total: u64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.total {
            0 => f.write_str(&self.stage),
            total => write!(f, "{}: {} of {}", self.stage, self.done, total),
        }
    }
}

/// A rule as `oasis rule list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub id: u32,
    /// The subset in words, e.g. `tcp dst 203.0.113.0/24 dport 8080`.
    pub subset: String,
    pub via: String,
    /// Claims names (DNS answers), not packet headers.
    #[serde(default)]
    pub name_rule: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Name rules: DNS answers given with a fake address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<u64>,
    /// List rules: where the list comes from and how current it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<Box<ListView>>,
    /// A metric rule's carriers the Monitor may choose now, the underlay
    /// first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<String>>,
}

/// A list rule's list, as `oasis rule list` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListView {
    pub url: String,
    pub kind: String,
    pub every: String,
    /// The last good copy, beside the config file.
    pub file: String,
    /// Entries (prefixes or names) in effect.
    pub entries: usize,
    /// Since the copy in effect was downloaded or confirmed current;
    /// none: never fetched (the rule claims nothing yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_secs_ago: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_secs_ago: Option<u64>,
    /// Why the last refresh failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the last new copy took from downloaded to in effect
    /// (checked, compiled, in the kernel's maps), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_ms: Option<u64>,
}

/// A joined overlay as `oasis overlay list|show` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayView {
    pub name: String,
    pub url: String,
    /// The name the operator's specification gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub entries: Vec<String>,
    /// The entry nodes' addresses, once resolved.
    pub resolved: Vec<String>,
    pub shim_len: usize,
    pub token: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<crate::overlay::ModuleSpec>,
    /// Rules carried by this overlay.
    pub rules: Vec<u32>,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Flows it carries now.
    #[serde(default)]
    pub live_flows: u64,
    /// The smallest path MTU toward its entry nodes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
    /// Flows never fall back to the underlay.
    #[serde(default)]
    pub pinned: bool,
    /// Its code module, when one runs: state, restarts, traffic, refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_status: Option<crate::module::runner::ModuleStatus>,
    /// A WireGuard overlay's keys (public only) and peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireGuardView>,
}

/// A WireGuard overlay: never a private or pre-shared key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardView {
    /// This host's public key, for the peer's operator to register.
    pub public_key: String,
    /// This host's addresses inside the tunnel.
    pub tunnel_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// The key store file holding the private key.
    pub key_file: String,
    pub peers: Vec<WireGuardPeerView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardPeerView {
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    /// Whether new flows may take it.
    pub up: bool,
    /// Its state in words, with why when it is down.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_secs: Option<u64>,
    pub handshakes: u64,
    /// Bytes of packets sent and received through the tunnel.
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Datagrams from it that failed to authenticate (forged, replayed).
    pub rejected: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub pid: u32,
    pub uptime_secs: u64,
    pub config_path: PathBuf,
    pub uplinks: Vec<UplinkView>,
    pub tun: TunView,
    pub program: ProgramView,
    pub heartbeat: HeartbeatView,
    pub classifier: ClassifierCounters,
    pub broker: BrokerCounters,
    pub rules: usize,
    pub overlays: usize,
    pub overlay_port: u16,
    pub underlay_port: u16,
    /// Whether the fast path is on (`overlay_fast_path`), and the overlay
    /// flows the kernel wraps now.
    #[serde(default)]
    pub fast_path: bool,
    #[serde(default)]
    pub fast_path_flows: usize,
    /// Each kernel program's own cost (kernel.bpf_stats_enabled on).
    #[serde(default)]
    pub programs: Vec<ProgramStatsView>,
    /// Whether the config file holds the daemon's current rules and overlays.
    #[serde(default)]
    pub config_saved: bool,
    /// Why the last write of the config file failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// None when DNS interception is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatusView>,
    /// None while no metric rule exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<MonitorStatusView>,
    /// Each list rule's list, by rule id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lists: Vec<(u32, ListView)>,
}

/// The Monitor in `oasis status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorStatusView {
    pub rules: usize,
    pub decisions: usize,
    pub probes_per_second_limit: u32,
    pub probe_bytes_per_second_limit: u32,
    pub probe_bytes_per_second: f64,
    pub probes_sent: u64,
    pub carriers_up: Vec<String>,
    pub carriers_down: Vec<String>,
    /// Flows the kernel measures now.
    pub measured_in_kernel: usize,
    /// The latest switches, newest first.
    pub switches: Vec<SwitchView>,
}

impl MonitorView {
    /// The summary `oasis status` shows.
    pub fn summary(&self, measured_in_kernel: usize) -> MonitorStatusView {
        let names = |up: bool| {
            self.carriers
                .iter()
                .filter(|c| c.up == up)
                .map(|c| c.name.clone())
                .collect()
        };
        MonitorStatusView {
            rules: self.rules,
            decisions: self.decisions.len(),
            probes_per_second_limit: self.probes_per_second_limit,
            probe_bytes_per_second_limit: self.probe_bytes_per_second_limit,
            probe_bytes_per_second: self.probe_bytes_per_second,
            probes_sent: self.probes_sent,
            carriers_up: names(true),
            carriers_down: names(false),
            measured_in_kernel,
            switches: self.switches.iter().take(3).cloned().collect(),
        }
    }
}

/// The DNS service in `oasis status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatusView {
    /// Where redirected queries arrive, e.g. `127.0.0.1:7453`.
    pub listen: Vec<String>,
    /// The cgroup whose processes' queries are redirected.
    pub cgroup: PathBuf,
    pub upstreams: Vec<String>,
    pub fake_v4: String,
    pub fake_v6: String,
    pub fake_entries: usize,
    pub fake_capacity: usize,
    /// Flows to fake addresses the broker knows, and of them rewritten in the kernel.
    pub fake_flows: usize,
    pub kernel_nat_flows: usize,
    /// Packets to fake addresses nobody was given: answered with ICMP unreachable.
    pub unknown_fake_packets: u64,
    pub counters: DnsCountersView,
}

/// One fake address, as `oasis dns` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeView {
    pub name: String,
    pub fake: String,
    pub real: Vec<String>,
    /// The carrier new flows to it take now (rules may have changed since
    /// the answer was given).
    pub carrier: String,
    /// Seconds since it was last handed out or used.
    pub idle_secs: u64,
    pub live_flows: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsTableView {
    pub enabled: bool,
    pub entries: Vec<FakeView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkView {
    pub name: String,
    pub ifindex: u32,
    /// How the classifier is attached, e.g. `tcx egress`.
    pub attach: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunView {
    pub name: String,
    pub ifindex: u32,
    pub queues: usize,
    /// Packets the kernel handed to the broker through the TUN.
    pub diverted_packets: u64,
    pub diverted_bytes: u64,
    /// Packets the broker read from each queue of the TUN (the kernel
    /// spreads flows over them by a hash of their addresses and ports).
    #[serde(default)]
    pub read_per_queue: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramView {
    pub name: String,
    pub maps: Vec<MapView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapView {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatView {
    pub age_ms: u64,
    pub timeout_ms: u64,
    /// False when the classifier is passing everything (fail open).
    pub alive: bool,
    /// The heartbeat map's kernel id, for reading it from outside
    /// (`bpftool map lookup id ID key 0 0 0 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_id: Option<u32>,
}

/// One kernel program and what it costs, as the kernel counts it. The
/// counts grow only while `kernel.bpf_stats_enabled` is 1.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatsView {
    pub name: String,
    /// Where it runs, e.g. `tc egress`, `connect4`.
    pub hook: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The classifier's own counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierCounters {
    pub bypassed: u64,
    pub fail_open: u64,
    pub cache_hits: u64,
    pub classified: u64,
    pub diverted: u64,
    pub unparsed: u64,
    pub cached_flows: u64,
    /// Packets to fake addresses sent to the broker (first packets of flows).
    #[serde(default)]
    pub fake_diverted: u64,
    /// Packets of fake-address flows rewritten in the kernel, out and in.
    #[serde(default)]
    pub nat_egress: u64,
    #[serde(default)]
    pub nat_ingress: u64,
    /// Packets of flows measured in the kernel for the Monitor, each way.
    #[serde(default)]
    pub measured_egress: u64,
    #[serde(default)]
    pub measured_ingress: u64,
    /// Measurements lost because the ring buffer to the broker was full.
    #[serde(default)]
    pub events_lost: u64,
    /// The overlay fast path: packets (and their bytes) the kernel wrapped
    /// for entry nodes, and opened from them.
    #[serde(default)]
    pub encap_packets: u64,
    #[serde(default)]
    pub encap_bytes: u64,
    #[serde(default)]
    pub decap_packets: u64,
    #[serde(default)]
    pub decap_bytes: u64,
    /// Packets of fast-path flows the kernel left to the broker, by why:
    /// too big for the path once wrapped, no room to wrap or open them,
    /// received aggregates.
    #[serde(default)]
    pub fast_too_big: u64,
    #[serde(default)]
    pub fast_no_room: u64,
    #[serde(default)]
    pub fast_aggregate: u64,
}

/// What the broker did with diverted packets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerCounters {
    /// Diverted packets read from the TUN.
    pub received: u64,
    pub sent_underlay: u64,
    /// Datagrams sent to overlay entry nodes.
    pub sent_overlay: u64,
    pub send_errors: u64,
    pub malformed: u64,
    /// Packets to link-local or multicast destinations, dropped.
    pub unroutable: u64,
    /// Packets of flows whose overlay was left, dropped.
    pub no_carrier: u64,
    /// Packets to fake addresses that cannot be rewritten (no ports, a
    /// fragment), dropped.
    #[serde(default)]
    pub untranslatable: u64,
    /// Later fragments of a datagram whose first was not seen, dropped.
    #[serde(default)]
    pub orphan_fragments: u64,
    /// Packets that would not fit their overlay's path and may not be
    /// fragmented: answered with ICMP fragmentation needed / too big.
    #[serde(default)]
    pub too_big: u64,
    /// Packets returned from a fake address's real one for no socket of
    /// this host (a flow that ended while the daemon was down), dropped.
    #[serde(default)]
    pub returned_for_no_flow: u64,
    /// WireGuard datagrams that failed to authenticate (forged, replayed),
    /// and packets in them from outside their peer's AllowedIPs.
    #[serde(default)]
    pub unauthenticated: u64,
    /// Live flows of fake addresses the return path took up again after
    /// a restart of the daemon.
    #[serde(default)]
    pub flows_adopted: u64,
    /// Flows the broker tracks now.
    pub flows: u64,
    /// Flows started since the daemon started.
    #[serde(default)]
    pub flows_started: u64,
    /// Flows forgotten early because a packet thread's table was full.
    #[serde(default)]
    pub flows_evicted: u64,
    /// Metric rules' flows moved to another carrier because their
    /// handshake went unanswered.
    #[serde(default)]
    pub rescued: u64,
    /// Decisions on metric rules' new flows, and how long they took.
    #[serde(default)]
    pub monitor_decisions: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_p99_us: Option<f64>,
    /// Packets overlays returned and the broker delivered to this host.
    pub overlay_received: u64,
    /// Datagrams on the standard port from senders that are no joined
    /// overlay's entry node, dropped.
    pub rejected_sender: u64,
    /// Returned packets not addressed to this host, dropped.
    pub rejected_destination: u64,
    /// Datagrams on the underlay port from no module of this broker, dropped.
    pub rejected_module_sender: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the Oasis daemon is not running (no control socket at {0}); start it with `oasis run` or `cargo xtask run`"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: only root may control Oasis (try sudo)")]
    PermissionDenied(PathBuf),
    #[error(
        "no answer from the daemon at {path} in {} s: it may be busy or hung (its log says which; \
         `oasis status` tells whether it still answers)", timeout.as_secs()
    )]
    NoAnswer { path: PathBuf, timeout: Duration },
    #[error("the daemon at {0} closed the connection without answering (did it stop?)")]
    Closed(PathBuf),
    #[error("talking to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the daemon sent a reply this CLI does not understand: {0}")]
    BadReply(String),
}

/// How long the CLI waits for the daemon's next line. A long request sends
/// progress lines (at least every few seconds), so this bounds a silence,
/// not the request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request and waits for its response, handing each progress
/// line to `progress` on the way.
#[cfg(unix)]
pub fn call(
    socket: &std::path::Path,
    request: &Request,
    mut progress: impl FnMut(&Progress),
) -> Result<Response, ClientError> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let io = |source| ClientError::Io {
        path: socket.into(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.into())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.into()),
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut reply = String::new();
        match reader.read_line(&mut reply) {
            Ok(0) => return Err(ClientError::Closed(socket.into())),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::NoAnswer {
                    path: socket.into(),
                    timeout: REPLY_TIMEOUT,
                });
            }
            Err(e) => return Err(io(e)),
        }
        match serde_json::from_str(&reply) {
            Ok(Response::Progress { progress: p }) => progress(&p),
            Ok(response) => return Ok(response),
            Err(_) => return Err(ClientError::BadReply(reply.trim().to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;

    #[test]
    fn requests_are_one_json_line() {
        let request = Request::DelRule { id: 3 };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"op":"del_rule","id":3}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
    }

    #[cfg(unix)]
    #[test]
    fn missing_socket_says_daemon_not_running() {
        let err = call(Path::new("/nonexistent/oasis.sock"), &Request::Status, |_| {}).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning(_)));
        assert!(err.to_string().contains("oasis run"));
    }

    /// A daemon that sends progress, then its answer; and one that says
    /// nothing at all.
    #[cfg(unix)]
    #[test]
    fn progress_lines_come_before_the_answer() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("oasis-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            assert!(request.contains("list_rules"));
            let progress = Response::Progress {
                progress: Progress {
                    stage: "checking".into(),
                    done: 1,
                    total: 2,
                },
            };
            for line in [
                serde_json::to_string(&progress).unwrap(),
                serde_json::to_string(&Response::Rules { rules: vec![] }).unwrap(),
            ] {
                (&stream).write_all(format!("{line}\n").as_bytes()).unwrap();
            }
        });
        let mut seen = Vec::new();
        let response = call(&path, &Request::ListRules, |p| seen.push(p.to_string())).unwrap();
        assert_eq!(response, Response::Rules { rules: vec![] });
        assert_eq!(seen, vec!["checking: 1 of 2"]);
        server.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
