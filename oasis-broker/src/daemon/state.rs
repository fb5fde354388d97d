//! The control plane: what requests do to the daemon's rules and overlays,
//! and what they read of it.
//!
//! Changes run one at a time (the `change` lock, which nothing else takes),
//! and do their slow work (checking a large import, compiling name rules,
//! fetching a specification, writing the config file) holding no lock that
//! the heartbeat, the packet threads or other requests need. The result is
//! swapped in whole: the packet threads and the DNS service pick it up on
//! their next batch or query.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::changes::{Checked, check_rules, rules_using, set_in_use};
use super::dns::DnsRuntime;
use super::lists::{self, ListStatuses};
use super::persist::{Persister, Snapshot};
use crate::compile::{CgroupIds, compile_for};
use crate::config::Config;
use crate::control::{
    FlowView, HeartbeatView, MapView, MonitorView, OverlayView, ProgramView, Progress, Request, Response,
    RuleView, SetUpload, StatusView, TunView, WireGuardPeerView, WireGuardView,
};
use crate::engine::{Engine, LocalAddresses, Routes, SharedTables};
use crate::names::NameRules;
use crate::overlay::StoredOverlay;
use crate::overlay::{JoinError, OverlayManager};
use crate::platform::{Heartbeat, Kernel};
use crate::prefix_set::PrefixSet;
use crate::rule_list::{ListContent, ListSource};
use crate::rules::{AnyRule, HeaderSubset, Rule, RuleError, RuleSet, RuleSpec};
use crate::sender::{cgroup_ids, host_cgroup_id};
use crate::shared::{Shared, snapshot};

pub(super) use super::errors::RequestError;

/// Reports how far a request has come; the connection handler sends it on.
#[derive(Clone)]
pub(super) struct Reporter(pub watch::Sender<Option<Progress>>);

impl Reporter {
    pub fn report(&self, stage: &str, done: u64, total: u64) {
        self.0.send_replace(Some(Progress {
            stage: stage.into(),
            done,
            total,
        }));
    }
}

/// Rules and overlays as they are now.
struct Control {
    rules: Arc<RuleSet>,
    names: Arc<NameRules>,
    overlays: OverlayManager,
}

pub(super) struct Daemon {
    pub config_path: PathBuf,
    /// The settings read at start (rules and overlays live in `control`).
    pub settings: Arc<Config>,
    control: Mutex<Control>,
    change: tokio::sync::Mutex<()>,
    kernel: Mutex<Box<dyn Kernel>>,
    heartbeat: Mutex<Box<dyn Heartbeat>>,
    pub engine: Arc<Engine>,
    /// The kernel's tables the engine's work goes to.
    tables: SharedTables,
    pub dns: DnsRuntime,
    /// What the Monitor thread last rendered of its state.
    monitor: Shared<MonitorView>,
    persister: Persister,
    pub tun: TunView,
    /// Packets each TUN queue's thread read.
    queue_reads: Arc<[std::sync::atomic::AtomicU64]>,
    diverted: DivertedCounts,
    own_addresses: OwnAddresses,
    path_mtu: PathMtu,
    /// The ids of the rules' cgroups the kernel's maps hold.
    cgroup_ids: Mutex<CgroupIds>,
    /// How current each list rule's list is.
    lists: Mutex<ListStatuses>,
    /// This host's sockets: flows the user ends are closed there.
    pub sockets: Arc<dyn crate::platform::SocketLookup>,
    /// The last listing of flows, and when it was made.
    recent_flows: tokio::sync::Mutex<Option<(Instant, Arc<Vec<FlowView>>)>>,
    /// The REST API's page and secret, once it is up.
    pub api: std::sync::OnceLock<(String, Option<String>)>,
    started: Instant,
}

/// Everything a daemon starts with.
pub(super) struct Parts {
    pub config_path: PathBuf,
    pub settings: Arc<Config>,
    pub rules: RuleSet,
    pub names: Arc<NameRules>,
    pub overlays: OverlayManager,
    pub kernel: Box<dyn Kernel>,
    pub heartbeat: Box<dyn Heartbeat>,
    pub engine: Arc<Engine>,
    pub tables: SharedTables,
    pub dns: DnsRuntime,
    pub monitor: Shared<MonitorView>,
    pub persister: Persister,
    pub tun: TunView,
    pub queue_reads: Arc<[std::sync::atomic::AtomicU64]>,
    pub diverted: DivertedCounts,
    pub own_addresses: OwnAddresses,
    pub path_mtu: PathMtu,
    pub sockets: Arc<dyn crate::platform::SocketLookup>,
}

/// Packets and bytes the OS handed to the divert device (by name).
pub(super) type DivertedCounts = Box<dyn Fn(&str) -> (u64, u64) + Send + Sync>;

/// This host's addresses now (no overlay's entry node may be one).
pub(super) type OwnAddresses = Box<dyn Fn(&mut LocalAddresses) + Send + Sync>;

/// The path MTU toward an address, as the OS knows it now.
pub(super) type PathMtu = Box<dyn Fn(std::net::SocketAddr) -> Option<u16> + Send + Sync>;

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs slow work off the async runtime's threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, RequestError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| RequestError::Internal(e.to_string()))
}

