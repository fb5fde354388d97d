//! Overlay specifications: the XML document an overlay operator publishes at
//! a URL, checked into what joining one stores. The schema is in
//! docs/overlays.md.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use super::LocalAddresses;

use oasis_common::MAX_SHIM_LEN;
use serde::{Deserialize, Serialize};

/// Largest specification `overlay add` accepts.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
pub const MAX_ENTRIES: usize = 16;

/// A checked overlay specification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// The name the operator gave the overlay (informational; users join
    /// under a name of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Entry nodes as `host:port`; hosts may be names, resolved on join
    /// and at every daemon start. Empty only for a monitor module's
    /// overlay, which carries nothing itself.
    pub entries: Vec<String>,
    /// Bytes in front of every packet the overlay carries.
    #[serde(default)]
    pub shim_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleSpec>,
    /// The overlay's entry nodes speak WireGuard (`<wireguard>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireGuardSpec>,
}

/// A WireGuard transport: each entry node's public key, and the address a
/// client uses inside the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireGuardSpec {
    /// Each entry's public key, in the entries' order.
    pub keys: Vec<String>,
    /// This host's address inside the tunnel (an exit that NATs takes
    /// any; a peer that routes by it assigns one).
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u16>,
}

/// The tunnel address a client uses when the specification names none.
pub const DEFAULT_TUNNEL_ADDRESS: &str = "10.87.0.1/32";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSpec {
    pub url: String,
    /// Hex SHA-256 of the module's bytes; a module that differs is refused.
    pub sha256: String,
    pub kind: ModuleKind,
    /// Read and forgotten: config files of versions that ran monitor
    /// modules as programs of their own kept their loopback port here.
    #[serde(default, skip_serializing, rename = "port")]
    pub legacy_port: Option<u16>,
}

impl OverlaySpec {
    /// Whether the overlay is a monitor module's, which decides for metric
    /// rules and carries nothing itself.
    pub fn is_monitor(&self) -> bool {
        self.module
            .as_ref()
            .is_some_and(|m| m.kind == ModuleKind::Monitor)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    /// Carries packets for the overlay.
    Overlay,
    /// Measures carriers for metric rules.
    Monitor,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("the specification is not well-formed XML for an <overlay> element: {0}")]
    Xml(String),
    #[error("the specification is {0} bytes; the limit is {MAX_SPEC_BYTES}")]
    TooLarge(usize),
    #[error("<overlay> has no <entry>: an overlay needs at least one entry node")]
    NoEntries,
    #[error("<overlay> has {0} <entry> elements; at most {MAX_ENTRIES}")]
    TooManyEntries(usize),
    #[error("<entry> {index}: host {host:?} is not an IP address or host name")]
    BadHost { index: usize, host: String },
    #[error("<entry> {index}: port {port:?} is not a port number 1-65535")]
    BadPort { index: usize, port: String },
    #[error(
        "<entry> {index}: {host:?} is {why}; an entry node must be a unicast address of another host, \
         or claimed traffic would go where nobody meant it to"
    )]
    UnfitEntry {
        index: usize,
        host: String,
        why: &'static str,
    },
    #[error("<entry> {index}: cannot resolve host {host:?}: {reason}")]
    Unresolved {
        index: usize,
        host: String,
        reason: String,
    },
    #[error("<shim length={0:?}>: the shim length must be a number of bytes from 0 to {MAX_SHIM_LEN}")]
    BadShim(String),
    #[error("<module url={0:?}>: the module URL must be http:// or https://")]
    BadModuleUrl(String),
    #[error("<module sha256={0:?}>: give the module's SHA-256 as 64 hex digits")]
    BadModuleHash(String),
    #[error("<module kind={0:?}>: the kind is `overlay` or `monitor`")]
    BadModuleKind(String),
    #[error(
        "<entry> {index}: no WireGuard public key: give public-key=\"BASE64\" on the entry or on <wireguard>"
    )]
    NoWireGuardKey { index: usize },
    #[error("<entry> {index}: public-key is not a WireGuard key (32 bytes in base64, 44 characters)")]
    BadWireGuardKey { index: usize },
    #[error("<wireguard address={0:?}>: give this host's tunnel address, e.g. 10.87.0.1/32")]
    BadWireGuardAddress(String),
    #[error("<wireguard keepalive={0:?}>: give seconds, 1-65535")]
    BadWireGuardKeepalive(String),
    #[error(
        "<wireguard> with {0}: a WireGuard overlay seals packets itself, with no shim and no code module"
    )]
    WireGuardWith(&'static str),
}

