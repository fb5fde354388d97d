//! What the upstream said, kept for as long as its TTLs allow. The broker
//! answers most queries from here without an await, so a cached query costs
//! one hash lookup beside parsing and encoding (hickory-resolver has a cache
//! too, but reaching it takes a future per query).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Record, RecordType};

/// Negative answers without an SOA to say otherwise are kept this long.
const NEGATIVE_DEFAULT: Duration = Duration::from_secs(30);
/// No answer is kept longer, whatever its TTL says.
const LONGEST: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    Records(Vec<Record>),
    Negative {
        code: ResponseCode,
        soa: Option<Box<Record>>,
    },
    Failed,
}

impl Upstream {
    /// What a server's response says: its records (answers, and the
    /// additional section where an address may hide), or why there are
    /// none, with the SOA that says how long that holds.
    pub fn from_response(response: &Message) -> Upstream {
        if response.response_code() == ResponseCode::NoError && !response.answers().is_empty() {
            let mut records = response.answers().to_vec();
            records.extend(response.additionals().iter().cloned());
            return Upstream::Records(records);
        }
        Upstream::Negative {
            code: response.response_code(),
            soa: response
                .name_servers()
                .iter()
                .find(|r| r.record_type() == RecordType::SOA)
                .map(|soa| Box::new(soa.clone())),
        }
    }

    /// How long the answer may be reused; None for what must not be.
    fn lifetime(&self) -> Option<Duration> {
        let secs = match self {
            Upstream::Records(records) => records.iter().map(Record::ttl).min()?,
            Upstream::Negative { soa: Some(soa), .. } => soa.ttl(),
            Upstream::Negative { soa: None, .. } => return Some(NEGATIVE_DEFAULT),
            Upstream::Failed => return None,
        };
        (secs > 0).then(|| Duration::from_secs(u64::from(secs)).min(LONGEST))
    }

    /// The answer as it stands `age` after it was received: TTLs count down.
    fn aged(&self, age: Duration) -> Upstream {
        let age = u32::try_from(age.as_secs()).unwrap_or(u32::MAX);
        let mut aged = self.clone();
        match &mut aged {
            Upstream::Records(records) => {
                for record in records {
                    record.set_ttl(record.ttl().saturating_sub(age));
                }
            }
            Upstream::Negative { soa: Some(soa), .. } => {
                soa.set_ttl(soa.ttl().saturating_sub(age));
            }
            _ => {}
        }
        aged
    }
}

struct Entry {
    upstream: Upstream,
    stored: Instant,
    expires: Instant,
}

/// Answers by lower-case name, then type, bounded. Keyed by the name alone
/// so that a lookup borrows the query's name instead of building a key; a
/// name rarely has more than two types cached (A and AAAA).
pub struct AnswerCache {
    entries: HashMap<Box<str>, Vec<(RecordType, Entry)>>,
    len: usize,
    capacity: usize,
}

