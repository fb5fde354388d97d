//! The classifier run by the kernel on synthetic packets (BPF_PROG_TEST_RUN):
//! verdicts per rule kind, the flow cache, the bypass mark, the heartbeat and
//! the counters. Needs root; `cargo xtask test` runs these.
#![cfg(target_os = "linux")]

use aya::programs::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use oasis_broker::compile::compile;
use oasis_broker::platform::Kernel;
use oasis_broker::platform::linux::LinuxKernel;
use oasis_broker::platform::linux::sys::monotonic_ns;
use oasis_broker::rules::{Rule, RuleSet, RuleSpec};
use oasis_common::{EGRESS_PROGRAM, FlowKey, INGRESS_PROGRAM, Settings, Verdict};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const BYPASS_MARK: u32 = 0x4f41_5349;
const CLIENT: [u8; 4] = [10, 0, 0, 2];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];

fn spec(proto: Option<&str>, dst: Option<&str>, dport: Option<&str>, sport: Option<&str>) -> RuleSpec {
    RuleSpec {
        proto: proto.map(Into::into),
        dst: dst.map(Into::into),
        dport: dport.map(Into::into),
        sport: sport.map(Into::into),
        via: "underlay".into(),
        ..RuleSpec::default()
    }
}

fn rules(specs: &[RuleSpec]) -> RuleSet {
    let mut set = RuleSet::default();
    for spec in specs {
        let (subset, via) = spec.parse_header().unwrap();
        set.add(subset, via).unwrap();
    }
    set
}

fn datapath(rule_list: &[Rule]) -> LinuxKernel {
    datapath_idle(rule_list, 120_000_000_000)
}

/// A datapath whose cached verdicts of flows other than TCP last `flow_idle_ns`.
fn datapath_idle(rule_list: &[Rule], flow_idle_ns: u64) -> LinuxKernel {
    let settings = Settings {
        heartbeat_timeout_ns: 3_000_000_000,
        flow_idle_ns,
        tcp_idle_ns: 7_440_000_000_000,
        tun_ifindex: 1,
        bypass_mark: BYPASS_MARK,
        ..Settings::default()
    };
    let mut datapath =
        LinuxKernel::load(oasis_ebpf_object::OBJECT, settings).expect("load the classifier (as root)");
    datapath.apply(&compile(rule_list)).unwrap();
    datapath
}

fn tcp4(dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(CLIENT, dst, 64)
        .tcp(sport, dport, 1, 64000);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, b"payload").unwrap();
    out
}

fn udp4(dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(CLIENT, dst, 64)
        .udp(sport, dport)
        .write(&mut out, b"q")
        .unwrap();
    out
}

