//! The REST API part of `cargo xtask bench`, against a daemon with 10,000
//! live flows:
//!
//! - how long `GET /connections` takes to answer, whole: the first (a new
//!   listing of the flows) and the median of 10 more, a second apart;
//! - what three WebSocket clients of `/connections` (one message a second
//!   each) cost the daemon, in CPU time the kernel counted over 10 s,
//!   against 10 s without them;
//! - after `DELETE /connections/{id}` of a flow that sends every 5 ms:
//!   when its application heard, and when the server got its last byte.

use std::time::Duration;

use anyhow::{Context, bail};
use oasis_tests::{Daemon, SERVER_V4, Topology};
use serde_json::Value;

use crate::bench_common::{Figure, cli, median};

const FLOWS: usize = 10_000;
const ECHO_PORT: u16 = 7070;
const SECRET: &str = "bench-api-secret";

/// Python, in the client: one datagram to each of `FLOWS` ports, paced.
fn start_flows() -> String {
    format!(
        "import socket,time\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for i in range({FLOWS}):\n  \
           s.sendto(b'x',('{SERVER_V4}',20000+i))\n  \
           if i%200==199: time.sleep(0.01)\n"
    )
}

/// Python, in the client: GET /connections `n` times a second apart, as
/// a dashboard polls; each one's ms.
const TIMED_GETS: &str = r#"
import http.client,time,sys,json
n=int(sys.argv[1]);out=[]
for i in range(n):
  if i: time.sleep(1.0)
  c=http.client.HTTPConnection('127.0.0.1',9090,timeout=30)
  t=time.perf_counter()
  c.request('GET','/connections',headers={'Host':'127.0.0.1:9090','Authorization':'Bearer bench-api-secret'})
  r=c.getresponse();body=r.read()
  out.append((time.perf_counter()-t)*1000)
  assert r.status==200,r.status
print(json.dumps({'ms':out,'bytes':len(body),'flows':len(json.loads(body)['connections'])}))
"#;

/// Python, in the client: a WebSocket client of /connections for `secs`.
const WS_CLIENT: &str = r#"
import socket,base64,os,sys,time
secs=float(sys.argv[1])
s=socket.create_connection(('127.0.0.1',9090),timeout=30)
key=base64.b64encode(os.urandom(16)).decode()
s.sendall(('GET /connections?interval=1000&token=bench-api-secret HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n'%key).encode())
end=time.monotonic()+secs;got=0
while time.monotonic()<end:
  s.settimeout(max(0.01,end-time.monotonic()))
  try: d=s.recv(1<<20)
  except socket.timeout: break
  if not d: break
  got+=len(d)
print(got)
"#;

/// Python, in the client: a TCP flow that sends 100 bytes every 5 ms and
/// prints the monotonic time its socket was aborted.
fn chatty_flow() -> String {
    format!(
        "import socket,time\n\
         c=socket.create_connection(('{SERVER_V4}',{ECHO_PORT}),timeout=30)\n\
         print('connected',flush=True)\n\
         try:\n  \
           while True: c.sendall(b'x'*100);time.sleep(0.005)\n\
         except OSError as e: print('aborted',time.monotonic(),e.errno,flush=True)\n"
    )
}

/// Python, in the server: takes the flow and prints the monotonic time of
/// every read (the last one is what counts).
fn sink() -> String {
    format!(
        "import socket,time\n\
         s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('0.0.0.0',{ECHO_PORT}));s.listen(4)\n\
         c,_=s.accept()\n\
         while True:\n  \
           d=c.recv(65536)\n  \
           if not d: break\n  \
           print('read',time.monotonic(),flush=True)\n\
         print('end',time.monotonic(),flush=True)\n"
    )
}

/// The daemon's CPU time so far, in seconds (user and system).
fn cpu_seconds(pid: u64) -> f64 {
    crate::bench::cpu_ticks(pid as u32) as f64 / crate::bench::ticks_per_second()
}

