//! The YAML configuration file: daemon settings and the rules, which the
//! daemon rewrites whenever a rule is added or deleted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::dns::policy::UnderlayAnswers;

use crate::overlay::{JoinError, StoredOverlay, check_name, shim_bytes};
use crate::prefix_set::{PrefixSet, PrefixSetError};
use crate::rule_list::{ListContent, ListKind, ListSource, NameList};
use crate::rules::{AnyRule, NameRule, Rule, RuleError, RuleSet, RuleSpec, Subset};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/oasis/config.yaml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/oasis/oasis.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interfaces whose egress the classifier watches. Empty: every
    /// interface that carries a default route (IPv4 or IPv6) at start.
    pub uplinks: Vec<String>,
    pub tun: TunConfig,
    /// `SO_MARK` on the broker's own packets; the classifier always passes
    /// them. Pick another value if your host already uses this mark.
    pub bypass_mark: u32,
    /// With no heartbeat from the broker for this long, the classifier
    /// passes all traffic untouched (fail open).
    pub heartbeat_timeout_ms: u64,
    /// A flow (UDP, ICMP, ...) idle for this long is forgotten: matched
    /// against the rules afresh on its next packet, its fake address's
    /// mapping gone. A new TCP connection is always matched afresh.
    pub flow_idle_timeout_secs: u64,
    /// How long an established TCP connection may stay silent and keep its
    /// carrier and mappings (2 h 4 min, the least RFC 5382 lets a NAT
    /// keep one). After a FIN or RST it goes 10 s after its last packet.
    pub tcp_idle_timeout_secs: u64,
    /// Where the CLI reaches the daemon; only root may connect.
    pub control_socket: PathBuf,
    /// The id the next new rule gets, so ids of deleted rules are never
    /// reused, across restarts too. Kept by the daemon.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rule_id: Option<u32>,
    /// UDP port where overlays hand packets back to this host (the paper's
    /// standard port), on IPv4 and IPv6.
    pub overlay_port: u16,
    /// After a plain overlay flow's first packet, the uplink's kernel
    /// program wraps its packets for the entry node and opens its returning
    /// datagrams itself (the fast path, the default); off, every packet of
    /// it crosses the broker.
    pub overlay_fast_path: bool,
    /// UDP port on loopback where the overlays' local code modules hand
    /// packets to be sent on the underlay. Only the broker's own module
    /// sockets are admitted.
    pub underlay_port: u16,
    /// DNS interception and fake addresses, for name rules.
    pub dns: DnsConfig,
    /// The Monitor: probe budget and decision margins, for metric rules.
    pub monitor: MonitorConfig,
    /// The REST API (Clash-compatible) and the web page at `/ui/`;
    /// docs/api.md.
    pub api: ApiConfig,
    /// What each overlay's code module may use (memory, CPU per call,
    /// datagrams per event, log lines); docs/modules.md.
    pub modules: crate::module::ModuleLimits,
    /// Joined overlays; `oasis overlay add|del` keeps this list.
    pub overlays: Vec<StoredOverlay>,
    pub rules: Vec<StoredRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunConfig {
    pub name: String,
    /// The TUN's own IPv4 address. Linux needs the TUN to have one to
    /// accept packets returned by overlays when reverse-path filtering is
    /// on; the default is the IPv4 dummy address of RFC 7600.
    pub address: std::net::Ipv4Addr,
    /// Threads reading diverted packets, one TUN queue each.
    pub queues: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Redirect the host's DNS queries (port 53, UDP and TCP) to the broker.
    /// Off: name rules have no effect, and DNS is left alone.
    pub enabled: bool,
    /// The broker's DNS port on 127.0.0.1 and ::1.
    pub port: u16,
    /// The cgroup (v2 directory) whose processes' queries are redirected.
    /// Unset: the root of the cgroup v2 hierarchy, i.e. every process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Where fake addresses come from. Packets to these prefixes belong to
    /// the broker; they must not be in use on your networks.
    pub fake_v4: Ipv4Net,
    pub fake_v6: Ipv6Net,
    /// At most this many fake addresses per family; beyond it the least
    /// recently used one no live flow holds is given to the new name.
    pub fake_capacity: usize,
    /// TTL of fake answers, in seconds: short, so rule changes reach
    /// applications soon.
    pub fake_ttl_secs: u32,
    /// Names claimed by rules whose carrier is the underlay: answer `real`
    /// (the flow never touches Oasis) or `fake` (the first packets come to
    /// the broker, the rest is rewritten in the kernel).
    pub underlay_answers: UnderlayAnswers,
    /// Upstream servers for names no rule claims, and for the real
    /// addresses of those that are: `192.0.2.53`, `tcp://192.0.2.53`,
    /// `tls://1.1.1.1#cloudflare-dns.com`, `https://1.1.1.1#cloudflare-dns.com`.
    /// Empty: the servers in /etc/resolv.conf.
    pub upstreams: Vec<String>,
    /// An upstream that has not answered in this time gets SERVFAIL.
    pub upstream_timeout_ms: u64,
    /// Names claimed by a WireGuard overlay whose file gives `DNS=` are
    /// resolved by that server, through the tunnel: the local network and
    /// its resolver never see them. `false`: by the upstreams, as every
    /// other name.
    pub through_wireguard: bool,
    /// Where the fake-address table is kept across restarts, so answers
    /// that applications cached keep working.
    pub state_file: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            port: 7453,
            cgroup: None,
            fake_v4: "198.18.0.0/15".parse().expect("valid"),
            fake_v6: "fd4f:4153:4953::/48".parse().expect("valid"),
            fake_capacity: 65_536,
            fake_ttl_secs: 10,
            underlay_answers: UnderlayAnswers::Real,
            upstreams: Vec::new(),
            upstream_timeout_ms: 2_000,
            through_wireguard: true,
            state_file: PathBuf::from("/var/lib/oasis/fake-addresses.json"),
        }
    }
}