impl AnswerCache {
    pub fn new(capacity: usize) -> AnswerCache {
        AnswerCache {
            entries: HashMap::with_capacity(capacity.min(65_536)),
            len: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Forgets every answer (the upstream servers changed).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.len = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cached answer, TTLs aged, if still valid at `now`, and when it
    /// expires.
    pub fn get(&self, name: &str, qtype: RecordType, now: Instant) -> Option<(Upstream, Instant)> {
        let (_, entry) = self.entries.get(name)?.iter().find(|(t, _)| *t == qtype)?;
        (now < entry.expires).then(|| (entry.upstream.aged(now - entry.stored), entry.expires))
    }

    /// Keeps `upstream` for as long as it says; returns until when, or
    /// None for an answer that is not kept.
    pub fn put(
        &mut self,
        name: &str,
        qtype: RecordType,
        upstream: &Upstream,
        now: Instant,
    ) -> Option<Instant> {
        let lifetime = upstream.lifetime()?;
        if self.len >= self.capacity {
            self.retain_names(|types| types.retain(|(_, e)| e.expires > now));
        }
        if self.len >= self.capacity {
            // Still full of live answers: drop about half of the names,
            // whichever they are; the next queries for them go upstream again.
            let mut keep = false;
            self.retain_names(|types| {
                keep = !keep;
                if !keep {
                    types.clear();
                }
            });
        }
        let entry = Entry {
            upstream: upstream.clone(),
            stored: now,
            expires: now + lifetime,
        };
        let types = match self.entries.get_mut(name) {
            Some(types) => types,
            None => self.entries.entry(name.into()).or_default(),
        };
        let expires = entry.expires;
        match types.iter_mut().find(|(t, _)| *t == qtype) {
            Some((_, old)) => *old = entry,
            None => {
                types.push((qtype, entry));
                self.len += 1;
            }
        }
        Some(expires)
    }

    /// Lets `edit` trim each name's entries, forgets names left with none,
    /// and recounts.
    fn retain_names(&mut self, mut edit: impl FnMut(&mut Vec<(RecordType, Entry)>)) {
        let mut len = 0;
        self.entries.retain(|_, types| {
            edit(types);
            len += types.len();
            !types.is_empty()
        });
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData};
    use std::str::FromStr;

    fn a(ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_str("www.example.").unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        )
    }

    #[test]
    fn answers_live_as_long_as_their_shortest_ttl_and_age() {
        let start = Instant::now();
        let mut cache = AnswerCache::new(10);
        let answer = Upstream::Records(vec![a(300), a(60)]);
        cache.put("www.example", RecordType::A, &answer, start);
        let (later, expires) = cache
            .get("www.example", RecordType::A, start + Duration::from_secs(20))
            .unwrap();
        assert_eq!(expires, start + Duration::from_secs(60));
        let Upstream::Records(records) = later else {
            panic!("records")
        };
        assert_eq!(records.iter().map(Record::ttl).collect::<Vec<_>>(), vec![280, 40]);
        assert!(
            cache
                .get("www.example", RecordType::A, start + Duration::from_secs(61))
                .is_none()
        );
        assert!(cache.get("www.example", RecordType::AAAA, start).is_none());
    }

    #[test]
    fn failures_and_zero_ttls_are_not_kept() {
        let now = Instant::now();
        let mut cache = AnswerCache::new(10);
        cache.put("a", RecordType::A, &Upstream::Failed, now);
        cache.put("b", RecordType::A, &Upstream::Records(vec![a(0)]), now);
        assert!(cache.is_empty());
        let nx = Upstream::Negative {
            code: ResponseCode::NXDomain,
            soa: None,
        };
        cache.put("c", RecordType::A, &nx, now);
        assert_eq!(cache.get("c", RecordType::A, now).map(|(u, _)| u), Some(nx));
    }

    #[test]
    fn a_full_cache_makes_room() {
        let now = Instant::now();
        let mut cache = AnswerCache::new(8);
        for i in 0..100 {
            cache.put(
                &format!("n{i}"),
                RecordType::A,
                &Upstream::Records(vec![a(60)]),
                now,
            );
            assert!(cache.len() <= 8);
        }
        assert!(cache.get("n99", RecordType::A, now).is_some());
    }

    #[test]
    fn each_type_of_a_name_is_its_own_answer() {
        let now = Instant::now();
        let mut cache = AnswerCache::new(8);
        let nx = Upstream::Negative {
            code: ResponseCode::NXDomain,
            soa: None,
        };
        cache.put("www.example", RecordType::A, &Upstream::Records(vec![a(60)]), now);
        cache.put("www.example", RecordType::AAAA, &nx, now);
        assert_eq!(cache.len(), 2);
        // A newer answer replaces the old one of its type only.
        cache.put("www.example", RecordType::A, &Upstream::Records(vec![a(30)]), now);
        assert_eq!(cache.len(), 2);
        let Some((Upstream::Records(records), _)) = cache.get("www.example", RecordType::A, now) else {
            panic!("records")
        };
        assert_eq!(records[0].ttl(), 30);
        assert_eq!(
            cache.get("www.example", RecordType::AAAA, now).map(|(u, _)| u),
            Some(nx)
        );
        // Expired answers are what a full cache drops first.
        let later = now + Duration::from_secs(31);
        for i in 0..7 {
            cache.put(
                &format!("n{i}"),
                RecordType::A,
                &Upstream::Records(vec![a(600)]),
                later,
            );
        }
        assert!(cache.len() <= 8);
        assert!(cache.get("www.example", RecordType::A, later).is_none());
        assert!(cache.get("n6", RecordType::A, later).is_some());
    }
}
