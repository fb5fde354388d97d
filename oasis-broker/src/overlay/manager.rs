//! The overlay manager: the joined overlays' stored specifications (kept in
//! the config file) and the table the packet path reads. Joining fetches
//! and checks a specification without touching any state; only the final
//! step, which cannot fail for reasons of the network, changes the set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::LocalAddresses;
use super::StoredOverlay;
use super::modules::{ModuleContext, ModuleFailure};
use super::table::{
    EntryNodes, JoinedOverlay, LocalModule, ModuleLink, OverlayId, OverlayPath, OverlayTable,
};
use super::wireguard::{self, WireGuardLink, WireGuardPath};
use super::{JoinError, OverlayError, check_name, fetch, shim_bytes};
use super::{ModuleKind, ModuleSpec};
use crate::module::runner::{ModuleRunner, ModuleStatus, Reach};

pub struct OverlayManager {
    stored: Vec<StoredOverlay>,
    table: Arc<OverlayTable>,
    next_id: u32,
    /// None where no sandbox could be made: overlays with code modules
    /// then cannot be used.
    modules: Option<ModuleContext>,
    /// The code modules running, by overlay name; stopped when dropped.
    runners: HashMap<String, ModuleRunner>,
}

/// A specification fetched, checked and resolved, ready to join.
pub struct Prepared {
    stored: StoredOverlay,
    runtime: Runtime,
}

/// What `overlay add` asks beyond the name and URL.
#[derive(Default)]
pub struct JoinOptions {
    pub token: Option<String>,
    /// A module's bytes instead of the one the specification names.
    pub module_file: Option<(String, Vec<u8>)>,
    /// Never let the overlay's flows fall back to the underlay.
    pub pinned: bool,
    /// A WireGuard overlay: the wg-quick file's name and text, and the key
    /// store to keep it in.
    pub wireguard: Option<(String, String, PathBuf)>,
    /// The key store, for a specification with a WireGuard transport.
    pub keys: PathBuf,
}

/// Where a WireGuard overlay's file came from: a user's wg-quick file, or
/// made at the join for a specification with a WireGuard transport.
struct WireGuardSource {
    /// What errors name.
    file: String,
    url: String,
    spec: Option<super::OverlaySpec>,
}

/// What the packet path needs of a stored overlay: its path, its shim, the
/// module running for it and its WireGuard peers, if it has them.
pub struct Runtime {
    path: Box<dyn OverlayPath>,
    shim: Vec<u8>,
    runner: Option<ModuleRunner>,
    wireguard: Option<Arc<WireGuardLink>>,
}

impl Runtime {
    fn plain(path: Box<dyn OverlayPath>, shim: Vec<u8>) -> Runtime {
        Runtime {
            path,
            shim,
            runner: None,
            wireguard: None,
        }
    }

    fn wireguard(link: WireGuardLink) -> Runtime {
        let link = Arc::new(link);
        Runtime {
            path: Box::new(WireGuardPath(link.clone())),
            shim: Vec::new(),
            runner: None,
            wireguard: Some(link),
        }
    }
}

impl OverlayManager {
    /// The overlays of the config file. Each whose entry nodes resolve now
    /// goes into the table; one that does not stays joined but is left out
    /// of the table (the flows of rules using it are dropped, counted as
    /// `no_carrier`) rather than keeping the daemon from starting.
    /// Blocking: it may ask the resolver.
    /// `own` are this host's addresses, which no entry node may have.
    pub fn load(
        stored: Vec<StoredOverlay>,
        own: &LocalAddresses,
        modules: Option<ModuleContext>,
    ) -> OverlayManager {
        let mut manager = OverlayManager {
            stored: Vec::new(),
            table: Arc::new(OverlayTable::default()),
            next_id: 1,
            modules,
            runners: HashMap::new(),
        };
        let mut joined = Vec::new();
        // Monitor modules last, with the carriers already published: they
        // start knowing the overlays they may use.
        let (monitors, carriers): (Vec<_>, Vec<_>) = stored.iter().partition(|o| o.spec.is_monitor());
        for overlay in carriers {
            manager.load_one(overlay, own, &mut joined);
        }
        manager.set_table(Arc::new(OverlayTable::new(joined.clone())));
        for overlay in monitors {
            manager.load_one(overlay, own, &mut joined);
        }
        manager.stored = stored;
        manager.set_table(Arc::new(OverlayTable::new(joined)));
        manager
    }

