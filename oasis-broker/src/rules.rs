//! Header rules: `<subset, carrier>` where the subset is chosen by protocol,
//! destination prefix and port ranges. Parsing, validation and the reference
//! matcher live here; `compile` turns a rule list into classifier maps.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::monitor::{Goal, Metric, MetricError};
use crate::name_pattern::{NameError, NamePattern};
use crate::prefix_set::{MAX_PREFIXES, PrefixSet, PrefixSetError};
use crate::rule_list::{ListContent, ListError, ListKind, ListSource, every_text};
pub use crate::rule_spec::RuleSpec;
use crate::sender::{App, CgroupPath, Sender, SenderError, SenderMatch, parse_uid};
use ipnet::IpNet;
use oasis_common::{FlowKey, MAX_RULES};

/// An IP protocol a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP for IPv4 packets and ICMPv6 for IPv6 packets.
    Icmp,
    /// Any other protocol, by number.
    Number(u8),
}

impl Protocol {
    /// The protocol numbers this name stands for.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Protocol::Tcp => &[6],
            Protocol::Udp => &[17],
            Protocol::Icmp => &[1, 58],
            Protocol::Number(n) => std::slice::from_ref(&PROTOCOL_NUMBERS[n as usize]),
        }
    }

    /// Whether packets of this protocol carry ports the classifier reads.
    pub fn has_ports(self) -> bool {
        self.numbers().iter().all(|n| matches!(n, 6 | 17 | 132 | 136))
    }
}

/// Every protocol number, so `Protocol::numbers` can lend a one-element slice.
static PROTOCOL_NUMBERS: [u8; 256] = {
    let mut all = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        all[i] = i as u8;
        i += 1;
    }
    all
};

impl FromStr for Protocol {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" | "icmpv6" | "icmp6" => Ok(Protocol::Icmp),
            other => other
                .parse::<u8>()
                .map(|n| match n {
                    6 => Protocol::Tcp,
                    17 => Protocol::Udp,
                    1 | 58 => Protocol::Icmp,
                    n => Protocol::Number(n),
                })
                .map_err(|_| RuleError::UnknownProtocol(s.to_string())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Udp => f.write_str("udp"),
            Protocol::Icmp => f.write_str("icmp"),
            Protocol::Number(n) => write!(f, "{n}"),
        }
    }
}

/// An inclusive port range; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    pub fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl FromStr for PortRange {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let bad = || RuleError::BadPort(s.to_string());
        let port = |p: &str| -> Result<u16, RuleError> {
            let n: u32 = p.trim().parse().map_err(|_| bad())?;
            if n == 0 || n > 65535 {
                return Err(RuleError::PortOutOfRange(s.to_string()));
            }
            Ok(n as u16)
        };
        let range = match s.split_once(['-', ':']) {
            Some((a, b)) => PortRange {
                first: port(a)?,
                last: port(b)?,
            },
            None => {
                let p = port(s)?;
                PortRange { first: p, last: p }
            }
        };
        if range.first > range.last {
            return Err(RuleError::EmptyPortRange(s.to_string()));
        }
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Where a rule's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Carrier {
    /// The plain Internet (OC0): a flow's first packet through the
    /// broker's raw socket, the rest passed by the kernel.
    Underlay,
    /// A joined overlay, by name.
    Overlay(String),
    /// The Monitor chooses per flow, for a metric (a metric rule).
    Monitor(Goal),
}

impl Carrier {
    /// Every overlay the carrier names: the overlay, or the overlays and
    /// the monitor module of a metric rule.
    pub fn overlays(&self) -> Vec<&str> {
        match self {
            Carrier::Underlay => Vec::new(),
            Carrier::Overlay(name) => vec![name.as_str()],
            Carrier::Monitor(goal) => goal.overlays().collect(),
        }
    }
}

impl FromStr for Carrier {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let name = s.trim();
        if name.eq_ignore_ascii_case("underlay") {
            return Ok(Carrier::Underlay);
        }
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(RuleError::BadCarrier(s.to_string()));
        }
        Ok(Carrier::Overlay(name.to_string()))
    }
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Carrier::Underlay => f.write_str("underlay"),
            Carrier::Overlay(name) => f.write_str(name),
            Carrier::Monitor(goal) => goal.fmt(f),
        }
    }
}

/// Which packets a header rule claims. Every field given must match; a
/// field left out matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeaderSubset {
    pub proto: Option<Protocol>,
    pub dst: Option<IpNet>,
    /// Any of many destination prefixes (instead of `dst`).
    pub dst_set: Option<Arc<PrefixSet>>,
    pub dport: Option<PortRange>,
    pub sport: Option<PortRange>,
    /// Who sent it (uid, cgroup, application).
    pub sender: SenderMatch,
}

impl HeaderSubset {
    /// Checks the subset makes sense on its own; the prefix is normalised
    /// (host bits cleared) so equal subsets compare equal.
    pub fn validated(mut self) -> Result<HeaderSubset, RuleError> {
        if self.proto.is_none()
            && self.dst.is_none()
            && self.dst_set.is_none()
            && self.dport.is_none()
            && self.sport.is_none()
            && self.sender.is_any()
        {
            return Err(RuleError::EmptySubset);
        }
        if self.dst.is_some() && self.dst_set.is_some() {
            return Err(RuleError::DstAndSet);
        }
        if let Some(proto) = self.proto
            && !proto.has_ports()
            && (self.dport.is_some() || self.sport.is_some())
        {
            return Err(RuleError::PortsWithoutPortProtocol(proto));
        }
        self.dst = self.dst.map(|net| net.trunc());
        Ok(self)
    }

    /// How many destination prefixes of a family (4 or 6) the subset puts
    /// in the classifier.
    pub fn dst_prefixes(&self, family: u8) -> usize {
        match (&self.dst, &self.dst_set) {
            (Some(IpNet::V4(_)), _) => usize::from(family == 4),
            (Some(IpNet::V6(_)), _) => usize::from(family == 6),
            (None, Some(set)) if family == 4 => set.v4().len(),
            (None, Some(set)) => set.v6().len(),
            (None, None) => 1,
        }
    }

    /// Whether a packet with no local socket to tell who sent it matches:
    /// a rule naming a sender never does.
    pub fn matches(&self, key: &FlowKey) -> bool {
        self.matches_from(key, None, |_| None)
    }

    /// The reference semantics the classifier maps must reproduce, for a
    /// packet sent from `sender` (`None`: no local socket), with the ids
    /// the named cgroups have now.
    pub fn matches_from(
        &self,
        key: &FlowKey,
        sender: Option<&Sender>,
        cgroup_id: impl Fn(&CgroupPath) -> Option<u64>,
    ) -> bool {
        self.matches_headers(key) && self.sender.matches(sender, cgroup_id)
    }

