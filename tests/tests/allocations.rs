//! No packet allocates: the broker's packet loops, with the real Linux I/O
//! (TUN, raw sockets, UDP with segmentation offload) around the routing
//! engine, counted by a global allocator that counts only the packet
//! threads. In a network namespace of the test's own, which the test's
//! thread enters so the devices and sockets it makes live there.
//!
//! - a sender in the namespace sends UDP to 10.99.0.5, routed into the TUN;
//! - port 9000 is claimed for the underlay: the broker sends it on through
//!   its raw socket, whose bypass mark routes it out of a veth whose peer
//!   drops it;
//! - port 9001 is claimed for an overlay whose entry node is a socket of
//!   this test on 127.0.0.1:7999, which answers every datagram with a
//!   returned packet for the sender, which the broker delivers into the TUN;
//! - port 9002 is claimed by a metric rule whose flows the Monitor (its
//!   choices published by the test) gives the same overlay: they are
//!   measured on the way out and back;
//! - port 9003 is claimed for a WireGuard overlay whose peer is a tunnel of
//!   this test on 127.0.0.1:7998, which answers every packet it opens with
//!   a sealed reply to the tunnel address: sealed, opened and mapped back
//!   by the broker.
//!
//! After a warm-up, every path runs thousands of packets: the count of
//! allocations on the packet threads must not move.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oasis_broker::config::TunConfig;
use oasis_broker::engine::{
    Engine, EngineSettings, KernelTables, MemoryEncap, MemoryNat, MemoryPins, MonitorChooser, ReturnPath,
    Routes, SharedTables, Via,
};
use oasis_broker::fake::FakeTable;
use oasis_broker::forward::{OverlaySockets, run_queue, run_returns};
use oasis_broker::liveness::Liveness;
use oasis_broker::monitor::{Choices, Chosen, MonitorLink, Prefix, Why};
use oasis_broker::names::NameRules;
use oasis_broker::overlay::{EntryNodes, JoinedOverlay, OverlayId, OverlayTable};
use oasis_broker::platform::Platform;
use oasis_broker::platform::linux::LinuxPlatform;
use oasis_broker::rules::{RuleSet, RuleSpec};
use oasis_tests::LoneNetns;

struct Counting;

thread_local! {
    /// Whether this thread's allocations count (the packet threads').
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: as the caller promised.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
        // SAFETY: as the caller promised.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MARK: u32 = 0x4f41_5349;
const SENDER: &str = "192.0.0.8:40000";
const TARGET: [u8; 4] = [10, 99, 0, 5];
const ENTRY: &str = "127.0.0.1:7999";
const WG_ENTRY: &str = "127.0.0.1:7998";
/// The broker's address inside the WireGuard tunnel.
const TUNNEL: [u8; 4] = [10, 99, 1, 2];
const OVERLAY_PORT: u16 = 7400;
const SHIM: usize = 4;

fn rule(dport: &str, via: &str) -> RuleSpec {
    RuleSpec {
        proto: Some("udp".into()),
        dport: Some(dport.into()),
        via: via.into(),
        ..RuleSpec::default()
    }
}

/// The entry node: answers each datagram `[shim][packet to 10.99.0.5:PORT]`
/// with `[shim][the same payload back, from 10.99.0.5:PORT to the sender]`.
fn entry_node(socket: UdpSocket, stop: Arc<AtomicBool>) {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = vec![0u8; 65_536];
    let sender: SocketAddr = SENDER.parse().unwrap();
    let std::net::IpAddr::V4(sender_ip) = sender.ip() else {
        unreachable!()
    };
    while !stop.load(Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let payload = &buf[SHIM + 28..len];
        let port = u16::from_be_bytes([buf[SHIM + 22], buf[SHIM + 23]]);
        let mut reply = vec![0u8; SHIM];
        etherparse::PacketBuilder::ipv4(TARGET, sender_ip.octets(), 64)
            .udp(port, sender.port())
            .write(&mut reply, payload)
            .unwrap();
        let _ = socket.send_to(&reply, from);
    }
}

/// The WireGuard peer: opens each datagram and answers the packet in it
/// (from the tunnel address) with the payload back, sealed.
fn wireguard_peer(socket: UdpSocket, tunnel: oasis_wireguard::Tunnel, stop: Arc<AtomicBool>) {
    use oasis_wireguard::Opened;
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let (mut buf, mut opened, mut sealed) = (vec![0u8; 65_536], vec![0u8; 65_536], vec![0u8; 65_536]);
    while !stop.load(Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut sealer = tunnel.lock();
        let reply = match sealer.open(from.ip(), &buf[..len], &mut opened, Instant::now()) {
            Opened::Packet(packet) => {
                let port = u16::from_be_bytes([packet[22], packet[23]]);
                let sport = u16::from_be_bytes([packet[20], packet[21]]);
                let mut reply = Vec::new();
                etherparse::PacketBuilder::ipv4(TARGET, TUNNEL, 64)
                    .udp(port, sport)
                    .write(&mut reply, &packet[28..])
                    .unwrap();
                sealer
                    .seal(&reply, &mut sealed, Instant::now())
                    .map(<[u8]>::to_vec)
            }
            Opened::Reply(answer) => Some(answer.to_vec()),
            _ => None,
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from);
        }
        while let Some(waited) = sealer.flush(&mut sealed) {
            let _ = socket.send_to(waited, from);
        }
    }
}

