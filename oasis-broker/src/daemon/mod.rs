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
use crate::control::{Request, Response, TunView};
use crate::names::NameRules;
use crate::overlay::{JoinedOverlay, OverlayTable, shim_bytes};
use crate::platform::linux::datapath::{Datapath, DatapathError};
use crate::platform::linux::forward::{ForwardStats, Forwarder, OverlaySockets, Shared};
use crate::platform::linux::overlay_rx::OverlayReceiver;
use crate::platform::linux::tun::{Tun, uplink_mtu};
use crate::platform::linux::underlay::Underlay;
use crate::platform::linux::underlay_port::UnderlayPort;
use crate::platform::linux::uplink::default_route_interfaces;
use crate::rules::RuleSet;

mod dns;
mod state;

use state::{State, join_overlay};

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
    #[error("{what}: {source}")]
    Udp { what: String, source: std::io::Error },
    #[error("packet thread {0} stopped: {1}")]
    PacketThread(String, String),
    #[error("DNS: {0}")]
    Dns(String),
}

/// How often idle fake-address flows are ended and the table saved.
const UPKEEP_EVERY: Duration = Duration::from_secs(2);

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

    let names =
        NameRules::compile(rules.names()).map_err(|e| DaemonError::Dns(format!("name rules: {e}")))?;
    let shared_names: Shared<NameRules> = Arc::new(RwLock::new(Arc::new(names)));
    let dns = dns::start(&config, &mut datapath, shared_names.clone()).await?;

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
            fake: dns.fake_path.clone(),
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
        let what = format!("UDP port {} (underlay_port) on {loopback}", config.underlay_port);
        let socket = match open_udp((loopback, config.underlay_port).into(), config.bypass_mark) {
            Ok(socket) => socket,
            Err(e) if loopback.is_ipv6() => {
                tracing::warn!("no IPv6 for the {what} ({e}); IPv4 only");
                continue;
            }
            Err(source) => return Err(DaemonError::Udp { what, source }),
        };
        let port = UnderlayPort {
            socket,
            underlay: underlay.clone(),
            modules: module_sockets.clone(),
            stats: stats.clone(),
        };
        threads.push(spawn_thread(
            format!("oasis-underlay-port-{family}"),
            move || port.run(),
        )?);
    }
    let overlay_receivers = [
        ("v4", Some(&overlay_sockets.v4)),
        ("v6", overlay_sockets.v6.as_ref()),
    ];
    for (family, socket) in overlay_receivers {
        let Some(socket) = socket else { continue };
        let receiver = OverlayReceiver {
            socket: socket.try_clone().map_err(|source| DaemonError::Udp {
                what: "the overlay port".into(),
                source,
            })?,
            device: devices[0].clone(),
            overlays: shared_overlays.clone(),
            stats: stats.clone(),
            uplink_mtu: mtu,
            fake: dns.fake_path.clone(),
        };
        threads.push(spawn_thread(format!("oasis-overlay-rx-{family}"), move || {
            receiver.run()
        })?);
    }

    let heartbeat_every = Duration::from_millis((config.heartbeat_timeout_ms / 4).clamp(100, 1000));
    let flow_idle = Duration::from_secs(config.flow_idle_timeout_secs);
    let state = Arc::new(Mutex::new(State {
        config,
        config_path: config_path.to_path_buf(),
        rules,
        shared_rules,
        shared_names,
        dns_counters: dns.counters.clone(),
        dns,
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
            DaemonError::Udp {
                what: "installing the SIGTERM handler".into(),
                source,
            }
        })?;
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    let mut last_upkeep = Instant::now();
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
                if last_upkeep.elapsed() >= UPKEEP_EVERY {
                    state.dns.maintain(flow_idle);
                    last_upkeep = Instant::now();
                }
            }
        }
    };

    tracing::info!("shutting down: detaching the classifier");
    {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.dns.shutdown();
        state.datapath.detach_all();
    }
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

/// UDP sockets on the standard port; IPv6 only where the host has it.
fn open_overlay_sockets(port: u16, bypass_mark: u32) -> Result<OverlaySockets, DaemonError> {
    let what = format!("UDP port {port} (overlay_port)");
    let v4 = open_udp(([0, 0, 0, 0], port).into(), bypass_mark).map_err(|source| DaemonError::Udp {
        what: what.clone(),
        source,
    })?;
    let v6 = match open_udp((std::net::Ipv6Addr::UNSPECIFIED, port).into(), bypass_mark) {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!("no IPv6 for the {what} ({e}); overlays reachable over IPv4 only");
            None
        }
    };
    Ok(OverlaySockets { v4, v6 })
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