    /// Whether the headers alone match, whoever sent the packet.
    pub fn matches_headers(&self, key: &FlowKey) -> bool {
        if let Some(proto) = self.proto
            && !proto.numbers().contains(&key.proto)
        {
            return false;
        }
        if let Some(net) = self.dst
            && !net.contains(&key.dst_ip())
        {
            return false;
        }
        if let Some(set) = &self.dst_set
            && !set.contains(key.dst_ip())
        {
            return false;
        }
        let has_ports = key.has_ports();
        if let Some(range) = self.dport
            && !(has_ports && range.contains(key.dport))
        {
            return false;
        }
        if let Some(range) = self.sport
            && !(has_ports && range.contains(key.sport))
        {
            return false;
        }
        true
    }
}

impl fmt::Display for HeaderSubset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(p) = self.proto {
            parts.push(p.to_string());
        }
        if let Some(d) = self.dst {
            parts.push(format!("dst {d}"));
        }
        if let Some(set) = &self.dst_set {
            parts.push(format!("dst-set {set}"));
        }
        if let Some(p) = self.dport {
            parts.push(format!("dport {p}"));
        }
        if let Some(p) = self.sport {
            parts.push(format!("sport {p}"));
        }
        if !self.sender.is_any() {
            parts.push(self.sender.to_string());
        }
        f.write_str(&parts.join(" "))
    }
}

/// What a rule claims: packets by header fields, or flows to names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subset {
    Header(HeaderSubset),
    /// Names, asked by any process, or by the processes the sender fields
    /// name (the others are answered truly).
    Name(NamePattern, SenderMatch),
}

impl Subset {
    /// The header fields, for a header rule.
    pub fn header(self) -> Option<HeaderSubset> {
        match self {
            Subset::Header(subset) => Some(subset),
            Subset::Name(..) => None,
        }
    }
}

impl RuleSpec {
    /// Parses every field; the first bad one is reported by name. A rule
    /// with a `dst_set` needs the set read: see [`parse_with`](Self::parse_with).
    pub fn parse(&self) -> Result<(Subset, Carrier), RuleError> {
        self.parse_with(None)
    }

    /// As [`parse`](Self::parse), with the prefix set `dst_set` names, read.
    pub fn parse_with(&self, set: Option<Arc<PrefixSet>>) -> Result<(Subset, Carrier), RuleError> {
        self.parse_content(set.map(ListContent::Prefixes))
    }

    /// The list a list rule names, checked (`None` for other rules).
    pub fn list_source(&self) -> Result<Option<ListSource>, RuleError> {
        let Some(url) = &self.list else {
            if self.list_kind.is_some() || self.every.is_some() || self.sha256.is_some() {
                return Err(RuleError::ListFieldsWithoutUrl);
            }
            return Ok(None);
        };
        let kind = self.list_kind.as_deref().ok_or(RuleError::ListWithoutKind)?;
        Ok(Some(ListSource::parse(
            url,
            kind,
            self.every.as_deref(),
            self.sha256.as_deref(),
        )?))
    }

    /// As [`parse`](Self::parse), with what the rule's file holds: the
    /// prefix set `dst_set` names, or a list rule's last good copy.
    pub fn parse_content(&self, content: Option<ListContent>) -> Result<(Subset, Carrier), RuleError> {
        let Some(source) = self.list_source()? else {
            return match content {
                Some(ListContent::Names(_)) => Err(RuleError::ListFieldsWithoutUrl),
                Some(ListContent::Prefixes(set)) => self.parse_fields(Some(set), false),
                None => self.parse_fields(None, false),
            };
        };
        let names_given = self.name.is_some()
            || self.name_exact.is_some()
            || self.name_suffix.is_some()
            || self.name_keyword.is_some();
        if self.dst.is_some() || self.dst_set.is_some() || names_given {
            return Err(RuleError::ListWithOthers);
        }
        match (source.kind, content) {
            (_, None) => Err(RuleError::ListNotRead(source.url)),
            (ListKind::Cidr, Some(ListContent::Prefixes(set))) => self.parse_fields(Some(set), true),
            (kind, Some(ListContent::Names(list))) if kind != ListKind::Cidr => {
                if self.packet_fields_given() {
                    return Err(RuleError::NameWithHeader);
                }
                Ok((
                    Subset::Name(NamePattern::List(list), self.sender()?),
                    self.carrier()?,
                ))
            }
            (kind, Some(_)) => Err(RuleError::ListKindMismatch(kind)),
        }
    }

    /// Fields of the packet itself, which a name rule cannot have (who
    /// sent it, it can).
    fn packet_fields_given(&self) -> bool {
        self.proto.is_some()
            || self.dst.is_some()
            || self.dst_set.is_some()
            || self.dport.is_some()
            || self.sport.is_some()
    }

    /// The fields of a header or name rule; `set` is the destination set,
    /// from `dst_set` or (`listed`) a prefix list.
    fn parse_fields(
        &self,
        set: Option<Arc<PrefixSet>>,
        listed: bool,
    ) -> Result<(Subset, Carrier), RuleError> {
        let names: Vec<NamePattern> = [
            self.name.clone().map(NamePattern::Regex),
            self.name_exact.clone().map(NamePattern::Exact),
            self.name_suffix.clone().map(NamePattern::Suffix),
            self.name_keyword.clone().map(NamePattern::Keyword),
        ]
        .into_iter()
        .flatten()
        .collect();
        let header_given = self.packet_fields_given() || listed;
        match names.len() {
            0 => {}
            1 if header_given => return Err(RuleError::NameWithHeader),
            1 => {
                let pattern = names.into_iter().next().expect("one").validated()?;
                return Ok((Subset::Name(pattern, self.sender()?), self.carrier()?));
            }
            _ => return Err(RuleError::TwoNames),
        }
        let proto = self.proto.as_deref().map(str::parse).transpose()?;
        let dst = self.dst.as_deref().map(parse_prefix).transpose()?;
        let dst_set = match (&self.dst_set, set) {
            (None, Some(set)) if listed => Some(set),
            (None, None) => None,
            (Some(_), Some(set)) => Some(set),
            (Some(file), None) => return Err(RuleError::SetNotRead(file.clone())),
            (None, Some(_)) => return Err(RuleError::SetWithoutFile),
        };
        let dport = self.dport.as_deref().map(str::parse).transpose()?;
        let sport = self.sport.as_deref().map(str::parse).transpose()?;
        let subset = HeaderSubset {
            proto,
            dst,
            dst_set,
            dport,
            sport,
            sender: self.sender()?,
        }
        .validated()?;
        Ok((Subset::Header(subset), self.carrier()?))
    }

