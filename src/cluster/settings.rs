//! The `--cluster-*` flags, flattened into `wsticket serve` and validated into
//! [`ClusterConfig`]. Cluster mode is on only when `--cluster-listen` is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use ring::hmac;

use crate::cluster::home::MAX_NODES;
use crate::config::{invalid, ConfigError};

/// Shortest cluster secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 32;

/// The policy for an upgrade whose home node cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Reject it with `503 ticket_home_unavailable`, so a ticket is accepted
    /// at most once, at the price of the tickets whose home is unreachable.
    Strict,
}

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// UDP address of this node's gossip socket. Setting it turns cluster
    /// mode on; the other --cluster-* flags only apply with it.
    #[arg(long, env = "WSTICKET_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,

    /// Gossip address the other nodes reach this node at, when it is not
    /// --cluster-listen (behind NAT, a port mapping or a relay). Defaults to
    /// --cluster-listen.
    #[arg(long, env = "WSTICKET_CLUSTER_ADVERTISE", requires = "cluster_listen")]
    pub cluster_advertise: Option<SocketAddr>,

    /// Address the other nodes send forwarded consumptions to: this node's
    /// admin listener as they reach it. Defaults to the admin listener's
    /// address, with an unspecified IP replaced by the advertised gossip IP.
    #[arg(
        long,
        env = "WSTICKET_CLUSTER_ADMIN_ADVERTISE",
        requires = "cluster_listen"
    )]
    pub cluster_admin_advertise: Option<SocketAddr>,

    /// Gossip address of another node to join through, as IP:PORT or
    /// HOST:PORT (host names are resolved again every minute); repeat for
    /// several.
    #[arg(
        long = "cluster-peer",
        env = "WSTICKET_CLUSTER_PEER",
        value_delimiter = ',',
        value_parser = parse_peer,
        requires = "cluster_listen"
    )]
    pub cluster_peers: Vec<String>,

    /// File holding the secret shared by every node (at least 32 bytes). It
    /// authenticates all cluster traffic and encrypts gossip; forwarded
    /// consumptions are signed but not encrypted.
    #[arg(
        long,
        env = "WSTICKET_CLUSTER_SECRET_FILE",
        requires = "cluster_listen"
    )]
    pub cluster_secret_file: Option<PathBuf>,

    /// This node's index, 0 to 61, unique in the cluster and kept across
    /// restarts: tickets carry the index of the node that issued them.
    #[arg(long, env = "WSTICKET_CLUSTER_NODE_ID", requires = "cluster_listen")]
    pub cluster_node_id: Option<u8>,

    /// Policy when a ticket's home node cannot be reached: strict rejects
    /// the upgrade with 503 ticket_home_unavailable.
    #[arg(long, env = "WSTICKET_CLUSTER_CONSISTENCY", value_enum, default_value_t = Consistency::Strict)]
    pub cluster_consistency: Consistency,

    /// How long a node waits for a ticket's home node to respond to a forwarded
    /// consumption before rejecting the upgrade.
    #[arg(long, env = "WSTICKET_CLUSTER_FORWARD_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub cluster_forward_timeout: Duration,

    /// Interval between two gossip rounds.
    #[arg(long, env = "WSTICKET_CLUSTER_GOSSIP_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub cluster_gossip_interval: Duration,
}

/// Keys derived from the cluster secret, one per use, so that a key that
/// leaks from one use does not open the others.
#[derive(Clone)]
pub struct ClusterKeys {
    /// Keys the home character of tickets.
    pub home: hmac::Key,
    /// Source of the gossip AEAD key.
    pub gossip: [u8; 32],
    /// Key that signs forwarded consumptions and their responses.
    pub forward: hmac::Key,
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKeys(<redacted>)")
    }
}

impl ClusterKeys {
    /// Derives the keys from the secret with HMAC-SHA256 and a label per use.
    pub fn derive(secret: &[u8]) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |label: &[u8]| {
            let tag = hmac::sign(&master, label);
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(tag.as_ref());
            bytes
        };
        ClusterKeys {
            home: hmac::Key::new(hmac::HMAC_SHA256, &derive(b"wsticket cluster home")),
            gossip: derive(b"wsticket cluster gossip"),
            forward: hmac::Key::new(hmac::HMAC_SHA256, &derive(b"wsticket cluster forward")),
        }
    }
}

/// The validated values of [`ClusterArgs`]; present only in cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// The gossip address published to the other nodes.
    pub advertise: SocketAddr,
    /// The admin address published to the other nodes, when given; otherwise
    /// it is derived from the bound admin listener at start.
    pub admin_advertise: Option<SocketAddr>,
    /// Seed addresses as `IP:PORT` or `HOST:PORT`. Chitchat resolves the
    /// host names.
    pub peers: Vec<String>,
    pub node_id: u8,
    pub keys: ClusterKeys,
    pub consistency: Consistency,
    pub forward_timeout: Duration,
    pub gossip_interval: Duration,
}

