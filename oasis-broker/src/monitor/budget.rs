//! The probe budget: at most so many probes and so many bytes a second,
//! all carriers together, as two token buckets that hold one second's
//! worth. A probe goes only when both have room for it.

use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Budget {
    probes_per_second: f64,
    bytes_per_second: f64,
    probes: f64,
    bytes: f64,
    refilled: Instant,
    /// Spent since the start, for `oasis monitor`.
    pub spent_probes: u64,
    pub spent_bytes: u64,
}

impl Budget {
    pub fn new(probes_per_second: u32, bytes_per_second: u32, now: Instant) -> Budget {
        Budget {
            probes_per_second: f64::from(probes_per_second),
            bytes_per_second: f64::from(bytes_per_second),
            probes: f64::from(probes_per_second),
            bytes: f64::from(bytes_per_second),
            refilled: now,
            spent_probes: 0,
            spent_bytes: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now.max(self.refilled);
        self.probes = (self.probes + elapsed * self.probes_per_second).min(self.probes_per_second);
        self.bytes = (self.bytes + elapsed * self.bytes_per_second).min(self.bytes_per_second);
    }

    /// Takes one probe of `bytes` if the budget has room for it now.
    pub fn take(&mut self, bytes: u32, now: Instant) -> bool {
        self.refill(now);
        let bytes_f = f64::from(bytes);
        if self.probes < 1.0 || self.bytes < bytes_f {
            return false;
        }
        self.probes -= 1.0;
        self.bytes -= bytes_f;
        self.spent_probes += 1;
        self.spent_bytes += u64::from(bytes);
        true
    }

    pub fn limits(&self) -> (f64, f64) {
        (self.probes_per_second, self.bytes_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn never_more_than_the_rates_allow() {
        let t = Instant::now();
        let mut budget = Budget::new(20, 8000, t);
        // Over 10 s of asking every millisecond for 100-byte probes.
        let mut sent = 0;
        for ms in 0..10_000 {
            if budget.take(100, t + Duration::from_millis(ms)) {
                sent += 1;
            }
        }
        // 20 a second, plus the first second's bucket.
        assert!((200..=220).contains(&sent), "{sent}");
        // Bytes bind first for large probes: 8000 B/s of 1000-byte probes.
        let mut budget = Budget::new(20, 8000, t);
        let big = (0..10_000)
            .filter(|ms| budget.take(1000, t + Duration::from_millis(*ms)))
            .count();
        assert!((80..=88).contains(&big), "{big}");
        assert_eq!(budget.spent_bytes, big as u64 * 1000);
    }
}
