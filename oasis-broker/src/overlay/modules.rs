//! An overlay's code module from its specification to a running sandbox:
//! downloaded (bounded in size and time), checked against the digest the
//! specification gives, compiled and checked against the contract, and
//! only then kept: the bytes as `modules/SHA256.wasm` beside the config
//! file, the compiled code as `modules/SHA256.cwasm`, so a restart
//! neither downloads nor compiles again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fetch::{FetchError, fetch_bytes};
use super::spec::{ModuleKind, ModuleSpec};
use super::table::OverlayTable;
use crate::module::compiler::Compiler;
use crate::module::runner::{ModuleRunner, ModuleSetup, ModuleStatus, Reach};
use crate::module::{MAX_MODULE_BYTES, ModuleError, ModuleLimits, Role, Sandbox, digest};
use crate::shared::Shared;

/// The contract a module of this kind keeps.
fn role(kind: ModuleKind) -> Role {
    match kind {
        ModuleKind::Overlay => Role::Overlay,
        ModuleKind::Monitor => Role::Monitor,
    }
}

/// Why an overlay's module cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModuleFailure {
    #[error("the module: {0}")]
    Fetch(#[from] FetchError),
    #[error(
        "the module at {url} has SHA-256 {got}, not the {expected} the specification gives: refused, nothing kept"
    )]
    Digest {
        url: String,
        expected: String,
        got: String,
    },
    #[error("the module at {url}: {source} (refused, nothing kept)")]
    Sandbox { url: String, source: Box<ModuleError> },
    #[error("the module {path} is gone and cannot be fetched again: {reason}")]
    Missing { path: PathBuf, reason: String },
    #[error("keeping the module in {path}: {source}")]
    Keep { path: PathBuf, source: std::io::Error },
    #[error("starting the module's sockets: {0}")]
    Start(std::io::Error),
    #[error("this daemon has no sandbox for code modules (it could not be set up at start; see the log)")]
    NoSandbox,
}

/// A module fetched, verified and compiled; nothing kept yet.
pub struct PreparedModule {
    pub digest: String,
    bytes: Vec<u8>,
    module: wasmtime::Module,
    compile: String,
}

/// What the overlay manager needs to run modules.
#[derive(Clone)]
pub struct ModuleContext {
    pub sandbox: Arc<Sandbox>,
    /// Where modules are compiled: a child process with limits, in the
    /// daemon.
    pub compiler: Compiler,
    /// `modules/` beside the config file.
    pub dir: PathBuf,
    pub overlay_port: u16,
    pub underlay_port: u16,
    pub bypass_mark: u32,
    pub limits: ModuleLimits,
    /// The uplink's MTU: a monitor module's connections over an overlay
    /// get their MSS clamped to fit it with the encapsulation.
    pub uplink_mtu: u16,
    /// How long the flows the host hands a module live without packets.
    pub lifetimes: crate::engine::Lifetimes,
    /// The joined overlays, for monitor modules; the manager keeps it
    /// current.
    pub published: Shared<OverlayTable>,
}

impl ModuleContext {
    /// Where modules are kept: `modules/` beside the config file.
    pub fn dir_beside(config_path: &Path) -> PathBuf {
        config_path.parent().unwrap_or(Path::new(".")).join("modules")
    }

