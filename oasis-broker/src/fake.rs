//! The fake-address table (for DNS-name rules): a name a rule claims is
//! answered with an address from a fake pool, and the broker maps it back
//! to the real address per flow. The table is bounded; when the pool is
//! used up, the least recently used address is given to the new name,
//! unless a live flow still uses it. It serialises, so answers that
//! applications cached survive a daemon restart.
//!
//! Time is a number of seconds the caller passes in, so the table is a
//! plain value with no clock of its own.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Seconds since the epoch: the table's clock, which must survive restarts.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One fake address and what it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FakeEntry {
    pub fake: IpAddr,
    pub name: String,
    /// The real addresses the upstream resolver gave (same family).
    pub real: Vec<IpAddr>,
    /// The carrier chosen for the name (a rule's `via`).
    pub carrier: String,
    /// The name a rule claimed, when it is not `name` itself but a name
    /// `name` is an alias of (a CNAME chain): flows take that rule's carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<String>,
    /// When the entry was last handed out or used.
    pub last_used: u64,
    /// Flows using the address now: while any, it is never reused.
    #[serde(default)]
    pub live_flows: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FakeError {
    #[error("the fake pool is exhausted: all {0} addresses are in use by live flows")]
    Exhausted(usize),
    #[error("no fake pool of this address family is configured")]
    NoPool,
}

/// The pool and its table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeTable {
    v4: Ipv4Net,
    v6: Ipv6Net,
    /// Most entries per family (the v6 pool is far larger than useful).
    capacity: usize,
    entries: HashMap<IpAddr, FakeEntry>,
    #[serde(skip)]
    by_name: HashMap<(String, bool), IpAddr>,
    /// Real address → the fake addresses standing for it (several names
    /// may share a real address).
    #[serde(skip)]
    by_real: HashMap<IpAddr, Vec<IpAddr>>,
    /// (last_used, address) of entries without live flows: eviction order.
    #[serde(skip)]
    idle: BTreeSet<(u64, IpAddr)>,
    /// Entries per family, IPv4 then IPv6.
    #[serde(skip)]
    counts: [usize; 2],
    next_v4: u32,
    next_v6: u128,
    /// Bumped whenever a name gets an address or new real addresses, so
    /// the daemon knows when the table needs saving; saved with it, so the
    /// journal's later entries are told from those the file holds.
    #[serde(default)]
    changes: u64,
}

/// One answer that changed the table, as the journal keeps it: written
/// before the answer leaves, so no crash forgets an address a client may
/// hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// The table's change count after this answer.
    pub seq: u64,
    pub entry: FakeEntry,
}

impl FakeTable {
    pub fn new(v4: Ipv4Net, v6: Ipv6Net, capacity: usize) -> FakeTable {
        FakeTable {
            v4: v4.trunc(),
            v6: v6.trunc(),
            capacity,
            entries: HashMap::new(),
            by_name: HashMap::new(),
            by_real: HashMap::new(),
            idle: BTreeSet::new(),
            counts: [0, 0],
            next_v4: 1,
            next_v6: 1,
            changes: 0,
        }
    }

