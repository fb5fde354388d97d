//! `oasis-exit`: an overlay exit node. Authorised Oasis clients send it
//! packets as UDP datagrams `[shim][IP packet]`; it sends them on toward
//! their legacy destinations from its own address (NAT for TCP, UDP and
//! ICMP echo) and returns the replies the same way. It is not an open
//! relay: only the listed client prefixes (and tokens) are served.

#[cfg(target_os = "linux")]
mod fast_maps;
#[cfg(target_os = "linux")]
mod qdisc;
#[cfg(target_os = "linux")]
mod steer;

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;

use oasis_exit::clients::Client;
use oasis_exit::core::{Exit, ExitStats, ToClient, ToInternet};
use oasis_exit::fast::{FastPath, FastWork};
use oasis_exit::nat::{self, Nat, NatConfig};
use oasis_exit::sched::PriorityQueues;
use oasis_exit::wg::{WgClients, WgPeer, is_peer_address};
use oasis_wireguard::{Opened, Sender};

/// An Oasis overlay exit node.
///
/// Example: oasis-exit --uplink eth0 --public 198.51.100.2 --client 10.1.0.0/16 --client 192.0.2.7,class=1
///
/// With WireGuard: oasis-exit --uplink eth0 --public 198.51.100.2 --wireguard-key /etc/oasis-exit/key --peer hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=,class=1
#[derive(Parser, Debug)]
#[command(name = "oasis-exit", version)]
struct Args {
    /// UDP address clients send to (repeat for IPv4 and IPv6).
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: Vec<SocketAddr>,
    /// The interface toward the Internet; replies to NATed flows are taken
    /// off it before the host's own stack sees them.
    #[arg(long)]
    uplink: String,
    /// The exit's public address(es), at most one IPv4 and one IPv6:
    /// packets leave from it.
    #[arg(long, required = true)]
    public: Vec<IpAddr>,
    /// Who may use the exit in the plain format: PREFIX[,class=N][,token=HEX].
    /// Class 0 is served first; a token must match the start of the
    /// client's shim. The plain format is the paper's: neither private nor
    /// authenticated beyond the sender's address (and a token in the
    /// clear). Prefer --wireguard-key.
    #[arg(long = "client", required_unless_present = "wireguard_key", value_parser = clap::value_parser!(Client))]
    clients: Vec<Client>,
    /// Serve clients that speak WireGuard, known by their keys (no address
    /// list needed; everything they send is sealed): this exit's private
    /// key, a file of one line as `wg genkey` prints it, mode 0600.
    #[arg(long, value_name = "FILE", requires = "peers")]
    wireguard_key: Option<PathBuf>,
    /// A WireGuard client of this exit: its public key, its priority class,
    /// and a file holding the pre-shared key it uses, if any (repeat for
    /// each client).
    #[arg(long = "peer", value_name = "PUBKEY[,class=N][,psk=FILE]", value_parser = clap::value_parser!(WgPeer))]
    peers: Vec<WgPeer>,
    /// UDP address WireGuard clients send to (repeat for IPv4 and IPv6).
    #[arg(long, default_value = "0.0.0.0:51820")]
    wireguard_listen: Vec<SocketAddr>,
    /// Ports (and ICMP echo identifiers) the NAT gives out. Packets to
    /// these ports of the public address belong to the NAT: the range must
    /// not hold the host's own services nor overlap its ephemeral ports
    /// (net.ipv4.ip_local_port_range, 32768-60999 by default).
    #[arg(long, default_value = "61000-65535", value_parser = parse_range)]
    nat_ports: RangeInclusive<u16>,
    /// Most flows at once; new flows are refused beyond it.
    #[arg(long, default_value_t = 65_536)]
    max_flows: usize,
    /// How long an established TCP connection may stay silent and keep its
    /// mapping (after a FIN or RST: 10 s).
    #[arg(long, default_value_t = 7_440)]
    tcp_idle_secs: u64,
    /// How long a UDP mapping lives without packets.
    #[arg(long, default_value_t = 120)]
    udp_idle_secs: u64,
    /// The overlay's shim length: bytes before each packet, both ways.
    #[arg(long, default_value_t = 0)]
    shim_len: usize,
    /// Priority classes; a client's class beyond the last counts as the last.
    #[arg(long, default_value_t = 4)]
    classes: usize,
    /// Packets each class may have waiting.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// The TUN device replies arrive on.
    #[arg(long, default_value = "oasisx0")]
    tun: String,
    /// Write counters (per client and class) here as JSON, every second.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Keep the NAT's mappings here (written within a second of a change,
    /// read at start), so clients' connections survive a restart.
    #[arg(long, default_value = "/var/lib/oasis-exit/nat.json")]
    state_file: PathBuf,
    /// A directory on a BPF file system where the steering of replies is
    /// pinned, so that it outlives the process: replies arriving while no
    /// exit runs (a restart, a crash) are dropped, not reset by this host's
    /// stack, and clients' connections survive. Mounted when it is an
    /// empty directory without one.
    #[arg(long, default_value = "/sys/fs/bpf/oasis-exit")]
    pin_dir: PathBuf,
    /// Remove the pinned steering of --uplink (an exit retired for good)
    /// and exit.
    #[arg(long)]
    unpin: bool,
    /// Carry every packet in user space. By default, once a client's flow
    /// (the client over IPv4 or IPv6, sending to the first --listen port of
    /// its family) has a mapping, the uplink's kernel program carries its
    /// IPv4 TCP and UDP packets both ways (decapsulation, NAT, the reply's
    /// encapsulation), and this process sees only their SYNs, FINs and
    /// RSTs; the counters of those packets are under "fast_path" in the
    /// stats file, not per client.
    #[arg(long)]
    no_fast_path: bool,
    /// The uplink's real rate (100mbit, 1gbit): with it, the priority
    /// classes hold for the packets the kernel carries too. The exit puts
    /// an htb qdisc on the uplink, shaped to this rate, with one class per
    /// priority class: each is guaranteed 1% and takes what is left in
    /// class order (class 0 first). Packets of the user-space path and the
    /// host's own go in class 0. Removed when the exit stops.
    #[arg(long, value_parser = qdisc::parse_rate)]
    uplink_rate: Option<u64>,
}