/// The document as written; checked into an [`OverlaySpec`].
#[derive(Deserialize)]
#[serde(rename = "overlay")]
struct SpecXml {
    #[serde(rename = "@name", default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(rename = "entry", default)]
    entries: Vec<EntryXml>,
    #[serde(default)]
    shim: Option<ShimXml>,
    #[serde(default)]
    module: Option<ModuleXml>,
    #[serde(default)]
    wireguard: Option<WireGuardXml>,
}

#[derive(Deserialize)]
struct EntryXml {
    #[serde(rename = "@host")]
    host: String,
    #[serde(rename = "@port")]
    port: String,
    #[serde(rename = "@public-key", default)]
    public_key: Option<String>,
}

#[derive(Deserialize)]
struct WireGuardXml {
    #[serde(rename = "@public-key", default)]
    public_key: Option<String>,
    #[serde(rename = "@address", default)]
    address: Option<String>,
    #[serde(rename = "@keepalive", default)]
    keepalive: Option<String>,
}

#[derive(Deserialize)]
struct ShimXml {
    #[serde(rename = "@length")]
    length: String,
}

#[derive(Deserialize)]
struct ModuleXml {
    #[serde(rename = "@url")]
    url: String,
    #[serde(rename = "@sha256")]
    sha256: String,
    #[serde(rename = "@kind", default)]
    kind: Option<String>,
}

impl OverlaySpec {
    /// Parses and checks a specification document.
    pub fn parse(text: &str) -> Result<OverlaySpec, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge(text.len()));
        }
        let xml: SpecXml = quick_xml::de::from_str(text).map_err(|e| SpecError::Xml(e.to_string()))?;
        let module = xml.module.map(check_module).transpose()?;
        let monitor_only = module.as_ref().is_some_and(|m| m.kind == ModuleKind::Monitor);
        if xml.entries.is_empty() && !monitor_only {
            return Err(SpecError::NoEntries);
        }
        if xml.entries.len() > MAX_ENTRIES {
            return Err(SpecError::TooManyEntries(xml.entries.len()));
        }
        let mut entries = Vec::new();
        for (i, entry) in xml.entries.iter().enumerate() {
            let index = i + 1;
            let host = entry.host.trim();
            if !valid_host(host) {
                return Err(SpecError::BadHost {
                    index,
                    host: host.into(),
                });
            }
            let port: u16 = entry
                .port
                .trim()
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| SpecError::BadPort {
                    index,
                    port: entry.port.clone(),
                })?;
            let literal = host.parse::<IpAddr>().ok();
            if let Some(why) = literal.and_then(|ip| unfit_entry(ip, &LocalAddresses::default())) {
                return Err(SpecError::UnfitEntry {
                    index,
                    host: host.into(),
                    why,
                });
            }
            entries.push(match literal {
                Some(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                _ => format!("{host}:{port}"),
            });
        }
        let shim_len = match &xml.shim {
            None => 0,
            Some(shim) => shim
                .length
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= MAX_SHIM_LEN)
                .ok_or_else(|| SpecError::BadShim(shim.length.clone()))?,
        };
        let wireguard = match &xml.wireguard {
            None => None,
            Some(wg) => {
                if module.is_some() {
                    return Err(SpecError::WireGuardWith("a <module>"));
                }
                if shim_len != 0 {
                    return Err(SpecError::WireGuardWith("a <shim>"));
                }
                Some(check_wireguard(wg, &xml.entries)?)
            }
        };
        Ok(OverlaySpec {
            wireguard,
            name: xml.name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
            description: xml
                .description
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty()),
            entries,
            shim_len,
            module,
        })
    }

    /// The entry nodes' socket addresses (blocking: may ask the resolver).
    /// A name that resolves to an address no entry node may have (see
    /// [`unfit_entry`]; `own` are this host's addresses) is refused.
    pub fn resolve_entries(&self, own: &LocalAddresses) -> Result<Vec<SocketAddr>, SpecError> {
        let mut out = Vec::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let unresolved = |reason: String| SpecError::Unresolved {
                index: i + 1,
                host: entry.clone(),
                reason,
            };
            let addr = entry
                .to_socket_addrs()
                .map_err(|e| unresolved(e.to_string()))?
                .next()
                .ok_or_else(|| unresolved("no address".into()))?;
            if let Some(why) = unfit_entry(addr.ip(), own) {
                return Err(SpecError::UnfitEntry {
                    index: i + 1,
                    host: format!("{entry} ({})", addr.ip()),
                    why,
                });
            }
            out.push(addr);
        }
        Ok(out)
    }
}

