//! Where the broker resolves names it does not fake: the servers in
//! `dns.upstreams`, or by default the host's own (resolv.conf).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::xfer::Protocol;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{Resolver, TokioResolver};

#[cfg(unix)]
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved lists the servers behind its 127.0.0.53 stub.
#[cfg(unix)]
const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error(
        "dns.upstreams entry {text:?}: {problem} (write e.g. 192.0.2.53, [2001:db8::53]:53, tcp://192.0.2.53, \
         tls://1.1.1.1#cloudflare-dns.com or https://1.1.1.1#cloudflare-dns.com)"
    )]
    Bad { text: String, problem: &'static str },
    #[error("no upstream DNS server: dns.upstreams is empty and {path} names none ({reason})")]
    NoneFound { path: String, reason: String },
}

/// Parses one `dns.upstreams` entry. A bare address means plain DNS over
/// UDP with TCP for truncated answers, as resolv.conf servers are used.
pub fn parse_upstream(text: &str) -> Result<Vec<NameServerConfig>, UpstreamError> {
    let bad = |problem| UpstreamError::Bad {
        text: text.to_string(),
        problem,
    };
    let trimmed = text.trim();
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => (String::from("dns"), trimmed),
    };
    let (address, tls_name) = match rest.split_once('#') {
        Some((address, name)) if !name.is_empty() => (address, Some(name.to_string())),
        Some(_) => return Err(bad("empty TLS name after '#'")),
        None => (rest, None),
    };
    let (protocols, default_port): (&[Protocol], u16) = match scheme.as_str() {
        "dns" => (&[Protocol::Udp, Protocol::Tcp], 53),
        "udp" => (&[Protocol::Udp], 53),
        "tcp" => (&[Protocol::Tcp], 53),
        "tls" => (&[Protocol::Tls], 853),
        "https" => (&[Protocol::Https], 443),
        _ => return Err(bad("unknown scheme: use udp://, tcp://, tls:// or https://")),
    };
    let encrypted = matches!(scheme.as_str(), "tls" | "https");
    if encrypted && tls_name.is_none() {
        return Err(bad(
            "DNS over TLS or HTTPS needs the server's certificate name after '#'",
        ));
    }
    if !encrypted && tls_name.is_some() {
        return Err(bad("a '#name' only goes with tls:// or https://"));
    }
    let socket_addr = if let Ok(addr) = address.parse::<SocketAddr>() {
        addr
    } else if let Ok(ip) = address.parse::<IpAddr>() {
        SocketAddr::new(ip, default_port)
    } else {
        return Err(bad("not an IP address (with an optional port)"));
    };
    Ok(protocols
        .iter()
        .map(|protocol| {
            let mut server = NameServerConfig::new(socket_addr, *protocol);
            server.tls_dns_name = tls_name.clone();
            if *protocol == Protocol::Https {
                server.http_endpoint = Some("/dns-query".into());
            }
            server
        })
        .collect())
}

/// The host's own servers, as the OS names them.
#[cfg(not(unix))]
pub fn system_upstreams(_listen_port: u16) -> Result<Vec<NameServerConfig>, UpstreamError> {
    let none = |reason: String| UpstreamError::NoneFound {
        path: "the system's DNS configuration".into(),
        reason,
    };
    let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| none(e.to_string()))?;
    Ok(config.name_servers().to_vec())
}

/// The host's own servers. A host whose resolv.conf names only a local
/// stub (systemd-resolved) has its queries to that stub redirected here
/// like all others, so the servers behind the stub are used instead.
#[cfg(unix)]
pub fn system_upstreams(listen_port: u16) -> Result<Vec<NameServerConfig>, UpstreamError> {
    let servers = read_servers(std::path::Path::new(RESOLV_CONF))?;
    let all_local = servers.iter().all(|s| s.socket_addr.ip().is_loopback());
    if all_local && let Ok(behind_stub) = read_servers(std::path::Path::new(RESOLVED_UPSTREAMS)) {
        return Ok(behind_stub);
    }
    // Never ask ourselves.
    Ok(servers
        .into_iter()
        .filter(|s| !(s.socket_addr.ip().is_loopback() && s.socket_addr.port() == listen_port))
        .collect())
}

/// resolv.conf as it is now (empty when unreadable), to notice changes.
pub fn read_resolv_conf() -> Vec<u8> {
    #[cfg(unix)]
    return std::fs::read(RESOLV_CONF).unwrap_or_default();
    #[cfg(not(unix))]
    return Vec::new();
}

/// The addresses resolv.conf names, loopback stubs included.
pub fn resolv_conf_servers() -> Vec<IpAddr> {
    #[cfg(unix)]
    return read_servers(std::path::Path::new(RESOLV_CONF))
        .map(|servers| servers.iter().map(|s| s.socket_addr.ip()).collect())
        .unwrap_or_default();
    #[cfg(not(unix))]
    return Vec::new();
}

