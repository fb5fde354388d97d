//! The REST API the Clash dashboards speak (metacubexd, yacd, zashboard),
//! Oasis' own views under `/oasis/`, and the web page at `/ui/`. Every
//! request passes the [`guard`] first; what it reads or changes goes
//! through the control requests (`source`), as the CLI's do.

pub mod clash;
pub mod guard;
pub mod logs;
pub mod source;
mod streams;
#[cfg(test)]
mod tests;
mod ui;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

pub use guard::check_settings;
use guard::{Asking, Guard};
pub use logs::LogFeed;
pub use source::Source;

use crate::config::ApiConfig;
use crate::control::{FlowView, MonitorView, OverlayView, Request as Ask, Response as Answer, RuleView};

/// How old a listing of flows, or of connections, may be when read
/// again: the dashboards refresh each second.
const SHARED_FOR: std::time::Duration = std::time::Duration::from_millis(900);
/// How long a rendering of `/connections` of `flows` flows is handed out
/// before a new one is made: [`SHARED_FOR`], or longer for many flows, so
/// that listing and rendering them (about 4 µs a flow) costs its readers
/// at most 1% of a core (10,000 flows: every 4 s).
fn shared_for(flows: usize) -> std::time::Duration {
    SHARED_FOR.max(COST_PER_FLOW * flows as u32 * 100)
}

/// What listing and rendering one flow costs, as `cargo xtask bench
/// --only api` measured it (docs/benchmarks.md).
const COST_PER_FLOW: std::time::Duration = std::time::Duration::from_micros(4);

/// How much older than that a rendering may be handed out while a new
/// one is made.
const STALE_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest a request body may be: the API takes small JSON objects only.
const MAX_BODY: usize = 64 * 1024;

/// What every handler shares.
pub struct Api {
    pub source: Arc<dyn Source>,
    guard: Guard,
    settings: ApiConfig,
    logs: LogFeed,
    history: Mutex<clash::History>,
    /// `/connections` as last rendered, and when.
    rendered: Mutex<Option<(std::time::Instant, Utf8Bytes, usize)>>,
    rendering: tokio::sync::Mutex<()>,
    refreshing: std::sync::atomic::AtomicBool,
}

