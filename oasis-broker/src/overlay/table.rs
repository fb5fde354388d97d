//! The joined overlays as the packet path sees them: by id (what rules and
//! flows hold, so a packet never looks up a name), by name (what users
//! write), and by the address returned packets come from. The table is
//! immutable; the overlay manager publishes a new one on every change.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use oasis_common::FlowKey;

/// A joined overlay's number for this run of the daemon. Ids are never
/// reused: a flow of an overlay that was left and joined again under the
/// same name does not silently move to the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OverlayId(pub u32);

/// A carrier as the packet path holds it: by id, never by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Underlay,
    Overlay(OverlayId),
    /// The rule names an overlay that is joined but not usable now (its
    /// entry nodes did not resolve when the daemon started).
    Unavailable,
}

impl fmt::Display for OverlayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// How an overlay's traffic leaves this host and comes back: the place its
/// datagrams `[shim][IP packet]` go, and the senders whose datagrams may
/// hand packets back. An overlay with a code module puts the module's
/// local socket here; every other overlay talks to its entry nodes.
pub trait OverlayPath: Send + Sync + fmt::Debug {
    /// Where a flow's datagrams go: the same place for the flow's whole life.
    fn next_hop(&self, flow: &FlowKey) -> SocketAddr;
    /// Every address the path exchanges datagrams with.
    fn peers(&self) -> &[SocketAddr];
    /// Whether the path can carry the flow at all (a WireGuard peer's
    /// AllowedIPs, a tunnel address of the flow's family); a flow it
    /// cannot carry has no carrier.
    fn carries(&self, _flow: &FlowKey) -> bool {
        true
    }
}

/// Straight to the overlay's entry nodes over UDP, each flow pinned to one
/// of them by a hash of its 5-tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryNodes {
    entries: Vec<SocketAddr>,
}

impl EntryNodes {
    /// None for an empty list: an overlay needs at least one entry node.
    pub fn new(entries: Vec<SocketAddr>) -> Option<EntryNodes> {
        (!entries.is_empty()).then_some(EntryNodes { entries })
    }
}

impl OverlayPath for EntryNodes {
    fn next_hop(&self, flow: &FlowKey) -> SocketAddr {
        // A fixed-key hash: the same flow meets the same entry node after
        // a restart of the daemon too.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        flow.hash(&mut hasher);
        self.entries[(hasher.finish() % self.entries.len() as u64) as usize]
    }

    fn peers(&self) -> &[SocketAddr] {
        &self.entries
    }
}

/// A sandboxed module's loopback socket: every flow of the overlay goes to
/// it, and only it hands packets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModule {
    addr: [SocketAddr; 1],
}

impl LocalModule {
    pub fn new(port: u16) -> LocalModule {
        LocalModule {
            addr: [SocketAddr::from(([127, 0, 0, 1], port))],
        }
    }
}

impl OverlayPath for LocalModule {
    fn next_hop(&self, _flow: &FlowKey) -> SocketAddr {
        self.addr[0]
    }

    fn peers(&self) -> &[SocketAddr] {
        &self.addr
    }
}

/// A joined overlay as the packet path uses it.
#[derive(Debug)]
pub struct JoinedOverlay {
    pub id: OverlayId,
    pub name: String,
    /// Sent in front of every packet.
    pub shim: Vec<u8>,
    pub path: Box<dyn OverlayPath>,
    /// A monitor module's overlay: it decides for metric rules that name
    /// it, and is no carrier the built-in Monitor would choose.
    pub monitor: bool,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Flows carried now (the packet threads count them in and out).
    pub flows: AtomicU64,
    /// The smallest path MTU toward its entry nodes, as the OS last knew
    /// it (0: unknown); new flows' MSS is clamped to fit it.
    pub path_mtu: std::sync::atomic::AtomicU16,
    /// The overlay's code module, when it has one.
    pub module: Option<ModuleLink>,
    /// A WireGuard overlay's peers and tunnel addresses: its packets are
    /// sealed for a peer instead of sent behind a shim.
    pub wireguard: Option<Arc<super::wireguard::WireGuardLink>>,
    /// The user asked that flows never fall back to the underlay (while a
    /// code module restarts, or a WireGuard peer is down).
    pub pinned: bool,
}

