//! Headless Chromium (Debian's `chromium`) driven over the DevTools
//! protocol, for the tests of the web page: navigate, evaluate script,
//! take a screenshot, and collect what the console reported as errors.
//! The browser runs in a test namespace; the caller's thread must be in
//! that namespace too (`Netns::enter`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The DevTools port inside the namespace.
pub const PORT: u16 = 9222;

/// The arguments that start the browser (after `chromium`).
pub fn browser_args(profile: &std::path::Path, resolver_rules: &str) -> Vec<String> {
    vec![
        "--headless=new".into(),
        // As root in a namespace: Chromium's own sandbox needs user
        // namespaces it cannot have here.
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-default-apps".into(),
        "--window-size=1280,900".into(),
        format!("--remote-debugging-port={PORT}"),
        "--remote-debugging-address=127.0.0.1".into(),
        format!("--remote-allow-origins=http://127.0.0.1:{PORT}"),
        format!("--user-data-dir={}", profile.display()),
        format!("--host-resolver-rules={resolver_rules}"),
        "about:blank".into(),
    ]
}

/// A plain HTTP GET on the DevTools port (which answers HTTP/1.1 only,
/// and keeps the connection: the body is as long as it says).
fn get(path: &str) -> Option<Value> {
    let mut stream = TcpStream::connect(("127.0.0.1", PORT)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\n\r\n").ok()?;
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })?
                .parse()
                .ok()?;
            if body.len() >= length {
                return serde_json::from_str(&body[..length]).ok();
            }
        }
    }
}

pub struct Browser {
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Console errors, exceptions and failed loads seen so far.
    pub errors: Vec<String>,
}

impl Browser {
    /// Connects to the browser's first page, waiting for it to come up.
    pub fn connect() -> Browser {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            let page = get("/json/list").and_then(|list| {
                list.as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(url) = page {
                break url;
            }
            assert!(Instant::now() < deadline, "Chromium's DevTools did not come up");
            std::thread::sleep(Duration::from_millis(200));
        };
        let (socket, _) = tungstenite::connect(url.as_str()).expect("DevTools WebSocket");
        if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let mut browser = Browser {
            socket,
            next_id: 1,
            errors: Vec::new(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({}));
        }
        browser
    }

    /// One DevTools command; its result. Events on the way are looked at
    /// for errors.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .expect("sending to DevTools");
        loop {
            let reply = self.socket.read().expect("reading from DevTools");
            let Ok(text) = reply.to_text() else { continue };
            let Ok(value) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if value["id"] == id {
                assert!(value.get("error").is_none(), "{method}: {value}");
                return value["result"].clone();
            }
            self.note(&value);
        }
    }

    fn note(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.errors.push(format!("exception: {params}")),
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.errors.push(format!("console.error: {}", params["args"]))
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => self.errors.push(format!(
                "{}: {}",
                params["entry"]["url"].as_str().unwrap_or(""),
                params["entry"]["text"]
            )),
            _ => {}
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        // The load event, or a second and a half, whichever first.
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            let ready = self.eval("document.readyState");
            if ready == "complete" {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Evaluates `script` (awaiting a promise) and returns its value.
    pub fn eval(&mut self, script: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": script, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{script}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `script` evaluates to true.
    pub fn wait_for(&mut self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.eval(script) != Value::Bool(true) {
            assert!(Instant::now() < deadline, "the page never showed {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the page as it is.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64")
    }
}
