//! The API against a daemon that answers from fixed views: the calls the
//! dashboards make, in the shapes they parse, and the guard's refusals.
//! The netns test (`tests/tests/api.rs`) makes the same calls against a
//! live daemon with live flows.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt;

use super::source::{Record, Resolved, Source};
use super::*;
use crate::control::{DnsTableView, FakeView, StatusView};

/// A daemon with one overlay, a metric rule, a header rule and one flow.
#[derive(Default)]
struct Fixed {
    asked: Mutex<Vec<Ask>>,
}

fn flow() -> FlowView {
    FlowView {
        id: "0f0f0f0f-0000-0000-0000-000000000001".into(),
        flow: "tcp 10.0.0.2:40000 -> 203.0.113.9:443".into(),
        proto: 6,
        src: "10.0.0.2:40000".parse().unwrap(),
        dst: "203.0.113.9:443".parse().unwrap(),
        rule: Some(2),
        carrier: "detour".into(),
        fake: Some("198.18.0.5".into()),
        ..FlowView::default()
    }
}

fn rules() -> Vec<RuleView> {
    vec![
        RuleView {
            id: 1,
            subset: "tcp dport 8080".into(),
            via: "underlay".into(),
            name_rule: false,
            packets: 7,
            bytes: 700,
            answers: None,
            list: None,
            candidates: None,
        },
        RuleView {
            id: 2,
            subset: "name-suffix example.org".into(),
            via: "latency".into(),
            name_rule: true,
            packets: 0,
            bytes: 0,
            answers: Some(4),
            list: None,
            candidates: Some(vec!["underlay".into(), "detour".into()]),
        },
    ]
}

#[async_trait::async_trait]
impl Source for Fixed {
    async fn call(&self, request: Ask) -> Answer {
        self.asked.lock().unwrap().push(request.clone());
        match request {
            Ask::ListRules => Answer::Rules { rules: rules() },
            Ask::Flows { .. } => Answer::Flows { flows: vec![flow()] },
            Ask::OverlayList => Answer::Overlays {
                overlays: vec![OverlayView {
                    name: "detour".into(),
                    ..OverlayView::default()
                }],
            },
            Ask::Monitor => Answer::Monitor {
                monitor: Box::default(),
            },
            Ask::Status => Answer::Status {
                status: Box::new(StatusView::default()),
            },
            Ask::Dns => Answer::Dns {
                dns: Box::new(DnsTableView {
                    enabled: true,
                    entries: vec![FakeView {
                        name: "www.example.org".into(),
                        fake: "198.18.0.5".into(),
                        ..FakeView::default()
                    }],
                }),
            },
            Ask::Pin { rule: 2, .. } => Answer::Done {
                message: "pinned".into(),
            },
            Ask::Pin { rule, .. } => Answer::Error {
                message: format!("rule {rule} is not a metric rule"),
            },
            Ask::EndFlows { ids } => Answer::Done {
                message: format!("ended {} flow(s)", ids.map_or(1, |ids| ids.len())),
            },
            Ask::FlushFakes => Answer::Error {
                message: "1 fake address(es) are held by live flows; nothing was forgotten".into(),
            },
            other => Answer::Error {
                message: format!("not in this test: {other:?}"),
            },
        }
    }

    fn uplink_bytes(&self) -> (u64, u64) {
        (1000, 2000)
    }

    fn memory(&self) -> u64 {
        42 << 20
    }

    async fn resolve(&self, name: &str, rtype: u16) -> Result<Resolved, String> {
        Ok(Resolved {
            rcode: 0,
            answers: vec![Record {
                name: format!("{name}."),
                rtype,
                ttl: 10,
                data: "198.18.0.5".into(),
            }],
        })
    }
}

const SECRET: &str = "a-long-test-secret";

fn api_with(settings: ApiConfig, secret: Option<&str>) -> (Arc<Api>, Arc<Fixed>) {
    let source = Arc::new(Fixed::default());
    let api = Api::new(
        settings,
        secret.map(String::from),
        source.clone(),
        LogFeed::global().clone(),
    );
    (api, source)
}

fn api() -> (Arc<Api>, Arc<Fixed>) {
    api_with(ApiConfig::default(), Some(SECRET))
}

async fn send(api: &Arc<Api>, request: HttpRequest<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = router(api.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 22).await.unwrap();
    let json = serde_json::from_slice(&body).unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
    (status, headers, json)
}

