//! Answers given again: each DNS thread keeps the bytes it sent, keyed by
//! the question (wire.rs), and answers the same question by copying them,
//! fitted to the new query (ID, flags, the case of its name) with the TTLs
//! counted down. No message is parsed or built, nothing is allocated, and
//! no lock is taken but the fake table's for a fake address (to check it
//! still stands for the name, and to note its use, as a full answer does).
//!
//! An answer is kept only while what made it holds: the upstream's answer
//! it came from is live (its expiry is the kept answer's), and nothing the
//! answer depends on changed (the service's epoch: name rules, upstreams).
//! What depends on more (the Monitor's choices, fake addresses found in an
//! upstream's answer, truncation) is never kept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use super::wire::{self, QueryView};

/// Most answers a thread keeps; a full cache starts again from empty
/// (every answer in it is also in the shared answer cache).
const CAPACITY: usize = 16_384;

/// What an answer was, for the counters and for checking it still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A fake address of `rule`, for the name `name`.
    Faked { rule: u32, fake: IpAddr, name: Box<str> },
    /// The upstream's records.
    Passed,
    /// NXDOMAIN or no data, as the upstream said.
    Negative,
    /// A claimed name asked for a type that would leak its address.
    Empty,
}

/// The kept answer's terms, as the one who built it knows them.
#[derive(Clone, Debug)]
pub struct Keep {
    pub outcome: Outcome,
    /// When the answer stops being true.
    pub until: Instant,
    /// Whether its TTLs count down (an upstream's records do; a fake
    /// address's TTL is always the same).
    pub ages: bool,
}

struct Kept {
    bytes: Box<[u8]>,
    ttls: Box<[u16]>,
    keep: Keep,
    stored: Instant,
    epoch: u64,
}

/// How long a server's own response (a server of the application's
/// choosing) holds: its shortest TTL; None for one without records, or
/// with an error other than NXDOMAIN, which is not kept.
pub fn lifetime(response: &[u8]) -> Option<std::time::Duration> {
    let mut ttls = Vec::new();
    wire::ttl_offsets(response, &mut ttls)?;
    if !matches!(wire::response_code(response), 0 | 3) || wire::truncated(response) {
        return None;
    }
    let shortest = ttls.iter().map(|&at| wire::ttl_at(response, at)).min()?;
    (shortest > 0).then(|| std::time::Duration::from_secs(u64::from(shortest.min(3600))))
}

/// The terms a server's own response is kept on.
pub fn raw_keep(response: &[u8], now: Instant) -> Option<Keep> {
    let until = now + lifetime(response)?;
    let answered = wire::response_code(response) == 0 && wire::answer_count(response) > 0;
    Some(Keep {
        outcome: if answered {
            Outcome::Passed
        } else {
            Outcome::Negative
        },
        until,
        ages: true,
    })
}

/// One thread's kept answers.
#[derive(Default)]
pub struct Answers {
    kept: HashMap<Box<[u8]>, Kept>,
}

impl Answers {
    /// Writes the answer to `query` (its bytes and what `view` read of
    /// them) into `out` if one is kept and still holds by `epoch` and
    /// `now`, and says what it was; `holds` is asked last, for what only
    /// the service can tell (a fake address still the name's).
    pub fn answer(
        &mut self,
        query: &[u8],
        view: &QueryView,
        epoch: u64,
        now: Instant,
        holds: impl FnOnce(&Outcome) -> bool,
        out: &mut Vec<u8>,
    ) -> Option<&Outcome> {
        let kept = self.kept.get(view.key())?;
        let holds = kept.epoch == epoch && now < kept.keep.until && holds(&kept.keep.outcome);
        if !holds {
            self.kept.remove(view.key());
            return None;
        }
        let kept = self.kept.get(view.key())?;
        out.clear();
        out.extend_from_slice(&kept.bytes);
        wire::fit(out, query, view);
        if kept.keep.ages {
            let age = u32::try_from(now.duration_since(kept.stored).as_secs()).unwrap_or(u32::MAX);
            if age > 0 {
                for &at in kept.ttls.iter() {
                    let ttl = wire::ttl_at(out, at).saturating_sub(age);
                    wire::set_ttl(out, at, ttl);
                }
            }
        }
        Some(&kept.keep.outcome)
    }

