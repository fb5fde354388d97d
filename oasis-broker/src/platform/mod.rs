//! What the broker needs from an operating system. The routing engine and
//! the packet loops (`crate::forward`) use only these traits; each OS
//! implements them once: `linux` here (eBPF classifier, TUN, raw sockets);
//! a WinDivert backend for Windows is planned and does not exist yet.
//!
//! - packet I/O in batches: [`DivertedQueue`] (diverted packets in),
//!   [`Delivery`] (packets out to the host's applications),
//!   [`UnderlaySender`] (reinjection), [`DatagramSocket`] (the overlay
//!   standard port and the underlay port);
//! - the kernel side, [`Kernel`]: classifier maps and attachment, counters,
//!   the [`Heartbeat`], the NAT table (`crate::engine::NatTable`) and the
//!   [`DnsInterception`];
//! - [`Platform`]: how the daemon gets each of them.

#[cfg(target_os = "linux")]
pub mod linux;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use oasis_common::{Counters, Settings};
pub use oasis_io::datagram::{Received, datagrams};

use crate::compile::MapImage;
use crate::config::TunConfig;
use crate::control::{ClassifierCounters, ProgramStatsView, UplinkView};
use crate::engine::{EncapTable, FlowPins, LocalAddresses, NatTable};

/// An operating system's error, with the context its implementation gave
/// it (which program, map, hook or interface).
pub type PlatformError = Box<dyn std::error::Error + Send + Sync>;

/// Reusable buffers for one batch of diverted packets.
pub struct PacketBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    count: usize,
}

impl PacketBatch {
    /// Room for `packets` packets of up to `size` bytes each.
    pub fn new(packets: usize, size: usize) -> PacketBatch {
        PacketBatch {
            bufs: vec![vec![0; size]; packets],
            lens: vec![0; packets],
            count: 0,
        }
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    /// How many packets the batch holds at most.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// The free buffers and their length slots, for a platform to fill;
    /// then [`PacketBatch::filled`] says how many it filled.
    pub fn free(&mut self) -> (&mut [Vec<u8>], &mut [usize]) {
        (&mut self.bufs[self.count..], &mut self.lens[self.count..])
    }

    pub fn filled(&mut self, count: usize) {
        self.count = (self.count + count).min(self.bufs.len());
    }

    pub fn packet_mut(&mut self, index: usize) -> &mut [u8] {
        &mut self.bufs[index][..self.lens[index]]
    }

    pub fn packets(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.bufs
            .iter()
            .zip(&self.lens)
            .take(self.count)
            .map(|(buf, &len)| &buf[..len])
    }
}

/// Where diverted packets arrive (Linux: one TUN queue).
pub trait DivertedQueue: Send {
    /// A batch with the room this queue's reads need.
    fn new_batch(&self) -> PacketBatch;
    /// Waits up to `timeout` for diverted packets, then adds as many as are
    /// ready to `batch`, without waiting again. On timeout the batch stays
    /// as it was.
    fn recv(&mut self, batch: &mut PacketBatch, timeout: Duration) -> io::Result<()>;
}

/// Where packets for the host's applications go: ICMP errors the engine
/// writes, packets returned by overlays (Linux: writes into the TUN).
pub trait Delivery: Send + Clone {
    /// Bytes each buffer handed to [`Delivery::deliver`] keeps free before
    /// its packet, for the platform's own header.
    fn headroom(&self) -> usize;
    fn deliver(&mut self, packets: &mut [Vec<u8>]) -> io::Result<()>;
}

/// The underlay carrier: whole IP packets sent on as they are, past the
/// classifier.
pub trait UnderlaySender: Send + Sync {
    /// Per-thread buffers the sender reuses between batches.
    type Scratch: Default + Send;
    /// Sends each packet to its own destination; returns (sent, failed).
    fn send<'p>(
        &self,
        scratch: &mut Self::Scratch,
        packets: impl Iterator<Item = &'p [u8]>,
    ) -> (usize, usize);
}

/// A UDP socket of the broker's (the overlay standard port, the underlay
/// port), which classifier never diverts.
pub trait DatagramSocket: Send + Sync {
    type Scratch: Default + Send;
    /// Sends datagrams `prefix` + `body`, each to its address; returns
    /// (sent, failed).
    fn send<'p>(
        &self,
        scratch: &mut Self::Scratch,
        datagrams: impl Iterator<Item = (&'p [u8], &'p [u8], SocketAddr)>,
    ) -> (usize, usize);
    /// Waits up to `timeout`, then receives what is ready into `bufs`. A
    /// buffer may hold several datagrams of one sender (see [`datagrams`]).
    fn recv(
        &self,
        scratch: &mut Self::Scratch,
        bufs: &mut [Vec<u8>],
        out: &mut [Received],
        timeout: Duration,
    ) -> io::Result<usize>;
}

