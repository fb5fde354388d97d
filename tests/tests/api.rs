//! The REST API of a live daemon in network namespaces, with live flows
//! through an overlay: the calls the Clash dashboards make (metacubexd,
//! yacd, zashboard), the streams they keep open, closing a connection
//! (the application sees it aborted), pinning a metric rule's group, and
//! the guard against other sites. Needs root; `cargo xtask test` runs it.

use std::time::{Duration, Instant};

use oasis_tests::cdp::{self, Browser};
use oasis_tests::{Daemon, SERVER_V4, Topology};
use serde_json::Value;

const API: &str = "127.0.0.1:9090";
const ECHO_PORT: u16 = 7007;

/// One HTTP request from the client namespace: status and JSON body.
const HTTP: &str = r#"
import http.client,json,sys
method,path,headers,body=sys.argv[1],sys.argv[2],json.loads(sys.argv[3]),sys.argv[4]
c=http.client.HTTPConnection('127.0.0.1',9090,timeout=10)
c.putrequest(method,path,skip_host=True)
for k,v in headers.items(): c.putheader(k,v)
data=body.encode() if body else b''
c.putheader('Content-Length',str(len(data)))
c.endheaders(data)
r=c.getresponse()
raw=r.read()
try: parsed=json.loads(raw)
except Exception: parsed=raw.decode(errors='replace')[:200]
print(json.dumps({'status':r.status,'body':parsed,'headers':dict(r.getheaders())}))
"#;

/// A WebSocket client: the handshake's status, then `count` messages.
const WS: &str = r#"
import socket,base64,os,sys,json
path,headers,count=sys.argv[1],json.loads(sys.argv[2]),int(sys.argv[3])
s=socket.create_connection(('127.0.0.1',9090),timeout=10)
key=base64.b64encode(os.urandom(16)).decode()
lines=['GET %s HTTP/1.1'%path,'Upgrade: websocket','Connection: Upgrade','Sec-WebSocket-Key: '+key,'Sec-WebSocket-Version: 13']
lines+=['%s: %s'%kv for kv in headers.items()]
s.sendall(('\r\n'.join(lines)+'\r\n\r\n').encode())
buf=b''
while b'\r\n\r\n' not in buf:
  d=s.recv(4096)
  if not d: break
  buf+=d
head,rest=buf.split(b'\r\n\r\n',1)
status=int(head.split()[1])
msgs=[]
def need(n):
  global rest
  while len(rest)<n: rest+=s.recv(65536)
  out=rest[:n];rest=rest[n:];return out
if status==101:
  for _ in range(count):
    b0,b1=need(2)
    n=b1&127
    if n==126: n=int.from_bytes(need(2),'big')
    elif n==127: n=int.from_bytes(need(8),'big')
    msgs.append(json.loads(need(n)))
print(json.dumps({'status':status,'messages':msgs}))
"#;

struct Client<'a> {
    net: &'a Topology,
    secret: String,
}

impl Client<'_> {
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let output = self.net.client.output(&[
            "python3",
            "-c",
            HTTP,
            method,
            path,
            &Value::Object(headers).to_string(),
            body,
        ]);
        let reply: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: {e}: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (reply["status"].as_u64().unwrap() as u16, reply["body"].clone())
    }

    /// As a dashboard on the API's own origin calls it.
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let bearer = format!("Bearer {}", self.secret);
        self.request(
            method,
            path,
            &[
                ("Host", API),
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, "");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    fn websocket(&self, path: &str, headers: &[(&str, &str)], count: usize) -> (u16, Vec<Value>) {
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let output = self.net.client.output(&[
            "python3",
            "-c",
            WS,
            path,
            &Value::Object(headers).to_string(),
            &count.to_string(),
        ]);
        let reply: Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("ws {path}: {e}: {}", String::from_utf8_lossy(&output.stderr)));
        (
            reply["status"].as_u64().unwrap() as u16,
            reply["messages"].as_array().cloned().unwrap_or_default(),
        )
    }
}

