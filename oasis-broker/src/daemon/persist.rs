//! Writing the config file, on a thread of its own. A change hands the
//! writer a snapshot and waits for its write to land (so a rule the CLI
//! reported added survives a crash), but nothing else waits: not the
//! heartbeat, not packets, not other requests. Changes that arrive while a
//! write runs are coalesced into the next one. A write that fails (a full
//! disk, a read-only file) is tried again every [`RETRY_EVERY`] until one
//! succeeds, so the file catches up without the user changing anything.
//!
//! Rules are rendered to YAML once each and kept (ids are never reused and
//! a rule never changes), so writing a file of a million rules costs a copy
//! of the text, not a serialisation.
//!
//! The file is edited in place (`edit.rs`): the daemon writes only its own
//! keys (`next_rule_id`, `overlays`, `rules`), and the user's comments and
//! layout everywhere else survive; a rule or overlay already in the file
//! keeps its text and the comments above it. The file as last written is
//! remembered, so it is read and cut again only when someone else changed
//! it since.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::edit;
use crate::config::{Config, StoredRule};
use crate::overlay::StoredOverlay;
use crate::rules::RuleSet;

/// How long after a failed write the writer tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);

/// What the file should hold.
pub struct Snapshot {
    /// The settings (its `rules` and `overlays` are ignored).
    pub settings: Arc<Config>,
    pub rules: Arc<RuleSet>,
    pub overlays: Vec<StoredOverlay>,
}

#[derive(Default)]
struct State {
    pending: Option<Snapshot>,
    /// Snapshots handed over, and of them written (or failed) so far.
    requested: u64,
    done: u64,
    error: Option<String>,
}

#[derive(Clone)]
pub struct Persister {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Persister {
    /// Starts the writer for `path`.
    pub fn start(path: PathBuf) -> std::io::Result<Persister> {
        Persister::with_retry(path, RETRY_EVERY)
    }

    fn with_retry(path: PathBuf, retry_every: Duration) -> std::io::Result<Persister> {
        let persister = Persister {
            shared: Arc::default(),
        };
        let writer = persister.clone();
        std::thread::Builder::new()
            .name("oasis-config-writer".into())
            .spawn(move || writer.run(path, retry_every))?;
        Ok(persister)
    }

    /// Hands over what the file should hold; returns the generation to
    /// wait for.
    pub fn save(&self, snapshot: Snapshot) -> u64 {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.pending = Some(snapshot);
        state.requested += 1;
        wake.notify_all();
        state.requested
    }

