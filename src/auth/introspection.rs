//! Opaque access tokens checked with OAuth 2.0 token introspection
//! (RFC 7662).
//!
//! The token is POSTed as `token=…` in a form body, with the client
//! authenticated by HTTP Basic (client id and secret form-encoded first, as
//! RFC 6749 section 2.3.1 requires). Only a `200` with a JSON object counts as an
//! answer; anything else (timeout, other status, invalid JSON) is a failure
//! of the endpoint, counts against its circuit breaker and makes the token
//! request `auth_unavailable`, never `invalid_token`. An answer whose
//! `active` is not `true` rejects the token. The client secret is only ever
//! put in the `Authorization` header: it is in no log line and no error.

use std::time::Duration;

use serde_json::{Map, Value};
use url::form_urlencoded::byte_serialize;
use url::Url;

use crate::auth::breaker::{Breaker, BreakerSettings};
use crate::auth::fetch::{self, FetchError};
use crate::auth::verify::AuthError;
use crate::config::Secret;
use crate::metrics::Metrics;

/// Largest introspection response read, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Retry-After sent while the introspection endpoint is failing.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Settings of an [`Introspector`].
#[derive(Debug, Clone)]
pub struct IntrospectionSettings {
    pub url: Url,
    pub client_id: String,
    pub client_secret: Secret,
    pub timeout: Duration,
    /// Maximum time a response is reused; the token's `exp` may end it sooner.
    pub cache_ttl: Duration,
    pub breaker: BreakerSettings,
}

/// The client of one introspection endpoint.
pub struct Introspector {
    settings: IntrospectionSettings,
    http: reqwest::Client,
    breaker: Breaker,
}

impl Introspector {
    pub fn new(settings: IntrospectionSettings, metrics: std::sync::Arc<Metrics>) -> Self {
        let target = settings.url.host_str().unwrap_or("").to_string();
        let breaker = Breaker::new(
            "introspection",
            target,
            &settings.breaker,
            Box::new(move |state| metrics.introspection_breaker_state.set(state as i64)),
        );
        Introspector {
            http: fetch::http_client(settings.timeout),
            settings,
            breaker,
        }
    }

    pub fn cache_ttl(&self) -> Duration {
        self.settings.cache_ttl
    }

    /// Asks the endpoint about `token`; returns the claims of an active
    /// token.
    pub async fn introspect(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        if !self.breaker.permit() {
            return Err(AuthError::Unavailable {
                retry_after: UNAVAILABLE_RETRY_AFTER,
            });
        }
        let answer = match self.call(token).await {
            Ok(answer) => {
                self.breaker.record_success();
                answer
            }
            Err(err) => {
                let cause = err.to_string();
                self.breaker.record_failure(&cause);
                tracing::warn!(event = "introspection_failed", error = %cause, "token introspection failed");
                return Err(AuthError::Unavailable {
                    retry_after: UNAVAILABLE_RETRY_AFTER,
                });
            }
        };
        if answer.get("active") != Some(&Value::Bool(true)) {
            return Err(AuthError::Invalid("introspection: token is not active"));
        }
        Ok(answer)
    }

    async fn call(&self, token: &str) -> Result<Map<String, Value>, FetchError> {
        let client_id: String = byte_serialize(self.settings.client_id.as_bytes()).collect();
        let secret: String =
            byte_serialize(self.settings.client_secret.expose().as_bytes()).collect();
        let mut response = self
            .http
            .post(self.settings.url.clone())
            .basic_auth(client_id, Some(secret))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(fetch::classify)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fetch::classify)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(FetchError::Request(format!(
                    "response larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body)
            .map_err(|_| FetchError::Request("response is not a JSON object".into()))
    }
}