/// A TCP connection to the echo server that waits for what comes back;
/// it prints how it ended.
fn hold_connection(net: &mut Topology) {
    hold_connection_as(net, "held");
}

fn hold_connection_as(net: &mut Topology, name: &str) {
    let script = format!(
        "import socket,sys\n\
         c=socket.create_connection(('{SERVER_V4}',{ECHO_PORT}),timeout=60)\n\
         c.sendall(b'hello');assert c.recv(5)==b'hello'\n\
         print('connected',flush=True)\n\
         try:\n  \
           d=c.recv(10)\n  \
           print('closed' if not d else 'data',flush=True)\n\
         except ConnectionAbortedError: print('aborted',flush=True)\n\
         except ConnectionResetError: print('reset',flush=True)\n\
         except socket.timeout: print('hung',flush=True)\n"
    );
    let client = net.client.clone();
    net.spawn(&client, name, &["python3", "-u", "-c", &script]);
}

/// A daemon joined to the exit, an echo server on the server, and rule 1
/// carrying TCP to it through the exit.
fn echo_through_exit(net: &mut Topology) -> Daemon {
    let (daemon, _) = Daemon::joined_to_exit(net);
    net.start_echo_server(ECHO_PORT);
    let port = ECHO_PORT.to_string();
    daemon.ok(
        net,
        &["rule", "add", "--proto", "tcp", "--dport", &port, "--via", "exit"],
    );
    daemon
}