/// Set by SIGTERM or SIGINT: the exit saves its NAT state and stops.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn parse_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = text.split_once('-').ok_or("give a range such as 61000-65535")?;
    let (a, b): (u16, u16) = (
        a.parse().map_err(|_| "bad first port")?,
        b.parse().map_err(|_| "bad last port")?,
    );
    if a == 0 || a > b {
        return Err("the range must be non-empty and start at 1 or above".into());
    }
    Ok(a..=b)
}

/// The kernel's range of ephemeral source ports.
fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((parts.next()??, parts.next()??))
}

/// What the stats file holds: the core's counters and the steering
/// program's own cost.
#[derive(Serialize)]
struct StatsFile {
    #[serde(flatten)]
    stats: ExitStats,
    program: Option<steer::ProgramStats>,
    /// What the kernel carried (absent with --no-fast-path).
    fast_path: Option<fast_maps::FastStats>,
    /// The WireGuard clients (absent without --wireguard-key).
    #[serde(skip_serializing_if = "Option::is_none")]
    wireguard: Option<WgStats>,
}

#[derive(Serialize)]
struct WgStats {
    public_key: String,
    peers: Vec<WgPeerStats>,
}

#[derive(Serialize)]
struct WgPeerStats {
    public_key: String,
    /// The address the NAT and the per-client counters know it by.
    client: SocketAddr,
    endpoint: Option<SocketAddr>,
    last_handshake_secs: Option<u64>,
    handshakes: u64,
    tx_bytes: u64,
    rx_bytes: u64,
    rejected: u64,
}

fn wg_stats(wg: &WgClients) -> WgStats {
    WgStats {
        public_key: wg.responder.public().to_string(),
        peers: wg
            .responder
            .peers()
            .iter()
            .enumerate()
            .map(|(i, tunnel)| {
                let status = tunnel.status();
                WgPeerStats {
                    public_key: tunnel.peer().to_string(),
                    client: wg.client(i).0,
                    endpoint: wg.endpoint(i),
                    last_handshake_secs: status.last_handshake.map(|d| d.as_secs()),
                    handshakes: status.handshakes,
                    tx_bytes: status.tx_bytes,
                    rx_bytes: status.rx_bytes,
                    rejected: status.rejected,
                }
            })
            .collect(),
    }
}

/// The WireGuard side: the clients, and the sockets they send to.
struct WireGuard {
    clients: WgClients,
    sockets: Vec<Arc<socket2::Socket>>,
}

impl WireGuard {
    /// The socket that reaches `to`.
    fn socket_for(&self, to: SocketAddr) -> Option<&socket2::Socket> {
        self.sockets
            .iter()
            .find(|s| {
                s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a.is_ipv4() == to.is_ipv4())
            })
            .map(Arc::as_ref)
    }

    /// Seals `packet` for the peer the NAT knows by `client` and sends it
    /// to where the peer last was (one datagram: resets, timers).
    fn seal_and_send(&self, client: SocketAddr, packet: &[u8], now: Instant) {
        let Some(i) = self.clients.peer_of(client) else {
            return;
        };
        let Some(to) = self.clients.endpoint(i) else {
            return;
        };
        let mut sealed =
            vec![0u8; packet.len() + oasis_wireguard::DATA_OVERHEAD + oasis_wireguard::MIN_BUFFER];
        let datagram = self.clients.responder.peers()[i]
            .lock()
            .seal(packet, &mut sealed, now)
            .map(<[u8]>::to_vec);
        if let (Some(datagram), Some(socket)) = (datagram, self.socket_for(to)) {
            let _ = socket.send_to(&datagram, &to.into());
        }
    }

    /// The protocol's timers, about every quarter second (keepalives,
    /// expiring sessions), and the handshake budget once a second.
    fn tick(&self, buf: &mut [u8], now: Instant, second: bool) {
        if second {
            self.clients.responder.tick();
        }
        for (i, tunnel) in self.clients.responder.peers().iter().enumerate() {
            let Some(to) = self.clients.endpoint(i) else {
                continue;
            };
            let datagram = tunnel.lock().tick(buf, now).map(<[u8]>::to_vec);
            if let (Some(datagram), Some(socket)) = (datagram, self.socket_for(to)) {
                let _ = socket.send_to(&datagram, &to.into());
            }
        }
    }
}