impl Api {
    pub fn new(
        settings: ApiConfig,
        secret: Option<String>,
        source: Arc<dyn Source>,
        logs: LogFeed,
    ) -> Arc<Api> {
        Arc::new(Api {
            source,
            guard: Guard::new(&settings, secret),
            settings,
            logs,
            history: Mutex::new(clash::History::default()),
            rendered: Mutex::new(None),
            rendering: tokio::sync::Mutex::new(()),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn ask(&self, request: Ask) -> Result<Answer, ApiError> {
        match self.source.call(request).await {
            Answer::Error { message } => Err(ApiError::bad(message)),
            answer => Ok(answer),
        }
    }

    async fn rules(&self) -> Result<Vec<RuleView>, ApiError> {
        match self.ask(Ask::ListRules).await? {
            Answer::Rules { rules } => Ok(rules),
            other => Err(ApiError::unexpected(other)),
        }
    }

    async fn flows(&self) -> Result<Vec<FlowView>, ApiError> {
        // Readers a second apart (dashboards, the streams) share a listing.
        match self
            .ask(Ask::Flows {
                max_age_ms: Some(SHARED_FOR.as_millis() as u64),
            })
            .await?
        {
            Answer::Flows { flows } => Ok(flows),
            other => Err(ApiError::unexpected(other)),
        }
    }

    async fn overlays(&self) -> Result<Vec<OverlayView>, ApiError> {
        match self.ask(Ask::OverlayList).await? {
            Answer::Overlays { overlays } => Ok(overlays),
            other => Err(ApiError::unexpected(other)),
        }
    }

    async fn monitor(&self) -> Result<MonitorView, ApiError> {
        match self.ask(Ask::Monitor).await? {
            Answer::Monitor { monitor } => {
                // Every look at the Monitor adds to the delay history.
                self.history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sample(&monitor, SystemTime::now());
                Ok(*monitor)
            }
            other => Err(ApiError::unexpected(other)),
        }
    }

    async fn hosts(&self) -> clash::Hosts {
        match self.source.call(Ask::Dns).await {
            Answer::Dns { dns } => dns
                .entries
                .into_iter()
                .filter_map(|e| Some((e.fake.parse().ok()?, e.name)))
                .collect(),
            _ => HashMap::new(),
        }
    }

    /// `/connections` as JSON text. While dashboards read it (a second
    /// apart), each reader gets the last rendering and, when that is older
    /// than [`SHARED_FOR`], a new one is made behind it: the packet threads
    /// answer a listing at their next tick (a quarter second when idle),
    /// which no reader should wait for. After [`STALE_AT_MOST`] without a
    /// reader, the next one waits for a fresh listing.
    async fn connections(self: &Arc<Self>) -> Result<Utf8Bytes, ApiError> {
        let cached = self.rendered.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match cached {
            Some((at, text, flows)) if at.elapsed() <= shared_for(flows) => Ok(text),
            Some((at, text, flows)) if at.elapsed() <= shared_for(flows) + STALE_AT_MOST => {
                if !self.refreshing.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    let api = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = api.render().await {
                            tracing::debug!("listing the connections: {}", e.message);
                        }
                        api.refreshing.store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                Ok(text)
            }
            _ => self.render().await,
        }
    }

    /// A new rendering of `/connections`, one at a time.
    async fn render(&self) -> Result<Utf8Bytes, ApiError> {
        let _one = self.rendering.lock().await;
        if let Some((at, text, flows)) = self.rendered.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && at.elapsed() <= shared_for(*flows)
        {
            return Ok(text.clone());
        }
        let (flows, rules, hosts) = tokio::join!(self.flows(), self.rules(), self.hosts());
        let flows = flows?;
        let count = flows.len();
        let text = Utf8Bytes::from(clash::connections(
            &flows,
            &hosts,
            &rules?,
            self.source.memory(),
            SystemTime::now(),
        ));
        *self.rendered.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), text.clone(), count));
        Ok(text)
    }
}

/// An error as the dashboards read it: `{"message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn unexpected(answer: Answer) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the daemon answered something else: {answer:?}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "message": self.message }))).into_response()
    }
}

type Reply = Result<Response, ApiError>;

fn ok(value: Value) -> Reply {
    Ok(axum::Json(value).into_response())
}

