//! `oasis run`: the daemon. It owns the TUN, the classifier and its maps,
//! the packet threads and the control socket; on SIGINT/SIGTERM it detaches
//! everything it attached and removes what it created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use oasis_common::Settings;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::compile::compile;
use crate::config::{Config, ConfigError};
use crate::control::{
    HeartbeatView, MapView, ProgramView, Request, Response, RuleView, StatusView, TunView,
    UplinkView,
};
use crate::platform::linux::datapath::{Datapath, DatapathError};
use crate::platform::linux::forward::{ForwardStats, Forwarder, SharedRules};
use crate::platform::linux::tun::{Tun, diverted_counts, uplink_mtu};
use crate::platform::linux::underlay::Underlay;
use crate::platform::linux::uplink::default_route_interfaces;
use crate::rules::{Carrier, RuleError, RuleSet, RuleSpec};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("another Oasis daemon is already running (its control socket {0} answers)")]
    AlreadyRunning(PathBuf),
    #[error(
        "no uplink: no interface carries a default route; name the uplinks in the config file (uplinks: [eth0])"
    )]
    NoUplinks,
    #[error("creating TUN device {name}: {source} (the daemon must run as root)")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("opening the underlay raw sockets: {0} (the daemon must run as root)")]
    Underlay(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("packet thread {0} stopped: {1}")]
    PacketThread(usize, String),
}

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} (the rule was not added; nothing changed)")]
    Datapath(#[from] DatapathError),
}

struct State {
    config: Config,
    config_path: PathBuf,
    rules: RuleSet,
    shared_rules: SharedRules,
    datapath: Datapath,
    tun: TunView,
    stats: Arc<ForwardStats>,
    started: Instant,
}

impl State {
    fn rule_view(&self, rule: &crate::rules::Rule) -> RuleView {
        let counters = self.datapath.rule_counters(rule.id);
        RuleView {
            id: rule.id,
            subset: rule.subset.to_string(),
            via: rule.via.to_string(),
            packets: counters.packets,
            bytes: counters.bytes,
        }
    }

    fn add_rule(&mut self, spec: RuleSpec) -> Result<RuleView, RequestError> {
        let (subset, via) = spec.parse()?;
        if let Carrier::Overlay(name) = &via {
            return Err(RuleError::UnknownOverlay(name.clone()).into());
        }
        let mut next = self.rules.clone();
        let rule = next.add(subset, via)?;
        self.commit(next)?;
        tracing::info!(id = rule.id, subset = %rule.subset, via = %rule.via, "rule added");
        Ok(self.rule_view(&rule))
    }

    fn del_rule(&mut self, id: u32) -> Result<RuleView, RequestError> {
        let mut next = self.rules.clone();
        let rule = next.remove(id)?;
        let view = self.rule_view(&rule);
        self.commit(next)?;
        tracing::info!(id, subset = %rule.subset, "rule deleted");
        Ok(view)
    }

    /// Makes `next` the rule list: the file first, then the maps. When
    /// either fails, both are put back as they were.
    fn commit(&mut self, next: RuleSet) -> Result<(), RequestError> {
        let config = self.config.with_rules(&next);
        config.save(&self.config_path)?;
        if let Err(e) = self.datapath.apply(&compile(next.rules())) {
            let _ = self.config.save(&self.config_path);
            let _ = self.datapath.apply(&compile(self.rules.rules()));
            return Err(e.into());
        }
        self.config = config;
        self.rules = next;
        *self.shared_rules.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(self.rules.clone());
        Ok(())
    }

