//! The wg-quick file users already have (`wg-quick(8)`): `[Interface]`
//! with this host's key and tunnel addresses, one `[Peer]` per peer. Read
//! whole and checked before anything is joined; an error names the line.
//! Keys and section names are case-insensitive, as `wg` reads them; `#`
//! starts a comment.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::key::{KeyError, PresharedKey, PrivateKey, PublicKey};

/// The largest file read: a wg-quick file is a few hundred bytes.
pub const MAX_CONF_BYTES: usize = 64 * 1024;
/// Peers one overlay may have (each is an entry node).
pub const MAX_PEERS: usize = 16;

/// A checked wg-quick file.
#[derive(Clone, Debug)]
pub struct WgQuick {
    pub interface: Interface,
    pub peers: Vec<Peer>,
    /// Lines read and not used, with why (scripts are never run).
    pub ignored: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Interface {
    pub private_key: PrivateKey,
    /// This host's addresses inside the tunnel (`Address=`).
    pub addresses: Vec<IpNet>,
    /// The peer network's DNS servers (`DNS=` entries that are addresses).
    pub dns: Vec<IpAddr>,
    /// `DNS=` entries that are names: search domains.
    pub dns_search: Vec<String>,
    pub mtu: Option<u16>,
}

#[derive(Clone, Debug)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// `host:port` as written: names are resolved when the overlay is
    /// joined and at every start.
    pub endpoint: Endpoint,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// Where its `[Peer]` starts, for messages.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => write!(f, "[{}]:{}", self.host, self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the file is {0} bytes; a wg-quick file is at most {MAX_CONF_BYTES}")]
    TooLarge(usize),
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("no [Interface] section: a wg-quick file starts with one, holding PrivateKey and Address")]
    NoInterface,
    #[error("[Interface] (line {line}) has no {key}")]
    InterfaceLacks { line: usize, key: &'static str },
    #[error("no [Peer] section: the file must name the peer to talk to")]
    NoPeer,
    #[error("[Peer] at line {line} has no {key}{hint}")]
    PeerLacks {
        line: usize,
        key: &'static str,
        hint: &'static str,
    },
    #[error("{0} [Peer] sections; at most {MAX_PEERS}")]
    TooManyPeers(usize),
}

fn at(line: usize, what: impl Into<String>) -> ConfError {
    ConfError::Line {
        line,
        what: what.into(),
    }
}

fn key_at<T>(line: usize, name: &str, parsed: Result<T, KeyError>) -> Result<T, ConfError> {
    parsed.map_err(|e| at(line, format!("{name}: {e}")))
}

/// What reading a file found beside its contents.
#[derive(Debug, Default)]
pub struct Warnings {
    /// The file may be read by others than its owner (wg-quick warns too).
    pub readable_by_others: bool,
}

/// Reads and checks a wg-quick file. A file others may read is accepted,
/// with a warning for the caller to show.
pub fn read(path: &Path) -> Result<(WgQuick, Warnings), ConfError> {
    let read_error = |source| ConfError::Read {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if meta.len() > MAX_CONF_BYTES as u64 {
        return Err(ConfError::TooLarge(meta.len() as usize));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    #[cfg(unix)]
    let readable_by_others = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o077 != 0
    };
    #[cfg(not(unix))]
    let readable_by_others = false;
    let warnings = Warnings { readable_by_others };
    Ok((parse(&text)?, warnings))
}

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<PresharedKey>,
    endpoint: Option<Endpoint>,
    allowed_ips: Option<Vec<IpNet>>,
    keepalive: Option<u16>,
}

impl PeerDraft {
    fn finish(self) -> Result<Peer, ConfError> {
        let lacks = |key, hint| ConfError::PeerLacks {
            line: self.line,
            key,
            hint,
        };
        Ok(Peer {
            public_key: self.public_key.ok_or_else(|| lacks("PublicKey", ""))?,
            endpoint: self.endpoint.clone().ok_or_else(|| {
                lacks(
                    "Endpoint",
                    ": Oasis starts the tunnel, so it must know where the peer listens (host:port)",
                )
            })?,
            allowed_ips: self
                .allowed_ips
                .clone()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| lacks("AllowedIPs", ": without it the peer carries nothing"))?,
            preshared_key: self.preshared_key,
            persistent_keepalive: self.keepalive,
            line: self.line,
        })
    }
}

