//! What the API reads and asks of the daemon. Everything that decides goes
//! through the control requests the CLI sends, so the API and `oasis`
//! cannot disagree; the rest are facts of the process and host.

use crate::control::{Request, Response};

/// One answer record of `/dns/query`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub rtype: u16,
    pub ttl: u32,
    pub data: String,
}

/// `/dns/query`'s answer: the response code and the answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub rcode: u16,
    pub answers: Vec<Record>,
}

#[async_trait::async_trait]
pub trait Source: Send + Sync + 'static {
    /// A control request, as the CLI would send it.
    async fn call(&self, request: Request) -> Response;
    /// Bytes sent and received on the uplinks (every packet, claimed or
    /// not), totals since they came up.
    fn uplink_bytes(&self) -> (u64, u64);
    /// The daemon's resident memory, in bytes.
    fn memory(&self) -> u64;
    /// Asks the DNS service `name`, as an application on this host would
    /// be answered (a claimed name gets its fake address).
    async fn resolve(&self, name: &str, rtype: u16) -> Result<Resolved, String>;
}
