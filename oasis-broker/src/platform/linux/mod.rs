//! Linux: eBPF classifier maps and links, the TUN device, the underlay raw
//! sockets and interface discovery.
pub mod datapath;
pub mod dns_redirect;
pub mod exit_steer;
pub mod fake_path;
pub mod forward;
pub mod local_addrs;
pub mod mmsg;
pub mod overlay_rx;
pub mod tun;
pub mod underlay;
pub mod underlay_port;
pub mod uplink;
