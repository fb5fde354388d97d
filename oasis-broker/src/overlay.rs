//! Overlay specifications: the XML document an overlay operator publishes at
//! a URL, and what joining one stores. The schema is in docs/overlays.md.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Serialize};

/// Largest specification `overlay add` accepts.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Longest shim an overlay may ask for.
pub const MAX_SHIM_LEN: usize = 64;
pub const MAX_ENTRIES: usize = 16;

/// A checked overlay specification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlaySpec {
    /// The name the operator gave the overlay (informational; users join
    /// under a name of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Entry nodes as `host:port`; hosts may be names, resolved on join
    /// and at every daemon start.
    pub entries: Vec<String>,
    /// Bytes in front of every packet the overlay carries.
    #[serde(default)]
    pub shim_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<ModuleSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSpec {
    pub url: String,
    /// Hex SHA-256 of the module's bytes; a module that differs is refused.
    pub sha256: String,
    pub kind: ModuleKind,
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
}

#[derive(Deserialize)]
struct EntryXml {
    #[serde(rename = "@host")]
    host: String,
    #[serde(rename = "@port")]
    port: String,
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
        if xml.entries.is_empty() {
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
            entries.push(match host.parse::<IpAddr>() {
                Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
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
        let module = xml.module.map(check_module).transpose()?;
        Ok(OverlaySpec {
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
    pub fn resolve_entries(&self) -> Result<Vec<SocketAddr>, SpecError> {
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
            out.push(addr);
        }
        Ok(out)
    }
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
    Ok(ModuleSpec { url, sha256, kind })
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

/// Why fetching a specification failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("fetching {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("fetching {url}: the specification is larger than {MAX_SPEC_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: {source}")]
    Spec { url: String, source: SpecError },
}

/// Fetches and checks a specification: 10 s in all, at most
/// [`MAX_SPEC_BYTES`], following at most 3 redirects.
pub async fn fetch(url: &str) -> Result<OverlaySpec, FetchError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(FetchError::BadUrl(url.into()));
    }
    let http = |e: reqwest::Error| FetchError::Http {
        url: url.into(),
        reason: e.to_string(),
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .connect_timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(http)?;
    let mut response = client.get(url).send().await.map_err(http)?;
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: url.into(),
            status: response.status().as_u16(),
        });
    }
    if response
        .content_length()
        .is_some_and(|n| n as usize > MAX_SPEC_BYTES)
    {
        return Err(FetchError::TooLarge { url: url.into() });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_SPEC_BYTES {
            return Err(FetchError::TooLarge { url: url.into() });
        }
    }
    let text = String::from_utf8(body).map_err(|_| FetchError::Spec {
        url: url.into(),
        source: SpecError::Xml("the document is not UTF-8".into()),
    })?;
    OverlaySpec::parse(&text).map_err(|source| FetchError::Spec {
        url: url.into(),
        source,
    })
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
    fn minimal_specification() {
        let spec = OverlaySpec::parse(r#"<overlay><entry host="10.0.0.1" port="1"/></overlay>"#).unwrap();
        assert_eq!((spec.shim_len, &spec.module, &spec.name), (0, &None, &None));
        assert_eq!(
            spec.resolve_entries().unwrap(),
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
    fn stored_form_round_trips_through_yaml() {
        let spec = OverlaySpec::parse(GOOD).unwrap();
        let yaml = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(serde_yaml::from_str::<OverlaySpec>(&yaml).unwrap(), spec);
    }
}

/// Why joining an overlay was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    #[error("bad overlay name {0:?}: use letters, digits, - and _ (and not `underlay`)")]
    BadName(String),
    #[error("an overlay named {0:?} is joined already; `oasis overlay del {0}` first")]
    Exists(String),
    #[error("no overlay named {0:?} is joined; `oasis overlay list` shows them")]
    Unknown(String),
    #[error("overlay {name:?} carries rules {rules:?}; delete them first (`oasis rule del ID`)")]
    InUse { name: String, rules: Vec<u32> },
    #[error("--token: the overlay's shim is {shim_len} bytes, so give {shim_len} bytes as {} hex digits", shim_len * 2)]
    BadToken { shim_len: usize },
    #[error("--token: this overlay has no shim to carry a token")]
    TokenWithoutShim,
}

/// Checks a local overlay name as `--via` and `overlay add` take it.
pub fn check_name(name: &str) -> Result<(), JoinError> {
    match name.parse::<crate::rules::Carrier>() {
        Ok(crate::rules::Carrier::Overlay(_)) => Ok(()),
        _ => Err(JoinError::BadName(name.into())),
    }
}

/// The shim bytes sent in front of every packet: the token, or zeros.
pub fn shim_bytes(shim_len: usize, token: Option<&str>) -> Result<Vec<u8>, JoinError> {
    let Some(token) = token else {
        return Ok(vec![0; shim_len]);
    };
    if shim_len == 0 {
        return Err(JoinError::TokenWithoutShim);
    }
    let token = token.trim();
    let bytes: Option<Vec<u8>> = (token.len() == shim_len * 2)
        .then(|| {
            (0..shim_len)
                .map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    bytes.ok_or(JoinError::BadToken { shim_len })
}

/// A joined overlay as the packet path uses it.
#[derive(Debug)]
pub struct JoinedOverlay {
    pub name: String,
    pub entries: Vec<SocketAddr>,
    pub shim: Vec<u8>,
    pub sent: std::sync::atomic::AtomicU64,
    pub received: std::sync::atomic::AtomicU64,
}

impl JoinedOverlay {
    pub fn new(name: String, entries: Vec<SocketAddr>, shim: Vec<u8>) -> JoinedOverlay {
        JoinedOverlay {
            name,
            entries,
            shim,
            sent: Default::default(),
            received: Default::default(),
        }
    }

    /// The entry node of a flow: a flow always uses the same one.
    pub fn entry_for(&self, key: &oasis_common::FlowKey) -> SocketAddr {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        self.entries[(hasher.finish() % self.entries.len() as u64) as usize]
    }

    /// The largest TCP MSS whose segments, encapsulated for this overlay,
    /// still fit an uplink MTU of `mtu`.
    pub fn max_mss(&self, mtu: u16, inner_v6: bool, outer_v6: bool) -> u16 {
        let ip = |v6: bool| if v6 { 40 } else { 20 };
        let overhead = ip(inner_v6) + 20 + ip(outer_v6) + 8 + self.shim.len();
        (usize::from(mtu).saturating_sub(overhead)).clamp(536, 65_495) as u16
    }
}

/// The joined overlays by name and by entry node address.
#[derive(Debug, Default)]
pub struct OverlayTable {
    by_name: std::collections::HashMap<String, std::sync::Arc<JoinedOverlay>>,
    by_entry: std::collections::HashMap<SocketAddr, std::sync::Arc<JoinedOverlay>>,
}

impl OverlayTable {
    pub fn new(overlays: impl IntoIterator<Item = std::sync::Arc<JoinedOverlay>>) -> OverlayTable {
        let mut table = OverlayTable::default();
        for overlay in overlays {
            for entry in &overlay.entries {
                table.by_entry.insert(canonical(*entry), overlay.clone());
            }
            table.by_name.insert(overlay.name.clone(), overlay);
        }
        table
    }

    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<JoinedOverlay>> {
        self.by_name.get(name)
    }

    /// The overlay whose entry node sent a datagram from `from`, if any:
    /// only those may hand packets to this host.
    pub fn by_sender(&self, from: SocketAddr) -> Option<&std::sync::Arc<JoinedOverlay>> {
        self.by_entry.get(&canonical(from))
    }

    pub fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<JoinedOverlay>> {
        self.by_name.values()
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod join_tests {
    use super::*;

    #[test]
    fn tokens_fill_the_shim_exactly() {
        assert_eq!(shim_bytes(4, None).unwrap(), vec![0; 4]);
        assert_eq!(shim_bytes(2, Some("a1ff")).unwrap(), vec![0xa1, 0xff]);
        assert_eq!(
            shim_bytes(2, Some("a1")),
            Err(JoinError::BadToken { shim_len: 2 })
        );
        assert_eq!(
            shim_bytes(2, Some("zzzz")),
            Err(JoinError::BadToken { shim_len: 2 })
        );
        assert_eq!(shim_bytes(0, Some("")), Err(JoinError::TokenWithoutShim));
        assert!(
            check_name("underlay").is_err() && check_name("a b").is_err() && check_name("detour").is_ok()
        );
    }

    #[test]
    fn senders_are_matched_by_address_and_port() {
        let entry: SocketAddr = "192.0.2.1:7400".parse().unwrap();
        let table = OverlayTable::new([std::sync::Arc::new(JoinedOverlay::new(
            "a".into(),
            vec![entry],
            vec![],
        ))]);
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
    }

    #[test]
    fn mss_leaves_room_for_the_encapsulation() {
        let overlay = JoinedOverlay::new("a".into(), vec!["192.0.2.1:1".parse().unwrap()], vec![0; 8]);
        assert_eq!(overlay.max_mss(1500, false, false), 1500 - 20 - 20 - 20 - 8 - 8);
        assert_eq!(overlay.max_mss(1500, true, true), 1500 - 40 - 20 - 40 - 8 - 8);
    }
}