/// The fast path's maps, shared by the packet threads (which install) and
/// the upkeep (which ages and removes); the kernel itself needs no lock.
struct Fast {
    maps: Mutex<fast_maps::FastMaps>,
    install_failures: std::sync::atomic::AtomicU64,
}

impl Fast {
    fn apply(&self, work: &mut Vec<FastWork>) {
        if work.is_empty() {
            return;
        }
        let failed = self.maps.lock().unwrap_or_else(|e| e.into_inner()).apply(work);
        self.install_failures
            .fetch_add(failed, std::sync::atomic::Ordering::Relaxed);
        work.clear();
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    run(args)
}

fn run(args: Args) -> anyhow::Result<()> {
    use oasis_io::linux::raw::RawSockets;
    use oasis_io::linux::tun::{Tun, uplink_mtu};
    use steer::ExitSteering;

    if args.unpin {
        return unpin(&args);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let (public_v4, public_v6) = publics(&args.public);
    check_ports(&args)?;
    if args.shim_len > oasis_common::MAX_SHIM_LEN {
        bail!("--shim-len must be at most {}", oasis_common::MAX_SHIM_LEN);
    }

    let mtu = uplink_mtu(std::slice::from_ref(&args.uplink));
    // The fast path serves clients on the first --listen port of each
    // family; what it carries inside is IPv4, NATed to the public IPv4.
    let fast_port_of = |v4: bool| match (args.no_fast_path, public_v4) {
        (false, Some(_)) => args
            .listen
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map_or(0, |a| a.port()),
        _ => 0,
    };
    let (fast_port, fast_port_v6) = (fast_port_of(true), fast_port_of(false));
    let uplink_ifindex = {
        let name = std::ffi::CString::new(args.uplink.as_str()).context("--uplink")?;
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    let tun = Tun::create(&args.tun, 1, mtu, std::net::Ipv4Addr::new(192, 0, 0, 8))
        .with_context(|| format!("creating TUN {} (run as root)", args.tun))?;
    let settings = oasis_common::ExitSettings {
        v4: public_v4.map(|a| a.octets()).unwrap_or_default(),
        v6: public_v6.map(|a| a.octets()).unwrap_or_default(),
        has_v4: u8::from(public_v4.is_some()),
        has_v6: u8::from(public_v6.is_some()),
        _pad: [0; 2],
        port_first: *args.nat_ports.start(),
        port_last: *args.nat_ports.end(),
        tun_ifindex: tun.ifindex,
        fast_port,
        shim_len: args.shim_len as u8,
        prioritise: u8::from(args.uplink_rate.is_some()),
        uplink_ifindex,
        mtu,
        fast_port_v6,
        _pad2: [0; 4],
    };
    // Removed when run returns, whether the exit stops or fails to start.
    let _shaper = match args.uplink_rate {
        Some(_) => Some(qdisc::Shaper::new(&args.uplink)),
        None => None,
    };
    if let Some(rate) = args.uplink_rate {
        qdisc::install(&args.uplink, rate, args.classes)
            .map_err(|e| anyhow::anyhow!("the priority classes on {}: {e}", args.uplink))?;
        tracing::info!(
            rate,
            classes = args.classes.min(8),
            "priority classes: htb on the uplink"
        );
    }
    let mut steering = ExitSteering::attach(&args.uplink, settings, Some(&args.pin_dir))
        .with_context(|| format!("steering replies on {}", args.uplink))?;
    let fast = if fast_port != 0 || fast_port_v6 != 0 {
        let maps = fast_maps::FastMaps::take(steering.ebpf_mut())?;
        Some(Arc::new(Fast {
            maps: Mutex::new(maps),
            install_failures: Default::default(),
        }))
    } else {
        None
    };
    if let Some(path) = &steering.pinned {
        tracing::info!(path = %path.display(), "steering pinned: it outlives this process (`oasis-exit --unpin` removes it)");
    }
    let raw = Arc::new(RawSockets::open(0).context("opening raw sockets (run as root)")?);

    let mut nat_config = NatConfig::new(public_v4, public_v6, args.nat_ports.clone());
    nat_config.max_flows = args.max_flows;
    nat_config.tcp_idle = std::time::Duration::from_secs(args.tcp_idle_secs);
    nat_config.udp_idle = std::time::Duration::from_secs(args.udp_idle_secs);
    let mut exit = Exit::new(restored_nat(nat_config, &args.state_file));
    if let (Some(fast), Some(public)) = (&fast, public_v4) {
        exit = exit.with_fast_path(FastPath::new(
            public,
            (fast_port, fast_port_v6),
            args.shim_len,
            args.clients.clone(),
        ));
        // The restored mappings, at once.
        let mut work = Vec::new();
        exit.take_fast_work(&mut work);
        fast.apply(&mut work);
        tracing::info!(
            port = fast_port,
            port_v6 = fast_port_v6,
            "fast path on: the kernel carries clients' IPv4 TCP and UDP flows"
        );
    }
    let core = Arc::new(Mutex::new(exit));
    let clients = Arc::new(args.clients.clone());
    // The plain format only for the clients listed for it.
    let sockets = match args.clients.is_empty() {
        true => Vec::new(),
        false => client_sockets(&args.listen)?,
    };
    let wireguard = match &args.wireguard_key {
        Some(path) => {
            let (key, readable) = oasis_wireguard::PrivateKey::read(path)?;
            if readable {
                tracing::warn!(path = %path.display(), "the private key file may be read by others than its owner: chmod 600 it");
            }
            let wg_sockets = client_sockets(&args.wireguard_listen)?;
            tracing::info!(
                public_key = %key.public(),
                listen = ?args.wireguard_listen,
                peers = args.peers.len(),
                "serving WireGuard clients"
            );
            let (psks, open) = oasis_exit::wg::preshared_keys(&args.peers).map_err(anyhow::Error::msg)?;
            for file in open {
                tracing::warn!(
                    file,
                    "the pre-shared key file may be read by others than its owner: chmod 600 it"
                );
            }
            let clients = WgClients::new(key, &args.peers, &psks);
            let saved = endpoints_file(&args.state_file);
            if let Ok(bytes) = std::fs::read(&saved) {
                match serde_json::from_slice(&bytes) {
                    Ok(endpoints) => {
                        let restored = clients.restore(&endpoints);
                        tracing::info!(restored, path = %saved.display(), "WireGuard clients' endpoints restored");
                    }
                    Err(e) => {
                        tracing::warn!(path = %saved.display(), "the saved endpoints are not valid ({e})")
                    }
                }
            }
            Some(Arc::new(WireGuard {
                clients,
                sockets: wg_sockets,
            }))
        }
        None => None,
    };

    let mut threads = Vec::new();
    let intakes = sockets
        .iter()
        .map(|socket| {
            let intake = Intake::Plain {
                clients: clients.clone(),
                shim_len: args.shim_len,
            };
            (socket.clone(), intake)
        })
        .chain(wireguard.iter().flat_map(|wg| {
            wg.sockets
                .iter()
                .map(|socket| (socket.clone(), Intake::WireGuard(wg.clone())))
        }))
        .collect::<Vec<_>>();
    for (socket, intake) in intakes {
        let (core, raw) = (core.clone(), raw.clone());
        let (classes, queue) = (args.classes, args.queue);
        let fast = fast.clone();
        // The kernel opens only single datagrams: a socket that asks for
        // merged ones (GRO) would have the uplink merge the fast path's
        // datagrams before the program sees them.
        let fast_socket = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == if a.is_ipv4() { fast_port } else { fast_port_v6 });
        let gro = fast.is_none() || !fast_socket || matches!(intake, Intake::WireGuard(_));
        threads.push(std::thread::spawn(move || {
            to_internet(
                &socket,
                &core,
                &intake,
                &raw,
                classes,
                queue,
                gro,
                fast.as_deref(),
                usize::from(mtu),
            )
        }));
    }
    {
        let raw = raw.clone();
        let (core, device) = (core.clone(), tun.queues.into_iter().next().context("TUN queue")?);
        let sockets = sockets.clone();
        let shim = vec![0u8; args.shim_len];
        let wireguard = wireguard.clone();
        threads.push(std::thread::spawn(move || {
            to_clients(&device, &core, &sockets, &shim, &raw, wireguard.as_deref())
        }));
    }
    tracing::info!(listen = ?args.listen, public = ?args.public, clients = args.clients.len(), "oasis-exit ready");
    upkeep(
        &args,
        &core,
        &steering,
        fast.as_deref(),
        wireguard.as_deref(),
        &threads,
    )
}

/// How a client socket's datagrams are admitted: the plain format by the
/// sender's address (and token), or WireGuard by key.
enum Intake {
    Plain {
        clients: Arc<Vec<Client>>,
        shim_len: usize,
    },
    WireGuard(Arc<WireGuard>),
}

/// Where the WireGuard clients' endpoints are kept, beside the NAT state.
fn endpoints_file(state_file: &std::path::Path) -> PathBuf {
    state_file.with_extension("wireguard.json")
}

/// `--unpin`: removes the steering a retired exit left pinned.
fn unpin(args: &Args) -> anyhow::Result<()> {
    let removed = steer::ExitSteering::unpin(&args.pin_dir, &args.uplink)?;
    println!(
        "{}",
        if removed {
            "the pinned steering is removed"
        } else {
            "there was no pinned steering for this uplink"
        }
    );
    Ok(())
}

/// The public IPv4 and IPv6 address, each if given.
fn publics(public: &[IpAddr]) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let v4 = public.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        _ => None,
    });
    let v6 = public.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(*v6),
        _ => None,
    });
    (v4, v6)
}