/// How the packet path sees an overlay's code module.
#[derive(Debug, Clone)]
pub struct ModuleLink {
    /// Whether the module runs now.
    pub up: Arc<std::sync::atomic::AtomicBool>,
}

impl JoinedOverlay {
    pub fn new(id: OverlayId, name: String, path: Box<dyn OverlayPath>, shim: Vec<u8>) -> JoinedOverlay {
        JoinedOverlay {
            id,
            name,
            shim,
            path,
            monitor: false,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            flows: AtomicU64::new(0),
            path_mtu: std::sync::atomic::AtomicU16::new(0),
            module: None,
            wireguard: None,
            pinned: false,
        }
    }

    /// Whether new flows should take the underlay instead: the overlay's
    /// module is down (restarting), or its WireGuard peers are, and the
    /// user did not pin the overlay.
    pub fn falls_back(&self) -> bool {
        !self.pinned && self.is_down()
    }

    /// Whether the overlay cannot carry new flows now: its code module is
    /// restarting, or no WireGuard peer of it answers.
    pub fn is_down(&self) -> bool {
        let module_down = self
            .module
            .as_ref()
            .is_some_and(|m| !m.up.load(std::sync::atomic::Ordering::Relaxed));
        module_down || self.wireguard.as_ref().is_some_and(|w| !w.carries())
    }

    /// What the overlay adds to a packet besides the outer IP and UDP
    /// headers: its shim, or WireGuard's data message header and tag.
    pub fn overhead(&self) -> usize {
        match &self.wireguard {
            Some(_) => oasis_wireguard::DATA_OVERHEAD,
            None => self.shim.len(),
        }
    }

    /// The largest TCP MSS whose segments, encapsulated for this overlay,
    /// still fit an uplink MTU of `mtu`.
    pub fn max_mss(&self, mtu: u16, inner_v6: bool, outer_v6: bool) -> u16 {
        let ip = if inner_v6 { 40 } else { 20 };
        self.max_packet(mtu, outer_v6)
            .saturating_sub(ip + 20)
            .clamp(536, 65_495)
    }

    /// The largest encapsulated packet toward the entry nodes: the narrower
    /// of an uplink MTU of `mtu` and the path, as the OS last knew it.
    pub fn outer_mtu(&self, mtu: u16) -> u16 {
        let path = self.path_mtu.load(std::sync::atomic::Ordering::Relaxed);
        if path == 0 { mtu } else { mtu.min(path) }
    }

    /// The largest packet that, encapsulated for this overlay, fits the
    /// narrower of an uplink MTU of `mtu` and the path toward the entry
    /// nodes: what needs no fragmenting on the way.
    /// A WireGuard overlay's `MTU=` bounds it too.
    pub fn max_packet(&self, mtu: u16, outer_v6: bool) -> u16 {
        let mtu = self.outer_mtu(mtu);
        let overhead = if outer_v6 { 40 } else { 20 } + 8 + self.overhead();
        let fits = usize::from(mtu).saturating_sub(overhead) as u16;
        match self.wireguard.as_ref().and_then(|w| w.mtu) {
            Some(inner) => fits.min(inner),
            None => fits,
        }
    }
}

/// The joined overlays by id, by name and by peer address.
#[derive(Debug, Default)]
pub struct OverlayTable {
    by_id: HashMap<OverlayId, Arc<JoinedOverlay>>,
    by_name: HashMap<String, OverlayId>,
    by_peer: HashMap<SocketAddr, OverlayId>,
    /// Whether any overlay is a WireGuard one: senders skip sealing
    /// entirely while none is.
    wireguard: bool,
}

