//! One control connection: JSON request lines in; for each, progress lines
//! while it runs (at least every [`KEEPALIVE`], so the CLI can tell a busy
//! daemon from a hung one), then the response line.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::state::{Daemon, Reporter};
use crate::control::{Progress, Request, Response};

/// Longest silence on a connection while a request runs.
const KEEPALIVE: Duration = Duration::from_secs(3);
/// A request done within this long shows no progress at all: a rule added
/// in a few milliseconds needs no "writing the config file ..." line.
const QUIET: Duration = Duration::from_millis(300);
/// Request lines longer than this (large imports) are parsed off the
/// async runtime's threads.
const LARGE_REQUEST: usize = 64 * 1024;

pub(super) async fn serve(
    read: impl AsyncRead + Unpin,
    mut write: impl AsyncWrite + Unpin,
    daemon: Arc<Daemon>,
) {
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let request = if line.len() > LARGE_REQUEST {
            tokio::task::spawn_blocking(move || serde_json::from_str::<Request>(&line))
                .await
                .unwrap_or_else(|e| Err(serde::de::Error::custom(e)))
        } else {
            serde_json::from_str::<Request>(&line)
        };
        let response = match request {
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
            Ok(request) => match run(request, &daemon, &mut write).await {
                Some(response) => response,
                None => break,
            },
        };
        if send(&mut write, &response).await.is_err() {
            break;
        }
    }
}

/// Runs one request, sending progress on the way; None when the client
/// went away.
async fn run(
    request: Request,
    daemon: &Arc<Daemon>,
    write: &mut (impl AsyncWrite + Unpin),
) -> Option<Response> {
    let (progress, mut updates) = watch::channel(None);
    let mut task = tokio::spawn(daemon.clone().handle(request, Reporter(progress)));
    let mut last = Progress {
        stage: "working".into(),
        ..Progress::default()
    };
    let quiet_until = tokio::time::Instant::now() + QUIET;
    // Progress reported while still quiet, to send once the quiet ends.
    let mut held = false;
    loop {
        tokio::select! {
            result = &mut task => {
                return Some(result.unwrap_or_else(|e| Response::Error {
                    message: format!("the daemon failed while doing this: {e}"),
                }));
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    // The request dropped its reporter: the result follows.
                    let result = (&mut task).await;
                    return Some(result.unwrap_or_else(|e| Response::Error {
                        message: format!("the daemon failed while doing this: {e}"),
                    }));
                }
                if let Some(progress) = updates.borrow_and_update().clone() {
                    last = progress;
                }
                if tokio::time::Instant::now() < quiet_until {
                    held = true;
                    continue;
                }
                if send(write, &Response::Progress { progress: last.clone() }).await.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep_until(quiet_until), if held => {
                held = false;
                if send(write, &Response::Progress { progress: last.clone() }).await.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep(KEEPALIVE) => {
                if send(write, &Response::Progress { progress: last.clone() }).await.is_err() {
                    return None;
                }
            }
        }
    }
}

async fn send(write: &mut (impl AsyncWrite + Unpin), response: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response)
        .unwrap_or_else(|e| format!(r#"{{"result":"error","message":"cannot encode the reply: {e}"}}"#));
    text.push('\n');
    write.write_all(text.as_bytes()).await
}
