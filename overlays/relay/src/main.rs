//! `oasis-relay`: forwards an overlay's datagrams to a next hop (another
//! relay or an exit node) and the answers back, for detour overlays. It can
//! add a fixed delay and random loss in each direction, which also makes it
//! the path emulator of the tests (this kernel has no netem); with `--tun`
//! it is a delay line for plain IP packets instead (see `line`).
//!
//! Each client gets its own upstream socket, so the next hop sees the relay
//! as one sender per client and answers arrive on that client's socket.
//! Datagrams pass through unchanged: the shim stays as the client wrote it.

#[cfg(target_os = "linux")]
mod line;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

/// An Oasis overlay relay.
///
/// Example: oasis-relay --listen 0.0.0.0:7500 --next-hop 198.51.100.2:7400 --delay-ms 20 --loss-percent 1
///
/// As a delay line for IP packets routed into a TUN (a path emulator for
/// tests): oasis-relay --tun dly0 --delay-ms 20 --rate-mbit 50 --control /tmp/shape
#[derive(Parser, Debug, Clone)]
#[command(name = "oasis-relay", version)]
struct Args {
    /// UDP address clients (or a previous relay) send to.
    #[arg(long, default_value = "0.0.0.0:7500")]
    listen: SocketAddr,
    /// Where datagrams go on: an exit node or another relay.
    #[arg(long, required_unless_present = "tun")]
    next_hop: Option<SocketAddr>,
    /// Be a delay line for IP packets instead: create this TUN device and
    /// write back, delayed, what is routed into it (route it with policy
    /// rules by incoming interface, so what comes back out goes on).
    #[arg(long, value_name = "NAME", conflicts_with = "next_hop")]
    tun: Option<String>,
    /// With --tun: pace packets to this rate, with a 100 ms queue (0: no limit).
    #[arg(long, default_value_t = 0.0, requires = "tun")]
    rate_mbit: f64,
    /// With --tun: a file of `delay_ms=N loss_percent=P rate_mbit=R`,
    /// applied whenever it changes.
    #[arg(long, value_name = "FILE", requires = "tun")]
    control: Option<std::path::PathBuf>,
    /// Delay added in each direction, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Share of datagrams dropped in each direction, in percent.
    #[arg(long, default_value_t = 0.0)]
    loss_percent: f64,
    /// A client silent this long loses its upstream socket.
    #[arg(long, default_value_t = 120)]
    idle_secs: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    returned: AtomicU64,
    lost: AtomicU64,
}

/// Where a delayed datagram goes.
enum Target {
    Upstream(Arc<UdpSocket>),
    Client(SocketAddr),
}

struct Session {
    upstream: Arc<UdpSocket>,
    last_seen: Instant,
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
    if !(0.0..=100.0).contains(&args.loss_percent) {
        anyhow::bail!("--loss-percent must be between 0 and 100");
    }
    if let Some(tun) = &args.tun {
        #[cfg(target_os = "linux")]
        return line::run(
            tun,
            line::Shape::new(args.delay_ms as f64, args.loss_percent, args.rate_mbit),
            args.control.clone(),
        );
        #[cfg(not(target_os = "linux"))]
        anyhow::bail!("--tun {tun}: the delay line runs on Linux only");
    }
    let next_hop = args.next_hop.context("--next-hop is needed without --tun")?;
    tokio::runtime::Runtime::new()
        .context("starting the runtime")?
        .block_on(relay(args, next_hop))
}