    /// The sender fields. A user name is looked up in /etc/passwd.
    fn sender(&self) -> Result<SenderMatch, RuleError> {
        let uid = match self.uid.as_deref() {
            None => None,
            Some(text) => {
                let passwd = if text.trim().bytes().all(|b| b.is_ascii_digit()) {
                    String::new()
                } else {
                    std::fs::read_to_string("/etc/passwd").unwrap_or_default()
                };
                Some(parse_uid(text, &passwd)?)
            }
        };
        Ok(SenderMatch {
            uid,
            cgroup: self.cgroup.as_deref().map(CgroupPath::parse).transpose()?,
            app: self.app.as_deref().map(App::parse).transpose()?,
        })
    }

    /// The carrier: `via`, or the Monitor for a metric rule.
    fn carrier(&self) -> Result<Carrier, RuleError> {
        let Some(metric) = &self.metric else {
            if self.among.is_some() || self.monitor.is_some() {
                return Err(RuleError::MonitorWithoutMetric);
            }
            if self.via.trim().is_empty() {
                return Err(RuleError::NoCarrier);
            }
            return self.via.parse();
        };
        if !self.via.trim().is_empty() {
            return Err(RuleError::MetricWithVia);
        }
        let module = self.monitor.as_deref().map(overlay_name).transpose()?;
        if module.is_some() && self.among.is_some() {
            return Err(RuleError::AmongWithMonitor);
        }
        let metric = Metric::parse(metric, module.is_some())?;
        let among = match self.among.as_deref() {
            None => None,
            Some(list) => {
                let mut names: Vec<String> = Vec::new();
                for name in list.split(',').map(str::trim) {
                    if name.eq_ignore_ascii_case("underlay") {
                        return Err(RuleError::UnderlayInAmong);
                    }
                    let name = overlay_name(name)?;
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
                Some(names)
            }
        };
        Ok(Carrier::Monitor(Goal {
            metric,
            among,
            module,
        }))
    }

    /// Parses a header rule (a name rule is refused).
    pub fn parse_header(&self) -> Result<(HeaderSubset, Carrier), RuleError> {
        match self.parse()? {
            (Subset::Header(subset), via) => Ok((subset, via)),
            (Subset::Name(..), _) => Err(RuleError::NameWithHeader),
        }
    }

    fn header(subset: &HeaderSubset, via: &Carrier) -> RuleSpec {
        let listed = subset
            .dst_set
            .as_ref()
            .and_then(|s| s.source().map(|source| (s.file(), source)));
        let mut spec = RuleSpec {
            proto: subset.proto.map(|p| p.to_string()),
            dst: subset.dst.map(|d| d.to_string()),
            dst_set: subset
                .dst_set
                .as_ref()
                .filter(|s| s.source().is_none())
                .map(|s| s.file().to_string()),
            dport: subset.dport.map(|p| p.to_string()),
            sport: subset.sport.map(|p| p.to_string()),
            uid: subset.sender.uid.map(|u| u.to_string()),
            cgroup: subset.sender.cgroup.as_ref().map(|c| c.to_string()),
            app: subset.sender.app.as_ref().map(|a| a.to_string()),
            ..RuleSpec::default()
        };
        if let Some((file, source)) = listed {
            spec.set_list(source, file);
        }
        spec.set_carrier(via);
        spec
    }

    /// Writes a list rule's source into the spec.
    fn set_list(&mut self, source: &ListSource, file: &str) {
        self.list = Some(source.url.clone());
        self.list_kind = Some(source.kind.to_string());
        self.every = Some(every_text(source.every));
        self.sha256 = source.sha256.clone();
        self.list_file = Some(file.to_string());
    }

    /// Writes `via` into the spec's carrier fields.
    fn set_carrier(&mut self, via: &Carrier) {
        match via {
            Carrier::Monitor(goal) => {
                self.via.clear();
                self.metric = Some(goal.metric.to_string());
                self.among = goal.among.as_ref().map(|a| a.join(","));
                self.monitor = goal.module.clone();
            }
            other => self.via = other.to_string(),
        }
    }
}

/// An overlay's name where a rule lists one.
fn overlay_name(name: &str) -> Result<String, RuleError> {
    match name.parse()? {
        Carrier::Overlay(name) => Ok(name),
        _ => Err(RuleError::BadCarrier(name.into())),
    }
}

/// A prefix such as `203.0.113.0/24`, or a bare address for a single host.
fn parse_prefix(text: &str) -> Result<IpNet, RuleError> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        // 10.30.2.5/24 is ambiguous (the host, or its network?): never
        // guessed, so a rule claims exactly what the user meant.
        if net.trunc() != net {
            return Err(RuleError::HostBits {
                given: text.to_string(),
                network: net.trunc().to_string(),
                host: IpNet::from(net.addr()).to_string(),
            });
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| RuleError::BadPrefix(text.to_string()))
}

/// A rule with its id, as the daemon keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: u32,
    pub subset: HeaderSubset,
    pub via: Carrier,
}

impl Rule {
    pub fn spec(&self) -> RuleSpec {
        RuleSpec::header(&self.subset, &self.via)
    }
}

/// A name rule with its id. Name rules decide the carrier of flows to the
/// fake addresses their names were given; they never see header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameRule {
    pub id: u32,
    pub pattern: NamePattern,
    pub via: Carrier,
    /// Only these processes' queries are claimed.
    pub sender: SenderMatch,
}

impl NameRule {
    pub fn spec(&self) -> RuleSpec {
        let text = Some(self.pattern.text().to_string());
        let mut spec = RuleSpec {
            uid: self.sender.uid.map(|u| u.to_string()),
            cgroup: self.sender.cgroup.as_ref().map(|c| c.to_string()),
            app: self.sender.app.as_ref().map(|a| a.to_string()),
            ..RuleSpec::default()
        };
        spec.set_carrier(&self.via);
        match self.pattern {
            NamePattern::Regex(_) => spec.name = text,
            NamePattern::Exact(_) => spec.name_exact = text,
            NamePattern::Suffix(_) => spec.name_suffix = text,
            NamePattern::Keyword(_) => spec.name_keyword = text,
            NamePattern::List(ref list) => spec.set_list(&list.source, &list.file),
        }
        spec
    }
}

/// Either kind of rule, as one list shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyRule {
    Header(Rule),
    Name(NameRule),
}

impl AnyRule {
    pub fn id(&self) -> u32 {
        match self {
            AnyRule::Header(rule) => rule.id,
            AnyRule::Name(rule) => rule.id,
        }
    }

    pub fn via(&self) -> &Carrier {
        match self {
            AnyRule::Header(rule) => &rule.via,
            AnyRule::Name(rule) => &rule.via,
        }
    }

    /// The subset in words, e.g. `tcp dport 8080` or `name-suffix example.org`.
    pub fn subset_text(&self) -> String {
        match self {
            AnyRule::Header(rule) => rule.subset.to_string(),
            AnyRule::Name(rule) if rule.sender.is_any() => rule.pattern.to_string(),
            AnyRule::Name(rule) => format!("{} {}", rule.pattern, rule.sender),
        }
    }