/// Refuses NAT ports the host's own connections could be given.
fn check_ports(args: &Args) -> anyhow::Result<()> {
    if let Some((first, last)) = ephemeral_ports()
        && first <= *args.nat_ports.end()
        && *args.nat_ports.start() <= last
    {
        bail!(
            "--nat-ports {}-{} overlaps this host's ephemeral ports {first}-{last} \
             (net.ipv4.ip_local_port_range): replies to the host's own connections \
             would be taken for NAT replies. Pick a range outside it, or narrow the sysctl.",
            args.nat_ports.start(),
            args.nat_ports.end()
        );
    }
    Ok(())
}

/// A NAT holding the mappings the last exit saved; an unreadable file
/// costs the old flows, never the start.
fn restored_nat(config: NatConfig, state_file: &std::path::Path) -> Nat {
    let mut nat = Nat::new(config);
    match std::fs::read(state_file) {
        Ok(bytes) => match serde_json::from_slice::<nat::NatState>(&bytes) {
            Ok(state) => {
                let saved = state.len();
                let restored = nat.restore(state, Instant::now());
                tracing::info!(restored, saved, path = %state_file.display(), "NAT mappings restored");
            }
            Err(e) => {
                tracing::warn!(path = %state_file.display(), "the NAT state file is not valid ({e}); starting empty")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %state_file.display(), "cannot read the NAT state ({e}); starting empty")
        }
    }
    nat
}