impl OverlayTable {
    pub fn new(overlays: impl IntoIterator<Item = Arc<JoinedOverlay>>) -> OverlayTable {
        let mut table = OverlayTable::default();
        for overlay in overlays {
            for peer in overlay.path.peers() {
                table.by_peer.insert(canonical(*peer), overlay.id);
            }
            table.by_name.insert(overlay.name.clone(), overlay.id);
            table.wireguard |= overlay.wireguard.is_some();
            table.by_id.insert(overlay.id, overlay);
        }
        table
    }

    pub fn get(&self, id: OverlayId) -> Option<&Arc<JoinedOverlay>> {
        self.by_id.get(&id)
    }

    pub fn id_of(&self, name: &str) -> Option<OverlayId> {
        self.by_name.get(name).copied()
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<JoinedOverlay>> {
        self.get(self.id_of(name)?)
    }

    /// The overlay whose peer sent a datagram from `from`, if any: only
    /// those may hand packets to this host.
    pub fn by_sender(&self, from: SocketAddr) -> Option<&Arc<JoinedOverlay>> {
        self.get(*self.by_peer.get(&canonical(from))?)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<JoinedOverlay>> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn has_wireguard(&self) -> bool {
        self.wireguard
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A joined overlay straight to `entries`, for tests.
#[cfg(test)]
pub(crate) fn test_overlay(id: u32, name: &str, entries: &[&str], shim: usize) -> Arc<JoinedOverlay> {
    let entries = entries.iter().map(|e| e.parse().unwrap()).collect();
    Arc::new(JoinedOverlay::new(
        OverlayId(id),
        name.into(),
        Box::new(EntryNodes::new(entries).unwrap()),
        vec![0; shim],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(id: u32, name: &str, entries: &[&str], shim: usize) -> Arc<JoinedOverlay> {
        test_overlay(id, name, entries, shim)
    }

    #[test]
    fn senders_are_matched_by_address_and_port() {
        let table = OverlayTable::new([overlay(1, "a", &["192.0.2.1:7400"], 0)]);
        let entry: SocketAddr = "192.0.2.1:7400".parse().unwrap();
        assert_eq!(table.by_sender(entry).unwrap().name, "a");
        assert_eq!(
            table
                .by_sender("[::ffff:192.0.2.1]:7400".parse().unwrap())
                .unwrap()
                .name,
            "a"
        );
        assert!(table.by_sender("192.0.2.1:7401".parse().unwrap()).is_none());
        assert!(table.by_sender("192.0.2.2:7400".parse().unwrap()).is_none());
        assert_eq!(table.id_of("a"), Some(OverlayId(1)));
        assert!(table.by_name("b").is_none());
    }

    #[test]
    fn a_flow_keeps_its_entry_node_and_flows_spread() {
        let nodes = EntryNodes::new(vec![
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:1".parse().unwrap(),
        ])
        .unwrap();
        let key = |sport| FlowKey::v4([10, 0, 0, 1], [203, 0, 113, 1], 6, sport, 443);
        assert_eq!(nodes.next_hop(&key(1000)), nodes.next_hop(&key(1000)));
        let used: std::collections::HashSet<SocketAddr> =
            (1000..1100).map(|p| nodes.next_hop(&key(p))).collect();
        assert_eq!(used.len(), 2);
        assert!(EntryNodes::new(vec![]).is_none());
    }

    #[test]
    fn mss_leaves_room_for_the_encapsulation() {
        let overlay = overlay(1, "a", &["192.0.2.1:1"], 8);
        assert_eq!(overlay.max_mss(1500, false, false), 1500 - 20 - 20 - 20 - 8 - 8);
        assert_eq!(overlay.max_mss(1500, true, true), 1500 - 40 - 20 - 40 - 8 - 8);
        assert_eq!(
            overlay.max_mss(300, true, true),
            536,
            "never below the TCP minimum"
        );
        // A narrower path toward the entry nodes than the uplink wins.
        overlay.path_mtu.store(1280, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(overlay.max_mss(1500, false, false), 1280 - 20 - 20 - 20 - 8 - 8);
        assert_eq!(overlay.max_mss(1000, false, false), 1000 - 20 - 20 - 20 - 8 - 8);
    }
}