    /// The pools (IPv4, IPv6) the addresses come from.
    pub fn pools(&self) -> (Ipv4Net, Ipv6Net) {
        (self.v4, self.v6)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// A counter that moves whenever an answer changes.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Makes a table read from disk fit the configuration: a table from
    /// other pools is useless (its addresses are no longer diverted).
    pub fn adopt(mut self, v4: Ipv4Net, v6: Ipv6Net, capacity: usize) -> Option<FakeTable> {
        if self.v4 != v4.trunc() || self.v6 != v6.trunc() {
            return None;
        }
        self.capacity = capacity;
        for entry in self.entries.values_mut() {
            // No flow survives a restart of the broker.
            entry.live_flows = 0;
        }
        self.reindex();
        Some(self)
    }

    /// Rebuilds the indexes after deserialising.
    pub fn reindex(&mut self) {
        self.by_name.clear();
        self.by_real.clear();
        self.idle.clear();
        self.counts = [0, 0];
        for entry in self.entries.values() {
            self.counts[usize::from(entry.fake.is_ipv6())] += 1;
            self.by_name
                .insert((entry.name.clone(), entry.fake.is_ipv6()), entry.fake);
            for real in &entry.real {
                self.by_real.entry(*real).or_default().push(entry.fake);
            }
            if entry.live_flows == 0 {
                self.idle.insert((entry.last_used, entry.fake));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, fake: IpAddr) -> Option<&FakeEntry> {
        self.entries.get(&fake)
    }

    /// The fake addresses standing for `real`.
    pub fn fakes_of(&self, real: IpAddr) -> &[IpAddr] {
        self.by_real.get(&real).map_or(&[], Vec::as_slice)
    }

    fn index_reals(&mut self, fake: IpAddr, reals: &[IpAddr], add: bool) {
        for real in reals {
            if add {
                self.by_real.entry(*real).or_default().push(fake);
            } else if let Some(fakes) = self.by_real.get_mut(real) {
                fakes.retain(|f| *f != fake);
                if fakes.is_empty() {
                    self.by_real.remove(real);
                }
            }
        }
    }

    pub fn entries(&self) -> impl Iterator<Item = &FakeEntry> {
        self.entries.values()
    }

    /// Applies journal entries newer than the table (in order of `seq`):
    /// each name gets back the address it was given, whatever held it
    /// before, and fresh addresses are handed out past them.
    pub fn replay(&mut self, mut journal: Vec<Assigned>) -> usize {
        journal.sort_by_key(|a| a.seq);
        let mut applied = 0;
        for Assigned { seq, mut entry } in journal {
            if seq <= self.changes || !self.contains(entry.fake) {
                continue;
            }
            let v6 = entry.fake.is_ipv6();
            entry.live_flows = 0;
            if let Some(old) = self.entries.remove(&entry.fake) {
                self.by_name.remove(&(old.name, v6));
                self.counts[usize::from(v6)] -= 1;
            }
            if let Some(stale) = self.by_name.remove(&(entry.name.clone(), v6)) {
                self.entries.remove(&stale);
                self.counts[usize::from(v6)] -= 1;
            }
            match entry.fake {
                IpAddr::V4(v4) => {
                    let offset = u32::from(v4).wrapping_sub(u32::from(self.v4.network()));
                    self.next_v4 = self.next_v4.max(offset.saturating_add(1));
                }
                IpAddr::V6(v6) => {
                    let offset = u128::from(v6).wrapping_sub(u128::from(self.v6.network()));
                    self.next_v6 = self.next_v6.max(offset.saturating_add(1));
                }
            }
            self.by_name.insert((entry.name.clone(), v6), entry.fake);
            self.counts[usize::from(v6)] += 1;
            self.entries.insert(entry.fake, entry);
            self.changes = seq;
            applied += 1;
        }
        self.reindex();
        applied
    }

    fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => self.v4.contains(&v4),
            IpAddr::V6(v6) => self.v6.contains(&v6),
        }
    }

    /// Like [`assign`](Self::assign), for a name whose claim may come from
    /// further down its CNAME chain (`claimed`), and what the journal must
    /// keep when the answer changed the table.
    pub fn assign_journaled(
        &mut self,
        name: &str,
        claimed: Option<&str>,
        v6: bool,
        real: Vec<IpAddr>,
        carrier: &str,
        now: u64,
    ) -> Result<(IpAddr, Option<Assigned>), FakeError> {
        let before = self.changes;
        let fake = self.assign_as(name, claimed, v6, real, carrier, now)?;
        let changed = (self.changes != before).then(|| Assigned {
            seq: self.changes,
            entry: self.entries[&fake].clone(),
        });
        Ok((fake, changed))
    }

    /// The fake address to answer for `name` (IPv6 when `v6`): the same as
    /// before for a name seen before, else a free one, else the least
    /// recently used one no live flow holds.
    pub fn assign(
        &mut self,
        name: &str,
        v6: bool,
        real: Vec<IpAddr>,
        carrier: &str,
        now: u64,
    ) -> Result<IpAddr, FakeError> {
        self.assign_as(name, None, v6, real, carrier, now)
    }

    fn assign_as(
        &mut self,
        name: &str,
        claimed: Option<&str>,
        v6: bool,
        real: Vec<IpAddr>,
        carrier: &str,
        now: u64,
    ) -> Result<IpAddr, FakeError> {
        let claimed = claimed.filter(|c| *c != name).map(str::to_string);
        if let Some(&fake) = self.by_name.get(&(name.to_string(), v6)) {
            self.touch(fake, now);
            let entry = self.entries.get_mut(&fake).expect("indexed");
            if entry.real != real || entry.carrier != carrier || entry.claimed != claimed {
                let old = std::mem::replace(&mut entry.real, real.clone());
                entry.carrier = carrier.to_string();
                entry.claimed = claimed;
                self.changes += 1;
                if old != real {
                    self.index_reals(fake, &old, false);
                    self.index_reals(fake, &real, true);
                }
            }
            return Ok(fake);
        }
        let fake = match self.fresh_address(v6) {
            Some(fake) => fake,
            None => self.evict(v6)?,
        };
        self.index_reals(fake, &real, true);
        let entry = FakeEntry {
            fake,
            name: name.to_string(),
            real,
            carrier: carrier.to_string(),
            claimed,
            last_used: now,
            live_flows: 0,
        };
        self.by_name.insert((entry.name.clone(), v6), fake);
        self.idle.insert((now, fake));
        self.entries.insert(fake, entry);
        self.counts[usize::from(v6)] += 1;
        self.changes += 1;
        Ok(fake)
    }

    /// The name's address given again in a kept answer: true, its use
    /// noted, while `fake` still stands for `name`.
    pub fn answered_again(&mut self, fake: IpAddr, name: &str, now: u64) -> bool {
        match self.entries.get(&fake) {
            Some(entry) if entry.name == name => {
                if entry.last_used != now {
                    self.touch(fake, now);
                }
                true
            }
            _ => false,
        }
    }

    /// Forgets every name's address, unless a live flow holds one: then
    /// nothing changes and the number of addresses held is the error.
    /// Addresses are not handed out again soon after (the pool goes on
    /// from where it was), so an answer an application still caches meets
    /// an unknown address rather than another name's.
    pub fn flush(&mut self) -> Result<usize, usize> {
        let held = self.entries.values().filter(|e| e.live_flows > 0).count();
        if held > 0 {
            return Err(held);
        }
        let forgotten = self.entries.len();
        self.entries.clear();
        self.by_name.clear();
        self.by_real.clear();
        self.idle.clear();
        self.counts = [0, 0];
        self.changes += 1;
        Ok(forgotten)
    }

    /// A flow to `fake` started: its address is pinned until it ends.
    pub fn flow_started(&mut self, fake: IpAddr, now: u64) -> Option<&FakeEntry> {
        let entry = self.entries.get_mut(&fake)?;
        if entry.live_flows == 0 {
            self.idle.remove(&(entry.last_used, fake));
        }
        entry.live_flows += 1;
        entry.last_used = now;
        Some(entry)
    }

    pub fn flow_ended(&mut self, fake: IpAddr, now: u64) {
        if let Some(entry) = self.entries.get_mut(&fake) {
            entry.live_flows = entry.live_flows.saturating_sub(1);
            entry.last_used = now;
            if entry.live_flows == 0 {
                self.idle.insert((now, fake));
            }
        }
    }

    fn touch(&mut self, fake: IpAddr, now: u64) {
        if let Some(entry) = self.entries.get_mut(&fake) {
            if entry.live_flows == 0 {
                self.idle.remove(&(entry.last_used, fake));
                self.idle.insert((now, fake));
            }
            entry.last_used = now;
        }
    }

    fn family_len(&self, v6: bool) -> usize {
        self.counts[usize::from(v6)]
    }

    /// The next never-used address of the pool, while under capacity.
    fn fresh_address(&mut self, v6: bool) -> Option<IpAddr> {
        if v6 {
            let size = 1u128
                .checked_shl(128 - u32::from(self.v6.prefix_len()))
                .unwrap_or(u128::MAX);
            if self.next_v6 >= size || self.family_len(true) >= self.capacity {
                return None;
            }
            let fake = Ipv6Addr::from(u128::from(self.v6.network()) + self.next_v6);
            self.next_v6 += 1;
            Some(IpAddr::V6(fake))
        } else {
            let size = 1u64 << (32 - u32::from(self.v4.prefix_len()));
            if u64::from(self.next_v4) >= size || self.family_len(false) >= self.capacity {
                return None;
            }
            let fake = Ipv4Addr::from(u32::from(self.v4.network()) + self.next_v4);
            self.next_v4 += 1;
            Some(IpAddr::V4(fake))
        }
    }

    /// Frees the least recently used address of the family no flow holds.
    fn evict(&mut self, v6: bool) -> Result<IpAddr, FakeError> {
        let victim = self.idle.iter().find(|(_, addr)| addr.is_ipv6() == v6).copied();
        let Some((last_used, fake)) = victim else {
            return Err(FakeError::Exhausted(self.family_len(v6)));
        };
        self.idle.remove(&(last_used, fake));
        if let Some(old) = self.entries.remove(&fake) {
            self.index_reals(fake, &old.real, false);
            self.by_name.remove(&(old.name, v6));
            self.counts[usize::from(v6)] -= 1;
        }
        Ok(fake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(capacity: usize) -> FakeTable {
        FakeTable::new(
            "198.18.0.0/15".parse().unwrap(),
            "fd00:0a51:5::/64".parse().unwrap(),
            capacity,
        )
    }

    fn real(addr: &str) -> Vec<IpAddr> {
        vec![addr.parse().unwrap()]
    }

    #[test]
    fn a_flush_is_refused_while_a_flow_holds_an_address_and_never_reuses_one_soon() {
        let mut t = table(10);
        let a = t
            .assign("a.example", false, real("192.0.2.1"), "detour", 1)
            .unwrap();
        t.assign("b.example", false, real("192.0.2.2"), "detour", 1)
            .unwrap();
        t.flow_started(a, 2);
        assert_eq!(t.flush(), Err(1));
        assert_eq!(t.len(), 2, "nothing changed");
        t.flow_ended(a, 3);
        let before = t.changes();
        assert_eq!(t.flush(), Ok(2));
        assert!(t.is_empty() && t.get(a).is_none() && t.fakes_of("192.0.2.1".parse().unwrap()).is_empty());
        assert!(t.changes() > before, "the table is saved again");
        let again = t
            .assign("a.example", false, real("192.0.2.1"), "detour", 4)
            .unwrap();
        assert_ne!(again, a);
    }

    #[test]
    fn a_name_keeps_its_fake_address() {
        let mut t = table(10);
        let a = t
            .assign("a.example", false, real("192.0.2.1"), "detour", 1)
            .unwrap();
        let b = t
            .assign("b.example", false, real("192.0.2.2"), "detour", 2)
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(
            t.assign("a.example", false, real("192.0.2.9"), "detour", 3)
                .unwrap(),
            a
        );
        assert_eq!(
            t.get(a).unwrap().real,
            real("192.0.2.9"),
            "the real address follows the resolver"
        );
        assert_eq!(a, "198.18.0.1".parse::<IpAddr>().unwrap());
        let v6 = t
            .assign("a.example", true, real("2001:db8::1"), "detour", 4)
            .unwrap();
        assert!(v6.is_ipv6() && v6.to_string().starts_with("fd00:a51:5::"));
    }

    #[test]
    fn real_addresses_lead_back_to_their_fake_ones() {
        let mut t = table(2);
        let a = t.assign("a", false, real("192.0.2.1"), "x", 1).unwrap();
        let b = t.assign("b", false, real("192.0.2.1"), "x", 2).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(t.fakes_of(ip("192.0.2.1")), [a, b]);
        // The resolver moves a to another address.
        t.assign("a", false, real("192.0.2.7"), "x", 3).unwrap();
        assert_eq!(t.fakes_of(ip("192.0.2.1")), [b]);
        assert_eq!(t.fakes_of(ip("192.0.2.7")), [a]);
        // b's address goes to c: b no longer stands for anything.
        let c = t.assign("c", false, real("192.0.2.9"), "x", 4).unwrap();
        assert_eq!(c, b);
        assert!(t.fakes_of(ip("192.0.2.1")).is_empty());
        assert_eq!(t.fakes_of(ip("192.0.2.9")), [c]);
        // Read back from disk, the index is made again.
        let mut read: FakeTable = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        read.reindex();
        assert_eq!(read.fakes_of(ip("192.0.2.7")), [a]);
    }

    #[test]
    fn a_full_pool_reuses_the_least_recently_used_idle_address() {
        let mut t = table(3);
        let a = t.assign("a", false, vec![], "x", 1).unwrap();
        let b = t.assign("b", false, vec![], "x", 2).unwrap();
        let c = t.assign("c", false, vec![], "x", 3).unwrap();
        t.assign("a", false, vec![], "x", 4).unwrap(); // a is fresh again: b is now the oldest
        let d = t.assign("d", false, vec![], "x", 5).unwrap();
        assert_eq!(d, b);
        assert!(t.get(b).is_some_and(|e| e.name == "d"));
        assert_eq!(
            (t.get(a).unwrap().name.as_str(), t.get(c).unwrap().name.as_str()),
            ("a", "c")
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn live_flows_pin_their_address() {
        let mut t = table(2);
        let a = t.assign("a", false, vec![], "x", 1).unwrap();
        let b = t.assign("b", false, vec![], "x", 2).unwrap();
        t.flow_started(a, 3);
        t.flow_started(b, 3);
        assert_eq!(t.assign("c", false, vec![], "x", 4), Err(FakeError::Exhausted(2)));
        t.flow_ended(b, 5);
        assert_eq!(t.assign("c", false, vec![], "x", 6).unwrap(), b);
        assert_eq!(t.get(a).unwrap().name, "a", "the pinned entry survived");
    }

    #[test]
    fn the_table_survives_a_restart() {
        let mut t = table(10);
        let a = t
            .assign("a.example", false, real("192.0.2.1"), "detour", 1)
            .unwrap();
        let text = serde_json::to_string(&t).unwrap();
        let mut restored: FakeTable = serde_json::from_str(&text).unwrap();
        restored.reindex();
        assert_eq!(
            restored
                .assign("a.example", false, real("192.0.2.1"), "detour", 2)
                .unwrap(),
            a
        );
        let b = restored.assign("b.example", false, vec![], "detour", 3).unwrap();
        assert_ne!(
            b, a,
            "new names do not take an address handed out before the restart"
        );
    }

    #[test]
    fn the_journal_brings_back_answers_the_saved_table_missed() {
        let mut table = table(4);
        table.assign("a.test", false, real("192.0.2.1"), "x", 1).unwrap();
        let saved: FakeTable = serde_json::from_str(&serde_json::to_string(&table).unwrap()).unwrap();
        let mut journal = Vec::new();
        for (name, at) in [("b.test", 2), ("c.test", 3), ("d.test", 4), ("e.test", 5)] {
            let (_, changed) = table
                .assign_journaled(name, None, false, real("192.0.2.2"), "x", at)
                .unwrap();
            journal.push(changed.expect("a new name changes the table"));
        }
        // e.test took a.test's address (the pool of 4 was full).
        let e = table.assign("e.test", false, real("192.0.2.2"), "x", 6).unwrap();
        assert_eq!(saved.entries[&e].name, "a.test");
        // An answer that changes nothing is not journaled.
        let (_, none) = table
            .assign_journaled("e.test", None, false, real("192.0.2.2"), "x", 7)
            .unwrap();
        assert!(none.is_none());

        // The crash: the saved table, then the journal, out of order and
        // with an entry the table already has.
        let mut restored = saved.adopt(table.v4, table.v6, 4).unwrap();
        journal.reverse();
        assert_eq!(restored.replay(journal.clone()), 4);
        for name in ["b.test", "c.test", "d.test", "e.test"] {
            assert_eq!(
                restored.by_name[&(name.to_string(), false)],
                table.by_name[&(name.to_string(), false)]
            );
        }
        assert!(
            !restored.by_name.contains_key(&("a.test".to_string(), false)),
            "its address went to e.test"
        );
        // A new name never gets an address given out before the crash.
        let given: Vec<IpAddr> = table.entries.keys().copied().collect();
        let mut restored_big = restored.clone();
        restored_big.capacity = 100;
        let fresh = restored_big
            .assign("f.test", false, real("192.0.2.3"), "x", 8)
            .unwrap();
        assert!(!given.contains(&fresh), "{fresh} was given out before the crash");
        // Replaying again changes nothing.
        assert_eq!(restored.replay(journal), 0);
    }
}
