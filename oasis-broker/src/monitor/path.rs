//! What the Monitor knows of one carrier towards one destination prefix:
//! the figures of [`estimate`](super::estimate), and the prefix itself.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::estimate::{Goodput, Loss, Rtt, mathis_bps};

/// Destinations are measured by prefix: a /24 for IPv4, a /48 for IPv6,
/// the usual unit of routing, so a flow to a host next to one measured
/// before is decided by what was learnt there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    V4([u8; 3]),
    V6([u8; 6]),
}

impl Prefix {
    pub fn of(addr: IpAddr) -> Prefix {
        match addr.to_canonical() {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                Prefix::V4([o[0], o[1], o[2]])
            }
            IpAddr::V6(v6) => {
                let o = v6.octets();
                Prefix::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::V4(o) => write!(f, "{}.{}.{}.0/24", o[0], o[1], o[2]),
            Prefix::V6(o) => {
                let mut bytes = [0u8; 16];
                bytes[..6].copy_from_slice(o);
                write!(f, "{}/48", std::net::Ipv6Addr::from(bytes))
            }
        }
    }
}

/// The TCP segment size the throughput estimate assumes.
const MSS: u32 = 1448;

/// One carrier's figures towards one prefix.
#[derive(Clone, Debug, Default)]
pub struct PathFigures {
    pub rtt: Rtt,
    pub loss: Loss,
    pub goodput: Goodput,
    /// Probe bytes sent for this path, for the budget's report.
    pub probe_bytes: u64,
}

/// The figures as they stand, with stale ones left out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub srtt: Option<Duration>,
    pub rttvar: Option<Duration>,
    pub min_rtt: Option<Duration>,
    pub rtt_samples: u64,
    /// (rate, outcomes it is over).
    pub loss: Option<(f64, u64)>,
    pub goodput_bps: Option<f64>,
    /// Since the path last learnt anything.
    pub age: Option<Duration>,
}

impl PathFigures {
    /// The figures at `now`; any not refreshed within `stale` count as none.
    pub fn figures(&self, now: Instant, stale: Duration) -> Figures {
        let fresh = |at: Option<Instant>| at.is_some_and(|at| now.saturating_duration_since(at) <= stale);
        let rtt_fresh = fresh(self.rtt.updated());
        let latest = [self.rtt.updated(), self.loss.updated(), self.goodput.updated()]
            .into_iter()
            .flatten()
            .max();
        Figures {
            srtt: self.rtt.srtt().filter(|_| rtt_fresh),
            rttvar: self.rtt.rttvar().filter(|_| rtt_fresh),
            min_rtt: self.rtt.min(now).filter(|_| rtt_fresh),
            rtt_samples: self.rtt.samples(),
            loss: self.loss.rate(now).filter(|_| fresh(self.loss.updated())),
            goodput_bps: self.goodput.bps().filter(|_| fresh(self.goodput.updated())),
            age: latest.map(|at| now.saturating_duration_since(at)),
        }
    }
}

impl Figures {
    /// Loss with a prior: a path that answered `n` of `n` probes is not
    /// taken to lose nothing, only fewer than one in about 2n.
    pub fn loss_estimate(&self) -> Option<f64> {
        let (rate, n) = self.loss?;
        let lost = rate * n as f64;
        Some((lost + 0.5) / (n as f64 + 1.0))
    }

    /// What a long TCP transfer would get: measured goodput when there is
    /// some, else the Mathis model over the round trip and loss.
    pub fn throughput(&self, measured: bool) -> Option<f64> {
        if measured {
            return self.goodput_bps;
        }
        Some(mathis_bps(self.srtt?, self.loss_estimate()?, MSS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_slash_24_and_slash_48() {
        let a = Prefix::of("203.0.113.7".parse().unwrap());
        assert_eq!(a, Prefix::of("203.0.113.200".parse().unwrap()));
        assert_ne!(a, Prefix::of("203.0.114.7".parse().unwrap()));
        assert_eq!(a.to_string(), "203.0.113.0/24");
        assert_eq!(Prefix::of("::ffff:203.0.113.9".parse().unwrap()), a);
        let b = Prefix::of("2001:db8:1:2::5".parse().unwrap());
        assert_eq!(b, Prefix::of("2001:db8:1:ffff::1".parse().unwrap()));
        assert_eq!(b.to_string(), "2001:db8:1::/48");
    }

    #[test]
    fn stale_figures_count_as_none() {
        let t = Instant::now();
        let mut path = PathFigures::default();
        path.rtt.sample(Duration::from_millis(20), t);
        path.loss.outcomes(10, 0, t);
        let stale = Duration::from_secs(600);
        let now = path.figures(t + Duration::from_secs(1), stale);
        assert_eq!(now.srtt, Some(Duration::from_millis(20)));
        assert_eq!(now.loss, Some((0.0, 10)));
        let later = path.figures(t + Duration::from_secs(601), stale);
        assert_eq!((later.srtt, later.loss), (None, None));
        assert_eq!(later.age, Some(Duration::from_secs(601)));
    }

    #[test]
    fn throughput_before_transfers_is_the_mathis_estimate() {
        let figures = Figures {
            srtt: Some(Duration::from_millis(10)),
            loss: Some((0.0, 49)),
            ..Figures::default()
        };
        // No loss in 49 outcomes counts as 1%.
        assert!((figures.loss_estimate().unwrap() - 0.01).abs() < 1e-12);
        let estimate = figures.throughput(false).unwrap();
        assert!((estimate / 1e6 - 14.19).abs() < 0.05, "{estimate}");
        assert_eq!(figures.throughput(true), None, "nothing measured");
        let none = Figures::default();
        assert_eq!(none.throughput(false), None);
    }
}
