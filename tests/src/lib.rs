//! A test network made of network namespaces: a client (the Oasis daemon
//! and applications), a router, and a server (web, echo, iperf3, sockperf).
//! Every address is inside these namespaces; nothing touches the host's own
//! interfaces. Dropping the [`Topology`] kills the processes it started (by
//! PID) and deletes its namespaces, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod cdp;
pub mod dns;
pub use dns::{CGROUP_PREFIX, CGROUP2_MOUNT, DnsAnswer};

/// Prefix of every namespace the harness creates; the rest of the name is
/// the creating process's PID, so leftovers of dead runs can be found.
pub const NETNS_PREFIX: &str = "oasis-t";

pub const CLIENT_V4: &str = "10.77.1.2";
pub const ROUTER_CLIENT_SIDE_V4: &str = "10.77.1.1";
pub const ROUTER_SERVER_SIDE_V4: &str = "10.77.2.1";
pub const SERVER_V4: &str = "10.77.2.2";
pub const CLIENT_V6: &str = "fd77:1::2";
pub const SERVER_V6: &str = "fd77:2::2";
/// The overlay host: exit node, relay, and the web server for specifications.
pub const OVERLAY_V4: &str = "10.77.3.2";
pub const OVERLAY_V6: &str = "fd77:3::2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One network namespace.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `cmd` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs a command to completion; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.output(args);
        assert!(
            output.status.success(),
            "in {}: `{}` failed: {}{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Counts the packets arriving in this namespace that match `rule`
    /// (nftables syntax, e.g. `tcp dport 22`), under `name`; read the
    /// count with [`watched`](Self::watched).
    pub fn watch(&self, name: &str, rule: &str) {
        if !self
            .output(&["nft", "list", "table", "inet", "watch"])
            .status
            .success()
        {
            self.run(&["nft", "add", "table", "inet", "watch"]);
            self.run(&[
                "nft",
                "add",
                "chain",
                "inet",
                "watch",
                "arriving",
                "{ type filter hook prerouting priority -400; }",
            ]);
        }
        self.run(&["nft", "add", "counter", "inet", "watch", name]);
        let mut args = vec!["nft", "add", "rule", "inet", "watch", "arriving"];
        args.extend(rule.split_whitespace());
        args.extend(["counter", "name", name]);
        self.run(&args);
    }

    /// Packets counted so far by the [`watch`](Self::watch) named `name`.
    pub fn watched(&self, name: &str) -> u64 {
        let text = self.run(&["nft", "-j", "list", "counter", "inet", "watch", name]);
        let json: serde_json::Value = serde_json::from_str(&text).expect("nft -j output");
        json["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i.get("counter")?["packets"].as_u64()))
            .unwrap_or_else(|| panic!("no counter {name} in {}: {text}", self.name))
    }

    pub fn output(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        cmd.output()
            .unwrap_or_else(|e| panic!("running {args:?} in {}: {e}", self.name))
    }
}

/// A network namespace of its own, outside any topology: for tests that
/// move a thread of the test process itself into it. Deleted when dropped.
pub struct LoneNetns {
    pub ns: Netns,
}

impl LoneNetns {
    pub fn new(tag: &str) -> LoneNetns {
        assert_root();
        let name = format!(
            "{}-{}-{}-{tag}",
            NETNS_PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        host(&["ip", "netns", "add", &name]);
        let lone = LoneNetns { ns: Netns { name } };
        lone.ns.run(&["ip", "link", "set", "lo", "up"]);
        lone
    }

    /// Moves the calling thread into the namespace: sockets and devices it
    /// creates from now on, and threads it spawns, live there.
    pub fn enter(&self) {
        self.ns.enter()
    }
}

impl Netns {
    /// Moves the calling thread into the namespace: sockets it creates
    /// from now on live there.
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace file descriptor; affects this thread only.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for LoneNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns.name]).status();
    }
}

/// A process the harness started; killed by PID when dropped.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to `grace` for a clean exit; returns whether it
    /// exited by itself with success.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: sending a signal to a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// What the process wrote to stderr/stdout so far (when logged to a file).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// client ── router ── server, and an overlay host on the router too; IPv4
