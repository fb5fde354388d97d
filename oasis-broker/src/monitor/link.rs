//! The packet threads' line to the Monitor: they report what they see
//! through a bounded queue that never blocks them (a full queue loses the
//! event, counted), and read its decisions from the last published
//! [`Choices`], without a lock on the Monitor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use super::choices::Choices;
use super::probe_table::ProbeTable;
use super::state::Event;
use crate::shared::{Shared, snapshot};

/// Events the queue holds before it drops new ones.
pub const EVENT_QUEUE: usize = 65_536;

pub struct MonitorLink {
    events: SyncSender<(Instant, Event)>,
    choices: Shared<Choices>,
    /// The Monitor's probes on their way, whose answers the return path
    /// picks out.
    pub probes: ProbeTable,
    /// Events lost to a full queue.
    pub dropped: AtomicU64,
}

impl MonitorLink {
    /// A link with no probe ports, and the Monitor's end of its queue.
    pub fn new(capacity: usize) -> (Arc<MonitorLink>, Receiver<(Instant, Event)>) {
        MonitorLink::with_probes(capacity, ProbeTable::new(Vec::new(), 0))
    }

    pub fn with_probes(
        capacity: usize,
        probes: ProbeTable,
    ) -> (Arc<MonitorLink>, Receiver<(Instant, Event)>) {
        let (events, receiver) = sync_channel(capacity);
        let link = MonitorLink {
            events,
            choices: Arc::default(),
            probes,
            dropped: AtomicU64::new(0),
        };
        (Arc::new(link), receiver)
    }

    /// Tells the Monitor what happened at `at`; never waits.
    pub fn report(&self, at: Instant, event: Event) {
        match self.events.try_send((at, event)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Makes `choices` what new flows are decided by.
    pub fn publish(&self, choices: Arc<Choices>) {
        *self.choices.write().unwrap_or_else(|e| e.into_inner()) = choices;
    }

    pub fn choices(&self) -> Arc<Choices> {
        snapshot(&self.choices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::Via;

    #[test]
    fn a_full_queue_loses_events_without_waiting() {
        let (link, receiver) = MonitorLink::new(2);
        let now = Instant::now();
        for _ in 0..5 {
            link.report(now, Event::Answered { via: Via::Underlay });
        }
        assert_eq!(receiver.try_iter().count(), 2);
        assert_eq!(link.dropped.load(Relaxed), 3);
        drop(receiver);
        link.report(now, Event::Answered { via: Via::Underlay });
        assert_eq!(link.dropped.load(Relaxed), 4);
    }
}
