//! Whether a carrier works at all. A carrier is down after
//! [`MISSED_TO_DOWN`] liveness probes in a row went unanswered, or when
//! [`SYN_FAILURES_TO_DOWN`] of its new TCP flows retransmitted their SYN
//! without an answer within [`SYN_FAILURE_WINDOW`]. New flows leave a down
//! carrier at once; the first answer through it brings it back.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const MISSED_TO_DOWN: u32 = 2;
pub const SYN_FAILURES_TO_DOWN: usize = 2;
pub const SYN_FAILURE_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default)]
pub struct Health {
    down_since: Option<Instant>,
    missed: u32,
    syn_failures: VecDeque<Instant>,
    last_answer: Option<Instant>,
    /// Why it went down last, for `oasis monitor`.
    pub reason: Option<DownReason>,
    /// How often it went down.
    pub downs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownReason {
    MissedProbes,
    SynFailures,
}

impl DownReason {
    pub fn text(self) -> &'static str {
        match self {
            DownReason::MissedProbes => "liveness probes unanswered",
            DownReason::SynFailures => "new connections unanswered",
        }
    }
}

/// A change of a carrier's state, for the log and for publishing choices
/// at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Down(DownReason),
    Up,
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.down_since.is_none()
    }

    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    pub fn last_answer(&self) -> Option<Instant> {
        self.last_answer
    }

    /// Anything came back through the carrier: a probe's answer, a packet
    /// of one of its flows.
    pub fn answered(&mut self, now: Instant) -> Option<Change> {
        self.missed = 0;
        self.syn_failures.clear();
        self.last_answer = Some(now);
        self.down_since.take().map(|_| Change::Up)
    }

    /// A liveness probe went unanswered.
    pub fn missed(&mut self, now: Instant) -> Option<Change> {
        self.missed += 1;
        (self.missed >= MISSED_TO_DOWN).then(|| self.down(now, DownReason::MissedProbes))?
    }

    /// A new TCP flow retransmitted its SYN, unanswered.
    pub fn syn_failed(&mut self, now: Instant) -> Option<Change> {
        self.syn_failures.push_back(now);
        while self
            .syn_failures
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > SYN_FAILURE_WINDOW)
        {
            self.syn_failures.pop_front();
        }
        (self.syn_failures.len() >= SYN_FAILURES_TO_DOWN).then(|| self.down(now, DownReason::SynFailures))?
    }

    fn down(&mut self, now: Instant, reason: DownReason) -> Option<Change> {
        if self.down_since.is_some() {
            return None;
        }
        self.down_since = Some(now);
        self.reason = Some(reason);
        self.downs += 1;
        Some(Change::Down(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_missed_probes_take_a_carrier_down_and_an_answer_brings_it_back() {
        let t = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.missed(t), None);
        assert!(health.is_up());
        assert_eq!(health.missed(t), Some(Change::Down(DownReason::MissedProbes)));
        assert_eq!(health.missed(t), None, "already down");
        assert_eq!(health.down_since(), Some(t));
        assert_eq!(health.answered(t), Some(Change::Up));
        assert_eq!(health.answered(t), None);
        // An answer between misses resets the count.
        health.missed(t);
        health.answered(t);
        assert_eq!(health.missed(t), None);
        assert_eq!(health.downs, 1);
    }

    #[test]
    fn syn_failures_count_within_two_seconds() {
        let t = Instant::now();
        let mut health = Health::default();
        assert_eq!(health.syn_failed(t), None);
        assert_eq!(
            health.syn_failed(t + Duration::from_millis(2500)),
            None,
            "too far apart"
        );
        assert_eq!(
            health.syn_failed(t + Duration::from_millis(3000)),
            Some(Change::Down(DownReason::SynFailures))
        );
        assert_eq!(health.reason, Some(DownReason::SynFailures));
    }
}