fn icmp4(dst: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(CLIENT, dst, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

fn tcp6(dst: [u8; 16], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv6(CLIENT6, dst, 64)
        .tcp(40000, dport, 1, 64000)
        .syn()
        .write(&mut out, b"x")
        .unwrap();
    out
}

fn icmp6(dst: [u8; 16]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv6(CLIENT6, dst, 64)
        .icmpv6_echo_request(1, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

fn run(datapath: &LinuxKernel, packet: &[u8]) -> u32 {
    run_with_mark(datapath, packet, 0)
}

/// Runs the program once. `__sk_buff` starts with len, pkt_type, mark; the
/// kernel lets a test set mark and requires the two before it to be zero.
fn run_with_mark(datapath: &LinuxKernel, packet: &[u8], mark: u32) -> u32 {
    let ctx: Vec<u8> = [0u32, 0, mark].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; packet.len() + 256];
    let options = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::default()
    };
    datapath
        .program(EGRESS_PROGRAM)
        .unwrap()
        .test_run(options)
        .expect("BPF_PROG_TEST_RUN")
        .return_value
}

/// Pins the calling thread to the CPU it runs on, so that per-CPU state a
/// test builds up is what its next run sees.
fn stay_on_this_cpu() {
    // SAFETY: plain system calls on this thread, with a set on the stack.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let done = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(done, 0, "sched_setaffinity");
    }
}

fn v4_key(dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> FlowKey {
    FlowKey::v4(CLIENT, dst, proto, sport, dport)
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn port_rule_diverts_only_its_port() {
    let set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let dp = datapath(set.rules());
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)),
        TC_ACT_REDIRECT
    );
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40001, 9090, true)), TC_ACT_OK);
    assert_eq!(
        run(&dp, &udp4([192, 0, 2, 1], 40000, 8080)),
        TC_ACT_OK,
        "udp is not tcp"
    );
    let counters = dp.rule_counters(1);
    assert_eq!(counters.packets, 1);
    assert!(counters.bytes >= 60);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn prefix_rules_use_the_longest_match_and_rule_order() {
    let set = rules(&[
        spec(Some("tcp"), Some("203.0.113.0/24"), Some("443"), None),
        spec(None, Some("203.0.0.0/8"), None, None),
        spec(Some("udp"), None, Some("5000-5999"), Some("1024-65535")),
    ]);
    let dp = datapath(set.rules());
    assert_eq!(
        run(&dp, &tcp4([203, 0, 113, 7], 40000, 443, true)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        dp.classifier()
            .cached_flow(&v4_key([203, 0, 113, 7], 6, 40000, 443))
            .unwrap()
            .rule_id,
        1
    );
    assert_eq!(
        run(&dp, &tcp4([203, 0, 113, 7], 40000, 80, true)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        dp.classifier()
            .cached_flow(&v4_key([203, 0, 113, 7], 6, 40000, 80))
            .unwrap()
            .rule_id,
        2
    );
    assert_eq!(
        run(&dp, &icmp4([203, 9, 9, 9])),
        TC_ACT_REDIRECT,
        "the /8 rule has no ports"
    );
    assert_eq!(run(&dp, &tcp4([198, 51, 100, 1], 40000, 443, true)), TC_ACT_OK);
    assert_eq!(run(&dp, &udp4([198, 51, 100, 1], 40000, 5500)), TC_ACT_REDIRECT);
    assert_eq!(
        run(&dp, &udp4([198, 51, 100, 1], 53, 5500)),
        TC_ACT_OK,
        "source port 53 is out of range"
    );
    assert_eq!(run(&dp, &udp4([198, 51, 100, 1], 40000, 6000)), TC_ACT_OK);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn ipv6_rules() {
    let set = rules(&[
        spec(Some("tcp"), Some("2001:db8::/32"), Some("8080"), None),
        spec(Some("icmp"), None, None, None),
    ]);
    let dp = datapath(set.rules());
    let inside: [u8; 16] = "2001:db8::5".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let outside: [u8; 16] = "2001:db9::5".parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!(run(&dp, &tcp6(inside, 8080)), TC_ACT_REDIRECT);
    assert_eq!(run(&dp, &tcp6(outside, 8080)), TC_ACT_OK);
    assert_eq!(run(&dp, &tcp6(inside, 8081)), TC_ACT_OK);
    assert_eq!(run(&dp, &icmp6(outside)), TC_ACT_REDIRECT);
    assert_eq!(
        run(&dp, &icmp4([192, 0, 2, 1])),
        TC_ACT_REDIRECT,
        "icmp means ICMPv4 too"
    );
    assert_eq!(dp.rule_counters(2).packets, 2);
}

/// ICMPv6 of any type from `src` to `dst`, in a frame to `mac`.
fn icmp6_message(src: &str, dst: &str, icmp_type: u8, mac: [u8; 6]) -> Vec<u8> {
    let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], mac)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: icmp_type,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, &[0; 16])
        .unwrap();
    out
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn what_belongs_to_the_link_is_never_diverted_whatever_the_rules_say() {
    // Rules that claim every ICMP and UDP packet, and all of 10.0.0.0/8.
    let set = rules(&[
        spec(Some("icmp"), None, None, None),
        spec(Some("udp"), None, None, None),
        spec(None, Some("10.0.0.0/8"), None, None),
    ]);
    let dp = datapath(set.rules());
    let unicast_mac = [4; 6];
    let solicited_node_mac = [0x33, 0x33, 0xff, 0, 0, 2];
    // Neighbour discovery: multicast solicitation, unicast (NUD) between
    // global addresses, advertisement, router solicitation from ::, MLD.
    for (src, dst, icmp_type, mac) in [
        ("2001:db8::1", "ff02::1:ff00:2", 135, solicited_node_mac),
        ("2001:db8::1", "2001:db8::2", 135, unicast_mac),
        ("2001:db8::2", "2001:db8::1", 136, unicast_mac),
        ("fe80::1", "fe80::2", 136, unicast_mac),
        ("::", "ff02::2", 133, [0x33, 0x33, 0, 0, 0, 2]),
        ("fe80::1", "ff02::16", 143, [0x33, 0x33, 0, 0, 0, 0x16]),
        // An echo to a link-local neighbour.
        ("fe80::1", "fe80::2", 128, unicast_mac),
    ] {
        assert_eq!(
            run(&dp, &icmp6_message(src, dst, icmp_type, mac)),
            TC_ACT_OK,
            "ICMPv6 type {icmp_type} {src} -> {dst} must pass"
        );
    }
    // The rule still claims what it is meant for.
    assert_eq!(
        run(
            &dp,
            &icmp6_message("2001:db8::1", "2001:db9::9", 128, unicast_mac)
        ),
        TC_ACT_REDIRECT
    );
    // DHCP, mDNS, a subnet's broadcast (only the frame says so), loopback.
    let mut dhcp = Vec::new();
    PacketBuilder::ethernet2([2; 6], [0xff; 6])
        .ipv4([0, 0, 0, 0], [255, 255, 255, 255], 64)
        .udp(68, 67)
        .write(&mut dhcp, b"discover")
        .unwrap();
    assert_eq!(run(&dp, &dhcp), TC_ACT_OK);
    assert_eq!(run(&dp, &udp4([224, 0, 0, 251], 5353, 5353)), TC_ACT_OK);
    let mut broadcast = Vec::new();
    PacketBuilder::ethernet2([2; 6], [0xff; 6])
        .ipv4(CLIENT, [10, 0, 0, 255], 64)
        .udp(40000, 9)
        .write(&mut broadcast, b"wake")
        .unwrap();
    assert_eq!(run(&dp, &broadcast), TC_ACT_OK);
    assert_eq!(run(&dp, &udp4([169, 254, 1, 1], 40000, 9)), TC_ACT_OK);
    assert_eq!(
        run(&dp, &udp4([10, 0, 0, 255], 40000, 9)),
        TC_ACT_REDIRECT,
        "unicast frame: claimed"
    );
    assert_eq!(run(&dp, &udp4([192, 0, 2, 1], 40000, 9)), TC_ACT_REDIRECT);
}

/// An Ethernet frame holding one fragment of a UDP datagram from CLIENT
/// (or CLIENT6) to `dst`: the first (with the UDP header) or a later one.
fn fragment(v6: bool, id: u32, first: bool, dport: u16) -> Vec<u8> {
    let payload = [0x5au8; 64];
    let mut l4 = Vec::new();
    if first {
        l4.extend_from_slice(&40000u16.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&4000u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend_from_slice(&payload);
    let mut frame = vec![4u8; 6];
    frame.extend_from_slice(&[2; 6]);
    if v6 {
        frame.extend_from_slice(&0x86ddu16.to_be_bytes());
        let dst: std::net::Ipv6Addr = "2001:db8::9".parse().unwrap();
        frame.extend_from_slice(&[0x60, 0, 0, 0]);
        frame.extend_from_slice(&((8 + l4.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&[44, 64]);
        frame.extend_from_slice(&CLIENT6);
        frame.extend_from_slice(&dst.octets());
        // Fragment header: UDP next, offset 0 with M, or offset 1480 without.
        let offset: u16 = if first { 1 } else { 1480 };
        frame.extend_from_slice(&[17, 0]);
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    } else {
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        let flags: u16 = if first { 0x2000 } else { 185 };
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&(id as u16).to_be_bytes());
        ip.extend_from_slice(&flags.to_be_bytes());
        ip.extend_from_slice(&[64, 17, 0, 0]);
        ip.extend_from_slice(&CLIENT);
        ip.extend_from_slice(&[192, 0, 2, 9]);
        frame.extend_from_slice(&ip);
    }
    frame.extend_from_slice(&l4);
    frame
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn every_fragment_of_a_claimed_datagram_takes_its_way() {
    let set = rules(&[spec(Some("udp"), None, Some("9000"), None)]);
    let dp = datapath(set.rules());
    for v6 in [false, true] {
        // The first fragment has the ports and is claimed; the later ones
        // (no ports) must follow it, not leave on the underlay.
        assert_eq!(
            run(&dp, &fragment(v6, 0x1234, true, 9000)),
            TC_ACT_REDIRECT,
            "v6 {v6}"
        );
        assert_eq!(
            run(&dp, &fragment(v6, 0x1234, false, 0)),
            TC_ACT_REDIRECT,
            "v6 {v6}"
        );
        // Another datagram's fragments, unclaimed, pass.
        assert_eq!(run(&dp, &fragment(v6, 0x4321, true, 9001)), TC_ACT_OK, "v6 {v6}");
        assert_eq!(run(&dp, &fragment(v6, 0x4321, false, 0)), TC_ACT_OK, "v6 {v6}");
    }
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn second_packet_hits_the_flow_cache() {
    let set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let dp = datapath(set.rules());
    let before = dp.counters();
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, false)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, false)),
        TC_ACT_REDIRECT
    );
    let after = dp.counters();
    assert_eq!(after.classified - before.classified, 1);
    assert_eq!(after.cache_hits - before.cache_hits, 2);
    assert_eq!(after.diverted - before.diverted, 3);
    let entry = dp
        .classifier()
        .cached_flow(&v4_key([192, 0, 2, 1], 6, 40000, 8080))
        .expect("cached");
    assert_eq!((entry.rule_id, entry.verdict), (1, Verdict::Divert as u8));
    assert_eq!(dp.rule_counters(1).packets, 3);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn only_the_very_flow_rides_this_cpus_last_unclaimed_flow() {
    // The slot is checked before the packet is parsed: a packet that
    // differs from its flow in any field a rule can name must still meet
    // the rules. The slot is per CPU: the test stays on one.
    stay_on_this_cpu();
    let mut set = rules(&[
        spec(Some("tcp"), None, Some("8080"), None),
        spec(None, Some("203.0.113.0/24"), None, None),
        spec(Some("udp"), None, Some("9090"), None),
        spec(Some("tcp"), None, None, Some("41000")),
    ]);
    let mut dp = datapath(set.rules());
    let server = [192, 0, 2, 1];
    let unclaimed = tcp4(server, 40000, 9090, false);
    let neighbours = [
        ("another port", tcp4(server, 40000, 8080, false)),
        ("another destination", tcp4([203, 0, 113, 1], 40000, 9090, false)),
        ("another protocol", udp4(server, 40000, 9090)),
        ("another source port", tcp4(server, 41000, 9090, false)),
    ];
    let before = dp.counters().cache_hits;
    for _ in 0..50 {
        for (what, packet) in &neighbours {
            assert_eq!(run(&dp, &unclaimed), TC_ACT_OK);
            assert_eq!(run(&dp, &unclaimed), TC_ACT_OK);
            assert_eq!(run(&dp, packet), TC_ACT_REDIRECT, "{what}");
        }
    }
    assert!(
        dp.counters().cache_hits - before >= 200,
        "the slot and the cache served the flow"
    );
    // Claimed later: the live flow keeps passing; a new connection on the
    // same ports meets the new rule, and its packets follow it.
    let (subset, via) = spec(Some("tcp"), None, Some("9090"), None)
        .parse_header()
        .unwrap();
    set.add(subset, via).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    for _ in 0..50 {
        assert_eq!(run(&dp, &unclaimed), TC_ACT_OK);
    }
    assert_eq!(run(&dp, &tcp4(server, 40000, 9090, true)), TC_ACT_REDIRECT);
    for _ in 0..50 {
        assert_eq!(run(&dp, &unclaimed), TC_ACT_REDIRECT);
    }
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn live_flows_keep_their_verdict_and_new_connections_see_new_rules() {
    let mut set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let mut dp = datapath(set.rules());
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)),
        TC_ACT_REDIRECT
    );
    set.remove(1).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    // The established flow stays on its carrier...
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, false)),
        TC_ACT_REDIRECT
    );
    // ...a new connection, even on the same ports, meets the new rules.
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)), TC_ACT_OK);
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, false)), TC_ACT_OK);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn a_flood_of_unclaimed_flows_never_takes_a_claimed_flows_carrier() {
    // TCP 8080 is claimed; UDP is a protocol some rule names, so every UDP
    // flow nobody claims is cached too.
    let mut set = rules(&[
        spec(Some("tcp"), None, Some("8080"), None),
        spec(Some("udp"), None, Some("1"), None),
    ]);
    let mut dp = datapath(set.rules());
    let server = [192, 0, 2, 1];
    assert_eq!(run(&dp, &tcp4(server, 40000, 8080, true)), TC_ACT_REDIRECT);
    // More short flows than the verdict cache holds.
    let strangers = oasis_common::FLOW_CACHE_ENTRIES + 4096;
    for n in 0..strangers {
        let dst = [10, 64 + (n >> 16) as u8, (n >> 8) as u8, n as u8];
        assert_eq!(run(&dp, &udp4(dst, 40000, 9)), TC_ACT_OK);
    }
    // Its rule deleted meanwhile: the live connection still goes to the
    // broker, which knows its carrier, rather than out on the underlay.
    set.remove(1).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    assert_eq!(run(&dp, &tcp4(server, 40000, 8080, false)), TC_ACT_REDIRECT);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn an_established_tcp_flow_keeps_its_verdict_longer_than_other_flows() {
    // Verdicts of flows other than TCP last 1 ms here; TCP's 2 h 4 min.
    let mut set = rules(&[
        spec(Some("tcp"), None, Some("22"), None),
        spec(Some("udp"), None, Some("5000"), None),
    ]);
    let mut dp = datapath_idle(set.rules(), 1_000_000);
    let server = [192, 0, 2, 1];
    assert_eq!(run(&dp, &tcp4(server, 40000, 22, true)), TC_ACT_REDIRECT);
    assert_eq!(run(&dp, &udp4(server, 40000, 5000)), TC_ACT_REDIRECT);
    set.remove(1).unwrap();
    set.remove(2).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    // Past the coarse clock's tick and the 1 ms.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(
        run(&dp, &tcp4(server, 40000, 22, false)),
        TC_ACT_REDIRECT,
        "a quiet SSH session keeps its carrier"
    );
    assert_eq!(
        run(&dp, &udp4(server, 40000, 5000)),
        TC_ACT_OK,
        "an idle UDP flow is decided afresh"
    );
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn bypass_mark_always_passes() {
    let set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let dp = datapath(set.rules());
    assert_eq!(
        run_with_mark(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true), BYPASS_MARK),
        TC_ACT_OK
    );
    assert_eq!(
        run_with_mark(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true), 7),
        TC_ACT_REDIRECT
    );
    assert_eq!(dp.counters().bypassed, 1);
    assert_eq!(
        dp.rule_counters(1).packets,
        1,
        "the broker's own packet is not counted"
    );
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn stale_heartbeat_fails_open() {
    let set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let mut dp = datapath(set.rules());
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)),
        TC_ACT_REDIRECT
    );
    dp.heartbeat_map().set(monotonic_ns() - 4_000_000_000).unwrap();
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, false)),
        TC_ACT_OK,
        "cached flows too"
    );
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40001, 8080, true)), TC_ACT_OK);
    assert_eq!(dp.counters().fail_open, 2);
    dp.heartbeat_map().set(monotonic_ns()).unwrap();
    assert_eq!(
        run(&dp, &tcp4([192, 0, 2, 1], 40002, 8080, true)),
        TC_ACT_REDIRECT
    );
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn no_rules_pass_everything_and_junk_passes() {
    let dp = datapath(&[]);
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40000, 8080, true)), TC_ACT_OK);
    assert_eq!(run(&dp, &icmp4([192, 0, 2, 1])), TC_ACT_OK);
    let mut arp = vec![0u8; 42];
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert_eq!(run(&dp, &arp), TC_ACT_OK);
    let mut truncated = tcp4([192, 0, 2, 1], 40000, 8080, true);
    truncated.truncate(14 + 20 + 2);
    assert_eq!(run(&dp, &truncated), TC_ACT_OK);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn rule_updates_reach_the_maps_in_place() {
    let mut set = rules(&[spec(Some("udp"), None, Some("53"), None)]);
    let mut dp = datapath(set.rules());
    assert_eq!(run(&dp, &udp4([192, 0, 2, 1], 40000, 53)), TC_ACT_REDIRECT);
    let (subset, via) = spec(None, Some("192.0.2.0/24"), None, None)
        .parse_header()
        .unwrap();
    set.add(subset, via).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 9], 40000, 22, true)), TC_ACT_REDIRECT);
    assert_eq!(
        dp.classifier()
            .cached_flow(&v4_key([192, 0, 2, 9], 6, 40000, 22))
            .unwrap()
            .rule_id,
        2
    );
    set.remove(1).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    assert_eq!(run(&dp, &udp4([198, 51, 100, 1], 40000, 53)), TC_ACT_OK);
    assert_eq!(
        dp.rule_counters(1).packets,
        0,
        "a deleted rule's counters are gone"
    );
}

