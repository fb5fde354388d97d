//! Estimators of one path's quality, fed with samples as they come:
//! round-trip time as TCP estimates it (RFC 6298), the minimum round trip
//! of the last minutes, loss over recent outcomes, and goodput. Each knows
//! when it last learnt something; figures older than the caller's limit
//! count as none.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// RFC 6298's gains: srtt moves 1/8 of the way to each sample, rttvar 1/4.
const ALPHA: f64 = 1.0 / 8.0;
const BETA: f64 = 1.0 / 4.0;
/// The minimum round trip covers this long, in buckets of a tenth of it.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(300);
const MIN_RTT_BUCKETS: usize = 10;
/// Loss is counted over at most this many outcomes, and none older than
/// [`LOSS_WINDOW`].
pub const LOSS_OUTCOMES: u64 = 200;
pub const LOSS_WINDOW: Duration = Duration::from_secs(60);
/// Each goodput sample moves the estimate this far.
const GOODPUT_GAIN: f64 = 0.25;

/// Smoothed round-trip time and its variation, and the recent minimum.
#[derive(Clone, Debug, Default)]
pub struct Rtt {
    /// Seconds.
    srtt: f64,
    rttvar: f64,
    samples: u64,
    updated: Option<Instant>,
    /// (bucket start, minimum in it), oldest first.
    minima: VecDeque<(Instant, Duration)>,
}

impl Rtt {
    /// A round-trip sample. Callers leave out samples of retransmitted
    /// segments (Karn's rule): which copy was answered is unknown.
    pub fn sample(&mut self, rtt: Duration, now: Instant) {
        let r = rtt.as_secs_f64();
        if self.samples == 0 {
            self.srtt = r;
            self.rttvar = r / 2.0;
        } else {
            self.rttvar = (1.0 - BETA) * self.rttvar + BETA * (self.srtt - r).abs();
            self.srtt = (1.0 - ALPHA) * self.srtt + ALPHA * r;
        }
        self.samples += 1;
        self.updated = Some(now);
        let bucket = MIN_RTT_WINDOW / MIN_RTT_BUCKETS as u32;
        match self.minima.back_mut() {
            Some((start, min)) if now.saturating_duration_since(*start) < bucket => {
                *min = (*min).min(rtt);
            }
            _ => self.minima.push_back((now, rtt)),
        }
        while self
            .minima
            .front()
            .is_some_and(|(start, _)| now.saturating_duration_since(*start) > MIN_RTT_WINDOW)
        {
            self.minima.pop_front();
        }
    }

    pub fn srtt(&self) -> Option<Duration> {
        (self.samples > 0).then(|| Duration::from_secs_f64(self.srtt))
    }

    pub fn rttvar(&self) -> Option<Duration> {
        (self.samples > 0).then(|| Duration::from_secs_f64(self.rttvar))
    }

    /// The smallest sample of the last five minutes.
    pub fn min(&self, now: Instant) -> Option<Duration> {
        self.minima
            .iter()
            .filter(|(start, _)| now.saturating_duration_since(*start) <= MIN_RTT_WINDOW)
            .map(|(_, min)| *min)
            .min()
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn updated(&self) -> Option<Instant> {
        self.updated
    }
}

/// Outcomes of packets or probes that should have been answered: how many
/// went, how many of them were lost, in time-stamped buckets.
#[derive(Clone, Debug, Default)]
pub struct Loss {
    /// (when, sent, lost), oldest first.
    buckets: VecDeque<(Instant, u64, u64)>,
    updated: Option<Instant>,
}

impl Loss {
    /// `sent` outcomes of which `lost` were losses.
    pub fn outcomes(&mut self, sent: u64, lost: u64, now: Instant) {
        if sent == 0 {
            return;
        }
        let lost = lost.min(sent);
        match self.buckets.back_mut() {
            Some((at, s, l)) if *at == now => {
                *s += sent;
                *l += lost;
            }
            _ => self.buckets.push_back((now, sent, lost)),
        }
        self.updated = Some(now);
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > LOSS_WINDOW)
        {
            self.buckets.pop_front();
        }
        // Keep no more buckets than the newest LOSS_OUTCOMES need.
        let mut sent = 0;
        let mut keep = 0;
        for (_, s, _) in self.buckets.iter().rev() {
            keep += 1;
            sent += s;
            if sent >= LOSS_OUTCOMES {
                break;
            }
        }
        while self.buckets.len() > keep {
            self.buckets.pop_front();
        }
    }

    /// (loss rate, outcomes it is over) for the newest [`LOSS_OUTCOMES`]
    /// outcomes of the last [`LOSS_WINDOW`]; None without any.
    pub fn rate(&self, now: Instant) -> Option<(f64, u64)> {
        let (mut sent, mut lost) = (0.0f64, 0.0f64);
        for (at, s, l) in self.buckets.iter().rev() {
            if now.saturating_duration_since(*at) > LOSS_WINDOW {
                break;
            }
            let room = LOSS_OUTCOMES as f64 - sent;
            if room <= 0.0 {
                break;
            }
            // The oldest bucket counts in proportion to the room left.
            let share = (room / *s as f64).min(1.0);
            sent += *s as f64 * share;
            lost += *l as f64 * share;
        }
        (sent > 0.0).then(|| (lost / sent, sent.round() as u64))
    }