/// One UDP socket per --listen address, with buffers for bursts.
fn client_sockets(listen: &[SocketAddr]) -> anyhow::Result<Vec<Arc<socket2::Socket>>> {
    let mut sockets = Vec::new();
    for listen in listen {
        let socket = socket2::Socket::new(socket2::Domain::for_address(*listen), socket2::Type::DGRAM, None)?;
        if listen.is_ipv6() {
            socket.set_only_v6(true)?;
            oasis_io::linux::mmsg::accept_zero_udp_checksum_v6(&socket)?;
        }
        socket.set_recv_buffer_size(8 << 20)?;
        socket.set_send_buffer_size(8 << 20)?;
        socket
            .bind(&(*listen).into())
            .with_context(|| format!("binding {listen}"))?;
        sockets.push(Arc::new(socket));
    }
    Ok(sockets)
}

/// Once a second (and on SIGTERM at once): expire mappings, save the NAT
/// state when it changed, write the counters; stops when asked to or when a
/// packet thread died.
fn upkeep(
    args: &Args,
    core: &Mutex<Exit>,
    steering: &steer::ExitSteering,
    fast: Option<&Fast>,
    wireguard: Option<&WireGuard>,
    threads: &[std::thread::JoinHandle<()>],
) -> anyhow::Result<()> {
    let mut last_log = Instant::now();
    let mut last_upkeep = Instant::now() - Duration::from_secs(1);
    let mut last_wg_tick = Instant::now();
    let mut wg_buf = vec![0u8; DATAGRAM];
    let mut due = Vec::new();
    let mut work = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(wg) = wireguard
            && last_wg_tick.elapsed() >= Duration::from_millis(250)
        {
            let second = last_upkeep.elapsed() >= Duration::from_secs(1);
            last_wg_tick = Instant::now();
            wg.tick(&mut wg_buf, last_wg_tick, second);
        }
        let stopping = STOP.load(std::sync::atomic::Ordering::Relaxed);
        if !stopping && last_upkeep.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last_upkeep = Instant::now();
        let now = Instant::now();
        // Flows the kernel carries age by the kernel's clock too: asked
        // outside the lock, for the few the user-space path alone would
        // expire now (for all of them before the last save, so the state
        // file holds how long each was really idle).
        if let Some(fast) = fast {
            core.lock()
                .unwrap_or_else(|e| e.into_inner())
                .fast_due(now, stopping, &mut due);
            if !due.is_empty() {
                let seen: Vec<_> = {
                    let maps = fast.maps.lock().unwrap_or_else(|e| e.into_inner());
                    due.drain(..)
                        .filter_map(|(inside, entry)| maps.last_seen(&entry, now).map(|at| (inside, at)))
                        .collect()
                };
                let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
                for (inside, at) in &seen {
                    core.fast_seen(inside, *at);
                }
            }
        }
        // Copied under the lock, written outside it.
        let (stats, state) = {
            let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
            let done = core.upkeep(now, stopping);
            core.take_fast_work(&mut work);
            done
        };
        if let Some(fast) = fast {
            fast.apply(&mut work);
        }
        if let Some(state) = state
            && let Err(e) = save_state(&args.state_file, &state)
        {
            tracing::warn!(path = %args.state_file.display(), "saving the NAT state: {e}");
        }
        if let Some(endpoints) = wireguard.and_then(|wg| wg.clients.take_moved()) {
            let path = endpoints_file(&args.state_file);
            let tmp = path.with_extension("tmp");
            let written = serde_json::to_vec_pretty(&endpoints)
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), "saving the WireGuard clients' endpoints: {e}");
            }
        }
        if let Some(path) = &args.stats_file {
            let tmp = path.with_extension("tmp");
            let file = StatsFile {
                stats: stats.clone(),
                program: steering.stats(),
                fast_path: fast.map(|fast| {
                    let failures = fast.install_failures.load(std::sync::atomic::Ordering::Relaxed);
                    fast.maps
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .stats(failures)
                }),
                wireguard: wireguard.map(|wg| wg_stats(&wg.clients)),
            };
            if std::fs::write(&tmp, serde_json::to_vec_pretty(&file)?).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        if last_log.elapsed() > Duration::from_secs(30) {
            tracing::info!(
                flows = stats.nat_flows,
                clients = stats.clients.len(),
                "exit counters: {:?}",
                stats.classes
            );
            last_log = Instant::now();
        }
        if stopping {
            // The steering stays pinned: replies wait for the next exit.
            tracing::info!(flows = stats.nat_flows, "stopping: the NAT state is saved");
            return Ok(());
        }
        if threads.iter().any(|t| t.is_finished()) {
            bail!("a packet thread stopped; see the log above");
        }
    }
}

