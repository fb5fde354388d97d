//! Where the CLI reaches the daemon (a Unix socket only root may use), and
//! how the daemon hears that it should stop (SIGINT, SIGTERM).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use super::DaemonError;

pub(super) struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Refuses to start beside a live daemon and clears a stale socket file.
    pub async fn claim(path: &Path) -> Result<(), DaemonError> {
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

    pub fn bind(path: &Path) -> Result<ControlListener, DaemonError> {
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
        Ok(ControlListener {
            listener,
            path: path.into(),
        })
    }

    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Resolves at SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() -> Result<(), DaemonError> {
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|source| {
            DaemonError::Io {
                what: "installing the SIGTERM handler".into(),
                source,
            }
        })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}