    pub fn updated(&self) -> Option<Instant> {
        self.updated
    }
}

/// Goodput of long transfers, in bits per second.
#[derive(Clone, Debug, Default)]
pub struct Goodput {
    bps: f64,
    samples: u64,
    updated: Option<Instant>,
}

impl Goodput {
    pub fn sample(&mut self, bits_per_second: f64, now: Instant) {
        if !bits_per_second.is_finite() || bits_per_second <= 0.0 {
            return;
        }
        self.bps = if self.samples == 0 {
            bits_per_second
        } else {
            (1.0 - GOODPUT_GAIN) * self.bps + GOODPUT_GAIN * bits_per_second
        };
        self.samples += 1;
        self.updated = Some(now);
    }

    pub fn bps(&self) -> Option<f64> {
        (self.samples > 0).then_some(self.bps)
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn updated(&self) -> Option<Instant> {
        self.updated
    }
}

/// The Mathis model: the rate a long TCP flow sustains over a path of this
/// round trip and loss, `MSS / RTT × sqrt(3/2) / sqrt(p)`. What a path
/// promises before any transfer over it was measured. `loss` should not be
/// zero (callers use a prior); the result is capped at 10 Gbit/s.
pub fn mathis_bps(rtt: Duration, loss: f64, mss: u32) -> f64 {
    let rtt = rtt.as_secs_f64().max(1e-5);
    let p = loss.max(1e-6);
    let bps = f64::from(mss) * 8.0 / rtt * (1.5f64).sqrt() / p.sqrt();
    bps.min(10e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rtt_follows_rfc_6298() {
        let t = Instant::now();
        let mut rtt = Rtt::default();
        assert_eq!(rtt.srtt(), None);
        rtt.sample(ms(100), t);
        assert_eq!(rtt.srtt(), Some(ms(100)));
        assert_eq!(rtt.rttvar(), Some(ms(50)));
        rtt.sample(ms(200), t + ms(10));
        // rttvar = 3/4·50 + 1/4·|100−200| = 62.5; srtt = 7/8·100 + 1/8·200 = 112.5
        assert_eq!(rtt.srtt().unwrap().as_micros(), 112_500);
        assert_eq!(rtt.rttvar().unwrap().as_micros(), 62_500);
        assert_eq!(rtt.samples(), 2);
        assert_eq!(rtt.updated(), Some(t + ms(10)));
    }

    #[test]
    fn the_minimum_forgets_samples_older_than_five_minutes() {
        let t = Instant::now();
        let mut rtt = Rtt::default();
        rtt.sample(ms(10), t);
        for i in 1..=20 {
            rtt.sample(ms(30), t + Duration::from_secs(i * 10));
        }
        assert_eq!(rtt.min(t + Duration::from_secs(200)), Some(ms(10)));
        for i in 21..=40 {
            rtt.sample(ms(30), t + Duration::from_secs(i * 10));
        }
        assert_eq!(rtt.min(t + Duration::from_secs(400)), Some(ms(30)));
    }

    #[test]
    fn loss_counts_the_newest_outcomes_of_the_last_minute() {
        let t = Instant::now();
        let mut loss = Loss::default();
        assert_eq!(loss.rate(t), None);
        // 1000 old outcomes, all lost: beyond the newest 200 once 200 new
        // ones arrive.
        loss.outcomes(1000, 1000, t);
        loss.outcomes(100, 0, t + ms(1));
        let (rate, n) = loss.rate(t + ms(1)).unwrap();
        assert_eq!(n, 200);
        assert!((rate - 0.5).abs() < 1e-9, "{rate}");
        loss.outcomes(200, 10, t + ms(2));
        assert_eq!(loss.rate(t + ms(2)), Some((0.05, 200)));
        // A minute later nothing counts.
        assert_eq!(loss.rate(t + Duration::from_secs(63)), None);
        loss.outcomes(0, 0, t + ms(3));
        assert_eq!(loss.updated(), Some(t + ms(2)), "no outcomes, no update");
    }

    #[test]
    fn goodput_is_smoothed() {
        let t = Instant::now();
        let mut g = Goodput::default();
        g.sample(100e6, t);
        g.sample(200e6, t);
        assert_eq!(g.bps(), Some(125e6));
        g.sample(f64::NAN, t);
        g.sample(0.0, t);
        assert_eq!(g.samples(), 2);
    }

    #[test]
    fn mathis_falls_with_round_trip_and_loss() {
        let fast = mathis_bps(ms(10), 0.01, 1448);
        // 1448·8/0.01 · 1.2247/0.1 ≈ 14.2 Mbit/s
        assert!((fast / 1e6 - 14.19).abs() < 0.05, "{fast}");
        assert!(mathis_bps(ms(40), 0.01, 1448) < fast / 3.9);
        assert!(mathis_bps(ms(10), 0.04, 1448) < fast / 1.9);
        assert_eq!(mathis_bps(ms(0), 0.0, 1448), 10e9);
    }
}