/// and IPv6, each link a veth pair made inside the namespaces.
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub overlay: Netns,
    pub dir: PathBuf,
    /// A cgroup of this test's own: the daemon redirects the DNS queries of
    /// processes in it (and of no other).
    pub cgroup: PathBuf,
    processes: Vec<Process>,
}

impl Topology {
    pub fn new() -> Topology {
        assert_root();
        let id = format!(
            "{}-{}-{}",
            NETNS_PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| Netns {
            name: format!("{id}-{role}"),
        };
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir).expect("test directory");
        let cgroup = dns::create_cgroup(&id);
        let topology = Topology {
            client: ns("c"),
            router: ns("r"),
            server: ns("s"),
            overlay: ns("o"),
            dir,
            cgroup,
            processes: Vec::new(),
        };
        topology.build();
        topology
    }

    fn build(&self) {
        for ns in self.namespaces() {
            host(&["ip", "netns", "add", &ns.name]);
            ns.run(&["ip", "link", "set", "lo", "up"]);
            // Without this, each link's fe80:: address stays tentative for
            // a second or two after it comes up, and a router with no usable
            // link-local address sends no neighbour solicitations: the first
            // IPv6 packets forwarded in that window wait a retransmit timer.
            for conf in ["all", "default"] {
                ns.run(&["sysctl", "-qw", &format!("net.ipv6.conf.{conf}.accept_dad=0")]);
            }
        }
        // `ip netns exec` shows the client this resolv.conf: its resolver
        // asks the test's DNS server, never the host's.
        dns::write_resolv_conf(&self.client, SERVER_V4);
        veth_pair(&self.client, "c0", &self.router, "r0");
        veth_pair(&self.server, "s0", &self.router, "r1");
        veth_pair(&self.overlay, "o0", &self.router, "r2");
        let c = &self.client;
        let r = &self.router;
        let s = &self.server;
        let o = &self.overlay;
        for (ns, iface, v4, v6) in [
            (r, "r2", "10.77.3.1/24", "fd77:3::1/64"),
            (o, "o0", "10.77.3.2/24", "fd77:3::2/64"),
            (c, "c0", "10.77.1.2/24", "fd77:1::2/64"),
            (r, "r0", "10.77.1.1/24", "fd77:1::1/64"),
            (r, "r1", "10.77.2.1/24", "fd77:2::1/64"),
            (s, "s0", "10.77.2.2/24", "fd77:2::2/64"),
        ] {
            ns.run(&["ip", "addr", "add", v4, "dev", iface]);
            ns.run(&["ip", "-6", "addr", "add", v6, "dev", iface, "nodad"]);
            ns.run(&["sysctl", "-qw", &format!("net.ipv6.conf.{iface}.accept_dad=0")]);
            ns.run(&["ip", "link", "set", iface, "up"]);
        }
        r.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        r.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        c.run(&["ip", "route", "add", "default", "via", ROUTER_CLIENT_SIDE_V4]);
        c.run(&["ip", "-6", "route", "add", "default", "via", "fd77:1::1"]);
        s.run(&["ip", "route", "add", "default", "via", ROUTER_SERVER_SIDE_V4]);
        s.run(&["ip", "-6", "route", "add", "default", "via", "fd77:2::1"]);
        o.run(&["ip", "route", "add", "default", "via", "10.77.3.1"]);
        o.run(&["ip", "-6", "route", "add", "default", "via", "fd77:3::1"]);
    }

    /// Makes the links toward and from the overlay host behave as NICs
    /// do, which the client's fast path relies on (`overlay_fast_path`).
    /// Across veth the kernel leaves a packet's checksum "to the hardware"
    /// all the way to a socket, so a packet the client's kernel wraps would
    /// reach the exit node's user space with its inner checksum unfinished:
    /// the router finishes checksums on its port toward the overlay host.
    /// And a run of datagrams the exit node sends at once (UDP GSO) would
    /// arrive whole, where a wire delivers datagrams: the overlay host's
    /// link cuts runs. `on`: false undoes it.
    pub fn links_like_nics(&self, on: bool) {
        let state = if on { "off" } else { "on" };
        self.router.run(&["ethtool", "-K", "r2", "tx", state]);
        self.overlay.run(&["ethtool", "-K", "o0", "tx", state]);
    }

    fn namespaces(&self) -> [&Netns; 4] {
        [&self.client, &self.router, &self.server, &self.overlay]
    }