/// Writes the NAT state atomically (a temporary file renamed over it).
fn save_state(path: &std::path::Path, state: &nat::NatState) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

const BATCH: usize = 16;
/// A receive buffer holds one datagram, or a coalesced run of them.
const CLIENT_BUFFER: usize = 65_536;
const DATAGRAM: usize = 65_536;
/// Packets sent per round before the socket is read again, so new arrivals
/// of a higher class overtake waiting ones of a lower class.
const BUDGET: usize = 128;

/// A client's packet waiting for its turn.
struct Queued {
    sender: SocketAddr,
    packet: Vec<u8>,
}

/// Clients -> Internet: authorise, queue by class, NAT, send; the flows
/// the kernel can carry from then on are handed to it.
#[allow(clippy::too_many_arguments)]
fn to_internet(
    socket: &socket2::Socket,
    core: &Mutex<Exit>,
    intake: &Intake,
    raw: &oasis_io::linux::raw::RawSockets,
    classes: usize,
    queue: usize,
    gro: bool,
    fast: Option<&Fast>,
    mtu: usize,
) {
    use oasis_io::linux::mmsg::{Received, Receiver, datagrams, enable_udp_gro};
    use oasis_io::linux::raw::RawBatches;
    use oasis_io::linux::segment::cut_tcp;
    let mut bufs = vec![vec![0u8; CLIENT_BUFFER]; BATCH];
    let mut received = [Received::default(); BATCH];
    let mut receiver = Receiver::default();
    let mut raw_batches = RawBatches::default();
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(BUDGET);
    let mut queues: PriorityQueues<Queued> = PriorityQueues::new(classes, queue);
    // Spare packet buffers, reused so the steady state allocates nothing.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    // Resets for clients' segments of unknown connections: buffers reused,
    // sent once the NAT's lock is let go.
    let mut resets: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut nonblocking = false;
    let mut work: Vec<FastWork> = Vec::new();
    // WireGuard: packets opened before the core's lock is taken, and the
    // protocol's answers (handshake responses, cookies, what waited for a
    // session) sent after.
    let mut opened: Vec<(SocketAddr, u8, Vec<u8>)> = Vec::new();
    let mut answers: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut scratch = vec![0u8; DATAGRAM];
    let shim_len = match intake {
        Intake::Plain { shim_len, .. } => *shim_len,
        Intake::WireGuard(_) => 0,
    };
    if gro && let Err(e) = enable_udp_gro(socket) {
        tracing::warn!("no UDP GRO on the client socket ({e}); datagrams arrive one by one");
    }
    loop {
        // Block only when nothing waits to be sent.
        if nonblocking == queues.is_empty() {
            nonblocking = !queues.is_empty();
            let _ = socket.set_nonblocking(nonblocking);
        }
        let count = match receiver.recv(socket.as_raw_fd(), &mut bufs, 0, &mut received) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => {
                tracing::error!("receiving from clients: {e}");
                return;
            }
        };
        let now = Instant::now();
        let mut refused = 0;
        if let Intake::WireGuard(wg) = intake {
            let received = bufs.iter().zip(&received).take(count);
            refused = open_sealed(
                &wg.clients,
                received,
                &mut scratch,
                &mut pool,
                &mut opened,
                &mut answers,
                now,
            );
        }
        let mut core_guard = core.lock().unwrap_or_else(|e| e.into_inner());
        let core = &mut *core_guard;
        core.refused_wireguard(refused);
        for (sender, class, packet) in opened.drain(..) {
            if let Err(queued) = queues.push(class, Queued { sender, packet }) {
                core.queue_full(sender, class);
                pool.push(queued.packet);
            }
        }
        if let Intake::Plain { clients, shim_len } = intake {
            for (buf, got) in bufs.iter().zip(&received).take(count) {
                let Some(sender) = got.from else { continue };
                for range in datagrams(got.len, got.segment) {
                    let Some((class, inner)) = core.admit(clients, *shim_len, sender, &buf[range]) else {
                        continue;
                    };
                    let mut packet = pool.pop().unwrap_or_default();
                    packet.clear();
                    packet.extend_from_slice(inner);
                    if let Err(queued) = queues.push(class, Queued { sender, packet }) {
                        core.queue_full(sender, class);
                        pool.push(queued.packet);
                    }
                }
            }
        }
        let mut used = 0;
        while out.len() < BUDGET {
            let Some((class, mut queued)) = queues.pop() else {
                break;
            };
            if used == resets.len() {
                resets.push((queued.sender, Vec::new()));
            }
            let (to, back) = &mut resets[used];
            match core.to_internet(queued.sender, class, &mut queued.packet, now, shim_len, back) {
                ToInternet::Send => {
                    // Larger than the uplink takes: a client's GSO packet
                    // nothing cut on its way (`oasis_io::linux::segment`).
                    // What is not TCP goes as it is, as before.
                    if queued.packet.len() > mtu && cut_tcp(&mut queued.packet, mtu, &mut pool, &mut out) {
                        pool.push(queued.packet);
                    } else {
                        out.push(queued.packet);
                    }
                }
                ToInternet::Reset => {
                    *to = queued.sender;
                    used += 1;
                    pool.push(queued.packet);
                }
                ToInternet::Refused => pool.push(queued.packet),
            }
        }
        core.take_fast_work(&mut work);
        drop(core_guard);
        if let Some(fast) = fast {
            fast.apply(&mut work);
        }
        for (to, back) in &resets[..used] {
            match intake {
                Intake::WireGuard(wg) if is_peer_address(*to) => wg.seal_and_send(*to, back, now),
                _ => {
                    let _ = socket.send_to(back, &(*to).into());
                }
            }
        }
        for (to, answer) in answers.drain(..) {
            let _ = socket.send_to(&answer, &to.into());
        }
        raw.send(&mut raw_batches, out.iter().map(Vec::as_slice));
        pool.append(&mut out);
    }
}