impl Daemon {
    pub fn new(parts: Parts) -> Daemon {
        // As `start` compiled them for the kernel a moment ago.
        let ids = cgroup_ids(parts.rules.rules(), host_cgroup_id);
        let lists = parts
            .rules
            .lists()
            .map(|(id, source, file, _)| (id, super::lists::kept_status(&parts.config_path, source, file)))
            .collect();
        Daemon {
            config_path: parts.config_path,
            settings: parts.settings,
            control: Mutex::new(Control {
                rules: Arc::new(parts.rules),
                names: parts.names,
                overlays: parts.overlays,
            }),
            change: tokio::sync::Mutex::new(()),
            kernel: Mutex::new(parts.kernel),
            heartbeat: Mutex::new(parts.heartbeat),
            engine: parts.engine,
            tables: parts.tables,
            dns: parts.dns,
            monitor: parts.monitor,
            persister: parts.persister,
            tun: parts.tun,
            queue_reads: parts.queue_reads,
            diverted: parts.diverted,
            own_addresses: parts.own_addresses,
            path_mtu: parts.path_mtu,
            cgroup_ids: Mutex::new(ids),
            lists: Mutex::new(lists),
            sockets: parts.sockets,
            api: std::sync::OnceLock::new(),
            recent_flows: tokio::sync::Mutex::new(None),
            started: Instant::now(),
        }
    }

    /// The rules in effect.
    pub fn rules(&self) -> Arc<RuleSet> {
        lock(&self.control).rules.clone()
    }

