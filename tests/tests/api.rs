//! The REST API of a live daemon in network namespaces, with live flows
//! through an overlay: the calls the Clash dashboards make (metacubexd,
//! yacd, zashboard), the streams they keep open, closing a connection
//! (the application sees it aborted), pinning a metric rule's group, and
//! the guard against other sites. Needs root; `cargo xtask test` runs it.

use std::time::{Duration, Instant};

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
    net.spawn(&client, "held", &["python3", "-u", "-c", &script]);
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
    let (daemon, _) = Daemon::joined_to_exit(&mut net);
    net.start_echo_server(ECHO_PORT);
    let port = ECHO_PORT.to_string();
    daemon.ok(&net, &["rule", "add", "--proto", "tcp", "--dport", &port, "--via", "exit"]);
    let metric = daemon.json(
        &net,
        &["rule", "add", "--proto", "tcp", "--dport", "80", "--metric", "latency", "--json"],
    )["id"]
        .as_u64()
        .unwrap();
    hold_connection(&mut net);
    wait_for("the held connection", || log_of(&net, "held").contains("connected"));
    let ui = daemon.json(&net, &["ui", "--json"]);
    assert_eq!(ui["url"], "http://127.0.0.1:9090/ui/");
    let api = Client {
        net: &net,
        secret: ui["secret"].as_str().expect("a secret was made").to_string(),
    };
    assert!(
        std::fs::read_to_string(net.dir.join("api-secret")).unwrap().contains(&api.secret),
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
    assert_eq!(proxies["proxies"][&group]["all"], serde_json::json!(["DIRECT", "exit"]));
    assert!(proxies["proxies"]["GLOBAL"]["all"].as_array().unwrap().len() >= 3);
    assert_eq!(api.get("/providers/proxies")["providers"], serde_json::json!({}));
    assert_eq!(api.get("/providers/rules")["providers"], serde_json::json!({}));
    let rules = api.get("/rules")["rules"].as_array().unwrap().clone();
    assert_eq!(rules[0]["proxy"], "exit");
    assert!(rules[0]["extra"]["hitCount"].as_u64().unwrap() > 0, "the kernel counted the held flow: {rules:?}");
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
    assert!(samples[1]["up"].is_u64() && samples[1]["carriers"]["exit"].is_u64(), "{samples:?}");
    let (status, memory) = api.websocket(&format!("/memory?token={}", api.secret), &[("Host", API)], 1);
    assert_eq!(status, 101);
    assert!(memory[0]["inuse"].as_u64().unwrap() > 1 << 20);
    let path = format!("/connections?interval=250&token={}", api.secret);
    let (status, snapshots) = api.websocket(&path, &[("Host", API)], 2);
    assert_eq!(status, 101);
    assert!(snapshots[1]["connections"].as_array().unwrap().iter().any(|c| c["id"] == held["id"]));

    // Closing it: the application hears at once, and it is gone.
    let (status, body) = api.call("DELETE", &format!("/connections/{}", held["id"].as_str().unwrap()), "");
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
    let (status, body) = api.call("PUT", &format!("/proxies/{}", group.replace(' ', "%20")), r#"{"name":"exit"}"#);
    assert_eq!(status, 204, "{body}");
    let monitor = daemon.json(&net, &["monitor", "--json"]);
    assert_eq!(monitor["pins"], serde_json::json!([[metric, "exit"]]));
    assert!(net.http_get(SERVER_V4, 80).is_some(), "a web request of the metric rule");
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
    let (status, body) = api.call("PUT", &format!("/proxies/{}", group.replace(' ', "%20")), r#"{"name":"nowhere"}"#);
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("underlay, exit"), "{body}");

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
    daemon.ok(&net, &["rule", "add", "--proto", "tcp", "--dport", "7", "--via", "underlay"]);
    let secret = daemon.json(&net, &["ui", "--json"])["secret"].as_str().unwrap().to_string();
    let api = Client { net: &net, secret };
    let bearer = format!("Bearer {}", api.secret);
    // No secret; a page of another site (a no-cors write carries its
    // Origin); a rebinding attacker's Host.
    assert_eq!(api.request("GET", "/rules", &[("Host", API)], "").0, 401);
    let (status, _) = api.request(
        "POST",
        "/cache/fakeip/flush",
        &[("Host", API), ("Origin", "http://evil.example"), ("Authorization", &bearer)],
        "",
    );
    assert_eq!(status, 403);
    assert_eq!(
        api.request("GET", "/rules", &[("Host", "evil.example:9090"), ("Authorization", &bearer)], "").0,
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
    for (method, path) in [("PUT", "/configs?force=true"), ("POST", "/restart"), ("POST", "/upgrade")] {
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