    pub fn spec(&self) -> RuleSpec {
        match self {
            AnyRule::Header(rule) => rule.spec(),
            AnyRule::Name(rule) => rule.spec(),
        }
    }

    /// A list rule's list: where it comes from, where its copy is kept,
    /// how many entries are in effect.
    pub fn list(&self) -> Option<(&ListSource, &str, usize)> {
        match self {
            AnyRule::Header(rule) => {
                let set = rule.subset.dst_set.as_ref()?;
                Some((set.source()?, set.file(), set.listed()))
            }
            AnyRule::Name(NameRule {
                pattern: NamePattern::List(list),
                ..
            }) => Some((&list.source, &list.file, list.patterns().len())),
            AnyRule::Name(_) => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("unknown protocol {0:?}: use tcp, udp, icmp or a protocol number 0-255")]
    UnknownProtocol(String),
    #[error("bad port {0:?}: give a port such as 8080 or a range such as 8000-8099")]
    BadPort(String),
    #[error("port {0:?} out of range: ports are 1-65535")]
    PortOutOfRange(String),
    #[error("port range {0:?} is empty: its first port is above its last")]
    EmptyPortRange(String),
    #[error(
        "bad destination prefix {0:?}: give an address or a prefix such as 203.0.113.0/24 or 2001:db8::/32"
    )]
    BadPrefix(String),
    #[error(
        "destination {given:?} has bits set past its prefix length: write {network} for the network or {host} for the one address"
    )]
    HostBits {
        given: String,
        network: String,
        host: String,
    },
    #[error("bad carrier {0:?}: use `underlay` or the name of a joined overlay (letters, digits, - and _)")]
    BadCarrier(String),
    #[error(
        "a rule needs a name pattern (--name, --name-exact, --name-suffix, --name-keyword) or at least one of --proto, --dst, --dst-set, --dport or --sport"
    )]
    EmptySubset,
    #[error(
        "a name rule takes no header fields: drop --proto/--dst/--dst-set/--dport/--sport, or make two rules"
    )]
    NameWithHeader,
    #[error("give --dst or --dst-set, not both (a single prefix can go in the set)")]
    DstAndSet,
    #[error("the prefix set {0} was not read")]
    SetNotRead(String),
    #[error("a prefix set came without the file it is kept in")]
    SetWithoutFile,
    #[error(transparent)]
    Set(Box<PrefixSetError>),
    #[error(
        "the rules would hold {count} IPv{family} destination prefixes together, more than the \
         {MAX_PREFIXES} the classifier holds; delete a rule with a large prefix set first"
    )]
    TooManyPrefixes { family: u8, count: usize },
    #[error(
        "a rule takes one name pattern: give only one of --name, --name-exact, --name-suffix, --name-keyword"
    )]
    TwoNames,
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("at most {MAX_NAME_RULES} name rules; delete some first")]
    TooManyNames,
    #[error("{0} packets have no ports: drop --dport/--sport or pick tcp or udp")]
    PortsWithoutPortProtocol(Protocol),
    #[error("rule {existing} already claims exactly this traffic ({subset})")]
    Duplicate { existing: u32, subset: String },
    #[error("no overlay named {0:?} has been joined; join it with `oasis overlay add {0} URL` first")]
    UnknownOverlay(String),
    #[error(transparent)]
    Sender(#[from] SenderError),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("list_kind, every and sha256 belong to a list rule: give its URL (--url, `list:`) too")]
    ListFieldsWithoutUrl,
    #[error("a list rule needs its kind: cidr, suffix, exact, keyword or regex")]
    ListWithoutKind,
    #[error("the list {0} has not been fetched")]
    ListNotRead(String),
    #[error(
        "a list rule takes its prefixes or names from the list: no --dst, --dst-set or --name* beside it"
    )]
    ListWithOthers,
    #[error("rule {0} is not a list rule; `oasis rule list` shows which rules are")]
    NotAList(u32),
    #[error("the list's entries are not of its kind ({0})")]
    ListKindMismatch(ListKind),
    #[error(
        "rules by application need the socket hooks that DNS interception attaches, and it is \
         off here (dns.enabled: false, or no cgroup v2): name a --cgroup or --uid instead"
    )]
    AppWithoutHooks,
    #[error(
        "the rules may name cgroups at {max} different depths at most ({levels}): \
         name an ancestor at a depth already used instead"
    )]
    TooManyCgroupDepths { max: usize, levels: String },
    #[error("the rules may name {max} different {field}s at most; delete some first")]
    TooManySenders { field: &'static str, max: u32 },
    #[error("the classifier holds at most {MAX_RULES} header rules; delete one first")]
    TooMany,
    #[error("no rule with id {0}; `oasis rule list` shows the ids")]
    NoSuchRule(u32),
    #[error("a rule needs a carrier: --via CARRIER, or --metric METRIC to let the Monitor choose")]
    NoCarrier,
    #[error("--metric lets the Monitor choose the carrier: drop --via (or drop --metric to fix the carrier)")]
    MetricWithVia,
    #[error("--among and --monitor go with --metric")]
    MonitorWithoutMetric,
    #[error("--among lists overlays only: the underlay is always a candidate")]
    UnderlayInAmong,
    #[error(
        "--among narrows the built-in Monitor's choice; a monitor module chooses among every joined overlay \
         and cannot be held to a list: drop --among, or --monitor"
    )]
    AmongWithMonitor,
    #[error("--metric: {0}")]
    Metric(#[from] MetricError),
    #[error("overlay {0:?} has no monitor module: its specification declares no <module kind=\"monitor\">")]
    NotAMonitor(String),
    #[error("overlay {0:?} is a monitor module, not a carrier: use it with --metric METRIC --monitor {0}")]
    MonitorIsNoCarrier(String),
    #[error("the metric is {metric} bytes, and monitor {monitor:?} takes at most {shim} (its shim length)")]
    MetricLongerThanShim {
        monitor: String,
        metric: usize,
        shim: usize,
    },
}

impl From<PrefixSetError> for RuleError {
    fn from(e: PrefixSetError) -> RuleError {
        RuleError::Set(Box::new(e))
    }
}

/// The ordered rule list. The first rule whose subset matches a flow decides
/// its carrier; rules are kept in the order they were added.
///
/// Name rules may number a million: they are shared between copies until
/// one of them changes them (a header rule change copies no name rule), and
/// indexed by pattern, so a duplicate is found without a scan.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    names: Arc<Vec<NameRule>>,
    name_ids: Arc<HashMap<(NamePattern, SenderMatch), u32>>,
    next_id: u32,
}

/// Name rules compile into set matchers, so their number is bounded by
/// memory rather than by the kernel maps.
pub const MAX_NAME_RULES: usize = 1_000_000;

