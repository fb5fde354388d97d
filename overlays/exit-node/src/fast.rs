//! Which of the NAT's mappings the kernel carries (`oasis_common::exit_fast`)
//! and the entries it needs for them; no map, no clock. The NAT makes and
//! ends mappings; this turns each into kernel work for the `oasis-exit`
//! binary to carry out outside the exit's lock, and remembers which flows
//! the kernel holds, so that their mappings are not aged by the user-space
//! path's clock alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use oasis_common::{ExitBack, ExitFlowKey, ExitOut, FlowKey, MAX_EXIT_TOKEN, MAX_FAST_SHIM};

use crate::clients::{Client, lookup};
use crate::nat::{Inside, Mapped};

/// What the kernel needs to carry one flow both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastEntry {
    pub key: ExitFlowKey,
    pub out: ExitOut,
    /// The flow's replies as they arrive.
    pub reply: FlowKey,
    pub back: ExitBack,
}

/// Kernel work, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastWork {
    Install(FastEntry),
    Remove(FastEntry),
}

/// The fast path's side of the exit's state.
pub struct FastPath {
    public_v4: Ipv4Addr,
    /// The ports clients send to over IPv4 and over IPv6 (0: none): the
    /// replies' outer source port.
    listen_port: u16,
    listen_port_v6: u16,
    shim_len: usize,
    clients: Vec<Client>,
    installed: HashMap<Inside, FastEntry>,
}

impl FastPath {
    pub fn new(
        public_v4: Ipv4Addr,
        (listen_port, listen_port_v6): (u16, u16),
        shim_len: usize,
        clients: Vec<Client>,
    ) -> FastPath {
        FastPath {
            public_v4,
            listen_port,
            listen_port_v6,
            shim_len,
            clients,
            installed: HashMap::new(),
        }
    }

    /// Flows the kernel holds.
    pub fn flows(&self) -> usize {
        self.installed.len()
    }

    /// A new mapping: installed when the kernel can carry it (IPv4 inside,
    /// a client on a family the fast path serves, TCP or UDP, a token and
    /// shim it can compare and write).
    pub fn made(&mut self, mapped: &Mapped, work: &mut Vec<FastWork>) {
        let Some(entry) = self.entry(mapped) else {
            return;
        };
        if let Some(old) = self.installed.insert(mapped.inside, entry)
            && old.reply != entry.reply
        {
            work.push(FastWork::Remove(old));
        }
        work.push(FastWork::Install(entry));
    }

    /// A mapping gone: its entries go with it.
    pub fn ended(&mut self, mapped: &Mapped, work: &mut Vec<FastWork>) {
        if let Some(entry) = self.installed.remove(&mapped.inside) {
            work.push(FastWork::Remove(entry));
        }
    }

