//! Starting the daemon: every part from the platform, the threads around
//! the engine, then serving the control socket until a signal to stop.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oasis_common::Settings;

use super::monitor::{self, MonitorParts, NoProbes};
use super::transport::{ControlListener, shutdown_signal};
use super::{DaemonError, dns, heartbeat, persist, serve, state};
use crate::config::Config;
use crate::control::MonitorView;
use crate::control::TunView;
use crate::engine::{
    Engine, EngineSettings, KernelTables, LocalAddresses, MonitorChooser, ReturnPath, Routes, SharedTables,
};
use crate::forward::{OverlaySockets, run_queue, run_returns, run_underlay_port};
use crate::liveness::{Liveness, TICK_EVERY};
use crate::monitor::link::EVENT_QUEUE;
use crate::monitor::{MonitorLink, ProbeTable};
use crate::names::NameRules;
use crate::overlay::OverlayManager;
use crate::platform::Platform;
use crate::platform::ProbeSockets;
use crate::shared::Shared;

/// Most flows one packet thread tracks.
const FLOW_CAPACITY: usize = 262_144;
/// How often the fake-address table is saved when it changed.
const UPKEEP_EVERY: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run<P: Platform + Sync>(config_path: &Path, mut platform: P) -> Result<(), DaemonError> {
    let config = Config::load_or_default(config_path)?;
    let rules = config.rule_set(config_path)?;
    ControlListener::claim(&config.control_socket).await?;

    let (mtu, divert, underlay, mut kernel) = datapath(&mut platform, &config, &rules)?;

    let names = Arc::new(
        NameRules::compile(rules.names()).map_err(|e| DaemonError::Dns(format!("name rules: {e}")))?,
    );
    let (probe_sockets, link, monitor_events) = monitor_link(&platform, &config);
    // The DNS service's threads tick here; the DNS hooks fail open when
    // they stop.
    let dns_liveness = Arc::new(Liveness::new());
    let dns = dns::start(
        &config,
        kernel.as_mut(),
        names.clone(),
        link.clone(),
        &dns_liveness,
    )
    .await?;
    let tables = SharedTables::new(kernel_tables(kernel.as_mut())?);
    let platform = Arc::new(platform);
    let overlays = load_overlays(platform.as_ref(), &config, config_path, mtu).await?;
    let routes = Routes::with_names(
        rules.rules(),
        rules.names(),
        names.clone(),
        overlays.table().clone(),
    );
    let engine = engine(&config, mtu, routes, dns.fakes.clone(), link);

    let stop = Arc::new(AtomicBool::new(false));
    let liveness = Arc::new(Liveness::new());
    let overlay_sockets = Arc::new(open_overlay_sockets(
        platform.as_ref(),
        config.overlay_port,
        config.bypass_mark,
        config.overlay_fast_path,
    )?);
    // Names claimed by WireGuard overlays with a DNS server of their own
    // are resolved by it, through the tunnel.
    if config.dns.through_wireguard
        && let Some(service) = &dns.service
    {
        let carriers = crate::overlay::tunnel_dns::TunnelDns {
            engine: engine.clone(),
            sockets: overlay_sockets.clone(),
        };
        let _ = service.carriers.set(Arc::new(carriers));
    }
    let tun_view = TunView {
        name: divert.name.clone(),
        ifindex: divert.index,
        queues: divert.queues.len(),
        ..Default::default()
    };
    let queue_reads: Arc<[AtomicU64]> = divert.queues.iter().map(|_| AtomicU64::new(0)).collect();
    let loops = PacketLoops {
        engine: &engine,
        tables: &tables,
        queue_reads: &queue_reads,
        underlay: &underlay,
        overlay: &overlay_sockets,
        liveness: &liveness,
        stop: &stop,
    };
    let mut threads = loops.spawn(&platform, divert, config.underlay_port, config.bypass_mark)?;

    // The Monitor: not a packet thread; the heartbeat does not wait for it.
    let monitor_view: Shared<MonitorView> = Arc::default();
    let parts = MonitorParts {
        settings: config.monitor.settings(),
        engine: engine.clone(),
        tables: tables.clone(),
        events: monitor_events,
        underlay: underlay.clone(),
        overlay: overlay_sockets.clone(),
        sockets: probe_sockets,
        kernel_events: kernel.take_monitor_events(),
        view: monitor_view.clone(),
    };
    threads.extend(monitor::spawn(parts, stop.clone()).map_err(io("starting the Monitor's threads"))?);
    let watched = heartbeat::Watched {
        packets: liveness.clone(),
        dns: dns_liveness,
    };
    threads.push(spawn_heartbeat(kernel.as_mut(), &config, watched, &stop)?);
    let status_heartbeat = kernel.heartbeat().map_err(DaemonError::Platform)?;
    let persister =
        persist::Persister::start(config_path.to_path_buf()).map_err(io("starting the config writer"))?;

    let control_socket = config.control_socket.clone();
    let (diverted, own_addresses, path_mtu) = platform_views(&platform);
    let daemon = Arc::new(state::Daemon::new(state::Parts {
        config_path: config_path.to_path_buf(),
        settings: Arc::new(config),
        rules,
        names,
        overlays,
        kernel,
        heartbeat: status_heartbeat,
        engine,
        tables,
        dns,
        monitor: monitor_view,
        persister,
        tun: tun_view,
        queue_reads,
        diverted,
        own_addresses,
        path_mtu,
        sockets: platform.sockets(),
    }));

    let listener = ControlListener::bind(&control_socket)?;
    daemon.publish_overlays();
    inherit_flows(&daemon, platform.sockets());
    // Only a daemon that started writes a default config file.
    if !config_path.exists() {
        daemon.settings.save(config_path)?;
        tracing::info!(path = %config_path.display(), "wrote a default config file");
    }
    if !daemon.dns.intercepting() {
        let apps: Vec<u32> = daemon
            .rules()
            .rules()
            .iter()
            .filter(|r| r.subset.sender.app.is_some())
            .map(|r| r.id)
            .collect();
        if !apps.is_empty() {
            tracing::warn!(
                rules = ?apps,
                "these rules name an application, which only the socket hooks of DNS interception see; \
                 with interception off they match nothing"
            );
        }
    }
    let api = super::api::start(&daemon).await;
    if let Some(api) = &api {
        let _ = daemon.api.set((api.url.clone(), api.secret.clone()));
    }
    tracing::info!(socket = %control_socket.display(), "oasis daemon ready");
    // Under systemd (Type=notify): the unit is started once rules apply.
    #[cfg(target_os = "linux")]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let cgroups = tokio::spawn(follow_cgroups(daemon.clone()));
    let lists = tokio::spawn(follow_lists(daemon.clone()));
    let outcome = serve_until_stopped(&daemon, &listener, &threads).await;

    drop(api);
    #[cfg(target_os = "linux")]
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: detaching the classifier");
    cgroups.abort();
    lists.abort();
    stop.store(true, Relaxed);
    daemon.shutdown();
    listener.remove();
    outcome
}