impl RuleSet {
    /// Rebuilds a rule list from stored rules, checking them as `add` would.
    pub fn from_rules(rules: Vec<AnyRule>) -> Result<RuleSet, RuleError> {
        let mut set = RuleSet {
            next_id: 1,
            ..RuleSet::default()
        };
        let mut ids = std::collections::HashSet::new();
        for rule in rules {
            if rule.id() == 0 || !ids.insert(rule.id()) {
                return Err(RuleError::Duplicate {
                    existing: rule.id(),
                    subset: rule.subset_text(),
                });
            }
            set.next_id = set.next_id.max(rule.id() + 1);
            match rule {
                AnyRule::Header(rule) => {
                    set.check_new(&rule.subset)?;
                    set.rules.push(rule);
                }
                AnyRule::Name(rule) => {
                    set.check_new_name(&rule.pattern, &rule.sender)?;
                    set.push_name(rule);
                }
            }
        }
        Ok(set)
    }

    /// The header rules, in precedence order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The name rules, in precedence order.
    pub fn names(&self) -> &[NameRule] {
        &self.names
    }

    /// Whether `other` holds the very same name rules (shared, unchanged
    /// since one was copied from the other).
    pub fn same_names(&self, other: &RuleSet) -> bool {
        Arc::ptr_eq(&self.names, &other.names)
    }

    /// Every rule's id and carrier, header rules first.
    pub fn carriers(&self) -> impl Iterator<Item = (u32, &Carrier)> {
        self.rules
            .iter()
            .map(|r| (r.id, &r.via))
            .chain(self.names.iter().map(|r| (r.id, &r.via)))
    }

