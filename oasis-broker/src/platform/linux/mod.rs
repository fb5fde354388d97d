//! Linux: the eBPF classifier and its maps (one file per program or map
//! family, as aya arranges them), the TUN device, raw sockets, the broker's
//! UDP sockets, and interface discovery.

pub mod classifier;
pub mod dns_origins;
pub mod dns_redirect;
pub mod encap;
pub mod heartbeat;
pub mod kernel;
pub mod local_addrs;
pub mod monitor_events;
pub mod nat;
pub mod pins;
pub mod probe;
mod senders;
pub mod sock_diag;
pub mod socket;
pub mod sys;
pub mod tun;
pub mod underlay;
pub mod uplink;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use oasis_common::Settings;
use oasis_io::linux::raw::RawSockets;
use oasis_io::linux::tun::{Tun, diverted_counts, uplink_mtu};

use crate::config::TunConfig;
use crate::engine::LocalAddresses;
use crate::platform::{Divert, Kernel, Platform, PlatformError};

pub use kernel::{KernelError, LinuxKernel};

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error(
        "no uplink: no interface carries a default route; name the uplinks in the config file (uplinks: [eth0])"
    )]
    NoUplinks,
    #[error("creating TUN device {name}: {source}{}", hint(source))]
    Tun { name: String, source: io::Error },
    #[error("opening the underlay raw sockets: {0}{hint}", hint = hint(.0))]
    Underlay(io::Error),
    #[error("opening the Monitor's probe sockets (TCP ports held, raw ICMP sockets): {0}")]
    Probes(io::Error),
}

/// What to do about a failure to open a device or socket: only a refusal
/// means the daemon lacks root; a busy device means another daemon (maybe
/// one still exiting) holds it.
fn hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => " (the daemon must run as root)",
        Some(libc::EBUSY) => {
            " (in use: is another oasis daemon running, or still exiting? try again in a few seconds)"
        }
        _ => "",
    }
}

/// The Linux implementation of the platform.
#[derive(Default)]
pub struct LinuxPlatform;

impl Platform for LinuxPlatform {
    type Queue = tun::TunQueue;
    type Delivery = tun::TunDelivery;
    type Underlay = underlay::RawUnderlay;
    type Socket = socket::UdpSocket;

    fn uplinks(&self, configured: &[String]) -> Result<Vec<String>, PlatformError> {
        let uplinks = if configured.is_empty() {
            uplink::default_route_interfaces()
        } else {
            configured.to_vec()
        };
        if uplinks.is_empty() {
            return Err(LinuxError::NoUplinks.into());
        }
        Ok(uplinks)
    }

    fn uplink_mtu(&self, uplinks: &[String]) -> u16 {
        uplink_mtu(uplinks)
    }

    fn divert(
        &mut self,
        config: &TunConfig,
        mtu: u16,
    ) -> Result<Divert<Self::Queue, Self::Delivery>, PlatformError> {
        let tun = Tun::create(&config.name, config.queues, mtu, config.address).map_err(|source| {
            LinuxError::Tun {
                name: config.name.clone(),
                source,
            }
        })?;
        let devices: Vec<Arc<tun_rs::SyncDevice>> = tun.queues.into_iter().map(Arc::new).collect();
        let delivery = tun::TunDelivery::new(devices[0].clone());
        let queues = devices
            .into_iter()
            .map(|device| tun::TunQueue::new(device, mtu))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| LinuxError::Tun {
                name: config.name.clone(),
                source,
            })?;
        Ok(Divert {
            name: tun.name,
            index: tun.ifindex,
            queues,
            delivery,
        })
    }

    fn underlay(&self, bypass_mark: u32) -> Result<Self::Underlay, PlatformError> {
        Ok(underlay::RawUnderlay(
            RawSockets::open(bypass_mark).map_err(LinuxError::Underlay)?,
        ))
    }

    fn socket(&self, addr: SocketAddr, bypass_mark: u32, coalesce: bool) -> io::Result<Self::Socket> {
        socket::UdpSocket::open(addr, bypass_mark, coalesce)
    }

    fn kernel(&mut self, settings: Settings) -> Result<Box<dyn Kernel>, PlatformError> {
        Ok(Box::new(LinuxKernel::load(oasis_ebpf_object::OBJECT, settings)?))
    }

    fn local_addresses(&self, into: &mut LocalAddresses) {
        local_addrs::read_local_addresses(into)
    }

    fn path_mtu(&self, to: std::net::SocketAddr) -> Option<u16> {
        use std::os::fd::AsRawFd;
        // A connected UDP socket reads the kernel's path MTU to its peer
        // (IP_MTU / IPV6_MTU): the route's MTU or the PMTU learnt since.
        let socket =
            socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::DGRAM, None).ok()?;
        socket.connect(&to.into()).ok()?;
        let (level, name) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_MTU)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU)
        };
        let mut mtu: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a getsockopt into a c_int of the size given.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                &mut mtu as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then(|| u16::try_from(mtu).ok()).flatten()
    }

    fn diverted(&self, device: &str) -> (u64, u64) {
        diverted_counts(device)
    }

    fn probe_sockets(&self, ports: usize) -> Result<Box<dyn crate::platform::ProbeSockets>, PlatformError> {
        let sockets = probe::LinuxProbeSockets::open(ports).map_err(LinuxError::Probes)?;
        Ok(Box::new(sockets))
    }

    fn sockets(&self) -> std::sync::Arc<dyn crate::platform::SocketLookup> {
        std::sync::Arc::new(sock_diag::SockDiag::default())
    }
}
