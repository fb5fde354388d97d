//! Which server a redirected query was sent to. The redirect hooks keep
//! the original server per socket cookie (`DNS_ORIGINAL`); the broker sees
//! only the client's address and port, so it asks the kernel's socket
//! diagnostics (sock_diag, the interface `ss` uses) for the socket behind
//! them, whose cookie is the same number the hooks used.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{HashMap, MapData};
use oasis_common::{AppName, DnsOriginal, FAMILY_V4};

use super::sock_diag::SockDiag;
use crate::platform::QueryOrigins;
use crate::sender::{Asker, cgroup_of};

pub struct LinuxOrigins {
    original: HashMap<MapData, u64, DnsOriginal>,
    diag: SockDiag,
}

impl LinuxOrigins {
    pub(super) fn new(original: HashMap<MapData, u64, DnsOriginal>) -> LinuxOrigins {
        LinuxOrigins {
            original,
            diag: SockDiag::default(),
        }
    }

    fn cookie(&self, tcp: bool, local: SocketAddr, peer: SocketAddr) -> Option<u64> {
        self.diag.cookie(tcp, local, peer)
    }
}

impl QueryOrigins for LinuxOrigins {
    fn asker(&self, tcp: bool, client: SocketAddr, listener: SocketAddr) -> Option<Asker> {
        let cookie = self.cookie(tcp, client, listener)?;
        let original = self.original.get(&cookie, 0).ok()?;
        // The process is waiting for its answer: its cgroup is there to read.
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", original.tgid))
            .ok()
            .and_then(|text| cgroup_of(&text));
        Some(Asker {
            uid: original.uid,
            cgroup,
            app: AppName { bytes: original.comm },
        })
    }

    fn original_server(&self, tcp: bool, client: SocketAddr, listener: SocketAddr) -> Option<SocketAddr> {
        let cookie = self.cookie(tcp, client, listener)?;
        let original = self.original.get(&cookie, 0).ok()?;
        let ip = if original.family == FAMILY_V4 {
            IpAddr::from([
                original.addr[0],
                original.addr[1],
                original.addr[2],
                original.addr[3],
            ])
        } else {
            IpAddr::from(original.addr).to_canonical()
        };
        Some(SocketAddr::new(ip, original.port))
    }
}
