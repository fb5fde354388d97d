//! Who may call the API, decided from a request's headers alone: the Host
//! it names (against DNS rebinding), the Origin of the page that sent it
//! (against cross-site requests and WebSockets, which browsers never hold
//! to CORS), and the secret (compared in constant time).

use subtle::ConstantTimeEq;

use crate::config::ApiConfig;

/// What the guard knows; made once from the settings.
#[derive(Clone, Debug)]
pub struct Guard {
    secret: Option<String>,
    /// Host header values accepted, lower case, with and without the port.
    hosts: Vec<String>,
    /// Origins whose pages may call (CORS), and the API's own origins.
    origins: Vec<String>,
    own_origins: Vec<String>,
}

/// One request, as the guard reads it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Asking<'a> {
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
    /// The `token` query parameter, taken for WebSocket upgrades only
    /// (a browser cannot set a header on those).
    pub token: Option<&'a str>,
    pub websocket: bool,
    /// The page's static files need no secret: they hold none.
    pub static_file: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No Host header, or one naming another site (DNS rebinding).
    Host,
    /// A page of another origin, not listed in `api.cors_origins`.
    Origin,
    /// No secret, or the wrong one.
    Secret,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::Host | Refusal::Origin => 403,
            Refusal::Secret => 401,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::Host => "this Host is not one the API answers to (api.hosts lists more)",
            Refusal::Origin => {
                "pages of this origin may not call the API (api.cors_origins lists those that may)"
            }
            Refusal::Secret => {
                "Unauthorized: send the API secret as `Authorization: Bearer SECRET` (`oasis ui` shows it)"
            }
        }
    }
}

impl Guard {
    pub fn new(settings: &ApiConfig, secret: Option<String>) -> Guard {
        let port = settings.listen.port();
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
        let listen = match settings.listen.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            ip => ip.to_string(),
        };
        if !settings.listen.ip().is_unspecified() {
            names.push(listen);
        }
        let mut hosts = Vec::new();
        for name in &names {
            hosts.push(name.clone());
            hosts.push(format!("{name}:{port}"));
        }
        hosts.extend(settings.hosts.iter().map(|h| h.to_ascii_lowercase()));
        let own_origins = hosts.iter().map(|h| format!("http://{h}")).collect();
        Guard {
            secret: secret.filter(|s| !s.is_empty()),
            hosts,
            origins: settings
                .cors_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            own_origins,
        }
    }

    /// Whether an origin is listed for CORS (its responses then carry
    /// `Access-Control-Allow-Origin`).
    pub fn cors_allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.origins.contains(&origin)
    }

    pub fn check(&self, asking: &Asking) -> Result<(), Refusal> {
        let host = asking.host.ok_or(Refusal::Host)?.to_ascii_lowercase();
        if !self.hosts.contains(&host) {
            return Err(Refusal::Host);
        }
        if let Some(origin) = asking.origin {
            let origin = origin.to_ascii_lowercase();
            // A page of the API's own origin (our `/ui/`), or a listed one.
            // `null` (sandboxed frames, files) is another origin too.
            if !self.own_origins.contains(&origin) && !self.cors_allows(&origin) {
                return Err(Refusal::Origin);
            }
        }
        if asking.static_file {
            return Ok(());
        }
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let bearer = asking
            .authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        let given = bearer.or(if asking.websocket { asking.token } else { None });
        match given {
            Some(given) if bool::from(given.as_bytes().ct_eq(secret.as_bytes())) => Ok(()),
            _ => Err(Refusal::Secret),
        }
    }
}

