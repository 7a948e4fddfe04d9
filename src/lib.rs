//! wsticket: trades a bearer JWT for a short-lived, single-use ticket, and
//! authenticates WebSocket upgrades with that ticket.
//!
//! - [`config`]: command-line flags and environment variables → [`config::Config`]
//! - [`server`]: runs the public and admin listeners until shutdown
//! - [`http`]: the ticket endpoint, the upgrade, the admin routes and the error type
//! - [`ws`]: an authenticated WebSocket after the upgrade
//! - [`gateway`]: relaying authenticated connections to the upstream, and upgrade limits
//! - [`tls`]: the public listener's TLS, reloaded on SIGHUP
//! - [`auth`]: JWT verification against a JWKS, and the key fetching
//! - [`ticket`]: ticket generation and the hashed ids used in logs and storage
//! - [`store`]: the ticket store trait and its moka + sled implementation
//! - [`cluster`]: cluster mode: home nodes, gossip and forwarded consumption
//! - [`metrics`]: Prometheus metrics
//! - [`audit`]: the audit log of authentication events, with flood control
//! - [`clock`]: wall-clock time as a parameter, for tests of expiry
//! - [`demo`]: the self-contained `wsticket demo`
//! - [`demo_browser`]: `wsticket demo --browser`, the flow in a browser page

pub mod app;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod demo_browser;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod store;
pub mod ticket;
pub mod tls;
pub mod ws;
