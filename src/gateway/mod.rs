//! The gateway: relaying an authenticated connection to the upstream
//! WebSocket application, and the limits that guard the upgrade.
//!
//! The upstream connection is opened after the ticket is consumed and before
//! the client gets its `101`, so a client only sees a successful upgrade when
//! the application is there, and the subprotocol the application chose can go
//! into that `101`. The ticket stays consumed when the upstream is down: the
//! consumption is already durable, and undoing it would let a ticket be used
//! twice if the undo raced another redemption.

pub mod limits;
pub mod relay;
pub mod settings;
pub mod upstream;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::Config;
use limits::{FailedUpgrades, SubjectConnections};
use upstream::Upstream;

/// The gateway's shared state: the upstream, if any, and the limits.
pub struct Gateway {
    /// `None` when no `--upstream` is set; connections are then echoed.
    pub upstream: Option<Upstream>,
    /// `None` when `--max-failed-upgrades-per-minute` is 0.
    pub failed_upgrades: Option<FailedUpgrades>,
    pub subjects: Arc<SubjectConnections>,
}

impl Gateway {
    pub fn new(config: &Config) -> Self {
        let settings = &config.gateway;
        Gateway {
            upstream: settings.upstream.clone().map(|url| {
                Upstream::new(
                    url,
                    settings.upstream_ca.as_deref(),
                    config.max_message_size,
                )
            }),
            failed_upgrades: settings
                .max_failed_upgrades_per_minute
                .map(FailedUpgrades::new),
            subjects: Arc::new(SubjectConnections::new(
                settings.max_connections_per_subject,
            )),
        }
    }

    /// Drops the limiter state of addresses not seen for a while.
    pub fn prune(&self) {
        if let Some(failed_upgrades) = &self.failed_upgrades {
            failed_upgrades.prune();
        }
    }
}

/// Returns the claims named by `--forward-claim` as JSON object text, or an
/// empty string when none is named. A named claim the token lacks is left
/// out.
pub fn forwarded_claims(claims: &Map<String, Value>, names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let chosen: Map<String, Value> = names
        .iter()
        .filter_map(|name| Some((name.clone(), claims.get(name)?.clone())))
        .collect();
    Value::Object(chosen).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_claims_keep_only_named() {
        let claims = serde_json::json!({"sub": "alice", "role": "admin", "org": 7});
        let claims = claims.as_object().expect("object");
        let names = vec!["role".to_string(), "org".to_string(), "absent".to_string()];
        let forwarded: Value =
            serde_json::from_str(&forwarded_claims(claims, &names)).expect("JSON");
        assert_eq!(forwarded, serde_json::json!({"role": "admin", "org": 7}));
        assert_eq!(forwarded_claims(claims, &[]), "");
    }
}