/// How often the ids of the cgroups rules name are checked: a unit that
/// restarts gets a new cgroup (a new id), which its rules must follow.
const CGROUP_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

async fn follow_cgroups(daemon: Arc<state::Daemon>) {
    let mut every = tokio::time::interval(CGROUP_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        every.tick().await;
        match daemon.refresh_cgroups().await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                tracing::warn!("cannot bring the classifier to the rules' cgroups' new ids: {e}");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// How often list rules are looked at for one that is due (each has its
/// own interval, a minute at least).
const LIST_CHECK: std::time::Duration = std::time::Duration::from_secs(15);

async fn follow_lists(daemon: Arc<state::Daemon>) {
    let mut every = tokio::time::interval(LIST_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        daemon.refresh_due_lists().await;
    }
}

/// The Monitor's probes (ports held for TCP probes, sockets for echo
/// replies: without them the Monitor decides on what flows measure) and
/// its link to the packet threads.
#[allow(clippy::type_complexity)]
fn monitor_link<P: Platform>(
    platform: &P,
    config: &Config,
) -> (
    Arc<dyn ProbeSockets>,
    Arc<MonitorLink>,
    std::sync::mpsc::Receiver<(std::time::Instant, crate::monitor::Event)>,
) {
    let probe_sockets: Arc<dyn ProbeSockets> = match platform.probe_sockets(config.monitor.probe_ports) {
        Ok(sockets) => Arc::from(sockets),
        Err(e) => {
            tracing::warn!("the Monitor sends no probes: {e}");
            Arc::new(NoProbes)
        }
    };
    let echo_id = (std::process::id() as u16) ^ 0x4f53;
    let (link, events) =
        MonitorLink::with_probes(EVENT_QUEUE, ProbeTable::new(probe_sockets.ports(), echo_id));
    (probe_sockets, link, events)
}

/// An I/O error of the start, saying what was being done.
fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io {
        what: what.into(),
        source,
    }
}

/// The routing engine, its carriers chosen by the Monitor through `link`.
fn engine(
    config: &Config,
    mtu: u16,
    routes: Routes,
    fakes: Arc<std::sync::Mutex<crate::fake::FakeTable>>,
    link: Arc<MonitorLink>,
) -> Arc<Engine> {
    let chooser = Box::new(MonitorChooser::new(link.clone()));
    Engine::new(
        engine_settings(config, mtu),
        routes,
        fakes,
        chooser,
        link,
        Instant::now(),
    )
}

pub(super) fn engine_settings(config: &Config, mtu: u16) -> EngineSettings {
    EngineSettings {
        lifetimes: config.lifetimes(),
        flow_capacity: FLOW_CAPACITY,
        uplink_mtu: mtu,
        fake_v4: config.dns.fake_v4,
        fake_v6: config.dns.fake_v6,
        fast_path: config.overlay_fast_path,
    }
}

/// What the control plane reads from the platform now and then: the
/// diverted counts, this host's addresses, path MTUs.
#[allow(clippy::type_complexity)]
fn platform_views<P: Platform + Sync>(
    platform: &Arc<P>,
) -> (
    Box<dyn Fn(&str) -> (u64, u64) + Send + Sync>,
    Box<dyn Fn(&mut LocalAddresses) + Send + Sync>,
    Box<dyn Fn(std::net::SocketAddr) -> Option<u16> + Send + Sync>,
) {
    let (a, b, c) = (platform.clone(), platform.clone(), platform.clone());
    (
        Box::new(move |device| a.diverted(device)),
        Box::new(move |into| b.local_addresses(into)),
        Box::new(move |to| c.path_mtu(to)),
    )
}

/// The kernel's tables the engine's work goes to: the NAT of fake-address flows,
/// the pins of flows left to the kernel.
fn kernel_tables(kernel: &mut dyn crate::platform::Kernel) -> Result<KernelTables, DaemonError> {
    let nat = kernel
        .take_nat()
        .ok_or_else(|| DaemonError::Dns("the NAT table was taken twice".into()))?;
    let pins = kernel
        .take_pins()
        .ok_or_else(|| DaemonError::Platform("the flow pins were taken twice".into()))?;
    let encap = kernel
        .take_encap()
        .ok_or_else(|| DaemonError::Platform("the encapsulation table was taken twice".into()))?;
    Ok(KernelTables { nat, pins, encap })
}

/// The data path: the uplinks' MTU, the divert device, the underlay's
/// sockets, and the kernel side attached.
#[allow(clippy::type_complexity)]
fn datapath<P: Platform>(
    platform: &mut P,
    config: &Config,
    rules: &crate::rules::RuleSet,
) -> Result<
    (
        u16,
        crate::platform::Divert<P::Queue, P::Delivery>,
        Arc<P::Underlay>,
        Box<dyn crate::platform::Kernel>,
    ),
    DaemonError,
> {
    let uplinks = platform.uplinks(&config.uplinks).map_err(DaemonError::Platform)?;
    let mtu = platform.uplink_mtu(&uplinks);
    let divert = platform.divert(&config.tun, mtu).map_err(DaemonError::Platform)?;
    let underlay = platform
        .underlay(config.bypass_mark)
        .map_err(DaemonError::Platform)?;
    let kernel = classifier(platform, config, rules, &uplinks, divert.index)?;
    Ok((mtu, divert, Arc::new(underlay), kernel))
}

/// The kernel side: loaded with the settings, the rules applied, the
/// classifier attached to every uplink.
fn classifier<P: Platform>(
    platform: &mut P,
    config: &Config,
    rules: &crate::rules::RuleSet,
    uplinks: &[String],
    tun_ifindex: u32,
) -> Result<Box<dyn crate::platform::Kernel>, DaemonError> {
    let mut settings = Settings {
        heartbeat_timeout_ns: config.heartbeat_timeout_ms * 1_000_000,
        flow_idle_ns: config.flow_idle_timeout_secs * 1_000_000_000,
        tcp_idle_ns: config.tcp_idle_timeout_secs * 1_000_000_000,
        tun_ifindex,
        bypass_mark: config.bypass_mark,
        overlay_port: config.overlay_port,
        ..Settings::default()
    };
    let (v4, v6) = (config.dns.fake_v4, config.dns.fake_v6);
    settings.set_fake_pools(
        (v4.network().octets(), v4.prefix_len()),
        (v6.network().octets(), v6.prefix_len()),
    );
    let mut kernel = platform.kernel(settings).map_err(DaemonError::Platform)?;
    kernel
        .apply(&crate::compile::compile_for(
            rules.rules(),
            &crate::sender::cgroup_ids(rules.rules(), crate::sender::host_cgroup_id),
        ))
        .map_err(DaemonError::Platform)?;
    for uplink in uplinks {
        kernel.attach(uplink).map_err(DaemonError::Platform)?;
        tracing::info!(%uplink, "classifier attached");
    }
    Ok(kernel)
}

/// The joined overlays of the config, their entry nodes resolved and their
/// code modules started. Overlays' code modules run in a sandbox; without
/// one (wasmtime could not set up), overlays that carry code cannot be
/// used, and everything else works.
async fn load_overlays<P: Platform>(
    platform: &P,
    config: &Config,
    config_path: &Path,
    mtu: u16,
) -> Result<OverlayManager, DaemonError> {
    let modules = match crate::module::Sandbox::new() {
        Ok(sandbox) => Some(crate::overlay::ModuleContext {
            sandbox,
            compiler: crate::module::compiler::Compiler::child_of_this_process(),
            dir: crate::overlay::ModuleContext::dir_beside(config_path),
            overlay_port: config.overlay_port,
            underlay_port: config.underlay_port,
            bypass_mark: config.bypass_mark,
            limits: config.modules.clone(),
            uplink_mtu: mtu,
            lifetimes: config.lifetimes(),
            published: Default::default(),
        }),
        Err(e) => {
            tracing::error!("no sandbox for overlay code modules: {e}");
            None
        }
    };
    let stored = config.overlays.clone();
    let mut own = LocalAddresses::default();
    platform.local_addresses(&mut own);
    tokio::task::spawn_blocking(move || OverlayManager::load(stored, &own, modules))
        .await
        .map_err(|e| DaemonError::Io {
            what: "resolving the overlays' entry nodes".into(),
            source: std::io::Error::other(e),
        })
}

/// What the packet loops share.
struct PacketLoops<'a, P: Platform> {
    engine: &'a Arc<Engine>,
    tables: &'a SharedTables,
    /// Packets each diverted queue's thread read.
    queue_reads: &'a Arc<[AtomicU64]>,
    underlay: &'a Arc<P::Underlay>,
    overlay: &'a Arc<OverlaySockets<P::Socket>>,
    liveness: &'a Arc<Liveness>,
    stop: &'a Arc<AtomicBool>,
}

