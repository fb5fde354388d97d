//! The broker's DNS service: answers every query the host's applications
//! send (the kernel's socket hooks bring them here), with fake addresses
//! for names a rule claims and the upstream's true answer for the rest.

pub mod ask;
pub mod batch;
pub mod cache;
pub mod carrier;
pub mod explicit;
pub mod guard;
pub mod journal;
pub mod listen;
pub mod message;
pub mod policy;
pub mod reuse;
pub mod server;
pub mod udp;
pub mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use reuse::Outcome;

pub use crate::control::DnsCountersView;

/// Query counters, for `oasis status` and `oasis rule list`.
#[derive(Default)]
pub struct DnsCounters {
    pub queries: AtomicU64,
    pub faked: AtomicU64,
    pub passed: AtomicU64,
    pub empty: AtomicU64,
    pub negative: AtomicU64,
    pub servfail: AtomicU64,
    pub truncated: AtomicU64,
    pub refused: AtomicU64,
    pub exhausted: AtomicU64,
    pub monitor_real: AtomicU64,
    pub explicit: AtomicU64,
    pub loops: AtomicU64,
    pub reused: AtomicU64,
    /// Fake answers per name rule id.
    by_rule: Mutex<HashMap<u32, u64>>,
}

impl DnsCounters {
    /// Adds what a DNS thread counted over a batch, and clears it.
    pub fn add(&self, tally: &mut Tally) {
        let add = |counter: &AtomicU64, n: &mut u64| {
            if *n > 0 {
                counter.fetch_add(std::mem::take(n), Relaxed);
            }
        };
        add(&self.reused, &mut tally.reused);
        add(&self.explicit, &mut tally.explicit);
        add(&self.faked, &mut tally.faked);
        add(&self.passed, &mut tally.passed);
        add(&self.negative, &mut tally.negative);
        add(&self.empty, &mut tally.empty);
        if !tally.by_rule.is_empty() {
            let mut by_rule = self.by_rule.lock().unwrap_or_else(|e| e.into_inner());
            for (rule, n) in tally.by_rule.drain(..) {
                *by_rule.entry(rule).or_default() += n;
            }
        }
    }

    pub fn answered_for(&self, rule: u32) {
        *self
            .by_rule
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(rule)
            .or_default() += 1;
    }

    pub fn answers_for(&self, rule: u32) -> u64 {
        self.by_rule
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rule)
            .copied()
            .unwrap_or(0)
    }

    pub fn view(&self) -> DnsCountersView {
        DnsCountersView {
            queries: self.queries.load(Relaxed),
            faked: self.faked.load(Relaxed),
            passed: self.passed.load(Relaxed),
            empty: self.empty.load(Relaxed),
            negative: self.negative.load(Relaxed),
            servfail: self.servfail.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            refused: self.refused.load(Relaxed),
            exhausted: self.exhausted.load(Relaxed),
            monitor_real: self.monitor_real.load(Relaxed),
            explicit: self.explicit.load(Relaxed),
            loops: self.loops.load(Relaxed),
            reused: self.reused.load(Relaxed),
        }
    }
}

/// Kept answers a DNS thread gave again, counted over one batch and added
/// to the shared [`DnsCounters`] once: a counter the threads share, added
/// to per query, moves its cache line between cores every time, and the
/// per-rule counts sit behind a lock.
#[derive(Default)]
pub struct Tally {
    reused: u64,
    explicit: u64,
    faked: u64,
    passed: u64,
    negative: u64,
    empty: u64,
    /// Few rules per batch: a short list beats a map.
    by_rule: Vec<(u32, u64)>,
}

impl Tally {
    /// A kept answer with this outcome was given again, counted as the
    /// full answer counted it.
    pub fn again(&mut self, outcome: &Outcome, explicit: bool) {
        self.reused += 1;
        self.explicit += u64::from(explicit);
        match outcome {
            Outcome::Faked { rule, .. } => {
                self.faked += 1;
                match self.by_rule.iter_mut().find(|(r, _)| r == rule) {
                    Some((_, n)) => *n += 1,
                    None => self.by_rule.push((*rule, 1)),
                }
            }
            Outcome::Passed => self.passed += 1,
            Outcome::Negative => self.negative += 1,
            Outcome::Empty => self.empty += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_adds_what_it_counted_once() {
        let counters = DnsCounters::default();
        let mut tally = Tally::default();
        let faked = |rule| Outcome::Faked {
            rule,
            fake: "198.18.0.1".parse().unwrap(),
            name: "a.test".into(),
        };
        tally.again(&faked(3), false);
        tally.again(&faked(3), true);
        tally.again(&faked(9), false);
        tally.again(&Outcome::Passed, false);
        tally.again(&Outcome::Negative, false);
        tally.again(&Outcome::Empty, true);
        counters.add(&mut tally);
        let view = counters.view();
        assert_eq!(
            (
                view.reused,
                view.explicit,
                view.faked,
                view.passed,
                view.negative,
                view.empty
            ),
            (6, 2, 3, 1, 1, 1)
        );
        assert_eq!((counters.answers_for(3), counters.answers_for(9)), (2, 1));
        // Added once: a second add of the same tally adds nothing.
        counters.add(&mut tally);
        assert_eq!(counters.view().reused, 6);
        assert_eq!(counters.answers_for(3), 2);
    }
}
