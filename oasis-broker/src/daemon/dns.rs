//! The daemon's DNS side: the fake-address table (loaded, saved), the DNS
//! listener, the kernel redirect, and the fake-address packet path.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oasis_common::DnsSettings;

use super::DaemonError;
use crate::config::{Config, DnsConfig};
use crate::control::{DnsStatusView, DnsTableView, FakeView};
use crate::dns::DnsCounters;
use crate::dns::cache::AnswerCache;
use crate::dns::server::{DnsService, listen, unix_now};
use crate::dns::upstream::{parse_upstream, resolver, system_upstreams};
use crate::fake::FakeTable;
use crate::fake_flows::choose_carrier;
use crate::names::NameRules;
use crate::overlay::OverlayTable;
use crate::platform::linux::datapath::Datapath;
use crate::platform::linux::dns_redirect::{DnsRedirect, default_cgroup, netns_cookie};
use crate::platform::linux::fake_path::FakePath;
use crate::platform::linux::forward::{Shared, snapshot};

/// Resolver cache entries (queries, not names).
const CACHE_ENTRIES: usize = 16_384;
/// Save the table at most this often while answers change.
const SAVE_EVERY: Duration = Duration::from_secs(2);

pub(super) struct DnsRuntime {
    pub fakes: Arc<Mutex<FakeTable>>,
    pub fake_path: Arc<FakePath>,
    pub counters: Arc<DnsCounters>,
    redirect: Option<DnsRedirect>,
    listen: Vec<String>,
    upstreams: Vec<String>,
    state_file: PathBuf,
    saved_changes: u64,
    last_save: Instant,
}

/// The table saved by the last run, when it fits the configured pools.
fn load_table(config: &DnsConfig) -> FakeTable {
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
    datapath: &mut Datapath,
    names: Shared<NameRules>,
) -> Result<DnsRuntime, DaemonError> {
    let dns = &config.dns;
    let fakes = Arc::new(Mutex::new(load_table(dns)));
    datapath.set_fake_pools(dns.fake_v4, dns.fake_v6)?;
    let nat = datapath
        .take_nat_maps()
        .ok_or_else(|| DaemonError::Dns("the NAT maps were taken twice".into()))?;
    let fake_path = Arc::new(FakePath::new(
        dns.fake_v4,
        dns.fake_v6,
        fakes.clone(),
        names.clone(),
        nat,
    ));
    let counters = Arc::new(DnsCounters::default());
    let saved_changes = fakes.lock().unwrap_or_else(|e| e.into_inner()).changes();
    let mut runtime = DnsRuntime {
        fakes: fakes.clone(),
        fake_path,
        counters: counters.clone(),
        redirect: None,
        listen: Vec::new(),
        upstreams: Vec::new(),
        state_file: dns.state_file.clone(),
        saved_changes,
        last_save: Instant::now(),
    };
    if !dns.enabled {
        tracing::info!("DNS interception is off (dns.enabled: false); name rules have no effect");
        return Ok(runtime);
    }

    let servers = if dns.upstreams.is_empty() {
        system_upstreams(dns.port).map_err(|e| DaemonError::Dns(e.to_string()))?
    } else {
        let mut servers = Vec::new();
        for text in &dns.upstreams {
            servers.extend(parse_upstream(text).map_err(|e| DaemonError::Dns(e.to_string()))?);
        }
        servers
    };
    runtime.upstreams = servers.iter().map(ToString::to_string).collect();
    let service = DnsService {
        resolver: resolver(
            servers,
            Duration::from_millis(dns.upstream_timeout_ms),
            CACHE_ENTRIES,
        ),
        names,
        fakes,
        counters,
        fake_ttl: dns.fake_ttl_secs,
        underlay: dns.underlay_answers,
        timeout: Duration::from_millis(dns.upstream_timeout_ms),
        cache: std::sync::Mutex::new(AnswerCache::new(CACHE_ENTRIES)),
    };
    let (mut server, v6) = listen(service, dns.port, true)
        .await
        .map_err(|e| DaemonError::Dns(format!("listening on 127.0.0.1:{} (dns.port): {e}", dns.port)))?;
    runtime.listen.push(format!("127.0.0.1:{}", dns.port));
    if v6 {
        runtime.listen.push(format!("[::1]:{}", dns.port));
    }
    tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            tracing::error!("the DNS listener stopped: {e}");
        }
    });

    let cgroup = match &dns.cgroup {
        Some(path) => path.clone(),
        None => match default_cgroup() {
            Ok(path) => path,
            // A host without cgroup v2 can still use header rules: run
            // without interception rather than not at all.
            Err(e) => {
                tracing::error!("DNS interception is off: {e}; name rules have no effect");
                return Ok(runtime);
            }
        },
    };
    let settings = DnsSettings {
        netns_cookie: netns_cookie()
            .map_err(|e| DaemonError::Dns(format!("reading the network namespace cookie: {e}")))?,
        broker_tgid: std::process::id(),
        port: dns.port,
        has_v6: u8::from(v6),
        _pad: 0,
    };
    runtime.redirect = Some(datapath.redirect_dns(&cgroup, settings)?);
    tracing::info!(cgroup = %cgroup.display(), listen = ?runtime.listen, upstreams = ?runtime.upstreams, "DNS interception on");
    Ok(runtime)
}

