//! The daemon's state and what control requests do to it: rules, overlays,
//! status. The packet threads see rule and overlay changes through the
//! shared tables this module swaps.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compile::compile;
use crate::config::{Config, ConfigError, StoredOverlay};
use crate::control::{
    HeartbeatView, MapView, OverlayView, ProgramView, Request, Response, RuleView, StatusView, TunView,
    UplinkView,
};
use crate::dns::DnsCounters;
use crate::names::NameRules;
use crate::overlay::{FetchError, JoinError, JoinedOverlay, OverlayTable, SpecError, check_name, shim_bytes};
use crate::platform::linux::datapath::{Datapath, DatapathError};
use crate::platform::linux::forward::{ForwardStats, Shared, snapshot};
use crate::platform::linux::tun::diverted_counts;
use crate::rules::{AnyRule, Carrier, RuleError, RuleSet, RuleSpec};

#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("rule {line} of the import: {source} (no rule was added)")]
    Import { line: usize, source: RuleError },
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

pub(super) struct State {
    pub(super) config: Config,
    pub(super) config_path: PathBuf,
    pub(super) rules: RuleSet,
    pub(super) shared_rules: Shared<RuleSet>,
    /// The name rules compiled; the DNS server and packet threads read it.
    pub(super) shared_names: Shared<NameRules>,
    pub(super) dns_counters: Arc<DnsCounters>,
    pub(super) dns: super::dns::DnsRuntime,
    /// Joined overlays whose entry nodes resolved; the packet threads read it.
    pub(super) shared_overlays: Shared<OverlayTable>,
    pub(super) datapath: Datapath,
    pub(super) tun: TunView,
    pub(super) stats: Arc<ForwardStats>,
    pub(super) started: Instant,
}

impl State {
    fn rule_view(&self, rule: &AnyRule) -> RuleView {
        let (counters, answers) = match rule {
            AnyRule::Header(rule) => (self.datapath.rule_counters(rule.id), None),
            AnyRule::Name(rule) => (Default::default(), Some(self.dns_counters.answers_for(rule.id))),
        };
        RuleView {
            id: rule.id(),
            subset: rule.subset_text(),
            via: rule.via().to_string(),
            packets: counters.packets,
            bytes: counters.bytes,
            answers,
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
        let rule = next.add_any(subset, via)?;
        self.commit(next)?;
        tracing::info!(id = rule.id(), subset = %rule.subset_text(), via = %rule.via(), "rule added");
        Ok(self.rule_view(&rule))
    }

    /// Adds many rules in one step (one file write, one compile): all of
    /// them, or none when any is bad.
    fn import_rules(&mut self, specs: Vec<RuleSpec>) -> Result<Vec<RuleView>, RequestError> {
        let mut next = self.rules.clone();
        let mut added = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            let at = |source| RequestError::Import {
                line: index + 1,
                source,
            };
            let (subset, via) = spec.parse().map_err(at)?;
            if let Carrier::Overlay(name) = &via
                && !self.config.overlays.iter().any(|o| &o.name == name)
            {
                return Err(at(RuleError::UnknownOverlay(name.clone())));
            }
            added.push(next.add_any(subset, via).map_err(at)?);
        }
        self.commit(next)?;
        tracing::info!(count = added.len(), "rules imported");
        Ok(added.iter().map(|r| self.rule_view(r)).collect())
    }

    fn del_rule(&mut self, id: u32) -> Result<RuleView, RequestError> {
        let mut next = self.rules.clone();
        let rule = next.remove(id)?;
        let view = self.rule_view(&rule);
        self.commit(next)?;
        tracing::info!(id, subset = %rule.subset_text(), "rule deleted");
        Ok(view)
    }

    /// Makes `next` the rule list: the file first, then the maps. When
    /// either fails, both are put back as they were.
    fn commit(&mut self, next: RuleSet) -> Result<(), RequestError> {
        let names = NameRules::compile(next.names()).map_err(RuleError::from)?;
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
        *self.shared_names.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(names);
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
            .all()
            .iter()
            .filter(|r| matches!(r.via(), Carrier::Overlay(name) if name == overlay))
            .map(AnyRule::id)
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
            rules: self.rules.rules().len() + self.rules.names().len(),
            overlays: self.config.overlays.len(),
            overlay_port: self.config.overlay_port,
            underlay_port: self.config.underlay_port,
            dns: self.dns.status(),
        }
    }

    pub(super) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::AddRule { spec } => self.add_rule(spec).map(|rule| Response::Rule { rule }),
            Request::DelRule { id } => self.del_rule(id).map(|rule| Response::Rule { rule }),
            Request::ImportRules { specs } => self.import_rules(specs).map(|rules| Response::Rules { rules }),
            Request::Dns => Ok(Response::Dns {
                dns: Box::new(self.dns.table(&self.shared_names, &self.shared_overlays)),
            }),
            Request::ListRules => Ok(Response::Rules {
                rules: self.rules.all().iter().map(|r| self.rule_view(r)).collect(),
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
    oasis_common::maps::ALL
        .iter()
        .map(|map| MapView {
            name: map.name.into(),
            kind: map.kind.as_str().into(),
            max_entries: map.max_entries,
        })
        .collect()
}

/// `oasis overlay add`: fetch, check, resolve, then store and publish.
pub(super) async fn join_overlay(
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