/// Checks a wg-quick file's text.
pub fn parse(text: &str) -> Result<WgQuick, ConfError> {
    if text.len() > MAX_CONF_BYTES {
        return Err(ConfError::TooLarge(text.len()));
    }
    let mut section = Section::None;
    let mut interface_line = None;
    let mut private_key = None;
    let mut addresses = Vec::new();
    let (mut dns, mut dns_search) = (Vec::new(), Vec::new());
    let mut mtu = None;
    let mut peers: Vec<PeerDraft> = Vec::new();
    let mut ignored = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(name) = content.strip_prefix('[') {
            let name = name
                .strip_suffix(']')
                .ok_or_else(|| at(line, "a section header is `[Interface]` or `[Peer]`"))?;
            section = match name.trim().to_ascii_lowercase().as_str() {
                "interface" if interface_line.is_some() => {
                    return Err(at(line, "a second [Interface]: a file describes one interface"));
                }
                "interface" => {
                    interface_line = Some(line);
                    Section::Interface
                }
                "peer" => {
                    peers.push(PeerDraft {
                        line,
                        ..PeerDraft::default()
                    });
                    Section::Peer
                }
                other => {
                    return Err(at(
                        line,
                        format!("unknown section [{other}]: use [Interface] or [Peer]"),
                    ));
                }
            };
            continue;
        }
        let (key, value) = content
            .split_once('=')
            .ok_or_else(|| at(line, "expected `Key = Value`"))?;
        let (key, value) = (key.trim(), value.trim());
        let lower = key.to_ascii_lowercase();
        match section {
            Section::None => return Err(at(line, format!("{key} comes before any [Interface] or [Peer]"))),
            Section::Interface => match lower.as_str() {
                "privatekey" => private_key = Some(key_at(line, key, PrivateKey::parse(value))?),
                "address" => {
                    for item in list(value) {
                        addresses.push(net(item).ok_or_else(|| {
                            at(
                                line,
                                format!("Address: {item:?} is not an address with an optional /prefix"),
                            )
                        })?);
                    }
                }
                "dns" => {
                    for item in list(value) {
                        match item.parse::<IpAddr>() {
                            Ok(addr) => dns.push(addr),
                            Err(_) => dns_search.push(item.to_string()),
                        }
                    }
                }
                "mtu" => {
                    mtu = Some(value.parse::<u16>().ok().filter(|m| *m >= 576).ok_or_else(|| {
                        at(line, format!("MTU: {value:?} is not a number from 576 to 65535"))
                    })?)
                }
                "listenport" | "fwmark" | "table" | "saveconfig" => ignored.push(format!(
                    "line {line}: {key} (Oasis sends from its own socket and routes by its rules)"
                )),
                "preup" | "postup" | "predown" | "postdown" => {
                    ignored.push(format!("line {line}: {key} (Oasis never runs a file's commands)"))
                }
                _ => return Err(at(line, format!("unknown [Interface] key {key}"))),
            },
            Section::Peer => {
                let peer = peers.last_mut().expect("a [Peer] section has a draft");
                match lower.as_str() {
                    "publickey" => peer.public_key = Some(key_at(line, key, PublicKey::parse(value))?),
                    "presharedkey" => {
                        peer.preshared_key = Some(key_at(line, key, PresharedKey::parse(value))?)
                    }
                    "endpoint" => {
                        peer.endpoint = Some(endpoint(value).ok_or_else(|| {
                            at(
                                line,
                                format!("Endpoint: {value:?} is not host:port (an IPv6 address in brackets)"),
                            )
                        })?)
                    }
                    "allowedips" => {
                        let mut nets = Vec::new();
                        for item in list(value) {
                            nets.push(net(item).ok_or_else(|| {
                                at(
                                    line,
                                    format!(
                                        "AllowedIPs: {item:?} is not an address with an optional /prefix"
                                    ),
                                )
                            })?);
                        }
                        peer.allowed_ips.get_or_insert_with(Vec::new).extend(nets);
                    }
                    "persistentkeepalive" => {
                        peer.keepalive = match value {
                            "off" | "0" => None,
                            _ => Some(value.parse::<u16>().map_err(|_| {
                                at(
                                    line,
                                    format!(
                                        "PersistentKeepalive: {value:?} is not seconds (1-65535) or `off`"
                                    ),
                                )
                            })?),
                        }
                    }
                    _ => return Err(at(line, format!("unknown [Peer] key {key}"))),
                }
            }
        }
    }
    let interface_line = interface_line.ok_or(ConfError::NoInterface)?;
    let private_key = private_key.ok_or(ConfError::InterfaceLacks {
        line: interface_line,
        key: "PrivateKey",
    })?;
    if addresses.is_empty() {
        return Err(ConfError::InterfaceLacks {
            line: interface_line,
            key: "Address (this host's address inside the tunnel)",
        });
    }
    if peers.is_empty() {
        return Err(ConfError::NoPeer);
    }
    if peers.len() > MAX_PEERS {
        return Err(ConfError::TooManyPeers(peers.len()));
    }
    let peers = peers
        .into_iter()
        .map(PeerDraft::finish)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WgQuick {
        interface: Interface {
            private_key,
            addresses,
            dns,
            dns_search,
            mtu,
        },
        peers,
        ignored,
    })
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `10.0.0.2/32`, or a bare address as its own /32 or /128.
fn net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn endpoint(text: &str) -> Option<Endpoint> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')?
            .parse::<std::net::Ipv6Addr>()
            .ok()?
            .to_string(),
        // An IPv6 address needs brackets, or its last group reads as the port.
        None if host.contains(':') => return None,
        None => host.to_string(),
    };
    (!host.is_empty()).then_some(Endpoint { host, port })
}