impl<P: Platform + Sync> PacketLoops<'_, P> {
    /// A thread per diverted queue, per standard-port socket (returned
    /// packets) and per underlay-port socket (modules' packets).
    fn spawn(
        &self,
        platform: &Arc<P>,
        divert: crate::platform::Divert<P::Queue, P::Delivery>,
        underlay_port: u16,
        bypass_mark: u32,
    ) -> Result<Vec<JoinHandle<()>>, DaemonError> {
        let mut threads = Vec::new();
        for (index, queue) in divert.queues.into_iter().enumerate() {
            let name = format!("oasis-queue-{index}");
            let (tables, reads) = (self.tables.clone(), self.queue_reads.clone());
            let (router, delivery, underlay, sockets) = (
                self.engine.router(Arc::new(tables.clone())),
                divert.delivery.clone(),
                self.underlay.clone(),
                self.overlay.clone(),
            );
            let (tick, stop) = (self.liveness.register(&name), self.stop.clone());
            threads.push(spawn_thread(name, move || {
                run_queue(
                    router,
                    &tables,
                    &reads[index],
                    queue,
                    delivery,
                    underlay.as_ref(),
                    &sockets,
                    tick,
                    &stop,
                )
            })?);
        }
        for (family, v4) in [("v4", true), ("v6", false)] {
            if !v4 && self.overlay.v6.is_none() {
                continue;
            }
            let name = format!("oasis-overlay-rx-{family}");
            let timers = crate::forward::TimersFor {
                v4,
                v6: !v4 || self.overlay.v6.is_none(),
            };
            let (path, delivery, sockets, platform) = (
                ReturnPath::new(self.engine).with_sockets(platform.sockets()),
                divert.delivery.clone(),
                self.overlay.clone(),
                platform.clone(),
            );
            let (tick, stop) = (self.liveness.register(&name), self.stop.clone());
            threads.push(spawn_thread(name, move || {
                let socket = if v4 {
                    &sockets.v4
                } else {
                    sockets.v6.as_ref().expect("checked")
                };
                run_returns(
                    path,
                    socket,
                    timers,
                    delivery,
                    |into| platform.local_addresses(into),
                    tick,
                    &stop,
                )
            })?);
        }
        for (family, loopback) in [
            ("v4", std::net::IpAddr::from([127, 0, 0, 1])),
            ("v6", std::net::Ipv6Addr::LOCALHOST.into()),
        ] {
            let what = format!("UDP port {underlay_port} (underlay_port) on {loopback}");
            let socket = match platform.socket((loopback, underlay_port).into(), bypass_mark, false) {
                Ok(socket) => socket,
                Err(e) if loopback.is_ipv6() => {
                    tracing::warn!("no IPv6 for the {what} ({e}); IPv4 only");
                    continue;
                }
                Err(source) => return Err(DaemonError::Io { what, source }),
            };
            let name = format!("oasis-underlay-port-{family}");
            let (engine, underlay) = (self.engine.clone(), self.underlay.clone());
            let (tick, stop) = (self.liveness.register(&name), self.stop.clone());
            threads.push(spawn_thread(name, move || {
                run_underlay_port(engine, &socket, underlay.as_ref(), tick, &stop)
            })?);
        }
        Ok(threads)
    }
}