/// The REST API and the web page (docs/api.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub enabled: bool,
    /// Where it listens. Anything but a loopback address needs a secret.
    pub listen: std::net::SocketAddr,
    /// What clients send as `Authorization: Bearer SECRET` (`?token=`
    /// for WebSockets). Unset: one is made at the first start and kept in
    /// `secret_file`; `oasis ui` shows it. `""`: none, on loopback only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub secret_file: PathBuf,
    /// Host headers accepted besides `localhost`, the loopback addresses
    /// and `listen` itself, e.g. `oasis.lan:9090`; any other is refused,
    /// against DNS rebinding.
    pub hosts: Vec<String>,
    /// Web origins whose pages may call the API (CORS), e.g.
    /// `http://127.0.0.1:8080` for a dashboard served elsewhere. Needs a
    /// secret. Empty: no page of another origin may.
    pub cors_origins: Vec<String>,
    /// A dashboard's files (metacubexd, zashboard) served at `/ui/`
    /// instead of Oasis' own page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ui_dir: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            enabled: true,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9090)),
            secret: None,
            secret_file: PathBuf::from("/var/lib/oasis/api-secret"),
            hosts: Vec::new(),
            cors_origins: Vec::new(),
            ui_dir: None,
        }
    }
}

/// The Monitor's settings (docs/monitor.md explains each).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// All probes together, at most this many a second ...
    pub probes_per_second: u32,
    /// ... and this many bytes a second, encapsulation included.
    pub probe_bytes_per_second: u32,
    /// `latency`: an overlay takes new flows only when faster than the
    /// underlay by this many milliseconds ...
    pub latency_margin_ms: u64,
    /// ... and by this percentage of the underlay's round trip.
    pub latency_margin_percent: u32,
    /// `throughput`: an overlay must promise this percentage of the
    /// underlay's goodput (125: a quarter more).
    pub throughput_percent: u32,
    /// `loss<X%`: the underlay's loss counts from this many outcomes on.
    pub loss_min_samples: u64,
    /// `loss<X%`: flows return to the underlay once its loss has stayed
    /// under half the limit this long.
    pub loss_recovery_secs: u64,
    /// A better carrier must still be better this long later.
    pub confirm_secs: u64,
    /// A choice is kept at least this long after a flip, doubling with
    /// each further flip up to `hold_max_secs`.
    pub hold_secs: u64,
    pub hold_max_secs: u64,
    /// Figures older than this count as none.
    pub stale_secs: u64,
    /// TCP ports held for the Monitor's probes.
    pub probe_ports: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            probes_per_second: 20,
            probe_bytes_per_second: 8000,
            latency_margin_ms: 10,
            latency_margin_percent: 15,
            throughput_percent: 125,
            loss_min_samples: 100,
            loss_recovery_secs: 60,
            confirm_secs: 5,
            hold_secs: 30,
            hold_max_secs: 480,
            stale_secs: 600,
            probe_ports: 16,
        }
    }
}

