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

use super::sock_diag::SockDiag;
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
        sockets
            .iter()
            .map(|&(protocol, local, peer)| {
                let tcp = match protocol {
                    proto::TCP => true,
                    proto::UDP => false,
                    _ => return None,
                };
                // A socket the kernel keeps without its owner (TIME_WAIT)
                // tells nothing of who sent the flow.
                let owner = self.diag.owner(tcp, local, peer).filter(|o| o.full)?;
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