/// Not an assertion on time (this machine is shared): prints what one
/// classification costs, as the kernel measures it over many runs.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn cost_per_packet_is_reported() {
    let set = rules(&[
        spec(Some("tcp"), None, Some("8080"), None),
        spec(None, Some("203.0.113.0/24"), None, None),
    ]);
    let dp = datapath(set.rules());
    let packet = tcp4([192, 0, 2, 1], 40000, 9090, false);
    assert_eq!(run(&dp, &packet), TC_ACT_OK);
    let ctx: Vec<u8> = [0u32, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let options = TestRunOptions {
        data_in: Some(&packet),
        ctx_in: Some(&ctx),
        repeat: 1_000_000,
        ..TestRunOptions::default()
    };
    let result = dp.program(EGRESS_PROGRAM).unwrap().test_run(options).unwrap();
    assert_eq!(result.return_value, TC_ACT_OK);
    println!(
        "classifier, cached unmatched flow: {:?} per packet",
        result.duration
    );
    assert!(dp.counters().cache_hits >= 1_000_000);
}

/// Runs `program` once and returns its verdict and the packet as it left.
fn run_out(program: &aya::programs::SchedClassifier, packet: &[u8]) -> (u32, Vec<u8>) {
    let ctx: Vec<u8> = [0u32, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The frame's addresses and ports, with every checksum checked.
fn checked(frame: &[u8]) -> (std::net::IpAddr, std::net::IpAddr, u16, u16) {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 checksum"
    );
    let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP")
    };
    let expected = tcp
        .to_header()
        .calc_checksum_ipv4(&header, tcp.payload())
        .unwrap();
    assert_eq!(tcp.checksum(), expected, "TCP checksum");
    (
        header.source.into(),
        header.destination.into(),
        tcp.source_port(),
        tcp.destination_port(),
    )
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn fake_addresses_go_to_the_broker_until_nat_rewrites_them_in_the_kernel() {
    const FAKE: [u8; 4] = [198, 18, 0, 7];
    const REAL: [u8; 4] = [192, 0, 2, 10];
    // A header rule that claims everything must not see fake addresses.
    let set = rules(&[spec(Some("tcp"), None, None, None)]);
    let mut dp = datapath(set.rules());
    dp.set_fake_pools(
        "198.18.0.0/15".parse().unwrap(),
        "fd4f:4153:4953::/48".parse().unwrap(),
    )
    .unwrap();
    let mut nat = dp.take_nat().expect("NAT maps");
    let syn = tcp4(FAKE, 40000, 80, true);
    assert_eq!(
        run(&dp, &syn),
        TC_ACT_REDIRECT,
        "a first packet goes to the broker"
    );

    nat.install(&v4_key(FAKE, 6, 40000, 80), FAKE.into(), REAL.into(), false)
        .unwrap();
    let (verdict, out) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &tcp4(FAKE, 40000, 80, false));
    assert_eq!(verdict, TC_ACT_OK, "rewritten in place and sent on");
    assert_eq!(checked(&out), (CLIENT.into(), REAL.into(), 40000, 80));
    // Another flow to the same fake address has no entry: the broker's.
    assert_eq!(run(&dp, &tcp4(FAKE, 40001, 80, false)), TC_ACT_REDIRECT);

    // The reply comes back from the real address and leaves from the fake.
    let mut reply = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4(REAL, CLIENT, 64)
        .tcp(80, 40000, 7, 64000)
        .ack(2)
        .write(&mut reply, b"response body")
        .unwrap();
    let (verdict, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(checked(&out), (FAKE.into(), CLIENT.into(), 80, 40000));
    // Replies of other flows pass untouched.
    let mut stranger = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4(REAL, CLIENT, 64)
        .tcp(80, 40001, 7, 64000)
        .write(&mut stranger, b"x")
        .unwrap();
    let (_, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &stranger);
    assert_eq!(out, stranger);
    let counters = dp.counters();
    assert_eq!((counters.nat_egress, counters.nat_ingress), (1, 1));
    assert_eq!(counters.fake_diverted, 2);
}

/// A datapath whose overlay port is 7400, as the broker's default.
fn datapath_with_overlay_port(rule_list: &[Rule]) -> LinuxKernel {
    let settings = Settings {
        heartbeat_timeout_ns: 3_000_000_000,
        flow_idle_ns: 120_000_000_000,
        tcp_idle_ns: 7_440_000_000_000,
        tun_ifindex: 1,
        bypass_mark: BYPASS_MARK,
        overlay_port: 7400,
        ..Settings::default()
    };
    let mut datapath =
        LinuxKernel::load(oasis_ebpf_object::OBJECT, settings).expect("load the classifier (as root)");
    datapath.apply(&compile(rule_list)).unwrap();
    datapath
}

/// The entry node of the fast-path tests: loopback, so that finding this
/// host's address toward it asks no real route.
const ENTRY: [u8; 4] = [127, 0, 0, 1];
const SERVER: [u8; 4] = [203, 0, 113, 7];

/// The client's IPv6 flow to the server's port 80, as it leaves.
fn client6_flow() -> FlowKey {
    FlowKey {
        src: CLIENT6,
        dst: SERVER6,
        sport: 40000,
        dport: 80,
        proto: 6,
        family: oasis_common::FAMILY_V6,
        _pad: [0; 2],
    }
}

/// The server's TCP segment from port 80 to the client's `port` (IPv6 or
/// IPv4), without a link header: what an entry node's datagram carries.
fn server_reply(v6: bool, port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = if v6 {
        PacketBuilder::ipv6(SERVER6, CLIENT6, 64)
    } else {
        PacketBuilder::ipv4(SERVER, CLIENT, 64)
    };
    let mut packet = Vec::new();
    builder
        .tcp(80, port, 7, 64000)
        .ack(2)
        .write(&mut packet, payload)
        .unwrap();
    packet
}

/// The fast path's egress and ingress, run by the kernel on crafted
/// packets: the bytes it puts around a flow's packet, with every checksum
/// checked, and the packet it takes back out of the entry node's
/// datagram.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn an_overlay_flow_the_broker_leaves_to_the_kernel_is_wrapped_and_opened_there() {
    use oasis_broker::engine::Encapsulation;
    let set = rules(&[spec(Some("tcp"), None, Some("80"), None)]);
    let mut dp = datapath_with_overlay_port(set.rules());
    let mut encap = dp.take_encap().expect("the encapsulation table");
    let shim: Vec<u8> = (1..=16).collect();
    let to = std::net::SocketAddr::from((ENTRY, 7400));
    let how = Encapsulation::new(to, 1, 1500, &shim).unwrap();
    let flow = v4_key(SERVER, 6, 40000, 80);
    encap.install(&flow, &how).unwrap();

    // A packet of the flow leaves wrapped, for the kernel to route.
    let packet = tcp4(SERVER, 40000, 80, false);
    let (verdict, out) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent on by bpf_redirect_neigh");
    assert_eq!(out.len(), packet.len() + 20 + 8 + 16);
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&out[14..])
        .unwrap()
        .to_header();
    assert_eq!(
        outer.header_checksum,
        outer.calc_header_checksum(),
        "outer IPv4 checksum"
    );
    assert_eq!((outer.source, outer.destination), (ENTRY, ENTRY));
    assert_eq!(outer.protocol, etherparse::IpNumber::UDP);
    assert!(
        !outer.dont_fragment,
        "fragmentable on a narrower path, as the broker's datagrams are"
    );
    assert_eq!(usize::from(outer.total_len), out.len() - 14);
    let udp = etherparse::UdpHeaderSlice::from_slice(&out[34..]).unwrap();
    assert_eq!((udp.source_port(), udp.destination_port()), (7400, 7400));
    assert_eq!(usize::from(udp.length()), out.len() - 34);
    assert_eq!(udp.checksum(), 0, "no outer UDP checksum over IPv4");
    assert_eq!(&out[42..58], &shim[..]);
    assert_eq!(&out[58..], &packet[14..], "the packet itself untouched");
    let counters = dp.counters();
    assert_eq!((counters.encap_packets, counters.diverted), (1, 0));
    assert_eq!(dp.rule_counters(1).packets, 1, "counted by its rule");

    // What the broker must see stays the broker's: a SYN, and a packet
    // too big once wrapped.
    let (verdict, out) = run_out(
        dp.program(EGRESS_PROGRAM).unwrap(),
        &tcp4(SERVER, 40000, 80, true),
    );
    assert_eq!(
        (verdict, out.len()),
        (TC_ACT_REDIRECT, packet.len()),
        "diverted as it was"
    );
    let narrow = Encapsulation::new(to, 1, 80, &shim).unwrap();
    encap.install(&flow, &narrow).unwrap();
    let (_, out) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &packet);
    assert_eq!(out, packet, "too big for the path: to the broker as it was");
    assert_eq!(dp.counters().fast_too_big, 1);
    encap.install(&flow, &how).unwrap();

    // The entry node's datagram of the flow is opened on the way in.
    let inner = server_reply(false, 40000, b"response body");
    let datagram = |from_port: u16, inner: &[u8]| {
        let mut payload = shim.clone();
        payload.extend_from_slice(inner);
        let mut out = Vec::new();
        PacketBuilder::ethernet2([4; 6], [2; 6])
            .ipv4(ENTRY, CLIENT, 64)
            .udp(from_port, 7400)
            .write(&mut out, &payload)
            .unwrap();
        out
    };
    let (verdict, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &datagram(7400, &inner));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[14..], &inner[..], "the packet, as the server sent it");
    assert_eq!(checked(&out), (SERVER.into(), CLIENT.into(), 80, 40000));
    assert_eq!(dp.counters().decap_packets, 1);
    // Not from the flow's entry node (another port), or not of a wrapped
    // flow: left for the broker's socket, which checks its senders.
    let stranger = datagram(7401, &inner);
    assert_eq!(
        run_out(dp.program(INGRESS_PROGRAM).unwrap(), &stranger).1,
        stranger
    );
    let other = server_reply(false, 40001, b"x");
    let unknown = datagram(7400, &other);
    assert_eq!(run_out(dp.program(INGRESS_PROGRAM).unwrap(), &unknown).1, unknown);
    // An IPv6 packet inside an IPv4 datagram comes out as IPv6.
    let flow6 = client6_flow();
    encap.install(&flow6, &how).unwrap();
    let inner6 = server_reply(true, 40000, b"v6");
    let (_, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &datagram(7400, &inner6));
    assert_eq!(&out[12..14], &[0x86, 0xdd], "the link header says IPv6");
    assert_eq!(&out[14..], &inner6[..]);

    // Gone from the table, the flow's packets are the broker's again.
    encap.remove(&flow);
    encap.remove(&flow6);
    let (_, out) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &packet);
    assert_eq!(out, packet);
    let opened = dp.counters().decap_packets;
    let (_, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &datagram(7400, &inner));
    assert_eq!(out.len(), inner.len() + 14 + 28 + 16, "left closed");
    assert_eq!(dp.counters().decap_packets, opened);
}

