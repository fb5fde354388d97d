//! The overlay manager's world: specifications (the XML an operator
//! publishes), fetching them, joining and leaving, and the table of joined
//! overlays the packet path reads, keyed by id.

pub mod fetch;
pub mod manager;
pub mod spec;
pub mod table;

pub use fetch::{FetchError, fetch};
pub use manager::{OverlayManager, Prepared};
pub use spec::{MAX_ENTRIES, MAX_SPEC_BYTES, ModuleKind, ModuleSpec, OverlaySpec, SpecError};
#[cfg(test)]
pub(crate) use table::test_overlay;
pub use table::{EntryNodes, JoinedOverlay, OverlayId, OverlayPath, OverlayTable};

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
}

/// Checks a local overlay name as `--via` and `overlay add` take it.
pub fn check_name(name: &str) -> Result<(), JoinError> {
    match name.parse::<crate::rules::Carrier>() {
        Ok(crate::rules::Carrier::Overlay(_)) => Ok(()),
        _ => Err(JoinError::BadName(name.into())),
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