/// Opens what WireGuard clients sent: each packet, with the address the
/// NAT knows its peer by and the peer's class, into `opened` (buffers from
/// `pool`); the protocol's answers into `answers`. The datagrams refused
/// (no peer of this exit, forged, replayed), counted.
fn open_sealed<'b>(
    wg: &WgClients,
    received: impl Iterator<Item = (&'b Vec<u8>, &'b oasis_io::linux::mmsg::Received)>,
    scratch: &mut [u8],
    pool: &mut Vec<Vec<u8>>,
    opened: &mut Vec<(SocketAddr, u8, Vec<u8>)>,
    answers: &mut Vec<(SocketAddr, Vec<u8>)>,
    now: Instant,
) -> u64 {
    let mut refused = 0;
    // Each peer's tunnel locked once per run of datagrams from it.
    let mut held: Option<(usize, oasis_wireguard::Sealer<'_>)> = None;
    for (buf, got) in received {
        let Some(from) = got.from else { continue };
        for range in oasis_io::linux::mmsg::datagrams(got.len, got.segment) {
            let datagram = &buf[range];
            let peer = match wg.responder.sender(from.ip(), datagram, scratch) {
                Sender::Peer(peer) => peer,
                Sender::Cookie(cookie) => {
                    answers.push((from, cookie.to_vec()));
                    continue;
                }
                Sender::Unknown => {
                    refused += 1;
                    continue;
                }
            };
            if held.as_ref().is_none_or(|(p, _)| *p != peer) {
                held = Some((peer, wg.responder.peers()[peer].lock()));
            }
            let (_, sealer) = held.as_mut().expect("just held");
            match sealer.open(from.ip(), datagram, scratch, now) {
                Opened::Packet(packet) => {
                    wg.seen_at(peer, from);
                    let (client, class) = wg.client(peer);
                    let mut buffer = pool.pop().unwrap_or_default();
                    buffer.clear();
                    buffer.extend_from_slice(packet);
                    opened.push((client, class, buffer));
                }
                Opened::Reply(reply) => {
                    wg.seen_at(peer, from);
                    answers.push((from, reply.to_vec()));
                    while let Some(waited) = sealer.flush(scratch) {
                        answers.push((from, waited.to_vec()));
                    }
                }
                Opened::Nothing => wg.seen_at(peer, from),
                Opened::Rejected(_) => refused += 1,
            }
        }
    }
    refused
}

/// Internet -> clients: replies steered to the TUN, mapped back, returned.
fn to_clients(
    device: &tun_rs::SyncDevice,
    core: &Mutex<Exit>,
    sockets: &[Arc<socket2::Socket>],
    shim: &[u8],
    raw_sockets: &oasis_io::linux::raw::RawSockets,
    wireguard: Option<&WireGuard>,
) {
    let mut raw_batches = oasis_io::linux::raw::RawBatches::default();
    // Resets for servers sending to lost mappings: buffers reused.
    let mut resets: Vec<Vec<u8>> = Vec::new();
    use oasis_io::linux::mmsg::GsoDatagrams;
    use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
    let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + DATAGRAM];
    let mut segments = vec![vec![0u8; DATAGRAM]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut targets: Vec<Option<SocketAddr>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let mut stores: Vec<GsoDatagrams> = sockets.iter().map(|_| GsoDatagrams::default()).collect();
    // Replies to WireGuard clients, sealed (buffers reused), and where each goes.
    let mut sealed: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut wg_stores: Vec<GsoDatagrams> = wireguard
        .map_or(&[][..], |wg| &wg.sockets)
        .iter()
        .map(|_| GsoDatagrams::default())
        .collect();
    let socket_is_v4: Vec<bool> = sockets
        .iter()
        .map(|s| {
            s.local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a.is_ipv4())
        })
        .collect();
    loop {
        let count = match device.recv_multiple(&mut raw, &mut segments, &mut sizes, 0) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("reading replies: {e}");
                continue;
            }
        };
        let now = Instant::now();
        targets.clear();
        let mut used = 0;
        {
            let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
            for (segment, &size) in segments.iter_mut().zip(&sizes).take(count) {
                if used == resets.len() {
                    resets.push(Vec::new());
                }
                match core.to_client(&mut segment[..size], now, &mut resets[used]) {
                    ToClient::Client(client) => targets.push(Some(client)),
                    ToClient::Reset => {
                        used += 1;
                        targets.push(None);
                    }
                    ToClient::Dropped => targets.push(None),
                }
            }
        }
        for ((store, socket), socket_v4) in stores.iter_mut().zip(sockets).zip(&socket_is_v4) {
            let mut batch = store.batch();
            for ((segment, &size), target) in segments.iter().zip(&sizes).zip(&targets) {
                if let Some(client) = target
                    && client.is_ipv4() == *socket_v4
                    && !is_peer_address(*client)
                {
                    batch.push(shim, &segment[..size], *client);
                }
            }
            batch.send(socket.as_raw_fd());
        }
        if let Some(wg) = wireguard {
            let sent = seal_replies(wg, &segments, &sizes, &targets, &mut sealed, now);
            for (store, socket) in wg_stores.iter_mut().zip(&wg.sockets) {
                let v4 = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a.is_ipv4());
                let mut batch = store.batch();
                for (datagram, to) in sealed[..sent].iter().filter(|(_, to)| to.is_ipv4() == v4) {
                    batch.push(&[], datagram, *to);
                }
                batch.send(socket.as_raw_fd());
            }
        }
        if used > 0 {
            raw_sockets.send(&mut raw_batches, resets[..used].iter().map(Vec::as_slice));
        }
    }
}