/// Why `ip` cannot be an entry node, if it cannot: encapsulated traffic
/// sent there would reach every host on a link (multicast, broadcast), stay
/// on this host (loopback, its own addresses), or go nowhere defined.
pub fn unfit_entry(ip: IpAddr, own: &LocalAddresses) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if own.contains(&ip) {
        return Some("one of this host's own addresses");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.octets()[0] == 0 => {
            Some("an unspecified address (0.0.0.0/8)")
        }
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.octets()[0] >= 240 => Some("a reserved address (240.0.0.0/4)"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("the loopback address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        _ => None,
    }
}

fn check_wireguard(wg: &WireGuardXml, entries: &[EntryXml]) -> Result<WireGuardSpec, SpecError> {
    let mut keys = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let index = i + 1;
        let key = entry
            .public_key
            .as_deref()
            .or(wg.public_key.as_deref())
            .ok_or(SpecError::NoWireGuardKey { index })?;
        let key = oasis_wireguard::PublicKey::parse(key).map_err(|_| SpecError::BadWireGuardKey { index })?;
        keys.push(key.to_string());
    }
    let address = wg
        .address
        .as_deref()
        .map(str::trim)
        .unwrap_or(DEFAULT_TUNNEL_ADDRESS)
        .to_string();
    let parsed = address
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| address.parse::<IpAddr>().ok().map(ipnet::IpNet::from));
    if parsed.is_none() {
        return Err(SpecError::BadWireGuardAddress(address));
    }
    let keepalive = match wg.keepalive.as_deref().map(str::trim) {
        None => None,
        Some(text) => Some(
            text.parse::<u16>()
                .ok()
                .filter(|k| *k > 0)
                .ok_or_else(|| SpecError::BadWireGuardKeepalive(text.into()))?,
        ),
    };
    Ok(WireGuardSpec {
        keys,
        address,
        keepalive,
    })
}

/// The wg-quick file a join makes for a specification with a WireGuard
/// transport: a new key pair, the specification's tunnel address, each
/// entry node a peer for everything.
pub fn wg_quick_for(spec: &OverlaySpec, private: &oasis_wireguard::PrivateKey) -> Option<String> {
    let wg = spec.wireguard.as_ref()?;
    let mut text = format!(
        "[Interface]\nPrivateKey = {}\nAddress = {}\n",
        private.to_base64(),
        wg.address
    );
    for (entry, key) in spec.entries.iter().zip(&wg.keys) {
        text += &format!("\n[Peer]\nPublicKey = {key}\nEndpoint = {entry}\nAllowedIPs = 0.0.0.0/0, ::/0\n");
        if let Some(keepalive) = wg.keepalive {
            text += &format!("PersistentKeepalive = {keepalive}\n");
        }
    }
    Some(text)
}

fn check_module(module: ModuleXml) -> Result<ModuleSpec, SpecError> {
    let url = module.url.trim().to_string();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(SpecError::BadModuleUrl(url));
    }
    let sha256 = module.sha256.trim().to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SpecError::BadModuleHash(module.sha256));
    }
    let kind = match module.kind.as_deref().map(str::trim) {
        None | Some("overlay") => ModuleKind::Overlay,
        Some("monitor") => ModuleKind::Monitor,
        Some(other) => return Err(SpecError::BadModuleKind(other.into())),
    };
    Ok(ModuleSpec {
        url,
        sha256,
        kind,
        legacy_port: None,
    })
}