    pub async fn handle(self: Arc<Self>, request: Request, reporter: Reporter) -> Response {
        let result = match request {
            Request::AddRule { spec, dst_set } => {
                self.add_rule(*spec, dst_set, &reporter).await.map(|added| {
                    let kernel = lock(&self.kernel);
                    Response::Rule {
                        rule: self.rule_view(kernel.as_ref(), &added[0]),
                    }
                })
            }
            // An import answers with its count and ids only: a view of each
            // of a million rules would be a reply of a hundred megabytes.
            Request::ImportRules { specs } => {
                let specs = specs.into_iter().map(|spec| (spec, None)).collect();
                self.add_rules(specs, true, &reporter)
                    .await
                    .map(|added| Response::Imported {
                        count: added.len(),
                        first: added.first().map(AnyRule::id),
                        last: added.last().map(AnyRule::id),
                    })
            }
            Request::DelRule { id } => self
                .del_rule(id, &reporter)
                .await
                .map(|rule| Response::Rule { rule }),
            Request::ListRules => Ok(Response::Rules {
                rules: self.rule_views(),
            }),
            Request::RefreshLists { id } => self.refresh_lists(id, &reporter).await.map(|ids| {
                let kernel = lock(&self.kernel);
                let rules = lock(&self.control).rules.clone();
                Response::Rules {
                    rules: ids
                        .iter()
                        .filter_map(|&id| rules.get(id))
                        .map(|r| self.rule_view(kernel.as_ref(), &r))
                        .collect(),
                }
            }),
            Request::Status => Ok(Response::Status {
                status: Box::new(self.status()),
            }),
            Request::Dns => Ok(Response::Dns {
                dns: Box::new(self.dns.table(&self.engine.routes())),
            }),
            Request::OverlayAdd {
                name,
                url,
                token,
                module_file,
                pinned,
                wireguard,
            } => self
                .join_overlay(name, url, (token, pinned), (module_file, wireguard), &reporter)
                .await
                .map(|overlay| Response::Overlay {
                    overlay: Box::new(overlay),
                }),
            Request::OverlayList => Ok(Response::Overlays {
                overlays: self.overlay_views(None),
            }),
            Request::OverlayShow { name } => self
                .overlay_views(Some(&name))
                .pop()
                .map(|overlay| Response::Overlay {
                    overlay: Box::new(overlay),
                })
                .ok_or_else(|| JoinError::Unknown(name).into()),
            Request::Monitor => Ok(Response::Monitor {
                monitor: Box::new((*snapshot(&self.monitor)).clone()),
            }),
            Request::Flows { max_age_ms } => {
                let max_age = Duration::from_millis(max_age_ms.unwrap_or(0));
                self.flows_within(max_age).await.map(|flows| Response::Flows {
                    flows: flows.as_ref().clone(),
                })
            }
            Request::Pin { rule, carrier } => self
                .pin(rule, carrier)
                .await
                .map(|message| Response::Done { message }),
            Request::Api => Ok(match self.api.get() {
                Some((url, secret)) => Response::Api {
                    url: Some(url.clone()),
                    secret: secret.clone(),
                },
                None => Response::Api {
                    url: None,
                    secret: None,
                },
            }),
            Request::FlushFakes => self.flush_fakes().map(|message| Response::Done { message }),
            Request::EndFlows { ids } => self.end_flows(ids).await.map(|ended| Response::Done {
                message: ended.message(),
            }),
            Request::Fault { name } => fault(&name).map(|message| Response::Done { message }),
            Request::OverlayDel { name } => {
                self.leave_overlay(&name, &reporter)
                    .await
                    .map(|overlay| Response::Overlay {
                        overlay: Box::new(overlay),
                    })
            }
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    /// Every live flow, as the packet threads hold them: each answers at
    /// its next tick.
    pub(super) async fn flows(&self) -> Result<Vec<FlowView>, RequestError> {
        let generation = self.engine.ask_flows();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(records) = self.engine.flow_dump(generation) {
                let overlays = lock(&self.control).overlays.table().clone();
                let sockets: Vec<_> = records.iter().map(super::views::flow_socket).collect();
                let senders = lock(&self.kernel).senders(&sockets);
                let mut flows: Vec<FlowView> = records
                    .iter()
                    .zip(senders)
                    .map(|(record, sender)| super::views::flow_view(record, &overlays, sender))
                    .collect();
                flows.sort_by(|a, b| a.flow.cmp(&b.flow));
                return Ok(flows);
            }
            if Instant::now() > deadline {
                return Err(RequestError::Internal(
                    "a packet thread did not answer within 2 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The live flows, from a listing at most `max_age` old: callers at
    /// the same time share one listing rather than each asking the packet
    /// threads (who answer at their next tick) and every socket's owner.
    pub(super) async fn flows_within(&self, max_age: Duration) -> Result<Arc<Vec<FlowView>>, RequestError> {
        let mut recent = self.recent_flows.lock().await;
        if let Some((at, flows)) = recent.as_ref()
            && at.elapsed() <= max_age
        {
            return Ok(flows.clone());
        }
        let flows = Arc::new(self.flows().await?);
        *recent = Some((Instant::now(), flows.clone()));
        Ok(flows)
    }

    /// Waits for the change lock, saying so when another change holds it.
    async fn change(&self, reporter: &Reporter) -> tokio::sync::MutexGuard<'_, ()> {
        match self.change.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                reporter.report("waiting for another change to finish", 0, 0);
                self.change.lock().await
            }
        }
    }

    fn rule_view(&self, kernel: &dyn Kernel, rule: &AnyRule) -> RuleView {
        let (counters, answers) = match rule {
            AnyRule::Header(rule) => (kernel.rule_counters(rule.id), None),
            AnyRule::Name(rule) => (Default::default(), Some(self.dns.counters.answers_for(rule.id))),
        };
        let list = rule.list().map(|(source, file, entries)| {
            let status = lock(&self.lists).get(&rule.id()).cloned().unwrap_or_default();
            Box::new(status.view(source, file, entries, std::time::SystemTime::now()))
        });
        // A metric rule's carriers as the Monitor may choose them now.
        let routes = self.engine.routes();
        let candidates = routes.monitored(rule.id()).map(|route| {
            let mut names = vec!["underlay".to_string()];
            names.extend(
                route
                    .candidates
                    .iter()
                    .filter_map(|id| routes.overlays.get(*id).map(|o| o.name.clone())),
            );
            names
        });
        RuleView {
            id: rule.id(),
            subset: rule.subset_text(),
            via: rule.via().to_string(),
            name_rule: matches!(rule, AnyRule::Name(_)),
            packets: counters.packets,
            bytes: counters.bytes,
            answers,
            list,
            candidates,
        }
    }

    fn rule_views(&self) -> Vec<RuleView> {
        let rules = lock(&self.control).rules.clone();
        let kernel = lock(&self.kernel);
        rules
            .all()
            .iter()
            .map(|r| self.rule_view(kernel.as_ref(), r))
            .collect()
    }

    /// Adds one rule; a `--dst-set` rule comes with its prefixes, which
    /// are checked and kept beside the config file first.
    async fn add_rule(
        self: &Arc<Self>,
        mut spec: RuleSpec,
        upload: Option<SetUpload>,
        reporter: &Reporter,
    ) -> Result<Vec<AnyRule>, RequestError> {
        if let Some(source) = spec.list_source().map_err(RequestError::Rule)? {
            return self.add_list_rule(spec, source, reporter).await;
        }
        let Some(upload) = upload else {
            return self.add_rules(vec![(spec, None)], false, reporter).await;
        };
        reporter.report("reading the prefix set", 0, 0);
        let config_path = self.config_path.clone();
        let set = blocking(move || -> Result<_, RequestError> {
            let set = PrefixSet::parse(&upload.name, &upload.text).map_err(RuleError::from)?;
            Ok(Arc::new(super::sets::keep(&config_path, &upload, set)?))
        })
        .await??;
        spec.dst_set = Some(set.file().to_string());
        let file = set.file().to_string();
        let added = self
            .add_rules(vec![(spec, Some(ListContent::Prefixes(set)))], false, reporter)
            .await;
        if added.is_err() {
            super::sets::forget(&self.config_path, &file);
        }
        added
    }

    /// Adds a list rule: the list is downloaded and checked first (no lock
    /// held meanwhile); when that fails, nothing changes.
    async fn add_list_rule(
        self: &Arc<Self>,
        mut spec: RuleSpec,
        source: ListSource,
        reporter: &Reporter,
    ) -> Result<Vec<AnyRule>, RequestError> {
        // Known before the download, so a typo costs no download.
        spec.parse_content(Some(placeholder(&source)))
            .map_err(RequestError::Rule)?;
        let file = lists::file_for(&source);
        let existing = lock(&self.control)
            .rules
            .lists()
            .find(|(_, _, kept, _)| *kept == file)
            .map(|(id, ..)| id);
        if let Some(existing) = existing {
            return Err(RequestError::Rule(RuleError::Duplicate {
                existing,
                subset: format!("list {}", source.url),
            }));
        }
        reporter.report(&format!("downloading {}", source.url), 0, 0);
        let (refreshed, validators) = lists::download(&source, &file, &Default::default())
            .await
            .map_err(|e| RequestError::List(e.to_string()))?;
        let lists::Refreshed::Changed { content, text, .. } = refreshed else {
            return Err(RequestError::List(format!(
                "{}: the server answered 304 to a first download",
                source.url
            )));
        };
        let now = std::time::SystemTime::now();
        lists::keep(
            &self.config_path,
            &file,
            Some(&text),
            &source.url,
            &validators,
            now,
        )
        .map_err(|e| RequestError::List(format!("keeping {file}: {e}")))?;
        spec.list_file = Some(file.clone());
        let added = self.add_rules(vec![(spec, Some(content))], false, reporter).await;
        match &added {
            Ok(rules) => {
                let status = lists::ListStatus {
                    fetched: Some(now),
                    checked: Some(now),
                    validators,
                    error: None,
                    last_change_ms: None,
                };
                lock(&self.lists).insert(rules[0].id(), status);
            }
            Err(_) => lists::forget(&self.config_path, &file),
        }
        added
    }

    /// Fetches the lists of list rule `id` (or of every list rule) now,
    /// whether due or not; their ids.
    async fn refresh_lists(
        self: &Arc<Self>,
        id: Option<u32>,
        reporter: &Reporter,
    ) -> Result<Vec<u32>, RequestError> {
        let rules = lock(&self.control).rules.clone();
        let ids: Vec<u32> = rules
            .lists()
            .map(|(list_id, ..)| list_id)
            .filter(|list_id| id.is_none_or(|id| id == *list_id))
            .collect();
        if let Some(id) = id
            && ids.is_empty()
        {
            return Err(RequestError::Rule(RuleError::NotAList(id)));
        }
        for (done, &id) in ids.iter().enumerate() {
            reporter.report("fetching lists", done as u64, ids.len() as u64);
            self.refresh_list(id).await;
        }
        Ok(ids)
    }

    /// Fetches every list that is due.
    pub async fn refresh_due_lists(self: &Arc<Self>) {
        let now = std::time::SystemTime::now();
        let due: Vec<u32> = {
            let rules = lock(&self.control).rules.clone();
            let statuses = lock(&self.lists);
            rules
                .lists()
                .filter(|(id, source, ..)| {
                    statuses
                        .get(id)
                        .cloned()
                        .unwrap_or_default()
                        .due(source.every, now)
                })
                .map(|(id, ..)| id)
                .collect()
        };
        for id in due {
            self.refresh_list(id).await;
        }
    }

    /// One list's refresh: unchanged (a 304) costs nothing more; a new
    /// copy is checked, kept, and swapped into the rule in one commit; a
    /// failure leaves the last good copy in effect and says why.
    async fn refresh_list(self: &Arc<Self>, id: u32) {
        let Some((source, file)) = lock(&self.control)
            .rules
            .lists()
            .find(|(list_id, ..)| *list_id == id)
            .map(|(_, source, file, _)| (source.clone(), file.to_string()))
        else {
            return;
        };
        let since = lock(&self.lists)
            .get(&id)
            .map(|s| s.validators.clone())
            .unwrap_or_default();
        let mut took = None;
        let outcome = match lists::download(&source, &file, &since).await {
            Ok((lists::Refreshed::Unchanged, validators)) => Ok((None, validators)),
            Ok((
                lists::Refreshed::Changed {
                    content,
                    text,
                    received,
                },
                validators,
            )) => {
                let swapped = self.swap_list(id, content).await;
                took = Some(received.elapsed().as_millis() as u64);
                swapped.map(|()| (Some(text), validators))
            }
            Err(e) => Err(e.to_string()),
        };
        let now = std::time::SystemTime::now();
        let outcome = outcome.and_then(|(text, validators)| {
            lists::keep(
                &self.config_path,
                &file,
                text.as_deref(),
                &source.url,
                &validators,
                now,
            )
            .map_err(|e| format!("keeping {file}: {e}"))
            .map(|()| (text.is_some(), validators))
        });
        // A rule deleted meanwhile has no status to keep.
        let rules = lock(&self.control).rules.clone();
        if !rules.lists().any(|(list_id, ..)| list_id == id) {
            return;
        }
        let mut statuses = lock(&self.lists);
        let status = statuses.entry(id).or_default();
        status.checked = Some(now);
        match outcome {
            Ok((changed, validators)) => {
                tracing::info!(id, url = %source.url, changed, in_effect_ms = ?took, "list refreshed");
                if took.is_some() {
                    status.last_change_ms = took;
                }
                status.fetched = Some(now);
                status.validators = validators;
                status.error = None;
            }
            Err(error) => {
                tracing::warn!(id, url = %source.url, "list refresh failed; the last good copy stays in effect: {error}");
                status.error = Some(error);
            }
        }
    }

    /// Puts a list's new entries into its rule, under the change lock.
    async fn swap_list(self: &Arc<Self>, id: u32, content: ListContent) -> Result<(), String> {
        let names = matches!(content, ListContent::Names(_));
        let _change = self.change.lock().await;
        let rules = lock(&self.control).rules.clone();
        let next = blocking(move || {
            let mut next = (*rules).clone();
            next.replace_list(id, content).map(|()| next)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let reporter = Reporter(tokio::sync::watch::channel(None).0);
        self.commit(next, names, &reporter)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Adds rules in one step (one compile, one file write): all of them,
    /// or none when any is bad.
    async fn add_rules(
        self: &Arc<Self>,
        specs: Vec<(RuleSpec, Option<ListContent>)>,
        import: bool,
        reporter: &Reporter,
    ) -> Result<Vec<AnyRule>, RequestError> {
        let change = self.change(reporter).await;
        let started = Instant::now();
        let (rules, joined): (Arc<RuleSet>, Vec<StoredOverlay>) = {
            let control = lock(&self.control);
            let joined = control.overlays.stored().to_vec();
            (control.rules.clone(), joined)
        };
        let progress = reporter.clone();
        let Checked {
            next,
            added,
            names_changed,
        } = blocking(move || {
            check_rules(&rules, specs, &joined, import, |done, total| {
                progress.report("checking rules", done, total)
            })
        })
        .await??;
        let names_an_app =
            |rule: &AnyRule| matches!(rule, AnyRule::Header(r) if r.subset.sender.app.is_some());
        if added.iter().any(names_an_app) && !self.dns.intercepting() {
            return Err(RequestError::Rule(RuleError::AppWithoutHooks));
        }
        if names_changed {
            let uncovered = self.dns.uncovered();
            if !uncovered.is_empty() {
                return Err(RequestError::Uncovered(uncovered.join("; ")));
            }
        }
        let checked = started.elapsed();
        let saved = self.commit(next, names_changed, reporter).await?;
        let committed = started.elapsed();
        drop(change);
        self.wait_saved(saved, reporter).await?;
        match added.as_slice() {
            [one] => {
                tracing::info!(id = one.id(), subset = %one.subset_text(), via = %one.via(), "rule added")
            }
            many => tracing::info!(
                count = many.len(),
                checked_ms = checked.as_millis() as u64,
                in_effect_ms = committed.as_millis() as u64,
                saved_ms = started.elapsed().as_millis() as u64,
                "rules imported"
            ),
        }
        Ok(added)
    }

    async fn del_rule(self: &Arc<Self>, id: u32, reporter: &Reporter) -> Result<RuleView, RequestError> {
        let change = self.change(reporter).await;
        let rules = lock(&self.control).rules.clone();
        let (next, rule) = blocking(move || {
            let mut next = (*rules).clone();
            next.remove(id).map(|rule| (next, rule))
        })
        .await??;
        let view = self.rule_view(lock(&self.kernel).as_ref(), &rule);
        let saved = self
            .commit(next, matches!(rule, AnyRule::Name(_)), reporter)
            .await?;
        drop(change);
        self.wait_saved(saved, reporter).await?;
        tracing::info!(id, subset = %rule.subset_text(), "rule deleted");
        if let AnyRule::Header(Rule {
            subset: HeaderSubset {
                dst_set: Some(set), ..
            },
            ..
        }) = &rule
        {
            let rules = lock(&self.control).rules.clone();
            if !set_in_use(&rules, set.file()) {
                super::sets::forget(&self.config_path, set.file());
            }
        }
        if let Some((_, file, _)) = rule.list() {
            lock(&self.lists).remove(&id);
            super::lists::forget(&self.config_path, file);
        }
        Ok(view)
    }

    /// Makes `next` the rule list: the kernel's maps first (when that
    /// fails, nothing changes), then the routes every packet thread and
    /// the DNS service read; then hands it to the config writer and returns
    /// the generation to wait for once the change lock is let go.
    async fn commit(
        self: &Arc<Self>,
        next: RuleSet,
        names_changed: bool,
        reporter: &Reporter,
    ) -> Result<u64, RequestError> {
        let next = Arc::new(next);
        let names = if names_changed {
            let rules = next.clone();
            let count = rules.names().len() as u64;
            reporter.report("compiling name rules", 0, count);
            Arc::new(
                blocking(move || NameRules::compile(rules.names()))
                    .await?
                    .map_err(RuleError::from)?,
            )
        } else {
            lock(&self.control).names.clone()
        };
        // A prefix set makes a compile and a map update of 100,000s of
        // entries: off the async threads.
        reporter.report("loading the classifier's maps", 0, 0);
        let daemon = self.clone();
        let rules = next.clone();
        blocking(move || {
            let ids = cgroup_ids(rules.rules(), host_cgroup_id);
            let image = compile_for(rules.rules(), &ids);
            let mut kernel = lock(&daemon.kernel);
            let mut applied = lock(&daemon.cgroup_ids);
            kernel.apply(&image).map_err(|e| {
                let before = compile_for(lock(&daemon.control).rules.rules(), &applied);
                let _ = kernel.apply(&before);
                RequestError::Kernel(e)
            })?;
            *applied = ids;
            Ok::<_, RequestError>(())
        })
        .await??;
        let overlays = {
            let mut control = lock(&self.control);
            control.rules = next.clone();
            control.names = names.clone();
            control.overlays.table().clone()
        };
        self.engine.publish(Routes::with_names(
            next.rules(),
            next.names(),
            names.clone(),
            overlays,
        ));
        if names_changed {
            self.dns.publish_names(names);
        }
        Ok(self.save())
    }

    /// Brings the kernel's maps to the ids the rules' cgroups have now: a
    /// unit restarted (its cgroup made anew, with a new id), a scope that
    /// appeared. Cheap while nothing changed (a stat per named cgroup).
    pub async fn refresh_cgroups(self: &Arc<Self>) -> Result<(), RequestError> {
        let changed = |daemon: &Daemon| {
            let rules = lock(&daemon.control).rules.clone();
            let ids = cgroup_ids(rules.rules(), host_cgroup_id);
            (ids != *lock(&daemon.cgroup_ids)).then_some((rules, ids))
        };
        if changed(self).is_none() {
            return Ok(());
        }
        // Under the change lock, so a rule change cannot come between.
        let _change = self.change.lock().await;
        let Some((rules, ids)) = changed(self) else {
            return Ok(());
        };
        let daemon = self.clone();
        blocking(move || {
            let image = compile_for(rules.rules(), &ids);
            let mut kernel = lock(&daemon.kernel);
            kernel.apply(&image).map_err(RequestError::Kernel)?;
            tracing::info!(cgroups = ?ids, "the rules' cgroups have new ids; the classifier follows");
            *lock(&daemon.cgroup_ids) = ids;
            Ok::<_, RequestError>(())
        })
        .await?
    }

    /// Hands the current rules and overlays to the config writer; the
    /// generation to wait for.
    fn save(&self) -> u64 {
        let snapshot = {
            let control = lock(&self.control);
            Snapshot {
                settings: self.settings.clone(),
                rules: control.rules.clone(),
                overlays: control.overlays.stored().to_vec(),
            }
        };
        self.persister.save(snapshot)
    }

    /// Waits for a write of the config file, holding no lock: changes that
    /// come meanwhile share the next write.
    async fn wait_saved(&self, generation: u64, reporter: &Reporter) -> Result<(), RequestError> {
        reporter.report("writing the config file", 0, 0);
        let persister = self.persister.clone();
        blocking(move || persister.wait(generation))
            .await?
            .map_err(RequestError::NotSaved)
    }

    /// Publishes routes for the current rules over the manager's overlays.
    pub fn publish_overlays(&self) {
        let (rules, names, overlays) = {
            let control = lock(&self.control);
            (
                control.rules.clone(),
                control.names.clone(),
                control.overlays.table().clone(),
            )
        };
        self.engine
            .publish(Routes::with_names(rules.rules(), rules.names(), names, overlays));
    }

    async fn join_overlay(
        self: &Arc<Self>,
        name: String,
        url: String,
        (token, pinned): (Option<String>, bool),
        (module_file, wireguard): (
            Option<crate::control::ModuleUpload>,
            Option<crate::control::WireGuardUpload>,
        ),
        reporter: &Reporter,
    ) -> Result<OverlayView, RequestError> {
        crate::overlay::check_name(&name)?;
        let module_file = match module_file {
            Some(upload) => Some((
                upload.name,
                hex::decode(&upload.hex)
                    .map_err(|e| RequestError::Internal(format!("the module's bytes: {e}")))?,
            )),
            None => None,
        };
        if lock(&self.control).overlays.is_joined(&name) {
            return Err(JoinError::Exists(name).into());
        }
        // The fetch takes time: no lock, not even the change lock.
        let mut own = LocalAddresses::default();
        (self.own_addresses)(&mut own);
        let modules = lock(&self.control).overlays.modules();
        let keys = crate::overlay::wireguard::key_dir(&self.config_path);
        let options = crate::overlay::JoinOptions {
            token,
            module_file,
            pinned,
            wireguard: wireguard.map(|w| (w.name, w.text, keys.clone())),
            keys,
        };
        let stage = |stage: &str| reporter.report(stage, 0, 0);
        let prepared = OverlayManager::prepare(name.clone(), url, options, own, modules, &stage).await?;
        let change = self.change(reporter).await;
        {
            let mut control = lock(&self.control);
            let stored = control.overlays.join(prepared)?;
            tracing::info!(name = %stored.name, url = %stored.url, entries = ?stored.spec.entries, "overlay joined");
        }
        self.publish_overlays();
        let saved = self.save();
        drop(change);
        self.wait_saved(saved, reporter).await?;
        self.overlay_views(Some(&name))
            .pop()
            .ok_or_else(|| RequestError::Internal("the overlay vanished".into()))
    }

    async fn leave_overlay(
        self: &Arc<Self>,
        name: &str,
        reporter: &Reporter,
    ) -> Result<OverlayView, RequestError> {
        let change = self.change(reporter).await;
        let view = self
            .overlay_views(Some(name))
            .pop()
            .ok_or_else(|| JoinError::Unknown(name.into()))?;
        let (peers, left) = {
            let mut control = lock(&self.control);
            let rules = rules_using(&control.rules, name);
            let peers = control
                .overlays
                .table()
                .by_name(name)
                .map(|o| o.path.peers().to_vec())
                .unwrap_or_default();
            let left = control.overlays.leave(name, rules)?;
            (peers, left)
        };
        self.publish_overlays();
        // Its flows the kernel wraps come back to the broker, which ends
        // them, from their next packet on.
        {
            let mut tables = self.tables.lock();
            for peer in peers {
                tables.encap.forget_peer(peer);
            }
        }
        let saved = self.save();
        drop(change);
        self.wait_saved(saved, reporter).await?;
        // A WireGuard overlay's keys go with it, once the config no longer
        // names them.
        if let Some(keys) = &left.wireguard
            && keys.starts_with(crate::overlay::wireguard::key_dir(&self.config_path))
            && let Err(e) = std::fs::remove_file(keys)
        {
            tracing::warn!(path = %keys.display(), "removing the left overlay's WireGuard keys: {e}");
        }
        if view.live_flows > 0 {
            tracing::info!(%name, live_flows = view.live_flows, "overlay left; its live flows get a reset (TCP) or an ICMP unreachable on their next packet");
        } else {
            tracing::info!(%name, "overlay left");
        }
        Ok(view)
    }

    /// Reads the path MTU toward every overlay's entry nodes: the route's,
    /// or what path MTU discovery learnt since (a router's "fragmentation
    /// needed" about our overlay datagrams). New flows are clamped to it.
    fn follow_path_mtus(&self) {
        let table = lock(&self.control).overlays.table().clone();
        for overlay in table.iter() {
            let smallest = overlay
                .path
                .peers()
                .iter()
                .filter_map(|peer| (self.path_mtu)(*peer))
                .min()
                .unwrap_or(0);
            let before = overlay.path_mtu.swap(smallest, Relaxed);
            if before != smallest && smallest != 0 {
                tracing::info!(overlay = %overlay.name, path_mtu = smallest, "path MTU toward the entry nodes; new flows are clamped to it");
                // Live flows the kernel wraps send what no longer fits to
                // the broker, which tells their senders the MTU.
                let mut tables = self.tables.lock();
                for peer in overlay.path.peers() {
                    tables.encap.narrow(*peer, smallest);
                }
            }
        }
    }

    fn overlay_views(&self, only: Option<&str>) -> Vec<OverlayView> {
        let control = lock(&self.control);
        let table = control.overlays.table();
        control
            .overlays
            .stored()
            .iter()
            .filter(|o| only.is_none_or(|name| o.name == name))
            .map(|stored| {
                let mut view = overlay_view(
                    stored,
                    table.by_name(&stored.name).map(Arc::as_ref),
                    &control.rules,
                );
                view.module_status = control.overlays.module_status(&stored.name);
                view
            })
            .collect()
    }

    /// The uplinks the classifier is attached to, by name.
    pub fn status_uplinks(&self) -> Vec<String> {
        lock(&self.kernel)
            .attached()
            .into_iter()
            .map(|u| u.name)
            .collect()
    }

    /// The DNS service's port, while it intercepts.
    pub fn dns_port(&self) -> Option<u16> {
        self.dns.intercepting().then_some(self.settings.dns.port)
    }

    pub fn status(&self) -> StatusView {
        let (diverted_packets, diverted_bytes) = (self.diverted)(&self.tun.name);
        let (age, map_id) = {
            let heartbeat = lock(&self.heartbeat);
            (heartbeat.age(), heartbeat.kernel_id())
        };
        let timeout = Duration::from_millis(self.settings.heartbeat_timeout_ms);
        let (rules, overlays) = {
            let control = lock(&self.control);
            (control.rules.len(), control.overlays.stored().len())
        };
        let (uplinks, classifier, programs) = {
            let kernel = lock(&self.kernel);
            (kernel.attached(), kernel.counters(), kernel.programs())
        };
        let (config_saved, config_error) = self.persister.state();
        StatusView {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            config_path: self.config_path.clone(),
            uplinks,
            tun: TunView {
                diverted_packets,
                diverted_bytes,
                read_per_queue: self.queue_reads.iter().map(|n| n.load(Relaxed)).collect(),
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
                map_id,
            },
            classifier,
            broker: super::views::broker_counters(&self.engine.counters),
            rules,
            overlays,
            overlay_port: self.settings.overlay_port,
            underlay_port: self.settings.underlay_port,
            fast_path: self.engine.settings.fast_path,
            fast_path_flows: self.tables.encapsulated(),
            programs,
            config_saved,
            config_error,
            dns: self.dns.status(&self.engine, self.tables.translated()),
            monitor: {
                let view = snapshot(&self.monitor);
                (view.rules > 0).then(|| view.summary(self.tables.measured()))
            },
            lists: self.list_views(),
        }
    }

    /// Each list rule's list, as `status` shows them.
    fn list_views(&self) -> Vec<(u32, crate::control::ListView)> {
        let rules = lock(&self.control).rules.clone();
        let statuses = lock(&self.lists);
        let now = std::time::SystemTime::now();
        rules
            .lists()
            .map(|(id, source, file, entries)| {
                let status = statuses.get(&id).cloned().unwrap_or_default();
                (id, status.view(source, file, entries, now))
            })
            .collect()
    }

    /// At shutdown: stop redirecting DNS, detach the classifier, let the
    /// last config write land.
    pub fn shutdown(&self) {
        self.dns.shutdown();
        lock(&self.kernel).detach_all();
        if !self.persister.flush(Duration::from_secs(10)) {
            tracing::error!("the config file was still being written at shutdown");
        }
    }

    /// Periodic work of the control plane: saving the fake-address table.
    pub fn upkeep(&self) {
        self.dns.save_if_changed();
        self.dns.follow_resolv_conf();
        self.follow_path_mtus();
    }
}

/// A fault injected for the tests, when the daemon was started to take
/// them (`OASIS_FAULTS=1`).
fn fault(name: &str) -> Result<String, RequestError> {
    if std::env::var_os("OASIS_FAULTS").is_none_or(|v| v != "1") {
        return Err(RequestError::Internal(
            "faults are injected only into a daemon started with OASIS_FAULTS=1 (for tests)".into(),
        ));
    }
    match name {
        "dns-hang" => {
            crate::dns::udp::HANG.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok("the DNS threads hang from their next query or tick".into())
        }
        other => Err(RequestError::Internal(format!(
            "no fault called {other}; there is dns-hang"
        ))),
    }
}

fn overlay_view(
    stored: &StoredOverlay,
    joined: Option<&crate::overlay::JoinedOverlay>,
    rules: &RuleSet,
) -> OverlayView {
    OverlayView {
        name: stored.name.clone(),
        url: stored.url.clone(),
        spec_name: stored.spec.name.clone(),
        description: stored.spec.description.clone(),
        entries: stored.spec.entries.clone(),
        resolved: joined
            .map(|j| j.path.peers().iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        shim_len: stored.spec.shim_len,
        token: stored.token.is_some(),
        module: stored.spec.module.clone(),
        rules: rules_using(rules, &stored.name),
        packets_sent: joined.map(|j| j.sent.load(Relaxed)).unwrap_or(0),
        packets_received: joined.map(|j| j.received.load(Relaxed)).unwrap_or(0),
        live_flows: joined.map(|j| j.flows.load(Relaxed)).unwrap_or(0),
        path_mtu: joined.map(|j| j.path_mtu.load(Relaxed)).filter(|m| *m != 0),
        pinned: stored.pinned,
        module_status: None,
        wireguard: joined
            .and_then(|j| j.wireguard.as_deref())
            .map(|link| wireguard_view(stored, link)),
    }
}

fn wireguard_view(stored: &StoredOverlay, link: &crate::overlay::wireguard::WireGuardLink) -> WireGuardView {
    let peers = link
        .peers
        .iter()
        .map(|peer| {
            let status = peer.tunnel.status();
            WireGuardPeerView {
                public_key: peer.tunnel.peer().to_string(),
                endpoint: peer.endpoint.to_string(),
                allowed_ips: peer.allowed.iter().map(ToString::to_string).collect(),
                up: status.health.carries(),
                state: status.health.to_string(),
                last_handshake_secs: status.last_handshake.map(|d| d.as_secs()),
                handshakes: status.handshakes,
                tx_bytes: status.tx_bytes,
                rx_bytes: status.rx_bytes,
                rejected: status.rejected,
            }
        })
        .collect();
    WireGuardView {
        public_key: link.own_public.to_string(),
        tunnel_addresses: [
            link.tunnel_v4.map(std::net::IpAddr::V4),
            link.tunnel_v6.map(std::net::IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .map(|a| a.to_string())
        .collect(),
        dns: link.dns.iter().map(ToString::to_string).collect(),
        mtu: link.mtu,
        key_file: stored
            .wireguard
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        peers,
    }
}

fn map_views() -> Vec<MapView> {
    oasis_common::maps::ALL
        .iter()
        .map(|map| MapView {
            name: map.name.into(),
            kind: map.kind.as_str().into(),
            max_entries: map.max_entries,
        })
        .collect()
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

/// Empty entries of a list's kind: what a rule's fields are checked with
/// before its list is downloaded.
fn placeholder(source: &ListSource) -> ListContent {
    crate::config::list_content(source.clone(), String::new(), None).expect("an empty list is always read")
}