/// The same with an entry node on IPv6: outer IPv6 and UDP (checksum
/// zero, which our overlay sockets accept), and datagrams from it opened
/// whichever family the packet inside has.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn a_flow_to_an_ipv6_entry_node_is_wrapped_and_opened_in_ipv6() {
    use oasis_broker::engine::Encapsulation;
    use std::net::Ipv6Addr;
    let set = rules(&[spec(Some("tcp"), None, Some("80"), None)]);
    let mut dp = datapath_with_overlay_port(set.rules());
    let mut encap = dp.take_encap().expect("the encapsulation table");
    let entry6 = Ipv6Addr::LOCALHOST;
    let how = Encapsulation::new((entry6, 7400).into(), 1, 1500, &[9; 8]).unwrap();
    encap.install(&v4_key(SERVER, 6, 40000, 80), &how).unwrap();

    let packet = tcp4(SERVER, 40000, 80, false);
    let (verdict, out) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), packet.len() + 40 + 8 + 8);
    let outer = etherparse::Ipv6HeaderSlice::from_slice(&out[14..])
        .unwrap()
        .to_header();
    assert_eq!(
        (outer.source, outer.destination),
        (entry6.octets(), entry6.octets())
    );
    assert_eq!(outer.next_header, etherparse::IpNumber::UDP);
    assert_eq!(usize::from(outer.payload_length), out.len() - 14 - 40);
    let udp = etherparse::UdpHeaderSlice::from_slice(&out[54..]).unwrap();
    assert_eq!((udp.source_port(), udp.destination_port()), (7400, 7400));
    assert_eq!(usize::from(udp.length()), out.len() - 54);
    assert_eq!(udp.checksum(), 0, "zero, as RFC 6935 allows tunnels");
    assert_eq!(&out[62..70], &[9; 8], "the shim");
    assert_eq!(&out[70..], &packet[14..], "the packet itself untouched");

    // Back: an IPv4 packet in an IPv6 datagram comes out as IPv4, with the
    // link header saying so.
    let datagram = |inner: &[u8]| {
        let mut payload = vec![9u8; 8];
        payload.extend_from_slice(inner);
        let mut out = Vec::new();
        PacketBuilder::ethernet2([4; 6], [2; 6])
            .ipv6(entry6.octets(), CLIENT6, 64)
            .udp(7400, 7400)
            .write(&mut out, &payload)
            .unwrap();
        out
    };
    let inner = server_reply(false, 40000, b"response body");
    let (verdict, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &datagram(&inner));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(&out[12..14], &[0x08, 0x00], "the link header says IPv4");
    assert_eq!(&out[14..], &inner[..]);
    assert_eq!(checked(&out), (SERVER.into(), CLIENT.into(), 80, 40000));

    // IPv6 in IPv6: the family stays.
    let flow6 = client6_flow();
    encap.install(&flow6, &how).unwrap();
    let inner6 = server_reply(true, 40000, b"v6");
    let (_, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &datagram(&inner6));
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(&out[14..], &inner6[..]);
    assert_eq!(dp.counters().decap_packets, 2);

    // With the flow gone, its datagrams stay closed.
    encap.remove(&flow6);
    let closed = datagram(&inner6);
    assert_eq!(run_out(dp.program(INGRESS_PROGRAM).unwrap(), &closed).1, closed);
}