impl DnsRuntime {
    /// Periodic upkeep: ends idle fake-address flows, saves the table.
    pub fn maintain(&mut self, flow_idle: Duration) {
        self.fake_path.expire(flow_idle);
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.save_if_changed();
        }
    }

    fn save_if_changed(&mut self) {
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        if table.changes() == self.saved_changes {
            return;
        }
        match save_table(&table, &self.state_file) {
            Ok(()) => self.saved_changes = table.changes(),
            Err(e) => tracing::warn!(path = %self.state_file.display(), "saving the fake-address table: {e}"),
        }
        self.last_save = Instant::now();
    }

    pub fn shutdown(&mut self) {
        if let Some(redirect) = &mut self.redirect {
            redirect.disable();
        }
        self.save_if_changed();
    }

    pub fn status(&self) -> Option<DnsStatusView> {
        let redirect = self.redirect.as_ref()?;
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        let (v4, v6) = table.pools();
        let (fake_flows, kernel_nat_flows) = self.fake_path.flow_counts();
        Some(DnsStatusView {
            listen: self.listen.clone(),
            cgroup: redirect.cgroup.clone(),
            upstreams: self.upstreams.clone(),
            fake_v4: v4.to_string(),
            fake_v6: v6.to_string(),
            fake_entries: table.len(),
            fake_capacity: table.capacity(),
            fake_flows,
            kernel_nat_flows,
            unknown_fake_packets: self.fake_path.stats.unknown.load(Relaxed),
            counters: self.counters.view(),
        })
    }

    pub fn table(&self, names: &Shared<NameRules>, overlays: &Shared<OverlayTable>) -> DnsTableView {
        let names = snapshot(names);
        let overlays = snapshot(overlays);
        let now = unix_now();
        let table = self.fakes.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<FakeView> = table
            .entries()
            .map(|entry| FakeView {
                name: entry.name.clone(),
                fake: entry.fake.to_string(),
                real: entry.real.iter().map(ToString::to_string).collect(),
                carrier: choose_carrier(&entry.name, &names, |o| overlays.get(o).is_some()).to_string(),
                idle_secs: now.saturating_sub(entry.last_used),
                live_flows: entry.live_flows,
            })
            .collect();
        entries.sort_by(|a, b| a.idle_secs.cmp(&b.idle_secs).then_with(|| a.name.cmp(&b.name)));
        DnsTableView {
            enabled: self.redirect.is_some(),
            entries,
        }
    }
}
