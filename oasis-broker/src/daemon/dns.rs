//! The daemon's DNS side: the fake-address table (loaded, saved), the DNS
//! listener and the interception of the host's queries.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_resolver::config::NameServerConfig;

use super::DaemonError;
use crate::config::{Config, DnsConfig};
use crate::control::{DnsStatusView, DnsTableView, FakeView};
use crate::dns::DnsCounters;
use crate::dns::cache::AnswerCache;
use crate::dns::journal::Journal;
use crate::dns::listen::listen;
use crate::dns::server::DnsService;
use crate::dns::upstream::{
    Resolving, parse_upstream, read_resolv_conf, resolv_conf_servers, system_upstreams,
};
use crate::engine::{Engine, Routes, RuleVia, Via};
use crate::fake::{FakeTable, unix_now};
use crate::liveness::{Liveness, TICK_EVERY};
use crate::names::NameRules;
use crate::platform::{DnsInterception, InterceptSettings, Kernel};
use crate::shared::Shared;

/// Resolver cache entries (queries, not names).
const CACHE_ENTRIES: usize = 16_384;

pub(super) struct DnsRuntime {
    pub fakes: Arc<Mutex<FakeTable>>,
    /// The name rules the DNS service answers by.
    pub names: Shared<NameRules>,
    pub counters: Arc<DnsCounters>,
    interception: Mutex<Option<Box<dyn DnsInterception>>>,
    listen: Vec<String>,
    upstreams: Mutex<Vec<String>>,
    state_file: PathBuf,
    saved_changes: AtomicU64,
    journal: Option<Arc<Journal>>,
    /// The service, to follow resolv.conf (and to hand it the carriers
    /// that resolve their own names).
    pub(super) service: Option<Arc<DnsService>>,
    /// resolv.conf as last read.
    resolv_conf: Mutex<Vec<u8>>,
    /// Whether our resolver follows resolv.conf (`dns.upstreams` empty).
    follow_upstreams: bool,
    /// The addresses of our resolver's servers.
    configured: Mutex<Vec<IpAddr>>,
    port: u16,
    timeout: Duration,
}

/// The table saved by the last run (when it fits the configured pools),
/// with what the journal holds of answers given after that save.
fn load_table(config: &DnsConfig) -> FakeTable {
    let mut table = load_saved(config);
    let replayed = table.replay(Journal::read(&config.state_file));
    if replayed > 0 {
        tracing::info!(
            replayed,
            "fake addresses given out after the last save restored from the journal"
        );
    }
    table
}

fn load_saved(config: &DnsConfig) -> FakeTable {
    let fresh = || FakeTable::new(config.fake_v4, config.fake_v6, config.fake_capacity);
    let text = match std::fs::read_to_string(&config.state_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return fresh(),
        Err(e) => {
            tracing::warn!(path = %config.state_file.display(), "cannot read the fake-address table: {e}; starting empty");
            return fresh();
        }
    };
    match serde_json::from_str::<FakeTable>(&text) {
        Ok(table) => match table.adopt(config.fake_v4, config.fake_v6, config.fake_capacity) {
            Some(table) => {
                tracing::info!(entries = table.len(), path = %config.state_file.display(), "fake-address table restored");
                table
            }
            None => {
                tracing::warn!("the saved fake-address table is for other pools; starting empty");
                fresh()
            }
        },
        Err(e) => {
            tracing::warn!(path = %config.state_file.display(), "the saved fake-address table is not valid: {e}; starting empty");
            fresh()
        }
    }
}

/// The host's own servers: `configured` and those resolv.conf names.
fn host_servers(configured: &[IpAddr]) -> Vec<IpAddr> {
    let mut all = configured.to_vec();
    for server in resolv_conf_servers() {
        if !all.contains(&server) {
            all.push(server);
        }
    }
    all
}