/// Whether the settings are safe to serve; the problem in words if not.
pub fn check_settings(settings: &ApiConfig) -> Result<(), String> {
    if !settings.enabled {
        return Ok(());
    }
    let no_secret = settings.secret.as_deref() == Some("");
    if no_secret && !settings.listen.ip().is_loopback() {
        return Err(format!(
            "api.listen {} is not a loopback address, so the API needs a secret: remove `secret: \"\"` \
             (one is then made) or set one",
            settings.listen
        ));
    }
    if no_secret && !settings.cors_origins.is_empty() {
        return Err(
            "api.cors_origins lets pages of other sites call the API, which then needs a secret: remove \
             `secret: \"\"` or the origins"
                .into(),
        );
    }
    for origin in &settings.cors_origins {
        if origin == "*"
            || origin == "null"
            || !(origin.starts_with("http://") || origin.starts_with("https://"))
        {
            return Err(format!(
                "api.cors_origins: {origin:?} is not an origin; list each one as scheme://host[:port] \
                 (`*` and `null` are refused)"
            ));
        }
    }
    for host in &settings.hosts {
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(format!(
                "api.hosts: {host:?} is not a host name (with an optional :port)"
            ));
        }
    }
    if let Some(secret) = &settings.secret
        && !secret.is_empty()
        && (secret.len() < 8 || secret.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err("api.secret must be at least 8 characters, without spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ApiConfig {
        ApiConfig::default()
    }

    fn ask<'a>(host: &'a str) -> Asking<'a> {
        Asking {
            host: Some(host),
            ..Asking::default()
        }
    }

    #[test]
    fn only_loopback_names_and_listed_hosts_are_answered() {
        let guard = Guard::new(&settings(), None);
        for host in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST",
            "[::1]:9090",
            "127.0.0.1",
        ] {
            assert_eq!(guard.check(&ask(host)), Ok(()), "{host}");
        }
        // A rebinding attack's page names its own site, resolved to 127.0.0.1.
        for host in [
            "attacker.example:9090",
            "127.0.0.1:9091",
            "127.0.0.1.nip.io:9090",
            "",
        ] {
            assert_eq!(guard.check(&ask(host)), Err(Refusal::Host), "{host}");
        }
        assert_eq!(guard.check(&Asking::default()), Err(Refusal::Host));
        let listed = Guard::new(
            &ApiConfig {
                hosts: vec!["oasis.lan:9090".into()],
                ..settings()
            },
            None,
        );
        assert_eq!(listed.check(&ask("oasis.lan:9090")), Ok(()));
    }

    #[test]
    fn pages_of_other_origins_are_refused_even_for_websockets_and_static_files() {
        let guard = Guard::new(&settings(), None);
        let from = |origin, websocket| Asking {
            origin: Some(origin),
            websocket,
            ..ask("127.0.0.1:9090")
        };
        assert_eq!(guard.check(&from("http://127.0.0.1:9090", true)), Ok(()));
        for origin in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:8080",
            "https://127.0.0.1:9090",
        ] {
            assert_eq!(
                guard.check(&from(origin, false)),
                Err(Refusal::Origin),
                "{origin}"
            );
            assert_eq!(guard.check(&from(origin, true)), Err(Refusal::Origin), "{origin}");
        }
        let listed = Guard::new(
            &ApiConfig {
                cors_origins: vec!["http://dash.example:8080/".into()],
                ..settings()
            },
            Some("s3cret-value".into()),
        );
        let mut request = from("http://dash.example:8080", false);
        assert_eq!(listed.check(&request), Err(Refusal::Secret));
        request.authorization = Some("Bearer s3cret-value");
        assert_eq!(listed.check(&request), Ok(()));
        assert!(listed.cors_allows("http://DASH.example:8080"));
        assert!(!guard.cors_allows("http://dash.example:8080"));
    }

    #[test]
    fn the_secret_is_a_bearer_header_or_a_websockets_token() {
        let guard = Guard::new(&settings(), Some("correct horse".into()));
        let mut request = ask("localhost:9090");
        assert_eq!(guard.check(&request), Err(Refusal::Secret));
        for wrong in [
            "Bearer correct hors",
            "Bearer correct horse!",
            "correct horse",
            "Basic correct horse",
        ] {
            request.authorization = Some(wrong);
            assert_eq!(guard.check(&request), Err(Refusal::Secret), "{wrong}");
        }
        request.authorization = Some("Bearer correct horse");
        assert_eq!(guard.check(&request), Ok(()));
        let token = Asking {
            token: Some("correct horse"),
            ..ask("localhost:9090")
        };
        assert_eq!(
            guard.check(&token),
            Err(Refusal::Secret),
            "a token only opens WebSockets"
        );
        assert_eq!(
            guard.check(&Asking {
                websocket: true,
                ..token
            }),
            Ok(())
        );
        let page = Asking {
            static_file: true,
            ..ask("localhost:9090")
        };
        assert_eq!(guard.check(&page), Ok(()));
        // An empty secret is none.
        assert_eq!(
            Guard::new(&settings(), Some(String::new())).check(&ask("localhost")),
            Ok(())
        );
    }

    /// QVD-2025-20937: an empty secret with CORS open let any web page
    /// rewrite a Clash client's config. Neither half is accepted here.
    #[test]
    fn settings_that_would_open_the_api_to_other_sites_are_refused() {
        let open = |f: fn(&mut ApiConfig)| {
            let mut s = settings();
            f(&mut s);
            check_settings(&s)
        };
        assert!(open(|_| {}).is_ok());
        assert!(open(|s| s.secret = Some(String::new())).is_ok());
        let err = open(|s| {
            s.secret = Some(String::new());
            s.listen = "0.0.0.0:9090".parse().unwrap();
        })
        .unwrap_err();
        assert!(err.contains("needs a secret"), "{err}");
        assert!(
            open(|s| {
                s.secret = Some(String::new());
                s.cors_origins = vec!["http://a.example".into()];
            })
            .is_err()
        );
        assert!(open(|s| s.cors_origins = vec!["*".into()]).is_err());
        assert!(open(|s| s.cors_origins = vec!["null".into()]).is_err());
        assert!(open(|s| s.secret = Some("short".into())).is_err());
        assert!(open(|s| s.hosts = vec!["a/b".into()]).is_err());
        assert!(
            open(|s| {
                s.enabled = false;
                s.cors_origins = vec!["*".into()];
            })
            .is_ok()
        );
    }
}