/// The object's maps are the table in oasis-common, name, kind and size,
/// and its programs are the ones the broker loads by name.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn the_object_matches_the_shared_table() {
    use aya::maps::Map;
    use oasis_common::maps::{ALL, MapKind};
    let ebpf = aya::Ebpf::load(oasis_ebpf_object::OBJECT).expect("load the object (as root)");
    let mut found = 0;
    // Sections such as .rodata become maps of their own: not ours to list.
    for (name, map) in ebpf.maps().filter(|(name, _)| !name.starts_with('.')) {
        let def = ALL
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("map {name} is not in oasis_common::maps"));
        let (kind, data) = match map {
            Map::Array(d) => (MapKind::Array, d),
            Map::HashMap(d) => (MapKind::HashMap, d),
            Map::LruHashMap(d) => (MapKind::LruHashMap, d),
            Map::LpmTrie(d) => (MapKind::LpmTrie, d),
            Map::PerCpuArray(d) => (MapKind::PerCpuArray, d),
            Map::PerCpuHashMap(d) => (MapKind::PerCpuHashMap, d),
            Map::RingBuf(d) => (MapKind::RingBuf, d),
            other => panic!("map {name} has an unexpected type: {other:?}"),
        };
        let info = data.info().unwrap();
        let sparse = info.map_flags() & 1 != 0; // BPF_F_NO_PREALLOC
        let declared = match def.kind {
            MapKind::SparseHashMap => MapKind::HashMap,
            other => other,
        };
        assert_eq!(kind, declared, "{name}");
        // (LPM tries are never preallocated; only hash maps choose.)
        if declared == MapKind::HashMap {
            assert_eq!(
                sparse,
                def.kind == MapKind::SparseHashMap,
                "{name}: allocated as added"
            );
        }
        assert_eq!(info.max_entries(), def.max_entries, "{name}");
        found += 1;
    }
    assert_eq!(found, ALL.len(), "every map of the table is in the object");
    let mut programs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    programs.sort_unstable();
    let mut expected: Vec<&str> = [
        EGRESS_PROGRAM,
        INGRESS_PROGRAM,
        oasis_common::EXIT_INGRESS_PROGRAM,
    ]
    .into_iter()
    .chain(oasis_common::DNS_PROGRAMS.iter().map(|(name, _)| *name))
    .collect();
    expected.sort_unstable();
    assert_eq!(programs, expected);
    // The kernel's verifier accepts each TC program: the exit's runs close
    // to the 512 bytes of stack a call chain may use, and a change that
    // passes them shows here, not as an exit node that never starts.
    let mut ebpf = ebpf;
    for name in [
        EGRESS_PROGRAM,
        INGRESS_PROGRAM,
        oasis_common::EXIT_INGRESS_PROGRAM,
    ] {
        let program: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        program
            .load()
            .unwrap_or_else(|e| panic!("the verifier refused {name}: {e:#}"));
    }
}

