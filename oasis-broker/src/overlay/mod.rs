//! The overlay manager's world: specifications (the XML an operator
//! publishes), fetching them, joining and leaving, and the table of joined
//! overlays the packet path reads, keyed by id.

pub mod fetch;
pub mod manager;
pub mod modules;
pub mod spec;
pub mod table;
pub mod tunnel_dns;
pub mod wireguard;

pub use fetch::{FetchError, fetch};
pub use manager::{JoinOptions, OverlayManager, Prepared};
pub use modules::{ModuleContext, ModuleFailure};
pub use spec::{MAX_ENTRIES, MAX_SPEC_BYTES, ModuleKind, ModuleSpec, OverlaySpec, SpecError};
#[cfg(test)]
pub(crate) use table::test_overlay;
pub use table::{
    EntryNodes, JoinedOverlay, LocalModule, ModuleLink, OverlayId, OverlayPath, OverlayTable, Via,
};

/// This host's own addresses, as the platform last read them: no entry
/// node may be one of them, and returned packets must be for one.
pub type LocalAddresses = std::collections::HashSet<std::net::IpAddr>;

use crate::rules::{Carrier, RuleError};

/// Why joining or leaving an overlay was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    #[error("bad overlay name {0:?}: use letters, digits, - and _ (and not `underlay`)")]
    BadName(String),
    #[error("an overlay named {0:?} is joined already; `oasis overlay del {0}` first")]
    Exists(String),
    #[error("no overlay named {0:?} is joined; `oasis overlay list` shows them")]
    Unknown(String),
    #[error("overlay {name:?} carries rules {rules:?}; delete them first (`oasis rule del ID`)")]
    InUse { name: String, rules: Vec<u32> },
    #[error("--token: the overlay's shim is {shim_len} bytes, so give {shim_len} bytes as {} hex digits", shim_len * 2)]
    BadToken { shim_len: usize },
    #[error("--token: this overlay has no shim to carry a token")]
    TokenWithoutShim,
}

/// Everything `overlay add` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Module(#[from] ModuleFailure),
    #[error(transparent)]
    WireGuard(#[from] wireguard::WireGuardError),
}

/// Checks a local overlay name as `--via` and `overlay add` take it.
pub fn check_name(name: &str) -> Result<(), JoinError> {
    match name.parse::<crate::rules::Carrier>() {
        Ok(crate::rules::Carrier::Overlay(_)) => Ok(()),
        _ => Err(JoinError::BadName(name.into())),
    }
}

/// A joined overlay as the config file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredOverlay {
    pub name: String,
    pub url: String,
    /// Hex bytes carried in the shim, for exit nodes that check a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Flows of this overlay never fall back to the underlay, not even
    /// while its code module restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    pub spec: OverlaySpec,
    /// A WireGuard overlay's wg-quick file in the key store (mode 0600):
    /// its keys and peers. The private key is never in the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<std::path::PathBuf>,
}

/// Checks that the overlays a rule's carrier names are joined and fit
/// their role: a carrier carries, a monitor module decides.
pub fn check_carrier(via: &Carrier, joined: &[StoredOverlay]) -> Result<(), RuleError> {
    let find = |name: &str| {
        joined
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| RuleError::UnknownOverlay(name.into()))
    };
    for name in via.overlays() {
        find(name)?;
    }
    let carrier = |name: &str| -> Result<(), RuleError> {
        match find(name)?.spec.is_monitor() {
            true => Err(RuleError::MonitorIsNoCarrier(name.into())),
            false => Ok(()),
        }
    };
    match via {
        Carrier::Underlay => Ok(()),
        Carrier::Overlay(name) => carrier(name),
        Carrier::Monitor(goal) => {
            for name in goal.among.iter().flatten() {
                carrier(name)?;
            }
            if let Some(module) = &goal.module {
                let overlay = find(module)?;
                if !overlay.spec.is_monitor() {
                    return Err(RuleError::NotAMonitor(module.clone()));
                }
                let text = goal.metric.to_string();
                if text.len() > overlay.spec.shim_len {
                    return Err(RuleError::MetricLongerThanShim {
                        monitor: module.clone(),
                        metric: text.len(),
                        shim: overlay.spec.shim_len,
                    });
                }
            }
            Ok(())
        }
    }
}