    /// Starts a long-running process in a namespace, its output to a log file.
    pub fn spawn(&mut self, ns: &Netns, name: &str, args: &[&str]) -> &mut Process {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = ns.command(args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {args:?}: {e}"));
        self.processes.push(Process {
            name: name.into(),
            child: Some(child),
            log: Some(log),
        });
        self.processes.last_mut().expect("just pushed")
    }

    /// The latest process started under `name`, if any.
    pub fn find_process(&self, name: &str) -> Option<&Process> {
        self.processes.iter().rev().find(|p| p.name == name)
    }

    pub fn process(&mut self, name: &str) -> &mut Process {
        self.processes
            .iter_mut()
            .rev()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Publishes a file on the overlay host's specification server.
    pub fn publish(&self, name: &str, content: &str) {
        self.publish_bytes(name, content.as_bytes());
    }

    /// As [`publish`](Self::publish), any bytes (a module).
    pub fn publish_bytes(&self, name: &str, content: &[u8]) {
        let root = self.dir.join("specs");
        std::fs::create_dir_all(&root).expect("spec root");
        std::fs::write(root.join(name), content).expect("spec file");
    }

    /// The overlay host's web server for specifications (port 8000); files
    /// come from [`Topology::publish`].
    pub fn start_spec_server(&mut self) -> String {
        let root = self.dir.join("specs");
        std::fs::create_dir_all(&root).expect("spec root");
        let root_text = root.to_string_lossy().into_owned();
        let overlay = self.overlay.clone();
        self.spawn(
            &overlay,
            "spec-server",
            &[
                "python3",
                "-m",
                "http.server",
                "8000",
                "--bind",
                OVERLAY_V4,
                "--directory",
                &root_text,
            ],
        );
        wait_for_listener(&self.overlay, 8000);
        format!("http://{OVERLAY_V4}:8000")
    }

    /// Starts `oasis-exit` on the overlay host, listening on 7400, with
    /// these extra arguments (clients, ...); its counters go to
    /// `exit-stats.json` in the test directory.
    pub fn start_exit(&mut self, extra: &[&str]) -> PathBuf {
        let stats = self.dir.join("exit-stats.json");
        let _ = std::fs::remove_file(&stats);
        let bin = workspace_bin("oasis-exit");
        let stats_text = stats.to_string_lossy().into_owned();
        let state_text = self.dir.join("exit-nat.json").to_string_lossy().into_owned();
        let pins_text = self.bpf_pins().to_string_lossy().into_owned();
        let mut args = vec![
            bin.to_str().expect("utf-8 path"),
            "--pin-dir",
            &pins_text,
            "--uplink",
            "o0",
            "--public",
            OVERLAY_V4,
            "--public",
            OVERLAY_V6,
            "--listen",
            "0.0.0.0:7400",
            "--stats-file",
            &stats_text,
            "--state-file",
            &state_text,
        ];
        args.extend_from_slice(extra);
        // The exit's fast path leaves a reply's transport checksum for the
        // uplink to finish, as a NIC does; veth would pass it unfinished
        // to the client, as it may between namespaces (docs/overlays.md).
        self.overlay.run(&["ethtool", "-K", "o0", "tx", "off"]);
        let overlay = self.overlay.clone();
        self.spawn(&overlay, "oasis-exit", &args);
        // An exit for WireGuard clients alone serves no plain port.
        let plain = !extra.contains(&"--wireguard-key") || extra.contains(&"--client");
        wait_for_udp_listener(&self.overlay, if plain { 7400 } else { 51820 });
        stats
    }

    /// A BPF file system of this topology's own, for the exit's pinned
    /// steering: mounted in the test's mount namespace, which the exits
    /// `ip netns exec` starts see (their own mounts would vanish with them),
    /// and unmounted, pins and all, when the topology is dropped.
    pub fn bpf_pins(&self) -> PathBuf {
        let dir = self.dir.join("bpf");
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == dir.to_str()));
        if !mounted {
            std::fs::create_dir_all(&dir).expect("pin directory");
            host(&["mount", "-t", "bpf", "bpf", dir.to_str().expect("utf-8 path")]);
        }
        dir
    }