/// A protocol no rule has named passes without touching the flow cache
/// (strangers cannot push live flows out of it); one that a rule named
/// keeps its cached flows after the rule is gone.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn protocols_no_rule_named_stay_out_of_the_flow_cache() {
    let mut set = rules(&[spec(Some("tcp"), None, Some("8080"), None)]);
    let mut dp = datapath(set.rules());
    assert_eq!(run(&dp, &udp4([192, 0, 2, 1], 40000, 53)), TC_ACT_OK);
    assert!(
        dp.classifier()
            .cached_flow(&v4_key([192, 0, 2, 1], 17, 40000, 53))
            .is_none()
    );
    assert_eq!(run(&dp, &tcp4([192, 0, 2, 1], 40000, 9090, true)), TC_ACT_OK);
    assert!(
        dp.classifier()
            .cached_flow(&v4_key([192, 0, 2, 1], 6, 40000, 9090))
            .is_some(),
        "TCP is named by a rule: its flows are cached, diverted or not"
    );
    // UDP claimed later: its flows are cached from then on.
    let (subset, via) = spec(Some("udp"), None, Some("53"), None).parse_header().unwrap();
    set.add(subset, via).unwrap();
    dp.apply(&compile(set.rules())).unwrap();
    assert_eq!(run(&dp, &udp4([192, 0, 2, 1], 40000, 53)), TC_ACT_REDIRECT);
    assert!(
        dp.classifier()
            .cached_flow(&v4_key([192, 0, 2, 1], 17, 40000, 53))
            .is_some()
    );
}

/// Every measurement waiting in the ring buffer.
fn drain(events: &mut Box<dyn oasis_broker::platform::MonitorEvents>) -> Vec<oasis_common::MonitorEvent> {
    let mut out = Vec::new();
    events
        .read(std::time::Duration::from_millis(10), &mut out)
        .unwrap();
    out
}

/// A TCP segment of SERVER's flow 40000 → 443, either way, with timestamps.
fn segment(
    outgoing: bool,
    edit: impl FnOnce(etherparse::TcpHeader) -> etherparse::TcpHeader,
    payload: &[u8],
) -> Vec<u8> {
    const SERVER: [u8; 4] = [203, 0, 113, 9];
    let (src, dst, sport, dport) = if outgoing {
        (CLIENT, SERVER, 40000, 443)
    } else {
        (SERVER, CLIENT, 443, 40000)
    };
    let mut ip = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, src, dst).unwrap();
    let tcp = edit(etherparse::TcpHeader::new(sport, dport, 0, 64000));
    ip.set_payload_len(tcp.header_len() + payload.len()).unwrap();
    let mut tcp = tcp;
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).unwrap();
    let mut out = Vec::new();
    etherparse::Ethernet2Header {
        source: [2; 6],
        destination: [4; 6],
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut out)
    .unwrap();
    ip.write(&mut out).unwrap();
    tcp.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

fn seq_ack(mut tcp: etherparse::TcpHeader, seq: u32, ack: u32, syn: bool) -> etherparse::TcpHeader {
    tcp.sequence_number = seq;
    tcp.acknowledgment_number = ack;
    tcp.ack = true;
    tcp.syn = syn;
    tcp
}