    /// Fetches the module (or takes the bytes given, for `--module-file`),
    /// checks its digest and compiles it. Blocking work runs off the
    /// async threads.
    pub async fn prepare(
        &self,
        spec: &ModuleSpec,
        given: Option<Vec<u8>>,
        stage: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<PreparedModule, ModuleFailure> {
        let bytes = match given {
            Some(bytes) => bytes,
            None => {
                stage("fetching the module");
                fetch_bytes(&spec.url, MAX_MODULE_BYTES, Duration::from_secs(60)).await?
            }
        };
        stage(&format!(
            "checking and compiling the module ({} KiB; at most {} s)",
            bytes.len() >> 10,
            self.limits.compile_secs
        ));
        let (sandbox, url, expected) = (self.sandbox.clone(), spec.url.clone(), spec.sha256.clone());
        let (compiler, limits) = (self.compiler.clone(), self.limits.clone());
        let role = role(spec.kind);
        tokio::task::spawn_blocking(move || {
            let got = digest(&bytes);
            if got != expected {
                return Err(ModuleFailure::Digest { url, expected, got });
            }
            let started = Instant::now();
            let module = compiler
                .compile(&sandbox, &bytes, role, &limits)
                .map_err(|source| ModuleFailure::Sandbox {
                    url,
                    source: Box::new(source),
                })?;
            Ok(PreparedModule {
                digest: got,
                compile: format!(
                    "compiled in {:.1} ms ({} bytes)",
                    started.elapsed().as_secs_f64() * 1000.0,
                    bytes.len()
                ),
                bytes,
                module,
            })
        })
        .await
        .map_err(|e| ModuleFailure::Start(std::io::Error::other(e.to_string())))?
    }

    /// Keeps a prepared module's bytes and compiled code under its digest.
    pub fn keep(&self, prepared: &PreparedModule) -> Result<(), ModuleFailure> {
        let keep = |path: PathBuf, bytes: &[u8]| -> Result<(), ModuleFailure> {
            let partial = path.with_extension("partial");
            std::fs::create_dir_all(&self.dir)
                .and_then(|()| std::fs::write(&partial, bytes))
                .and_then(|()| std::fs::rename(&partial, &path))
                .map_err(|source| ModuleFailure::Keep { path, source })
        };
        keep(
            self.dir.join(format!("{}.wasm", prepared.digest)),
            &prepared.bytes,
        )?;
        if let Some(compiled) = self.sandbox.serialize(&prepared.module) {
            keep(self.dir.join(format!("{}.cwasm", prepared.digest)), &compiled)?;
        }
        Ok(())
    }

    /// A kept module: its compiled code when still valid for this
    /// wasmtime, else compiled again from the kept bytes. Blocking.
    pub fn load(&self, spec: &ModuleSpec) -> Result<PreparedModule, ModuleFailure> {
        let digest = &spec.sha256;
        let wasm = self.dir.join(format!("{digest}.wasm"));
        let cwasm = self.dir.join(format!("{digest}.cwasm"));
        let bytes = std::fs::read(&wasm).map_err(|e| ModuleFailure::Missing {
            path: wasm.clone(),
            reason: e.to_string(),
        })?;
        if crate::module::digest(&bytes) != *digest {
            return Err(ModuleFailure::Digest {
                url: wasm.display().to_string(),
                expected: digest.clone(),
                got: crate::module::digest(&bytes),
            });
        }
        let started = Instant::now();
        // SAFETY: `modules/` is written by the daemon alone (it is root's,
        // beside the config file), and every file in it is named by the
        // digest of the module it was compiled from.
        let cached = std::fs::read(&cwasm)
            .ok()
            .and_then(|compiled| unsafe { self.sandbox.deserialize(&compiled, role(spec.kind)) });
        let (module, compile) = match cached {
            Some(module) => (
                module,
                format!(
                    "from the cache in {:.1} ms",
                    started.elapsed().as_secs_f64() * 1000.0
                ),
            ),
            None => {
                let module = self
                    .compiler
                    .compile(&self.sandbox, &bytes, role(spec.kind), &self.limits)
                    .map_err(|source| ModuleFailure::Sandbox {
                        url: wasm.display().to_string(),
                        source: Box::new(source),
                    })?;
                if let Some(compiled) = self.sandbox.serialize(&module) {
                    let _ = std::fs::write(&cwasm, compiled);
                }
                (
                    module,
                    format!(
                        "compiled in {:.1} ms ({} bytes)",
                        started.elapsed().as_secs_f64() * 1000.0,
                        bytes.len()
                    ),
                )
            }
        };
        Ok(PreparedModule {
            digest: digest.clone(),
            bytes,
            module,
            compile,
        })
    }

    /// Starts a module for an overlay: one that carries, with its entry
    /// nodes; a monitor module, with the joined overlays.
    pub fn start(
        &self,
        overlay: &str,
        prepared: &PreparedModule,
        reach: Reach,
        shim_len: usize,
    ) -> Result<ModuleRunner, ModuleFailure> {
        ModuleRunner::start(
            self.sandbox.clone(),
            ModuleSetup {
                overlay: overlay.to_string(),
                module: prepared.module.clone(),
                shim_len,
                limits: self.limits.clone(),
                overlay_port: self.overlay_port,
                underlay_port: self.underlay_port,
                bypass_mark: self.bypass_mark,
                uplink_mtu: self.uplink_mtu,
                lifetimes: self.lifetimes,
                status: ModuleStatus {
                    digest: prepared.digest.clone(),
                    compile: prepared.compile.clone(),
                    ..ModuleStatus::default()
                },
            },
            reach,
        )
        .map_err(ModuleFailure::Start)
    }
}