    /// Waits until generation `wanted` is written; its outcome.
    pub fn wait(&self, wanted: u64) -> Result<(), String> {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        while state.done < wanted {
            state = wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        match &state.error {
            Some(error) if state.done >= wanted => Err(error.clone()),
            _ => Ok(()),
        }
    }

    /// Waits up to `limit` for every handed-over snapshot to be written
    /// (at shutdown).
    pub fn flush(&self, limit: Duration) -> bool {
        let (lock, wake) = &*self.shared;
        let state = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (state, _) = wake
            .wait_timeout_while(state, limit, |s| s.done < s.requested)
            .unwrap_or_else(|e| e.into_inner());
        state.done >= state.requested
    }

    /// (whether the file holds the latest state, why the last write failed)
    pub fn state(&self) -> (bool, Option<String>) {
        let state = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        (
            state.done >= state.requested && state.error.is_none(),
            state.error.clone(),
        )
    }

    fn run(self, path: PathBuf, retry_every: Duration) {
        let mut rendered = Rendered::default();
        let (lock, wake) = &*self.shared;
        // The snapshot whose write failed, to write again unless a newer
        // one comes first.
        let mut failed: Option<(Snapshot, u64)> = None;
        loop {
            let (snapshot, generation) = {
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                let retry_at = std::time::Instant::now() + retry_every;
                while state.pending.is_none() {
                    if failed.is_none() {
                        state = wake.wait(state).unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    let left = retry_at.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                match state.pending.take() {
                    Some(snapshot) => (snapshot, state.requested),
                    None => match failed.take() {
                        Some(retry) => retry,
                        None => continue,
                    },
                }
            };
            let started = std::time::Instant::now();
            let result = write(&path, &snapshot, &mut rendered);
            tracing::debug!(
                rules = snapshot.rules.len(),
                ms = started.elapsed().as_millis() as u64,
                "config file written"
            );
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            state.done = state.done.max(generation);
            let was_failing = state.error.is_some();
            state.error = match result {
                Ok(()) => {
                    if was_failing {
                        tracing::info!("config file written; the running rules are saved again");
                    }
                    failed = None;
                    None
                }
                Err(e) => {
                    // Said once per cause, not at every retry.
                    if state.error.as_ref() != Some(&e) {
                        tracing::error!(
                            "{e}; the running rules are not saved (status shows this; the daemon \
                             tries again every {} s)",
                            retry_every.as_secs()
                        );
                    }
                    failed = Some((snapshot, generation));
                    Some(e)
                }
            };
            wake.notify_all();
        }
    }
}

/// The rules as the file lists them, kept between writes: each rule's
/// text, and all name rules' text in one block, reused while the name rules
/// are the same (a header rule change writes the name rules' bytes, but
/// renders none of them).
#[derive(Default)]
struct Rendered {
    rules: HashMap<u32, Arc<str>>,
    /// The rule set the name block was made for.
    names_of: Option<Arc<RuleSet>>,
    names: String,
    /// Overlays as the file has them (text above included), by name.
    overlays: HashMap<String, String>,
    /// The file cut where the daemon's keys are, and what it was when the
    /// daemon last wrote or read it.
    skeleton: Option<(Stamp, edit::Skeleton)>,
}

/// What tells a file changed by someone else: its size, modification time
/// and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp(u64, i128, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    let modified = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp(meta.len(), modified, inode))
}

impl Rendered {
    fn rule(&mut self, id: u32, spec: impl FnOnce() -> crate::rules::RuleSpec) -> Result<Arc<str>, String> {
        if let Some(text) = self.rules.get(&id) {
            return Ok(text.clone());
        }
        let text: Arc<str> = StoredRule { id, spec: spec() }
            .yaml()
            .map_err(|e| format!("rendering rule {id}: {e}"))?
            .into();
        self.rules.insert(id, text.clone());
        Ok(text)
    }

    fn update(&mut self, rules: &Arc<RuleSet>) -> Result<(), String> {
        if self.names_of.as_ref().is_some_and(|last| last.same_names(rules)) {
            return Ok(());
        }
        let mut names = String::with_capacity(self.names.len());
        for rule in rules.names().iter() {
            names.push_str(&self.rule(rule.id, || rule.spec())?);
        }
        self.names = names;
        self.names_of = Some(rules.clone());
        Ok(())
    }

    /// Forgets the text of rules deleted since, once there is much of it.
    fn prune(&mut self, rules: &RuleSet) {
        if self.rules.len() > 2 * rules.len() + 1024 {
            let live: std::collections::HashSet<u32> = rules.carriers().map(|(id, _)| id).collect();
            self.rules.retain(|id, _| live.contains(id));
        }
    }
}

impl Rendered {
    /// The file's skeleton: the one remembered when the file is as the
    /// daemon left it, else read and cut again, its items taking the place
    /// of rendered ones. None when there is no file worth keeping.
    fn skeleton(&mut self, path: &std::path::Path) -> Option<edit::Skeleton> {
        let now = stamp(path)?;
        if let Some((seen, skeleton)) = &self.skeleton
            && *seen == now
        {
            return Some(skeleton.clone());
        }
        let text = std::fs::read_to_string(path).ok()?;
        let (skeleton, items) = edit::parse(&text)?;
        for (id, text) in items.rules {
            self.rules.insert(id, text.into());
        }
        // The name block is made again from the file's texts.
        self.names_of = None;
        self.overlays = items.overlays;
        Some(skeleton)
    }

    /// An overlay's item: the file's text while it reads back as what the
    /// daemon holds, else rendered.
    fn overlay(&self, overlay: &StoredOverlay) -> Result<String, String> {
        if let Some(text) = self.overlays.get(&overlay.name)
            && serde_yaml::from_str::<Vec<StoredOverlay>>(text).is_ok_and(|read| read == [overlay.clone()])
        {
            return Ok(text.clone());
        }
        serde_yaml::to_string(std::slice::from_ref(overlay))
            .map_err(|e| format!("rendering overlay {}: {e}", overlay.name))
    }
}

/// Header rules first, then name rules, each kind in its order of
/// precedence (the two kinds never compete).
fn write(path: &std::path::Path, snapshot: &Snapshot, rendered: &mut Rendered) -> Result<(), String> {
    let rules = &snapshot.rules;
    let skeleton = rendered.skeleton(path);
    rendered.update(rules)?;
    rendered.prune(rules);
    let mut blocks: Vec<Arc<str>> = Vec::with_capacity(rules.rules().len() + 1);
    for rule in rules.rules() {
        blocks.push(rendered.rule(rule.id, || rule.spec())?);
    }
    let names = (!rendered.names.is_empty()).then_some(rendered.names.as_str());
    let Some(skeleton) = skeleton else {
        // No file yet (or nothing in it but comments): the settings in full.
        let mut settings = (*snapshot.settings).clone();
        settings.rules.clear();
        settings.next_rule_id = Some(rules.next_id());
        settings.overlays = snapshot.overlays.clone();
        settings
            .save_with_rules(path, blocks.iter().map(|b| b.as_ref()).chain(names))
            .map_err(|e| e.to_string())?;
        rendered.skeleton = None;
        return Ok(());
    };
    let overlays = snapshot
        .overlays
        .iter()
        .map(|o| rendered.overlay(o))
        .collect::<Result<Vec<_>, _>>()?;
    let overlays: Vec<&str> = overlays.iter().map(String::as_str).collect();
    let mut text = String::with_capacity(rendered.names.len() + 4096);
    skeleton.render(
        rules.next_id(),
        &overlays,
        blocks.iter().map(|b| b.as_ref()).chain(names),
        &mut text,
    );
    crate::config::write_atomically(path, text.as_bytes()).map_err(|e| e.to_string())?;
    rendered.skeleton = stamp(path).map(|stamp| (stamp, skeleton));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleSpec;

    fn rules(count: u32) -> RuleSet {
        let mut set = RuleSet::default();
        for i in 0..count {
            let spec = RuleSpec {
                name_suffix: Some(format!("site{i}.example")),
                via: "underlay".into(),
                ..RuleSpec::default()
            };
            let (subset, via) = spec.parse().unwrap();
            set.add_any(subset, via).unwrap();
        }
        let header = RuleSpec {
            proto: Some("tcp".into()),
            dport: Some("8080".into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        let (subset, via) = header.parse().unwrap();
        set.add_any(subset, via).unwrap();
        set
    }

    #[test]
    fn the_file_reads_back_as_the_rules_written() {
        let dir = std::env::temp_dir().join(format!("oasis-persist-test-{}", std::process::id()));
        let path = dir.join("config.yaml");
        let persister = Persister::start(path.clone()).unwrap();
        let mut set = rules(50);
        let settings = Arc::new(Config::default());
        let generation = persister.save(Snapshot {
            settings: settings.clone(),
            rules: Arc::new(set.clone()),
            overlays: Vec::new(),
        });
        persister.wait(generation).unwrap();
        let loaded = Config::load_or_default(&path).unwrap();
        assert_eq!(loaded.rule_set(&path).unwrap().all(), set.all());
        // Delete the last rule: its id is never handed out again, after a
        // restart too.
        let last = set.next_id() - 1;
        set.remove(last).unwrap();
        let generation = persister.save(Snapshot {
            settings,
            rules: Arc::new(set.clone()),
            overlays: Vec::new(),
        });
        persister.wait(generation).unwrap();
        assert!(persister.flush(Duration::from_secs(1)));
        assert_eq!(persister.state(), (true, None));
        let loaded = Config::load_or_default(&path).unwrap().rule_set(&path).unwrap();
        assert_eq!(loaded.all(), set.all());
        assert_eq!(loaded.next_id(), last + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_users_comments_and_layout_survive_the_daemons_changes() {
        let dir = std::env::temp_dir().join(format!("oasis-persist-edit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        let mine = "\
# My host: the wired uplink only.
uplinks: [eth0]   # not the wifi

flow_idle_timeout_secs: 300   # long UDP sessions
rules:
  # ssh, direct
  - id: 1
    proto: tcp
    dport: '22'
    via: underlay
";
        std::fs::write(&path, mine).unwrap();
        let config = Config::load_or_default(&path).unwrap();
        let mut set = config.rule_set(&path).unwrap();
        let persister = Persister::start(path.clone()).unwrap();
        let add = |set: &mut RuleSet, port: &str| {
            let spec = RuleSpec {
                proto: Some("udp".into()),
                dport: Some(port.into()),
                via: "underlay".into(),
                ..RuleSpec::default()
            };
            let (subset, via) = spec.parse().unwrap();
            set.add_any(subset, via).unwrap();
        };
        add(&mut set, "53");
        let save = |set: &RuleSet| {
            let generation = persister.save(Snapshot {
                settings: Arc::new(config.clone()),
                rules: Arc::new(set.clone()),
                overlays: Vec::new(),
            });
            persister.wait(generation).unwrap();
            std::fs::read_to_string(&path).unwrap()
        };
        let text = save(&set);
        assert!(
            text.starts_with(
                "# My host: the wired uplink only.\nuplinks: [eth0]   # not the wifi\n\n\
                 flow_idle_timeout_secs: 300   # long UDP sessions\nrules:\n  # ssh, direct\n  - id: 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("dport: '53'") && text.contains("next_rule_id: 3"),
            "{text}"
        );
        let loaded = Config::load_or_default(&path).unwrap();
        assert_eq!(loaded.rule_set(&path).unwrap().all(), set.all());
        assert_eq!(loaded.flow_idle_timeout_secs, 300);
        // The user edits a setting while the daemon runs; the next change
        // keeps the edit (it takes effect at the next start).
        std::fs::write(&path, text.replace("300   # long", "600   # longer")).unwrap();
        add(&mut set, "123");
        let text = save(&set);
        assert!(
            text.contains("flow_idle_timeout_secs: 600   # longer UDP sessions"),
            "{text}"
        );
        assert!(text.contains("  # ssh, direct\n  - id: 1\n"), "{text}");
        let loaded = Config::load_or_default(&path).unwrap();
        assert_eq!(loaded.rule_set(&path).unwrap().all(), set.all());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_write_that_fails_is_reported() {
        let persister = Persister::start(PathBuf::from("/proc/oasis-cannot-write/config.yaml")).unwrap();
        let generation = persister.save(Snapshot {
            settings: Arc::new(Config::default()),
            rules: Arc::new(rules(1)),
            overlays: Vec::new(),
        });
        let error = persister.wait(generation).unwrap_err();
        assert!(error.contains("cannot write config file"), "{error}");
        assert!(!persister.state().0);
    }
    #[test]
    fn a_failed_write_is_tried_again_until_it_lands() {
        let dir = std::env::temp_dir().join(format!("oasis-persist-retry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A file where the config's directory should be: no write can land.
        let blocker = dir.join("etc");
        std::fs::write(&blocker, "not a directory").unwrap();
        let path = blocker.join("config.yaml");
        let persister = Persister::with_retry(path.clone(), Duration::from_millis(20)).unwrap();
        let set = rules(3);
        let generation = persister.save(Snapshot {
            settings: Arc::new(Config::default()),
            rules: Arc::new(set.clone()),
            overlays: Vec::new(),
        });
        assert!(persister.wait(generation).is_err());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!persister.state().0, "nothing can be written yet");
        // The cause goes away; no change follows, and still the file comes.
        std::fs::remove_file(&blocker).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while persister.state() != (true, None) {
            assert!(
                std::time::Instant::now() < deadline,
                "never written: {:?}",
                persister.state()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let loaded = Config::load_or_default(&path).unwrap().rule_set(&path).unwrap();
        assert_eq!(loaded.all(), set.all());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