fn call(method: &str, path: &str, body: Option<&str>) -> HttpRequest<Body> {
    HttpRequest::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "127.0.0.1:9090")
        .header(header::AUTHORIZATION, format!("Bearer {SECRET}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap()
}

/// The calls metacubexd, yacd and zashboard make on load and while
/// shown, with the fields they read (written down from their API modules).
#[tokio::test]
async fn the_dashboards_calls_answer_in_their_shapes() {
    let (api, _) = api();
    let (status, _, version) = send(&api, call("GET", "/version", None)).await;
    assert_eq!(status, 200);
    assert!(version["version"].as_str().unwrap().starts_with("oasis v"));
    assert_eq!(version["meta"], true);

    let (_, _, configs) = send(&api, call("GET", "/configs", None)).await;
    for field in [
        "port",
        "socks-port",
        "mixed-port",
        "redir-port",
        "tproxy-port",
        "allow-lan",
        "mode",
        "log-level",
    ] {
        assert!(configs.get(field).is_some(), "configs lacks {field}");
    }
    assert_eq!(configs["mode"], "rule");

    let (_, _, proxies) = send(&api, call("GET", "/proxies", None)).await;
    let proxies = &proxies["proxies"];
    for name in ["GLOBAL", "DIRECT", "detour", "rule 2 (latency)"] {
        let proxy = &proxies[name];
        assert_eq!(proxy["name"], name);
        assert!(
            proxy["type"].is_string() && proxy["history"].is_array(),
            "{name}: {proxy}"
        );
    }
    assert!(proxies["GLOBAL"]["all"].as_array().unwrap().len() >= 3);
    assert_eq!(proxies["rule 2 (latency)"]["now"], "DIRECT");

    let (status, _, one) = send(&api, call("GET", "/proxies/rule%202%20(latency)", None)).await;
    assert_eq!((status, one["type"].as_str()), (StatusCode::OK, Some("URLTest")));
    assert_eq!(send(&api, call("GET", "/proxies/nothing", None)).await.0, 404);

    for path in ["/providers/proxies", "/providers/rules"] {
        let (status, _, providers) = send(&api, call("GET", path, None)).await;
        assert_eq!(
            (status, providers["providers"].is_object()),
            (StatusCode::OK, true),
            "{path}"
        );
    }

    let (_, _, rules) = send(&api, call("GET", "/rules", None)).await;
    let rules = rules["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    for field in ["type", "payload", "proxy", "size"] {
        assert!(rules[0].get(field).is_some(), "rule lacks {field}");
    }
    assert_eq!(rules[0]["extra"]["hitCount"], 7);

    let (_, _, connections) = send(&api, call("GET", "/connections", None)).await;
    let c = &connections["connections"][0];
    assert_eq!(c["id"], flow().id);
    assert_eq!(c["metadata"]["host"], "www.example.org");
    assert_eq!(c["metadata"]["destinationPort"], "443");
    assert_eq!(c["chains"], serde_json::json!(["detour", "rule 2"]));
    assert!(connections["uploadTotal"].is_u64() && connections["downloadTotal"].is_u64());

    let (_, _, traffic) = send(&api, call("GET", "/traffic", None)).await;
    assert!(traffic["up"].is_u64() && traffic["down"].is_u64());
    let (_, _, memory) = send(&api, call("GET", "/memory", None)).await;
    assert_eq!(memory["inuse"], 42 << 20);

    let (status, _, dns) = send(&api, call("GET", "/dns/query?name=www.example.org&type=A", None)).await;
    assert_eq!(status, 200);
    assert_eq!(dns["Status"], 0);
    assert_eq!(dns["Answer"][0]["data"], "198.18.0.5");
    assert_eq!(dns["Answer"][0]["type"], 1);
}

#[tokio::test]
async fn changes_go_through_the_control_requests() {
    let (api, source) = api();
    let (status, _, _) = send(
        &api,
        call(
            "PUT",
            "/proxies/rule%202%20(latency)",
            Some(r#"{"name":"detour"}"#),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        send(&api, call("DELETE", "/proxies/rule%202%20(latency)", None))
            .await
            .0,
        204
    );
    // Not a group: a header rule's carrier is the rule's own.
    let (status, _, error) = send(&api, call("PUT", "/proxies/detour", Some(r#"{"name":"DIRECT"}"#))).await;
    assert_eq!(status, 400);
    assert!(error["message"].as_str().unwrap().contains("not a group"));

    assert_eq!(
        send(&api, call("DELETE", &format!("/connections/{}", flow().id), None))
            .await
            .0,
        204
    );
    assert_eq!(
        send(&api, call("DELETE", "/connections/no-such-id", None))
            .await
            .0,
        404
    );
    assert_eq!(send(&api, call("DELETE", "/connections", None)).await.0, 204);

    let (status, _, error) = send(&api, call("POST", "/cache/fakeip/flush", None)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error["message"].as_str().unwrap().contains("held by live flows"));

    assert_eq!(
        send(&api, call("PATCH", "/configs", Some(r#"{"mode":"rule"}"#)))
            .await
            .0,
        204
    );
    let (status, _, error) = send(&api, call("PATCH", "/configs", Some(r#"{"mode":"global"}"#))).await;
    assert_eq!(status, 400);
    assert!(error["message"].as_str().unwrap().contains("rule mode only"));

    let asked = source.asked.lock().unwrap().clone();
    assert!(asked.contains(&Ask::Pin {
        rule: 2,
        carrier: Some("detour".into())
    }));
    assert!(asked.contains(&Ask::Pin {
        rule: 2,
        carrier: None
    }));
    assert!(asked.contains(&Ask::EndFlows {
        ids: Some(vec![flow().id])
    }));
    assert!(asked.contains(&Ask::EndFlows { ids: None }));
}

/// What replaced a Clash client's config from any web page
/// (QVD-2025-20937) is refused outright, with the secret or without.
#[tokio::test]
async fn config_replacement_restart_and_upgrade_are_refused() {
    let (api, source) = api();
    for (method, path) in [
        ("PUT", "/configs?force=true"),
        ("POST", "/configs"),
        ("POST", "/restart"),
        ("POST", "/upgrade"),
        ("POST", "/upgrade/ui"),
        ("POST", "/upgrade/geo"),
        ("POST", "/configs/geo"),
    ] {
        let (status, _, error) = send(
            &api,
            call(method, path, Some(r#"{"path":"/tmp/x.yaml","payload":""}"#)),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(error["message"].is_string());
    }
    assert!(source.asked.lock().unwrap().is_empty(), "none reached the daemon");
}

fn from(
    host: &str,
    origin: Option<&str>,
    secret: Option<&str>,
    method: &str,
    path: &str,
) -> HttpRequest<Body> {
    let mut request = HttpRequest::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    if let Some(secret) = secret {
        request = request.header(header::AUTHORIZATION, format!("Bearer {secret}"));
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn other_sites_can_neither_read_nor_change_anything() {
    let (api, source) = api();
    // No secret, a wrong one.
    assert_eq!(
        send(&api, from("127.0.0.1:9090", None, None, "GET", "/connections"))
            .await
            .0,
        401
    );
    assert_eq!(
        send(&api, from("127.0.0.1:9090", None, Some("guess"), "GET", "/rules"))
            .await
            .0,
        401
    );
    // A page elsewhere, with the secret even: a `no-cors` POST or DELETE
    // carries its Origin.
    for (method, path) in [
        ("POST", "/cache/fakeip/flush"),
        ("DELETE", "/connections"),
        ("GET", "/rules"),
    ] {
        let (status, headers, _) = send(
            &api,
            from(
                "127.0.0.1:9090",
                Some("http://evil.example"),
                Some(SECRET),
                method,
                path,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
    // DNS rebinding: the attacker's name resolved to 127.0.0.1.
    let (status, _, _) = send(
        &api,
        from("evil.example:9090", None, Some(SECRET), "GET", "/rules"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let rebound = from(
        "evil.example:9090",
        Some("http://evil.example:9090"),
        None,
        "GET",
        "/ui/",
    );
    assert_eq!(
        send(&api, rebound).await.0,
        StatusCode::FORBIDDEN,
        "not even the page"
    );
    // A WebSocket from another site (browsers send no preflight for those).
    let ws = HttpRequest::builder()
        .uri(format!("/connections?token={SECRET}"))
        .header(header::HOST, "127.0.0.1:9090")
        .header(header::ORIGIN, "http://evil.example")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&api, ws).await.0, StatusCode::FORBIDDEN);
    // A preflight from another site gets no CORS headers.
    let (status, headers, _) = send(
        &api,
        from(
            "127.0.0.1:9090",
            Some("http://evil.example"),
            None,
            "OPTIONS",
            "/rules",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    assert!(
        source.asked.lock().unwrap().is_empty(),
        "nothing reached the daemon"
    );
}

#[tokio::test]
async fn a_listed_origin_gets_cors_and_still_needs_the_secret() {
    let settings = ApiConfig {
        cors_origins: vec!["http://dash.example:8080".into()],
        ..ApiConfig::default()
    };
    let (api, _) = api_with(settings, Some(SECRET));
    let origin = Some("http://dash.example:8080");
    let (status, headers, _) = send(&api, from("127.0.0.1:9090", origin, None, "OPTIONS", "/rules")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "http://dash.example:8080"
    );
    assert!(
        headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .contains("Authorization")
    );
    assert_eq!(
        send(&api, from("127.0.0.1:9090", origin, None, "GET", "/rules"))
            .await
            .0,
        401
    );
    let (status, headers, _) = send(
        &api,
        from("127.0.0.1:9090", origin, Some(SECRET), "GET", "/rules"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "http://dash.example:8080"
    );
}

#[tokio::test]
async fn the_page_is_small_self_contained_and_needs_no_secret_to_load() {
    let (api, _) = api();
    let page = from("127.0.0.1:9090", None, None, "GET", "/ui/");
    let (status, headers, body) = send(&api, page).await;
    assert_eq!(status, 200);
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = body.as_str().unwrap();
    assert!(html.contains("app.js") && !html.contains("http://") && !html.contains("https://"));
    assert!(
        ui::page_bytes() <= 150 * 1024,
        "the page is {} bytes",
        ui::page_bytes()
    );
    for file in ["app.js", "app.css"] {
        let (status, _, _) = send(
            &api,
            from("localhost:9090", None, None, "GET", &format!("/ui/{file}")),
        )
        .await;
        assert_eq!(status, 200, "{file}");
    }
    assert_eq!(
        send(
            &api,
            from("localhost:9090", None, None, "GET", "/ui/../Cargo.toml")
        )
        .await
        .0,
        404
    );
    // Its data is not open.
    assert_eq!(
        send(&api, from("localhost:9090", None, None, "GET", "/oasis/status"))
            .await
            .0,
        401
    );
}

#[tokio::test]
async fn a_dashboards_own_files_are_served_from_ui_dir_and_nothing_outside_it() {
    let dir = std::env::temp_dir().join(format!("oasis-ui-dir-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), "<title>metacubexd</title>").unwrap();
    std::fs::write(dir.join("assets/x.js"), "let x = 1;").unwrap();
    let settings = ApiConfig {
        ui_dir: Some(dir.clone()),
        ..ApiConfig::default()
    };
    let (api, _) = api_with(settings, Some(SECRET));
    let (status, _, body) = send(&api, from("localhost:9090", None, None, "GET", "/ui/")).await;
    assert_eq!(
        (status, body.as_str().unwrap()),
        (StatusCode::OK, "<title>metacubexd</title>")
    );
    assert_eq!(
        send(&api, from("localhost:9090", None, None, "GET", "/ui/assets/x.js"))
            .await
            .0,
        200
    );
    for escape in [
        "/ui/../../etc/passwd",
        "/ui/%2e%2e/%2e%2e/etc/passwd",
        "/ui//etc/passwd",
    ] {
        let (status, _, body) = send(&api, from("localhost:9090", None, None, "GET", escape)).await;
        assert!(!body.to_string().contains("root:"), "{escape}: {status}");
        assert_ne!(status, 200, "{escape}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_loopback_api_without_a_secret_answers_only_loopback_hosts() {
    let settings = ApiConfig {
        secret: Some(String::new()),
        ..ApiConfig::default()
    };
    let (api, _) = api_with(settings, None);
    assert_eq!(
        send(&api, from("127.0.0.1:9090", None, None, "GET", "/rules"))
            .await
            .0,
        200
    );
    assert_eq!(
        send(&api, from("oasis.example:9090", None, None, "GET", "/rules"))
            .await
            .0,
        403
    );
}

#[tokio::test]
async fn hostile_bodies_and_queries_are_refused_with_a_message() {
    let (api, source) = api();
    let huge = format!(r#"{{"mode":"{}"}}"#, "x".repeat(MAX_BODY + 1));
    let (status, _, _) = send(&api, call("PATCH", "/configs", Some(&huge))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    for body in ["", "[1,2]", "{\"mode\":", "null"] {
        let (status, _, error) = send(&api, call("PATCH", "/configs", Some(body))).await;
        assert_eq!(status, 400, "{body:?}");
        assert!(error["message"].is_string());
    }
    let (status, _, _) = send(&api, call("PUT", "/proxies/rule%202%20(latency)", Some("{}"))).await;
    assert_eq!(status, 400);
    let long_name = format!("/dns/query?name={}", "a".repeat(300));
    assert_eq!(send(&api, call("GET", &long_name, None)).await.0, 400);
    assert_eq!(
        send(&api, call("GET", "/dns/query?name=x&type=NOPE", None))
            .await
            .0,
        400
    );
    assert_eq!(send(&api, call("GET", "/dns/query", None)).await.0, 400);
    // A WebSocket with the wrong token never upgrades.
    let ws = HttpRequest::builder()
        .uri("/logs?token=wrong")
        .header(header::HOST, "127.0.0.1:9090")
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&api, ws).await.0, StatusCode::UNAUTHORIZED);
    let asked = source.asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|a| matches!(a, Ask::ListRules)),
        "only the group lookup reached the daemon: {asked:?}"
    );
}
