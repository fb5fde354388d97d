//! Active probes: what to send through which carrier, and when. A probe
//! goes to a real destination that had a flow of a metric rule lately (a
//! TCP SYN to the flow's port, answered by SYN-ACK and reset; an ICMP echo
//! for other protocols), so it measures the path flows take.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::path::Prefix;
use crate::overlay::Via;

/// How a probe asks for an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// A SYN to this port; the SYN-ACK (or a reset) is the answer.
    TcpSyn { dport: u16 },
    /// An echo request.
    Echo,
}

/// Where probes for a prefix go: the destination of a recent flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    pub dst: IpAddr,
    pub kind: ProbeKind,
}

impl ProbeTarget {
    /// A flow's destination as a probe target.
    pub fn of_flow(dst: IpAddr, proto: u8, dport: u16) -> ProbeTarget {
        let kind = if proto == oasis_common::proto::TCP && dport != 0 {
            ProbeKind::TcpSyn { dport }
        } else {
            ProbeKind::Echo
        };
        ProbeTarget { dst, kind }
    }

    /// The probe's IP packet size.
    pub fn packet_bytes(&self) -> u32 {
        let ip = if self.dst.is_ipv4() { 20 } else { 40 };
        match self.kind {
            // A SYN with MSS, SACK-permitted, timestamps and window scale.
            ProbeKind::TcpSyn { .. } => ip + 40,
            // Echo header and 16 bytes of payload.
            ProbeKind::Echo => ip + 8 + 16,
        }
    }
}

/// A probe for the packet shell to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRequest {
    /// Names the probe in the answer the shell reports.
    pub id: u64,
    pub via: Via,
    pub target: ProbeTarget,
    /// Bytes it costs on the wire, encapsulation included (the budget's unit).
    pub bytes: u32,
}

/// A probe on its way.
#[derive(Clone, Copy, Debug)]
pub struct Outstanding {
    pub via: Via,
    pub prefix: Prefix,
    pub sent: Instant,
    pub deadline: Instant,
    /// A liveness probe: unanswered, it counts against the carrier.
    pub liveness: bool,
}

/// How long a probe may take: three smoothed round trips, within 1 to 3 s.
pub fn timeout(srtt: Option<Duration>) -> Duration {
    srtt.map_or(Duration::from_secs(1), |rtt| rtt * 3)
        .clamp(Duration::from_secs(1), Duration::from_secs(3))
}

/// A jitter of ±20% for idle liveness probes, so carriers joined together
/// are not probed in step. Deterministic per (carrier, round).
pub fn jittered(interval: Duration, via: Via, round: u64) -> Duration {
    let seed = match via {
        Via::Underlay => 1,
        Via::Overlay(id) => u64::from(id.0) + 2,
        Via::Unavailable => 0,
    };
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    let unit = (x % 10_000) as f64 / 10_000.0; // 0..1
    interval.mul_f64(0.8 + 0.4 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OverlayId;

    #[test]
    fn targets_follow_the_flow() {
        let dst: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            ProbeTarget::of_flow(dst, 6, 443).kind,
            ProbeKind::TcpSyn { dport: 443 }
        );
        assert_eq!(ProbeTarget::of_flow(dst, 17, 3478).kind, ProbeKind::Echo);
        assert_eq!(ProbeTarget::of_flow(dst, 6, 443).packet_bytes(), 60);
        let v6 = ProbeTarget::of_flow("2001:db8::1".parse().unwrap(), 1, 0);
        assert_eq!(v6.packet_bytes(), 64);
    }

    #[test]
    fn timeouts_and_jitter_stay_in_bounds() {
        assert_eq!(timeout(None), Duration::from_secs(1));
        assert_eq!(
            timeout(Some(Duration::from_millis(500))),
            Duration::from_millis(1500)
        );
        assert_eq!(timeout(Some(Duration::from_secs(5))), Duration::from_secs(3));
        let base = Duration::from_secs(30);
        let all: Vec<Duration> = (0..100)
            .map(|round| jittered(base, Via::Overlay(OverlayId(3)), round))
            .collect();
        assert!(
            all.iter()
                .all(|d| *d >= base.mul_f64(0.8) && *d <= base.mul_f64(1.2))
        );
        assert!(all.iter().any(|d| *d != all[0]), "it varies");
    }
}