    fn status(&self) -> StatusView {
        let (diverted_packets, diverted_bytes) = diverted_counts(&self.tun.name);
        let age = self.datapath.heartbeat_age();
        let timeout = Duration::from_millis(self.config.heartbeat_timeout_ms);
        StatusView {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            config_path: self.config_path.clone(),
            uplinks: self
                .datapath
                .attached()
                .map(|(name, ifindex, mode)| UplinkView {
                    name: name.into(),
                    ifindex,
                    attach: mode.into(),
                })
                .collect(),
            tun: TunView {
                diverted_packets,
                diverted_bytes,
                ..self.tun.clone()
            },
            program: ProgramView {
                name: oasis_common::EGRESS_PROGRAM.into(),
                maps: map_views(),
            },
            heartbeat: HeartbeatView {
                age_ms: age.as_millis() as u64,
                timeout_ms: timeout.as_millis() as u64,
                alive: age < timeout,
            },
            classifier: self.datapath.classifier_counters(),
            broker: self.stats.snapshot(),
            rules: self.rules.rules().len(),
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::AddRule { spec } => self.add_rule(spec).map(|rule| Response::Rule { rule }),
            Request::DelRule { id } => self.del_rule(id).map(|rule| Response::Rule { rule }),
            Request::ListRules => Ok(Response::Rules {
                rules: self
                    .rules
                    .rules()
                    .iter()
                    .map(|r| self.rule_view(r))
                    .collect(),
            }),
            Request::Status => Ok(Response::Status {
                status: Box::new(self.status()),
            }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }
}

fn map_views() -> Vec<MapView> {
    use oasis_common::{FLOW_CACHE_ENTRIES, MAX_RULES, maps};
    let rules = MAX_RULES as u32;
    [
        (maps::PROTO, "array", 256),
        (maps::DST_V4, "lpm_trie", rules + 1),
        (maps::DST_V6, "lpm_trie", rules + 1),
        (maps::DPORT, "lpm_trie", rules * 32 + 1),
        (maps::SPORT, "lpm_trie", rules * 32 + 1),
        (maps::ACTIONS, "array", rules),
        (maps::COUNTERS, "percpu_hash", rules),
        (maps::FLOWS, "lru_hash", FLOW_CACHE_ENTRIES),
        (maps::HEARTBEAT, "array", 1),
    ]
    .into_iter()
    .map(|(name, kind, max_entries)| MapView {
        name: name.into(),
        kind: kind.into(),
        max_entries,
    })
    .collect()
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> Result<(), DaemonError> {
    let config = Config::load_or_default(config_path)?;
    let rules = config.rule_set(config_path)?;
    if !config_path.exists() {
        config.save(config_path)?;
        tracing::info!(path = %config_path.display(), "wrote a default config file");
    }
    let socket_path = config.control_socket.clone();
    claim_socket_path(&socket_path).await?;

    let uplinks = if config.uplinks.is_empty() {
        default_route_interfaces().unwrap_or_default()
    } else {
        config.uplinks.clone()
    };
    if uplinks.is_empty() {
        return Err(DaemonError::NoUplinks);
    }

    let tun = Tun::create(&config.tun.name, config.tun.queues, uplink_mtu(&uplinks)).map_err(
        |source| DaemonError::Tun {
            name: config.tun.name.clone(),
            source,
        },
    )?;
    let underlay = Arc::new(Underlay::open(config.bypass_mark).map_err(DaemonError::Underlay)?);
    let settings = Settings {
        heartbeat_timeout_ns: config.heartbeat_timeout_ms * 1_000_000,
        flow_idle_ns: config.flow_idle_timeout_secs * 1_000_000_000,
        tun_ifindex: tun.ifindex,
        bypass_mark: config.bypass_mark,
    };
    let mut datapath = Datapath::load(crate::EBPF_OBJECT, settings)?;
    datapath.apply(&compile(rules.rules()))?;
    for uplink in &uplinks {
        datapath.attach(uplink)?;
        tracing::info!(%uplink, "classifier attached at egress");
    }

    let stats = Arc::new(ForwardStats::default());
    let shared_rules: SharedRules = Arc::new(RwLock::new(Arc::new(rules.clone())));
    let tun_view = TunView {
        name: tun.name.clone(),
        ifindex: tun.ifindex,
        queues: tun.queues.len(),
        ..Default::default()
    };
    let mut threads = Vec::new();
    for (index, device) in tun.queues.into_iter().enumerate() {
        let forwarder = Forwarder {
            device,
            underlay: underlay.clone(),
            rules: shared_rules.clone(),
            stats: stats.clone(),
            flow_idle: Duration::from_secs(config.flow_idle_timeout_secs),
        };
        let handle = std::thread::Builder::new()
            .name(format!("oasis-queue-{index}"))
            .spawn(move || forwarder.run())
            .map_err(|e| DaemonError::PacketThread(index, e.to_string()))?;
        threads.push(handle);
    }

    let heartbeat_every = Duration::from_millis((config.heartbeat_timeout_ms / 4).clamp(100, 1000));
    let state = Arc::new(Mutex::new(State {
        config,
        config_path: config_path.to_path_buf(),
        rules,
        shared_rules,
        datapath,
        tun: tun_view,
        stats,
        started: Instant::now(),
    }));

    let listener = bind_control_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), "oasis daemon ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| DaemonError::Socket {
            path: socket_path.clone(),
            source,
        })?;
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move { serve(stream, state).await });
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            },
            _ = heartbeat.tick() => {
                // A dead packet thread means diverted traffic has nowhere to
                // go: stop and let the kernel pass everything again.
                if let Some(index) = threads.iter().position(|t| t.is_finished()) {
                    break Err(DaemonError::PacketThread(index, "it exited".into()));
                }
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = state.datapath.beat() {
                    tracing::warn!("heartbeat: {e}");
                }
            }
        }
    };

    tracing::info!("shutting down: detaching the classifier");
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .datapath
        .detach_all();
    let _ = std::fs::remove_file(&socket_path);
    outcome
}

/// Refuses to start beside a live daemon and clears a stale socket file.
async fn claim_socket_path(path: &Path) -> Result<(), DaemonError> {
    if UnixStream::connect(path).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(path.into()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DaemonError::Socket {
                path: path.into(),
                source,
            });
        }
    }
    Ok(())
}

fn bind_control_socket(path: &Path) -> Result<UnixListener, DaemonError> {
    let socket_error = |source| DaemonError::Socket {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(socket_error)?;
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    // Only root may connect: rules decide where the host's traffic goes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    Ok(listener)
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .handle(request),
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|e| {
            format!(r#"{{"result":"error","message":"cannot encode the reply: {e}"}}"#)
        });
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
}
