//! The daemon behind the REST API: its control requests, the host's
//! counters, the DNS service; and the API's start (its secret, its
//! listener), which never stops the daemon from running.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::state::{Daemon, Reporter};
use crate::api::source::{Record, Resolved, Source};
use crate::api::{Api, LogFeed};
use crate::control::{Request, Response};

/// How long `/dns/query` waits for the DNS service.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct DaemonSource {
    daemon: Arc<Daemon>,
}

#[async_trait::async_trait]
impl Source for DaemonSource {
    async fn call(&self, request: Request) -> Response {
        let (progress, _) = watch::channel(None);
        self.daemon.clone().handle(request, Reporter(progress)).await
    }

    fn uplink_bytes(&self) -> (u64, u64) {
        self.daemon
            .status_uplinks()
            .iter()
            .map(|name| uplink_counters(name))
            .fold((0, 0), |(tx, rx), (t, r)| (tx + t, rx + r))
    }

    fn memory(&self) -> u64 {
        resident_bytes()
    }

    async fn resolve(&self, name: &str, rtype: u16) -> Result<Resolved, String> {
        let Some(port) = self.daemon.dns_port() else {
            return Err("DNS interception is off (dns.enabled), so Oasis answers no names".into());
        };
        ask_dns(SocketAddr::from(([127, 0, 0, 1], port)), name, rtype).await
    }
}

/// Asks the DNS service at `server` one question, as an application would.
async fn ask_dns(server: SocketAddr, name: &str, rtype: u16) -> Result<Resolved, String> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let qname = Name::from_ascii(name).map_err(|e| format!("{name:?} is not a domain name: {e}"))?;
    let mut query = Message::new();
    query
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(qname, RecordType::from(rtype)));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let socket = tokio::net::UdpSocket::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| e.to_string())?;
    socket.send_to(&bytes, server).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_535];
    let answer = loop {
        let (len, from) = tokio::time::timeout(RESOLVE_TIMEOUT, socket.recv_from(&mut buf))
            .await
            .map_err(|_| {
                format!(
                    "the DNS service did not answer within {} s",
                    RESOLVE_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| e.to_string())?;
        if from != server {
            continue;
        }
        let answer = Message::from_vec(&buf[..len]).map_err(|e| e.to_string())?;
        if answer.id() == query.id() {
            break answer;
        }
    };
    Ok(Resolved {
        rcode: u16::from(answer.response_code()),
        answers: answer
            .answers()
            .iter()
            .map(|r| Record {
                name: r.name().to_string(),
                rtype: u16::from(r.record_type()),
                ttl: r.ttl(),
                data: r.data().to_string(),
            })
            .collect(),
    })
}

/// Bytes sent and received through an interface.
fn uplink_counters(name: &str) -> (u64, u64) {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("tx_bytes"), read("rx_bytes"))
}

/// The process's resident memory.
fn resident_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The API's secret: the config's, or the one kept in `secret_file`, or a
/// new one written there (readable by root alone). None: the config
/// says none (loopback only, which the config's check made sure of).
fn secret(settings: &crate::config::ApiConfig) -> std::io::Result<Option<String>> {
    if let Some(secret) = &settings.secret {
        return Ok(Some(secret.clone()).filter(|s| !s.is_empty()));
    }
    match std::fs::read_to_string(&settings.secret_file) {
        Ok(text) if text.trim().len() >= 16 => return Ok(Some(text.trim().to_string())),
        Ok(_) => {
            tracing::warn!(file = %settings.secret_file.display(), "the API secret file is too short; writing a new secret")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = hex::encode(rand::random::<[u8; 16]>());
    write_private(&settings.secret_file, &secret)?;
    tracing::info!(file = %settings.secret_file.display(), "made a secret for the API (`oasis ui` shows it)");
    Ok(Some(secret))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    // A file that was there keeps its mode through `open`: make it ours.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")
}

/// The running API: dropped, it stops.
pub(super) struct RunningApi {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub url: String,
    pub secret: Option<String>,
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts the API if the config asks for it. A failure (the port taken,
/// the secret file unwritable) is logged and the daemon runs without it.
pub(super) async fn start(daemon: &Arc<Daemon>) -> Option<RunningApi> {
    let settings = daemon.settings.api.clone();
    if !settings.enabled {
        return None;
    }
    let secret = match secret(&settings) {
        Ok(secret) => secret,
        Err(e) => {
            tracing::warn!(
                file = %settings.secret_file.display(),
                "the API is off: its secret file cannot be read or written: {e}"
            );
            return None;
        }
    };
    let listener = match tokio::net::TcpListener::bind(settings.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(
                listen = %settings.listen,
                "the API is off: cannot listen there ({e}); set api.listen to a free address, or api.enabled: false"
            );
            return None;
        }
    };
    let url = format!("http://{}/ui/", settings.listen);
    let source = Arc::new(DaemonSource {
        daemon: daemon.clone(),
    });
    let api = Api::new(settings, secret.clone(), source, LogFeed::global().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stopped.await;
        };
        if let Err(e) = crate::api::serve(listener, api, stopped).await {
            tracing::warn!("the API stopped: {e}");
        }
    });
    tracing::info!(%url, "the API and web page are up");
    Some(RunningApi {
        stop: Some(stop),
        url,
        secret,
    })
}
