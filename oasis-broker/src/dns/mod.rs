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

use serde::{Deserialize, Serialize};

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

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsCountersView {
    pub queries: u64,
    /// Answered with a fake address.
    pub faked: u64,
    /// Answered with the upstream's records.
    pub passed: u64,
    /// Claimed names asked for types that would leak the real address.
    pub empty: u64,
    /// NXDOMAIN or no data, as the upstream said.
    pub negative: u64,
    /// Upstream failed or timed out.
    pub servfail: u64,
    /// Too big for the client's UDP size: sent with TC so it retries on TCP.
    pub truncated: u64,
    /// Not a standard query (opcode, several questions).
    pub refused: u64,
    /// No fake address free: every one is held by a live flow.
    pub exhausted: u64,
    /// Names of metric rules answered truly: the Monitor gives their
    /// flows the underlay (of those counted as passed).
    #[serde(default)]
    pub monitor_real: u64,
    /// Queries sent to a server other than the host's own, answered by
    /// that server (or faked, for claimed names).
    #[serde(default)]
    pub explicit: u64,
    /// Queries that came back from our own upstream (a loop through a
    /// local stub), answered SERVFAIL to break it.
    #[serde(default)]
    pub loops: u64,
    /// Answered from the bytes a DNS thread kept of the same question's
    /// answer (counted under their kind as well).
    #[serde(default)]
    pub reused: u64,
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