async fn relay(args: Args, next_hop: SocketAddr) -> anyhow::Result<()> {
    let listen = UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    // A client's kernel wraps in IPv6 with a zero UDP checksum (RFC 6935).
    #[cfg(target_os = "linux")]
    if args.listen.is_ipv6() {
        oasis_io::linux::mmsg::accept_zero_udp_checksum_v6(&socket2::SockRef::from(&listen))
            .context("accepting zero UDP checksums")?;
    }
    let listen = Arc::new(listen);
    let counters = Arc::new(Counters::default());
    let delay = Duration::from_millis(args.delay_ms);
    let line = delay_line(listen.clone());
    let sessions: Arc<Mutex<HashMap<SocketAddr, Session>>> = Arc::default();
    tracing::info!(listen = %args.listen, %next_hop, delay_ms = args.delay_ms, loss = args.loss_percent, "oasis-relay ready");

    {
        let (sessions, counters) = (sessions.clone(), counters.clone());
        let idle = Duration::from_secs(args.idle_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                sessions.lock().await.retain(|_, s| s.last_seen.elapsed() < idle);
                tracing::info!(
                    forwarded = counters.forwarded.load(Relaxed),
                    returned = counters.returned.load(Relaxed),
                    lost = counters.lost.load(Relaxed),
                    "relay counters"
                );
            }
        });
    }

    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, client) = listen.recv_from(&mut buf).await.context("receiving")?;
        if lose(args.loss_percent) {
            counters.lost.fetch_add(1, Relaxed);
            continue;
        }
        let upstream = {
            let mut sessions = sessions.lock().await;
            match sessions.get_mut(&client) {
                Some(session) => {
                    session.last_seen = Instant::now();
                    session.upstream.clone()
                }
                None => {
                    let upstream = Arc::new(open_upstream(next_hop).await?);
                    spawn_return_path(
                        upstream.clone(),
                        client,
                        line.clone(),
                        counters.clone(),
                        delay,
                        args.loss_percent,
                    );
                    sessions.insert(
                        client,
                        Session {
                            upstream: upstream.clone(),
                            last_seen: Instant::now(),
                        },
                    );
                    upstream
                }
            }
        };
        counters.forwarded.fetch_add(1, Relaxed);
        send(
            &line,
            &listen,
            delay,
            Target::Upstream(upstream),
            buf[..len].to_vec(),
        )
        .await;
    }
}

async fn open_upstream(next_hop: SocketAddr) -> anyhow::Result<UdpSocket> {
    let local: SocketAddr = if next_hop.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(next_hop).await?;
    Ok(socket)
}

/// Answers from the next hop for one client go back to that client.
fn spawn_return_path(
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    line: mpsc::UnboundedSender<(Instant, Target, Vec<u8>)>,
    counters: Arc<Counters>,
    delay: Duration,
    loss_percent: f64,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(len) = upstream.recv(&mut buf).await {
            if lose(loss_percent) {
                counters.lost.fetch_add(1, Relaxed);
                continue;
            }
            counters.returned.fetch_add(1, Relaxed);
            let _ = line.send((
                Instant::now() + delay,
                Target::Client(client),
                buf[..len].to_vec(),
            ));
        }
    });
}

fn lose(loss_percent: f64) -> bool {
    loss_percent > 0.0 && rand::random::<f64>() * 100.0 < loss_percent
}

/// Sends now, or through the delay line when there is a delay.
async fn send(
    line: &mpsc::UnboundedSender<(Instant, Target, Vec<u8>)>,
    listen: &UdpSocket,
    delay: Duration,
    target: Target,
    data: Vec<u8>,
) {
    if delay.is_zero() {
        deliver(listen, target, &data).await;
    } else {
        let _ = line.send((Instant::now() + delay, target, data));
    }
}

async fn deliver(listen: &UdpSocket, target: Target, data: &[u8]) {
    let _ = match target {
        Target::Upstream(socket) => socket.send(data).await,
        Target::Client(client) => listen.send_to(data, client).await,
    };
}

/// One queue for both directions: every datagram waits the same delay, so
/// holding them in arrival order keeps each direction in order.
fn delay_line(listen: Arc<UdpSocket>) -> mpsc::UnboundedSender<(Instant, Target, Vec<u8>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Target, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((deadline, target, data)) = rx.recv().await {
            tokio::time::sleep_until(deadline).await;
            deliver(&listen, target, &data).await;
        }
    });
    tx
}
