//! The joined overlays as a file that local modules may read (paper §2.2.3:
//! a monitor module may read which overlays the user joined): next to the
//! control socket, root's only (it holds the overlays' tokens), written
//! whole whenever the overlays change.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::overlay::OverlayTable;

/// The file's name, in the control socket's directory.
pub const FILE_NAME: &str = "overlays.json";

#[derive(Serialize)]
struct File<'a> {
    /// Where modules hand packets back for the applications ...
    overlay_port: u16,
    /// ... and packets to send on the underlay (on loopback).
    underlay_port: u16,
    overlays: Vec<Overlay<'a>>,
}

#[derive(Serialize)]
struct Overlay<'a> {
    name: &'a str,
    /// The entry nodes (resolved), or a module's loopback address.
    entries: Vec<String>,
    /// The shim to put in front of each packet, in hex.
    shim: String,
    /// A monitor module's overlay, not a carrier.
    monitor: bool,
}

pub fn path(control_socket: &Path) -> PathBuf {
    control_socket
        .parent()
        .unwrap_or(Path::new("/run/oasis"))
        .join(FILE_NAME)
}

pub fn write(
    path: &Path,
    table: &OverlayTable,
    overlay_port: u16,
    underlay_port: u16,
) -> std::io::Result<()> {
    let mut overlays: Vec<Overlay<'_>> = table
        .iter()
        .map(|o| Overlay {
            name: &o.name,
            entries: o.path.peers().iter().map(ToString::to_string).collect(),
            shim: o.shim.iter().map(|b| format!("{b:02x}")).collect(),
            monitor: o.monitor,
        })
        .collect();
    overlays.sort_by(|a, b| a.name.cmp(b.name));
    let text = serde_json::to_string_pretty(&File {
        overlay_port,
        underlay_port,
        overlays,
    })
    .map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::test_overlay;

    #[test]
    fn modules_read_every_joined_overlay() {
        let dir = std::env::temp_dir().join(format!("oasis-overlays-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = path(&dir.join("oasis.sock"));
        let table = OverlayTable::new([
            test_overlay(2, "exit", &["192.0.2.1:7400"], 2),
            test_overlay(1, "detour", &["192.0.2.2:7500"], 0),
        ]);
        write(&file, &table, 7400, 7401).unwrap();
        let read: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(read["underlay_port"], 7401);
        assert_eq!(read["overlays"][0]["name"], "detour");
        assert_eq!(read["overlays"][1]["entries"][0], "192.0.2.1:7400");
        assert_eq!(read["overlays"][1]["shim"], "0000");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