impl ClusterConfig {
    /// Validates the flags; returns `None` when cluster mode is off.
    pub fn from_args(args: ClusterArgs) -> Result<Option<Self>, ConfigError> {
        let Some(listen) = args.cluster_listen else {
            return Ok(None);
        };
        let Some(secret_file) = args.cluster_secret_file else {
            return Err(invalid(
                "cluster-secret-file",
                "",
                "cluster mode needs a shared secret: give --cluster-secret-file",
            ));
        };
        let Some(node_id) = args.cluster_node_id else {
            return Err(invalid(
                "cluster-node-id",
                "",
                "cluster mode needs a node index: give --cluster-node-id 0 to 61",
            ));
        };
        if node_id >= MAX_NODES {
            return Err(invalid(
                "cluster-node-id",
                node_id.to_string(),
                "must be between 0 and 61",
            ));
        }
        if args.cluster_forward_timeout.is_zero() {
            return Err(invalid(
                "cluster-forward-timeout",
                "0s",
                "must be longer than zero",
            ));
        }
        if args.cluster_gossip_interval < Duration::from_millis(10) {
            return Err(invalid(
                "cluster-gossip-interval",
                humantime::format_duration(args.cluster_gossip_interval).to_string(),
                "must be at least 10ms",
            ));
        }
        let advertise = args.cluster_advertise.unwrap_or(listen);
        let advertise_flag = if args.cluster_advertise.is_some() {
            "cluster-advertise"
        } else {
            "cluster-listen"
        };
        check_reachable(advertise_flag, advertise)?;
        if let Some(admin) = args.cluster_admin_advertise {
            check_reachable("cluster-admin-advertise", admin)?;
        }
        let secret = read_secret(&secret_file).map_err(|reason| {
            invalid(
                "cluster-secret-file",
                secret_file.display().to_string(),
                reason,
            )
        })?;
        Ok(Some(ClusterConfig {
            listen,
            advertise,
            admin_advertise: args.cluster_admin_advertise,
            peers: args.cluster_peers,
            node_id,
            keys: ClusterKeys::derive(&secret),
            consistency: args.cluster_consistency,
            forward_timeout: args.cluster_forward_timeout,
            gossip_interval: args.cluster_gossip_interval,
        }))
    }
}

/// Parses a `--cluster-peer` value: an `IP:PORT`, `[IPv6]:PORT` or
/// `HOST:PORT` with a port other than 0. Host names are not resolved here,
/// so a peer whose name does not resolve yet does not stop the node.
fn parse_peer(value: &str) -> Result<String, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0 cannot be sent to; give the peer's gossip port".to_owned());
        }
        return Ok(value.to_owned());
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err("expected IP:PORT or HOST:PORT".to_owned());
    };
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
    if !valid_host {
        return Err(format!(
            "{host:?} is not a host name; expected IP:PORT or HOST:PORT"
        ));
    }
    match port.parse::<u16>() {
        Ok(0) => Err("port 0 cannot be sent to; give the peer's gossip port".to_owned()),
        Ok(_) => Ok(value.to_owned()),
        Err(_) => Err(format!("{port:?} is not a port number")),
    }
}

/// Rejects an address that other nodes cannot send to: an unspecified IP
/// (`0.0.0.0`, `::`) or port 0.
fn check_reachable(flag: &'static str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.ip().is_unspecified() {
        let hint = if flag == "cluster-listen" {
            "other nodes cannot reach an unspecified IP; give --cluster-advertise with this node's address"
        } else {
            "other nodes cannot reach an unspecified IP; give this node's address"
        };
        return Err(invalid(flag, addr.to_string(), hint));
    }
    if addr.port() == 0 {
        return Err(invalid(
            flag,
            addr.to_string(),
            "other nodes need a fixed port; port 0 is chosen at random",
        ));
    }
    Ok(())
}