pub fn run(net: &mut Topology, repeat: u32) -> anyhow::Result<Vec<Figure>> {
    let _ = std::fs::remove_file(net.dir.join("config.yaml"));
    let daemon = Daemon::start(
        net,
        &format!(
            "api:\n  secret: {SECRET}\n  secret_file: {}\nflow_idle_timeout_secs: 600\n",
            net.dir.join("api-secret").display()
        ),
    );
    cli(
        &daemon,
        net,
        &[
            "rule",
            "add",
            "--proto",
            "udp",
            "--dport",
            "20000-29999",
            "--via",
            "underlay",
        ],
    )?;
    let port = ECHO_PORT.to_string();
    cli(
        &daemon,
        net,
        &[
            "rule", "add", "--proto", "tcp", "--dport", &port, "--via", "underlay",
        ],
    )?;
    let started = net.client.output(&["python3", "-c", &start_flows()]);
    if !started.status.success() {
        bail!(
            "sending the flows' datagrams: {}",
            String::from_utf8_lossy(&started.stderr)
        );
    }
    // Count what arrived: wait, boundedly, for the broker to hold them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let flows = loop {
        let status: Value = serde_json::from_str(&cli(&daemon, net, &["status", "--json"])?)?;
        let flows = status["broker"]["flows"].as_u64().unwrap_or(0);
        if flows as usize >= FLOWS || std::time::Instant::now() > deadline {
            break flows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("bench: api: the broker holds {flows} flows");

    let gets = net
        .client
        .output(&["python3", "-c", TIMED_GETS, &(10 * repeat.max(1) + 1).to_string()]);
    let answer: Value = serde_json::from_slice(&gets.stdout)
        .with_context(|| format!("GET /connections: {}", String::from_utf8_lossy(&gets.stderr)))?;
    let mut ms: Vec<f64> = answer["ms"]
        .as_array()
        .context("timings")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    eprintln!(
        "bench: api: /connections lists {} flows in {} bytes",
        answer["flows"], answer["bytes"]
    );
    // The first waits for a listing of the flows; the rest, a second
    // apart, get the last one while the next is made.
    let cold = ms.first().copied().unwrap_or_default();
    let mut figures = vec![
        Figure::plain("api-10k-flows", "live_flows", flows as f64, "flows"),
        Figure::plain("api-10k-flows", "get_connections_cold_ms", cold, "ms"),
        Figure::plain("api-10k-flows", "get_connections_ms_p50", median(&mut ms), "ms"),
    ];

    // Three WebSocket clients against none, 10 s each, by CPU time.
    let pid: u64 = serde_json::from_str::<Value>(&cli(&daemon, net, &["status", "--json"])?)?["pid"]
        .as_u64()
        .context("the daemon's pid")?;
    let window = 10.0;
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs_f64(window));
    let idle = cpu_seconds(pid) - before;
    let client = net.client.clone();
    for i in 0..3 {
        net.spawn(
            &client,
            &format!("ws-{i}"),
            &["python3", "-c", WS_CLIENT, &window.to_string()],
        );
    }
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs_f64(window));
    let busy = cpu_seconds(pid) - before;
    std::thread::sleep(Duration::from_millis(500));
    let received: u64 = (0..3)
        .filter_map(|i| net.find_process(&format!("ws-{i}")).map(|p| p.log()))
        .filter_map(|log| log.trim().parse::<u64>().ok())
        .sum();
    if received == 0 {
        bail!("the WebSocket clients received nothing");
    }
    eprintln!("bench: api: three WebSocket clients received {received} bytes in {window} s");
    figures.push(Figure::plain(
        "api-10k-flows",
        "three_ws_clients_core_percent",
        ((busy - idle) / window * 100.0).max(0.0),
        "% of a core",
    ));

    // A chatty flow, closed through the API.
    let server = net.server.clone();
    net.spawn(&server, "sink", &["python3", "-u", "-c", &sink()]);
    oasis_tests::wait_for_listener(&net.server, ECHO_PORT);
    net.spawn(&client, "chatty", &["python3", "-u", "-c", &chatty_flow()]);
    std::thread::sleep(Duration::from_millis(500));
    let flows: Value = serde_json::from_str(&cli(&daemon, net, &["flows", "--json"])?)?;
    let id = flows
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| {
            f["dst"]
                .as_str()
                .is_some_and(|d| d.ends_with(&format!(":{ECHO_PORT}")))
        })
        .and_then(|f| f["id"].as_str())
        .context("the chatty flow")?
        .to_string();
    let delete = format!(
        "import http.client,time\n\
         c=http.client.HTTPConnection('127.0.0.1',9090,timeout=10)\n\
         t=time.monotonic()\n\
         c.request('DELETE','/connections/{id}',headers={{'Host':'127.0.0.1:9090','Authorization':'Bearer {SECRET}'}})\n\
         r=c.getresponse();r.read()\n\
         print(t,time.monotonic(),r.status)\n"
    );
    let out = net.client.output(&["python3", "-c", &delete]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let parts: Vec<f64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    let [asked, answered, status] = parts[..] else {
        bail!("DELETE: {text} {}", String::from_utf8_lossy(&out.stderr));
    };
    if status != 204.0 {
        bail!("DELETE answered {status}");
    }
    std::thread::sleep(Duration::from_millis(1000));
    let chatty = net.find_process("chatty").map(|p| p.log()).unwrap_or_default();
    let aborted: f64 = chatty
        .lines()
        .find_map(|l| {
            l.strip_prefix("aborted ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("the application never heard: {chatty}"))?;
    let sink_log = net.find_process("sink").map(|p| p.log()).unwrap_or_default();
    let last_read: f64 = sink_log
        .lines()
        .filter_map(|l| l.strip_prefix("read ")?.parse().ok())
        .fold(0.0, f64::max);
    eprintln!(
        "bench: api: DELETE answered in {:.1} ms; the application heard {:.1} ms after it was asked; the \
         server's last read {:.1} ms after",
        (answered - asked) * 1000.0,
        (aborted - asked) * 1000.0,
        (last_read - asked) * 1000.0
    );
    figures.push(Figure::plain(
        "api-close",
        "application_aborted_after_ms",
        (aborted - asked) * 1000.0,
        "ms",
    ));
    figures.push(Figure::plain(
        "api-close",
        "last_byte_at_server_after_ms",
        ((last_read - asked) * 1000.0).max(0.0),
        "ms",
    ));
    if !net.process("oasis").terminate(Duration::from_secs(10)) {
        bail!("the daemon did not stop cleanly");
    }
    Ok(figures)
}