/// Seals the replies for WireGuard clients into `sealed` (buffers reused),
/// each peer's tunnel locked once per run of replies to it; how many.
fn seal_replies(
    wg: &WireGuard,
    segments: &[Vec<u8>],
    sizes: &[usize],
    targets: &[Option<SocketAddr>],
    sealed: &mut Vec<(Vec<u8>, SocketAddr)>,
    now: Instant,
) -> usize {
    let mut used = 0;
    let mut held: Option<(usize, oasis_wireguard::Sealer<'_>)> = None;
    for ((segment, &size), target) in segments.iter().zip(sizes).zip(targets) {
        let Some(client) = target.filter(|c| is_peer_address(*c)) else {
            continue;
        };
        let Some(peer) = wg.clients.peer_of(client) else {
            continue;
        };
        let Some(to) = wg.clients.endpoint(peer) else {
            continue;
        };
        if held.as_ref().is_none_or(|(p, _)| *p != peer) {
            held = Some((peer, wg.clients.responder.peers()[peer].lock()));
        }
        let (_, sealer) = held.as_mut().expect("just held");
        if sealed.len() == used {
            sealed.push((Vec::with_capacity(2048), to));
        }
        let (buf, dest) = &mut sealed[used];
        buf.resize(
            (size + oasis_wireguard::DATA_OVERHEAD).max(oasis_wireguard::MIN_BUFFER),
            0,
        );
        if let Some(len) = sealer.seal(&segment[..size], buf, now).map(<[u8]>::len) {
            buf.truncate(len);
            *dest = to;
            used += 1;
        }
    }
    used
}
