//! The broker's DNS service: answers every query the host's applications
//! send (the kernel's socket hooks bring them here), with fake addresses
//! for names a rule claims and the upstream's true answer for the rest.

pub mod batch;
pub mod cache;
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