fn with_ts(mut tcp: etherparse::TcpHeader, value: u32, echo: u32) -> etherparse::TcpHeader {
    tcp.set_options(&[
        etherparse::TcpOptionElement::Noop,
        etherparse::TcpOptionElement::Noop,
        etherparse::TcpOptionElement::Timestamp(value, echo),
    ])
    .unwrap();
    tcp
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn flows_left_to_the_kernel_pass_and_are_measured() {
    use oasis_common::monitor_event as kind;
    use std::time::{Duration, Instant};
    // A rule that would divert the flow: a pinned flow passes anyway.
    let set = rules(&[spec(Some("tcp"), None, Some("443"), None)]);
    let mut dp = datapath(set.rules());
    let mut pins = dp.take_pins().expect("pins");
    let mut events = dp.take_monitor_events().expect("ring buffer");
    let key = v4_key([203, 0, 113, 9], 6, 40000, 443);
    pins.pin(&key, 1, true).unwrap();
    pins.measure(&key, Some(Instant::now() - Duration::from_millis(30)), false)
        .unwrap();
    assert_eq!(pins.measured(), 1);

    // The handshake's answer: a round trip of the SYN's age.
    let synack = segment(false, |t| seq_ack(with_ts(t, 900, 0), 5000, 1, true), b"");
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &synack);
    let got = drain(&mut events);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].kind, got[0].key), (kind::SYN_ACK, key));
    assert!(
        (30_000_000..1_000_000_000).contains(&got[0].rtt_ns()),
        "{} ns",
        got[0].rtt_ns()
    );
    assert!(pins.answered(&key));

    // Data with a timestamp passes; its echo is a round trip (one sample
    // per 100 ms: the handshake was the last).
    std::thread::sleep(Duration::from_millis(110));
    let data = |seq: u32| {
        segment(
            true,
            move |t| seq_ack(with_ts(t, 1000 + seq, 900), seq, 5001, false),
            &[7u8; 1000],
        )
    };
    let (verdict, _) = run_out(dp.program(EGRESS_PROGRAM).unwrap(), &data(1));
    assert_eq!(verdict, TC_ACT_OK, "passes, though a rule claims it");
    let echo = segment(false, |t| seq_ack(with_ts(t, 901, 1001), 5001, 1001, false), b"");
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &echo);
    let got = drain(&mut events);
    assert_eq!(got.iter().map(|e| e.kind).collect::<Vec<_>>(), [kind::TS_RTT]);

    // The same segment again counts as sent again; counts come once a second.
    run_out(dp.program(EGRESS_PROGRAM).unwrap(), &data(1001));
    run_out(dp.program(EGRESS_PROGRAM).unwrap(), &data(1001));
    std::thread::sleep(Duration::from_millis(1100));
    let ack = segment(false, |t| seq_ack(with_ts(t, 902, 2001), 5001, 2001, false), b"");
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &ack);
    let got = drain(&mut events);
    let counts = got.iter().find(|e| e.kind == kind::COUNTS).expect("counts");
    assert_eq!(
        (counts.segments(), counts.resent(), counts.bytes()),
        (3, 1, 2000),
        "{counts:?}"
    );

    // A reset and an ICMP error about the flow are reported.
    let reset = segment(
        false,
        |mut t| {
            t.rst = true;
            t
        },
        b"",
    );
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &reset);
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(CLIENT, [203, 0, 113, 9], 64)
        .tcp(40000, 443, 1, 1000)
        .write(&mut quoted, b"")
        .unwrap();
    let mut unreachable = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4([192, 0, 2, 1], CLIENT, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ))
        .write(&mut unreachable, &quoted[..28])
        .unwrap();
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &unreachable);
    let kinds: Vec<u32> = drain(&mut events).iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [kind::RESET, kind::UNREACHABLE]);

    // Forgotten: nothing is measured any more.
    pins.forget(&key);
    assert_eq!(pins.measured(), 0);
    assert!(!pins.answered(&key));
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &echo);
    assert!(drain(&mut events).is_empty());
    let counters = dp.counters();
    assert!(
        counters.measured_egress >= 3 && counters.measured_ingress >= 5,
        "{counters:?}"
    );
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn a_measured_fake_address_flow_sends_its_syn_again_to_the_broker() {
    const FAKE: [u8; 4] = [198, 18, 0, 7];
    const REAL: [u8; 4] = [192, 0, 2, 10];
    let mut dp = datapath(&[]);
    dp.set_fake_pools(
        "198.18.0.0/15".parse().unwrap(),
        "fd4f:4153:4953::/48".parse().unwrap(),
    )
    .unwrap();
    let mut nat = dp.take_nat().expect("NAT maps");
    let mut pins = dp.take_pins().expect("pins");
    nat.install(&v4_key(FAKE, 6, 40000, 80), FAKE.into(), REAL.into(), true)
        .unwrap();
    pins.measure(&v4_key(REAL, 6, 40000, 80), None, false).unwrap();
    assert_eq!(
        run(&dp, &tcp4(FAKE, 40000, 80, false)),
        TC_ACT_OK,
        "rewritten in the kernel"
    );
    assert_eq!(
        run(&dp, &tcp4(FAKE, 40000, 80, true)),
        TC_ACT_REDIRECT,
        "a SYN again: the broker's"
    );
    assert_eq!(dp.counters().measured_egress, 1);
}

#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn a_diverted_flow_the_broker_pins_passes_from_its_next_packet() {
    let set = rules(&[spec(Some("tcp"), None, Some("443"), None)]);
    let mut dp = datapath(set.rules());
    let mut pins = dp.take_pins().expect("pins");
    let syn = tcp4([203, 0, 113, 9], 40000, 443, true);
    let data = tcp4([203, 0, 113, 9], 40000, 443, false);
    // The first packet goes to the broker, which leaves the flow to the
    // kernel; nothing this CPU remembers of the first verdict may shadow it.
    assert_eq!(run(&dp, &syn), TC_ACT_REDIRECT);
    let key = v4_key([203, 0, 113, 9], 6, 40000, 443);
    pins.pin(&key, 1, false).unwrap();
    for _ in 0..3 {
        assert_eq!(run(&dp, &data), TC_ACT_OK);
    }
    // Every packet is its rule's, also those this CPU's recent flow
    // would pass by itself.
    assert_eq!(dp.rule_counters(1).packets, 4);
    assert_eq!(dp.counters().measured_egress, 0, "nothing measured");
    assert!(pins.last_seen(&key).is_some_and(|seen| !seen.closing));
    // Its FIN, in the kernel: the broker learns the flow is closing.
    let fin = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(CLIENT, [203, 0, 113, 9], 64)
            .tcp(40000, 443, 1, 64000)
            .ack(1)
            .fin()
            .write(&mut out, b"")
            .unwrap();
        out
    };
    assert_eq!(run(&dp, &fin), TC_ACT_OK);
    assert!(pins.last_seen(&key).is_some_and(|seen| seen.closing));
    // A server's reset, arriving, which this host never answers: the same.
    let other = v4_key([203, 0, 113, 9], 6, 40001, 443);
    pins.pin(&other, 1, false).unwrap();
    let reset = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([4; 6], [2; 6])
            .ipv4([203, 0, 113, 9], CLIENT, 64)
            .tcp(443, 40001, 1, 64000)
            .rst()
            .write(&mut out, b"")
            .unwrap();
        out
    };
    assert!(pins.last_seen(&other).is_some_and(|seen| !seen.closing));
    run_out(dp.program(INGRESS_PROGRAM).unwrap(), &reset);
    assert!(pins.last_seen(&other).is_some_and(|seen| seen.closing));
    // Forgotten, the flow is the rules' again.
    pins.forget(&key);
    assert_eq!(run(&dp, &data), TC_ACT_REDIRECT);
    // A SYN again is always matched afresh: the broker sees it.
    pins.pin(&key, 1, false).unwrap();
    assert_eq!(run(&dp, &syn), TC_ACT_REDIRECT);
}

fn ping4(dst: [u8; 4], id: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(CLIENT, dst, 64)
        .icmpv4_echo_request(id, 1)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet, no
/// link header), with a correct checksum.
fn icmp4_error(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let kind = match icmp_type {
        3 => etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::from_values(code, 1280).unwrap(),
        ),
        _ => etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
    };
    let mut out = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4(src, dst, 64)
        .icmpv4(kind)
        .write(&mut out, &quoted[..quoted.len().min(28)])
        .unwrap();
    out
}

/// Each ping session is a flow of its own (keyed by its identifier), as in
/// the broker and the exit: a new ping meets the rules of now, a running
/// one keeps its verdict.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn ping_sessions_are_flows_of_their_own() {
    const SERVER: [u8; 4] = [203, 0, 113, 9];
    let icmp = rules(&[spec(Some("icmp"), None, None, None)]);
    let mut dp = datapath(icmp.rules());
    assert_eq!(run(&dp, &ping4(SERVER, 1)), TC_ACT_REDIRECT);
    // The rule is gone: session 2 passes, session 1 keeps its carrier.
    dp.apply(&compile(&[])).unwrap();
    assert_eq!(run(&dp, &ping4(SERVER, 2)), TC_ACT_OK);
    assert_eq!(run(&dp, &ping4(SERVER, 1)), TC_ACT_REDIRECT);
    // A port rule never takes an echo for its identifier.
    let port = rules(&[spec(None, None, Some("3"), None)]);
    dp.apply(&compile(port.rules())).unwrap();
    assert_eq!(run(&dp, &ping4(SERVER, 3)), TC_ACT_OK);
    assert_eq!(run(&dp, &udp4(SERVER, 40000, 3)), TC_ACT_REDIRECT);
}