/// The heartbeat, on a thread and map handle of its own.
fn spawn_heartbeat(
    kernel: &mut dyn crate::platform::Kernel,
    config: &Config,
    watched: heartbeat::Watched,
    stop: &Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DaemonError> {
    let every = Duration::from_millis((config.heartbeat_timeout_ms / 4).clamp(100, 1000));
    // Logged as stuck past half the timeout (the beats themselves carry
    // how long ago the quietest thread made progress).
    let stall_limit = Duration::from_millis(config.heartbeat_timeout_ms / 2).max(TICK_EVERY * 4);
    let beat = kernel.heartbeat().map_err(DaemonError::Platform)?;
    heartbeat::spawn(beat, watched, every, stall_limit, stop.clone())
        .map_err(io("starting the heartbeat thread"))
}

/// Flows of fake addresses the last daemon died under: those of overlays
/// go on, those the kernel rewrote are ended at once (`inherit.rs`).
fn inherit_flows(daemon: &Arc<state::Daemon>, sockets: Arc<dyn crate::platform::SocketLookup>) {
    let engine = daemon.engine.clone();
    tokio::task::spawn_blocking(move || {
        let fakes = engine.fakes().lock().unwrap_or_else(|e| e.into_inner()).clone();
        super::inherit::sweep(sockets.as_ref(), &fakes, &engine.routes());
    });
}

/// Serves the control socket and the daemon's upkeep until a signal to
/// stop, or until a packet thread dies (diverted traffic would have
/// nowhere to go: the kernel must pass everything again).
async fn serve_until_stopped(
    daemon: &Arc<state::Daemon>,
    listener: &ControlListener,
    threads: &[JoinHandle<()>],
) -> Result<(), DaemonError> {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut watch = tokio::time::interval(TICK_EVERY);
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            signal = &mut shutdown => return signal,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        let (read, write) = stream.into_split();
                        serve::serve(read, write, daemon).await
                    });
                }
                Err(e) => tracing::warn!("control socket accept: {e}"),
            },
            _ = watch.tick() => {
                if let Some(thread) = threads.iter().find(|t| t.is_finished()) {
                    let name = thread.thread().name().unwrap_or("?").to_string();
                    return Err(DaemonError::PacketThread(name, "it exited; see the log above".into()));
                }
            }
            _ = upkeep.tick() => {
                let daemon = daemon.clone();
                tokio::task::spawn_blocking(move || daemon.upkeep());
            }
        }
    }
}