fn no_content() -> Reply {
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Every route, behind the guard.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/version", get(version))
        .route(
            "/configs",
            get(configs).patch(patch_configs).put(refused).post(refused),
        )
        .route("/configs/geo", post(refused))
        .route("/restart", post(refused))
        .route("/upgrade", post(refused))
        .route("/upgrade/ui", post(refused))
        .route("/upgrade/geo", post(refused))
        .route("/proxies", get(proxies))
        .route("/proxies/{name}", get(proxy).put(select).delete(unfix))
        .route("/proxies/{name}/delay", get(proxy_delay))
        .route("/group", get(groups))
        .route("/group/{name}", get(proxy))
        .route("/group/{name}/delay", get(group_delay))
        .route("/providers/proxies", get(no_providers))
        .route("/providers/rules", get(no_providers))
        .route("/rules", get(rules))
        .route("/connections", get(streams::connections).delete(close_all))
        .route("/connections/{id}", delete(close_one))
        .route("/traffic", get(streams::traffic))
        .route("/memory", get(streams::memory))
        .route("/logs", get(streams::logs))
        .route("/dns/query", get(dns_query))
        .route("/cache/fakeip/flush", post(flush_fakes))
        .route("/cache/dns/flush", post(no_dns_cache))
        .route("/rules/disable", axum::routing::patch(rules_unchanged))
        .route("/providers/proxies/{name}", get(no_provider).put(no_provider))
        .route("/providers/proxies/{name}/healthcheck", get(no_provider))
        .route("/providers/rules/{name}", put(no_provider))
        .route("/oasis/{view}", get(oasis_view))
        .route("/ui", get(ui::redirect))
        .route("/ui/", get(ui::index))
        .route("/ui/{*file}", get(ui::file))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(api.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Runs the API on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(stop)
        .await
}

/// The guard, and CORS for listed origins.
async fn guard(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let token = Query::<HashMap<String, String>>::try_from_uri(request.uri())
        .ok()
        .and_then(|Query(mut params)| params.remove("token"));
    let path = request.uri().path();
    let asking = Asking {
        host: text(header::HOST),
        origin: text(header::ORIGIN),
        authorization: text(header::AUTHORIZATION),
        token: token.as_deref(),
        websocket: text(header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        static_file: request.method() == Method::GET
            && (path == "/ui" || path.starts_with("/ui/") || path == "/"),
    };
    let origin = asking.origin.map(str::to_string);
    let preflight = request.method() == Method::OPTIONS;
    if preflight {
        // A preflight carries no secret; it may go on for listed origins.
        let allowed = origin.as_deref().is_some_and(|o| api.guard.cors_allows(o))
            && api
                .guard
                .check(&Asking {
                    origin: None,
                    static_file: true,
                    ..asking
                })
                .is_ok();
        if !allowed {
            return ApiError::new(StatusCode::FORBIDDEN, guard::Refusal::Origin.message()).into_response();
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        cors_headers(response.headers_mut(), origin.as_deref().unwrap_or_default());
        return response;
    }
    if let Err(refusal) = api.guard.check(&asking) {
        let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
        return ApiError::new(status, refusal.message()).into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if let Some(origin) = origin.filter(|o| api.guard.cors_allows(o)) {
        cors_headers(headers, &origin);
    }
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

fn cors_headers(headers: &mut HeaderMap, origin: &str) {
    if let Ok(origin) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
}

async fn hello() -> Reply {
    ok(json!({ "hello": "oasis" }))
}

async fn version() -> Reply {
    ok(json!({ "version": format!("oasis v{}", env!("CARGO_PKG_VERSION")), "meta": true, "premium": false }))
}

async fn not_found() -> Reply {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "no such path in the Oasis API (docs/api.md lists them)",
    ))
}

async fn refused() -> Reply {
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "Oasis does not replace its config, restart or upgrade itself through the API: edit the config file \
         or use the `oasis` command",
    ))
}

async fn configs(State(api): State<Arc<Api>>) -> Reply {
    ok(json!({
        "port": 0,
        "socks-port": 0,
        "redir-port": 0,
        "tproxy-port": 0,
        "mixed-port": 0,
        "allow-lan": false,
        "bind-address": api.settings.listen.ip().to_string(),
        "mode": "rule",
        "mode-list": ["rule"],
        "modes": ["rule"],
        "log-level": "info",
        "ipv6": true,
        "tun": { "enable": true, "stack": "oasis", "device": "", "auto-route": false },
        "interface-name": "",
        "external-controller": api.settings.listen.to_string(),
    }))
}

async fn patch_configs(body: axum::body::Bytes) -> Reply {
    let patch: serde_json::Map<String, Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body is not a JSON object: {e}")))?;
    for (key, value) in &patch {
        match (key.as_str(), value.as_str()) {
            ("mode", Some(mode)) if mode.eq_ignore_ascii_case("rule") => {}
            ("mode", _) => {
                return Err(ApiError::bad(
                    "Oasis runs in rule mode only: its rules choose each flow's carrier (`oasis rule`)",
                ));
            }
            _ => {
                return Err(ApiError::bad(format!(
                    "Oasis does not change {key:?} through the API; its config file holds its settings"
                )));
            }
        }
    }
    no_content()
}

async fn proxies(State(api): State<Arc<Api>>) -> Reply {
    let (overlays, rules, monitor) = tokio::join!(api.overlays(), api.rules(), api.monitor());
    let (overlays, rules, monitor) = (overlays?, rules?, monitor?);
    let history = api.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ok(clash::proxies(&overlays, &rules, &monitor, &history))
}

async fn proxy(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Reply {
    let (overlays, rules, monitor) = tokio::join!(api.overlays(), api.rules(), api.monitor());
    let history = api.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut all = clash::proxies(&overlays?, &rules?, &monitor?, &history);
    let found = all["proxies"]
        .get_mut(&name)
        .map(Value::take)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no proxy or group named {name:?}")))?;
    ok(found)
}

async fn groups(State(api): State<Arc<Api>>) -> Reply {
    let (overlays, rules, monitor) = tokio::join!(api.overlays(), api.rules(), api.monitor());
    let history = api.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let all = clash::proxies(&overlays?, &rules?, &monitor?, &history);
    let groups: Vec<Value> = all["proxies"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|p| p["type"] == "URLTest")
        .cloned()
        .collect();
    ok(json!({ "proxies": groups }))
}

#[derive(Deserialize)]
struct Selection {
    name: String,
}

/// `PUT /proxies/{group}`: pins the metric rule to a carrier.
async fn select(State(api): State<Arc<Api>>, Path(group): Path<String>, body: axum::body::Bytes) -> Reply {
    let selection: Selection = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("expected {{\"name\": CARRIER}}: {e}")))?;
    let rules = api.rules().await?;
    let rule = clash::group_rule(&group, &rules).ok_or_else(|| {
        ApiError::bad(format!(
            "{group:?} is not a group: only metric rules' groups can be set"
        ))
    })?;
    api.ask(Ask::Pin {
        rule,
        carrier: Some(clash::daemon_carrier(&selection.name)),
    })
    .await?;
    no_content()
}