    /// Puts a stored overlay in `joined`, with its module started, if it
    /// can be used now.
    fn load_one(
        &mut self,
        overlay: &StoredOverlay,
        own: &LocalAddresses,
        joined: &mut Vec<Arc<JoinedOverlay>>,
    ) {
        match self.runtime(overlay, own) {
            Ok(runtime) => {
                let (overlay_now, runner) = self.joined(overlay, runtime);
                joined.push(overlay_now);
                if let Some(runner) = runner {
                    self.runners.insert(overlay.name.clone(), runner);
                }
            }
            Err(e) => tracing::error!(overlay = %overlay.name, "cannot use overlay: {e}"),
        }
    }

    /// The table the packet path reads, also shown to monitor modules.
    fn set_table(&mut self, table: Arc<OverlayTable>) {
        if let Some(modules) = &self.modules {
            *modules.published.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        }
        self.table = table;
    }

    fn runtime(&self, stored: &StoredOverlay, own: &LocalAddresses) -> Result<Runtime, OverlayError> {
        if let Some(file) = &stored.wireguard {
            let (conf, endpoints) = wireguard::load(file, own)?;
            return Ok(Runtime::wireguard(WireGuardLink::new(&conf, &endpoints)));
        }
        let shim = shim_bytes(stored.spec.shim_len, stored.token.as_deref())?;
        let Some(module) = &stored.spec.module else {
            let entries = stored.spec.resolve_entries(own)?;
            let nodes = EntryNodes::new(entries).ok_or(super::SpecError::NoEntries)?;
            return Ok(Runtime::plain(Box::new(nodes), shim));
        };
        let context = self.modules.as_ref().ok_or(ModuleFailure::NoSandbox)?;
        let peers = match module.kind {
            ModuleKind::Overlay => Reach::entries(&stored.spec.resolve_entries(own)?),
            ModuleKind::Monitor => Reach::overlays(context.published.clone()),
        };
        let prepared = context.load(module)?;
        let runner = context.start(&stored.name, &prepared, peers, stored.spec.shim_len)?;
        let mut runtime = Runtime::plain(Box::new(LocalModule::new(runner.port())), shim);
        runtime.runner = Some(runner);
        Ok(runtime)
    }

    /// The overlay the packet path reads, and its module's runner to keep.
    fn joined(
        &mut self,
        stored: &StoredOverlay,
        runtime: Runtime,
    ) -> (Arc<JoinedOverlay>, Option<ModuleRunner>) {
        let id = OverlayId(self.next_id);
        self.next_id += 1;
        let mut overlay = JoinedOverlay::new(id, stored.name.clone(), runtime.path, runtime.shim);
        overlay.monitor = stored.spec.is_monitor();
        overlay.pinned = stored.pinned;
        overlay.module = runtime.runner.as_ref().map(|r| ModuleLink { up: r.up() });
        overlay.wireguard = runtime.wireguard;
        (Arc::new(overlay), runtime.runner)
    }

    /// A joined WireGuard overlay's peers, for `overlay show`.
    pub fn wireguard(&self, name: &str) -> Option<Arc<WireGuardLink>> {
        self.table.by_name(name)?.wireguard.clone()
    }

    /// The state of an overlay's code module, if it has one running.
    pub fn module_status(&self, name: &str) -> Option<ModuleStatus> {
        self.runners.get(name).map(ModuleRunner::status)
    }

    /// The module context, for preparing a join.
    pub fn modules(&self) -> Option<ModuleContext> {
        self.modules.clone()
    }

    /// Every joined overlay, in the order joined.
    pub fn stored(&self) -> &[StoredOverlay] {
        &self.stored
    }

    pub fn find(&self, name: &str) -> Option<&StoredOverlay> {
        self.stored.iter().find(|o| o.name == name)
    }

    /// The table the packet path reads.
    pub fn table(&self) -> &Arc<OverlayTable> {
        &self.table
    }

