//! What a control request can fail with, as the user reads it: each
//! message says whether anything changed. Shared by the request's checks
//! (`changes.rs`) and the code that carries it out (`state.rs`).

use crate::overlay::{JoinError, OverlayError};
use crate::platform::PlatformError;
use crate::rules::RuleError;

#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("rule {line} of the import: {source} (no rule was added)")]
    Import { line: usize, source: RuleError },
    #[error("{0} (the change was not made; nothing changed)")]
    Kernel(PlatformError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("the change is in effect, but the config file could not be written: {0}")]
    NotSaved(String),
    #[error("the daemon failed while doing this: {0}")]
    Internal(String),
    #[error("{0} (no rule was added)")]
    Keep(#[from] super::sets::KeepError),
    #[error("{0} (no rule was added)")]
    List(String),
    #[error("{0}")]
    Refused(String),
    #[error("name rules cannot be kept on this host: {0} (no rule was added)")]
    Uncovered(String),
}