/// Tells the classifier the broker is alive. Written by a thread of its
/// own, so nothing the daemon does can delay it.
pub trait Heartbeat: Send {
    /// The packet path made progress `age` ago (its quietest thread's last
    /// tick): the classifier fails open once that is too long ago.
    fn beat(&mut self, age: Duration) -> Result<(), PlatformError>;
    /// The packet path and the DNS service both made progress `age` ago:
    /// DNS interception fails open once that is too long ago.
    fn beat_dns(&mut self, age: Duration) -> Result<(), PlatformError>;
    /// How old the last beat is, as the classifier sees it.
    fn age(&self) -> Duration;
    /// The id under which the OS shows the heartbeat to other tools (Linux:
    /// the BPF map's id), if it has one.
    fn kernel_id(&self) -> Option<u32>;
}

/// The kernel's measurements for the Monitor, as they come.
pub trait MonitorEvents: Send {
    /// Waits up to `timeout` for measurements, then adds those there are.
    fn read(&mut self, timeout: Duration, out: &mut Vec<oasis_common::MonitorEvent>) -> io::Result<()>;
}

/// An ICMP echo reply, as a probe's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoReply {
    pub from: std::net::IpAddr,
    pub id: u16,
    pub seq: u16,
    pub at: std::time::Instant,
}

/// What the Monitor's probes need from the OS besides sending packets on
/// the underlay.
pub trait ProbeSockets: Send + Sync {
    /// Local TCP ports held for probes, so no application gets one.
    fn ports(&self) -> Vec<u16>;
    /// The address this host sends from towards `dst`, if it has a route.
    fn source_for(&self, dst: std::net::IpAddr) -> Option<std::net::IpAddr>;
    /// Waits up to `timeout` for ICMP echo replies, then adds those there are.
    fn echo_replies(&self, timeout: Duration, out: &mut Vec<EchoReply>) -> io::Result<()>;
}

/// The redirect of the host's DNS queries to the broker.
pub trait DnsInterception: Send {
    /// Stops redirecting at once (at shutdown).
    fn disable(&mut self);
    /// Whose queries are redirected (Linux: a cgroup).
    fn scope(&self) -> PathBuf;
    /// Where the DNS service learns which server a redirected query was
    /// sent to.
    fn origins(&self) -> Option<std::sync::Arc<dyn QueryOrigins>>;
    /// The host's own DNS servers: queries to them go to the DNS port,
    /// queries to any other to the explicit port.
    fn set_system_servers(&mut self, servers: &[std::net::IpAddr]);
}

/// The server an application addressed a query to, before the
/// interception sent it to the broker.
pub trait QueryOrigins: Send + Sync {
    /// For a query that reached the broker's listener `listener` from
    /// `client` (over TCP when `tcp`): the server it was sent to; None when
    /// unknown (a query sent to the broker itself, or state already gone).
    fn original_server(
        &self,
        tcp: bool,
        client: std::net::SocketAddr,
        listener: std::net::SocketAddr,
    ) -> Option<std::net::SocketAddr>;

    /// For the same query: the process that asked it (its uid, cgroup and
    /// name); None when unknown.
    fn asker(
        &self,
        tcp: bool,
        client: std::net::SocketAddr,
        listener: std::net::SocketAddr,
    ) -> Option<crate::sender::Asker>;
}

/// What the DNS interception needs to know.
#[derive(Clone, Debug)]
pub struct InterceptSettings {
    /// Whose queries to redirect; None: the platform's default (Linux:
    /// the root of the cgroup v2 hierarchy, every process).
    pub scope: Option<PathBuf>,
    /// The broker's DNS port on loopback (queries to the host's own
    /// servers); the next port takes queries to any other.
    pub port: u16,
    /// Whether the broker listens on the IPv6 loopback too.
    pub v6: bool,
}

