//! Names a WireGuard overlay claims, resolved by that overlay's own DNS
//! server (the wg-quick file's `DNS=`), through the tunnel: the local
//! network and its resolver never see them, and the answers are the ones
//! the far network gives (split horizon). The service only builds the
//! question and reads the answer; the carrier moves it (`CarrierDns`, in
//! the daemon a `overlay::tunnel_dns::TunnelDns`). A failure is SERVFAIL,
//! never a question to the upstreams: that would leak the name.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

use super::cache::Upstream;
use super::policy::Plan;
use super::server::DnsService;
use crate::rules::Carrier;

/// A carrier's own DNS server, asked through the carrier.
#[async_trait::async_trait]
pub trait CarrierDns: Send + Sync {
    /// Whether names `overlay` claims are resolved through it.
    fn resolves(&self, overlay: &str) -> bool;
    /// Whether any overlay's names are (while none, no query looks).
    fn any(&self) -> bool;
    /// The server's response to `query` (DNS wire format), within
    /// `budget`; None when none came.
    async fn exchange(&self, overlay: &str, query: Vec<u8>, budget: Duration) -> Option<Vec<u8>>;
}

impl DnsService {
    /// The carrier that resolves the names of `plan`, and the overlay's
    /// name, when its own server does.
    pub(super) fn through_carrier<'p>(&self, plan: &'p Plan) -> Option<(&Arc<dyn CarrierDns>, &'p str)> {
        let Plan::Fake {
            carrier: Carrier::Overlay(overlay),
            ..
        } = plan
        else {
            return None;
        };
        let carriers = self.carriers.get()?;
        carriers.resolves(overlay).then_some((carriers, overlay.as_str()))
    }

    /// Whether `qname` is resolved by its carrier's own server: never by
    /// the upstreams, so no path may ask them.
    pub(super) fn resolved_by_carrier(&self, qname: &Name, qtype: RecordType) -> bool {
        if !self.carriers.get().is_some_and(|c| c.any()) {
            return false;
        }
        let (_, _, plan, _) = self.prepare(qname, qtype, None);
        self.through_carrier(&plan).is_some()
    }

    /// The cache's key for a name resolved through `overlay`: its answers
    /// are the far network's, never mixed with the upstreams'.
    pub(super) fn carrier_key(overlay: &str, key: &str) -> String {
        format!("{overlay}|{key}")
    }

    /// The carrier's server's answer: from the cache, else asked through
    /// the carrier (and cached); and until when it holds.
    pub(super) async fn fetch_through(
        &self,
        carrier: &Arc<dyn CarrierDns>,
        overlay: &str,
        qname: &Name,
        key: &str,
        qtype: RecordType,
        budget: Duration,
    ) -> (Upstream, Option<Instant>) {
        let cache_key = Self::carrier_key(overlay, key);
        if let Some((hit, until)) = self.cached(&cache_key, qtype) {
            return (hit, Some(until));
        }
        let id: u16 = rand::random();
        let question = super::ask::question_of(Query::query(qname.clone(), qtype), id);
        let upstream = match question {
            Some(question) => match carrier.exchange(overlay, question, budget).await {
                Some(bytes) => match Message::from_vec(&bytes) {
                    Ok(response) if response.id() == id => Upstream::from_response(&response),
                    _ => Upstream::Failed,
                },
                None => {
                    tracing::debug!(%overlay, name = %key, ?qtype, "the overlay's DNS server did not answer");
                    Upstream::Failed
                }
            },
            None => Upstream::Failed,
        };
        let until = self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(
            &cache_key,
            qtype,
            &upstream,
            Instant::now(),
        );
        (upstream, until)
    }
}