/// An IP address, or a DNS name made of letters, digits, '-' and '.'.
fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        })
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"<?xml version="1.0"?>
<overlay name="campus-detour">
  <description>Detour through the campus relay</description>
  <entry host="192.0.2.10" port="7400"/>
  <entry host="2001:db8::10" port="7400"/>
  <entry host="relay.example.org" port="7400"/>
  <shim length="16"/>
  <module url="https://osp.example/detour.wasm" kind="overlay"
          sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"/>
</overlay>"#;

    #[test]
    fn parses_a_full_specification() {
        let spec = OverlaySpec::parse(GOOD).unwrap();
        assert_eq!(spec.name.as_deref(), Some("campus-detour"));
        assert_eq!(
            spec.entries,
            vec!["192.0.2.10:7400", "[2001:db8::10]:7400", "relay.example.org:7400"]
        );
        assert_eq!(spec.shim_len, 16);
        assert_eq!(spec.module.as_ref().unwrap().kind, ModuleKind::Overlay);
    }

    #[test]
    fn a_wireguard_transport_gives_each_entry_a_key() {
        let key = oasis_wireguard::PrivateKey::generate().public().to_string();
        let other = oasis_wireguard::PrivateKey::generate().public().to_string();
        let text = format!(
            r#"<overlay><entry host="192.0.2.1" port="51820"/><entry host="192.0.2.2" port="51820" public-key="{other}"/>
               <wireguard public-key="{key}" keepalive="25"/></overlay>"#
        );
        let spec = OverlaySpec::parse(&text).unwrap();
        let wg = spec.wireguard.as_ref().unwrap();
        assert_eq!(wg.keys, [key.clone(), other.clone()]);
        assert_eq!(
            (wg.address.as_str(), wg.keepalive),
            (DEFAULT_TUNNEL_ADDRESS, Some(25))
        );
        let private = oasis_wireguard::PrivateKey::generate();
        let conf = oasis_wireguard::conf::parse(&wg_quick_for(&spec, &private).unwrap()).unwrap();
        assert_eq!(conf.peers.len(), 2);
        assert_eq!(conf.peers[1].public_key.to_string(), other);
        assert_eq!(conf.peers[0].endpoint.to_string(), "192.0.2.1:51820");
        assert_eq!(conf.interface.private_key.public(), private.public());
        for (bad, expected) in [
            (
                r#"<overlay><entry host="192.0.2.1" port="1"/><wireguard/></overlay>"#.to_string(),
                "<entry> 1: no WireGuard public key",
            ),
            (
                r#"<overlay><entry host="192.0.2.1" port="1" public-key="abc"/><wireguard/></overlay>"#
                    .to_string(),
                "<entry> 1: public-key is not",
            ),
            (
                format!(
                    r#"<overlay><entry host="192.0.2.1" port="1"/><wireguard public-key="{key}" address="here"/></overlay>"#
                ),
                "<wireguard address=\"here\">",
            ),
            (
                format!(
                    r#"<overlay><entry host="192.0.2.1" port="1"/><shim length="4"/><wireguard public-key="{key}"/></overlay>"#
                ),
                "with a <shim>",
            ),
        ] {
            let error = OverlaySpec::parse(&bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn minimal_specification() {
        let spec = OverlaySpec::parse(r#"<overlay><entry host="10.0.0.1" port="1"/></overlay>"#).unwrap();
        assert_eq!((spec.shim_len, &spec.module, &spec.name), (0, &None, &None));
        assert_eq!(
            spec.resolve_entries(&LocalAddresses::default()).unwrap(),
            vec!["10.0.0.1:1".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("<overlay>", "not well-formed"),
            ("<overlay></overlay>", "no <entry>"),
            (
                r#"<overlay><entry host="10.0.0.1" port="70000"/></overlay>"#,
                "<entry> 1: port",
            ),
            (
                r#"<overlay><entry host="10.0.0.1" port="1"/><entry host="bad host!" port="1"/></overlay>"#,
                "<entry> 2: host",
            ),
            (
                r#"<overlay><entry host="999.1.1.1" port="1"/></overlay>"#,
                "<entry> 1: host",
            ),
            (
                r#"<overlay><entry host="10.0.0.1" port="1"/><shim length="-1"/></overlay>"#,
                "<shim length",
            ),
            (
                r#"<overlay><entry host="10.0.0.1" port="1"/><shim length="65"/></overlay>"#,
                "<shim length",
            ),
            (
                r#"<overlay><entry host="10.0.0.1" port="1"/><module url="ftp://x" sha256="00"/></overlay>"#,
                "module URL",
            ),
            (
                r#"<overlay><entry host="10.0.0.1" port="1"/><module url="http://x/m.wasm" sha256="00"/></overlay>"#,
                "SHA-256",
            ),
            (r#"<overlay><entry port="1"/></overlay>"#, "not well-formed"),
        ];
        for (text, expected) in cases {
            let err = OverlaySpec::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: expected {expected:?} in {err:?}");
        }
        let huge = format!("<overlay>{}</overlay>", " ".repeat(MAX_SPEC_BYTES));
        assert!(matches!(OverlaySpec::parse(&huge), Err(SpecError::TooLarge(_))));
    }

    #[test]
    fn entry_nodes_must_be_unicast_addresses_of_other_hosts() {
        for (host, why) in [
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("169.254.1.1", "link-local"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
        ] {
            let text = format!(
                r#"<overlay><entry host="10.0.0.1" port="1"/><entry host="{host}" port="7400"/></overlay>"#
            );
            let err = OverlaySpec::parse(&text).unwrap_err().to_string();
            assert!(err.contains("<entry> 2") && err.contains(why), "{host}: {err}");
        }
        // Names are checked once resolved, against this host's addresses too.
        let spec = OverlaySpec::parse(r#"<overlay><entry host="localhost" port="7400"/></overlay>"#).unwrap();
        let err = spec
            .resolve_entries(&LocalAddresses::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback") && err.contains("localhost"), "{err}");
        let spec = OverlaySpec::parse(r#"<overlay><entry host="192.0.2.7" port="7400"/></overlay>"#).unwrap();
        let own: LocalAddresses = ["192.0.2.7".parse().unwrap()].into();
        let err = spec.resolve_entries(&own).unwrap_err().to_string();
        assert!(err.contains("own addresses"), "{err}");
        assert!(spec.resolve_entries(&LocalAddresses::default()).is_ok());
    }

    #[test]
    fn a_monitor_module_needs_no_entries_and_a_carrying_one_does() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let spec = OverlaySpec::parse(&format!(
            r#"<overlay><shim length="16"/><module url="http://x/m.wasm" sha256="{hash}" kind="monitor"/></overlay>"#
        ))
        .unwrap();
        assert!(spec.is_monitor());
        assert!(spec.entries.is_empty());
        let text =
            format!(r#"<overlay><module url="http://x/m.wasm" sha256="{hash}" kind="spy"/></overlay>"#);
        let err = OverlaySpec::parse(&text).unwrap_err().to_string();
        assert!(err.contains("`overlay` or `monitor`"), "{err}");
        // A module that carries traffic does not replace the entry nodes.
        let text = format!(r#"<overlay><module url="http://x/m.wasm" sha256="{hash}"/></overlay>"#);
        assert_eq!(OverlaySpec::parse(&text), Err(SpecError::NoEntries));
    }

    #[test]
    fn a_stored_monitor_of_an_older_version_still_loads() {
        let yaml = "entries: []\nshim_len: 16\nmodule:\n  url: http://x/m.wasm\n  sha256: ab\n  kind: monitor\n  port: 760\n";
        let spec: OverlaySpec = serde_yaml::from_str(yaml).unwrap();
        assert!(spec.is_monitor());
        assert!(
            !serde_yaml::to_string(&spec).unwrap().contains("port"),
            "written back without it"
        );
    }

    #[test]
    fn stored_form_round_trips_through_yaml() {
        let spec = OverlaySpec::parse(GOOD).unwrap();
        let yaml = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(serde_yaml::from_str::<OverlaySpec>(&yaml).unwrap(), spec);
    }
}
