//! The underlay port: where an overlay's local code module hands the broker
//! raw IP packets to send on the underlay (paper §2.2.3). It listens on
//! loopback only, and admits only datagrams from sockets the broker itself
//! opened for its modules: anything else could use it to send arbitrary,
//! spoofed packets with the broker's privileges.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use socket2::Socket;

use super::forward::{ForwardStats, Shared, snapshot};
use super::mmsg::recv_batch;
use super::underlay::Underlay;

/// Local addresses of the sockets the broker opened for its modules; the
/// sandbox fills it as modules start. Until then it is empty and the port
/// admits nothing.
pub type ModuleSockets = Shared<HashSet<SocketAddr>>;

/// Whether a datagram from `from` may be sent on the underlay.
pub fn admitted(modules: &HashSet<SocketAddr>, from: Option<SocketAddr>) -> bool {
    from.is_some_and(|addr| addr.ip().is_loopback() && modules.contains(&addr))
}

pub struct UnderlayPort {
    pub socket: Socket,
    pub underlay: Arc<Underlay>,
    pub modules: ModuleSockets,
    pub stats: Arc<ForwardStats>,
}

const BATCH: usize = 32;
const DATAGRAM: usize = 65_536;

impl UnderlayPort {
    pub fn run(self) -> std::io::Error {
        let mut bufs = vec![vec![0u8; DATAGRAM]; BATCH];
        let mut lens = vec![0usize; BATCH];
        let mut from: Vec<Option<SocketAddr>> = vec![None; BATCH];
        // This socket does not ask for coalescing: one datagram per buffer.
        let mut segments = vec![0usize; BATCH];
        loop {
            let count = match recv_batch(
                self.socket.as_raw_fd(),
                &mut bufs,
                0,
                &mut lens,
                &mut from,
                &mut segments,
            ) {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            };
            let modules = snapshot(&self.modules);
            let mut packets: Vec<&[u8]> = Vec::with_capacity(count);
            for i in 0..count {
                if admitted(&modules, from[i]) {
                    packets.push(&bufs[i][..lens[i]]);
                } else {
                    self.stats.rejected_module_sender.fetch_add(1, Relaxed);
                    tracing::debug!(from = ?from[i], "datagram on the underlay port from no module of this broker");
                }
            }
            let (sent, failed) = self.underlay.send_batch(&packets);
            self.stats.sent_underlay.fetch_add(sent as u64, Relaxed);
            self.stats.send_errors.fetch_add(failed as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_brokers_own_module_sockets_are_admitted() {
        let module: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let modules: HashSet<SocketAddr> = [module].into();
        assert!(admitted(&modules, Some(module)));
        assert!(
            !admitted(&modules, Some("127.0.0.1:40124".parse().unwrap())),
            "another local process"
        );
        assert!(
            !admitted(&modules, Some("10.0.0.1:40123".parse().unwrap())),
            "not loopback"
        );
        assert!(!admitted(&modules, None));
        assert!(
            !admitted(&HashSet::new(), Some(module)),
            "no modules, nothing admitted"
        );
    }
}