/// UDP sockets on the standard port; IPv6 only where the host has it.
/// With the fast path, the IPv4 socket asks for no UDP GRO: the NIC would
/// then merge an entry node's datagrams into aggregates the kernel cannot
/// open, which would reach the application through the broker after the
/// single datagrams the kernel opened, out of order.
fn open_overlay_sockets<P: Platform>(
    platform: &P,
    port: u16,
    bypass_mark: u32,
    fast_path: bool,
) -> Result<OverlaySockets<P::Socket>, DaemonError> {
    let what = format!("UDP port {port} (overlay_port)");
    let v4 = platform
        .socket(([0, 0, 0, 0], port).into(), bypass_mark, !fast_path)
        .map_err(|source| DaemonError::Io {
            what: what.clone(),
            source,
        })?;
    let v6 = match platform.socket((std::net::Ipv6Addr::UNSPECIFIED, port).into(), bypass_mark, true) {
        Ok(socket) => Some(socket),
        Err(e) => {
            tracing::warn!("no IPv6 for the {what} ({e}); overlays reachable over IPv4 only");
            None
        }
    };
    Ok(OverlaySockets { v4, v6 })
}

fn spawn_thread(
    name: String,
    body: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<JoinHandle<()>, DaemonError> {
    let thread_name = name.clone();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || match body() {
            Ok(()) => tracing::debug!(thread = %thread_name, "stopped"),
            Err(error) => tracing::error!(thread = %thread_name, "packet thread stopped: {error}"),
        })
        .map_err(|e| DaemonError::PacketThread(name, e.to_string()))
}