/// Reads the secret, without its trailing newline.
fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret = std::fs::read(path).map_err(|err| format!("cannot read the file: {err}"))?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the secret has {} bytes; use at least {MIN_SECRET_BYTES}, for example the output of `openssl rand -hex 32`",
            secret.len()
        ));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> ClusterArgs {
        let secret_file = dir.join("secret");
        std::fs::write(&secret_file, "0123456789abcdef0123456789abcdef\n").expect("write secret");
        ClusterArgs {
            cluster_listen: Some("127.0.0.1:7946".parse().expect("address")),
            cluster_advertise: None,
            cluster_admin_advertise: None,
            cluster_peers: Vec::new(),
            cluster_secret_file: Some(secret_file),
            cluster_node_id: Some(3),
            cluster_consistency: Consistency::Strict,
            cluster_forward_timeout: Duration::from_secs(2),
            cluster_gossip_interval: Duration::from_millis(200),
        }
    }

    #[test]
    fn cluster_is_off_without_listen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = args(dir.path());
        args.cluster_listen = None;
        assert!(ClusterConfig::from_args(args).expect("valid").is_none());
    }

    #[test]
    fn valid_flags_give_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = ClusterConfig::from_args(args(dir.path()))
            .expect("valid")
            .expect("cluster mode on");
        assert_eq!(config.node_id, 3);
        assert_eq!(config.consistency, Consistency::Strict);
        assert_eq!(config.advertise, config.listen);
        assert_eq!(config.admin_advertise, None);
    }

    #[test]
    fn advertised_addresses_replace_the_bound_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = args(dir.path());
        args.cluster_listen = Some("0.0.0.0:7946".parse().expect("address"));
        args.cluster_advertise = Some("10.0.0.5:17946".parse().expect("address"));
        args.cluster_admin_advertise = Some("10.0.0.5:19090".parse().expect("address"));
        let config = ClusterConfig::from_args(args)
            .expect("valid")
            .expect("cluster mode on");
        assert_eq!(config.listen.to_string(), "0.0.0.0:7946");
        assert_eq!(config.advertise.to_string(), "10.0.0.5:17946");
        assert_eq!(
            config
                .admin_advertise
                .map(|addr| addr.to_string())
                .as_deref(),
            Some("10.0.0.5:19090")
        );
    }

    /// A flag and a change of the valid arguments that makes it invalid.
    type InvalidCase = (&'static str, Box<dyn Fn(&mut ClusterArgs)>);

    #[test]
    fn invalid_flags_name_the_flag() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cases: Vec<InvalidCase> = vec![
            (
                "cluster-secret-file",
                Box::new(|a| a.cluster_secret_file = None),
            ),
            ("cluster-node-id", Box::new(|a| a.cluster_node_id = None)),
            (
                "cluster-node-id",
                Box::new(|a| a.cluster_node_id = Some(62)),
            ),
            (
                "cluster-forward-timeout",
                Box::new(|a| a.cluster_forward_timeout = Duration::ZERO),
            ),
            (
                "cluster-listen",
                Box::new(|a| a.cluster_listen = Some("0.0.0.0:7946".parse().expect("address"))),
            ),
            (
                "cluster-advertise",
                Box::new(|a| a.cluster_advertise = Some("[::]:7946".parse().expect("address"))),
            ),
            (
                "cluster-advertise",
                Box::new(|a| a.cluster_advertise = Some("10.0.0.5:0".parse().expect("address"))),
            ),
            (
                "cluster-admin-advertise",
                Box::new(|a| {
                    a.cluster_admin_advertise = Some("0.0.0.0:9091".parse().expect("address"))
                }),
            ),
            (
                "cluster-gossip-interval",
                Box::new(|a| a.cluster_gossip_interval = Duration::from_millis(1)),
            ),
        ];
        for (flag, change) in cases {
            let mut args = args(dir.path());
            change(&mut args);
            let err = ClusterConfig::from_args(args).expect_err(flag);
            assert_eq!(err.flag, flag);
        }
    }

    #[test]
    fn peer_accepts_addresses_and_host_names() {
        for value in [
            "10.0.0.2:7946",
            "[fd00::2]:7946",
            "wsticket-1.wsticket.default.svc.cluster.local:7946",
            "localhost:7946",
        ] {
            assert_eq!(parse_peer(value).as_deref(), Ok(value));
        }
    }

    #[test]
    fn peer_without_usable_port_is_rejected() {
        for value in [
            "10.0.0.2",
            "localhost",
            "10.0.0.2:0",
            "localhost:0",
            "localhost:http",
            ":7946",
            "bad host:7946",
            "localhost:70000",
        ] {
            assert!(parse_peer(value).is_err(), "{value:?} was accepted");
        }
    }

    #[test]
    fn short_secret_is_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = args(dir.path());
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").expect("write");
        args.cluster_secret_file = Some(short);
        let err = ClusterConfig::from_args(args).expect_err("short secret");
        assert_eq!(err.flag, "cluster-secret-file");
        assert!(err.reason.contains("9 bytes"), "{}", err.reason);
    }

    #[test]
    fn derived_keys_differ_by_use() {
        let keys = ClusterKeys::derive(b"0123456789abcdef0123456789abcdef");
        let home = hmac::sign(&keys.home, b"x");
        let forward = hmac::sign(&keys.forward, b"x");
        assert_ne!(home.as_ref(), forward.as_ref());
        assert_ne!(&keys.gossip[..], home.as_ref());
    }
}
