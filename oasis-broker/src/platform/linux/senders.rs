//! Who sent each live flow, for `oasis flows`: the socket behind the flow
//! (sock_diag, by its two ends) gives its owner's uid and its cgroup's
//! id; the socket hooks' record gives the process name, for sockets they
//! saw connect while a rule by application was there. Asked on request,
//! never per packet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData};
use oasis_common::{AppName, proto};

use super::sock_diag::{SockDiag, SocketOwner, all_owners};
use crate::control::SenderView;
use crate::sender::{app_text, cgroup_root};

/// The most cgroup directories walked to name a cgroup id.
const MAX_CGROUPS: usize = 20_000;

pub(super) struct Senders {
    diag: SockDiag,
    apps: BpfHashMap<MapData, u64, AppName>,
}

impl Senders {
    pub(super) fn new(apps: BpfHashMap<MapData, u64, AppName>) -> Senders {
        Senders {
            diag: SockDiag::default(),
            apps,
        }
    }

    pub(super) fn of(&self, sockets: &[(u8, SocketAddr, SocketAddr)]) -> Vec<Option<SenderView>> {
        let mut paths: Option<HashMap<u64, String>> = None;
        // Many flows: two dumps of every socket cost less than a lookup
        // each (10,000 lookups take a third of a second).
        let dumps = (sockets.len() > DUMP_ABOVE).then(|| (all_owners(true), all_owners(false)));
        sockets
            .iter()
            .map(|&(protocol, local, peer)| {
                let tcp = match protocol {
                    proto::TCP => true,
                    proto::UDP => false,
                    _ => return None,
                };
                let owner = match &dumps {
                    Some((tcp_owners, udp_owners)) => {
                        let owners = if tcp { tcp_owners } else { udp_owners };
                        dumped_owner(owners, local, peer)
                    }
                    None => self.diag.owner(tcp, local, peer),
                };
                // A socket the kernel keeps without its owner (TIME_WAIT)
                // tells nothing of who sent the flow.
                let owner = owner.filter(|o| o.full)?;
                let cgroup = owner
                    .cgroup
                    .and_then(|id| paths.get_or_insert_with(cgroup_paths).get(&id).cloned());
                Some(SenderView {
                    uid: owner.uid,
                    cgroup,
                    app: self.apps.get(&owner.cookie, 0).ok().map(|name| app_text(&name)),
                })
            })
            .collect()
    }
}

/// Above this many flows, senders are read from dumps of every socket.
const DUMP_ABOVE: usize = 64;

/// The socket of a flow in a dump: the connected one, else one bound to
/// its own end and sending anywhere (an unconnected UDP socket), as the
/// kernel's exact lookup would find it.
fn dumped_owner(
    owners: &HashMap<(SocketAddr, SocketAddr), SocketOwner>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Option<SocketOwner> {
    let any = |addr: SocketAddr| match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let wildcard = SocketAddr::new(any(local).ip(), local.port());
    [(local, peer), (local, any(peer)), (wildcard, any(peer))]
        .iter()
        .find_map(|key| owners.get(key).copied())
}

/// Every cgroup's path below the root, by id (the inode number of its
/// directory).
fn cgroup_paths() -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Some(root) = cgroup_root(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()) else {
        return out;
    };
    let mut pending: Vec<PathBuf> = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        if out.len() >= MAX_CGROUPS {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        if let Some(id) = ino(&dir) {
            let relative = dir.strip_prefix(&root).unwrap_or(Path::new("")).to_string_lossy();
            out.insert(id, format!("/{relative}"));
        }
        pending.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    out
}

fn ino(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}
