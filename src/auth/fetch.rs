//! Reading a JWKS document from its URL or file.
//!
//! The fetch is bounded in time (the client's timeout covers connecting and
//! reading) and in size, follows no redirect, and reports the response's
//! `Cache-Control: max-age` so the caller can schedule the next refresh.
//! Error texts never contain the URL, which may carry credentials.

use std::time::Duration;

use crate::auth::jwks;
use crate::config::JwksSource;

/// Largest JWKS document read, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request timed out")]
    Timeout,
    #[error("request failed: {0}")]
    Request(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("document larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("cannot read file: {0}")]
    File(String),
    #[error(transparent)]
    Invalid(#[from] jwks::JwksError),
    #[error("no usable signing key in the document")]
    NoUsableKey,
    /// The circuit breaker is open, so no request was sent.
    #[error("circuit breaker open; no request sent")]
    BreakerOpen,
}

impl FetchError {
    /// Returns the `result` label of `wsticket_jwks_fetches_total`.
    pub fn metric_result(&self) -> &'static str {
        match self {
            FetchError::Timeout => "timeout",
            _ => "error",
        }
    }
}

/// Builds the HTTP client of JWKS fetches and introspection requests.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        // The URL is configured by the operator; a redirect elsewhere is not
        // followed, so keys and introspection responses come from that URL.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("wsticket/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings builds")
}

/// Reads the document at `source`; returns its bytes and the `max-age` the
/// response was served with, if any.
pub async fn fetch_document(
    http: &reqwest::Client,
    source: &JwksSource,
) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
    match source {
        JwksSource::Url(url) => fetch_url(http, url.clone()).await,
        JwksSource::File(path) => {
            let body = tokio::fs::read(path)
                .await
                .map_err(|err| FetchError::File(format!("{}: {err}", path.display())))?;
            if body.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            Ok((body, None))
        }
    }
}

async fn fetch_url(
    http: &reqwest::Client,
    url: url::Url,
) -> Result<(Vec<u8>, Option<Duration>), FetchError> {
    let mut response = http.get(url).send().await.map_err(classify)?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status().as_u16()));
    }
    let max_age = response
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .and_then(parse_max_age);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// Turns a reqwest error into a [`FetchError`], keeping timeouts apart.
pub fn classify(err: reqwest::Error) -> FetchError {
    if err.is_timeout() {
        FetchError::Timeout
    } else {
        FetchError::Request(without_url(&err))
    }
}

/// Formats a reqwest error without the URL, which may carry credentials.
pub fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<url>");
    }
    text
}

/// Reads `max-age` from a `Cache-Control` value.
fn parse_max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if name.trim().eq_ignore_ascii_case("max-age") {
            value
                .trim()
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_max_age;
    use std::time::Duration;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            parse_max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_max_age("Max-Age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=soon"), None);
    }
}
