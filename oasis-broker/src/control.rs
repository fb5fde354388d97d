//! The control protocol between the CLI and the daemon: one JSON request
//! per line over a Unix socket, one JSON response line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rules::RuleSpec;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    AddRule {
        spec: RuleSpec,
    },
    DelRule {
        id: u32,
    },
    /// Adds all these rules in one step, or none.
    ImportRules {
        specs: Vec<RuleSpec>,
    },
    ListRules,
    Status,
    /// The fake-address table.
    Dns,
    /// Fetch a specification from `url`, check it and join under `name`.
    OverlayAdd {
        name: String,
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    OverlayList,
    OverlayShow {
        name: String,
    },
    OverlayDel {
        name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Rule { rule: RuleView },
    Rules { rules: Vec<RuleView> },
    Status { status: Box<StatusView> },
    Overlay { overlay: Box<OverlayView> },
    Overlays { overlays: Vec<OverlayView> },
    Dns { dns: Box<DnsTableView> },
    Error { message: String },
}

/// A rule as `oasis rule list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    pub id: u32,
    /// The subset in words, e.g. `tcp dst 203.0.113.0/24 dport 8080`.
    pub subset: String,
    pub via: String,
    pub packets: u64,
    pub bytes: u64,
    /// Name rules: DNS answers given with a fake address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<u64>,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// None when DNS interception is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatusView>,
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
    pub counters: crate::dns::DnsCountersView,
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
}

/// What the broker did with diverted packets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    pub flows: u64,
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
    #[error("talking to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the daemon sent a reply this CLI does not understand: {0}")]
    BadReply(String),
}

/// How long the CLI waits for an answer: joining an overlay fetches its
/// specification (up to 10 s) first.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
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
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(&reply).map_err(|_| ClientError::BadReply(reply.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line() {
        let request = Request::DelRule { id: 3 };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"op":"del_rule","id":3}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
    }

    #[test]
    fn missing_socket_says_daemon_not_running() {
        let err = call(Path::new("/nonexistent/oasis.sock"), &Request::Status).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning(_)));
        assert!(err.to_string().contains("oasis run"));
    }
}
