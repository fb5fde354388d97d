//! The web page at `/ui/`: Oasis' own, built into the binary, or a
//! dashboard's files from `api.ui_dir`. Static files hold no secret; the
//! page asks the API with the secret the user gives it.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use tower::ServiceExt;

use super::Api;

/// Our page loads nothing from elsewhere and runs no inline script.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    ("app.css", "text/css; charset=utf-8", include_str!("ui/app.css")),
];

pub(super) async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

pub(super) async fn index(State(api): State<Arc<Api>>, request: Request) -> Response {
    serve(&api, "index.html", request).await
}

pub(super) async fn file(
    State(api): State<Arc<Api>>,
    Path(file): Path<String>,
    request: Request,
) -> Response {
    serve(&api, &file, request).await
}

async fn serve(api: &Api, file: &str, request: Request) -> Response {
    if let Some(dir) = &api.settings.ui_dir {
        // tower-http refuses `..` and absolute paths; the request's path
        // is made relative to the directory.
        let (mut parts, body) = request.into_parts();
        let relative = format!("/{}", file.trim_start_matches('/'));
        parts.uri = relative
            .parse()
            .unwrap_or_else(|_| "/".parse().expect("a valid path"));
        let service = tower_http::services::ServeDir::new(dir).append_index_html_on_directories(true);
        return match service.oneshot(Request::from_parts(parts, body)).await {
            Ok(response) => response.into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
    }
    let Some((_, kind, text)) = FILES.iter().find(|(name, _, _)| *name == file) else {
        return (StatusCode::NOT_FOUND, "no such file of the Oasis page").into_response();
    };
    let mut response = (*text).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The page's size, for the test that keeps it small.
#[cfg(test)]
pub fn page_bytes() -> usize {
    FILES.iter().map(|(_, _, text)| text.len()).sum()
}