/// An ICMP error this host sends about a claimed flow (a port unreachable
/// answering a datagram that came over an overlay) goes where the flow
/// goes, not out on the underlay from this host's own address; an error
/// about any other flow passes, and starts no flow.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn an_icmp_error_follows_the_flow_it_quotes() {
    const SERVER: [u8; 4] = [203, 0, 113, 9];
    let set = rules(&[spec(Some("udp"), None, Some("5300"), None)]);
    let dp = datapath(set.rules());
    assert_eq!(run(&dp, &udp4(SERVER, 40000, 5300)), TC_ACT_REDIRECT);
    // The server's answer, as the host received it; the host answers it
    // with a port unreachable.
    let mut answer = Vec::new();
    PacketBuilder::ipv4(SERVER, CLIENT, 64)
        .udp(5300, 40000)
        .write(&mut answer, b"answer")
        .unwrap();
    let mut error = icmp4_error(CLIENT, SERVER, 3, 3, &answer);
    error[..6].copy_from_slice(&[4; 6]);
    assert_eq!(run(&dp, &error), TC_ACT_REDIRECT);
    // About a flow no rule claimed: it passes.
    let mut other = Vec::new();
    PacketBuilder::ipv4(SERVER, CLIENT, 64)
        .udp(5301, 40001)
        .write(&mut other, b"answer")
        .unwrap();
    let stray = icmp4_error(CLIENT, SERVER, 3, 3, &other);
    assert_eq!(run(&dp, &stray), TC_ACT_OK);
    // It started nothing: the flow it quotes is matched afresh, as new.
    let classified = dp.counters().classified;
    assert_eq!(run(&dp, &udp4(SERVER, 40001, 5301)), TC_ACT_OK);
    assert_eq!(dp.counters().classified, classified + 1);
}

/// A router's "fragmentation needed" about an in-kernel NAT flow quotes
/// the packet as it left, with the real address: the ingress program
/// gives it the fake address the application knows, checksums right.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn an_icmp_error_about_a_nat_flow_quotes_the_fake_address() {
    const FAKE: [u8; 4] = [198, 18, 0, 7];
    const REAL: [u8; 4] = [192, 0, 2, 10];
    const ROUTER: [u8; 4] = [192, 0, 2, 254];
    let mut dp = datapath(&[]);
    dp.set_fake_pools(
        "198.18.0.0/15".parse().unwrap(),
        "fd4f:4153:4953::/48".parse().unwrap(),
    )
    .unwrap();
    let mut nat = dp.take_nat().expect("NAT maps");
    nat.install(&v4_key(FAKE, 6, 40000, 80), FAKE.into(), REAL.into(), false)
        .unwrap();
    let mut sent = Vec::new();
    PacketBuilder::ipv4(CLIENT, REAL, 64)
        .tcp(40000, 80, 1, 64000)
        .ack(1)
        .write(&mut sent, &[0u8; 1400])
        .unwrap();
    for from in [ROUTER, REAL] {
        let error = icmp4_error(from, CLIENT, 3, 4, &sent);
        let (verdict, out) = run_out(dp.program(INGRESS_PROGRAM).unwrap(), &error);
        assert_eq!(verdict, TC_ACT_OK);
        let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("not IPv4")
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let expected_source = if from == REAL { FAKE } else { ROUTER };
        assert_eq!(header.source, expected_source);
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
            panic!("not ICMP")
        };
        assert_eq!(
            icmp.checksum(),
            icmp.icmp_type().calc_checksum(icmp.payload()),
            "ICMP checksum"
        );
        let quoted = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload()).expect("the quoted header");
        assert_eq!((quoted.source(), quoted.destination()), (CLIENT, FAKE));
        let quoted = quoted.to_header();
        assert_eq!(quoted.header_checksum, quoted.calc_header_checksum());
    }
}

/// This process in a cgroup of its own (two levels below the root, so
/// an ancestor can be named too) while it lives; back in the one it came
/// from afterwards, the cgroups removed, also when the test fails.
struct OwnCgroup {
    came_from: std::path::PathBuf,
    top: std::path::PathBuf,
    path: String,
}

impl OwnCgroup {
    fn enter() -> OwnCgroup {
        use oasis_broker::sender::cgroup_root;
        let root = cgroup_root(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
            .expect("a cgroup v2 hierarchy");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .trim()
            .to_string();
        let came_from = root.join(own.trim_start_matches('/'));
        let name = format!("oasis-t-{}-sender", std::process::id());
        let top = root.join(&name);
        let inner = top.join("app.scope");
        std::fs::create_dir_all(&inner).unwrap_or_else(|e| panic!("creating {}: {e}", inner.display()));
        let cgroup = OwnCgroup {
            came_from,
            top,
            path: format!("{name}/app.scope"),
        };
        std::fs::write(inner.join("cgroup.procs"), std::process::id().to_string())
            .expect("joining the cgroup");
        cgroup
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.came_from.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(self.top.join("app.scope"));
        let _ = std::fs::remove_dir(&self.top);
    }
}

/// Sender rules, with the socket BPF_PROG_TEST_RUN gives each packet: made
/// in this process's cgroup, owned by root. A uid, a cgroup or an
/// ancestor of it must match; another uid, another cgroup, one that does
/// not exist now, or an application that never connected must not.
#[test]
#[ignore = "needs root and BPF: run with `cargo xtask test`"]
fn sender_rules_match_the_packets_socket() {
    use oasis_broker::compile::compile_for;
    use oasis_broker::sender::{CgroupPath, cgroup_ids, host_cgroup_id};
    let cgroup = OwnCgroup::enter();
    let own = cgroup.path.clone();
    let top = own.trim_start_matches('/').split('/').next().unwrap().to_string();
    let sender = |port: &str, uid: Option<&str>, cgroup: Option<&str>, app: Option<&str>| RuleSpec {
        proto: Some("tcp".into()),
        dport: Some(port.into()),
        uid: uid.map(Into::into),
        cgroup: cgroup.map(Into::into),
        app: app.map(Into::into),
        via: "underlay".into(),
        ..RuleSpec::default()
    };
    let set = rules(&[
        sender("80", Some("0"), None, None),
        sender("81", Some("4242"), None, None),
        sender("82", None, Some(&own), None),
        sender("83", None, Some(&top), None),
        sender("84", None, Some("oasis-no-such-cgroup/below"), None),
        sender("85", Some("0"), Some(&own), Some("no-such-app")),
        sender("86", Some("4242"), Some(&own), None),
    ]);
    let ids = cgroup_ids(set.rules(), host_cgroup_id);
    assert!(ids.contains_key(&CgroupPath::parse(&own).unwrap()), "{ids:?}");
    let datapath = datapath(set.rules());
    let mut datapath = datapath;
    datapath.apply(&compile_for(set.rules(), &ids)).unwrap();
    for (port, diverted) in [
        (80, true),
        (81, false),
        (82, true),
        (83, true),
        (84, false),
        (85, false),
        (86, false),
    ] {
        let verdict = run(&datapath, &tcp4([203, 0, 113, 9], 40_000 + port, port, true));
        assert_eq!(
            verdict == TC_ACT_REDIRECT,
            diverted,
            "dport {port}: verdict {verdict}"
        );
    }
    // The same rules compiled without the cgroups' ids: none of them can
    // match (a unit not started yet has no sockets either).
    datapath.apply(&compile(set.rules())).unwrap();
    let verdict = run(&datapath, &tcp4([203, 0, 113, 9], 41_082, 82, true));
    assert_eq!(verdict, TC_ACT_OK);
}