impl WgQuick {
    /// The file as wg-quick reads it, for the key store (mode 0600). The
    /// private key is in it.
    pub fn render(&self) -> String {
        let i = &self.interface;
        let mut text = String::from("[Interface]\n");
        text += &format!("PrivateKey = {}\n", i.private_key.to_base64());
        let join = |items: Vec<String>| items.join(", ");
        text += &format!(
            "Address = {}\n",
            join(i.addresses.iter().map(|a| a.to_string()).collect())
        );
        let dns: Vec<String> = i
            .dns
            .iter()
            .map(|d| d.to_string())
            .chain(i.dns_search.iter().cloned())
            .collect();
        if !dns.is_empty() {
            text += &format!("DNS = {}\n", join(dns));
        }
        if let Some(mtu) = i.mtu {
            text += &format!("MTU = {mtu}\n");
        }
        for peer in &self.peers {
            text += "\n[Peer]\n";
            text += &format!("PublicKey = {}\n", peer.public_key);
            if let Some(psk) = &peer.preshared_key {
                text += &format!("PresharedKey = {}\n", psk.to_base64());
            }
            text += &format!("Endpoint = {}\n", peer.endpoint);
            text += &format!(
                "AllowedIPs = {}\n",
                join(peer.allowed_ips.iter().map(|a| a.to_string()).collect())
            );
            if let Some(keepalive) = peer.persistent_keepalive {
                text += &format!("PersistentKeepalive = {keepalive}\n");
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    fn home() -> String {
        format!(
            "# home router\n[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.66.0.2/32, fd66::2/128\n\
             DNS = 10.66.0.1, home.lan\nMTU = 1420\nPostUp = iptables -A FORWARD\n\n\
             [peer]\npublickey = {PUBLIC}\nPresharedKey = {PRIVATE}\nEndpoint = [2001:db8::1]:51820\n\
             AllowedIPs = 0.0.0.0/0, ::/0 # everything\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn reads_what_wg_quick_reads() {
        let conf = parse(&home()).unwrap();
        let i = &conf.interface;
        assert_eq!(i.private_key.public().to_string(), PUBLIC);
        assert_eq!(
            i.addresses,
            [
                "10.66.0.2/32".parse::<IpNet>().unwrap(),
                "fd66::2/128".parse().unwrap()
            ]
        );
        assert_eq!(i.dns, ["10.66.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(i.dns_search, ["home.lan"]);
        assert_eq!(i.mtu, Some(1420));
        let peer = &conf.peers[0];
        assert_eq!(peer.public_key.to_string(), PUBLIC);
        assert!(peer.preshared_key.is_some());
        assert_eq!(peer.endpoint.to_string(), "[2001:db8::1]:51820");
        assert_eq!(peer.allowed_ips.len(), 2);
        assert_eq!(peer.persistent_keepalive, Some(25));
        assert_eq!(peer.line, 9);
        assert_eq!(conf.ignored.len(), 1, "{:?}", conf.ignored);
        // What the key store keeps reads back the same.
        let again = parse(&conf.render()).unwrap();
        assert_eq!(again.render(), conf.render());
        assert_eq!(again.peers[0].endpoint, peer.endpoint);
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line() {
        let peer = format!("[Peer]\nPublicKey = {PUBLIC}\nAllowedIPs = 0.0.0.0/0\n");
        let iface = format!("[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.0.0.2\n");
        assert_eq!(
            error(&format!("{iface}{peer}")),
            "[Peer] at line 4 has no Endpoint: Oasis starts the tunnel, so it must know where the peer listens (host:port)"
        );
        let wrong_key = format!(
            "[Interface]\nPrivateKey = {}\nAddress = 10.0.0.2\n",
            &PRIVATE[..40]
        );
        let shown = error(&wrong_key);
        assert!(
            shown.starts_with("line 2: PrivateKey: not a WireGuard key"),
            "{shown}"
        );
        assert!(!shown.contains(&PRIVATE[..40]), "an error never quotes a key");
        // A file cut short: the peer's section has no key yet.
        assert_eq!(
            error(&format!("{iface}[Peer]\nEndp")),
            "line 5: expected `Key = Value`"
        );
        assert_eq!(
            error(&format!(
                "{iface}[Peer]\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 0.0.0.0/0\n"
            )),
            "[Peer] at line 4 has no PublicKey"
        );
        assert_eq!(
            error(&iface),
            "no [Peer] section: the file must name the peer to talk to"
        );
        assert!(error(&peer).starts_with("no [Interface]"));
        assert_eq!(
            error(&format!("[Interface]\nPrivateKey = {PRIVATE}\n{peer}")),
            "[Interface] (line 1) has no Address (this host's address inside the tunnel)"
        );
        assert_eq!(
            error(&format!("{iface}Colour = blue\n{peer}")),
            "line 4: unknown [Interface] key Colour"
        );
        for bad in ["192.0.2.1", "2001:db8::1:51820", "host:0", ":51820", "[::1:5"] {
            let text =
                format!("{iface}[Peer]\nPublicKey = {PUBLIC}\nEndpoint = {bad}\nAllowedIPs = 0.0.0.0/0\n");
            assert!(
                error(&text).starts_with("line 6: Endpoint:"),
                "{bad}: {}",
                error(&text)
            );
        }
        assert!(error(&"#\n".repeat(MAX_CONF_BYTES)).contains("at most"));
    }

    #[test]
    fn names_as_endpoints_and_keepalive_off() {
        let text = format!(
            "[Interface]\nPrivateKey={PRIVATE}\nAddress=10.0.0.2/24\n[Peer]\nPublicKey={PUBLIC}\n\
             Endpoint=vpn.example.net:51820\nAllowedIPs=10.0.0.0/24\nAllowedIPs=192.168.1.0/24\n\
             PersistentKeepalive=off\n"
        );
        let conf = parse(&text).unwrap();
        let peer = &conf.peers[0];
        assert_eq!(peer.endpoint.host, "vpn.example.net");
        assert_eq!(peer.allowed_ips.len(), 2, "AllowedIPs lines add up");
        assert_eq!(peer.persistent_keepalive, None);
    }
}