    /// How many rules of both kinds there are.
    pub fn len(&self) -> usize {
        self.rules.len() + self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One rule, by id.
    pub fn get(&self, id: u32) -> Option<AnyRule> {
        if let Some(rule) = self.rules.iter().find(|r| r.id == id) {
            return Some(AnyRule::Header(rule.clone()));
        }
        self.names.iter().find(|r| r.id == id).cloned().map(AnyRule::Name)
    }

    /// The list rules' lists, by rule id, with nothing copied (there may
    /// be a million name rules beside them).
    pub fn lists(&self) -> impl Iterator<Item = (u32, &ListSource, &str, usize)> {
        let header = self.rules.iter().filter_map(|rule| {
            let set = rule.subset.dst_set.as_ref()?;
            Some((rule.id, set.source()?, set.file(), set.listed()))
        });
        let names = self.names.iter().filter_map(|rule| match &rule.pattern {
            NamePattern::List(list) => {
                Some((rule.id, &list.source, list.file.as_str(), list.patterns().len()))
            }
            _ => None,
        });
        header.chain(names)
    }

    /// Every rule, by id.
    pub fn all(&self) -> Vec<AnyRule> {
        let mut all: Vec<AnyRule> = self
            .rules
            .iter()
            .cloned()
            .map(AnyRule::Header)
            .chain(self.names.iter().cloned().map(AnyRule::Name))
            .collect();
        all.sort_by_key(AnyRule::id);
        all
    }

    fn check_new_name(&self, pattern: &NamePattern, sender: &SenderMatch) -> Result<(), RuleError> {
        if let Some(&existing) = self.name_ids.get(&(pattern.clone(), sender.clone())) {
            return Err(RuleError::Duplicate {
                existing,
                subset: pattern.to_string(),
            });
        }
        if self.names.len() >= MAX_NAME_RULES {
            return Err(RuleError::TooManyNames);
        }
        Ok(())
    }

    /// Appends a name rule and returns it with its new id.
    pub fn add_name(
        &mut self,
        pattern: NamePattern,
        sender: SenderMatch,
        via: Carrier,
    ) -> Result<NameRule, RuleError> {
        self.check_new_name(&pattern, &sender)?;
        let rule = NameRule {
            id: self.next_id.max(1),
            pattern,
            via,
            sender,
        };
        self.next_id = rule.id + 1;
        self.push_name(rule.clone());
        Ok(rule)
    }

    fn push_name(&mut self, rule: NameRule) {
        Arc::make_mut(&mut self.name_ids).insert((rule.pattern.clone(), rule.sender.clone()), rule.id);
        Arc::make_mut(&mut self.names).push(rule);
    }

    /// Appends a rule of either kind.
    pub fn add_any(&mut self, subset: Subset, via: Carrier) -> Result<AnyRule, RuleError> {
        Ok(match subset {
            Subset::Header(subset) => AnyRule::Header(self.add(subset, via)?),
            Subset::Name(pattern, sender) => AnyRule::Name(self.add_name(pattern, sender, via)?),
        })
    }

    /// The id the next added rule gets.
    pub fn next_id(&self) -> u32 {
        self.next_id.max(1)
    }

    /// Never hand out ids below `id` (those of rules deleted before a restart).
    pub fn reserve_ids_below(&mut self, id: u32) {
        self.next_id = self.next_id.max(id);
    }

    fn check_new(&self, subset: &HeaderSubset) -> Result<(), RuleError> {
        if let Some(existing) = self.rules.iter().find(|r| &r.subset == subset) {
            return Err(RuleError::Duplicate {
                existing: existing.id,
                subset: subset.to_string(),
            });
        }
        if self.rules.len() >= MAX_RULES {
            return Err(RuleError::TooMany);
        }
        self.check_senders(subset)?;
        // An upper bound of the classifier's entries: equal prefixes of
        // different rules share one.
        for family in [4u8, 6] {
            let count: usize = self
                .rules
                .iter()
                .map(|r| &r.subset)
                .chain([subset])
                .map(|s| s.dst_prefixes(family))
                .sum();
            if count > MAX_PREFIXES {
                return Err(RuleError::TooManyPrefixes { family, count });
            }
        }
        Ok(())
    }

    /// What the classifier's sender maps can hold: a few cgroup depths,
    /// and so many distinct uids, cgroups and applications.
    fn check_senders(&self, subset: &HeaderSubset) -> Result<(), RuleError> {
        if subset.sender.is_any() {
            return Ok(());
        }
        let senders = || {
            self.rules
                .iter()
                .map(|r| &r.subset.sender)
                .chain([&subset.sender])
        };
        let levels: std::collections::BTreeSet<u32> = senders()
            .filter_map(|s| s.cgroup.as_ref().map(CgroupPath::level))
            .collect();
        if levels.len() > oasis_common::CGROUP_DEPTHS {
            return Err(RuleError::TooManyCgroupDepths {
                max: oasis_common::CGROUP_DEPTHS,
                levels: levels.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            });
        }
        let max = oasis_common::OWNER_ENTRIES;
        let distinct = |count: usize, field| {
            if count > max as usize {
                Err(RuleError::TooManySenders { field, max })
            } else {
                Ok(())
            }
        };
        let uids: std::collections::HashSet<u32> = senders().filter_map(|s| s.uid).collect();
        distinct(uids.len(), "uid")?;
        let cgroups: std::collections::HashSet<&CgroupPath> =
            senders().filter_map(|s| s.cgroup.as_ref()).collect();
        distinct(cgroups.len(), "cgroup")?;
        let apps: std::collections::HashSet<oasis_common::AppName> =
            senders().filter_map(|s| s.app.as_ref().map(App::key)).collect();
        distinct(apps.len(), "application")
    }

    /// Appends a rule and returns it with its new id. Nothing changes on error.
    pub fn add(&mut self, subset: HeaderSubset, via: Carrier) -> Result<Rule, RuleError> {
        self.check_new(&subset)?;
        let rule = Rule {
            id: self.next_id.max(1),
            subset,
            via,
        };
        self.next_id = rule.id + 1;
        self.rules.push(rule.clone());
        Ok(rule)
    }

    /// Gives list rule `id` the list's new entries, in its place in the
    /// order; the list must be the rule's (same URL and kind).
    pub fn replace_list(&mut self, id: u32, content: ListContent) -> Result<(), RuleError> {
        let same =
            |source: &ListSource, other: &ListSource| source.url == other.url && source.kind == other.kind;
        if let Some(rule) = self.rules.iter_mut().find(|r| r.id == id) {
            let ListContent::Prefixes(set) = content else {
                return Err(RuleError::NoSuchRule(id));
            };
            let matches = rule
                .subset
                .dst_set
                .as_ref()
                .and_then(|s| s.source())
                .zip(set.source());
            if !matches.is_some_and(|(a, b)| same(a, b)) {
                return Err(RuleError::NoSuchRule(id));
            }
            let mut subset = rule.subset.clone();
            subset.dst_set = Some(set);
            let others = self.rules.iter().filter(|r| r.id != id).map(|r| &r.subset);
            for family in [4u8, 6] {
                let count: usize = others
                    .clone()
                    .chain([&subset])
                    .map(|s| s.dst_prefixes(family))
                    .sum();
                if count > MAX_PREFIXES {
                    return Err(RuleError::TooManyPrefixes { family, count });
                }
            }
            self.rules
                .iter_mut()
                .find(|r| r.id == id)
                .expect("found above")
                .subset = subset;
            return Ok(());
        }
        let ListContent::Names(list) = content else {
            return Err(RuleError::NoSuchRule(id));
        };
        let names = Arc::make_mut(&mut self.names);
        let rule = names
            .iter_mut()
            .find(|r| {
                r.id == id && matches!(&r.pattern, NamePattern::List(old) if same(&old.source, &list.source))
            })
            .ok_or(RuleError::NoSuchRule(id))?;
        // The same list (by URL), so the index of patterns keeps its key.
        rule.pattern = NamePattern::List(list);
        Ok(())
    }

    pub fn remove(&mut self, id: u32) -> Result<AnyRule, RuleError> {
        if let Some(index) = self.rules.iter().position(|r| r.id == id) {
            return Ok(AnyRule::Header(self.rules.remove(index)));
        }
        let index = self
            .names
            .iter()
            .position(|r| r.id == id)
            .ok_or(RuleError::NoSuchRule(id))?;
        let rule = Arc::make_mut(&mut self.names).remove(index);
        Arc::make_mut(&mut self.name_ids).remove(&(rule.pattern.clone(), rule.sender.clone()));
        Ok(AnyRule::Name(rule))
    }

    /// The rule that decides this flow, if any.
    pub fn first_match(&self, key: &FlowKey) -> Option<&Rule> {
        self.rules.iter().find(|r| r.subset.matches(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oasis_common::FAMILY_V6;

    fn set_of(count: u32) -> Arc<PrefixSet> {
        // Every other /32, so nothing merges.
        let text: String = (0..count)
            .map(|i| format!("{}\n", std::net::Ipv4Addr::from(0x0100_0000 + 2 * i)))
            .collect();
        Arc::new(PrefixSet::parse("big.txt", &text).unwrap())
    }

    #[test]
    fn a_set_rule_takes_its_set_and_no_single_prefix() {
        let with_file = RuleSpec {
            dst_set: Some("sets/nl.txt".into()),
            proto: Some("tcp".into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        assert_eq!(
            with_file.parse().unwrap_err(),
            RuleError::SetNotRead("sets/nl.txt".into())
        );
        let set = Arc::new(
            PrefixSet::parse("nl.txt", "192.0.2.0/24\n")
                .unwrap()
                .kept_in("sets/nl.txt".into()),
        );
        let (subset, _) = with_file.parse_with(Some(set.clone())).unwrap();
        let subset = subset.header().unwrap();
        assert_eq!(subset.to_string(), "tcp dst-set nl.txt (1 prefixes)");
        assert!(subset.matches(&v4_key(6, [192, 0, 2, 9], 1000, 80)));
        assert!(!subset.matches(&v4_key(6, [192, 0, 3, 9], 1000, 80)));
        assert!(!subset.matches(&v4_key(17, [192, 0, 2, 9], 1000, 80)));
        // Back to what the config file stores.
        assert_eq!(
            RuleSpec::header(&subset, &Carrier::Underlay).dst_set.as_deref(),
            Some("sets/nl.txt")
        );
        let both = RuleSpec {
            dst: Some("10.0.0.0/8".into()),
            ..with_file.clone()
        };
        assert_eq!(
            both.parse_with(Some(set.clone())).unwrap_err(),
            RuleError::DstAndSet
        );
        let name = RuleSpec {
            name_suffix: Some("example.org".into()),
            dst_set: Some("sets/nl.txt".into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        };
        assert_eq!(name.parse_with(Some(set)).unwrap_err(), RuleError::NameWithHeader);
    }

    #[test]
    fn the_classifier_s_room_for_prefixes_is_never_exceeded() {
        let mut rules = RuleSet::default();
        let subset = |set: Arc<PrefixSet>, port: u16| HeaderSubset {
            dst_set: Some(set),
            proto: Some(Protocol::Tcp),
            dport: Some(PortRange {
                first: port,
                last: port,
            }),
            ..HeaderSubset::default()
        };
        let big = set_of(150_000);
        rules.add(subset(big.clone(), 1), Carrier::Underlay).unwrap();
        let err = rules.add(subset(big.clone(), 2), Carrier::Underlay).unwrap_err();
        assert_eq!(
            err,
            RuleError::TooManyPrefixes {
                family: 4,
                count: 300_000
            }
        );
        assert_eq!(rules.rules().len(), 1);
        rules.add(subset(set_of(100_000), 3), Carrier::Underlay).unwrap();
    }

    fn spec(proto: Option<&str>, dst: Option<&str>, dport: Option<&str>) -> RuleSpec {
        RuleSpec {
            proto: proto.map(Into::into),
            dst: dst.map(Into::into),
            dport: dport.map(Into::into),
            sport: None,
            via: "underlay".into(),
            ..RuleSpec::default()
        }
    }

    fn v4_key(proto: u8, dst: [u8; 4], sport: u16, dport: u16) -> FlowKey {
        FlowKey::v4([10, 0, 0, 1], dst, proto, sport, dport)
    }

    #[test]
    fn parses_ports_and_ranges() {
        assert_eq!(
            "8080".parse::<PortRange>().unwrap(),
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        assert_eq!(
            "1000-2000".parse::<PortRange>().unwrap(),
            PortRange {
                first: 1000,
                last: 2000
            }
        );
        assert_eq!(
            "1000:2000".parse::<PortRange>().unwrap(),
            PortRange {
                first: 1000,
                last: 2000
            }
        );
        assert!(matches!(
            "0".parse::<PortRange>(),
            Err(RuleError::PortOutOfRange(_))
        ));
        assert!(matches!(
            "70000".parse::<PortRange>(),
            Err(RuleError::PortOutOfRange(_))
        ));
        assert!(matches!(
            "20-10".parse::<PortRange>(),
            Err(RuleError::EmptyPortRange(_))
        ));
        assert!(matches!("http".parse::<PortRange>(), Err(RuleError::BadPort(_))));
    }

    #[test]
    fn parses_protocols() {
        assert_eq!("TCP".parse::<Protocol>().unwrap(), Protocol::Tcp);
        assert_eq!("17".parse::<Protocol>().unwrap(), Protocol::Udp);
        assert_eq!("icmpv6".parse::<Protocol>().unwrap(), Protocol::Icmp);
        assert_eq!("47".parse::<Protocol>().unwrap(), Protocol::Number(47));
        assert_eq!(Protocol::Number(47).numbers(), &[47]);
        assert!(matches!(
            "tpc".parse::<Protocol>(),
            Err(RuleError::UnknownProtocol(_))
        ));
        assert!(matches!(
            "300".parse::<Protocol>(),
            Err(RuleError::UnknownProtocol(_))
        ));
    }

    #[test]
    fn spec_errors_name_the_field() {
        let err = spec(Some("tcp"), Some("203.0.113.0/33"), None)
            .parse_header()
            .unwrap_err();
        assert_eq!(err, RuleError::BadPrefix("203.0.113.0/33".into()));
        let err = spec(Some("tcp"), Some("10.30.2.5/24"), None)
            .parse_header()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10.30.2.0/24") && err.contains("10.30.2.5/32"),
            "{err}"
        );
        let err = spec(None, None, None).parse().unwrap_err();
        assert_eq!(err, RuleError::EmptySubset);
        let err = spec(Some("icmp"), None, Some("80")).parse().unwrap_err();
        assert_eq!(err, RuleError::PortsWithoutPortProtocol(Protocol::Icmp));
        let mut bad_via = spec(Some("tcp"), None, None);
        bad_via.via = "no/such".into();
        assert!(matches!(bad_via.parse(), Err(RuleError::BadCarrier(_))));
    }

    #[test]
    fn prefixes_are_exact_and_a_bare_address_is_a_host() {
        let (subset, _) = spec(None, Some("203.0.113.0/24"), None).parse_header().unwrap();
        assert_eq!(subset.dst.unwrap().to_string(), "203.0.113.0/24");
        assert!(matches!(
            spec(None, Some("203.0.113.77/24"), None).parse_header(),
            Err(RuleError::HostBits { .. })
        ));
        let (subset, _) = spec(None, Some("2001:db8::1"), None).parse_header().unwrap();
        assert_eq!(subset.dst.unwrap().to_string(), "2001:db8::1/128");
    }

    #[test]
    fn duplicate_subset_is_refused_and_changes_nothing() {
        let mut rules = RuleSet::default();
        let (subset, via) = spec(Some("tcp"), None, Some("8080")).parse_header().unwrap();
        let first = rules.add(subset.clone(), via.clone()).unwrap();
        assert_eq!(first.id, 1);
        let err = rules.add(subset, Carrier::Overlay("detour".into())).unwrap_err();
        assert!(matches!(err, RuleError::Duplicate { existing: 1, .. }));
        assert_eq!(rules.rules().len(), 1);
    }

    #[test]
    fn ids_are_not_reused_after_delete() {
        let mut rules = RuleSet::default();
        let a = rules
            .add(
                spec(Some("tcp"), None, None).parse_header().unwrap().0,
                Carrier::Underlay,
            )
            .unwrap();
        let b = rules
            .add(
                spec(Some("udp"), None, None).parse_header().unwrap().0,
                Carrier::Underlay,
            )
            .unwrap();
        rules.remove(b.id).unwrap();
        let c = rules
            .add(
                spec(Some("icmp"), None, None).parse_header().unwrap().0,
                Carrier::Underlay,
            )
            .unwrap();
        assert_eq!((a.id, b.id, c.id), (1, 2, 3));
        assert_eq!(rules.remove(9).unwrap_err(), RuleError::NoSuchRule(9));
    }

    #[test]
    fn first_matching_rule_wins() {
        let mut rules = RuleSet::default();
        rules
            .add(
                spec(Some("tcp"), Some("203.0.113.0/24"), Some("8080"))
                    .parse_header()
                    .unwrap()
                    .0,
                Carrier::Underlay,
            )
            .unwrap();
        rules
            .add(
                spec(None, Some("203.0.0.0/8"), None).parse_header().unwrap().0,
                Carrier::Overlay("x".into()),
            )
            .unwrap();
        assert_eq!(
            rules
                .first_match(&v4_key(6, [203, 0, 113, 5], 40000, 8080))
                .unwrap()
                .id,
            1
        );
        assert_eq!(
            rules
                .first_match(&v4_key(6, [203, 0, 113, 5], 40000, 9090))
                .unwrap()
                .id,
            2
        );
        assert_eq!(rules.first_match(&v4_key(1, [203, 1, 1, 1], 0, 0)).unwrap().id, 2);
        assert!(
            rules
                .first_match(&v4_key(6, [198, 51, 100, 1], 40000, 8080))
                .is_none()
        );
    }

    #[test]
    fn port_rules_never_match_portless_packets() {
        let (subset, _) = spec(None, None, Some("1-65535")).parse_header().unwrap();
        assert!(!subset.matches(&v4_key(1, [1, 2, 3, 4], 0, 0)));
        assert!(subset.matches(&v4_key(17, [1, 2, 3, 4], 5353, 53)));
    }

    #[test]
    fn icmp_matches_both_families() {
        let (subset, _) = spec(Some("icmp"), None, None).parse_header().unwrap();
        assert!(subset.matches(&v4_key(1, [1, 2, 3, 4], 0, 0)));
        let v6 = FlowKey {
            proto: 58,
            family: FAMILY_V6,
            ..Default::default()
        };
        assert!(subset.matches(&v6));
    }

    #[test]
    fn metric_rules_let_the_monitor_choose() {
        let metric = |edit: &dyn Fn(&mut RuleSpec)| {
            let mut spec = RuleSpec {
                proto: Some("tcp".into()),
                dport: Some("22".into()),
                metric: Some("latency".into()),
                ..RuleSpec::default()
            };
            edit(&mut spec);
            spec.parse()
        };
        let (_, via) = metric(&|s| s.among = Some("detour, campus,detour".into())).unwrap();
        let Carrier::Monitor(goal) = &via else {
            panic!("{via:?}")
        };
        assert_eq!(goal.metric, Metric::Latency);
        assert_eq!(
            goal.among.as_deref(),
            Some(&["detour".to_string(), "campus".to_string()][..])
        );
        assert_eq!(via.to_string(), "monitor: latency among detour,campus");
        assert_eq!(via.overlays(), ["detour", "campus"]);
        assert_eq!(
            metric(&|s| s.via = "underlay".into()),
            Err(RuleError::MetricWithVia)
        );
        assert_eq!(
            metric(&|s| s.among = Some("underlay".into())),
            Err(RuleError::UnderlayInAmong)
        );
        assert!(matches!(
            metric(&|s| s.metric = Some("jitter".into())),
            Err(RuleError::Metric(_))
        ));
        assert!(matches!(
            metric(&|s| s.among = Some("a b".into())),
            Err(RuleError::BadCarrier(_))
        ));
        // A monitor module takes metrics the built-in one does not know.
        let (_, via) = metric(&|s| {
            s.metric = Some("jitter<5ms".into());
            s.monitor = Some("mon".into());
        })
        .unwrap();
        assert_eq!(via.to_string(), "monitor mon: jitter<5ms");
        // It chooses among every joined overlay: a list would not bind it.
        assert_eq!(
            metric(&|s| {
                s.monitor = Some("mon".into());
                s.among = Some("detour".into());
            }),
            Err(RuleError::AmongWithMonitor)
        );
        let no_metric = RuleSpec {
            proto: Some("tcp".into()),
            among: Some("detour".into()),
            ..RuleSpec::default()
        };
        assert_eq!(no_metric.parse(), Err(RuleError::MonitorWithoutMetric));
        let no_carrier = RuleSpec {
            proto: Some("tcp".into()),
            ..RuleSpec::default()
        };
        assert_eq!(no_carrier.parse(), Err(RuleError::NoCarrier));
    }

    #[test]
    fn metric_rules_are_stored_as_they_were_given() {
        let mut rules = RuleSet::default();
        for yaml in [
            "proto: udp\ndport: 3478\nmetric: loss<1%\n",
            "name_suffix: example.edu\nmetric: throughput\namong: detour\n",
        ] {
            let spec: RuleSpec = serde_yaml::from_str(yaml).unwrap();
            let (subset, via) = spec.parse().unwrap();
            let rule = rules.add_any(subset, via).unwrap();
            // What the file would hold reads back as the same rule.
            let again = serde_yaml::from_str::<RuleSpec>(&serde_yaml::to_string(&rule.spec()).unwrap())
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(&again.1, rule.via(), "{yaml}");
            assert_eq!(rule.spec().via, "", "no via for a metric rule");
        }
    }

    #[test]
    fn yaml_accepts_numeric_ports() {
        let spec: RuleSpec = serde_yaml::from_str("proto: tcp\ndport: 8080\nvia: underlay\n").unwrap();
        assert_eq!(spec.dport.as_deref(), Some("8080"));
    }

    fn name_spec(edit: impl FnOnce(&mut RuleSpec)) -> RuleSpec {
        let mut spec = RuleSpec {
            via: "detour".into(),
            ..RuleSpec::default()
        };
        edit(&mut spec);
        spec
    }

    #[test]
    fn name_rules_take_one_pattern_and_no_header_field() {
        let (subset, via) = name_spec(|s| s.name_suffix = Some("*.Example.ORG.".into()))
            .parse()
            .unwrap();
        assert_eq!(
            subset,
            Subset::Name(NamePattern::Suffix("example.org".into()), SenderMatch::default())
        );
        assert_eq!(via, Carrier::Overlay("detour".into()));
        let (regex, _) = name_spec(|s| s.name = Some(r".*\.edu$".into())).parse().unwrap();
        assert_eq!(
            regex,
            Subset::Name(NamePattern::Regex(r".*\.edu$".into()), SenderMatch::default())
        );
        let with_port = name_spec(|s| {
            s.name_exact = Some("a.example".into());
            s.dport = Some("443".into());
        });
        assert_eq!(with_port.parse().unwrap_err(), RuleError::NameWithHeader);
        let two = name_spec(|s| {
            s.name_exact = Some("a.example".into());
            s.name_keyword = Some("video".into());
        });
        assert_eq!(two.parse().unwrap_err(), RuleError::TwoNames);
        let bad = name_spec(|s| s.name = Some("(unclosed".into()))
            .parse()
            .unwrap_err();
        assert!(bad.to_string().contains("(unclosed"), "{bad}");
        let not_a_name = name_spec(|s| s.name_suffix = Some("exa mple.org".into()));
        assert!(matches!(not_a_name.parse(), Err(RuleError::Name(_))));
    }

    #[test]
    fn name_and_header_rules_share_ids_and_round_trip_as_specs() {
        let mut rules = RuleSet::default();
        let (header, via) = spec(Some("tcp"), None, Some("80")).parse().unwrap();
        let first = rules.add_any(header, via).unwrap();
        let named = name_spec(|s| s.name_keyword = Some("video".into()));
        let (subset, via) = named.parse().unwrap();
        let second = rules.add_any(subset.clone(), via.clone()).unwrap();
        assert_eq!((first.id(), second.id()), (1, 2));
        assert_eq!(second.spec(), named);
        assert_eq!(second.subset_text(), "name-keyword video");
        assert!(matches!(
            rules.add_any(subset, via),
            Err(RuleError::Duplicate { existing: 2, .. })
        ));
        assert_eq!(rules.names().len(), 1);
        assert_eq!(rules.rules().len(), 1);
        assert_eq!(
            rules.all().iter().map(AnyRule::id).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(matches!(rules.remove(2).unwrap(), AnyRule::Name(_)));
        assert!(rules.names().is_empty());
        // Ids are never reused, whatever kind the next rule is.
        let (subset, via) = name_spec(|s| s.name_exact = Some("a.example".into()))
            .parse()
            .unwrap();
        assert_eq!(rules.add_any(subset, via).unwrap().id(), 3);
    }
}
