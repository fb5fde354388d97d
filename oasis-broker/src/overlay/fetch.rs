//! Fetching a specification from its URL.

use super::spec::{MAX_SPEC_BYTES, OverlaySpec, SpecError};

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
