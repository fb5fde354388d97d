//! The TUN device diverted packets arrive on. It has no addresses and no
//! routes: packets reach it only through the classifier's redirect.

use std::io;

use tun_rs::{DeviceBuilder, SyncDevice};

/// How long a new TUN waits for the old one of the same name to go.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Tun {
    pub name: String,
    pub ifindex: u32,
    /// One device handle per queue, each read by its own thread.
    pub queues: Vec<SyncDevice>,
}

impl Tun {
    /// Creates the device with `queues` queues and generic offload, so a
    /// TCP burst arrives as one large read that user space splits.
    pub fn create(name: &str, queues: usize, mtu: u16, address: std::net::Ipv4Addr) -> io::Result<Tun> {
        if std::path::Path::new("/sys/class/net").join(name).exists() {
            tracing::warn!(%name, "a device with the TUN's name exists already (left by a crashed run?); taking it over");
        }
        let build = || {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(true)
                .multi_queue(queues > 1)
                // Linux drops packets arriving on an interface without any
                // IPv4 address whenever reverse-path filtering is on, loose
                // mode included; returned packets need the TUN to have one.
                .ipv4(address, 32, None)
                .enable(false)
                .build_sync()
        };
        // A daemon killed a moment ago: the kernel tears its TUN down after
        // the process is gone, and until then the name is busy. A
        // supervisor's immediate restart waits for it rather than failing.
        let deadline = std::time::Instant::now() + BUSY_WAIT;
        let mut told = false;
        let first = loop {
            match build() {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                    if !told {
                        tracing::info!(
                            %name,
                            "the TUN of a daemon that stopped is still being torn down; waiting for it (at most {} s)",
                            BUSY_WAIT.as_secs()
                        );
                        told = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                result => break result?,
            }
        };
        // Before it goes up: IPv6 stays on, so packets returned by overlays
        // can be delivered through the TUN, but without any address, so the
        // host sends nothing of its own into it (no link-local address means
        // no DAD, no router solicitation, no MLD report).
        let sysctl = |family: &str, key: &str, value: &str| {
            let path = format!("/proc/sys/net/{family}/conf/{name}/{key}");
            if let Err(e) = std::fs::write(&path, value) {
                tracing::warn!(%path, "cannot set: {e}");
            }
        };
        sysctl("ipv6", "addr_gen_mode", "1");
        sysctl("ipv6", "accept_ra", "0");
        // Returned packets come from remote sources that route via the
        // uplink, not the TUN: loose reverse-path checking lets them in.
        sysctl("ipv4", "rp_filter", "2");
        first.enabled(true)?;
        let ifindex = first.if_index()?;
        let mut handles = vec![first];
        for _ in 1..queues {
            handles.push(handles[0].try_clone()?);
        }
        Ok(Tun {
            name: name.to_string(),
            ifindex,
            queues: handles,
        })
    }
}

/// Packets and bytes the kernel has handed to the TUN's readers.
pub fn diverted_counts(name: &str) -> (u64, u64) {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (read("tx_packets"), read("tx_bytes"))
}

/// The largest MTU among the uplinks, so the TUN never refuses a packet
/// an uplink would have sent.
pub fn uplink_mtu(uplinks: &[String]) -> u16 {
    uplinks
        .iter()
        .filter_map(|name| std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok())
        .filter_map(|s| s.trim().parse::<u16>().ok())
        .max()
        .unwrap_or(1500)
}