    /// Keeps `bytes`, the answer to the query `view` read, on `keep`'s
    /// terms; an answer whose records cannot be found is not kept.
    pub fn keep(&mut self, view: &QueryView, bytes: &[u8], keep: Keep, epoch: u64, now: Instant) {
        let mut ttls = Vec::new();
        if now >= keep.until || wire::ttl_offsets(bytes, &mut ttls).is_none() {
            return;
        }
        if self.kept.len() >= CAPACITY {
            self.kept.clear();
        }
        self.kept.insert(
            view.key().into(),
            Kept {
                bytes: bytes.into(),
                ttls: ttls.into(),
                keep,
                stored: now,
                epoch,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;
    use std::time::Duration;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(id);
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        message.to_vec().unwrap()
    }

    fn answer(name: &str, ttl: u32) -> Vec<u8> {
        let mut message = Message::new();
        message.set_id(1).set_message_type(MessageType::Response);
        let name = Name::from_str(name).unwrap();
        message.add_query(Query::query(name.clone(), RecordType::A));
        message.add_answer(Record::from_rdata(name, ttl, RData::A(A::new(192, 0, 2, 7))));
        message.to_vec().unwrap()
    }

    fn passed(until: Instant) -> Keep {
        Keep {
            outcome: Outcome::Passed,
            until,
            ages: true,
        }
    }

    #[test]
    fn a_kept_answer_is_fitted_to_each_asker_and_ages() {
        let mut answers = Answers::default();
        let t0 = Instant::now();
        let first = query(1, "www.example.test.");
        let view = wire::read_query(&first).unwrap();
        answers.keep(
            &view,
            &answer("www.example.test.", 300),
            passed(t0 + Duration::from_secs(300)),
            7,
            t0,
        );
        let again = query(2, "WWW.example.test.");
        let view = wire::read_query(&again).unwrap();
        let later = t0 + Duration::from_secs(100);
        let mut bytes = Vec::new();
        let outcome = answers
            .answer(&again, &view, 7, later, |_| true, &mut bytes)
            .unwrap();
        assert_eq!(*outcome, Outcome::Passed);
        let reply = Message::from_vec(&bytes).unwrap();
        assert_eq!(reply.id(), 2);
        assert_eq!(reply.queries()[0].name().to_string(), "WWW.example.test.");
        assert_eq!(reply.answers()[0].ttl(), 200);
    }

    #[test]
    fn an_answer_is_not_given_past_its_terms() {
        let mut answers = Answers::default();
        let t0 = Instant::now();
        let asked = query(1, "a.test.");
        let view = wire::read_query(&asked).unwrap();
        let until = t0 + Duration::from_secs(10);
        answers.keep(&view, &answer("a.test.", 10), passed(until), 1, t0);
        // Another epoch (rules or upstreams changed), expiry, or the
        // service's word: gone, and not given again.
        assert!(
            answers
                .answer(&asked, &view, 2, t0, |_| true, &mut Vec::new())
                .is_none()
        );
        assert!(answers.is_empty());
        answers.keep(&view, &answer("a.test.", 10), passed(until), 1, t0);
        assert!(
            answers
                .answer(&asked, &view, 1, until, |_| true, &mut Vec::new())
                .is_none()
        );
        answers.keep(&view, &answer("a.test.", 10), passed(until), 1, t0);
        assert!(
            answers
                .answer(&asked, &view, 1, t0, |_| false, &mut Vec::new())
                .is_none()
        );
        assert!(
            answers
                .answer(&asked, &view, 1, t0, |_| true, &mut Vec::new())
                .is_none()
        );
        // Expired already, or not a response: never kept.
        answers.keep(&view, &answer("a.test.", 10), passed(t0), 1, t0);
        answers.keep(&view, &asked, passed(until), 1, t0);
        assert!(answers.is_empty());
    }
}