    /// Fetches, checks and resolves a specification, and its code module
    /// if it has one (fetched, verified, compiled, kept and started): the
    /// slow part of `overlay add`, with no state of the manager touched.
    /// `stage` is told what it is doing, for the user's progress line.
    pub async fn prepare(
        name: String,
        url: String,
        options: JoinOptions,
        own: LocalAddresses,
        modules: Option<ModuleContext>,
        stage: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Prepared, OverlayError> {
        check_name(&name)?;
        if let Some((file, text, keys)) = options.wireguard {
            let source = WireGuardSource {
                file: file.clone(),
                url: format!("wireguard:{file}"),
                spec: None,
            };
            return Self::prepare_wireguard(name, source, text, keys, options.pinned, own, stage).await;
        }
        stage("fetching the specification");
        let mut spec = fetch(&url).await?;
        if spec.wireguard.is_some() {
            // A key pair of this host's own, made now; its public half is
            // for the operator to register.
            let private = oasis_wireguard::PrivateKey::generate();
            let text = super::spec::wg_quick_for(&spec, &private).expect("a WireGuard transport");
            let keys = options.keys.clone();
            let source = WireGuardSource {
                file: url.clone(),
                url,
                spec: Some(spec),
            };
            return Self::prepare_wireguard(name, source, text, keys, options.pinned, own, stage).await;
        }
        let shim = shim_bytes(spec.shim_len, options.token.as_deref())?;
        let given = options.module_file.map(|(file, bytes)| {
            // A module author's build: it takes the place of whatever
            // module the specification names, in the same role.
            let kind = spec.module.as_ref().map_or(ModuleKind::Overlay, |m| m.kind);
            spec.module = Some(ModuleSpec {
                url: format!("file:{file}"),
                sha256: crate::module::digest(&bytes),
                kind,
                legacy_port: None,
            });
            bytes
        });
        let entries = match spec.is_monitor() {
            true => Vec::new(),
            false => {
                stage("resolving the entry nodes");
                let to_resolve = spec.clone();
                tokio::task::spawn_blocking(move || to_resolve.resolve_entries(&own))
                    .await
                    .map_err(|e| super::SpecError::Xml(format!("resolver task failed: {e}")))??
            }
        };
        let mut runner = None;
        let path: Box<dyn OverlayPath> = match &spec.module {
            Some(module) => {
                let context = modules.ok_or(ModuleFailure::NoSandbox)?;
                let prepared = context.prepare(module, given, stage).await?;
                let kept = context.clone();
                let prepared = tokio::task::spawn_blocking(move || kept.keep(&prepared).map(|()| prepared))
                    .await
                    .map_err(|e| ModuleFailure::Start(std::io::Error::other(e.to_string())))??;
                let peers = match module.kind {
                    ModuleKind::Overlay => Reach::entries(&entries),
                    ModuleKind::Monitor => Reach::overlays(context.published.clone()),
                };
                stage("starting the module");
                let started = context.start(&name, &prepared, peers, spec.shim_len)?;
                let port = started.port();
                runner = Some(started);
                Box::new(LocalModule::new(port))
            }
            None => Box::new(EntryNodes::new(entries).ok_or(super::SpecError::NoEntries)?),
        };
        Ok(Prepared {
            stored: StoredOverlay {
                name,
                url,
                token: options.token,
                pinned: options.pinned,
                spec,
                wireguard: None,
            },
            runtime: Runtime {
                path,
                shim,
                runner,
                wireguard: None,
            },
        })
    }

    /// A wg-quick file checked, its endpoints resolved and the file kept
    /// in the key store `keys`: nothing is joined yet.
    async fn prepare_wireguard(
        name: String,
        from: WireGuardSource,
        text: String,
        keys: PathBuf,
        pinned: bool,
        own: LocalAddresses,
        stage: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Prepared, OverlayError> {
        stage("checking the WireGuard file and resolving its endpoints");
        let WireGuardSource { file, url, spec } = from;
        let source = file.clone();
        let kept_name = name.clone();
        let (conf, endpoints, kept) = tokio::task::spawn_blocking(move || {
            let (conf, endpoints) = wireguard::prepare(&source, &text, &own)?;
            let kept = wireguard::keep(&keys, &kept_name, &conf)?;
            Ok::<_, wireguard::WireGuardError>((conf, endpoints, kept))
        })
        .await
        .map_err(|e| super::SpecError::Xml(format!("WireGuard task failed: {e}")))??;
        for ignored in &conf.ignored {
            tracing::info!(overlay = %name, "{file}: not used: {ignored}");
        }
        Ok(Prepared {
            stored: StoredOverlay {
                name,
                url,
                token: None,
                pinned,
                spec: spec.unwrap_or_else(|| wireguard::spec_of(&conf)),
                wireguard: Some(kept),
            },
            runtime: Runtime::wireguard(WireGuardLink::new(&conf, &endpoints)),
        })
    }

    /// Joins a prepared overlay; refused when the name is taken (it may
    /// have been while the specification was fetched).
    pub fn join(&mut self, prepared: Prepared) -> Result<&StoredOverlay, JoinError> {
        if self.find(&prepared.stored.name).is_some() {
            return Err(JoinError::Exists(prepared.stored.name));
        }
        let (overlay, runner) = self.joined(&prepared.stored, prepared.runtime);
        if let Some(runner) = runner {
            self.runners.insert(prepared.stored.name.clone(), runner);
        }
        let list: Vec<Arc<JoinedOverlay>> = self.table.iter().cloned().chain([overlay]).collect();
        self.set_table(Arc::new(OverlayTable::new(list)));
        self.stored.push(prepared.stored);
        Ok(self.stored.last().expect("just pushed"))
    }

    /// Leaves an overlay; refused while `rules` (the rules using it) exist.
    pub fn leave(&mut self, name: &str, rules: Vec<u32>) -> Result<StoredOverlay, JoinError> {
        let index = self
            .stored
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| JoinError::Unknown(name.into()))?;
        if !rules.is_empty() {
            return Err(JoinError::InUse {
                name: name.into(),
                rules,
            });
        }
        let list: Vec<Arc<JoinedOverlay>> = self.table.iter().filter(|o| o.name != name).cloned().collect();
        self.set_table(Arc::new(OverlayTable::new(list)));
        self.runners.remove(name);
        Ok(self.stored.remove(index))
    }

    /// Whether `name` is joined (stored), whether or not it resolved.
    pub fn is_joined(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OverlaySpec;

    fn stored(name: &str, entry: &str) -> StoredOverlay {
        StoredOverlay {
            name: name.into(),
            url: format!("http://192.0.2.9/{name}.xml"),
            token: None,
            pinned: false,
            spec: OverlaySpec::parse(&format!(
                r#"<overlay><entry host="{}" port="7400"/><shim length="2"/></overlay>"#,
                entry
            ))
            .unwrap(),
            wireguard: None,
        }
    }

    fn prepared(name: &str) -> Prepared {
        Prepared {
            stored: stored(name, "192.0.2.20"),
            runtime: Runtime::plain(
                Box::new(EntryNodes::new(vec!["192.0.2.20:7400".parse().unwrap()]).unwrap()),
                vec![0; 2],
            ),
        }
    }

    #[test]
    fn joins_get_fresh_ids_and_leaving_takes_them_out() {
        let mut manager =
            OverlayManager::load(vec![stored("a", "192.0.2.10")], &LocalAddresses::default(), None);
        let a = manager.table().id_of("a").unwrap();
        manager.join(prepared("b")).unwrap();
        let b = manager.table().id_of("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(manager.table().by_name("b").unwrap().shim, vec![0, 0]);
        assert!(matches!(manager.join(prepared("b")), Err(JoinError::Exists(_))));
        assert_eq!(
            manager.leave("b", vec![3]).unwrap_err(),
            JoinError::InUse {
                name: "b".into(),
                rules: vec![3]
            }
        );
        manager.leave("b", vec![]).unwrap();
        assert!(manager.table().id_of("b").is_none());
        manager.join(prepared("b")).unwrap();
        assert!(
            manager.table().id_of("b").unwrap() > b,
            "a name joined again is a new overlay: old flows do not follow it"
        );
        assert!(matches!(manager.leave("zz", vec![]), Err(JoinError::Unknown(_))));
        assert_eq!(
            manager
                .stored()
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn an_overlay_that_cannot_be_used_stays_joined_but_carries_nothing() {
        // A token that no longer fits the shim (the file was edited by hand).
        let mut unusable = stored("gone", "192.0.2.11");
        unusable.token = Some("abc".into());
        let manager = OverlayManager::load(
            vec![unusable, stored("a", "192.0.2.10")],
            &LocalAddresses::default(),
            None,
        );
        assert!(manager.is_joined("gone"));
        assert!(manager.table().id_of("gone").is_none());
        assert!(manager.table().id_of("a").is_some());
    }
}