#[cfg(unix)]
fn read_servers(path: &std::path::Path) -> Result<Vec<NameServerConfig>, UpstreamError> {
    let none = |reason: String| UpstreamError::NoneFound {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| none(e.to_string()))?;
    let (config, _) =
        hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| none(e.to_string()))?;
    let servers = config.name_servers().to_vec();
    if servers.is_empty() {
        return Err(none("no nameserver line".into()));
    }
    Ok(servers)
}

/// How the broker resolves what it does not fake, from one set of servers.
pub struct Resolving {
    pub resolver: TokioResolver,
    /// Whether a server is on loopback (a local stub, which may forward
    /// back to us).
    pub on_loopback: bool,
    /// The server a DNS thread asks itself (ask.rs): the first one, when
    /// it speaks plain UDP and is not on loopback. Loops through a local
    /// stub are only noticed on the resolver's path.
    pub direct: Option<SocketAddr>,
}

impl Resolving {
    pub fn new(servers: Vec<NameServerConfig>, timeout: Duration) -> Resolving {
        let on_loopback = servers.iter().any(|s| s.socket_addr.ip().is_loopback());
        let direct = servers
            .first()
            .filter(|s| s.protocol == Protocol::Udp && !on_loopback)
            .map(|s| s.socket_addr);
        Resolving {
            resolver: resolver(servers, timeout),
            on_loopback,
            direct,
        }
    }
}

/// The resolver the broker forwards to: no cache of its own (the broker's
/// answer cache keeps what it returns, and keeping it twice only doubled the
/// memory), no hosts file (the application's own resolver already read it),
/// answers as given.
fn resolver(servers: Vec<NameServerConfig>, timeout: Duration) -> TokioResolver {
    let mut config = ResolverConfig::new();
    for server in servers {
        config.add_name_server(server);
    }
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    options.attempts = 1;
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true;
    options.ndots = 0;
    options.edns0 = true;
    let mut builder = Resolver::builder_with_config(config, TokioConnectionProvider::default());
    *builder.options_mut() = options;
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_udp_server_off_loopback_is_asked_directly() {
        let timeout = Duration::from_secs(1);
        let servers = |texts: &[&str]| {
            texts
                .iter()
                .flat_map(|t| parse_upstream(t).unwrap())
                .collect::<Vec<_>>()
        };
        let plain = Resolving::new(servers(&["192.0.2.53", "tls://1.1.1.1#one.one.one.one"]), timeout);
        assert_eq!(plain.direct, Some("192.0.2.53:53".parse().unwrap()));
        assert!(!plain.on_loopback);
        let encrypted_first =
            Resolving::new(servers(&["tls://1.1.1.1#one.one.one.one", "192.0.2.53"]), timeout);
        assert_eq!(encrypted_first.direct, None);
        let tcp = Resolving::new(servers(&["tcp://192.0.2.53"]), timeout);
        assert_eq!(tcp.direct, None);
        let stub = Resolving::new(servers(&["192.0.2.53", "127.0.0.53"]), timeout);
        assert!(stub.on_loopback);
        assert_eq!(stub.direct, None, "a loop through the stub must stay visible");
    }

    #[test]
    fn bare_addresses_use_udp_and_tcp_on_port_53() {
        let servers = parse_upstream("192.0.2.53").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].socket_addr, "192.0.2.53:53".parse().unwrap());
        assert_eq!(servers[0].protocol, Protocol::Udp);
        assert_eq!(servers[1].protocol, Protocol::Tcp);
        let v6 = parse_upstream("[2001:db8::53]:5353").unwrap();
        assert_eq!(v6[0].socket_addr, "[2001:db8::53]:5353".parse().unwrap());
        assert_eq!(parse_upstream("2001:db8::53").unwrap()[0].socket_addr.port(), 53);
    }

    #[test]
    fn encrypted_upstreams_need_a_name() {
        let tls = parse_upstream("tls://1.1.1.1#cloudflare-dns.com").unwrap();
        assert_eq!(tls.len(), 1);
        assert_eq!(tls[0].protocol, Protocol::Tls);
        assert_eq!(tls[0].socket_addr.port(), 853);
        assert_eq!(tls[0].tls_dns_name.as_deref(), Some("cloudflare-dns.com"));
        let https = parse_upstream("https://1.1.1.1#cloudflare-dns.com").unwrap();
        assert_eq!(https[0].socket_addr.port(), 443);
        assert!(matches!(
            parse_upstream("tls://1.1.1.1"),
            Err(UpstreamError::Bad { .. })
        ));
        assert!(matches!(
            parse_upstream("udp://1.1.1.1#x"),
            Err(UpstreamError::Bad { .. })
        ));
    }

    #[test]
    fn nonsense_is_refused_with_the_entry_named() {
        let err = parse_upstream("quic://1.1.1.1").unwrap_err();
        assert!(err.to_string().contains("quic://1.1.1.1"), "{err}");
        assert!(parse_upstream("dns.example").is_err());
        assert!(parse_upstream("").is_err());
    }
}
