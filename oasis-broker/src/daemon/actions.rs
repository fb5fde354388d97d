//! What the user does to live traffic, rather than to rules: pinning a
//! metric rule to a carrier, and ending flows. Both act through the parts
//! that already decide (the Monitor's choices, the host's sockets).

use std::time::{Duration, Instant};

use super::state::{Daemon, RequestError};
use crate::control::FlowView;
use crate::monitor::Event;
use crate::overlay::Via;

/// How old a listing of flows may be to find the flows to end in.
const RECENT: Duration = Duration::from_secs(1);

/// How long a pin may take to reach the choices new flows read.
const PIN_DEADLINE: Duration = Duration::from_secs(3);

/// Why a pin was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum PinError {
    #[error("rule {0} is not a metric rule: only the Monitor's choices can be pinned (nothing changed)")]
    NotMetric(u32),
    #[error("{carrier:?} is not a carrier of rule {rule}; it may use: {among} (nothing changed)")]
    NotCandidate {
        rule: u32,
        carrier: String,
        among: String,
    },
    #[error("rule {0} is decided by a monitor module, which cannot be pinned (nothing changed)")]
    Module(u32),
    #[error("the Monitor did not take the pin within {} s (is its thread stuck? `oasis monitor`)", PIN_DEADLINE.as_secs())]
    NotTaken,
}