/// Writes the table atomically (temporary file, then rename).
fn save_table(table: &FakeTable, path: &Path) -> std::io::Result<()> {
    let json = serde_json::to_vec(table).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Sets up everything DNS; the listener runs on the current runtime.
pub(super) async fn start(
    config: &Config,
    kernel: &mut dyn Kernel,
    names: Arc<NameRules>,
    monitor: Arc<crate::monitor::MonitorLink>,
    liveness: &Liveness,
) -> Result<DnsRuntime, DaemonError> {
    let dns = &config.dns;
    let fakes = Arc::new(Mutex::new(load_table(dns)));
    kernel
        .set_fake_pools(dns.fake_v4, dns.fake_v6)
        .map_err(DaemonError::Platform)?;
    let counters = Arc::new(DnsCounters::default());
    // The saved count stays behind the replayed table's: the first upkeep
    // saves it, and the journal is rotated.
    let saved_changes = 0;
    let journal = match Journal::open(&dns.state_file) {
        Ok(journal) => Some(Arc::new(journal)),
        Err(e) => {
            tracing::warn!("{e}: fake addresses given out between saves would be forgotten by a crash");
            None
        }
    };
    let names: Shared<NameRules> = Arc::new(RwLock::new(names));
    let mut runtime = DnsRuntime {
        fakes: fakes.clone(),
        names: names.clone(),
        counters: counters.clone(),
        interception: Mutex::new(None),
        listen: Vec::new(),
        upstreams: Mutex::new(Vec::new()),
        state_file: dns.state_file.clone(),
        saved_changes: AtomicU64::new(saved_changes),
        journal: journal.clone(),
        service: None,
        resolv_conf: Mutex::new(read_resolv_conf()),
        follow_upstreams: dns.upstreams.is_empty(),
        configured: Mutex::new(Vec::new()),
        port: dns.port,
        timeout: Duration::from_millis(dns.upstream_timeout_ms),
    };
    if !dns.enabled {
        tracing::info!("DNS interception is off (dns.enabled: false); name rules have no effect");
        return Ok(runtime);
    }

    let servers = upstream_servers(dns)?;
    *runtime.upstreams.get_mut().unwrap_or_else(|e| e.into_inner()) =
        servers.iter().map(ToString::to_string).collect();
    let configured: Vec<IpAddr> = servers.iter().map(|s| s.socket_addr.ip()).collect();
    let system = host_servers(&configured);
    *runtime.configured.get_mut().unwrap_or_else(|e| e.into_inner()) = configured;
    let service = DnsService {
        resolving: RwLock::new(Resolving::new(
            servers,
            Duration::from_millis(dns.upstream_timeout_ms),
        )),
        system: RwLock::new(Arc::new(system)),
        origins: std::sync::OnceLock::new(),
        in_flight: Mutex::new(std::collections::HashSet::new()),
        names,
        pools: (dns.fake_v4.trunc(), dns.fake_v6.trunc()),
        fakes,
        counters,
        fake_ttl: dns.fake_ttl_secs,
        underlay: dns.underlay_answers,
        timeout: Duration::from_millis(dns.upstream_timeout_ms),
        cache: Mutex::new(AnswerCache::new(CACHE_ENTRIES)),
        monitor: Some(monitor),
        journal,
        epoch: AtomicU64::new(0),
        carriers: std::sync::OnceLock::new(),
    };
    let service = Arc::new(service);
    runtime.service = Some(service.clone());
    let v6 = serve(&service, &mut runtime, dns.port, liveness).await?;
    intercept(kernel, dns, v6, &service, &mut runtime)?;
    if !runtime.names.read().unwrap_or_else(|e| e.into_inner()).is_empty() {
        let uncovered = runtime.uncovered();
        if !uncovered.is_empty() {
            return Err(DaemonError::Dns(format!(
                "the config's name rules cannot be kept on this host: {}",
                uncovered.join("; ")
            )));
        }
    }
    Ok(runtime)
}

/// The servers the DNS service asks: the configured ones, or the host's.
fn upstream_servers(dns: &DnsConfig) -> Result<Vec<NameServerConfig>, DaemonError> {
    if dns.upstreams.is_empty() {
        return system_upstreams(dns.port).map_err(|e| DaemonError::Dns(e.to_string()));
    }
    let mut servers = Vec::new();
    for text in &dns.upstreams {
        servers.extend(parse_upstream(text).map_err(|e| DaemonError::Dns(e.to_string()))?);
    }
    Ok(servers)
}

/// Listens on the loopback (and `[::1]` where the host has it, which it
/// returns), and ticks the runtime's liveness.
async fn serve(
    service: &Arc<DnsService>,
    runtime: &mut DnsRuntime,
    port: u16,
    liveness: &Liveness,
) -> Result<bool, DaemonError> {
    let (servers, v6) = listen(service.clone(), port, true, liveness)
        .await
        .map_err(|e| DaemonError::Dns(format!("listening on 127.0.0.1:{port} (dns.port): {e}")))?;
    runtime.listen.push(format!("127.0.0.1:{port}"));
    if v6 {
        runtime.listen.push(format!("[::1]:{port}"));
    }
    for mut server in servers {
        tokio::spawn(async move {
            if let Err(e) = server.block_until_done().await {
                tracing::error!("the DNS listener stopped: {e}");
            }
        });
    }
    // Queries that go upstream, and DNS over TCP, are served on this
    // runtime: it must keep making progress too.
    let tick = liveness.register("oasis-dns-runtime");
    tokio::spawn(async move {
        loop {
            tick.tick();
            tokio::time::sleep(TICK_EVERY).await;
        }
    });
    Ok(v6)
}

/// Sends the queries of `dns.cgroup` to the listener.
fn intercept(
    kernel: &mut dyn Kernel,
    dns: &DnsConfig,
    v6: bool,
    service: &DnsService,
    runtime: &mut DnsRuntime,
) -> Result<(), DaemonError> {
    let settings = InterceptSettings {
        scope: dns.cgroup.clone(),
        port: dns.port,
        v6,
    };
    match kernel.intercept_dns(&settings) {
        Ok(mut interception) => {
            tracing::info!(scope = %interception.scope().display(), listen = ?runtime.listen, upstreams = ?runtime.upstreams.lock().unwrap_or_else(|e| e.into_inner()), "DNS interception on");
            if let Some(origins) = interception.origins() {
                let _ = service.origins.set(origins);
            }
            interception.set_system_servers(&service.system.read().unwrap_or_else(|e| e.into_inner()));
            runtime.interception = Mutex::new(Some(interception));
            Ok(())
        }
        // A host without cgroup v2 can still use header rules: run without
        // interception rather than not at all.
        Err(e) if settings.scope.is_none() => {
            tracing::error!("DNS interception is off: {e}; name rules have no effect");
            Ok(())
        }
        Err(e) => Err(DaemonError::Platform(e)),
    }
}

impl DnsRuntime {
    /// Whether the socket hooks are attached (they also record which
    /// process opened a socket, for rules by application).
    pub fn intercepting(&self) -> bool {
        self.interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Why name rules could not be kept here: resolver daemons that answer
    /// the redirected processes without port 53 from outside their cgroup
    /// (`dns/guard.rs`). Empty when nothing stands in the way.
    pub fn uncovered(&self) -> Vec<String> {
        let Some(scope) = self
            .interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|i| i.scope())
        else {
            return Vec::new();
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(relative) = crate::dns::guard::cgroup_of(&scope, &mountinfo) else {
            return Vec::new();
        };
        let nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
        crate::dns::guard::uncovered(
            &nsswitch,
            &relative,
            &scope.display().to_string(),
            &crate::dns::guard::running_resolvers(),
        )
    }

    /// The name rules new queries are answered by.
    pub fn publish_names(&self, names: Arc<NameRules>) {
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = names;
        if let Some(service) = &self.service {
            service.answers_changed();
        }
    }

    /// Saves the table when answers changed since the last save. The table
    /// is copied under its lock and written outside it.
    pub fn save_if_changed(&self) {
        let copy = || {
            let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
            (table.changes() != self.saved_changes.load(Relaxed)).then(|| table.clone())
        };
        // The journal starts afresh with the copy: what it holds after is
        // newer than the table about to be written.
        let copy = match &self.journal {
            Some(journal) => match journal.rotate(copy) {
                Ok(copy) => copy,
                Err(e) => {
                    tracing::warn!("{e}");
                    return;
                }
            },
            None => copy(),
        };
        let Some(copy) = copy else { return };
        match save_table(&copy, &self.state_file) {
            Ok(()) => {
                self.saved_changes.store(copy.changes(), Relaxed);
                if let Some(journal) = &self.journal {
                    journal.saved();
                }
            }
            Err(e) => tracing::warn!(path = %self.state_file.display(), "saving the fake-address table: {e}"),
        }
    }

    /// Follows /etc/resolv.conf: a new file means a new set of the host's
    /// own servers and, when `dns.upstreams` is empty, new servers for our
    /// resolver. Cheap when nothing changed: one small read.
    pub fn follow_resolv_conf(&self) {
        let Some(service) = &self.service else { return };
        let mut last = self.resolv_conf.lock().unwrap_or_else(|e| e.into_inner());
        let now = read_resolv_conf();
        if *last == now {
            return;
        }
        *last = now;
        let mut configured = self.configured.lock().unwrap_or_else(|e| e.into_inner());
        let mut resolver_now = None;
        if self.follow_upstreams {
            match system_upstreams(self.port) {
                Ok(servers) => {
                    *configured = servers.iter().map(|s| s.socket_addr.ip()).collect();
                    tracing::info!(servers = ?*configured, "resolv.conf changed: resolving with its servers");
                    *self.upstreams.lock().unwrap_or_else(|e| e.into_inner()) =
                        servers.iter().map(ToString::to_string).collect();
                    resolver_now = Some(Resolving::new(servers, self.timeout));
                }
                Err(e) => tracing::warn!("resolv.conf changed, but {e}; keeping the servers in use"),
            }
        }
        let system = host_servers(&configured);
        self.publish_system(&system);
        service.set_upstreams(resolver_now, system);
    }

    fn publish_system(&self, system: &[IpAddr]) {
        if let Some(interception) = self
            .interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            interception.set_system_servers(system);
        }
    }

    pub fn shutdown(&self) {
        if let Some(interception) = self
            .interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            interception.disable();
        }
        self.save_if_changed();
    }

    fn enabled(&self) -> Option<PathBuf> {
        self.interception
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|i| i.scope())
    }

    /// `translated`: the flows the kernel's NAT rewrites now.
    pub fn status(&self, engine: &Engine, translated: usize) -> Option<DnsStatusView> {
        let cgroup = self.enabled()?;
        let (v4, v6, entries, capacity) = {
            let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
            let (v4, v6) = table.pools();
            (v4, v6, table.len(), table.capacity())
        };
        Some(DnsStatusView {
            listen: self.listen.clone(),
            cgroup,
            upstreams: self.upstreams.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            fake_v4: v4.to_string(),
            fake_v6: v6.to_string(),
            fake_entries: entries,
            fake_capacity: capacity,
            fake_flows: engine.fake_flows.load(Relaxed) as usize,
            kernel_nat_flows: translated,
            unknown_fake_packets: engine.counters.fake_unknown.load(Relaxed),
            counters: self.counters.view(),
        })
    }

    pub fn table(&self, routes: &Routes) -> DnsTableView {
        let now = unix_now();
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<FakeView> = table
            .entries()
            .map(|entry| FakeView {
                name: entry.name.clone(),
                fake: entry.fake.to_string(),
                real: entry.real.iter().map(ToString::to_string).collect(),
                carrier: name_carrier(routes, &entry.name),
                idle_secs: now.saturating_sub(entry.last_used),
                live_flows: entry.live_flows,
            })
            .collect();
        drop(table);
        entries.sort_by(|a, b| a.idle_secs.cmp(&b.idle_secs).then_with(|| a.name.cmp(&b.name)));
        DnsTableView {
            enabled: self.enabled().is_some(),
            entries,
        }
    }
}

/// The carrier new flows to a name take now: its rule's overlay, else the
/// underlay (no rule, or an overlay that cannot carry it).
fn name_carrier(routes: &Routes, name: &str) -> String {
    match routes
        .names
        .first_match(name)
        .map(|(_, carrier)| routes.resolve(carrier))
    {
        Some(RuleVia::Fixed(Via::Overlay(id))) => routes
            .overlays
            .get(id)
            .map_or_else(|| "underlay".into(), |o| o.name.clone()),
        Some(RuleVia::Monitor) => "monitor".into(),
        _ => "underlay".into(),
    }
}
