//! The routing engine: every decision about diverted and returned packets,
//! with no operating system in it (the quinn-proto / boringtun way). Given
//! the time and a packet, it says what to do: send on the underlay, send to
//! an overlay's next hop (with the shim, MSS clamped), write a reply to the
//! application, or drop for a named reason. The platform's packet loops
//! (`crate::forward`) do the I/O around it.
//!
//! - [`Engine`]: what all packet threads share: the published [`Routes`],
//!   the fake-address table, the counters, and the [`CarrierChooser`] a new
//!   flow's carrier comes from.
//! - [`Router`]: one per packet thread: its flow table (header-rule and
//!   fake-address flows alike) and the outbound decisions, with the
//!   [`KernelOp`]s they ask of the kernel's tables, which its caller
//!   carries out (`offload.rs`).
//! - [`ReturnPath`]: the checks on packets coming back from overlays.

pub mod carrier;
pub mod counters;
pub mod encap;
pub mod fake;
pub mod flows;
pub mod fragments;
pub mod measure;
pub mod nat;
pub mod offload;
pub mod outbound;
pub mod packet;
pub mod pins;
pub mod returns;
pub mod router;
pub mod routes;
pub mod tables;

pub use carrier::{CarrierChooser, Claim, Decision, MonitorChooser, NewFlow, RuleCarrier};
pub use counters::{DropReason, EngineCounters};
pub use encap::{EncapTable, Encapsulation, MemoryEncap};
pub use flows::{FakeBinding, Flow, FlowTable, Lifetimes};
pub use nat::{MemoryNat, NatTable, TableError};
pub use offload::{KernelOp, KernelTables, KernelView, Offload, SharedTables};
pub use pins::{FlowPins, MemoryPins};
pub use returns::{LocalAddresses, ReturnPath, Returned, SocketLookup, module_admitted};
pub use router::{Engine, EngineSettings, Outbound, ReplyMap, Router, TunnelMap, toward_overlay};
pub use routes::{HeaderRoute, MonitorRoute, Routes, RuleVia, Via};
pub use tables::KernelSeen;

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
    use oasis_io::packet::addresses;

    use super::*;
    use crate::fake::FakeTable;
    use crate::names::NameRules;
    use crate::overlay::{OverlayId, OverlayTable, test_overlay};
    use crate::rules::{Carrier, RuleSet, RuleSpec};

    const CLIENT: [u8; 4] = [10, 0, 0, 2];
    const SERVER: [u8; 4] = [203, 0, 113, 9];
    const ENTRY: &str = "192.0.2.1:7400";
    const MTU: u16 = 1500;

    /// A shared NAT table the test can look into after handing it over.
    #[derive(Clone, Default)]
    struct SharedNat(Arc<Mutex<MemoryNat>>);

    impl NatTable for SharedNat {
        fn install(
            &mut self,
            flow: &oasis_common::FlowKey,
            fake: IpAddr,
            real: IpAddr,
            measure: bool,
        ) -> Result<(), TableError> {
            self.0.lock().unwrap().install(flow, fake, real, measure)
        }
        fn remove(&mut self, flow: &oasis_common::FlowKey, real: IpAddr) {
            self.0.lock().unwrap().remove(flow, real)
        }
        fn last_seen(&self, flow: &oasis_common::FlowKey, real: IpAddr) -> Option<KernelSeen> {
            self.0.lock().unwrap().last_seen(flow, real)
        }
        fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    /// Shared pins the test can look into after handing them over.
    #[derive(Clone, Default)]
    struct SharedPins(Arc<Mutex<MemoryPins>>);

    impl FlowPins for SharedPins {
        fn pin(&mut self, flow: &oasis_common::FlowKey, rule: u32, measured: bool) -> Result<(), TableError> {
            self.0.lock().unwrap().pin(flow, rule, measured)
        }
        fn measure(
            &mut self,
            flow: &oasis_common::FlowKey,
            syn_sent: Option<Instant>,
            probe: bool,
        ) -> Result<(), TableError> {
            self.0.lock().unwrap().measure(flow, syn_sent, probe)
        }
        fn forget(&mut self, flow: &oasis_common::FlowKey) {
            self.0.lock().unwrap().forget(flow)
        }
        fn last_seen(&self, flow: &oasis_common::FlowKey) -> Option<KernelSeen> {
            self.0.lock().unwrap().last_seen(flow)
        }
        fn answered(&self, flow: &oasis_common::FlowKey) -> bool {
            self.0.lock().unwrap().answered(flow)
        }
        fn measured(&self) -> usize {
            self.0.lock().unwrap().measured()
        }
        fn claimed_by(&self, flow: &oasis_common::FlowKey) -> Option<u32> {
            self.0.lock().unwrap().claimed_by(flow)
        }
    }

    #[derive(Clone, Default)]
    struct SharedEncap(Arc<Mutex<MemoryEncap>>);

    impl EncapTable for SharedEncap {
        fn install(&mut self, flow: &oasis_common::FlowKey, how: &Encapsulation) -> Result<(), TableError> {
            self.0.lock().unwrap().install(flow, how)
        }
        fn remove(&mut self, flow: &oasis_common::FlowKey) {
            self.0.lock().unwrap().remove(flow)
        }
        fn forget_peer(&mut self, peer: SocketAddr) {
            self.0.lock().unwrap().forget_peer(peer)
        }
        fn narrow(&mut self, peer: SocketAddr, mtu: u16) {
            self.0.lock().unwrap().narrow(peer, mtu)
        }
        fn last_seen(&self, flow: &oasis_common::FlowKey) -> Option<KernelSeen> {
            self.0.lock().unwrap().last_seen(flow)
        }
        fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    /// A NAT table that refuses everything, as a full kernel map would.
    struct FullNat;

    impl NatTable for FullNat {
        fn install(
            &mut self,
            _: &oasis_common::FlowKey,
            _: IpAddr,
            _: IpAddr,
            _: bool,
        ) -> Result<(), TableError> {
            Err(TableError {
                table: "test",
                reason: "full".into(),
            })
        }
        fn remove(&mut self, _: &oasis_common::FlowKey, _: IpAddr) {}
        fn last_seen(&self, _: &oasis_common::FlowKey, _: IpAddr) -> Option<KernelSeen> {
            None
        }
        fn len(&self) -> usize {
            0
        }
    }

    struct World {
        engine: Arc<Engine>,
        tables: SharedTables,
        nat: SharedNat,
        pins: SharedPins,
        encap: SharedEncap,
        link: Arc<crate::monitor::MonitorLink>,
        events: std::sync::mpsc::Receiver<(Instant, crate::monitor::Event)>,
        rules: RuleSet,
        overlays: Arc<OverlayTable>,
    }

    fn settings() -> EngineSettings {
        EngineSettings {
            lifetimes: Lifetimes::new(Duration::from_secs(120)),
            flow_capacity: 1000,
            uplink_mtu: MTU,
            fake_v4: "198.18.0.0/15".parse().unwrap(),
            fake_v6: "fd4f:4153:4953::/48".parse().unwrap(),
            fast_path: true,
        }
    }

    fn header(via: &str, proto: &str, dport: &str) -> RuleSpec {
        RuleSpec {
            proto: Some(proto.into()),
            dport: Some(dport.into()),
            via: via.into(),
            ..RuleSpec::default()
        }
    }

    fn name(via: &str, suffix: &str) -> RuleSpec {
        RuleSpec {
            name_suffix: Some(suffix.into()),
            via: via.into(),
            ..RuleSpec::default()
        }
    }

    fn routes(rules: &RuleSet, overlays: &Arc<OverlayTable>) -> Routes {
        let names = NameRules::compile(rules.names()).unwrap();
        Routes::with_names(rules.rules(), rules.names(), Arc::new(names), overlays.clone())
    }

    /// Rules over one joined overlay, `detour` (id 1, entry ENTRY, shim 4).
    fn world(specs: &[RuleSpec]) -> World {
        world_with(specs, None, settings())
    }

    /// As `world`, with another NAT table than the shared in-memory one.
    fn world_with(specs: &[RuleSpec], nat: Option<Box<dyn NatTable>>, settings: EngineSettings) -> World {
        let mut rules = RuleSet::default();
        for spec in specs {
            let (subset, via) = spec.parse().unwrap();
            rules.add_any(subset, via).unwrap();
        }
        let overlays = Arc::new(OverlayTable::new([test_overlay(1, "detour", &[ENTRY], 4)]));
        let fakes = FakeTable::new(settings.fake_v4, settings.fake_v6, 100);
        let shared = SharedNat::default();
        let nat = nat.unwrap_or_else(|| Box::new(shared.clone()));
        let pins = SharedPins::default();
        let encap = SharedEncap::default();
        let (link, events) = crate::monitor::MonitorLink::new(1024);
        let engine = Engine::new(
            settings,
            routes(&rules, &overlays),
            Arc::new(Mutex::new(fakes)),
            Box::new(MonitorChooser::new(link.clone())),
            link.clone(),
            Instant::now(),
        );
        let tables = SharedTables::new(KernelTables {
            nat,
            pins: Box::new(pins.clone()),
            encap: Box::new(encap.clone()),
        });
        World {
            engine,
            tables,
            nat: shared,
            pins,
            encap,
            link,
            events,
            rules,
            overlays,
        }
    }

    fn tcp(dst: [u8; 4], sport: u16, dport: u16, syn_mss: Option<u16>) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(CLIENT, dst, 64).tcp(sport, dport, 1, 64000);
        let builder = match syn_mss {
            Some(mss) => builder
                .syn()
                .options(&[TcpOptionElement::MaximumSegmentSize(mss)])
                .unwrap(),
            None => builder.ack(1),
        };
        let mut out = Vec::new();
        builder.write(&mut out, b"payload").unwrap();
        out
    }

    fn mss(packet: &[u8]) -> Option<u16> {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            return None;
        };
        tcp.options_iterator().find_map(|o| match o.unwrap() {
            TcpOptionElement::MaximumSegmentSize(m) => Some(m),
            _ => None,
        })
    }

    impl World {
        /// A router whose kernel work the test carries out as a packet
        /// loop would.
        fn router(&self) -> TestRouter {
            TestRouter {
                router: self.engine.router(Arc::new(self.tables.clone())),
                tables: self.tables.clone(),
            }
        }
    }

    /// A router and the shell's part: the kernel work it queues is carried
    /// out before its caller sees the outcome.
    struct TestRouter {
        router: Router,
        tables: SharedTables,
    }

    impl std::ops::Deref for TestRouter {
        type Target = Router;
        fn deref(&self) -> &Router {
            &self.router
        }
    }

    impl std::ops::DerefMut for TestRouter {
        fn deref_mut(&mut self) -> &mut Router {
            &mut self.router
        }
    }

    impl TestRouter {
        fn outbound(&mut self, now: Instant, packet: &mut [u8], reply: &mut Vec<u8>) -> Outbound {
            let decided = self.router.outbound(now, packet, reply);
            crate::forward::carry_out(&mut self.router, &self.tables, now, packet, reply).unwrap_or(decided)
        }

        fn handle_timeout(&mut self, now: Instant) {
            self.router.handle_timeout(now);
            crate::forward::carry_out(&mut self.router, &self.tables, now, &mut [], &mut Vec::new());
        }
    }

    fn decide(router: &mut TestRouter, packet: &mut [u8]) -> Outbound {
        router.begin_batch();
        router.outbound(Instant::now(), packet, &mut Vec::new())
    }

    fn entry() -> SocketAddr {
        ENTRY.parse().unwrap()
    }

    #[test]
    fn header_rules_send_by_their_carrier() {
        let world = world(&[header("underlay", "tcp", "8080"), header("detour", "tcp", "80")]);
        let mut router = world.router();
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40000, 8080, None)),
            Outbound::Underlay
        );
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40001, 80, None)),
            Outbound::Overlay {
                overlay: OverlayId(1),
                to: entry()
            }
        );
        // The classifier diverted it for a rule deleted since: plain path.
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40002, 9999, None)),
            Outbound::Underlay
        );
        let counters = &world.engine.counters;
        assert_eq!(
            (counters.flows.load(Relaxed), counters.flows_started.load(Relaxed)),
            (3, 3)
        );
    }

    #[test]
    fn a_header_rules_underlay_flow_passes_in_the_kernel_after_its_first_packet() {
        let world = world(&[header("underlay", "tcp", "8080")]);
        let mut router = world.router();
        let start = Instant::now();
        let mut syn = tcp(SERVER, 40000, 8080, Some(1460));
        router.begin_batch();
        assert_eq!(
            router.outbound(start, &mut syn, &mut Vec::new()),
            Outbound::Underlay
        );
        let key = key_of(&syn);
        let pin = world.pins.0.lock().unwrap().flows[&key];
        assert_eq!(pin.rule, Some(1), "counted by its rule in the kernel");
        assert!(!pin.measured_pin && !pin.measured, "nothing to measure: {pin:?}");
        assert!(router.flows().get(&key).is_some_and(|f| f.in_kernel()));
        // Packets sent before the pin existed reach the broker: carried,
        // the pin left alone. Later, one means the kernel lost the verdict:
        // pinned again.
        world.pins.0.lock().unwrap().flows.get_mut(&key).unwrap().rule = None;
        let mut data = tcp(SERVER, 40000, 8080, None);
        let carried = router.outbound(start + Duration::from_millis(10), &mut data, &mut Vec::new());
        assert_eq!(carried, Outbound::Underlay);
        assert_eq!(world.pins.0.lock().unwrap().flows[&key].rule, None);
        let carried = router.outbound(start + Duration::from_secs(1), &mut data, &mut Vec::new());
        assert_eq!(carried, Outbound::Underlay);
        assert_eq!(world.pins.0.lock().unwrap().flows[&key].rule, Some(1));
        // A FIN went by in the kernel: the flow ends soon after it goes
        // quiet, not after TCP's idle lifetime.
        {
            let mut pins = world.pins.0.lock().unwrap();
            let pin = pins.flows.get_mut(&key).unwrap();
            pin.last_seen = Some(start + Duration::from_secs(5));
            pin.closing = true;
        }
        router.handle_timeout(start + Duration::from_secs(10));
        assert_eq!(router.flows().len(), 1, "closing, but not quiet for long enough");
        router.handle_timeout(start + Duration::from_secs(5) + Lifetimes::DEFAULT_TCP_CLOSING * 2);
        assert_eq!(router.flows().len(), 0);
        assert!(
            world.pins.0.lock().unwrap().flows.is_empty(),
            "the pin went with the flow"
        );
    }

    #[test]
    fn a_header_rules_overlay_flow_is_wrapped_in_the_kernel_from_its_second_packet() {
        let world = world(&[header("detour", "tcp", "80")]);
        let mut router = world.router();
        let start = Instant::now();
        let mut syn = tcp(SERVER, 40000, 80, Some(1460));
        router.begin_batch();
        let sent = router.outbound(start, &mut syn, &mut Vec::new());
        assert_eq!(
            sent,
            Outbound::Overlay {
                overlay: OverlayId(1),
                to: entry()
            },
            "the handshake goes through the broker (its MSS clamped)"
        );
        let key = key_of(&syn);
        assert!(
            router.next_work().is_none(),
            "a flow of one packet costs no kernel entry"
        );
        assert!(router.flows().get(&key).is_some_and(|f| !f.in_kernel()));
        assert_eq!(world.engine.kernel_flows.load(Relaxed), 0);
        // Its second packet (the handshake's ACK) hands it to the kernel.
        let mut ack = tcp(SERVER, 40000, 80, None);
        let sent = decide(&mut router, &mut ack);
        assert!(matches!(sent, Outbound::Overlay { .. }), "{sent:?}");
        let (how, _) = world.encap.0.lock().unwrap().flows[&key];
        assert_eq!((how.to, how.rule, how.shim()), (entry(), 1, &[0u8; 4][..]));
        assert!(router.flows().get(&key).is_some_and(|f| f.in_kernel()));
        assert_eq!(world.engine.kernel_flows.load(Relaxed), 1);
        // What the kernel leaves to the broker (a FIN, a packet too big) is
        // carried as before, and wraps nothing again.
        let mut data = tcp(SERVER, 40000, 80, None);
        let carried = router.outbound(start + Duration::from_secs(1), &mut data, &mut Vec::new());
        assert!(matches!(carried, Outbound::Overlay { .. }), "{carried:?}");
        assert_eq!(world.encap.0.lock().unwrap().flows.len(), 1);
        // Alive while the kernel wraps its packets; gone, with its entry,
        // once they stop.
        world.encap.0.lock().unwrap().flows.get_mut(&key).unwrap().1 = Some(start + Duration::from_secs(100));
        router.handle_timeout(start + Duration::from_secs(120));
        assert_eq!(router.flows().len(), 1, "the kernel saw it 20 s ago");
        router.handle_timeout(start + Duration::from_secs(100) + Lifetimes::DEFAULT_TCP * 2);
        assert_eq!(router.flows().len(), 0);
        assert!(
            world.encap.0.lock().unwrap().flows.is_empty(),
            "the entry went with the flow"
        );
        assert_eq!(world.engine.kernel_flows.load(Relaxed), 0);
    }

    #[test]
    fn a_wrapped_flow_whose_overlay_is_left_comes_back_to_the_broker() {
        let world = world(&[header("detour", "tcp", "80")]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 80, Some(1460));
        decide(&mut router, &mut syn);
        decide(&mut router, &mut tcp(SERVER, 40000, 80, None));
        let key = key_of(&syn);
        assert_eq!(world.encap.0.lock().unwrap().flows.len(), 1);
        let none = Arc::new(OverlayTable::new([]));
        world.engine.publish(routes(&world.rules, &none));
        let mut data = tcp(SERVER, 40000, 80, None);
        let outcome = decide(&mut router, &mut data);
        assert!(
            !matches!(outcome, Outbound::Overlay { .. }),
            "its overlay is gone, and the kernel no longer sends it there: {outcome:?}"
        );
        assert!(world.encap.0.lock().unwrap().flows.is_empty());
        assert!(router.flows().get(&key).is_some_and(|f| !f.in_kernel()));
        assert_eq!(world.engine.kernel_flows.load(Relaxed), 0);
    }

    #[test]
    fn a_flow_the_kernel_cannot_wrap_stays_with_the_broker() {
        let world = world(&[header("detour", "tcp", "80")]);
        world.encap.0.lock().unwrap().full = true;
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 80, Some(1460));
        assert!(matches!(decide(&mut router, &mut syn), Outbound::Overlay { .. }));
        let mut ack = tcp(SERVER, 40000, 80, None);
        assert!(matches!(decide(&mut router, &mut ack), Outbound::Overlay { .. }));
        assert!(router.flows().get(&key_of(&syn)).is_some_and(|f| !f.in_kernel()));
        assert_eq!(world.engine.kernel_flows.load(Relaxed), 0);
        // Refused once, it is not asked again per packet.
        world.encap.0.lock().unwrap().full = false;
        decide(&mut router, &mut tcp(SERVER, 40000, 80, None));
        assert!(world.encap.0.lock().unwrap().flows.is_empty());
        // With the fast path off, nothing is asked of the kernel at all.
        let mut off = settings();
        off.fast_path = false;
        let world = world_with(&[header("detour", "tcp", "80")], None, off);
        let mut router = world.router();
        decide(&mut router, &mut tcp(SERVER, 40000, 80, Some(1460)));
        decide(&mut router, &mut tcp(SERVER, 40000, 80, None));
        assert!(world.encap.0.lock().unwrap().flows.is_empty());
    }

    /// A UDP datagram of 3,000 bytes from CLIENT to SERVER:`dport`, in two
    /// IPv4 fragments with identification `id`.
    fn fragments(dport: u16, id: u32) -> (Vec<u8>, Vec<u8>) {
        let mut whole = Vec::new();
        etherparse::PacketBuilder::ipv4(CLIENT, SERVER, 64)
            .udp(40000, dport)
            .write(&mut whole, &[1; 3000])
            .unwrap();
        oasis_io::packet::set_fragment_id(&mut whole, id);
        let (header, payload) = whole.split_at(20);
        let piece = |data: &[u8], offset: usize, more: bool| {
            let mut out = header.to_vec();
            out[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            let field = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
            out[6..8].copy_from_slice(&field.to_be_bytes());
            out.extend_from_slice(data);
            out
        };
        (
            piece(&payload[..1480], 0, true),
            piece(&payload[1480..], 1480, false),
        )
    }

    #[test]
    fn the_later_fragments_of_a_datagram_go_where_its_first_went() {
        let world = world(&[header("detour", "udp", "9000")]);
        let mut router = world.router();
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        let (mut first, mut rest) = fragments(9000, 77);
        assert_eq!(decide(&mut router, &mut first), overlay);
        assert_eq!(
            decide(&mut router, &mut rest),
            overlay,
            "no ports, yet the rule's carrier"
        );
        // Another datagram of an unclaimed port: its rest goes its way.
        let (mut first, mut rest) = fragments(9001, 78);
        assert_eq!(decide(&mut router, &mut first), Outbound::Underlay);
        assert_eq!(decide(&mut router, &mut rest), Outbound::Underlay);
        // A later fragment whose first never came: nowhere.
        let (_, mut orphan) = fragments(9000, 79);
        assert_eq!(
            decide(&mut router, &mut orphan),
            Outbound::Drop(DropReason::OrphanFragment)
        );
        assert_eq!(world.engine.counters.drops_of(DropReason::OrphanFragment), 1);
    }

    #[test]
    fn overlay_syns_are_clamped_to_fit_the_encapsulation() {
        let world = world(&[header("detour", "tcp", "80"), header("underlay", "tcp", "8080")]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 80, Some(1460));
        decide(&mut router, &mut syn);
        // 1500 - inner IPv4 20 - TCP 20 - outer IPv4 20 - UDP 8 - shim 4.
        assert_eq!(mss(&syn), Some(1428));
        let mut plain = tcp(SERVER, 40001, 8080, Some(1460));
        decide(&mut router, &mut plain);
        assert_eq!(mss(&plain), Some(1460), "the underlay needs no room");
    }

    #[test]
    fn a_segment_too_big_for_the_overlay_tells_its_sender_the_mtu() {
        let world = world(&[header("detour", "tcp", "443")]);
        let mut router = world.router();
        let datagram = |len: usize, df: bool| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(CLIENT, SERVER, 64)
                .tcp(40000, 443, 1, 64000)
                .ack(1)
                .write(&mut out, &vec![0u8; len - 40])
                .unwrap();
            if !df {
                out[6] &= !0x40;
            }
            out
        };
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        // 1500 - outer IPv4 20 - UDP 8 - shim 4.
        assert_eq!(decide(&mut router, &mut datagram(1468, true)), overlay);
        let mut reply = Vec::new();
        router.begin_batch();
        let outcome = router.outbound(Instant::now(), &mut datagram(1500, true), &mut reply);
        assert_eq!(outcome, Outbound::Reply);
        let sliced = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("not ICMP: {reply:?}")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 4));
        assert_eq!(&icmp.slice()[6..8], &1468u16.to_be_bytes());
        // Without DF a router may fragment: the encapsulation is.
        assert_eq!(decide(&mut router, &mut datagram(1500, false)), overlay);
        // A narrower path toward the entry node narrows what fits.
        world
            .overlays
            .get(OverlayId(1))
            .unwrap()
            .path_mtu
            .store(1400, std::sync::atomic::Ordering::Relaxed);
        let mut reply = Vec::new();
        router.begin_batch();
        let outcome = router.outbound(Instant::now(), &mut datagram(1400, true), &mut reply);
        assert_eq!(outcome, Outbound::Reply);
        let sliced = SlicedPacket::from_ip(&reply).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("not ICMP")
        };
        assert_eq!(&icmp.slice()[6..8], &1368u16.to_be_bytes());
        assert_eq!(world.engine.counters.too_big.load(Relaxed), 2);
    }

    #[test]
    fn a_datagram_the_uplink_takes_goes_over_the_overlay_in_fragments() {
        let icmp = RuleSpec {
            proto: Some("icmp".into()),
            via: "detour".into(),
            ..RuleSpec::default()
        };
        let world = world(&[header("detour", "udp", "443"), icmp]);
        let mut router = world.router();
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        // 1,472 bytes of UDP with DF (Linux's default): 1,500 on the wire,
        // more than fits the overlay whole.
        let mut big = Vec::new();
        PacketBuilder::ipv4(CLIENT, SERVER, 64)
            .udp(40000, 443)
            .write(&mut big, &[0u8; 1472])
            .unwrap();
        assert!(oasis_io::packet::must_not_fragment(&big));
        assert_eq!(decide(&mut router, &mut big), overlay);
        let mut ping = Vec::new();
        PacketBuilder::ipv4(CLIENT, SERVER, 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut ping, &[0u8; 1472])
            .unwrap();
        assert_eq!(decide(&mut router, &mut ping), overlay);
        let mut big6 = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(40000, 443)
            .write(&mut big6, &[0u8; 1452])
            .unwrap();
        assert_eq!(decide(&mut router, &mut big6), overlay);
        assert_eq!(world.engine.counters.too_big.load(Relaxed), 0);
    }

    #[test]
    fn a_flow_keeps_its_carrier_when_rules_change() {
        let world = world(&[header("detour", "tcp", "80")]);
        let mut router = world.router();
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        assert_eq!(decide(&mut router, &mut tcp(SERVER, 40000, 80, None)), overlay);
        let mut rules = world.rules.clone();
        rules.remove(1).unwrap();
        let (subset, via) = header("underlay", "tcp", "80").parse().unwrap();
        rules.add_any(subset, via).unwrap();
        world.engine.publish(routes(&rules, &world.overlays));
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40000, 80, None)),
            overlay,
            "live flow"
        );
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40001, 80, None)),
            Outbound::Underlay,
            "new flow"
        );
    }

    #[test]
    fn every_drop_reason_is_named_and_counted() {
        let world = world(&[
            header("detour", "tcp", "80"),
            header("underlay", "udp", "1-65535"),
        ]);
        let mut router = world.router();
        assert!(matches!(
            decide(&mut router, &mut tcp(SERVER, 40000, 80, None)),
            Outbound::Overlay { .. }
        ));
        // Malformed.
        assert_eq!(
            decide(&mut router, &mut b"\x45not a packet".to_vec()),
            Outbound::Drop(DropReason::Malformed)
        );
        // Unroutable: multicast.
        let mut mdns = Vec::new();
        PacketBuilder::ipv4(CLIENT, [224, 0, 0, 251], 1)
            .udp(5353, 5353)
            .write(&mut mdns, b"")
            .unwrap();
        assert_eq!(
            decide(&mut router, &mut mdns),
            Outbound::Drop(DropReason::Unroutable)
        );
        // No carrier: the overlay of a live flow was left. The application
        // hears at once: a reset from the server's address.
        world
            .engine
            .publish(routes(&world.rules, &Arc::new(OverlayTable::default())));
        let mut reset = Vec::new();
        router.begin_batch();
        assert_eq!(
            router.outbound(Instant::now(), &mut tcp(SERVER, 40000, 80, None), &mut reset),
            Outbound::Reply
        );
        assert!(oasis_io::packet::tcp_resetting(&reset));
        assert_eq!(
            addresses(&reset).unwrap(),
            (IpAddr::from(SERVER), IpAddr::from(CLIENT))
        );
        // ... and a new flow of a rule whose overlay is not usable.
        assert_eq!(
            decide(&mut router, &mut tcp(SERVER, 40001, 80, None)),
            Outbound::Reply
        );
        // Untranslatable: a fake address with a protocol without ports.
        let mut gre = Vec::new();
        PacketBuilder::ipv4(CLIENT, [198, 18, 0, 1], 64)
            .write(&mut gre, etherparse::IpNumber(47), b"gre")
            .unwrap();
        assert_eq!(
            decide(&mut router, &mut gre),
            Outbound::Drop(DropReason::Untranslatable)
        );
        let counters = &world.engine.counters;
        for (reason, count) in [
            (DropReason::Malformed, 1),
            (DropReason::Unroutable, 1),
            (DropReason::NoCarrier, 2),
            (DropReason::Untranslatable, 1),
        ] {
            assert_eq!(counters.drops_of(reason), count, "{reason:?}");
        }
    }

    /// The DNS side's part: a name gets a fake address with these reals.
    fn answer(world: &World, name: &str, real: &str) -> IpAddr {
        world
            .engine
            .fakes()
            .lock()
            .unwrap()
            .assign(name, false, vec![real.parse().unwrap()], "x", 1)
            .unwrap()
    }

    fn v4(addr: IpAddr) -> [u8; 4] {
        match addr {
            IpAddr::V4(a) => a.octets(),
            _ => panic!("not IPv4"),
        }
    }

    #[test]
    fn an_alias_takes_the_carrier_of_the_name_its_chain_reached() {
        let world = world(&[name("detour", "cdn.example.org")]);
        // shop.example.com is an alias of edge.cdn.example.org, which the
        // rule claims; shop.example.com itself matches no rule.
        let fake = world
            .engine
            .fakes()
            .lock()
            .unwrap()
            .assign_journaled(
                "shop.example.com",
                Some("edge.cdn.example.org"),
                false,
                vec!["192.0.2.10".parse().unwrap()],
                "detour",
                1,
            )
            .unwrap()
            .0;
        let mut router = world.router();
        let mut syn = tcp(v4(fake), 40000, 443, Some(1460));
        let decided = decide(&mut router, &mut syn);
        assert!(matches!(decided, Outbound::Overlay { .. }), "{decided:?}");
    }

    #[test]
    fn fake_flows_through_an_overlay_are_rewritten_both_ways() {
        let world = world(&[name("detour", "example.org")]);
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let mut router = world.router();
        let mut syn = tcp(v4(fake), 40000, 443, Some(1460));
        assert_eq!(
            decide(&mut router, &mut syn),
            Outbound::Overlay {
                overlay: OverlayId(1),
                to: entry()
            }
        );
        assert_eq!(
            addresses(&syn).unwrap().1,
            "192.0.2.10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(mss(&syn), Some(1428));
        assert_eq!(world.nat.len(), 0, "overlay flows are the broker's own");
        assert_eq!(
            world.engine.fakes().lock().unwrap().get(fake).unwrap().live_flows,
            1
        );

        // The reply comes back through the overlay from the real address.
        let mut returns = ReturnPath::new(&world.engine);
        let mut datagram = vec![0u8; 4];
        datagram.extend(tcp4_from([192, 0, 2, 10], CLIENT, 443, 40000, Some(1460)));
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        let replies = world.engine.replies().expect("a reply mapping");
        let mut out = Vec::new();
        let accepted = returns.accept(
            Some(entry()),
            &datagram,
            &local,
            Some(&replies),
            10,
            &mut out,
            Instant::now(),
        );
        assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
        let (src, dst) = addresses(&out[10..]).unwrap();
        assert_eq!((src, dst), (fake, IpAddr::from(CLIENT)));
        assert_eq!(mss(&out[10..]), Some(1428), "the SYN-ACK is clamped too");
        drop(replies);

        // A quiet TCP connection keeps its mapping for hours ...
        router.handle_timeout(Instant::now() + Duration::from_secs(600));
        assert!(world.engine.replies().is_some());
        // ... idle past its lifetime, the flow ends and frees its address.
        router.handle_timeout(Instant::now() + Lifetimes::DEFAULT_TCP + Duration::from_secs(60));
        assert!(world.engine.replies().is_none());
        assert_eq!(
            world.engine.fakes().lock().unwrap().get(fake).unwrap().live_flows,
            0
        );
        assert_eq!(world.engine.counters.flows.load(Relaxed), 0);
    }

    fn ping(dst: [u8; 4], id: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(CLIENT, dst, 64)
            .icmpv4_echo_request(id, 1)
            .write(&mut out, b"ping")
            .unwrap();
        out
    }

    #[test]
    fn each_ping_session_is_a_flow_of_its_own() {
        let icmp = |via: &str| RuleSpec {
            proto: Some("icmp".into()),
            via: via.into(),
            ..RuleSpec::default()
        };
        let mut world = world(&[icmp("detour")]);
        let mut router = world.router();
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        assert_eq!(decide(&mut router, &mut ping(SERVER, 7)), overlay);
        // The rule now sends ICMP to the underlay: a new ping (another
        // identifier) meets it, the running one keeps its carrier.
        world.rules = RuleSet::default();
        let (subset, via) = icmp("underlay").parse().unwrap();
        world.rules.add_any(subset, via).unwrap();
        world.engine.publish(routes(&world.rules, &world.overlays));
        assert_eq!(decide(&mut router, &mut ping(SERVER, 8)), Outbound::Underlay);
        assert_eq!(decide(&mut router, &mut ping(SERVER, 7)), overlay);
        assert_eq!(world.engine.counters.flows.load(Relaxed), 2);
        // A rule on ports never takes an echo for its identifier.
        let (subset, _) = RuleSpec {
            dport: Some("7".into()),
            via: "detour".into(),
            ..RuleSpec::default()
        }
        .parse_header()
        .unwrap();
        assert!(!subset.matches(&packet::flow_key(&ping(SERVER, 7)).unwrap()));
    }

    #[test]
    fn an_icmp_error_follows_the_flow_it_quotes() {
        let world = world(&[header("detour", "udp", "53"), name("detour", "example.org")]);
        let mut router = world.router();
        let overlay = Outbound::Overlay {
            overlay: OverlayId(1),
            to: entry(),
        };
        let datagram = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
            let mut out = Vec::new();
            PacketBuilder::ipv4(src, dst, 64)
                .udp(sport, dport)
                .write(&mut out, b"query")
                .unwrap();
            out
        };
        // A flow over the overlay; the answer came back, and this host
        // answers it with a port unreachable: over the overlay too, not
        // from this host's own address on the underlay.
        assert_eq!(
            decide(&mut router, &mut datagram(CLIENT, SERVER, 40000, 53)),
            overlay
        );
        let mut error = Vec::new();
        assert!(oasis_io::packet::unreachable_reply(
            &datagram(SERVER, CLIENT, 53, 40000),
            &mut error
        ));
        error[12..16].copy_from_slice(&CLIENT);
        error[16..20].copy_from_slice(&SERVER);
        fix_ipv4_checksum(&mut error);
        assert_eq!(decide(&mut router, &mut error), overlay);
        // It starts no flow: an error about a flow never seen goes the
        // plain way.
        let flows = world.engine.counters.flows.load(Relaxed);
        let mut stray = Vec::new();
        assert!(oasis_io::packet::unreachable_reply(
            &datagram(SERVER, CLIENT, 53, 40999),
            &mut stray
        ));
        stray[12..16].copy_from_slice(&CLIENT);
        stray[16..20].copy_from_slice(&SERVER);
        fix_ipv4_checksum(&mut stray);
        assert_eq!(decide(&mut router, &mut stray), Outbound::Underlay);
        assert_eq!(world.engine.counters.flows.load(Relaxed), flows);

        // A fake-address flow: the error goes to the real address, about
        // the real address, over the overlay.
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        assert_eq!(
            decide(&mut router, &mut datagram(CLIENT, v4(fake), 40001, 5353)),
            overlay
        );
        let mut error = Vec::new();
        assert!(oasis_io::packet::unreachable_reply(
            &datagram(v4(fake), CLIENT, 5353, 40001),
            &mut error
        ));
        error[12..16].copy_from_slice(&CLIENT);
        error[16..20].copy_from_slice(&v4(fake));
        fix_ipv4_checksum(&mut error);
        assert_eq!(decide(&mut router, &mut error), overlay);
        let real: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!(addresses(&error).unwrap(), (IpAddr::from(CLIENT), real));
        let quote = oasis_io::packet::icmp_error_quote(&error).unwrap();
        assert_eq!(addresses(&error[quote..]).unwrap(), (real, IpAddr::from(CLIENT)));

        // And a router's error about it, coming back through the overlay,
        // quotes the fake address the application knows.
        let mut too_big = Vec::new();
        let mut sent = datagram(CLIENT, v4(real), 40001, 5353);
        sent.resize(1400, 0);
        assert!(oasis_io::packet::too_big_reply(&sent, 1300, &mut too_big));
        too_big[12..16].copy_from_slice(&[192, 0, 2, 254]);
        fix_ipv4_checksum(&mut too_big);
        let mut returned = vec![0u8; 4];
        returned.extend(&too_big);
        let mut returns = ReturnPath::new(&world.engine);
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        let replies = world.engine.replies().expect("a reply mapping");
        let mut out = Vec::new();
        let accepted = returns.accept(
            Some(entry()),
            &returned,
            &local,
            Some(&replies),
            0,
            &mut out,
            Instant::now(),
        );
        assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
        let quote = oasis_io::packet::icmp_error_quote(&out).unwrap();
        assert_eq!(addresses(&out[quote..]).unwrap(), (IpAddr::from(CLIENT), fake));
        assert_eq!(
            addresses(&out).unwrap().0,
            "192.0.2.254".parse::<IpAddr>().unwrap()
        );
    }

    /// The host's sockets, as a test says they are.
    struct Sockets(Vec<(SocketAddr, SocketAddr)>);

    impl SocketLookup for Sockets {
        fn connected(&self, proto: u8, local: SocketAddr, peer: SocketAddr) -> bool {
            proto == 6 && self.0.contains(&(local, peer))
        }
        fn tcp_peers(&self, _: &dyn Fn(IpAddr) -> bool) -> std::io::Result<Vec<(SocketAddr, SocketAddr)>> {
            Ok(self.0.clone())
        }
        fn end_socket(&self, _: u8, _: SocketAddr, _: SocketAddr) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_restarted_daemon_takes_up_a_live_flow_of_a_fake_address() {
        // Two names on one real address: the socket tells which one the
        // flow is of.
        let world = world(&[name("detour", "example.org")]);
        let one = answer(&world, "one.example.org", "192.0.2.10");
        let two = answer(&world, "two.example.org", "192.0.2.10");
        let socket = |port: u16, fake: IpAddr| {
            (
                SocketAddr::new(IpAddr::from(CLIENT), port),
                SocketAddr::new(fake, 443),
            )
        };
        let mut returns = ReturnPath::new(&world.engine)
            .with_sockets(Arc::new(Sockets(vec![socket(40000, two), socket(40001, one)])));
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        // No flow in any router: the daemon was restarted. The server
        // speaks first.
        assert!(world.engine.replies().is_none());
        let returned = |port: u16| {
            let mut datagram = vec![0u8; 4];
            datagram.extend(tcp4_from([192, 0, 2, 10], CLIENT, 443, port, None));
            datagram
        };
        let mut out = Vec::new();
        for (port, fake) in [(40000, two), (40001, one), (40000, two)] {
            let accepted = returns.accept(
                Some(entry()),
                &returned(port),
                &local,
                None,
                0,
                &mut out,
                Instant::now(),
            );
            assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
            assert_eq!(addresses(&out).unwrap(), (fake, IpAddr::from(CLIENT)));
        }
        assert_eq!(world.engine.counters.adopted.load(Relaxed), 2);
        // A flow whose socket is gone: dropped, counted, never delivered
        // from an address no socket knows.
        let accepted = returns.accept(
            Some(entry()),
            &returned(40002),
            &local,
            None,
            0,
            &mut out,
            Instant::now(),
        );
        assert_eq!(accepted, Err(DropReason::NoFlow));
        assert_eq!(world.engine.counters.drops_of(DropReason::NoFlow), 1);
        // A source no fake address stands for: a header rule's flow, as it is.
        let mut plain = vec![0u8; 4];
        plain.extend(tcp4_from(SERVER, CLIENT, 80, 40003, None));
        let accepted = returns.accept(Some(entry()), &plain, &local, None, 0, &mut out, Instant::now());
        assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
        assert_eq!(addresses(&out).unwrap().0, IpAddr::from(SERVER));
    }

    #[test]
    fn a_header_rules_flow_to_an_address_a_name_also_stands_for_goes_as_it_is() {
        // The real address of a claimed name is also reached by its own
        // address, over a header rule: its answers must come back from
        // that address, not from the fake one, on this daemon and on one
        // started afresh with the table of the last.
        let world = world(&[name("detour", "example.org")]);
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let local_end = SocketAddr::new(IpAddr::from(CLIENT), 40010);
        let real_end = SocketAddr::new("192.0.2.10".parse().unwrap(), 443);
        let mut returns =
            ReturnPath::new(&world.engine).with_sockets(Arc::new(Sockets(vec![(local_end, real_end)])));
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        let mut datagram = vec![0u8; 4];
        datagram.extend(tcp4_from([192, 0, 2, 10], CLIENT, 443, 40010, None));
        let mut out = Vec::new();
        for _ in 0..2 {
            let accepted = returns.accept(
                Some(entry()),
                &datagram,
                &local,
                None,
                0,
                &mut out,
                Instant::now(),
            );
            assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
            assert_eq!(
                addresses(&out).unwrap().0,
                real_end.ip(),
                "not rewritten to {fake}"
            );
        }
        assert_eq!(world.engine.counters.adopted.load(Relaxed), 0);
        // A datagram no connected socket claims may be for an unconnected
        // one: delivered as it is too.
        let mut udp = vec![0u8; 4];
        udp.extend(udp4_from([192, 0, 2, 10], CLIENT, 53, 40011));
        let accepted = returns.accept(Some(entry()), &udp, &local, None, 0, &mut out, Instant::now());
        assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
        assert_eq!(addresses(&out).unwrap().0, real_end.ip());
        // Without a way to ask the sockets, nothing is taken up.
        let mut blind = ReturnPath::new(&world.engine);
        let mut to_fake = vec![0u8; 4];
        to_fake.extend(tcp4_from([192, 0, 2, 10], CLIENT, 443, 40012, None));
        let accepted = blind.accept(Some(entry()), &to_fake, &local, None, 0, &mut out, Instant::now());
        assert_eq!(accepted, Ok(Returned::Deliver(OverlayId(1))));
        assert_eq!(addresses(&out).unwrap().0, real_end.ip());
    }

    fn fix_ipv4_checksum(packet: &mut [u8]) {
        packet[10..12].copy_from_slice(&[0, 0]);
        let mut sum: u32 = packet[..20]
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }

    fn udp4_from(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64)
            .udp(sport, dport)
            .write(&mut out, b"answer")
            .unwrap();
        out
    }

    fn tcp4_from(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn_ack_mss: Option<u16>) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 64000);
        let builder = match syn_ack_mss {
            Some(mss) => builder
                .syn()
                .ack(1)
                .options(&[TcpOptionElement::MaximumSegmentSize(mss)])
                .unwrap(),
            None => builder.ack(1),
        };
        let mut out = Vec::new();
        builder.write(&mut out, b"").unwrap();
        out
    }

    #[test]
    fn fake_flows_on_the_underlay_go_to_the_nat_table() {
        let world = world(&[name("underlay", "example.org")]);
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let mut router = world.router();
        let mut first = tcp(v4(fake), 40000, 443, None);
        assert_eq!(decide(&mut router, &mut first), Outbound::Underlay);
        assert_eq!(
            addresses(&first).unwrap().1,
            "192.0.2.10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(world.nat.len(), 1);
        // Later packets are the NAT table's: it rewrites them both ways.
        let mut later = tcp(v4(fake), 40000, 443, None);
        assert!(world.nat.0.lock().unwrap().outbound(&mut later, Instant::now()));
        assert_eq!(
            addresses(&later).unwrap().1,
            "192.0.2.10".parse::<IpAddr>().unwrap()
        );
        let mut reply = tcp4_from([192, 0, 2, 10], CLIENT, 443, 40000, None);
        assert!(world.nat.0.lock().unwrap().inbound(&mut reply, Instant::now()));
        assert_eq!(addresses(&reply).unwrap().0, fake);

        // The NAT table saw the flow just now: a sweep keeps it ...
        router.handle_timeout(Instant::now() + Duration::from_secs(3));
        assert_eq!(world.nat.len(), 1);
        // ... and a quiet TCP connection keeps it for hours ...
        router.handle_timeout(Instant::now() + Duration::from_secs(600));
        assert_eq!(world.nat.len(), 1);
        // ... until it has been idle past its lifetime.
        router.handle_timeout(Instant::now() + Lifetimes::DEFAULT_TCP + Duration::from_secs(60));
        assert_eq!(world.nat.len(), 0);
        assert_eq!(
            world.engine.fakes().lock().unwrap().get(fake).unwrap().live_flows,
            0
        );
    }

    #[test]
    fn an_unknown_fake_address_draws_host_unreachable() {
        let world = world(&[name("detour", "example.org")]);
        let mut router = world.router();
        let mut packet = tcp([198, 19, 255, 254], 40000, 80, Some(1460));
        let mut reply = Vec::new();
        router.begin_batch();
        assert_eq!(
            router.outbound(Instant::now(), &mut packet, &mut reply),
            Outbound::Reply
        );
        {
            let sliced = SlicedPacket::from_ip(&reply).unwrap();
            let Some(TransportSlice::Icmpv4(icmp)) = sliced.transport else {
                panic!("not ICMP")
            };
            assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 1));
        }
        assert_eq!(
            addresses(&reply).unwrap(),
            ("198.19.255.254".parse().unwrap(), IpAddr::from(CLIENT))
        );
        // A name with only IPv6 addresses is unknown to an IPv4 flow too.
        let fake = world
            .engine
            .fakes()
            .lock()
            .unwrap()
            .assign(
                "v6only.example.org",
                false,
                vec!["2001:db8::1".parse().unwrap()],
                "x",
                1,
            )
            .unwrap();
        let mut packet = tcp(v4(fake), 40001, 80, None);
        assert_eq!(
            router.outbound(Instant::now(), &mut packet, &mut reply),
            Outbound::Reply
        );
        assert_eq!(
            world
                .engine
                .counters
                .fake_unknown
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(
            world.engine.fakes().lock().unwrap().get(fake).unwrap().live_flows,
            0
        );
    }

    #[test]
    fn a_fake_address_follows_the_rule_of_now() {
        let dropped = world(&[name("detour", "example.org")]);
        let fake = answer(&dropped, "www.example.org", "192.0.2.10");
        // The rule went away after the answer: the flow takes the underlay.
        dropped
            .engine
            .publish(routes(&RuleSet::default(), &dropped.overlays));
        let mut router = dropped.router();
        assert_eq!(
            decide(&mut router, &mut tcp(v4(fake), 40000, 443, None)),
            Outbound::Underlay
        );
        // So does a name whose overlay is not usable.
        let unusable = world(&[name("detour", "example.org")]);
        let fake = answer(&unusable, "www.example.org", "192.0.2.10");
        unusable
            .engine
            .publish(routes(&unusable.rules, &Arc::new(OverlayTable::default())));
        let mut router = unusable.router();
        assert_eq!(
            decide(&mut router, &mut tcp(v4(fake), 40000, 443, None)),
            Outbound::Underlay
        );
    }

    #[test]
    fn a_routers_kernel_work_waits_for_its_caller() {
        let world = world(&[header("underlay", "tcp", "8080"), name("underlay", "example.org")]);
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let real: IpAddr = "192.0.2.10".parse().unwrap();
        // A bare router: nothing carries its work out unless the test does.
        let mut router = world.engine.router(Arc::new(world.tables.clone()));
        let t0 = Instant::now();
        router.begin_batch();
        let mut syn = tcp(SERVER, 40000, 8080, Some(1460));
        let key = key_of(&syn);
        assert_eq!(router.outbound(t0, &mut syn, &mut Vec::new()), Outbound::Underlay);
        assert!(
            world.pins.0.lock().unwrap().flows.is_empty(),
            "the engine wrote no table"
        );
        let pin = KernelOp::Pin {
            flow: key,
            rule: 1,
            measured: false,
        };
        assert_eq!(router.next_work(), Some(pin));
        assert_eq!(router.next_work(), None);

        let fake_key = key_of(&tcp(v4(fake), 40001, 443, None));
        let mut first = tcp(v4(fake), 40001, 443, None);
        assert_eq!(
            router.outbound(t0, &mut first, &mut Vec::new()),
            Outbound::Underlay
        );
        assert_eq!(world.nat.len(), 0);
        assert_eq!(
            router.next_work(),
            Some(KernelOp::Translate {
                flow: fake_key,
                fake,
                real,
                measure: false
            })
        );

        // The kernel refused the pin: the flow stays with the broker, and
        // its later packets are carried without asking the kernel again.
        let full = TableError {
            table: "test",
            reason: "full".into(),
        };
        let changed = router.kernel_refused(&pin, &full, t0, &mut [], &mut Vec::new());
        assert_eq!(changed, None, "the packet goes as decided");
        assert!(!router.flows().get(&key).unwrap().in_kernel());
        let mut data = tcp(SERVER, 40000, 8080, None);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            router.outbound(later, &mut data, &mut Vec::new()),
            Outbound::Underlay
        );
        assert_eq!(router.next_work(), None, "no pin per packet");

        // Ending flows is work too: the translated flow's entry goes, the
        // flow the kernel never carried leaves nothing to undo.
        router.handle_timeout(t0 + Lifetimes::DEFAULT_TCP + Duration::from_secs(60));
        let ended: Vec<KernelOp> = std::iter::from_fn(|| router.next_work()).collect();
        assert_eq!(ended, [KernelOp::Untranslate { flow: fake_key, real }]);
        assert!(router.flows().is_empty());
    }

    #[test]
    fn probes_go_as_their_carriers_packets_do() {
        let world = world(&[]);
        let (engine, routes) = (&world.engine, world.engine.routes());
        let now = Instant::now();
        let mut work = Vec::new();

        // A SYN on the underlay is timed by the kernel.
        let mut syn = tcp(SERVER, 40000, 443, Some(1460));
        let key = key_of(&syn);
        let outbound = engine.probe(&routes, Via::Underlay, &key, &mut syn, now, &mut work);
        assert_eq!(outbound, Outbound::Underlay);
        assert_eq!(
            work,
            [
                KernelOp::Pin {
                    flow: key,
                    rule: 0,
                    measured: true
                },
                KernelOp::Measure {
                    flow: key,
                    syn_sent: Some(now),
                    probe: true
                }
            ]
        );

        // Through an overlay: its entry node, the MSS clamped as for any
        // flow it carries, nothing for the kernel.
        work.clear();
        let via = Via::Overlay(OverlayId(1));
        let outbound = engine.probe(&routes, via, &key, &mut syn, now, &mut work);
        assert_eq!(
            outbound,
            Outbound::Overlay {
                overlay: OverlayId(1),
                to: entry()
            }
        );
        assert!(work.is_empty());
        assert!(mss(&syn).is_some_and(|m| m < 1460), "{:?}", mss(&syn));

        // An echo request is timed by its reply; an overlay since left
        // carries nothing.
        let mut echo = ping(SERVER, 7);
        let echo_key = key_of(&echo);
        let outbound = engine.probe(&routes, Via::Underlay, &echo_key, &mut echo, now, &mut work);
        assert_eq!(outbound, Outbound::Underlay);
        assert!(work.is_empty());
        let gone = Via::Overlay(OverlayId(9));
        let outbound = engine.probe(&routes, gone, &echo_key, &mut echo, now, &mut work);
        assert_eq!(outbound, Outbound::Drop(DropReason::NoCarrier));
    }

    #[test]
    fn a_nat_table_that_refuses_leaves_no_trace() {
        let world = world_with(
            &[name("underlay", "example.org")],
            Some(Box::new(FullNat)),
            settings(),
        );
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let mut router = world.router();
        assert_eq!(
            decide(&mut router, &mut tcp(v4(fake), 40000, 443, None)),
            Outbound::Reply
        );
        assert_eq!(
            world
                .engine
                .counters
                .nat_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            world.engine.fakes().lock().unwrap().get(fake).unwrap().live_flows,
            0
        );
        assert!(router.flows().is_empty());
    }

    #[test]
    fn returned_packets_must_come_from_a_peer_and_be_for_this_host() {
        let world = world(&[header("detour", "tcp", "80")]);
        let mut returns = ReturnPath::new(&world.engine);
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        let mut datagram = vec![0u8; 4];
        datagram.extend(tcp4_from(SERVER, CLIENT, 80, 40000, None));
        let mut out = Vec::new();
        let stranger: SocketAddr = "192.0.2.99:7400".parse().unwrap();
        assert_eq!(
            returns.accept(
                Some(stranger),
                &datagram,
                &local,
                None,
                0,
                &mut out,
                Instant::now()
            ),
            Err(DropReason::NotFromOverlay)
        );
        assert_eq!(
            returns.accept(None, &datagram, &local, None, 0, &mut out, Instant::now()),
            Err(DropReason::NotFromOverlay)
        );
        let elsewhere: LocalAddresses = [IpAddr::from([10, 9, 9, 9])].into();
        assert_eq!(
            returns.accept(
                Some(entry()),
                &datagram,
                &elsewhere,
                None,
                0,
                &mut out,
                Instant::now()
            ),
            Err(DropReason::NotForThisHost)
        );
        assert_eq!(
            returns.accept(
                Some(entry()),
                &datagram[..4],
                &local,
                None,
                0,
                &mut out,
                Instant::now()
            ),
            Err(DropReason::Malformed),
            "a shim and nothing else"
        );
        assert_eq!(
            returns.accept(
                Some(entry()),
                &datagram,
                &local,
                None,
                0,
                &mut out,
                Instant::now()
            ),
            Ok(Returned::Deliver(OverlayId(1)))
        );
        assert_eq!(out, datagram[4..]);
        let counters = &world.engine.counters;
        assert_eq!(
            (
                counters.drops_of(DropReason::NotFromOverlay),
                counters.drops_of(DropReason::NotForThisHost),
                counters.drops_of(DropReason::Malformed),
                counters.overlay_received.load(Relaxed)
            ),
            (2, 1, 1, 1)
        );
        let overlay = world.overlays.get(OverlayId(1)).unwrap();
        assert_eq!(overlay.received.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn a_full_flow_table_makes_room() {
        let mut small = settings();
        small.flow_capacity = 16;
        let world = world_with(&[header("underlay", "udp", "1-65535")], None, small);
        let mut router = world.router();
        let start = Instant::now();
        for port in 1..=100u16 {
            let mut packet = Vec::new();
            PacketBuilder::ipv4(CLIENT, SERVER, 64)
                .udp(port, 53)
                .write(&mut packet, b"q")
                .unwrap();
            router.begin_batch();
            let now = start + Duration::from_millis(u64::from(port));
            assert_eq!(
                router.outbound(now, &mut packet, &mut Vec::new()),
                Outbound::Underlay
            );
            assert!(router.flows().len() <= 16);
        }
        let counters = &world.engine.counters;
        let flows = counters.flows.load(Relaxed);
        assert_eq!(counters.flows_started.load(Relaxed), 100);
        assert_eq!(flows, router.flows().len() as u64);
        assert_eq!(counters.flows_evicted.load(Relaxed), 100 - flows);
        assert_eq!(
            world.pins.0.lock().unwrap().flows.len(),
            router.flows().len(),
            "the kernel carries exactly the flows the table holds"
        );
    }

    #[test]
    fn carriers_are_resolved_to_ids_when_routes_are_published() {
        let world = world(&[header("detour", "tcp", "80")]);
        let routes = world.engine.routes();
        assert_eq!(routes.header()[0].via, RuleVia::Fixed(Via::Overlay(OverlayId(1))));
        assert_eq!(
            routes.resolve(&Carrier::Overlay("nope".into())),
            RuleVia::Fixed(Via::Unavailable)
        );
        assert_eq!(routes.resolve(&Carrier::Underlay), RuleVia::Fixed(Via::Underlay));
    }

    /// A metric rule for TCP port 443, over `detour`.
    fn metric(kind: &str) -> RuleSpec {
        let mut spec = header("", "tcp", "443");
        spec.metric = Some(kind.into());
        spec
    }

    /// Publishes the Monitor's choice of `via` for rule 1 towards SERVER.
    fn choose(world: &World, via: Via, down: Vec<Via>) {
        let prefix = crate::monitor::Prefix::of(IpAddr::from(SERVER));
        let chosen = crate::monitor::Chosen {
            via,
            why: crate::monitor::Why::Faster {
                chosen_ms: 10.0,
                underlay_ms: 60.0,
            },
            ranked: vec![via, Via::Underlay],
            settled: true,
        };
        world.link.publish(Arc::new(crate::monitor::Choices::new(
            [((1, prefix), chosen)].into(),
            down,
        )));
    }

    fn events(world: &World) -> Vec<crate::monitor::Event> {
        world.events.try_iter().map(|(_, e)| e).collect()
    }

    fn key_of(packet: &[u8]) -> oasis_common::FlowKey {
        packet::flow_key(packet).unwrap()
    }

    #[test]
    fn a_metric_flow_on_the_underlay_is_left_to_the_kernel() {
        let world = world(&[metric("latency")]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 443, Some(1460));
        // Nothing decided yet: the incumbent, the underlay.
        assert_eq!(decide(&mut router, &mut syn), Outbound::Underlay);
        let key = key_of(&syn);
        let pin = world.pins.0.lock().unwrap().flows[&key];
        assert_eq!(pin.rule, Some(1));
        assert!(pin.measured && !pin.probe && pin.syn_sent.is_some());
        assert!(matches!(
            events(&world)[..],
            [crate::monitor::Event::FlowStarted {
                rule: 1,
                via: Via::Underlay,
                dport: 443,
                ..
            }]
        ));
        // A packet that still reaches the broker: the kernel lost the
        // verdict; the flow is pinned again and carried on.
        world.pins.0.lock().unwrap().flows.get_mut(&key).unwrap().rule = None;
        let mut data = tcp(SERVER, 40000, 443, None);
        assert_eq!(decide(&mut router, &mut data), Outbound::Underlay);
        assert_eq!(world.pins.0.lock().unwrap().flows[&key].rule, Some(1));
        // Idle: the pin and the measurement go with the flow.
        router.handle_timeout(Instant::now() + Lifetimes::DEFAULT_TCP + Duration::from_secs(60));
        assert!(world.pins.0.lock().unwrap().flows.is_empty());
    }

    #[test]
    fn a_metric_flow_takes_the_monitors_choice_and_is_measured_here() {
        let world = world(&[metric("latency")]);
        choose(&world, Via::Overlay(OverlayId(1)), vec![]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 443, Some(1460));
        let start = Instant::now();
        router.begin_batch();
        assert!(matches!(
            router.outbound(start, &mut syn, &mut Vec::new()),
            Outbound::Overlay { .. }
        ));
        assert!(
            world.pins.0.lock().unwrap().flows.is_empty(),
            "nothing for the kernel"
        );
        let _ = events(&world);
        // The SYN-ACK comes back through the overlay: the handshake's round trip.
        let mut returns = ReturnPath::new(&world.engine);
        let synack = tcp4_from(SERVER, CLIENT, 443, 40000, Some(1400));
        let datagram = [&[0u8; 4][..], &synack].concat();
        let local: LocalAddresses = [IpAddr::from(CLIENT)].into();
        let mut out = Vec::new();
        let answered = returns.accept(
            Some(entry()),
            &datagram,
            &local,
            None,
            0,
            &mut out,
            start + Duration::from_millis(25),
        );
        assert_eq!(answered, Ok(Returned::Deliver(OverlayId(1))));
        let got = events(&world);
        assert!(
            matches!(got[..], [crate::monitor::Event::Rtt { via: Via::Overlay(_), rtt, .. }] if rtt == Duration::from_millis(25)),
            "{got:?}"
        );
    }

    #[test]
    fn a_handshake_unanswered_moves_the_flow_to_the_next_carrier() {
        let world = world(&[metric("latency")]);
        choose(&world, Via::Overlay(OverlayId(1)), vec![]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 443, Some(1460));
        let decided = decide(&mut router, &mut syn);
        assert!(matches!(decided, Outbound::Overlay { .. }), "{decided:?}");
        // The SYN again, no SYN-ACK: the overlay failed it.
        let mut again = tcp(SERVER, 40000, 443, Some(1460));
        assert_eq!(decide(&mut router, &mut again), Outbound::Underlay);
        let got = events(&world);
        assert!(got.iter().any(|e| matches!(
            e,
            crate::monitor::Event::SynFailed {
                via: Via::Overlay(_),
                ..
            }
        )));
        let key = key_of(&again);
        assert_eq!(
            router.flows().get(&key).unwrap().why,
            Some(crate::monitor::Why::Rescued)
        );
        assert_eq!(world.engine.counters.rescued.load(Relaxed), 1);
        assert!(
            world.pins.0.lock().unwrap().flows.contains_key(&key),
            "now the kernel's"
        );
        // Unanswered on the underlay too: back to the overlay.
        let mut third = tcp(SERVER, 40000, 443, Some(1460));
        assert!(matches!(
            decide(&mut router, &mut third),
            Outbound::Overlay { .. }
        ));
        assert!(!world.pins.0.lock().unwrap().flows.contains_key(&key));
    }

    #[test]
    fn a_syn_sent_again_after_the_kernel_saw_an_answer_is_no_failure() {
        let world = world(&[metric("latency")]);
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40001, 443, Some(1460));
        assert_eq!(decide(&mut router, &mut syn), Outbound::Underlay);
        let key = key_of(&syn);
        world.pins.0.lock().unwrap().flows.get_mut(&key).unwrap().answered = true;
        let mut again = tcp(SERVER, 40001, 443, Some(1460));
        assert_eq!(decide(&mut router, &mut again), Outbound::Underlay);
        assert_eq!(world.engine.counters.rescued.load(Relaxed), 0);
        assert!(
            world.pins.0.lock().unwrap().flows[&key].rule.is_some(),
            "pinned again"
        );
    }

    #[test]
    fn new_flows_leave_a_carrier_that_is_down() {
        let world = world(&[metric("latency")]);
        choose(
            &world,
            Via::Overlay(OverlayId(1)),
            vec![Via::Overlay(OverlayId(1))],
        );
        let mut router = world.router();
        let mut syn = tcp(SERVER, 40000, 443, Some(1460));
        assert_eq!(decide(&mut router, &mut syn), Outbound::Underlay);
        let key = key_of(&syn);
        assert_eq!(
            router.flows().get(&key).unwrap().why,
            Some(crate::monitor::Why::Failover)
        );
    }

    #[test]
    fn a_metric_name_rule_on_the_underlay_is_translated_and_measured_in_the_kernel() {
        let mut spec = name("", "example.org");
        spec.metric = Some("latency".into());
        let world = world(&[spec]);
        let fake = answer(&world, "www.example.org", "192.0.2.10");
        let mut router = world.router();
        let mut syn = tcp(v4(fake), 40000, 443, Some(1460));
        assert_eq!(decide(&mut router, &mut syn), Outbound::Underlay);
        assert_eq!(world.nat.len(), 1);
        // Measured by its real destination; nothing pinned (the NAT has it).
        let pins = world.pins.0.lock().unwrap();
        let (key, pin) = pins.flows.iter().next().unwrap();
        assert_eq!(packet::flow_dst(key), "192.0.2.10".parse::<IpAddr>().unwrap());
        assert!(pin.measured && pin.rule.is_none());
        drop(pins);
        assert!(matches!(
            events(&world)[..],
            [crate::monitor::Event::FlowStarted { dst, .. }] if dst == "192.0.2.10".parse::<IpAddr>().unwrap()
        ));
    }

    #[test]
    fn metric_rules_know_their_candidates() {
        let mut latency = header("", "tcp", "22");
        latency.metric = Some("latency".into());
        let mut among = name("", "example.edu");
        among.metric = Some("throughput".into());
        among.among = Some("detour,gone".into());
        let world = world(&[latency, among]);
        let routes = world.engine.routes();
        assert_eq!(routes.header()[0].via, RuleVia::Monitor);
        let all = routes.monitored(1).unwrap();
        assert_eq!((all.rule, &all.candidates[..]), (1, &[OverlayId(1)][..]));
        // An overlay that is not usable now is no candidate.
        let listed = routes.monitored(2).unwrap();
        assert_eq!(listed.candidates, [OverlayId(1)]);
        assert_eq!(listed.goal.metric, crate::monitor::Metric::Throughput);
        assert_eq!(routes.monitored_rules().count(), 2);
    }
}