impl Daemon {
    /// Pins metric rule `rule`'s new flows to `carrier` while it is up
    /// (None: unpins). Live flows keep their carrier. Returns the message
    /// for the user.
    pub(super) async fn pin(&self, rule: u32, carrier: Option<String>) -> Result<String, RequestError> {
        let routes = self.engine.routes();
        let route = routes.monitored(rule).ok_or(PinError::NotMetric(rule))?;
        if route.module.is_some() {
            return Err(PinError::Module(rule).into());
        }
        let via = match &carrier {
            None => None,
            Some(name) if name.eq_ignore_ascii_case("underlay") || name == "DIRECT" => Some(Via::Underlay),
            Some(name) => {
                let id = routes
                    .overlays
                    .id_of(name)
                    .filter(|id| route.candidates.contains(id));
                let Some(id) = id else {
                    let mut among = vec!["underlay".to_string()];
                    among.extend(
                        route
                            .candidates
                            .iter()
                            .filter_map(|id| routes.overlays.get(*id).map(|o| o.name.clone())),
                    );
                    return Err(PinError::NotCandidate {
                        rule,
                        carrier: name.clone(),
                        among: among.join(", "),
                    }
                    .into());
                };
                Some(Via::Overlay(id))
            }
        };
        self.engine
            .monitor
            .report(Instant::now(), Event::Pin { rule, via });
        // The answer waits until new flows are decided by it.
        let deadline = Instant::now() + PIN_DEADLINE;
        while self.engine.monitor.choices().pin(rule) != via {
            if Instant::now() > deadline {
                return Err(PinError::NotTaken.into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(match carrier {
            Some(carrier) => format!(
                "rule {rule}'s new flows take {carrier} while it is up (the underlay when it is not); \
                 `oasis rule pin {rule} --clear` gives them back to the Monitor"
            ),
            None => format!("rule {rule}'s new flows are the Monitor's to decide again"),
        })
    }

    /// Forgets every name's fake address (the Clash API's fake-IP flush),
    /// refused while live flows hold some.
    pub(super) fn flush_fakes(&self) -> Result<String, RequestError> {
        let flushed = self.dns.fakes.lock().unwrap_or_else(|e| e.into_inner()).flush();
        match flushed {
            Ok(count) => {
                tracing::info!(count, "forgot every fake address at the user's request");
                Ok(format!("forgot {count} fake address(es)"))
            }
            Err(held) => Err(RequestError::Refused(format!(
                "{held} fake address(es) are held by live flows; nothing was forgotten (end the flows \
                 first: `oasis flows`)"
            ))),
        }
    }

    /// Ends the flows with these ids (None: every flow) by closing their
    /// sockets on this host. Returns how many were ended, and the flows
    /// that had no socket here (forwarded traffic) or were gone.
    pub(super) async fn end_flows(&self, ids: Option<Vec<String>>) -> Result<Ended, RequestError> {
        // A listing the API just read names the flows it shows; a flow
        // newer than it takes a listing of now.
        let mut flows = self.flows_within(RECENT).await?;
        if let Some(ids) = &ids
            && ids.iter().any(|id| matching(&flows, id).len() != 1)
        {
            flows = self.flows_within(Duration::ZERO).await?;
        }
        let mut ended = Ended::default();
        let chosen: Vec<&FlowView> = match &ids {
            None => flows.iter().collect(),
            Some(ids) => {
                let mut chosen = Vec::new();
                for id in ids {
                    match matching(&flows, id)[..] {
                        [flow] => chosen.push(flow),
                        [] => ended.unknown.push(id.clone()),
                        _ => ended.ambiguous.push(id.clone()),
                    }
                }
                chosen
            }
        };
        for flow in chosen {
            // The socket as the application holds it: a fake-address
            // flow's peer is the fake address.
            let peer = flow
                .fake
                .as_deref()
                .and_then(|fake| fake.parse().ok())
                .map_or(flow.dst, |ip| std::net::SocketAddr::new(ip, flow.dst.port()));
            match self.sockets.end_socket(flow.proto, flow.src, peer) {
                Ok(()) => ended.ended.push(flow.id.clone()),
                Err(e) => ended.failed.push((flow.flow.clone(), e.to_string())),
            }
        }
        if !ended.ended.is_empty() {
            tracing::info!(flows = ended.ended.len(), "ended flows at the user's request");
        }
        Ok(ended)
    }
}

/// The flows an id names: the one whose id it is, or those whose id
/// starts with it (`oasis flows` shows the first 8 characters).
fn matching<'a>(flows: &'a [FlowView], id: &str) -> Vec<&'a FlowView> {
    if let Some(exact) = flows.iter().find(|f| f.id == id) {
        return vec![exact];
    }
    if id.len() < MIN_PREFIX {
        return Vec::new();
    }
    flows.iter().filter(|f| f.id.starts_with(id)).collect()
}

/// The shortest id prefix taken: fewer characters name a flow by chance.
const MIN_PREFIX: usize = 4;

/// What ending flows did.
#[derive(Debug, Default)]
pub(super) struct Ended {
    pub ended: Vec<String>,
    /// Flows whose socket could not be closed, and why (no socket on this
    /// host: forwarded traffic, or already closed).
    pub failed: Vec<(String, String)>,
    /// Ids of no live flow.
    pub unknown: Vec<String>,
    /// Id prefixes of several live flows: none of them was ended.
    pub ambiguous: Vec<String>,
}

impl Ended {
    pub fn message(&self) -> String {
        let mut text = format!("ended {} flow(s)", self.ended.len());
        for (flow, why) in &self.failed {
            text.push_str(&format!("; {flow}: not ended ({why})"));
        }
        if !self.unknown.is_empty() {
            text.push_str(&format!("; no live flow has id {}", self.unknown.join(", ")));
        }
        if !self.ambiguous.is_empty() {
            text.push_str(&format!(
                "; {} name(s) several flows: give more of the id (`oasis flows --json`)",
                self.ambiguous.join(", ")
            ));
        }
        text
    }
}

impl From<PinError> for RequestError {
    fn from(e: PinError) -> RequestError {
        RequestError::Refused(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_or_a_unique_start_of_it_names_a_flow() {
        let flow = |id: &str| FlowView {
            id: id.into(),
            ..FlowView::default()
        };
        let flows = vec![
            flow("0a1b2c3d-0000"),
            flow("0a1b9999-0000"),
            flow("ffee0000-0000"),
        ];
        assert_eq!(matching(&flows, "0a1b2c3d-0000")[0].id, "0a1b2c3d-0000");
        assert_eq!(matching(&flows, "0a1b2c3d").len(), 1);
        assert_eq!(matching(&flows, "0a1b").len(), 2, "ambiguous");
        assert!(
            matching(&flows, "ffe").is_empty(),
            "too short to name one by chance"
        );
        assert!(matching(&flows, "1234").is_empty());
        let ended = Ended {
            ambiguous: vec!["0a1b".into()],
            unknown: vec!["1234".into()],
            ..Ended::default()
        };
        let message = ended.message();
        assert!(
            message.starts_with("ended 0 flow(s)") && message.contains("give more of the id"),
            "{message}"
        );
    }
}
