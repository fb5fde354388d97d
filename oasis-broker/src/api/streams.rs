//! The four streams the dashboards keep open: `/traffic`, `/memory`,
//! `/logs` and `/connections`, each a WebSocket of JSON messages (a plain
//! GET answers once). A stream ends when its client goes; a slow client
//! misses log lines rather than holding the daemon's memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{Api, ApiError, clash, logs};
use crate::control::RuleView;

type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

const EVERY_SECOND: Duration = Duration::from_secs(1);
/// The shortest `/connections?interval=` taken, in milliseconds.
const MIN_INTERVAL_MS: u64 = 250;

/// Sends `next()` every `every` until the client goes.
async fn tick<F, Fut>(mut socket: WebSocket, every: Duration, mut next: F)
where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Option<Message>> + Send,
{
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = timer.tick() => {
                let Some(message) = next().await else { continue };
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

pub(super) async fn connections(
    State(api): State<Arc<Api>>,
    upgrade: Upgrade,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let Ok(upgrade) = upgrade else {
        let text = api.connections().await?;
        let body = axum::body::Bytes::from(text);
        return Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response());
    };
    let every = query
        .get("interval")
        .and_then(|ms| ms.parse::<u64>().ok())
        .unwrap_or(1000)
        .max(MIN_INTERVAL_MS);
    Ok(upgrade.on_upgrade(move |socket| async move {
        tick(socket, Duration::from_millis(every), || {
            let api = api.clone();
            // The rendering is shared, not copied, between clients.
            async move { api.connections().await.ok().map(Message::Text) }
        })
        .await
    }))
}

/// Upload and download rates of the uplinks, and the claimed traffic's
/// rate by carrier (`carriers`, Oasis' own field).
struct Rates {
    last: Option<((u64, u64), BTreeMap<String, u64>)>,
}

impl Rates {
    fn next(&mut self, uplinks: (u64, u64), carriers: BTreeMap<String, u64>) -> Value {
        let (up, down, per_carrier) = match &self.last {
            Some(((tx, rx), before)) => (
                uplinks.0.saturating_sub(*tx),
                uplinks.1.saturating_sub(*rx),
                carriers
                    .iter()
                    .map(|(name, bytes)| {
                        (
                            name.clone(),
                            bytes.saturating_sub(*before.get(name).unwrap_or(bytes)),
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            ),
            None => (0, 0, carriers.keys().map(|k| (k.clone(), 0)).collect()),
        };
        self.last = Some((uplinks, carriers));
        json!({ "up": up, "down": down, "upTotal": uplinks.0, "downTotal": uplinks.1, "carriers": per_carrier })
    }
}

/// Bytes the kernel counted for rules, by the carrier each names (a
/// metric rule's under its group).
fn carrier_bytes(rules: &[RuleView]) -> BTreeMap<String, u64> {
    let mut bytes = BTreeMap::new();
    for rule in rules.iter().filter(|r| !r.name_rule) {
        let name = match &rule.candidates {
            Some(_) => clash::group_name(rule),
            None => clash::carrier(&rule.via),
        };
        *bytes.entry(name).or_default() += rule.bytes;
    }
    bytes
}

pub(super) async fn traffic(State(api): State<Arc<Api>>, upgrade: Upgrade) -> Result<Response, ApiError> {
    let Ok(upgrade) = upgrade else {
        let rules = api.rules().await?;
        let mut rates = Rates { last: None };
        return Ok(axum::Json(rates.next(api.source.uplink_bytes(), carrier_bytes(&rules))).into_response());
    };
    Ok(upgrade.on_upgrade(move |socket| async move {
        let rates = Arc::new(tokio::sync::Mutex::new(Rates { last: None }));
        tick(socket, EVERY_SECOND, || {
            let (api, rates) = (api.clone(), rates.clone());
            async move {
                let rules = api.rules().await.unwrap_or_default();
                let sample = rates
                    .lock()
                    .await
                    .next(api.source.uplink_bytes(), carrier_bytes(&rules));
                Some(Message::text(sample.to_string()))
            }
        })
        .await
    }))
}

pub(super) async fn memory(State(api): State<Arc<Api>>, upgrade: Upgrade) -> Response {
    let sample = |api: &Api| json!({ "inuse": api.source.memory(), "oslimit": 0 });
    let Ok(upgrade) = upgrade else {
        return axum::Json(sample(&api)).into_response();
    };
    upgrade.on_upgrade(move |socket| async move {
        tick(socket, EVERY_SECOND, || {
            let api = api.clone();
            async move { Some(Message::text(sample(&api).to_string())) }
        })
        .await
    })
}

pub(super) async fn logs(
    State(api): State<Arc<Api>>,
    upgrade: Upgrade,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::bad("/logs is a WebSocket stream"));
    };
    let level = query.get("level").cloned().unwrap_or_else(|| "info".into());
    let mut lines = api.logs.subscribe();
    Ok(upgrade.on_upgrade(move |mut socket| async move {
        loop {
            let message = tokio::select! {
                line = lines.recv() => match line {
                    Ok(line) if logs::passes(line.level, &level) => {
                        json!({ "type": logs::level_name(line.level), "payload": line.text })
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => json!({
                        "type": "warning",
                        "payload": format!("oasis: this stream fell behind and missed {missed} log lines"),
                    }),
                    Err(RecvError::Closed) => return,
                },
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                },
            };
            if socket.send(Message::text(message.to_string())).await.is_err() {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_deltas_by_carrier() {
        let mut rates = Rates { last: None };
        let first = rates.next((1000, 5000), BTreeMap::from([("detour".into(), 100)]));
        assert_eq!(
            (first["up"].as_u64(), first["carriers"]["detour"].as_u64()),
            (Some(0), Some(0))
        );
        let second = rates.next(
            (1600, 5100),
            BTreeMap::from([("detour".into(), 400), ("DIRECT".into(), 50)]),
        );
        assert_eq!(second["up"], 600);
        assert_eq!(second["down"], 100);
        assert_eq!(second["carriers"]["detour"], 300);
        assert_eq!(
            second["carriers"]["DIRECT"], 0,
            "new since the last sample: counted from the next"
        );
    }
}