/// A WireGuard overlay `wg` (id 2) whose one peer listens at `WG_ENTRY`,
/// and that peer's tunnel.
fn wireguard_overlay() -> (Arc<JoinedOverlay>, oasis_wireguard::Tunnel) {
    use oasis_broker::overlay::wireguard::{WireGuardLink, WireGuardPath};
    let (ours, theirs) = (
        oasis_wireguard::PrivateKey::generate(),
        oasis_wireguard::PrivateKey::generate(),
    );
    let text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 10.99.1.2/32\n[Peer]\nPublicKey = {}\nEndpoint = {WG_ENTRY}\nAllowedIPs = 10.99.0.0/24\n",
        ours.to_base64(),
        theirs.public()
    );
    let conf = oasis_wireguard::conf::parse(&text).unwrap();
    let link = Arc::new(WireGuardLink::new(&conf, &[WG_ENTRY.parse().unwrap()]));
    let mut overlay = JoinedOverlay::new(
        OverlayId(2),
        "wg".into(),
        Box::new(WireGuardPath(link.clone())),
        Vec::new(),
    );
    overlay.wireguard = Some(link);
    (
        Arc::new(overlay),
        oasis_wireguard::Tunnel::new(&theirs, ours.public(), None, None),
    )
}

#[test]
#[ignore = "needs root and network namespaces: run with `cargo xtask test`"]
fn no_packet_allocates_in_steady_state() {
    let lone = LoneNetns::new("alloc");
    let ns = &lone.ns;
    // Packets the broker marks and sends toward 10.99.0.0/24 leave by a
    // veth whose peer drops them; unmarked ones go into the TUN.
    ns.run(&["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.run(&["ip", "link", "set", "v0", "up"]);
    ns.run(&["ip", "link", "set", "v1", "up"]);
    ns.run(&[
        "ip",
        "neigh",
        "add",
        "10.99.0.5",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "v0",
    ]);
    ns.run(&[
        "ip",
        "rule",
        "add",
        "fwmark",
        &MARK.to_string(),
        "to",
        "10.99.0.0/24",
        "lookup",
        "100",
    ]);
    ns.run(&["ip", "route", "add", "default", "dev", "v0", "table", "100"]);
    lone.enter();

    let mut platform = LinuxPlatform;
    let divert = platform
        .divert(
            &TunConfig {
                name: "oasisa0".into(),
                address: "192.0.0.8".parse().unwrap(),
                queues: 1,
            },
            1500,
        )
        .expect("TUN");
    ns.run(&["ip", "route", "add", "10.99.0.0/24", "dev", "oasisa0"]);
    let underlay = platform.underlay(MARK).expect("raw sockets");
    let overlay = OverlaySockets {
        v4: platform
            .socket(([0, 0, 0, 0], OVERLAY_PORT).into(), MARK, true)
            .expect("standard port"),
        v6: None,
    };

    let mut rules = RuleSet::default();
    let mut metric = rule("9002", "");
    metric.metric = Some("latency".into());
    for spec in [
        rule("9000", "underlay"),
        rule("9001", "detour"),
        metric,
        rule("9003", "wg"),
    ] {
        let (subset, via) = spec.parse().unwrap();
        rules.add_any(subset, via).unwrap();
    }
    let (wireguard, peer_tunnel) = wireguard_overlay();
    let overlays = Arc::new(OverlayTable::new([
        Arc::new(JoinedOverlay::new(
            OverlayId(1),
            "detour".into(),
            Box::new(EntryNodes::new(vec![ENTRY.parse().unwrap()]).unwrap()),
            vec![0; SHIM],
        )),
        wireguard,
    ]));
    let settings = EngineSettings {
        lifetimes: oasis_broker::engine::Lifetimes::new(Duration::from_secs(120)),
        flow_capacity: 1024,
        uplink_mtu: 1500,
        fake_v4: "198.18.0.0/15".parse().unwrap(),
        fake_v6: "fd4f:4153:4953::/48".parse().unwrap(),
        fast_path: false,
    };
    let fakes = FakeTable::new(settings.fake_v4, settings.fake_v6, 16);
    let (link, _events) = MonitorLink::new(1024);
    let engine = Engine::new(
        settings,
        Routes::new(rules.rules(), Arc::new(NameRules::default()), overlays.clone()),
        Arc::new(Mutex::new(fakes)),
        Box::new(MonitorChooser::new(link.clone())),
        link.clone(),
        Instant::now(),
    );
    // The Monitor chose the overlay for the metric rule's flows.
    let chosen = Chosen {
        via: Via::Overlay(OverlayId(1)),
        why: Why::Incumbent,
        ranked: vec![Via::Overlay(OverlayId(1))],
        settled: true,
    };
    link.publish(Arc::new(Choices::new(
        [((3, Prefix::of(TARGET.into())), chosen)].into(),
        Vec::new(),
    )));

    let tables = SharedTables::new(KernelTables {
        nat: Box::new(MemoryNat::default()),
        pins: Box::new(MemoryPins::default()),
        encap: Box::new(MemoryEncap::default()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let liveness = Liveness::new();
    let overlay = Arc::new(overlay);
    let queue = divert.queues.into_iter().next().unwrap();
    let mut threads = Vec::new();
    {
        let tables = tables.clone();
        let (router, delivery, overlay, stop) = (
            engine.router(Arc::new(tables.clone())),
            divert.delivery.clone(),
            overlay.clone(),
            stop.clone(),
        );
        let tick = liveness.register("queue");
        threads.push(std::thread::spawn(move || {
            TRACKED.with(|t| t.set(true));
            let read = AtomicU64::new(0);
            run_queue(
                router, &tables, &read, queue, delivery, &underlay, &overlay, tick, &stop,
            )
            .unwrap();
        }));
    }
    {
        let (path, delivery, overlay, stop) = (
            ReturnPath::new(&engine),
            divert.delivery.clone(),
            overlay.clone(),
            stop.clone(),
        );
        let tick = liveness.register("returns");
        threads.push(std::thread::spawn(move || {
            TRACKED.with(|t| t.set(true));
            let platform = LinuxPlatform;
            run_returns(
                path,
                &overlay.v4,
                oasis_broker::forward::TimersFor { v4: true, v6: true },
                delivery,
                |into| platform.local_addresses(into),
                tick,
                &stop,
            )
            .unwrap();
        }));
    }
    {
        let socket = UdpSocket::bind(ENTRY).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || entry_node(socket, stop)));
    }
    {
        let socket = UdpSocket::bind(WG_ENTRY).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            wireguard_peer(socket, peer_tunnel, stop)
        }));
    }

    let sender = UdpSocket::bind(SENDER).unwrap();
    sender.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut traffic = Traffic {
        sender,
        targets: [9000, 9001, 9002, 9003].map(|port| SocketAddr::from((TARGET, port))),
        engine: engine.clone(),
        in_flight: 0,
        lost: 0,
    };

    // Warm-up: every path has carried traffic, and the metric rule's flow
    // is measured.
    let warm = traffic.drive(3_000, 2_000);
    let sent = |c: &oasis_broker::engine::EngineCounters| {
        (c.sent_underlay.load(Relaxed), c.sent_overlay.load(Relaxed))
    };
    let (underlay, overlay) = sent(&engine.counters);
    assert!(
        underlay >= 500 && overlay >= 1_000,
        "every path carries traffic after the warm-up ({warm:?}): {:?}",
        engine.counters
    );
    assert!(engine.measuring(), "the metric rule's flow is measured");
    let wg = overlays.by_name("wg").and_then(|o| o.wireguard.clone()).unwrap();
    let wg_counts = || {
        let c = &wg.peers[0].tunnel.counters;
        (c.sealed.load(Relaxed), c.opened.load(Relaxed))
    };
    let wg_warm = wg_counts();
    assert!(
        wg_warm.0 >= 300 && wg_warm.1 >= 300,
        "the WireGuard overlay carries traffic both ways after the warm-up: {wg_warm:?}"
    );

    let allocations = ALLOCATIONS.load(Relaxed);
    let steady = traffic.drive(45_000, 30_000);
    let allocated = ALLOCATIONS.load(Relaxed) - allocations;
    let after = sent(&engine.counters);
    let wg_after = wg_counts();
    stop.store(true, Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    println!(
        "steady state: {} diverted packets ({} underlay, {} overlay), {} returned through the overlay, \
         ({} sealed and {} opened for WireGuard), {} given up as lost: {allocated} allocations on the packet threads",
        steady.diverted,
        after.0 - underlay,
        after.1 - overlay,
        steady.returned,
        wg_after.0 - wg_warm.0,
        wg_after.1 - wg_warm.1,
        traffic.lost,
    );
    assert_eq!(allocated, 0, "the packet path allocated in steady state");
}

/// What one drive of the traffic came to.
#[derive(Debug)]
struct Driven {
    /// Packets the broker read from the TUN.
    diverted: u64,
    /// Datagrams that came back to the sender through the overlay.
    returned: u64,
}

/// The sender's side of the test: datagrams to the four claimed ports,
/// paced by what the broker has taken in, so that however slow or busy the
/// machine, no queue on the way overflows and the counts are of packets
/// that went through.
struct Traffic {
    sender: UdpSocket,
    targets: [SocketAddr; 4],
    engine: Arc<Engine>,
    /// Sent, and not yet read by the broker.
    in_flight: u64,
    /// Datagrams given up on: sent, never read by the broker.
    lost: u64,
}

impl Traffic {
    /// Datagrams in flight at most: well below what the TUN queue and the
    /// sockets on the way hold.
    const WINDOW: u64 = 96;
    /// With no progress for this long, what is in flight counts as lost.
    const FORGIVE: Duration = Duration::from_millis(500);
    /// With no progress at all for this long, a path is broken.
    const STALL: Duration = Duration::from_secs(20);

    /// Sends until the broker has read `diverted` more packets and
    /// `returned` more answers came back.
    fn drive(&mut self, diverted: u64, returned: u64) -> Driven {
        let start = self.engine.counters.received.load(Relaxed);
        let mut seen = start;
        let mut got = 0;
        let mut progress = Instant::now();
        let mut buf = [0u8; 2048];
        let mut i = 0u32;
        while seen - start < diverted || got < returned {
            if self.in_flight + 4 <= Self::WINDOW {
                for target in self.targets {
                    self.sender.send_to(&i.to_be_bytes(), target).unwrap();
                }
                self.in_flight += 4;
                i = i.wrapping_add(1);
                continue;
            }
            // Wait (1 ms at most) for an answer, and see what the broker took.
            if self.sender.recv(&mut buf).is_ok() {
                got += 1;
                progress = Instant::now();
            }
            let now = self.engine.counters.received.load(Relaxed);
            if now > seen {
                self.in_flight = self.in_flight.saturating_sub(now - seen);
                seen = now;
                progress = Instant::now();
            } else if progress.elapsed() > Self::FORGIVE {
                assert!(
                    progress.elapsed() < Self::STALL,
                    "no packet went through for {:?}: {} of {diverted} diverted, {got} of {returned} \
                     returned; {:?}",
                    Self::STALL,
                    seen - start,
                    self.engine.counters
                );
                self.lost += self.in_flight;
                self.in_flight = 0;
            }
        }
        // Take in what is still on its way back, so the next drive starts
        // with nothing in flight.
        while self.sender.recv(&mut buf).is_ok() {
            got += 1;
        }
        Driven {
            diverted: seen - start,
            returned: got,
        }
    }
}