    /// Counts the UDP datagrams that reach each of `ports` on the overlay
    /// host (nftables named counters); read them with
    /// [`overlay_port_counts`](Self::overlay_port_counts).
    pub fn count_overlay_ports(&self, ports: &[u16]) {
        self.overlay.run(&["nft", "add", "table", "inet", "ports"]);
        self.overlay.run(&[
            "nft",
            "add",
            "chain",
            "inet",
            "ports",
            "input",
            "{ type filter hook input priority 0; }",
        ]);
        for port in ports {
            let (port, name) = (port.to_string(), format!("p{port}"));
            self.overlay
                .run(&["nft", "add", "counter", "inet", "ports", &name]);
            self.overlay.run(&[
                "nft", "add", "rule", "inet", "ports", "input", "udp", "dport", &port, "counter", "name",
                &name,
            ]);
        }
    }

    /// Datagrams counted so far at each port
    /// [`count_overlay_ports`](Self::count_overlay_ports) watches.
    pub fn overlay_port_counts(&self) -> std::collections::BTreeMap<u16, u64> {
        self.overlay_port_traffic()
            .into_iter()
            .map(|(port, (packets, _))| (port, packets))
            .collect()
    }

    /// Datagrams and bytes counted so far at each watched port.
    pub fn overlay_port_traffic(&self) -> std::collections::BTreeMap<u16, (u64, u64)> {
        let text = self
            .overlay
            .run(&["nft", "-j", "list", "counters", "table", "inet", "ports"]);
        let json: serde_json::Value = serde_json::from_str(&text).expect("nft -j output");
        json["nftables"]
            .as_array()
            .expect("nftables items")
            .iter()
            .filter_map(|item| {
                let counter = item.get("counter")?;
                let port = counter["name"].as_str()?.strip_prefix('p')?.parse().ok()?;
                Some((port, (counter["packets"].as_u64()?, counter["bytes"].as_u64()?)))
            })
            .collect()
    }

    /// Starts `oasis-relay` on the overlay host.
    pub fn start_relay(&mut self, listen_port: u16, next_hop: &str, delay_ms: u32) {
        self.start_lossy_relay(listen_port, next_hop, delay_ms, 0.0);
    }

    /// Starts `oasis-relay` on the overlay host, losing a share of the
    /// datagrams each way; its process is named `relay-PORT`.
    pub fn start_lossy_relay(&mut self, listen_port: u16, next_hop: &str, delay_ms: u32, loss_percent: f64) {
        let bin = workspace_bin("oasis-relay");
        let listen = format!("0.0.0.0:{listen_port}");
        let delay = delay_ms.to_string();
        let loss = loss_percent.to_string();
        let overlay = self.overlay.clone();
        let name = if listen_port == 7500 {
            "oasis-relay".to_string()
        } else {
            format!("relay-{listen_port}")
        };
        self.spawn(
            &overlay,
            &name,
            &[
                bin.to_str().expect("utf-8 path"),
                "--listen",
                &listen,
                "--next-hop",
                next_hop,
                "--delay-ms",
                &delay,
                "--loss-percent",
                &loss,
            ],
        );
        wait_for_udp_listener(&self.overlay, listen_port);
    }