    /// The kernel's flows among `flows`, with their entries.
    pub fn held<'a>(
        &'a self,
        flows: impl Iterator<Item = &'a Inside> + 'a,
    ) -> impl Iterator<Item = (Inside, FastEntry)> + 'a {
        flows.filter_map(|inside| self.installed.get(inside).map(|entry| (*inside, *entry)))
    }

    /// Every flow the kernel holds.
    pub fn all(&self) -> impl Iterator<Item = &Inside> {
        self.installed.keys()
    }

    fn entry(&self, mapped: &Mapped) -> Option<FastEntry> {
        let inside = &mapped.inside;
        // The kernel does not seal: a WireGuard client's flows stay here.
        if crate::wg::is_peer_address(inside.client) {
            return None;
        }
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (inside.src, inside.dst) else {
            return None;
        };
        let inner = FlowKey::v4(
            src.octets(),
            dst.octets(),
            inside.proto,
            inside.src_port,
            inside.dst_port,
        );
        // The replies go back over the client's family, from its port.
        let (key, listen_port) = match inside.client {
            SocketAddr::V4(c) => (
                ExitFlowKey::v4(c.ip().octets(), c.port(), inner),
                self.listen_port,
            ),
            SocketAddr::V6(c) => (
                ExitFlowKey::v6(c.ip().octets(), c.port(), inner),
                self.listen_port_v6,
            ),
        };
        if !matches!(inside.proto, oasis_common::proto::TCP | oasis_common::proto::UDP)
            || self.shim_len > MAX_FAST_SHIM
            || listen_port == 0
        {
            return None;
        }
        let token = lookup(&self.clients, inside.client.ip())?
            .token
            .clone()
            .unwrap_or_default();
        if token.len() > MAX_EXIT_TOKEN || token.len() > self.shim_len {
            return None;
        }
        let public = self.public_v4.octets();
        let mut out = ExitOut {
            public,
            nat_port: mapped.nat_port,
            class: mapped.class,
            token_len: token.len() as u8,
            ..ExitOut::default()
        };
        out.token[..token.len()].copy_from_slice(&token);
        let reply = FlowKey::v4(
            dst.octets(),
            public,
            inside.proto,
            inside.dst_port,
            mapped.nat_port,
        );
        let back = ExitBack {
            client: key.client,
            client_port: key.client_port,
            listen_port,
            inside: src.octets(),
            inside_port: inside.src_port,
            class: mapped.class,
            family: key.family,
            ..ExitBack::default()
        };
        Some(FastEntry {
            key,
            out,
            reply,
            back,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oasis_common::{FAMILY_V4, FAMILY_V6};

    fn inside(client: &str, proto: u8, dst: &str) -> Inside {
        Inside {
            client: client.parse().unwrap(),
            proto,
            src: "10.0.0.5".parse().unwrap(),
            src_port: 5000,
            dst: dst.parse().unwrap(),
            dst_port: 80,
        }
    }

    fn fast(shim_len: usize) -> FastPath {
        let clients = ["10.0.0.0/24,class=1,token=a1b2", "10.0.1.0/24", "fd00::/64"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        FastPath::new(Ipv4Addr::new(198, 51, 100, 2), (7400, 7401), shim_len, clients)
    }

    #[test]
    fn a_mapping_becomes_both_entries_and_goes_with_them() {
        let mut fast = fast(4);
        let mapped = Mapped {
            inside: inside("10.0.0.5:7400", 6, "203.0.113.80"),
            nat_port: 61000,
            class: 1,
        };
        let mut work = Vec::new();
        fast.made(&mapped, &mut work);
        let [FastWork::Install(entry)] = work[..] else {
            panic!("one install: {work:?}");
        };
        assert_eq!(
            entry.key,
            ExitFlowKey::v4(
                [10, 0, 0, 5],
                7400,
                FlowKey::v4([10, 0, 0, 5], [203, 0, 113, 80], 6, 5000, 80)
            )
        );
        assert_eq!(
            (entry.out.public, entry.out.nat_port, entry.out.class),
            ([198, 51, 100, 2], 61000, 1)
        );
        assert_eq!(&entry.out.token[..entry.out.token_len as usize], &[0xa1, 0xb2]);
        // The reply as the server sends it, and where it goes back to.
        assert_eq!(
            entry.reply,
            FlowKey::v4([203, 0, 113, 80], [198, 51, 100, 2], 6, 80, 61000)
        );
        assert_eq!(
            (
                &entry.back.client[..4],
                entry.back.client_port,
                entry.back.listen_port
            ),
            (&[10, 0, 0, 5][..], 7400, 7400)
        );
        assert_eq!(entry.back.family, FAMILY_V4);
        assert_eq!((entry.back.inside, entry.back.inside_port), ([10, 0, 0, 5], 5000));
        assert_eq!(entry.back.local, [0; 16], "learned by the kernel");
        assert_eq!(fast.flows(), 1);

        work.clear();
        fast.ended(&mapped, &mut work);
        assert_eq!(work, [FastWork::Remove(entry)]);
        assert_eq!(fast.flows(), 0);
        work.clear();
        fast.ended(&mapped, &mut work);
        assert!(work.is_empty(), "removed once");
    }

    #[test]
    fn an_ipv6_client_gets_entries_of_its_family_and_port() {
        let mut fast = fast(0);
        let mapped = Mapped {
            inside: inside("[fd00::9]:40000", 17, "203.0.113.80"),
            nat_port: 61001,
            class: 0,
        };
        let mut work = Vec::new();
        fast.made(&mapped, &mut work);
        let [FastWork::Install(entry)] = work[..] else {
            panic!("one install: {work:?}");
        };
        let client: std::net::Ipv6Addr = "fd00::9".parse().unwrap();
        assert_eq!((entry.key.client, entry.key.family), (client.octets(), FAMILY_V6));
        assert_eq!(entry.key.client_port, 40000);
        assert_eq!(
            (entry.back.client, entry.back.family, entry.back.listen_port),
            (client.octets(), FAMILY_V6, 7401),
            "replies go back over IPv6 from the IPv6 port"
        );
        assert_eq!(
            entry.reply,
            FlowKey::v4([203, 0, 113, 80], [198, 51, 100, 2], 17, 80, 61001)
        );
    }

    #[test]
    fn what_the_kernel_cannot_carry_stays_with_user_space() {
        let mut work = Vec::new();
        let mapped = |inside| Mapped {
            inside,
            nat_port: 61000,
            class: 0,
        };
        // ICMP echo, an IPv6 destination, an IPv6 client when no IPv6
        // port is served.
        let mut fast4 = fast(4);
        fast4.made(&mapped(inside("10.0.1.9:7400", 1, "203.0.113.80")), &mut work);
        let mut no_v6_port = FastPath::new(
            Ipv4Addr::new(198, 51, 100, 2),
            (7400, 0),
            4,
            fast4.clients.clone(),
        );
        no_v6_port.made(&mapped(inside("[fd00::9]:7400", 6, "203.0.113.80")), &mut work);
        let mut v6 = inside("10.0.1.9:7400", 6, "203.0.113.80");
        v6.dst = "2001:db8::80".parse().unwrap();
        fast4.made(&mapped(v6), &mut work);
        // A token longer than the shim it must be in.
        let mut short_shim = fast(1);
        short_shim.made(&mapped(inside("10.0.0.5:7400", 6, "203.0.113.80")), &mut work);
        assert!(work.is_empty(), "{work:?}");
        // A client without a token needs no shim.
        fast(0).made(&mapped(inside("10.0.1.9:7400", 17, "203.0.113.80")), &mut work);
        assert_eq!(work.len(), 1);
    }
}
