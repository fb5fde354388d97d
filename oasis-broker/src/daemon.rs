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
use crate::config::{Config, ConfigError, StoredOverlay};
use crate::control::{
    HeartbeatView, MapView, OverlayView, ProgramView, Request, Response, RuleView, StatusView, TunView,
    UplinkView,
};
use crate::overlay::{FetchError, JoinError, JoinedOverlay, OverlayTable, SpecError, check_name, shim_bytes};
use crate::platform::linux::datapath::{Datapath, DatapathError};
use crate::platform::linux::forward::{ForwardStats, Forwarder, OverlaySockets, Shared, snapshot};
use crate::platform::linux::overlay_rx::OverlayReceiver;
use crate::platform::linux::tun::{Tun, diverted_counts, uplink_mtu};
use crate::platform::linux::underlay::Underlay;
use crate::platform::linux::underlay_port::UnderlayPort;
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
    Tun { name: String, source: std::io::Error },
    #[error("opening the underlay raw sockets: {0} (the daemon must run as root)")]
    Underlay(std::io::Error),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("control socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("packet thread {0} stopped: {1}")]
    PacketThread(String, String),
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
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

struct State {
    config: Config,
    config_path: PathBuf,
    rules: RuleSet,
    shared_rules: Shared<RuleSet>,
    /// Joined overlays whose entry nodes resolved; the packet threads read it.
    shared_overlays: Shared<OverlayTable>,
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
        if let Carrier::Overlay(name) = &via
            && !self.config.overlays.iter().any(|o| &o.name == name)
        {
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
        *self.shared_rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(self.rules.clone());
        Ok(())
    }

    fn overlay_view(&self, stored: &StoredOverlay) -> OverlayView {
        let table = snapshot(&self.shared_overlays);
        let joined = table.get(&stored.name);
        OverlayView {
            name: stored.name.clone(),
            url: stored.url.clone(),
            spec_name: stored.spec.name.clone(),
            description: stored.spec.description.clone(),
            entries: stored.spec.entries.clone(),
            resolved: joined
                .map(|j| j.entries.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            shim_len: stored.spec.shim_len,
            token: stored.token.is_some(),
            module: stored.spec.module.clone(),
            rules: self.rules_using(&stored.name),
            packets_sent: joined
                .map(|j| j.sent.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(0),
            packets_received: joined
                .map(|j| j.received.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(0),
        }
    }

    fn rules_using(&self, overlay: &str) -> Vec<u32> {
        self.rules
            .rules()
            .iter()
            .filter(|r| matches!(&r.via, Carrier::Overlay(name) if name == overlay))
            .map(|r| r.id)
            .collect()
    }

    /// Joins an overlay whose specification was fetched and resolved.
    fn add_overlay(
        &mut self,
        stored: StoredOverlay,
        joined: JoinedOverlay,
    ) -> Result<OverlayView, RequestError> {
        if self.config.overlays.iter().any(|o| o.name == stored.name) {
            return Err(JoinError::Exists(stored.name).into());
        }
        let mut config = self.config.clone();
        config.overlays.push(stored.clone());
        config.save(&self.config_path)?;
        self.config = config;
        self.publish_overlay(Some(joined), None);
        tracing::info!(name = %stored.name, url = %stored.url, entries = ?stored.spec.entries, "overlay joined");
        Ok(self.overlay_view(&stored))
    }

    /// Leaves an overlay; refused while rules still use it.
    fn del_overlay(&mut self, name: &str) -> Result<OverlayView, RequestError> {
        let Some(stored) = self.config.overlays.iter().find(|o| o.name == name).cloned() else {
            return Err(JoinError::Unknown(name.into()).into());
        };
        let rules = self.rules_using(name);
        if !rules.is_empty() {
            return Err(JoinError::InUse {
                name: name.into(),
                rules,
            }
            .into());
        }
        let view = self.overlay_view(&stored);
        let mut config = self.config.clone();
        config.overlays.retain(|o| o.name != name);
        config.save(&self.config_path)?;
        self.config = config;
        self.publish_overlay(None, Some(name));
        tracing::info!(%name, "overlay left");
        Ok(view)
    }

    /// Gives the packet threads a new overlay table with `add` in it and
    /// `remove` gone; counters of the others carry over.
    fn publish_overlay(&mut self, add: Option<JoinedOverlay>, remove: Option<&str>) {
        let current = snapshot(&self.shared_overlays);
        let mut list: Vec<Arc<JoinedOverlay>> = current
            .iter()
            .filter(|o| Some(o.name.as_str()) != remove)
            .cloned()
            .collect();
        list.extend(add.map(Arc::new));
        *self.shared_overlays.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(OverlayTable::new(list));
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
            overlays: self.config.overlays.len(),
            overlay_port: self.config.overlay_port,
            underlay_port: self.config.underlay_port,
        }
    }

    fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::AddRule { spec } => self.add_rule(spec).map(|rule| Response::Rule { rule }),
            Request::DelRule { id } => self.del_rule(id).map(|rule| Response::Rule { rule }),
            Request::ListRules => Ok(Response::Rules {
                rules: self.rules.rules().iter().map(|r| self.rule_view(r)).collect(),
            }),
            Request::Status => Ok(Response::Status {
                status: Box::new(self.status()),
            }),
            Request::OverlayList => Ok(Response::Overlays {
                overlays: self
                    .config
                    .overlays
                    .iter()
                    .map(|o| self.overlay_view(o))
                    .collect(),
            }),
            Request::OverlayShow { name } => self
                .config
                .overlays
                .iter()
                .find(|o| o.name == name)
                .map(|o| Response::Overlay {
                    overlay: Box::new(self.overlay_view(o)),
                })
                .ok_or_else(|| JoinError::Unknown(name).into()),
            Request::OverlayDel { name } => self.del_overlay(&name).map(|overlay| Response::Overlay {
                overlay: Box::new(overlay),
            }),
            // `serve` answers these itself: the fetch must not hold the lock.
            Request::OverlayAdd { .. } => Ok(Response::Error {
                message: "overlay add is answered by the connection handler".into(),
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

    let mtu = uplink_mtu(&uplinks);
    let tun =
        Tun::create(&config.tun.name, config.tun.queues, mtu, config.tun.address).map_err(|source| {
            DaemonError::Tun {
                name: config.tun.name.clone(),
                source,
            }
        })?;
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
    let shared_rules: Shared<RuleSet> = Arc::new(RwLock::new(Arc::new(rules.clone())));
    let shared_overlays: Shared<OverlayTable> = Arc::new(RwLock::new(Arc::new(initial_overlays(&config))));
    let overlay_sockets = Arc::new(open_overlay_sockets(config.overlay_port, config.bypass_mark)?);
    let tun_view = TunView {
        name: tun.name.clone(),
        ifindex: tun.ifindex,
        queues: tun.queues.len(),
        ..Default::default()
    };
    let devices: Vec<Arc<tun_rs::SyncDevice>> = tun.queues.into_iter().map(Arc::new).collect();
    let mut threads = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let forwarder = Forwarder {
            device: device.clone(),
            underlay: underlay.clone(),
            overlay_sockets: overlay_sockets.clone(),
            rules: shared_rules.clone(),
            overlays: shared_overlays.clone(),
            stats: stats.clone(),
            flow_idle: Duration::from_secs(config.flow_idle_timeout_secs),
            uplink_mtu: mtu,
        };
        threads.push(spawn_thread(format!("oasis-queue-{index}"), move || {
            forwarder.run()
        })?);
    }
    // No module runs yet (they come with the sandbox): the set stays empty.
    let module_sockets: crate::platform::linux::underlay_port::ModuleSockets = Arc::default();
    for (family, loopback) in [
        ("v4", std::net::IpAddr::from([127, 0, 0, 1])),
        ("v6", std::net::Ipv6Addr::LOCALHOST.into()),
    ] {
        let port = UnderlayPort {
            socket: open_udp((loopback, config.underlay_port).into(), config.bypass_mark).map_err(
                |source| DaemonError::Socket {
                    path: format!("UDP port {} (underlay_port)", config.underlay_port).into(),
                    source,
                },
            )?,
            underlay: underlay.clone(),
            modules: module_sockets.clone(),
            stats: stats.clone(),
        };
        threads.push(spawn_thread(
            format!("oasis-underlay-port-{family}"),
            move || port.run(),
        )?);
    }
    for (family, socket) in [("v4", &overlay_sockets.v4), ("v6", &overlay_sockets.v6)] {
        let receiver = OverlayReceiver {
            socket: socket.try_clone().map_err(|source| DaemonError::Socket {
                path: "overlay port".into(),
                source,
            })?,
            device: devices[0].clone(),
            overlays: shared_overlays.clone(),
            stats: stats.clone(),
            uplink_mtu: mtu,
        };
        threads.push(spawn_thread(format!("oasis-overlay-rx-{family}"), move || {
            receiver.run()
        })?);
    }

    let heartbeat_every = Duration::from_millis((config.heartbeat_timeout_ms / 4).clamp(100, 1000));
    let state = Arc::new(Mutex::new(State {
        config,
        config_path: config_path.to_path_buf(),
        rules,
        shared_rules,
        shared_overlays,
        datapath,
        tun: tun_view,
        stats,
        started: Instant::now(),
    }));

    let listener = bind_control_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), "oasis daemon ready");

    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|source| {
            DaemonError::Socket {
                path: socket_path.clone(),
                source,
            }
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
                if let Some(thread) = threads.iter().find(|t| t.is_finished()) {
                    let name = thread.thread().name().unwrap_or("?").to_string();
                    break Err(DaemonError::PacketThread(name, "it exited".into()));
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
            // Fetching a specification takes time: not under the lock.
            Ok(Request::OverlayAdd { name, url, token }) => {
                match join_overlay(&state, name, url, token).await {
                    Ok(overlay) => Response::Overlay {
                        overlay: Box::new(overlay),
                    },
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Ok(request) => state.lock().unwrap_or_else(|e| e.into_inner()).handle(request),
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        let mut text = serde_json::to_string(&response)
            .unwrap_or_else(|e| format!(r#"{{"result":"error","message":"cannot encode the reply: {e}"}}"#));
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// `oasis overlay add`: fetch, check, resolve, then store and publish.
async fn join_overlay(
    state: &Mutex<State>,
    name: String,
    url: String,
    token: Option<String>,
) -> Result<OverlayView, RequestError> {
    check_name(&name)?;
    if state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .config
        .overlays
        .iter()
        .any(|o| o.name == name)
    {
        return Err(JoinError::Exists(name).into());
    }
    let spec = crate::overlay::fetch(&url).await?;
    let shim = shim_bytes(spec.shim_len, token.as_deref())?;
    let to_resolve = spec.clone();
    let entries = tokio::task::spawn_blocking(move || to_resolve.resolve_entries())
        .await
        .unwrap_or_else(|e| Err(SpecError::Xml(format!("resolver task failed: {e}"))))?;
    let joined = JoinedOverlay::new(name.clone(), entries, shim);
    let stored = StoredOverlay {
        name,
        url,
        token,
        spec,
    };
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add_overlay(stored, joined)
}

/// The stored overlays whose entry nodes resolve now. One that does not is
/// left out (its flows are dropped, counted as `no_carrier`) rather than
/// keeping the daemon from starting.
fn initial_overlays(config: &Config) -> OverlayTable {
    let joined = config.overlays.iter().filter_map(|stored| {
        let shim = shim_bytes(stored.spec.shim_len, stored.token.as_deref()).ok()?;
        match stored.spec.resolve_entries() {
            Ok(entries) => Some(Arc::new(JoinedOverlay::new(stored.name.clone(), entries, shim))),
            Err(e) => {
                tracing::error!(overlay = %stored.name, "cannot use overlay: {e}");
                None
            }
        }
    });
    OverlayTable::new(joined.collect::<Vec<_>>())
}

/// UDP sockets on the standard port for both families.
fn open_overlay_sockets(port: u16, bypass_mark: u32) -> Result<OverlaySockets, DaemonError> {
    let error = |source| DaemonError::Socket {
        path: format!("UDP port {port} (overlay_port)").into(),
        source,
    };
    Ok(OverlaySockets {
        v4: open_udp(([0, 0, 0, 0], port).into(), bypass_mark).map_err(error)?,
        v6: open_udp((std::net::Ipv6Addr::UNSPECIFIED, port).into(), bypass_mark).map_err(error)?,
    })
}

/// A UDP socket of the broker's. It carries the bypass mark, so what it
/// sends is never diverted by a rule itself.
fn open_udp(addr: std::net::SocketAddr, bypass_mark: u32) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if domain == Domain::IPV6 {
        socket.set_only_v6(true)?;
    }
    socket.set_mark(bypass_mark)?;
    socket.set_recv_buffer_size(8 << 20)?;
    socket.set_send_buffer_size(8 << 20)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn spawn_thread(
    name: String,
    body: impl FnOnce() -> std::io::Error + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, DaemonError> {
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let error = body();
            tracing::error!(thread = %thread_name, "packet thread stopped: {error}");
        })
        .map_err(|e| DaemonError::PacketThread(name, e.to_string()))
}