impl MonitorConfig {
    /// The settings the Monitor runs with.
    pub fn settings(&self) -> crate::monitor::MonitorSettings {
        use std::time::Duration;
        crate::monitor::MonitorSettings {
            decisions: crate::monitor::DecisionSettings {
                latency_margin: Duration::from_millis(self.latency_margin_ms),
                latency_margin_fraction: f64::from(self.latency_margin_percent) / 100.0,
                throughput_factor: f64::from(self.throughput_percent) / 100.0,
                loss_min_samples: self.loss_min_samples,
                loss_recovery: Duration::from_secs(self.loss_recovery_secs),
                confirm_after: Duration::from_secs(self.confirm_secs),
                hold_min: Duration::from_secs(self.hold_secs),
                hold_max: Duration::from_secs(self.hold_max_secs.max(self.hold_secs)),
            },
            probes_per_second: self.probes_per_second,
            probe_bytes_per_second: self.probe_bytes_per_second,
            stale_after: Duration::from_secs(self.stale_secs),
            ..crate::monitor::MonitorSettings::default()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredRule {
    pub id: u32,
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// Read by hand: serde's `flatten` would pass any unknown key by, so a
/// misspelt field (`dprot: 8080`) would silently widen the rule. The `id`
/// is taken out of the mapping and the rest handed to `RuleSpec`, which
/// refuses keys it does not know, with the file's line and column.
impl<'de> Deserialize<'de> for StoredRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(StoredRuleVisitor)
    }
}

struct StoredRuleVisitor;

impl<'de> serde::de::Visitor<'de> for StoredRuleVisitor {
    type Value = StoredRule;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a rule: a mapping with an `id` and the rule's fields")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<StoredRule, A::Error> {
        let mut without_id = WithoutId { inner: map, id: None };
        let spec = RuleSpec::deserialize(serde::de::value::MapAccessDeserializer::new(&mut without_id))?;
        let id = without_id
            .id
            .ok_or_else(|| serde::de::Error::missing_field("id"))?;
        Ok(StoredRule { id, spec })
    }
}

/// A rule's mapping with its `id` entry kept aside.
struct WithoutId<A> {
    inner: A,
    id: Option<u32>,
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for &mut WithoutId<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = seed;
        loop {
            // The key is read by the file's own deserializer, so an unknown
            // one is reported at its line and column.
            match self.inner.next_key_seed(KeySeed(seed))? {
                None => return Ok(None),
                Some(RuleKey::Field(value)) => return Ok(Some(value)),
                Some(RuleKey::Id(unused)) => {
                    if self.id.is_some() {
                        return Err(serde::de::Error::duplicate_field("id"));
                    }
                    self.id = Some(self.inner.next_value()?);
                    seed = unused;
                }
            }
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// A key of a rule's mapping: `id` (handing the field seed back for the
/// next key), or one of `RuleSpec`'s fields.
enum RuleKey<K, V> {
    Id(K),
    Field(V),
}

struct KeySeed<K>(K);

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::DeserializeSeed<'de> for KeySeed<K> {
    type Value = RuleKey<K, K::Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::Visitor<'de> for KeySeed<K> {
    type Value = RuleKey<K, K::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a rule field's name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        if key == "id" {
            return Ok(RuleKey::Id(self.0));
        }
        self.0
            .deserialize(serde::de::IntoDeserializer::<E>::into_deserializer(key))
            .map(RuleKey::Field)
    }
}

