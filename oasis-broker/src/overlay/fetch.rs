//! Fetching a specification from its URL.

use super::spec::{MAX_SPEC_BYTES, OverlaySpec, SpecError};

/// Why fetching a specification failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http:// or https:// URL")]
    BadUrl(String),
    #[error("{url:?} is not a valid URL: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("fetching {url}: the server redirected to {location:?}; only http:// and https:// are followed")]
    Redirect { url: String, location: String },
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("fetching {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("fetching {url}: the document is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: {source}")]
    Spec { url: String, source: SpecError },
}

/// Fetches and checks a specification: 10 s in all, at most
/// [`MAX_SPEC_BYTES`], following at most 3 redirects.
pub async fn fetch(url: &str) -> Result<OverlaySpec, FetchError> {
    let body = fetch_bytes(url, MAX_SPEC_BYTES, std::time::Duration::from_secs(10)).await?;
    let text = String::from_utf8(body).map_err(|_| FetchError::Spec {
        url: url.into(),
        source: SpecError::Xml("the document is not UTF-8".into()),
    })?;
    OverlaySpec::parse(&text).map_err(|source| FetchError::Spec {
        url: url.into(),
        source,
    })
}

/// Fetches at most `limit` bytes from an http(s) URL within `timeout`,
/// following at most 3 redirects (never to another scheme).
pub async fn fetch_bytes(
    url: &str,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, FetchError> {
    match fetch_if_changed(url, limit, timeout, &Validators::default()).await? {
        Fetched::Changed { body, .. } => Ok(body),
        // Asked unconditionally, a server has no business answering this.
        Fetched::NotModified => Err(FetchError::Status {
            url: url.into(),
            status: 304,
        }),
    }
}

/// What the server said of the copy last fetched, to ask whether it
/// changed since (HTTP conditional requests).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

#[derive(Debug)]
pub enum Fetched {
    /// The server's copy is the one we have (304).
    NotModified,
    Changed {
        body: Vec<u8>,
        validators: Validators,
    },
}

/// As [`fetch_bytes`], asking the server for the document only if it
/// changed since the copy `since` describes.
pub async fn fetch_if_changed(
    url: &str,
    limit: usize,
    timeout: std::time::Duration,
    since: &Validators,
) -> Result<Fetched, FetchError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(FetchError::BadUrl(url.into()));
    }
    // Parsed here, so a bad port or host is named rather than reported as
    // reqwest's "builder error".
    reqwest::Url::parse(url).map_err(|e| FetchError::InvalidUrl {
        url: url.into(),
        reason: e.to_string(),
    })?;
    let http = |e: reqwest::Error| FetchError::Http {
        url: url.into(),
        reason: http_reason(&e, timeout),
    };
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(std::time::Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(http)?;
    let mut request = client.get(url);
    if let Some(etag) = &since.etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    if let Some(date) = &since.last_modified {
        request = request.header(reqwest::header::IF_MODIFIED_SINCE, date);
    }
    let mut response = request.send().await.map_err(http)?;
    if response.status() == reqwest::StatusCode::NOT_MODIFIED && since != &Validators::default() {
        return Ok(Fetched::NotModified);
    }
    if response.status().is_redirection() {
        // A redirect reqwest would not follow (to file:, ftp:, ...).
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("")
            .to_string();
        return Err(FetchError::Redirect {
            url: url.into(),
            location,
        });
    }
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: url.into(),
            status: response.status().as_u16(),
        });
    }
    if response.content_length().is_some_and(|n| n as usize > limit) {
        return Err(FetchError::TooLarge {
            url: url.into(),
            limit,
        });
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 256)
            .map(str::to_string)
    };
    let validators = Validators {
        etag: header(reqwest::header::ETAG),
        last_modified: header(reqwest::header::LAST_MODIFIED),
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http)? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(FetchError::TooLarge {
                url: url.into(),
                limit,
            });
        }
    }
    Ok(Fetched::Changed { body, validators })
}

/// What went wrong, in words a user can act on: reqwest's own text names
/// the step ("error decoding response body") rather than the cause.
fn http_reason(error: &reqwest::Error, timeout: std::time::Duration) -> String {
    if error.is_timeout() {
        return format!(
            "no complete answer within {} s (connecting within 5 s); is the server up and reachable?",
            timeout.as_secs()
        );
    }
    if error.is_redirect() {
        return "too many redirects (more than 3)".into();
    }
    let mut text = if error.is_connect() {
        "cannot connect".to_string()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_and_redirects_are_named() {
        let err = fetch("http://192.0.2.1:99999/x.xml")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid port"), "{err}");
        // A server that redirects to file:// and one that never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                if n == 0 {
                    let _ = stream.write_all(
                        b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n",
                    );
                } else {
                    // Headers, then silence: the body never comes.
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n<ov");
                    std::thread::sleep(std::time::Duration::from_secs(15));
                }
            }
        });
        let err = fetch(&format!("http://{addr}/x.xml"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("redirected to \"file:///etc/passwd\""), "{err}");
        let err = fetch(&format!("http://{addr}/x.xml"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no complete answer within 10 s"), "{err}");
    }
}