/// `DELETE /proxies/{group}`: the Monitor decides again.
async fn unfix(State(api): State<Arc<Api>>, Path(group): Path<String>) -> Reply {
    let rules = api.rules().await?;
    let rule = clash::group_rule(&group, &rules).ok_or_else(|| {
        ApiError::bad(format!(
            "{group:?} is not a group: only metric rules' groups can be set"
        ))
    })?;
    api.ask(Ask::Pin { rule, carrier: None }).await?;
    no_content()
}

/// `GET /proxies/{name}/delay`: the Monitor's measured round trip through
/// the carrier (its probes and flows measure it; the URL is not fetched).
async fn proxy_delay(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Reply {
    let monitor = api.monitor().await?;
    let rtts = clash::best_rtts(&monitor);
    let carrier = clash::daemon_carrier(&name);
    match rtts.get(&carrier) {
        Some(ms) => ok(json!({ "delay": ms.round().max(1.0) as u32 })),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no round trip measured through {name} yet: the Monitor measures carriers of metric rules' flows \
                 (`oasis monitor`)"
            ),
        )),
    }
}

/// `GET /group/{name}/delay`: each of the group's carriers' round trips.
async fn group_delay(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Reply {
    let (rules, monitor) = tokio::join!(api.rules(), api.monitor());
    let (rules, monitor) = (rules?, monitor?);
    let rule = clash::group_rule(&name, &rules)
        .and_then(|id| rules.iter().find(|r| r.id == id))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no group named {name:?}")))?;
    let rtts = clash::best_rtts(&monitor);
    let mut delays = serde_json::Map::new();
    for candidate in rule.candidates.iter().flatten() {
        if let Some(ms) = rtts.get(candidate) {
            delays.insert(clash::carrier(candidate), json!(ms.round().max(1.0) as u32));
        }
    }
    ok(Value::Object(delays))
}

async fn no_provider() -> Reply {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "Oasis has no providers: overlays are joined with `oasis overlay add`, rule lists with `oasis rule import --url`",
    ))
}