impl StoredRule {
    /// The rule as an item of the file's `rules:` list.
    pub fn yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(std::slice::from_ref(self))
    }
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Write {
        path: path.into(),
        source,
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            uplinks: Vec::new(),
            tun: TunConfig::default(),
            bypass_mark: 0x4f41_5349,
            heartbeat_timeout_ms: 3_000,
            flow_idle_timeout_secs: 120,
            tcp_idle_timeout_secs: crate::engine::Lifetimes::DEFAULT_TCP.as_secs(),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            next_rule_id: None,
            overlay_port: 7400,
            overlay_fast_path: true,
            underlay_port: 7401,
            dns: DnsConfig::default(),
            monitor: MonitorConfig::default(),
            modules: crate::module::ModuleLimits::default(),
            api: ApiConfig::default(),
            overlays: Vec::new(),
            rules: Vec::new(),
        }
    }
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            name: "oasis0".into(),
            address: std::net::Ipv4Addr::new(192, 0, 0, 8),
            queues: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config file {path}, rule {id}: {source}")]
    Rule {
        path: PathBuf,
        id: u32,
        source: RuleError,
    },
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("config file {path}, overlay {name:?}: {source}")]
    Overlay {
        path: PathBuf,
        name: String,
        source: JoinError,
    },
    #[error("cannot write config file {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Reads the prefix set a rule's `dst_set` names, relative to the config
/// file's directory.
fn read_set(config_path: &Path, file: &str) -> Result<PrefixSet, PrefixSetError> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let path = base.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| PrefixSetError::Read {
        file: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(PrefixSet::parse(&path.display().to_string(), &text)?.kept_in(file.to_string()))
}

/// The directory the daemon keeps lists fetched by URL in, beside the
/// config file.
pub const LISTS_DIR: &str = "lists";

/// A list rule's last good copy, as the daemon kept it. A list never
/// fetched (a rule written into the file by hand, a copy deleted) starts
/// empty, claiming nothing, until the daemon has fetched it.
pub fn read_list(config_path: &Path, spec: &RuleSpec, source: ListSource) -> Result<ListContent, RuleError> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let file = spec
        .list_file
        .clone()
        .unwrap_or_else(|| format!("{LISTS_DIR}/{}", source.file_name()));
    crate::rule_list::check_file(&file)?;
    let text = match std::fs::read_to_string(base.join(&file)) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(RuleError::Set(Box::new(PrefixSetError::Read {
                file: base.join(&file).display().to_string(),
                reason: e.to_string(),
            })));
        }
    };
    list_content(source, file, text.as_deref())
}

/// A list's entries from its text (`None`: not fetched yet).
pub fn list_content(source: ListSource, file: String, text: Option<&str>) -> Result<ListContent, RuleError> {
    if let Some(text) = text {
        crate::rule_list::check_lines(&source.url, text)?;
    }
    Ok(match (source.kind, text) {
        (ListKind::Cidr, Some(text)) => ListContent::Prefixes(Arc::new(
            PrefixSet::parse(&source.url, text)?
                .kept_in(file)
                .from_source(source),
        )),
        (ListKind::Cidr, None) => ListContent::Prefixes(Arc::new(PrefixSet::empty(file).from_source(source))),
        (_, Some(text)) => ListContent::Names(Arc::new(NameList::parse(source, file, text)?)),
        (_, None) => ListContent::Names(Arc::new(NameList::unfetched(source, file))),
    })
}

const HEADER: &str = "\
# Oasis configuration. Keys: see docs/configuration.md. Edit it as you like:
# the daemon writes only next_rule_id, overlays and rules (as `oasis rule`
# and `oasis overlay` change them), keeping your comments and layout; your
# other changes take effect when the daemon starts again.
";

impl Config {
    /// How long the engine keeps flows without packets.
    pub fn lifetimes(&self) -> crate::engine::Lifetimes {
        crate::engine::Lifetimes {
            tcp: std::time::Duration::from_secs(self.tcp_idle_timeout_secs),
            ..crate::engine::Lifetimes::new(std::time::Duration::from_secs(self.flow_idle_timeout_secs))
        }
    }