/// The shim bytes sent in front of every packet: the token, or zeros.
pub fn shim_bytes(shim_len: usize, token: Option<&str>) -> Result<Vec<u8>, JoinError> {
    let Some(token) = token else {
        return Ok(vec![0; shim_len]);
    };
    if shim_len == 0 {
        return Err(JoinError::TokenWithoutShim);
    }
    let token = token.trim();
    let bytes: Option<Vec<u8>> = (token.len() == shim_len * 2)
        .then(|| {
            (0..shim_len)
                .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    bytes.ok_or(JoinError::BadToken { shim_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{Goal, Metric};

    fn joined(name: &str, monitor: bool) -> StoredOverlay {
        let module = monitor.then(|| {
            format!(
                r#"<module url="http://x/m.wasm" kind="monitor" sha256="{}"/>"#,
                "ab".repeat(32)
            )
        });
        let text = match module {
            Some(module) => format!(r#"<overlay><shim length="8"/>{module}</overlay>"#),
            None => r#"<overlay><entry host="192.0.2.1" port="7400"/></overlay>"#.into(),
        };
        StoredOverlay {
            name: name.into(),
            url: "http://x/spec.xml".into(),
            token: None,
            pinned: false,
            spec: OverlaySpec::parse(&text).unwrap(),
            wireguard: None,
        }
    }

    #[test]
    fn carriers_carry_and_monitors_decide() {
        let overlays = [joined("detour", false), joined("mon", true)];
        let goal = |metric: Metric, among: Option<&[&str]>, module: Option<&str>| {
            Carrier::Monitor(Goal {
                metric,
                among: among.map(|a| a.iter().map(|s| s.to_string()).collect()),
                module: module.map(Into::into),
            })
        };
        assert_eq!(
            check_carrier(&Carrier::Overlay("detour".into()), &overlays),
            Ok(())
        );
        assert_eq!(
            check_carrier(&Carrier::Overlay("mon".into()), &overlays),
            Err(RuleError::MonitorIsNoCarrier("mon".into()))
        );
        assert_eq!(
            check_carrier(&Carrier::Overlay("gone".into()), &overlays),
            Err(RuleError::UnknownOverlay("gone".into()))
        );
        assert_eq!(
            check_carrier(&goal(Metric::Latency, Some(&["detour"]), None), &overlays),
            Ok(())
        );
        assert_eq!(
            check_carrier(&goal(Metric::Latency, Some(&["mon"]), None), &overlays),
            Err(RuleError::MonitorIsNoCarrier("mon".into()))
        );
        assert_eq!(
            check_carrier(&goal(Metric::Latency, None, Some("mon")), &overlays),
            Ok(())
        );
        assert_eq!(
            check_carrier(&goal(Metric::Latency, None, Some("detour")), &overlays),
            Err(RuleError::NotAMonitor("detour".into()))
        );
        assert_eq!(
            check_carrier(
                &goal(Metric::Other("far-too-long".into()), None, Some("mon")),
                &overlays
            ),
            Err(RuleError::MetricLongerThanShim {
                monitor: "mon".into(),
                metric: 12,
                shim: 8
            })
        );
    }

    #[test]
    fn tokens_fill_the_shim_exactly() {
        assert_eq!(shim_bytes(4, None).unwrap(), vec![0; 4]);
        assert_eq!(shim_bytes(2, Some("a1ff")).unwrap(), vec![0xa1, 0xff]);
        assert_eq!(
            shim_bytes(2, Some("a1")),
            Err(JoinError::BadToken { shim_len: 2 })
        );
        assert_eq!(
            shim_bytes(2, Some("zzzz")),
            Err(JoinError::BadToken { shim_len: 2 })
        );
        assert_eq!(shim_bytes(0, Some("")), Err(JoinError::TokenWithoutShim));
        assert!(
            check_name("underlay").is_err() && check_name("a b").is_err() && check_name("detour").is_ok()
        );
    }
}