async fn no_dns_cache() -> Reply {
    Err(ApiError::bad(
        "Oasis keeps no DNS cache of its own to flush: answers are reused for their TTL (10 s for fake ones)",
    ))
}

async fn rules_unchanged() -> Reply {
    Err(ApiError::bad(
        "rules are changed with `oasis rule add|del` (the API shows them)",
    ))
}

async fn no_providers() -> Reply {
    ok(json!({ "providers": {} }))
}

async fn rules(State(api): State<Arc<Api>>) -> Reply {
    ok(clash::rules(&api.rules().await?))
}

async fn close_all(State(api): State<Arc<Api>>) -> Reply {
    api.ask(Ask::EndFlows { ids: None }).await?;
    no_content()
}

async fn close_one(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Reply {
    let flows = api.flows().await?;
    if !flows.iter().any(|f| f.id == id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no live connection has id {id}"),
        ));
    }
    match api.ask(Ask::EndFlows { ids: Some(vec![id]) }).await? {
        Answer::Done { message } if message.starts_with("ended 1 ") => no_content(),
        Answer::Done { message } => Err(ApiError::new(StatusCode::CONFLICT, message)),
        other => Err(ApiError::unexpected(other)),
    }
}

async fn flush_fakes(State(api): State<Arc<Api>>) -> Reply {
    match api.source.call(Ask::FlushFakes).await {
        Answer::Done { .. } => no_content(),
        Answer::Error { message } => Err(ApiError::new(StatusCode::CONFLICT, message)),
        other => Err(ApiError::unexpected(other)),
    }
}

#[derive(Deserialize)]
struct DnsQuery {
    name: String,
    #[serde(rename = "type", default)]
    rtype: Option<String>,
}

async fn dns_query(State(api): State<Arc<Api>>, Query(query): Query<DnsQuery>) -> Reply {
    let rtype = match query.rtype.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("A") => 1,
        Some("AAAA") => 28,
        Some("CNAME") => 5,
        Some("MX") => 15,
        Some("TXT") => 16,
        Some("NS") => 2,
        Some("HTTPS") => 65,
        Some(other) => other
            .parse()
            .map_err(|_| ApiError::bad(format!("unknown record type {other:?}")))?,
    };
    if query.name.is_empty() || query.name.len() > 253 {
        return Err(ApiError::bad("name must be 1 to 253 characters"));
    }
    let resolved = api
        .source
        .resolve(&query.name, rtype)
        .await
        .map_err(ApiError::bad)?;
    let answers: Vec<Value> = resolved
        .answers
        .iter()
        .map(|r| json!({ "name": r.name, "type": r.rtype, "TTL": r.ttl, "data": r.data }))
        .collect();
    ok(json!({
        "Status": resolved.rcode,
        "Question": [{ "name": query.name, "qtype": rtype, "qclass": 1 }],
        "TC": false, "RD": true, "RA": true, "AD": false, "CD": false,
        "Answer": answers,
    }))
}

/// `/oasis/{view}`: Oasis' own views, as `oasis ... --json` prints them.
async fn oasis_view(State(api): State<Arc<Api>>, Path(view): Path<String>) -> Reply {
    let request = match view.as_str() {
        "status" => Ask::Status,
        "rules" => Ask::ListRules,
        "flows" => Ask::Flows {
            max_age_ms: Some(SHARED_FOR.as_millis() as u64),
        },
        "overlays" => Ask::OverlayList,
        "monitor" => Ask::Monitor,
        "dns" => Ask::Dns,
        _ => return not_found().await,
    };
    let answer = api.ask(request).await?;
    ok(serde_json::to_value(&answer).map_err(|e| ApiError::bad(e.to_string()))?)
}