    /// Reads the file, or the defaults when it does not exist yet.
    pub fn load_or_default(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            })?
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |problem: &str| ConfigError::Invalid {
            path: path.into(),
            problem: problem.into(),
        };
        if self.tun.name.is_empty() || self.tun.name.len() > 15 {
            return Err(invalid(
                "tun.name must be 1 to 15 characters (a Linux interface name)",
            ));
        }
        if self.tun.queues == 0 || self.tun.queues > 64 {
            return Err(invalid("tun.queues must be between 1 and 64"));
        }
        if self.heartbeat_timeout_ms < 500 {
            return Err(invalid("heartbeat_timeout_ms must be at least 500"));
        }
        if self.flow_idle_timeout_secs == 0 {
            return Err(invalid("flow_idle_timeout_secs must be at least 1"));
        }
        if self.tcp_idle_timeout_secs < self.flow_idle_timeout_secs {
            return Err(invalid(
                "tcp_idle_timeout_secs must be at least flow_idle_timeout_secs (an established TCP connection \
                 outlives any other flow)",
            ));
        }
        if self.bypass_mark == 0 {
            return Err(invalid(
                "bypass_mark must not be 0 (unmarked packets have mark 0)",
            ));
        }
        if self.overlay_port == 0 || self.underlay_port == 0 {
            return Err(invalid(
                "overlay_port and underlay_port must be port numbers 1-65535",
            ));
        }
        if self.overlay_port == self.underlay_port {
            return Err(invalid("overlay_port and underlay_port must differ"));
        }
        if self.dns.port == 0 || self.dns.port == 53 {
            return Err(invalid(
                "dns.port must be a free port other than 53 (queries to port 53 are sent to it)",
            ));
        }
        if self.dns.fake_capacity == 0 {
            return Err(invalid("dns.fake_capacity must be at least 1"));
        }
        if self.dns.fake_v4.prefix_len() > 30 || self.dns.fake_v6.prefix_len() > 126 {
            return Err(invalid(
                "dns.fake_v4 and dns.fake_v6 must hold a few addresses: at most /30 and /126",
            ));
        }
        if self.dns.upstream_timeout_ms < 100 {
            return Err(invalid("dns.upstream_timeout_ms must be at least 100"));
        }
        if let Err(problem) = crate::api::check_settings(&self.api) {
            return Err(invalid(&problem));
        }
        for upstream in &self.dns.upstreams {
            crate::dns::upstream::parse_upstream(upstream).map_err(|e| invalid(&e.to_string()))?;
        }
        for (i, overlay) in self.overlays.iter().enumerate() {
            let overlay_error = |source| ConfigError::Overlay {
                path: path.into(),
                name: overlay.name.clone(),
                source,
            };
            check_name(&overlay.name).map_err(overlay_error)?;
            if self.overlays[..i].iter().any(|o| o.name == overlay.name) {
                return Err(overlay_error(JoinError::Exists(overlay.name.clone())));
            }
            shim_bytes(overlay.spec.shim_len, overlay.token.as_deref()).map_err(overlay_error)?;
        }
        for rule in self.rule_set(path)?.all() {
            crate::overlay::check_carrier(rule.via(), &self.overlays).map_err(|source| {
                ConfigError::Rule {
                    path: path.into(),
                    id: rule.id(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The stored rules as a checked rule list.
    pub fn rule_set(&self, path: &Path) -> Result<RuleSet, ConfigError> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for stored in &self.rules {
            let rule_error = |source| ConfigError::Rule {
                path: path.into(),
                id: stored.id,
                source,
            };
            let content = match (
                &stored.spec.dst_set,
                stored.spec.list_source().map_err(rule_error)?,
            ) {
                (_, Some(source)) => Some(read_list(path, &stored.spec, source).map_err(rule_error)?),
                (Some(file), None) => Some(ListContent::Prefixes(Arc::new(
                    read_set(path, file).map_err(|e| rule_error(e.into()))?,
                ))),
                (None, None) => None,
            };
            let (subset, via) = stored.spec.parse_content(content).map_err(rule_error)?;
            rules.push(match subset {
                Subset::Header(subset) => AnyRule::Header(Rule {
                    id: stored.id,
                    subset,
                    via,
                }),
                Subset::Name(pattern, sender) => AnyRule::Name(NameRule {
                    id: stored.id,
                    pattern,
                    via,
                    sender,
                }),
            });
        }
        let mut set = RuleSet::from_rules(rules).map_err(|source| {
            let id = match &source {
                RuleError::Duplicate { existing, .. } => *existing,
                _ => 0,
            };
            ConfigError::Rule {
                path: path.into(),
                id,
                source,
            }
        })?;
        // Ids of rules deleted before the last save are never handed out again.
        if let Some(next) = self.next_rule_id {
            set.reserve_ids_below(next);
        }
        Ok(set)
    }

    pub fn with_rules(&self, rules: &RuleSet) -> Config {
        let mut config = self.clone();
        config.next_rule_id = Some(rules.next_id());
        config.rules = rules
            .all()
            .iter()
            .map(|r| StoredRule {
                id: r.id(),
                spec: r.spec(),
            })
            .collect();
        config
    }

    /// Writes the file atomically (a temporary file renamed over it), so a
    /// crash mid-write never leaves half a config behind.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let blocks: Vec<String> = self
            .rules
            .iter()
            .map(StoredRule::yaml)
            .collect::<Result<_, _>>()
            .map_err(|e| write_error(path)(std::io::Error::other(e)))?;
        self.save_with_rules(path, blocks.iter().map(String::as_str))
    }

    /// Writes the file with these rules, rendered by [`StoredRule::yaml`]
    /// (one rule or several in each piece; the daemon keeps them rendered,
    /// so a file with a million rules is written without serialising them
    /// again); this config's own `rules` are ignored.
    pub fn save_with_rules<'a>(
        &self,
        path: &Path,
        rules: impl Iterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let mut rules = rules.peekable();
        let write_error = write_error(path);
        let settings = Config {
            rules: Vec::new(),
            ..self.clone()
        };
        let mut yaml = serde_yaml::to_string(&settings).map_err(|e| write_error(std::io::Error::other(e)))?;
        // `rules` is the last field: its empty list ends the text.
        if rules.peek().is_some() {
            let head = yaml.strip_suffix("rules: []\n").ok_or_else(|| {
                write_error(std::io::Error::other("the rules are not the config's last key"))
            })?;
            yaml = format!("{head}rules:\n");
        }
        write_with(path, |out| {
            out.write_all(HEADER.as_bytes())?;
            out.write_all(yaml.as_bytes())?;
            for rule in rules {
                out.write_all(rule.as_bytes())?;
            }
            Ok(())
        })
    }
}

/// Writes `text` as the file at `path` atomically (a temporary file renamed
/// over it, synced first), so a crash mid-write never leaves half a file.
pub fn write_atomically(path: &Path, text: &[u8]) -> Result<(), ConfigError> {
    write_with(path, |out| out.write_all(text))
}

fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), ConfigError> {
    let write_error = write_error(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(&write_error)?;
    }
    let tmp = path.with_extension("yaml.tmp");
    let file = std::fs::File::create(&tmp).map_err(&write_error)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    fill(&mut out).map_err(&write_error)?;
    let file = out.into_inner().map_err(|e| write_error(e.into_error()))?;
    file.sync_all().map_err(&write_error)?;
    std::fs::rename(&tmp, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name_pattern::NamePattern;
    use crate::rules::Carrier;

    #[test]
    fn the_monitor_section_defaults_to_the_monitors_defaults() {
        let mut settings = MonitorConfig::default().settings();
        assert_eq!(settings, crate::monitor::MonitorSettings::default());
        // And what a user writes reaches it.
        let config: Config =
            serde_yaml::from_str("monitor:\n  latency_margin_ms: 25\n  hold_secs: 60\n").unwrap();
        settings = config.monitor.settings();
        assert_eq!(
            settings.decisions.latency_margin,
            std::time::Duration::from_millis(25)
        );
        assert_eq!(settings.decisions.hold_min, std::time::Duration::from_secs(60));
        assert!(serde_yaml::from_str::<Config>("monitor:\n  latncy_margin_ms: 25\n").is_err());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse(Path::new("c.yaml"), "").unwrap(), Config::default());
    }

    #[test]
    fn rules_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("oasis-config-test-{}", std::process::id()));
        let path = dir.join("config.yaml");
        let mut rules = RuleSet::default();
        let (subset, _) = RuleSpec {
            proto: Some("tcp".into()),
            dst: Some("203.0.113.0/24".into()),
            dport: Some("8000-8099".into()),
            sport: None,
            via: "underlay".into(),
            ..RuleSpec::default()
        }
        .parse_header()
        .unwrap();
        rules.add(subset, Carrier::Underlay).unwrap();
        let (name, _) = RuleSpec {
            name_suffix: Some("example.org".into()),
            via: "underlay".into(),
            ..RuleSpec::default()
        }
        .parse()
        .unwrap();
        rules.add_any(name, Carrier::Underlay).unwrap();
        let config = Config::default().with_rules(&rules);
        config.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Oasis configuration"));
        let loaded = Config::load_or_default(&path).unwrap();
        assert_eq!(loaded, config);
        assert_eq!(loaded.rule_set(&path).unwrap().rules(), rules.rules());
        assert_eq!(loaded.rule_set(&path).unwrap().names(), rules.names());
        assert!(text.contains("name_suffix: example.org"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sender_and_list_rules_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("oasis-config-lists-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lists")).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(dir.join("lists/nl.cidr"), "192.0.2.0/24\n").unwrap();
        let text = "\
rules:
  - id: 1
    uid: 1000
    cgroup: /system.slice/backup.service
    app: /usr/bin/restic
    proto: tcp
    via: underlay
  - id: 2
    list: https://lists.example/nl.cidr
    list_kind: cidr
    every: 12h
    list_file: lists/nl.cidr
    dport: 443
    via: underlay
  - id: 3
    list: https://lists.example/ads.txt
    list_kind: suffix
    via: underlay
  - id: 4
    name_suffix: example.org
    uid: 1000
    via: underlay
";
        let config = Config::parse(&path, text).unwrap();
        let rules = config.rule_set(&path).unwrap();
        let header = rules.rules();
        assert_eq!(header[0].subset.sender.uid, Some(1000));
        assert_eq!(
            header[0].subset.sender.cgroup.as_ref().unwrap().as_str(),
            "system.slice/backup.service"
        );
        let set = header[1].subset.dst_set.as_ref().unwrap();
        assert!(set.contains("192.0.2.9".parse().unwrap()));
        assert_eq!(
            set.source().unwrap().every,
            std::time::Duration::from_secs(12 * 3600)
        );
        // Never fetched: claims nothing until the daemon has it.
        let names = rules.names();
        assert!(matches!(&names[0].pattern, NamePattern::List(list) if list.patterns().is_empty()));
        assert_eq!(names[1].sender.uid, Some(1000));
        let saved = config.with_rules(&rules);
        let specs: Vec<&RuleSpec> = saved.rules.iter().map(|r| &r.spec).collect();
        assert_eq!(specs[0].app.as_deref(), Some("/usr/bin/restic"));
        assert_eq!(specs[1].list.as_deref(), Some("https://lists.example/nl.cidr"));
        assert_eq!(specs[1].list_file.as_deref(), Some("lists/nl.cidr"));
        assert_eq!(specs[1].every.as_deref(), Some("12h"));
        assert!(
            specs[1].dst_set.is_none(),
            "a list is not written as a prefix set"
        );
        // A list's kept copy is the daemon's to name: nothing outside lists/.
        let stray = text.replace("list_file: lists/nl.cidr", "list_file: /etc/shadow");
        let err = Config::parse(&path, &stray).unwrap_err().to_string();
        assert!(err.contains("rule 2") && err.contains("lists/NAME"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_prefix_set_is_read_beside_the_config_file() {
        let dir = std::env::temp_dir().join(format!("oasis-config-set-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sets")).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(dir.join("sets/nl.txt"), "# NL\n192.0.2.0/24\n2001:db8::/32\n").unwrap();
        let text = "rules:\n  - id: 3\n    dst_set: sets/nl.txt\n    proto: tcp\n    via: underlay\n";
        let config = Config::parse(&path, text).unwrap();
        let rules = config.rule_set(&path).unwrap();
        let set = rules.rules()[0].subset.dst_set.clone().expect("a set");
        assert_eq!(set.file(), "sets/nl.txt");
        assert!(set.contains("192.0.2.77".parse().unwrap()));
        // Written back as it was named.
        let saved = config.with_rules(&rules);
        assert_eq!(saved.rules[0].spec.dst_set.as_deref(), Some("sets/nl.txt"));

        std::fs::write(dir.join("sets/nl.txt"), "192.0.2.0/24\n192.0.2.300/24\n").unwrap();
        let err = Config::parse(&path, text).unwrap_err().to_string();
        assert!(err.contains("rule 3") && err.contains("nl.txt line 2"), "{err}");
        std::fs::remove_file(dir.join("sets/nl.txt")).unwrap();
        let err = Config::parse(&path, text).unwrap_err().to_string();
        assert!(
            err.contains("rule 3") && err.contains("cannot read the prefix set"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_rule_names_file_and_rule() {
        let text = "rules:\n  - id: 7\n    proto: tcp\n    dport: 99999\n    via: underlay\n";
        let err = Config::parse(Path::new("/etc/oasis/config.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/oasis/config.yaml") && err.contains("rule 7") && err.contains("99999"),
            "{err}"
        );
    }

    #[test]
    fn misspelt_keys_in_rules_and_overlays_are_refused_with_their_line() {
        let text = "overlays: []\nrules:\n  - id: 1\n    proto: tcp\n    dprot: 8080\n    via: underlay\n";
        let err = Config::parse(Path::new("c.yaml"), text).unwrap_err().to_string();
        assert!(err.contains("dprot") && err.contains("line 5"), "{err}");
        let overlay = "overlays:\n  - name: detour\n    url: http://x/d.xml\n    spec: {entries: ['192.0.2.1:7400'], shim_lne: 4}\n";
        let err = Config::parse(Path::new("c.yaml"), overlay)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shim_lne") && err.contains("line 4"), "{err}");
        // Every other key still reads, and the rule round-trips.
        let good = "rules:\n  - id: 3\n    proto: tcp\n    dport: 8080\n    via: underlay\n";
        let config = Config::parse(Path::new("c.yaml"), good).unwrap();
        assert_eq!(config.rules[0].id, 3);
        assert_eq!(config.rules[0].spec.dport.as_deref(), Some("8080"));
        let again: Vec<StoredRule> = serde_yaml::from_str(&config.rules[0].yaml().unwrap()).unwrap();
        assert_eq!(again[0], config.rules[0]);
        assert!(Config::parse(Path::new("c.yaml"), "rules:\n  - {proto: tcp, via: underlay}\n").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse(Path::new("c.yaml"), "uplink: [eth0]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("uplink"), "{err}");
    }

    #[test]
    fn rules_must_name_joined_overlays() {
        let text = "rules:\n  - {id: 1, proto: udp, via: detour}\n";
        let err = Config::parse(Path::new("c.yaml"), text).unwrap_err().to_string();
        assert!(err.contains("rule 1") && err.contains("detour"), "{err}");
        let joined =
            "overlays:\n  - name: detour\n    url: http://x/d.xml\n    spec: {entries: ['192.0.2.1:7400']}\n";
        assert!(Config::parse(Path::new("c.yaml"), &format!("{joined}{text}")).is_ok());
    }

    #[test]
    fn duplicate_rules_in_the_file_are_refused() {
        let text = "rules:\n  - {id: 1, proto: udp, via: underlay}\n  - {id: 2, proto: udp, via: underlay}\n";
        assert!(Config::parse(Path::new("c.yaml"), text).is_err());
    }
}