    /// Puts the underlay (client ↔ server through the router, not the
    /// overlay host's paths) through a delay line in the router:
    /// `oasis-relay --tun` holds each packet `delay_ms` each way. Returns
    /// the control file: write `delay_ms=N loss_percent=P rate_mbit=R` to
    /// reshape the path while it runs.
    pub fn underlay_line(&mut self, delay_ms: u32) -> PathBuf {
        let control = self.dir.join("underlay-shape");
        std::fs::write(&control, format!("delay_ms={delay_ms}\n")).expect("control file");
        let bin = workspace_bin("oasis-relay");
        let control_text = control.to_string_lossy().into_owned();
        let delay = delay_ms.to_string();
        let router = self.router.clone();
        self.spawn(
            &router,
            "underlay-line",
            &[
                bin.to_str().expect("utf-8 path"),
                "--tun",
                "dly0",
                "--delay-ms",
                &delay,
                "--control",
                &control_text,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !router.output(&["ip", "link", "show", "dly0"]).status.success() {
            assert!(Instant::now() < deadline, "the delay line's TUN did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = &self.router;
        r.run(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        r.run(&["ip", "link", "set", "dly0", "up"]);
        // Client ↔ server traffic arriving from either side goes into the
        // line; what the line writes back (arriving on dly0) is routed on.
        for (family, client, server) in [
            ("-4", "10.77.1.0/24", "10.77.2.0/24"),
            ("-6", "fd77:1::/64", "fd77:2::/64"),
        ] {
            r.run(&[
                "ip", family, "route", "add", server, "dev", "dly0", "table", "100",
            ]);
            r.run(&[
                "ip", family, "route", "add", client, "dev", "dly0", "table", "100",
            ]);
            r.run(&[
                "ip", family, "rule", "add", "iif", "r0", "to", server, "table", "100",
            ]);
            r.run(&[
                "ip", family, "rule", "add", "iif", "r1", "to", client, "table", "100",
            ]);
        }
        control
    }

    /// A static web server on the server, on all its addresses.
    pub fn start_web_server(&mut self, port: u16) {
        let root = self.dir.join("www");
        std::fs::create_dir_all(&root).expect("web root");
        std::fs::write(root.join("hello.txt"), "hello from the server\n").expect("web file");
        let port_text = port.to_string();
        let root_text = root.to_string_lossy().into_owned();
        let server = self.server.clone();
        self.spawn(
            &server,
            &format!("web-{port}"),
            &[
                "python3",
                "-m",
                "http.server",
                &port_text,
                "--bind",
                "::",
                "--directory",
                &root_text,
            ],
        );
        wait_for_listener(&self.server, port);
    }

    /// Puts a file of `size` bytes on the server's web servers.
    pub fn web_file(&self, name: &str, size: usize) {
        let root = self.dir.join("www");
        std::fs::create_dir_all(&root).expect("web root");
        std::fs::write(root.join(name), vec![b'x'; size]).expect("web file");
    }

    /// Downloads `path` from the server; (bytes, seconds), or None if it
    /// failed.
    pub fn download(&self, host: &str, port: u16, path: &str) -> Option<(u64, f64)> {
        let url = format!("http://{host}:{port}/{path}");
        let output = self.client.output(&[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            &url,
        ]);
        if !output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let mut parts = text.split_whitespace();
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    /// An HTTP/1.0 download of `path` from `host:port` in the client, read
    /// by the application at `rate` bytes a second (as a video player or a
    /// rate-limited `curl` does, so the server always has packets in
    /// flight); its progress is in the process log as `got N` lines.
    pub fn start_paced_download(&mut self, name: &str, host: &str, port: u16, path: &str, rate: u64) {
        let script = format!(
            "import socket,time\n\
             s=socket.create_connection(('{host}',{port}),timeout=60)\n\
             s.sendall(b'GET /{path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n\
             got=0;start=time.monotonic();last=0\n\
             while True:\n \
             d=s.recv(65536)\n \
             if not d: break\n \
             got+=len(d)\n \
             ahead=got/{rate}-(time.monotonic()-start)\n \
             if ahead>0: time.sleep(ahead)\n \
             if time.monotonic()-last>0.1: print('got',got,flush=True);last=time.monotonic()\n\
             print('end',got,flush=True)\n"
        );
        let client = self.client.clone();
        self.spawn(&client, name, &["python3", "-u", "-c", &script]);
    }

    /// Bytes the paced download `name` has read so far; panics when it
    /// ended (finished, reset or failed).
    pub fn paced_progress(&mut self, name: &str) -> u64 {
        let log = self.process(name).log();
        assert!(
            !log.contains("end") && !log.contains("Error"),
            "the download ended: {log}"
        );
        log.lines()
            .filter_map(|l| l.strip_prefix("got ")?.parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    /// Waits until the paced download `name` reads `more` bytes further,
    /// within a deadline; panics naming `what` when it stalls.
    pub fn paced_download_goes_on(&mut self, name: &str, more: u64, what: &str) {
        let from = self.paced_progress(name);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.paced_progress(name) < from + more {
            assert!(
                Instant::now() < deadline,
                "the download stalled {what} at {} bytes",
                self.paced_progress(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A TCP echo service on the server.
    pub fn start_echo_server(&mut self, port: u16) {
        let script = format!(
            "import socket,threading\n\
             s=socket.socket(socket.AF_INET6,socket.SOCK_STREAM)\n\
             s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
             s.bind(('::',{port}));s.listen(64)\n\
             def h(c):\n  \
               with c:\n    \
                 while (d:=c.recv(65536)): c.sendall(d)\n\
             while True:\n  \
               c,_=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n"
        );
        let server = self.server.clone();
        self.spawn(&server, &format!("echo-{port}"), &["python3", "-c", &script]);
        wait_for_listener(&self.server, port);
    }

    /// A bulk TCP echo with the server's echo service on `port`: `mb` MB
    /// each way, every byte hashed. The data streams from a generator (each
    /// megabyte a random block with its number in front, so a lost,
    /// repeated or reordered megabyte shows), hashed as it goes and as it
    /// comes back: a gigabyte needs no gigabyte of memory.
    pub fn echo_bulk(&self, port: u16, mb: usize, what: &str) {
        let script = format!(
            "import socket,threading,hashlib,random\n\
             block=bytearray(random.Random(7).randbytes(1<<20))\n\
             sent=hashlib.sha256()\n\
             c=socket.create_connection(('{SERVER_V4}',{port}),timeout=20)\n\
             def send():\n  \
               for i in range({mb}):\n    \
                 block[:8]=i.to_bytes(8,'big');sent.update(block);c.sendall(block)\n  \
               c.shutdown(socket.SHUT_WR)\n\
             t=threading.Thread(target=send,daemon=True);t.start()\n\
             h=hashlib.sha256();got=0\n\
             while (d:=c.recv(1<<18)): h.update(d);got+=len(d)\n\
             t.join()\n\
             print(got, h.hexdigest()==sent.hexdigest())\n"
        );
        let output = self.client.output(&["python3", "-c", &script]);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("{} True", mb << 20),
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// wireguard-go running as interface `iface` in `ns` (as `process`),
    /// once the interface exists.
    pub fn start_wireguard_go(&mut self, ns: &Netns, process: &str, iface: &str) {
        self.spawn(
            ns,
            process,
            &["env", "WG_PROCESS_FOREGROUND=1", "wireguard-go", iface],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.output(&["ip", "link", "show", iface]).status.success() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not create {iface}: {}",
                self.process(process).log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A WireGuard peer on the overlay host, as a home router or a VPN
    /// server is one: wireguard-go listening on `port` with tunnel address
    /// 10.88.0.2/24, `client_public` its one peer (allowed from
    /// `client_tunnel`), what it forwards toward the server masqueraded.
    /// Its public key.
    pub fn start_wireguard_peer(&mut self, client_public: &str, client_tunnel: &str, port: u16) -> String {
        let (private, public) = wg_keys(&self.overlay);
        let iface = wireguard_interface("wgp");
        let overlay = self.overlay.clone();
        self.start_wireguard_go(&overlay, "wireguard-go", &iface);
        let key_file = self.dir.join("peer.key");
        std::fs::write(&key_file, &private).expect("key file");
        let o = &self.overlay;
        o.run(&[
            "wg",
            "set",
            &iface,
            "private-key",
            &key_file.to_string_lossy(),
            "listen-port",
            &port.to_string(),
            "peer",
            client_public,
            "allowed-ips",
            client_tunnel,
        ]);
        o.run(&["ip", "addr", "add", "10.88.0.2/24", "dev", &iface]);
        o.run(&["ip", "link", "set", &iface, "up"]);
        o.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        o.run(&[
            "nft",
            "add table ip oasis_wg; \
             add chain ip oasis_wg post { type nat hook postrouting priority 100; }; \
             add rule ip oasis_wg post ip saddr 10.88.0.0/24 oifname o0 masquerade",
        ]);
        public
    }

    pub fn start_iperf_server(&mut self, port: u16) {
        let port_text = port.to_string();
        let server = self.server.clone();
        self.spawn(
            &server,
            &format!("iperf3-{port}"),
            &["iperf3", "-s", "-p", &port_text],
        );
        wait_for_listener(&self.server, port);
    }

    /// An HTTP GET from the client; the body, or None if it failed.
    pub fn http_get(&self, host: &str, port: u16) -> Option<String> {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let url = format!("http://{host}:{port}/hello.txt");
        let output = self.client.output(&["curl", "-sS", "--max-time", "3", &url]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Sends `message` to the echo service and returns what came back.
    pub fn echo(&self, host: &str, port: u16, message: &str) -> Option<String> {
        let script = format!(
            "import socket\n\
             c=socket.create_connection(('{host}',{port}),timeout=3)\n\
             c.sendall(b'{message}');c.shutdown(socket.SHUT_WR)\n\
             d=b''\n\
             while (x:=c.recv(65536)): d+=x\n\
             print(d.decode(),end='')\n"
        );
        let output = self.client.output(&["python3", "-c", &script]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for process in self.processes.iter_mut().rev() {
            process.kill_hard();
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
        dns::remove_resolv_conf(&self.client);
        dns::remove_cgroup(&self.cgroup);
        let pins = self.dir.join("bpf");
        if std::fs::read_to_string("/proc/self/mounts")
            .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == pins.to_str()))
        {
            let _ = Command::new("umount").arg(&pins).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until something listens on TCP `port` in the namespace.
pub fn wait_for_listener(ns: &Netns, port: u16) {
    wait_for_socket(ns, port, "-Hltn");
}

pub fn wait_for_udp_listener(ns: &Netns, port: u16) {
    wait_for_socket(ns, port, "-Hlun");
}

fn wait_for_socket(ns: &Netns, port: u16, ss_flags: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{port} ");
    while Instant::now() < deadline {
        let out = ns.output(&["ss", ss_flags]);
        if String::from_utf8_lossy(&out.stdout).contains(&needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} in {} after 10 s", ns.name);
}

/// A veth pair made with each end directly inside its namespace.
fn veth_pair(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    host(&[
        "ip", "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns",
        &b.name,
    ]);
}

fn host(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(status.success(), "{args:?} failed");
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the heartbeat map, so a
/// test can tell how old the daemon's last beat is.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn assert_root() {
    // SAFETY: no arguments, no side effects.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network namespace tests need root; run `cargo xtask test`"
    );
}

/// Deletes namespaces left by earlier runs whose process is gone (a run
/// killed before its cleanup could happen).
pub fn remove_stale_namespaces() -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{NETNS_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            removed.push(name.to_string());
        }
    }
    // The BPF file systems of their exits' pinned steering.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let temp = std::env::temp_dir();
    for point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        let Some(rest) = Path::new(point)
            .strip_prefix(&temp)
            .ok()
            .and_then(|p| p.to_str())
            .and_then(|p| p.strip_prefix(&format!("{NETNS_PREFIX}-")))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("umount").arg(point).status();
            removed.push(point.to_string());
        }
    }
    removed
}

/// The `oasis` binary under test: `OASIS_BIN`, else the workspace's build.
pub fn oasis_bin() -> PathBuf {
    workspace_bin("oasis")
}

/// The workspace's `target/` directory.
pub fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target")
}

/// A binary of the workspace: from the directory of `OASIS_BIN` when set
/// (xtask builds them all together), else the newest build in target/.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("OASIS_BIN") {
        let path = PathBuf::from(path);
        return if name == "oasis" {
            path
        } else {
            path.with_file_name(name)
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    for profile in ["debug", "release"] {
        let candidate = root.join("target").join(profile).join(name);
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("no {name} binary: build the workspace (cargo build) or set OASIS_BIN")
}

/// A WireGuard key pair made by `wg` in `ns`: (private, public).
pub fn wg_keys(ns: &Netns) -> (String, String) {
    let private = ns.run(&["wg", "genkey"]).trim().to_string();
    let public = ns.output(&["sh", "-c", &format!("echo {private} | wg pubkey")]);
    (
        private,
        String::from_utf8_lossy(&public.stdout).trim().to_string(),
    )
}

/// A name for a wireguard-go interface no other test or run uses now: its
/// control socket in /var/run/wireguard is shared by every namespace.
pub fn wireguard_interface(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed) % 100
    )
}

/// The daemon running in the client namespace, with its own config and
/// control socket in the topology's directory.
pub struct Daemon {
    pub config: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `oasis run` in the client and waits until it answers.
    pub fn start(topology: &mut Topology, extra_config: &str) -> Daemon {
        let config = topology.dir.join("config.yaml");
        let socket = topology.dir.join("oasis.sock");
        if !config.exists() {
            // Every daemon of the tests keeps its DNS redirect to the test's
            // cgroup and its fake table in the test's directory.
            let dns = if extra_config.contains("dns:") {
                String::new()
            } else {
                topology.dns_config("")
            };
            // And its API's secret.
            let api = if extra_config.contains("api:") {
                String::new()
            } else {
                format!(
                    "api:\n  secret_file: {}\n",
                    topology.dir.join("api-secret").display()
                )
            };
            std::fs::write(
                &config,
                format!("control_socket: {}\n{dns}{api}{extra_config}", socket.display()),
            )
            .expect("config");
        }
        let daemon = Daemon { config, socket };
        let bin = oasis_bin();
        let client = topology.client.clone();
        let config_text = daemon.config.to_string_lossy().into_owned();
        // Tests want every decision in the log; the benchmark sets
        // OASIS_DAEMON_LOG=info, since a line per query is work too.
        let log = format!(
            "RUST_LOG={}",
            std::env::var("OASIS_DAEMON_LOG").unwrap_or_else(|_| "info,oasis_broker=debug".into())
        );
        // Test daemons take injected faults (`oasis fault NAME`).
        topology.spawn(
            &client,
            "oasis",
            &[
                "env",
                &log,
                "OASIS_FAULTS=1",
                &bin.to_string_lossy(),
                "--config",
                &config_text,
                "run",
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if daemon.cli(topology, &["status"]).status.success() {
                break;
            }
            let process = topology.process("oasis");
            if !process.is_running() || Instant::now() > deadline {
                panic!("the daemon did not come up:\n{}", process.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    /// The exit node serving the client (`--client` its IPv4 address), a
    /// web server on the server's port 80, the specification server, and
    /// a daemon that joined the exit as `exit`; and the specification
    /// server's base URL, where [`Topology::publish`] puts files.
    pub fn joined_to_exit(topology: &mut Topology) -> (Daemon, String) {
        topology.start_exit(&["--client", CLIENT_V4]);
        topology.publish(
            "exit.xml",
            r#"<overlay name="test-exit"><entry host="10.77.3.2" port="7400"/></overlay>"#,
        );
        let base = topology.start_spec_server();
        topology.start_web_server(80);
        let daemon = Daemon::start(topology, "");
        daemon.ok(topology, &["overlay", "add", "exit", &format!("{base}/exit.xml")]);
        (daemon, base)
    }

    /// Runs the CLI in the client namespace against this daemon.
    pub fn cli(&self, topology: &Topology, args: &[&str]) -> Output {
        let mut cmd = topology.client.command(&oasis_bin().to_string_lossy());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .args(args);
        cmd.output().expect("running the oasis CLI")
    }

    /// Runs the CLI, which must succeed; its standard output.
    pub fn ok(&self, topology: &Topology, args: &[&str]) -> String {
        let output = self.cli(topology, args);
        assert!(
            output.status.success(),
            "oasis {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs the CLI and parses its `--json` output.
    pub fn json(&self, topology: &Topology, args: &[&str]) -> serde_json::Value {
        let output = self.cli(topology, args);
        assert!(
            output.status.success(),
            "oasis {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("oasis {args:?} printed no JSON: {e}"))
    }
}

/// A prefix list as published for a country or an AS: `count` /24s drawn
/// from the public IPv4 space (never the tests' 10.0.0.0/8), the first
/// half of `with` in the middle of them and the rest at the end, one per
/// line, with a comment or two.
pub fn prefix_list(count: u32, with: &[&str]) -> String {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut text = format!("# generated: {count} random /24s and {} more\n", with.len());
    let (middle, end) = with.split_at(with.len().div_ceil(2));
    for i in 0..count {
        if i == count / 2 {
            for prefix in middle {
                text.push_str(&format!("{prefix}   # the test's own\n"));
            }
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let block = 0x0b00_0000 + (seed % (0xdf00_0000 - 0x0b00_0000)) as u32;
        text.push_str(&format!("{}/24\n", std::net::Ipv4Addr::from(block & 0xffff_ff00)));
    }
    for prefix in end {
        text.push_str(&format!("{prefix}\n"));
    }
    text
}

/// A module of `overlays/modules`, as `cargo xtask test` builds them.
pub fn built_module(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/modules/wasm32-unknown-unknown/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; `cargo xtask test` builds the modules first",
            path.display()
        )
    })
}

/// A hostile module of `overlays/modules/hostile` (WAT text).
pub fn hostile_module(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../overlays/modules/hostile")
        .join(format!("{name}.wat"))
}
