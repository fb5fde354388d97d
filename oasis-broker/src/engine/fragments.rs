//! Fragments of diverted datagrams. Only a datagram's first fragment has
//! ports, so only it meets the rules and the flow table; the later ones
//! (the classifier diverts them after the first, see `OASIS_FRAGMENTS`)
//! must take the same way, rewritten the same way, or the datagram never
//! arrives whole. One table per packet thread, like the flow table: a
//! datagram's fragments hash to one queue.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use oasis_common::FragKey;

use super::outbound::Outbound;

/// As long as Linux keeps fragments for reassembly (ipfrag_time).
pub const FRAGMENT_LIFETIME: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragRoute {
    /// What was done with the first fragment.
    pub outbound: Outbound,
    /// Its new destination, when the first was rewritten (a fake address's
    /// real one).
    pub destination: Option<IpAddr>,
    at: Instant,
}

#[derive(Debug)]
pub struct Fragments {
    routes: HashMap<FragKey, FragRoute>,
    capacity: usize,
}

impl Fragments {
    pub fn new(capacity: usize) -> Fragments {
        Fragments {
            routes: HashMap::with_capacity(capacity),
            capacity,
        }
    }

    /// The first fragment of `datagram` went out as `outbound`. When the
    /// table is full of datagrams still in flight, the new one is not
    /// remembered and its later fragments are dropped (counted): never sent
    /// another way.
    pub fn first(
        &mut self,
        datagram: FragKey,
        outbound: Outbound,
        destination: Option<IpAddr>,
        now: Instant,
    ) {
        if !matches!(
            outbound,
            Outbound::Underlay | Outbound::Overlay { .. } | Outbound::Module { .. }
        ) {
            return;
        }
        if self.routes.len() >= self.capacity {
            self.expire(now);
        }
        if self.routes.len() < self.capacity {
            self.routes.insert(
                datagram,
                FragRoute {
                    outbound,
                    destination,
                    at: now,
                },
            );
        }
    }

    /// Where a later fragment goes, if its first went out.
    pub fn later(&self, datagram: &FragKey, now: Instant) -> Option<FragRoute> {
        self.routes
            .get(datagram)
            .filter(|route| now.saturating_duration_since(route.at) < FRAGMENT_LIFETIME)
            .copied()
    }

    pub fn expire(&mut self, now: Instant) {
        self.routes
            .retain(|_, route| now.saturating_duration_since(route.at) < FRAGMENT_LIFETIME);
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}