fn log_of(net: &Topology, process: &str) -> String {
    net.find_process(process).map(|p| p.log()).unwrap_or_default()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn dashboards_see_live_flows_close_them_and_pin_groups() {
    let mut net = Topology::new();
    let daemon = echo_through_exit(&mut net);
    let port = ECHO_PORT.to_string();
    let metric = daemon.json(
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "80", "--metric", "latency", "--json",
        ],
    )["id"]
        .as_u64()
        .unwrap();
    hold_connection(&mut net);
    wait_for("the held connection", || {
        log_of(&net, "held").contains("connected")
    });
    let ui = daemon.json(&net, &["ui", "--json"]);
    assert_eq!(ui["url"], "http://127.0.0.1:9090/ui/");
    let api = Client {
        net: &net,
        secret: ui["secret"].as_str().expect("a secret was made").to_string(),
    };
    assert!(
        std::fs::read_to_string(net.dir.join("api-secret"))
            .unwrap()
            .contains(&api.secret),
        "kept in api.secret_file"
    );

    // What the dashboards fetch when they load.
    let version = api.get("/version");
    assert!(version["version"].as_str().unwrap().starts_with("oasis"));
    assert_eq!(api.get("/configs")["mode"], "rule");
    let proxies = api.get("/proxies");
    let group = format!("rule {metric} (latency)");
    assert_eq!(proxies["proxies"]["exit"]["type"], "Oasis");
    assert_eq!(proxies["proxies"]["DIRECT"]["type"], "Direct");
    assert_eq!(proxies["proxies"][&group]["type"], "URLTest");
    assert_eq!(
        proxies["proxies"][&group]["all"],
        serde_json::json!(["DIRECT", "exit"])
    );
    assert!(proxies["proxies"]["GLOBAL"]["all"].as_array().unwrap().len() >= 3);
    assert_eq!(api.get("/providers/proxies")["providers"], serde_json::json!({}));
    assert_eq!(api.get("/providers/rules")["providers"], serde_json::json!({}));
    let rules = api.get("/rules")["rules"].as_array().unwrap().clone();
    assert_eq!(rules[0]["proxy"], "exit");
    assert!(
        rules[0]["extra"]["hitCount"].as_u64().unwrap() > 0,
        "the kernel counted the held flow: {rules:?}"
    );
    assert_eq!(rules[1]["proxy"], group);

    // The held connection, with its carrier and rule.
    let connections = api.get("/connections");
    let held = connections["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["metadata"]["destinationPort"] == port.as_str())
        .unwrap_or_else(|| panic!("no connection to the echo port: {connections}"))
        .clone();
    assert_eq!(held["chains"][0], "exit");
    assert_eq!(held["metadata"]["destinationIP"], SERVER_V4);
    assert_eq!(held["metadata"]["network"], "tcp");

    // The four streams.
    let token = format!("/traffic?token={}", api.secret);
    let (status, samples) = api.websocket(&token, &[("Host", API)], 2);
    assert_eq!(status, 101);
    assert!(
        samples[1]["up"].is_u64() && samples[1]["carriers"]["exit"].is_u64(),
        "{samples:?}"
    );
    let (status, memory) = api.websocket(&format!("/memory?token={}", api.secret), &[("Host", API)], 1);
    assert_eq!(status, 101);
    assert!(memory[0]["inuse"].as_u64().unwrap() > 1 << 20);
    let path = format!("/connections?interval=250&token={}", api.secret);
    let (status, snapshots) = api.websocket(&path, &[("Host", API)], 2);
    assert_eq!(status, 101);
    assert!(
        snapshots[1]["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == held["id"])
    );

    // Closing it: the application hears at once, and it is gone.
    let (status, body) = api.call(
        "DELETE",
        &format!("/connections/{}", held["id"].as_str().unwrap()),
        "",
    );
    assert_eq!(status, 204, "{body}");
    wait_for("the application to see the close", || {
        let log = log_of(&net, "held");
        log.contains("aborted") || log.contains("reset") || log.contains("closed")
    });
    let ended = log_of(&net, "held");
    assert!(ended.contains("aborted"), "the application saw: {ended}");
    let (status, _) = api.call("DELETE", "/connections/no-such-flow", "");
    assert_eq!(status, 404);

    // Pinning the metric rule's group: new flows of it take the pin.
    let (status, body) = api.call(
        "PUT",
        &format!("/proxies/{}", group.replace(' ', "%20")),
        r#"{"name":"exit"}"#,
    );
    assert_eq!(status, 204, "{body}");
    let monitor = daemon.json(&net, &["monitor", "--json"]);
    assert_eq!(monitor["pins"], serde_json::json!([[metric, "exit"]]));
    assert!(
        net.http_get(SERVER_V4, 80).is_some(),
        "a web request of the metric rule"
    );
    let flows = daemon.json(&net, &["flows", "--json"]);
    let pinned = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == metric)
        .unwrap_or_else(|| panic!("no flow of the metric rule: {flows}"));
    assert_eq!(pinned["carrier"], "exit");
    assert_eq!(pinned["why"], "pinned by the user");
    assert_eq!(api.get("/proxies")["proxies"][&group]["now"], "exit");
    let (status, _) = api.call("DELETE", &format!("/proxies/{}", group.replace(' ', "%20")), "");
    assert_eq!(status, 204);
    assert!(daemon.json(&net, &["monitor", "--json"]).get("pins").is_none());
    // A carrier the rule may not take is refused, and says which it may.
    let (status, body) = api.call(
        "PUT",
        &format!("/proxies/{}", group.replace(' ', "%20")),
        r#"{"name":"nowhere"}"#,
    );
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("underlay, exit"),
        "{body}"
    );

    // DNS through the daemon's own service.
    let (status, dns) = api.call("GET", "/dns/query?name=localhost&type=A", "");
    assert_eq!(status, 200, "{dns}");
    assert!(dns["Status"].is_u64());
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn a_live_api_refuses_other_sites_and_config_replacement() {
    let mut net = Topology::new();
    let daemon = Daemon::start(&mut net, "");
    daemon.ok(
        &net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", "7", "--via", "underlay",
        ],
    );
    let secret = daemon.json(&net, &["ui", "--json"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let api = Client { net: &net, secret };
    let bearer = format!("Bearer {}", api.secret);
    // No secret; a page of another site (a no-cors write carries its
    // Origin); a rebinding attacker's Host.
    assert_eq!(api.request("GET", "/rules", &[("Host", API)], "").0, 401);
    let (status, _) = api.request(
        "POST",
        "/cache/fakeip/flush",
        &[
            ("Host", API),
            ("Origin", "http://evil.example"),
            ("Authorization", &bearer),
        ],
        "",
    );
    assert_eq!(status, 403);
    assert_eq!(
        api.request(
            "GET",
            "/rules",
            &[("Host", "evil.example:9090"), ("Authorization", &bearer)],
            ""
        )
        .0,
        403
    );
    // A cross-site WebSocket, token and all.
    let (status, _) = api.websocket(
        &format!("/connections?token={}", api.secret),
        &[("Host", API), ("Origin", "http://evil.example")],
        0,
    );
    assert_eq!(status, 403);
    // The Clash Verge case: replacing the config is never possible.
    for (method, path) in [
        ("PUT", "/configs?force=true"),
        ("POST", "/restart"),
        ("POST", "/upgrade"),
    ] {
        let (status, _) = api.call(method, path, r#"{"path":"/tmp/evil.yaml"}"#);
        assert_eq!(status, 403, "{method} {path}");
    }
    // And the page itself: our own, with its CSP.
    let (status, page) = api.request("GET", "/ui/", &[("Host", API)], "");
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("<title>Oasis</title>"));
    let rules = daemon.json(&net, &["rule", "list", "--json"]);
    assert_eq!(rules.as_array().unwrap().len(), 1, "nothing changed");
}

/// The page in a real browser, from a live daemon with live flows: it
/// shows them, closing one ends it (the application sees it aborted),
/// nothing goes to the console as an error; and a page of another origin,
/// or one reached by a rebinding name, can neither read nor change
/// anything.
#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn the_page_in_a_browser_shows_flows_and_closes_one_and_other_sites_cannot() {
    let mut net = Topology::new();
    let daemon = echo_through_exit(&mut net);
    let port = ECHO_PORT.to_string();
    hold_connection_as(&mut net, "closed-by-page");
    hold_connection_as(&mut net, "kept");
    wait_for("the held connections", || {
        log_of(&net, "closed-by-page").contains("connected") && log_of(&net, "kept").contains("connected")
    });
    let secret = daemon.json(&net, &["ui", "--json"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    // Another site, on another loopback address.
    std::fs::write(net.dir.join("evil.html"), "<title>elsewhere</title>").unwrap();
    let client = net.client.clone();
    let dir = net.dir.to_string_lossy().into_owned();
    net.spawn(
        &client,
        "elsewhere",
        &[
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "127.0.0.2",
            "--directory",
            &dir,
        ],
    );
    let profile = net.dir.join("chromium");
    let args = cdp::browser_args(&profile, "MAP rebound.test 127.0.0.1");
    let mut command = vec!["chromium"];
    command.extend(args.iter().map(String::as_str));
    net.spawn(&client, "chromium", &command);

    let ns = net.client.clone();
    let shot = net.dir.join("page.png");
    let secret_in = secret.clone();
    let port_in = port.clone();
    let session = std::thread::spawn(move || {
        ns.enter();
        let mut browser = Browser::connect();
        browser.navigate(&format!("http://127.0.0.1:9090/ui/#secret={secret_in}"));
        browser.wait_for(
            "the live state",
            "document.getElementById('state').textContent === 'live'",
        );
        assert_eq!(
            browser.eval("location.hash"),
            "",
            "the secret left the address bar"
        );
        browser.eval("document.querySelector('[data-tab=connections]').click()");
        let row = format!(
            "[...document.querySelectorAll('#flows tr')].filter(r => r.textContent.includes(':{port_in}'))"
        );
        browser.wait_for("both flows", &format!("{row}.length === 2"));
        let text = browser.eval(&format!("{row}[0].textContent"));
        assert!(text.as_str().unwrap().contains("exit ← rule 1"), "{text}");
        let png = browser.screenshot();
        std::fs::write(&shot, &png).unwrap();
        // Close the flow of the first held connection's port.
        let first_port = browser.eval(&format!(
            "{row}[0].querySelector('td').textContent.split(' ')[1].split(':')[1]"
        ));
        browser.eval(&format!("{row}[0].querySelector('button').click()"));
        browser.wait_for("the closed flow to go", &format!("{row}.length === 1"));
        let page_errors = std::mem::take(&mut browser.errors);

        // A page of another origin, which even knows the secret.
        browser.navigate("http://127.0.0.2:8000/evil.html");
        let tried = browser.eval(&format!(
            "(async () => {{ const out = {{}}; \
               const api = 'http://127.0.0.1:9090/connections'; \
               try {{ const r = await fetch(api, {{headers: {{Authorization: 'Bearer {secret_in}'}}}}); out.read = r.status; }} \
               catch (e) {{ out.read = 'blocked'; }} \
               try {{ const r = await fetch(api, {{mode: 'no-cors'}}); out.opaque = r.type; }} catch (e) {{ out.opaque = 'blocked'; }} \
               try {{ await fetch(api, {{method: 'DELETE', mode: 'no-cors'}}); out.delete = 'sent'; }} catch (e) {{ out.delete = 'blocked'; }} \
               try {{ await fetch('http://127.0.0.1:9090/cache/fakeip/flush', {{method: 'POST', mode: 'no-cors'}}); }} catch (e) {{}} \
               return out; }})()"
        ));
        // A name of the attacker's that resolves to 127.0.0.1: the page is
        // same-origin with it, and the Host header gives it away.
        browser.navigate("http://rebound.test:9090/ui/");
        let rebound_page = browser.eval("document.body.innerText");
        let rebound_read = browser.eval(&format!(
            "fetch('/connections', {{headers: {{Authorization: 'Bearer {secret_in}'}}}}).then(r => r.status)"
        ));
        (first_port, page_errors, tried, rebound_page, rebound_read)
    });
    let (first_port, page_errors, tried, rebound_page, rebound_read) =
        session.join().expect("the browser session");
    assert!(
        page_errors.is_empty(),
        "the page reported errors: {page_errors:?}"
    );
    // The application of the closed flow heard; the other did not.
    wait_for("the application to see the close", || {
        log_of(&net, "closed-by-page").contains("aborted") || log_of(&net, "kept").contains("aborted")
    });
    let flows = daemon.json(&net, &["flows", "--json"]);
    let live_ports: Vec<u64> = flows
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["dst"]
                .as_str()
                .is_some_and(|d| d.ends_with(&format!(":{port}")))
        })
        .map(|f| {
            f["src"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(live_ports.len(), 1, "one flow left: {flows}");
    assert_ne!(
        Some(live_ports[0].to_string()),
        first_port.as_str().map(String::from)
    );
    // The other site read nothing and ended nothing.
    assert_eq!(tried["read"], "blocked", "{tried}");
    assert_eq!(tried["opaque"], "opaque");
    std::thread::sleep(Duration::from_millis(300));
    let aborted = ["closed-by-page", "kept"]
        .iter()
        .filter(|p| log_of(&net, p).contains("aborted"))
        .count();
    assert_eq!(
        aborted, 1,
        "the page closed one flow; the other site's DELETE closed none"
    );
    assert!(
        rebound_page
            .as_str()
            .unwrap()
            .contains("not one the API answers to"),
        "{rebound_page}"
    );
    assert_eq!(rebound_read, 403);
    // The screenshot, for the docs (`docs/api-page.png`).
    let png = std::fs::read(net.dir.join("page.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let _ = std::fs::create_dir_all(oasis_tests::workspace_target());
    let _ = std::fs::write(oasis_tests::workspace_target().join("api-page.png"), png);
}