/// The kernel side: the classifier on the uplinks and what hangs off it.
pub trait Kernel: Send {
    /// Starts classifying `uplink`'s outgoing traffic.
    fn attach(&mut self, uplink: &str) -> Result<(), PlatformError>;
    /// Stops classifying everywhere (also when dropped).
    fn detach_all(&mut self);
    fn attached(&self) -> Vec<UplinkView>;
    /// Brings the classifier's rule maps to `image`.
    fn apply(&mut self, image: &MapImage) -> Result<(), PlatformError>;
    fn rule_counters(&self, rule: u32) -> Counters;
    fn counters(&self) -> ClassifierCounters;
    /// Each program's own cost, as the kernel counts it.
    fn programs(&self) -> Vec<ProgramStatsView>;
    /// Who sent each flow, where the OS can tell: by the flow's protocol
    /// and its socket's two ends (own, peer) as the application sees them.
    fn senders(
        &self,
        sockets: &[(u8, std::net::SocketAddr, std::net::SocketAddr)],
    ) -> Vec<Option<crate::control::SenderView>> {
        vec![None; sockets.len()]
    }
    /// Makes packets to the fake pools the broker's.
    fn set_fake_pools(&mut self, v4: Ipv4Net, v6: Ipv6Net) -> Result<(), PlatformError>;
    /// The NAT table of fake-address flows (once).
    fn take_nat(&mut self) -> Option<Box<dyn NatTable>>;
    /// The pins of flows left to the kernel, measured there (once).
    fn take_pins(&mut self) -> Option<Box<dyn FlowPins>>;
    /// The kernel's wrapping of overlay flows, the fast path (once).
    fn take_encap(&mut self) -> Option<Box<dyn EncapTable>>;
    /// What the kernel measured for the Monitor (once).
    fn take_monitor_events(&mut self) -> Option<Box<dyn MonitorEvents>>;
    /// A heartbeat handle for the heartbeat thread.
    fn heartbeat(&self) -> Result<Box<dyn Heartbeat>, PlatformError>;
    fn intercept_dns(
        &mut self,
        settings: &InterceptSettings,
    ) -> Result<Box<dyn DnsInterception>, PlatformError>;
}

/// The divert device: where diverted packets arrive and returned ones go.
pub struct Divert<Q, D> {
    pub name: String,
    pub index: u32,
    pub queues: Vec<Q>,
    pub delivery: D,
}

/// How the daemon gets each part from the operating system.
pub trait Platform: Send + 'static {
    type Queue: DivertedQueue + 'static;
    type Delivery: Delivery + 'static;
    type Underlay: UnderlaySender + 'static;
    type Socket: DatagramSocket + 'static;

    /// The interfaces whose outgoing traffic is classified: `configured`,
    /// or when empty those carrying a default route.
    fn uplinks(&self, configured: &[String]) -> Result<Vec<String>, PlatformError>;
    /// The largest MTU among the uplinks.
    fn uplink_mtu(&self, uplinks: &[String]) -> u16;
    fn divert(
        &mut self,
        config: &TunConfig,
        mtu: u16,
    ) -> Result<Divert<Self::Queue, Self::Delivery>, PlatformError>;
    fn underlay(&self, bypass_mark: u32) -> Result<Self::Underlay, PlatformError>;
    /// A UDP socket bound to `addr`, marked so the classifier passes it;
    /// `coalesce` asks the kernel to hand over runs of datagrams at once.
    fn socket(&self, addr: SocketAddr, bypass_mark: u32, coalesce: bool) -> io::Result<Self::Socket>;
    /// Loads the kernel side with these settings; nothing is attached yet.
    fn kernel(&mut self, settings: Settings) -> Result<Box<dyn Kernel>, PlatformError>;
    /// This host's own addresses now, into `into` (its capacity reused).
    fn local_addresses(&self, into: &mut LocalAddresses);
    /// The MTU of the path toward `to` as the OS knows it now: the route's,
    /// lowered by what path MTU discovery has learnt. None when unknown.
    fn path_mtu(&self, to: std::net::SocketAddr) -> Option<u16>;
    /// Packets and bytes the OS handed to the divert device's readers.
    fn diverted(&self, device: &str) -> (u64, u64);
    /// Ports and sockets for the Monitor's probes (`ports` TCP ports held).
    fn probe_sockets(&self, ports: usize) -> Result<Box<dyn ProbeSockets>, PlatformError>;
    /// This host's sockets, looked up by their ends.
    fn sockets(&self) -> std::sync::Arc<dyn SocketLookup>;
}

/// What the return path asks of the host's sockets; defined by the engine
/// that asks, implemented by each platform.
pub use crate::engine::SocketLookup;
