//! Cluster mode with real nodes: each node is a `wsticket serve` process on
//! its own loopback address (127.0.0.11, .12, …) with gossip on UDP.
//!
//! Clients issue tickets on random nodes and upgrade on random nodes, often
//! several at once with the same ticket, while nodes are killed with SIGKILL
//! and restarted on the same data directory. Every response goes into a history
//! that a checker reads: it fails on a ticket accepted twice or accepted after
//! an acknowledged consumption, and counts the tickets rejected only because
//! their home node was down.
//!
//! With `WSTICKET_CLUSTER_NETNS=1`, a 5-node history also runs in network
//! namespaces that this file creates and removes. It goes through a partition
//! that cuts one node off and one that splits the cluster in two, while
//! clients still reach every node. That needs root and `ip netns`, so the CI
//! script sets the variable only when both are there.
//!
//! `cargo test` runs short histories; `scripts/cluster-soak RUNS` runs more
//! and prints `runs, tickets, double_accepts, lost_to_home_down`.
//!
//! This machine's kernel has no `netem` queueing discipline, so added latency
//! comes from delaying relays: a UDP relay in front of each gossip socket and
//! a TCP relay in front of each admin listener, whose addresses the nodes
//! advertise (`--cluster-advertise`, `--cluster-admin-advertise`), so all
//! cluster traffic crosses them.

mod common;
mod latency_relay;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use latency_relay::{Latency, TcpRelay, UdpRelay};

use common::{connect_with_ticket, ticket_for, JwksServer, Server, ServerOptions, Signer};
use serde_json::Value;

/// How long a cluster may take to see all its members.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

/// A small xorshift generator, seeded per run, so a failing schedule can be
/// repeated with `WSTICKET_CLUSTER_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env() -> Self {
        let seed = std::env::var("WSTICKET_CLUSTER_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("cluster test seed {seed}");
        Rng(seed)
    }

    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound as u64) as usize
    }
}

/// Returns a TCP port that is free on `ip` right now.
fn free_tcp_port(ip: IpAddr) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind a TCP probe");
    listener.local_addr().expect("address").port()
}

/// Returns a UDP port that is free on `ip` right now.
fn free_udp_port(ip: IpAddr) -> u16 {
    let socket = std::net::UdpSocket::bind((ip, 0)).expect("bind a UDP probe");
    socket.local_addr().expect("address").port()
}

/// One node's fixed identity: kept across restarts.
struct NodeSpec {
    index: u8,
    /// IP of the public listener, which clients use.
    public_ip: IpAddr,
    /// IP of the admin listener and the gossip socket, which nodes use.
    ip: IpAddr,
    gossip: SocketAddr,
    data_dir: PathBuf,
    /// The network namespace the node runs in, for partition tests.
    netns: Option<String>,
    /// The address the other nodes get as `--cluster-peer` for this node:
    /// `gossip`, a relay in front of it, or a host name and port.
    seed: String,
    /// A fixed admin address, so a relay can stay in front of it across
    /// restarts; `None` binds a free port at each start.
    admin_listen: Option<SocketAddr>,
    /// `--cluster-advertise`, when the node's gossip is reached through a
    /// relay.
    advertise: Option<SocketAddr>,
    /// `--cluster-admin-advertise`, when the node's admin listener is
    /// reached through a relay.
    admin_advertise: Option<SocketAddr>,
}

/// A cluster of `wsticket` processes, with the files they share.
struct TestCluster {
    jwks: JwksServer,
    specs: Vec<NodeSpec>,
    nodes: Vec<Option<Server>>,
    secret_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    async fn start(size: u8) -> Self {
        Self::start_in(size, None).await
    }

    /// Starts `size` nodes on loopback, or, with `netns_prefix`, each in the
    /// namespace that [`Namespaces`] made for it.
    async fn start_in(size: u8, netns_prefix: Option<&str>) -> Self {
        let mut cluster = Self::prepare(size, netns_prefix).await;
        cluster.start_all().await;
        cluster
    }

    /// Chooses every node's addresses and directory without starting any.
    async fn prepare(size: u8, netns_prefix: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret_file = dir.path().join("cluster-secret");
        std::fs::write(&secret_file, "a test cluster secret of 32 bytes or more\n")
            .expect("write secret");
        let jwks = match netns_prefix {
            None => JwksServer::start(common::default_jwks()).await,
            Some(_) => {
                JwksServer::start_on(common::default_jwks(), Namespaces::HUB_PUBLIC_IP.into()).await
            }
        };
        let specs: Vec<NodeSpec> = (0..size)
            .map(|index| {
                let data_dir = dir.path().join(format!("node-{index}"));
                match netns_prefix {
                    None => {
                        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + index));
                        let gossip = SocketAddr::new(ip, free_udp_port(ip));
                        NodeSpec {
                            index,
                            public_ip: ip,
                            ip,
                            gossip,
                            data_dir,
                            netns: None,
                            seed: gossip.to_string(),
                            admin_listen: None,
                            advertise: None,
                            admin_advertise: None,
                        }
                    }
                    Some(prefix) => {
                        let ip = IpAddr::V4(Ipv4Addr::new(10, 92, 0, index + 1));
                        let gossip = SocketAddr::new(ip, 7946);
                        NodeSpec {
                            index,
                            public_ip: IpAddr::V4(Ipv4Addr::new(10, 91, 0, index + 1)),
                            ip,
                            gossip,
                            data_dir,
                            netns: Some(Namespaces::node_name(prefix, index)),
                            seed: gossip.to_string(),
                            admin_listen: None,
                            advertise: None,
                            admin_advertise: None,
                        }
                    }
                }
            })
            .collect();
        TestCluster {
            jwks,
            nodes: (0..size).map(|_| None).collect(),
            specs,
            secret_file,
            _dir: dir,
        }
    }

    /// Starts every node and waits until all of them see each other.
    async fn start_all(&mut self) {
        for index in 0..self.specs.len() {
            self.start_node(index).await;
        }
        self.wait_converged().await;
    }

    fn options(&self, index: usize, secret_file: &std::path::Path) -> ServerOptions {
        let spec = &self.specs[index];
        let listen = format!("{}:0", spec.public_ip);
        let admin_listen = spec
            .admin_listen
            .map_or_else(|| format!("{}:0", spec.ip), |addr| addr.to_string());
        let mut options = ServerOptions::new(self.jwks.url(), &spec.data_dir).args(&[
            "--listen",
            &listen,
            "--admin-listen",
            &admin_listen,
            "--cluster-listen",
            &spec.gossip.to_string(),
            "--cluster-node-id",
            &spec.index.to_string(),
            "--cluster-secret-file",
            secret_file.to_str().expect("UTF-8 path"),
            "--cluster-gossip-interval",
            "100ms",
            "--cluster-forward-timeout",
            "1s",
            "--rate-limit",
            "100000",
        ]);
        if let Some(advertise) = spec.advertise {
            options = options.args(&["--cluster-advertise", &advertise.to_string()]);
        }
        if let Some(admin) = spec.admin_advertise {
            options = options.args(&["--cluster-admin-advertise", &admin.to_string()]);
        }
        for peer in self.specs.iter().filter(|peer| peer.index != spec.index) {
            options = options.args(&["--cluster-peer", &peer.seed]);
        }
        if let Some(netns) = &spec.netns {
            options = options.shell_prelude(&format!("exec ip netns exec {netns} \"$0\" \"$@\""));
        }
        options
    }

    async fn start_node(&mut self, index: usize) {
        let options = self.options(index, &self.secret_file.clone());
        self.nodes[index] = Some(Server::start(options).await);
    }

    async fn kill_node(&mut self, index: usize) {
        if let Some(server) = self.nodes[index].take() {
            server.kill().await;
        }
    }

    fn node(&self, index: usize) -> &Server {
        self.nodes[index].as_ref().expect("node is running")
    }

    fn live_indexes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&index| self.nodes[index].is_some())
            .collect()
    }

    /// Waits until every running node sees every running node as live, at
    /// its current admin address, or at the address it advertises instead.
    async fn wait_converged(&self) {
        let expected: BTreeMap<String, String> = self
            .live_indexes()
            .into_iter()
            .map(|index| {
                let admin = self.specs[index]
                    .admin_advertise
                    .unwrap_or(self.node(index).admin);
                (index.to_string(), admin.to_string())
            })
            .collect();
        let deadline = Instant::now() + CONVERGE_LIMIT;
        for index in self.live_indexes() {
            loop {
                let seen = member_addresses(self.node(index)).await;
                if seen == expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {index} sees members {seen:?}, expected {expected:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Returns the live members a node's `/readyz` lists: index to admin address.
async fn member_addresses(server: &Server) -> BTreeMap<String, String> {
    let Ok(response) = reqwest::get(server.admin_url("/readyz")).await else {
        return BTreeMap::new();
    };
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["cluster"]["live_nodes"]
        .as_object()
        .map(|members| {
            members
                .iter()
                .map(|(index, admin)| (index.clone(), admin.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Returns how many live members a node's `/readyz` lists.
async fn live_members(server: &Server) -> usize {
    let Ok(response) = reqwest::get(server.admin_url("/readyz")).await else {
        return 0;
    };
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["cluster"]["live_nodes"]
        .as_object()
        .map_or(0, |members| members.len())
}

/// What a client saw for one upgrade attempt.
#[derive(Debug, Clone)]
struct Attempt {
    ticket: usize,
    node: usize,
    /// `ok` or the error code of the rejection.
    result: String,
    started: Instant,
    finished: Instant,
}

/// The recorded history of a run.
#[derive(Default)]
struct History {
    issued: usize,
    attempts: Vec<Attempt>,
}

/// The checker's findings.
#[derive(Debug, Default, PartialEq)]
struct Verdict {
    tickets: usize,
    double_accepts: usize,
    /// Acceptances that started after another acceptance of the same ticket
    /// had completed.
    accepted_after_ack: usize,
    /// Tickets never accepted and rejected at least once only because their
    /// home node was unreachable.
    lost_to_home_down: usize,
    /// Upgrades rejected with `ticket_home_unavailable`.
    home_down_rejections: usize,
    /// Results other than `ok`, `ticket_already_used` and
    /// `ticket_home_unavailable`.
    unexpected: Vec<String>,
}

fn check(history: &History) -> Verdict {
    let mut by_ticket: HashMap<usize, Vec<&Attempt>> = HashMap::new();
    for attempt in &history.attempts {
        by_ticket.entry(attempt.ticket).or_default().push(attempt);
    }
    let mut verdict = Verdict {
        tickets: history.issued,
        ..Verdict::default()
    };
    for attempt in &history.attempts {
        match attempt.result.as_str() {
            "ok" | "ticket_already_used" => {}
            "ticket_home_unavailable" => verdict.home_down_rejections += 1,
            other => verdict
                .unexpected
                .push(format!("node {}: {other}", attempt.node)),
        }
    }
    for attempts in by_ticket.values() {
        let accepted: Vec<&&Attempt> = attempts.iter().filter(|a| a.result == "ok").collect();
        if accepted.len() > 1 {
            let nodes: Vec<usize> = accepted.iter().map(|a| a.node).collect();
            eprintln!("ticket {} accepted on nodes {nodes:?}", attempts[0].ticket);
            verdict.double_accepts += 1;
            let first_ack = accepted
                .iter()
                .map(|a| a.finished)
                .min()
                .expect("non-empty");
            verdict.accepted_after_ack += accepted.iter().filter(|a| a.started > first_ack).count();
        }
        let home_down = attempts
            .iter()
            .any(|a| a.result == "ticket_home_unavailable");
        if accepted.is_empty() && home_down {
            verdict.lost_to_home_down += 1;
        }
    }
    verdict
}

/// Upgrades with `ticket` on `node` and returns `ok` or the error code.
async fn upgrade(server: &Server, ticket: &str) -> String {
    match connect_with_ticket(server, ticket).await {
        Ok(mut socket) => {
            let _ = socket.close(None).await;
            "ok".to_owned()
        }
        Err(rejection) => rejection.code,
    }
}

/// Runs `rounds` rounds. Each issues a ticket on a random live node, then
/// `racers` clients upgrade at once on random live nodes: the first with the
/// new ticket, each other one with the new ticket or, half of the time, one
/// of the last ten tickets. Those may be used already, or homed on a node
/// that is down. With `chaos`, a random node is killed with SIGKILL every
/// twenty rounds and restarted ten rounds later on the same data directory.
async fn run_history(
    cluster: &mut TestCluster,
    rng: &mut Rng,
    rounds: usize,
    racers: usize,
    chaos: bool,
) -> History {
    let mut driver = Driver::new("cluster-user");
    let mut down: Option<usize> = None;
    for round in 0..rounds {
        if chaos && round % 10 == 5 {
            match down.take() {
                Some(index) => {
                    cluster.start_node(index).await;
                    cluster.wait_converged().await;
                }
                None => {
                    let index = rng.below(cluster.nodes.len());
                    cluster.kill_node(index).await;
                    down = Some(index);
                }
            }
        }
        driver.round(cluster, rng, racers).await;
    }
    if let Some(index) = down {
        cluster.start_node(index).await;
        cluster.wait_converged().await;
    }
    driver.finish()
}

/// Clients that issue and race tickets, recording every result.
struct Driver {
    history: Arc<Mutex<History>>,
    tickets: Vec<String>,
    token: String,
}

impl Driver {
    fn new(subject: &str) -> Self {
        Driver {
            history: Arc::new(Mutex::new(History::default())),
            tickets: Vec::new(),
            token: Signer::token(subject),
        }
    }

    /// Runs one round, as [`run_history`] describes it.
    async fn round(&mut self, cluster: &TestCluster, rng: &mut Rng, racers: usize) {
        let live = cluster.live_indexes();
        let issuer = live[rng.below(live.len())];
        self.tickets
            .push(ticket_for(cluster.node(issuer), &self.token).await);
        self.history.lock().expect("lock").issued += 1;
        let newest = self.tickets.len() - 1;
        let mut racing = Vec::new();
        for racer in 0..racers {
            let ticket_index = if racer == 0 || rng.below(2) == 0 {
                newest
            } else {
                newest.saturating_sub(rng.below(10))
            };
            let node = live[rng.below(live.len())];
            let server = cluster.node(node);
            let ticket = self.tickets[ticket_index].clone();
            let history = self.history.clone();
            racing.push(async move {
                let started = Instant::now();
                let result = upgrade(server, &ticket).await;
                history.lock().expect("lock").attempts.push(Attempt {
                    ticket: ticket_index,
                    node,
                    result,
                    started,
                    finished: Instant::now(),
                });
            });
        }
        futures_util::future::join_all(racing).await;
    }

    fn finish(self) -> History {
        Arc::try_unwrap(self.history)
            .map(|history| history.into_inner().expect("lock"))
            .unwrap_or_else(|_| panic!("history still shared"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_accept_each_ticket_once() {
    let mut cluster = TestCluster::start(3).await;
    let mut rng = Rng::from_env();
    let history = run_history(&mut cluster, &mut rng, 30, 4, false).await;
    let verdict = check(&history);
    assert_eq!(verdict.double_accepts, 0, "{verdict:?}");
    assert_eq!(verdict.accepted_after_ack, 0, "{verdict:?}");
    assert_eq!(verdict.lost_to_home_down, 0, "{verdict:?}");
    // With every node up, each ticket opens exactly once, and the other
    // racers see ticket_already_used.
    let accepted = history.attempts.iter().filter(|a| a.result == "ok").count();
    assert_eq!(accepted, 30);
    assert!(verdict.unexpected.is_empty(), "{verdict:?}");
    assert_eq!(verdict.home_down_rejections, 0, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_survive_kill_9_without_double_accept() {
    let mut cluster = TestCluster::start(5).await;
    let mut rng = Rng::from_env();
    let rounds = std::env::var("WSTICKET_CLUSTER_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(40);
    let history = run_history(&mut cluster, &mut rng, rounds, 3, true).await;
    let verdict = check(&history);
    println!(
        "cluster runs, tickets, double_accepts, lost_to_home_down: 1, {}, {}, {}",
        verdict.tickets, verdict.double_accepts, verdict.lost_to_home_down
    );
    println!(
        "cluster home-unavailable rejections: {}",
        verdict.home_down_rejections
    );
    assert_eq!(verdict.double_accepts, 0, "{verdict:?}");
    assert_eq!(verdict.accepted_after_ack, 0, "{verdict:?}");
    assert!(verdict.unexpected.is_empty(), "{verdict:?}");
}

/// Maximum lifetime of a latency relay. It is longer than any test here.
const RELAY_LIFETIME: Duration = Duration::from_secs(120);

/// The relays in front of one node.
struct NodeRelays {
    gossip: UdpRelay,
    admin: TcpRelay,
}

/// Puts a UDP relay in front of every node's gossip socket and a TCP relay
/// in front of its admin listener, on 127.0.0.41 and up, each delaying by
/// `latency` each way. The nodes advertise the relays' addresses and join
/// through them. Call before the nodes start.
async fn put_behind_relays(
    cluster: &mut TestCluster,
    rng: &mut Rng,
    latency: Latency,
) -> Vec<NodeRelays> {
    let mut relays = Vec::new();
    for spec in &mut cluster.specs {
        let relay_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 41 + spec.index));
        let gossip = UdpRelay::start(
            relay_ip,
            spec.gossip,
            latency.clone(),
            rng.below(usize::MAX) as u64,
            RELAY_LIFETIME,
        )
        .await;
        let admin_listen = SocketAddr::new(spec.ip, free_tcp_port(spec.ip));
        let admin = TcpRelay::start(
            SocketAddr::new(relay_ip, 0),
            admin_listen,
            latency.clone(),
            rng.below(usize::MAX) as u64,
            RELAY_LIFETIME,
        )
        .await;
        spec.seed = gossip.listen.to_string();
        spec.advertise = Some(gossip.listen);
        spec.admin_listen = Some(admin_listen);
        spec.admin_advertise = Some(admin.listen);
        relays.push(NodeRelays { gossip, admin });
    }
    relays
}

/// Puts relays that delay every gossip datagram and every chunk of a
/// forwarded consumption by 20 to 80 ms, each way, in front of every node,
/// so all cluster traffic crosses them. Then races upgrades on random nodes
/// while a node is killed with SIGKILL and restarted, as in [`run_history`],
/// so a restarted node rejoins through the delayed links.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latency_never_double_accepts() {
    let mut rng = Rng::from_env();
    let mut cluster = TestCluster::prepare(3, None).await;
    let relays = put_behind_relays(&mut cluster, &mut rng, Latency { millis: 20..80 }).await;
    cluster.start_all().await;

    let rounds = std::env::var("WSTICKET_CLUSTER_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(40);
    let history = run_history(&mut cluster, &mut rng, rounds, 4, true).await;
    let verdict = check(&history);
    println!(
        "latency runs, tickets, double_accepts, lost_to_home_down: 1, {}, {}, {}",
        verdict.tickets, verdict.double_accepts, verdict.lost_to_home_down
    );
    assert_eq!(verdict.double_accepts, 0, "{verdict:?}");
    assert_eq!(verdict.accepted_after_ack, 0, "{verdict:?}");
    assert!(verdict.unexpected.is_empty(), "{verdict:?}");

    for (index, relays) in relays.iter().enumerate() {
        let to_node = relays.gossip.counts.to_target.load(Ordering::Relaxed);
        let to_peers = relays.gossip.counts.to_sender.load(Ordering::Relaxed);
        let forwards = relays.admin.counts.connections.load(Ordering::Relaxed);
        let answered = relays.admin.counts.bytes_to_client.load(Ordering::Relaxed);
        println!(
            "relays in front of node {index}: {to_node} datagrams in, {to_peers} out; \
             {forwards} admin connections, {answered} bytes answered"
        );
        assert!(
            to_node > 0,
            "no gossip reached node {index} through its relay"
        );
        assert!(
            to_peers > 0,
            "no reply from node {index} went back through its relay"
        );
        assert!(
            answered > 0,
            "no forwarded consumption reached node {index} through its relay"
        );
    }
    // Each node has the others only under their relays' gossip addresses, so
    // steady gossip crosses the relays too, not only the first contact.
    let relay_addresses: Vec<String> = relays
        .iter()
        .map(|relays| relays.gossip.listen.to_string())
        .collect();
    for index in cluster.live_indexes() {
        for member in cluster.node(index).events("cluster_member_up") {
            let member = member["member"].as_str().expect("member field");
            assert!(
                relay_addresses
                    .iter()
                    .any(|relay| member.ends_with(&format!("@{relay}"))),
                "node {index} knows member {member} at an address that is not a relay's"
            );
        }
    }
}

/// Extra delay of a request or response in the admin relay: longer than the
/// 1 s `--cluster-forward-timeout` of the test nodes.
const PAST_FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);

/// Upgrades with `ticket` on node 1 while the relay in front of node 0, the
/// ticket's home, delays requests by `to_home` and responses by `to_node`.
/// Expects `503 ticket_home_unavailable` before the delayed message could have
/// arrived, then waits until it has, lifts the delays, and returns how many
/// forwarded consumptions node 0 ran to success meanwhile.
async fn upgrade_past_forward_timeout(
    cluster: &TestCluster,
    relays: &[NodeRelays],
    ticket: &str,
    to_home: Duration,
    to_node: Duration,
) -> f64 {
    let consumed = "wsticket_cluster_served_consumes_total{result=\"consumed\"}";
    let before = cluster.node(0).metric(consumed).await;
    relays[0].admin.set_extra_delay(to_home, to_node);
    let started = Instant::now();
    let first = connect_with_ticket(cluster.node(1), ticket).await;
    let waited = started.elapsed();
    let rejection = first.expect_err("a forward past the timeout must not be accepted");
    assert_eq!(rejection.status, 503, "{rejection:?}");
    assert_eq!(rejection.code, "ticket_home_unavailable", "{rejection:?}");
    assert!(
        waited < PAST_FORWARD_TIMEOUT,
        "node 1 waited {waited:?}, as long as the relay held the message"
    );
    tokio::time::sleep(PAST_FORWARD_TIMEOUT + Duration::from_secs(1)).await;
    relays[0]
        .admin
        .set_extra_delay(Duration::ZERO, Duration::ZERO);
    cluster.node(0).metric(consumed).await - before
}

/// Upgrades with `ticket` on every node, node 2 first, and returns the
/// results.
async fn upgrade_everywhere(cluster: &TestCluster, ticket: &str) -> Vec<String> {
    let mut results = Vec::new();
    for node in [2, 1, 0] {
        results.push(upgrade(cluster.node(node), ticket).await);
    }
    results
}

/// A forwarded consumption that takes longer than `--cluster-forward-timeout`
/// is rejected with `ticket_home_unavailable`, and never opens a second
/// connection with the same ticket. When the home node's response is late,
/// the home has consumed the ticket. The ticket is lost, and every later
/// upgrade is rejected. When the request is late, the home node may or may not run it;
/// either way the ticket opens at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_forward_is_rejected_and_never_doubled() {
    let mut rng = Rng::from_env();
    let mut cluster = TestCluster::prepare(3, None).await;
    let relays = put_behind_relays(&mut cluster, &mut rng, Latency { millis: 0..2 }).await;
    cluster.start_all().await;
    let token = Signer::token("slow-forward-user");

    let late_answer = ticket_for(cluster.node(0), &token).await;
    let consumed = upgrade_past_forward_timeout(
        &cluster,
        &relays,
        &late_answer,
        Duration::ZERO,
        PAST_FORWARD_TIMEOUT,
    )
    .await;
    assert_eq!(
        consumed, 1.0,
        "the home node consumed the ticket before answering"
    );
    let results = upgrade_everywhere(&cluster, &late_answer).await;
    assert!(
        results.iter().all(|result| result == "ticket_already_used"),
        "a ticket consumed by a timed-out forward is lost, never doubled: {results:?}"
    );

    let late_request = ticket_for(cluster.node(0), &token).await;
    let consumed = upgrade_past_forward_timeout(
        &cluster,
        &relays,
        &late_request,
        PAST_FORWARD_TIMEOUT,
        Duration::ZERO,
    )
    .await;
    let results = upgrade_everywhere(&cluster, &late_request).await;
    println!("late request consumed on the home node: {consumed}; later upgrades: {results:?}");
    let accepted = results.iter().filter(|result| *result == "ok").count();
    let expected = if consumed >= 1.0 { 0 } else { 1 };
    assert_eq!(
        accepted, expected,
        "consumed by the late request: {consumed}; {results:?}"
    );

    // With the delays lifted, forwarding works again.
    let fresh = ticket_for(cluster.node(0), &token).await;
    let result = upgrade(cluster.node(1), &fresh).await;
    assert_eq!(result, "ok", "a fresh ticket after the delays were lifted");

    // Forwarded, failed and late consumptions leave no ticket, token or
    // secret in any node's log. Matches are reported by node and line
    // number only.
    let secret = std::fs::read_to_string(&cluster.secret_file).expect("read secret");
    let secrets = [
        late_answer.as_str(),
        late_request.as_str(),
        fresh.as_str(),
        token.as_str(),
        secret.trim_end(),
    ];
    for index in cluster.live_indexes() {
        cluster.node(index).settle_logs().await;
        for (number, line) in cluster.node(index).logs().iter().enumerate() {
            let leaked = secrets.iter().any(|secret| line.contains(secret));
            assert!(
                !leaked,
                "node {index} log line {number} contains a ticket, token or secret"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn home_down_rejects_then_restart_accepts_once() {
    let mut cluster = TestCluster::start(3).await;
    let token = Signer::token("home-user");
    let unused = ticket_for(cluster.node(0), &token).await;
    let used = ticket_for(cluster.node(0), &token).await;
    assert_eq!(upgrade(cluster.node(2), &used).await, "ok");

    cluster.kill_node(0).await;
    let rejection = connect_with_ticket(cluster.node(1), &unused)
        .await
        .expect_err("home is down");
    assert_eq!(rejection.status, 503);
    assert_eq!(rejection.code, "ticket_home_unavailable");
    let answer = common::answer_of(
        reqwest::Client::new()
            .get(cluster.node(1).url(&format!("/ws?ticket={unused}")))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .expect("upgrade request"),
    )
    .await;
    assert_eq!(answer.status, 503);
    assert!(answer.header("retry-after").is_some(), "no Retry-After");
    assert!(
        cluster
            .node(1)
            .metric("wsticket_cluster_home_unavailable_total")
            .await
            >= 2.0,
        "home-unavailable rejections are not counted"
    );

    cluster.start_node(0).await;
    cluster.wait_converged().await;
    assert_eq!(upgrade(cluster.node(1), &used).await, "ticket_already_used");
    assert_eq!(upgrade(cluster.node(1), &unused).await, "ok");
    assert_eq!(
        upgrade(cluster.node(2), &unused).await,
        "ticket_already_used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_without_secret_cannot_join() {
    let mut cluster = TestCluster::start(2).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let wrong_secret = dir.path().join("wrong-secret");
    std::fs::write(&wrong_secret, "another secret, also 32 bytes or more").expect("write");
    // The third spec's address and data directory are unused so far.
    let gossip = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13)),
        free_udp_port(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13))),
    );
    cluster.specs.push(NodeSpec {
        index: 2,
        public_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13)),
        netns: None,
        ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13)),
        gossip,
        data_dir: dir.path().join("intruder"),
        seed: gossip.to_string(),
        admin_listen: None,
        advertise: None,
        admin_advertise: None,
    });
    let intruder = Server::start(cluster.options(2, &wrong_secret)).await;

    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        assert_eq!(live_members(cluster.node(0)).await, 2);
        assert_eq!(live_members(&intruder).await, 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rejected = cluster
        .node(0)
        .metric("wsticket_cluster_gossip_rejected_datagrams_total")
        .await;
    assert!(rejected > 0.0, "no gossip datagram was rejected");
    let warning = cluster.node(0).wait_event("cluster_gossip_rejected").await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(
        warning["rejected_datagrams"].as_u64().unwrap_or(0) > 0,
        "{warning}"
    );

    // The intruder has seeds but no other live node, so it warns after 10 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let alone = loop {
        if let Some(event) = intruder.events("cluster_alone").pop() {
            break event;
        }
        assert!(
            Instant::now() < deadline,
            "no cluster_alone warning in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alone["level"], "WARN", "{alone}");
    assert!(
        cluster.node(0).events("cluster_alone").is_empty(),
        "a node with a live peer warned that it is alone"
    );

    // A ticket of the intruder's cluster decodes to some home index, which
    // is either not live or does not know the ticket.
    let token = Signer::token("intruder-user");
    let foreign = ticket_for(&intruder, &token).await;
    assert_ne!(upgrade(cluster.node(0), &foreign).await, "ok");
}

/// A node given its peer as `localhost:PORT` resolves the name and joins:
/// node 0 runs on 127.0.0.1, which `localhost` names. Node 0's own seed
/// points at a port where nothing listens, so only node 1's resolved seed
/// can bring the two together.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_given_by_host_name_joins() {
    let mut cluster = TestCluster::prepare(2, None).await;
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let gossip = SocketAddr::new(ip, free_udp_port(ip));
    let spec = &mut cluster.specs[0];
    spec.ip = ip;
    spec.public_ip = ip;
    spec.gossip = gossip;
    spec.seed = format!("localhost:{}", gossip.port());
    let unused = SocketAddr::new(ip, free_udp_port(ip));
    cluster.specs[1].seed = unused.to_string();
    cluster.start_all().await;

    let token = Signer::token("host-name-user");
    let ticket = ticket_for(cluster.node(0), &token).await;
    assert_eq!(upgrade(cluster.node(1), &ticket).await, "ok");
}

/// Returns the status and the body of a node's `/readyz`.
async fn readyz(server: &Server) -> (u16, Value) {
    let response = reqwest::get(server.admin_url("/readyz"))
        .await
        .expect("readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("readyz JSON"))
}

/// A second node started with a taken `--cluster-node-id` is reported by
/// both, and the older one turns unready, because the other nodes send the
/// index's tickets to the newer one. Once the newer one stops, the older one
/// is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_node_id_makes_older_node_unready() {
    let mut cluster = TestCluster::start(2).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 13));
    let gossip = SocketAddr::new(ip, free_udp_port(ip));
    cluster.specs.push(NodeSpec {
        index: 1,
        public_ip: ip,
        netns: None,
        ip,
        gossip,
        data_dir: dir.path().join("duplicate"),
        seed: gossip.to_string(),
        admin_listen: None,
        advertise: None,
        admin_advertise: None,
    });
    let secret_file = cluster.secret_file.clone();
    let duplicate = Server::start(cluster.options(2, &secret_file)).await;

    let older = cluster.node(1).wait_event("cluster_node_id_conflict").await;
    assert_eq!(older["level"], "ERROR", "{older}");
    assert_eq!(older["superseded"], true, "{older}");
    let newer = duplicate.wait_event("cluster_node_id_conflict").await;
    assert_eq!(newer["superseded"], false, "{newer}");

    let (status, body) = readyz(cluster.node(1)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["cluster_node_id_current"], false, "{body}");
    let (status, body) = readyz(&duplicate).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["cluster_node_id_current"], true, "{body}");
    let conflicts = cluster
        .node(1)
        .metric("wsticket_cluster_node_id_conflicts")
        .await;
    assert_eq!(conflicts, 1.0);

    duplicate.kill().await;
    let cleared = cluster
        .node(1)
        .wait_event("cluster_node_id_conflict_cleared")
        .await;
    assert_eq!(cleared["node_id"], 1, "{cleared}");
    let (status, body) = readyz(cluster.node(1)).await;
    assert_eq!(status, 200, "{body}");
}

/// Returns `tickets_published_by_others` from a node's `/readyz`.
async fn published_by_others(client: &reqwest::Client, server: &Server) -> u64 {
    let body: Value = client
        .get(server.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("readyz JSON");
    body["cluster"]["tickets_published_by_others"]
        .as_u64()
        .expect("tickets_published_by_others")
}

/// Issues `samples` tickets on node 0 one after another and prints how long
/// each took to be published on every other node (p50 and p99). Each sample
/// polls the other nodes' `/readyz` without pause, bounded to 10 s.
async fn print_propagation(cluster: &TestCluster, samples: usize) {
    let client = reqwest::Client::new();
    let token = Signer::token("propagation");
    let others: Vec<usize> = (1..cluster.nodes.len()).collect();
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut before = Vec::new();
        for &node in &others {
            before.push(published_by_others(&client, cluster.node(node)).await);
        }
        let started = Instant::now();
        ticket_for(cluster.node(0), &token).await;
        for (position, &node) in others.iter().enumerate() {
            loop {
                if published_by_others(&client, cluster.node(node)).await > before[position] {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "node {node} did not receive the ticket state in 10 s"
                );
            }
        }
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "cluster bench nodes={} propagation_samples={samples} known_on_all_p50_ms={:.1} known_on_all_p99_ms={:.1}",
        cluster.nodes.len(),
        quantile_ms(&times, 0.5),
        quantile_ms(&times, 0.99),
    );
}

/// Returns the `q` quantile of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    let position = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[position].as_secs_f64() * 1000.0
}

/// Prints issuance and cross-node upgrade throughput and latency for 1, 3
/// and 5 nodes. Run by `scripts/cluster-bench`; ignored by `cargo test`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with scripts/cluster-bench"]
async fn cluster_throughput_figures() {
    let clients: usize = std::env::var("WSTICKET_BENCH_CLIENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(16);
    let per_client: usize = std::env::var("WSTICKET_BENCH_PER_CLIENT")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100);
    for size in [1u8, 3, 5] {
        let cluster = TestCluster::start(size).await;
        let cluster = &cluster;
        if size > 1 {
            print_propagation(cluster, 50).await;
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..clients {
            tasks.push(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1));
                let token = Signer::token(&format!("bench-{client}"));
                let mut issue = Vec::with_capacity(per_client);
                let mut upgrade_times = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let issuer = rng.below(usize::from(size));
                    // Upgrade on another node whenever there is one.
                    let upgrader =
                        (issuer + 1 + rng.below(usize::from(size).max(2) - 1)) % usize::from(size);
                    let at = Instant::now();
                    let ticket = ticket_for(cluster.node(issuer), &token).await;
                    issue.push(at.elapsed());
                    let at = Instant::now();
                    let result = upgrade(cluster.node(upgrader), &ticket).await;
                    upgrade_times.push(at.elapsed());
                    assert_eq!(result, "ok");
                }
                (issue, upgrade_times)
            });
        }
        let results = futures_util::future::join_all(tasks).await;
        let elapsed = started.elapsed().as_secs_f64();
        let mut issue: Vec<Duration> = results.iter().flat_map(|r| r.0.clone()).collect();
        let mut upgrades: Vec<Duration> = results.iter().flat_map(|r| r.1.clone()).collect();
        issue.sort();
        upgrades.sort();
        let pairs = issue.len() as f64;
        println!(
            "cluster bench nodes={size} clients={clients} pairs={pairs} pairs_per_s={:.0} issue_p50_ms={:.2} issue_p99_ms={:.2} upgrade_p50_ms={:.2} upgrade_p99_ms={:.2}",
            pairs / elapsed,
            quantile_ms(&issue, 0.5),
            quantile_ms(&issue, 0.99),
            quantile_ms(&upgrades, 0.5),
            quantile_ms(&upgrades, 0.99),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn used_ticket_rejected_while_home_down() {
    let mut cluster = TestCluster::start(3).await;
    let token = Signer::token("tombstone-user");
    let ticket = ticket_for(cluster.node(0), &token).await;
    assert_eq!(upgrade(cluster.node(1), &ticket).await, "ok");
    let forwarded = cluster
        .node(1)
        .wait_event("cluster_forwarded_consume")
        .await;
    assert_eq!(forwarded["home"], 0);
    assert_eq!(forwarded["result"], "consumed");
    assert_eq!(forwarded["ticket_id"], common::ticket_log_id(&ticket));
    assert!(forwarded["latency_ms"].as_f64().is_some(), "{forwarded}");

    // Nodes 1 and 2 learn from gossip that node 0 consumed the ticket. Until
    // then they ask node 0, which also rejects it; they must never accept it.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in [1, 2] {
        loop {
            let answered_locally = cluster
                .node(node)
                .metric("wsticket_cluster_answered_from_gossip_total")
                .await;
            let result = upgrade(cluster.node(node), &ticket).await;
            assert_eq!(result, "ticket_already_used");
            if answered_locally >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the used state never reached node {node}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    cluster.kill_node(0).await;
    assert_eq!(
        upgrade(cluster.node(2), &ticket).await,
        "ticket_already_used"
    );
    assert_eq!(
        upgrade(cluster.node(1), &ticket).await,
        "ticket_already_used"
    );
}

/// Network namespaces for partition tests: one per node and a hub, removed
/// (with every process left in them) on drop.
///
/// Each node has two links into the hub: `p<i>` on the public network
/// 10.91.0.0/24, which clients use, and `c<i>` on the cluster network
/// 10.92.0.0/24, which gossip and forwarded consumptions use. A partition
/// acts on the cluster links only, so clients still reach every node: that
/// is the case in which two sides could both accept one ticket. The clients
/// run in the hub namespace.
struct Namespaces {
    prefix: String,
    nodes: u8,
}

impl Namespaces {
    const HUB_PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 254);

    fn node_name(prefix: &str, index: u8) -> String {
        format!("{prefix}-n{index}")
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Creates the namespaces, bridges and links, or panics (after removing
    /// what it made) when `ip` fails.
    fn create(nodes: u8) -> Self {
        let namespaces = Namespaces {
            prefix: format!("wstp{}", std::process::id()),
            nodes,
        };
        let hub = namespaces.hub();
        run_ip(&["netns", "add", &hub]);
        run_ip(&["-n", &hub, "link", "set", "lo", "up"]);
        for bridge in ["brp", "brc", "brc2"] {
            run_ip(&["-n", &hub, "link", "add", bridge, "type", "bridge"]);
            run_ip(&["-n", &hub, "link", "set", bridge, "up"]);
        }
        run_ip(&["-n", &hub, "addr", "add", "10.91.0.254/24", "dev", "brp"]);
        run_ip(&["-n", &hub, "addr", "add", "10.92.0.254/24", "dev", "brc"]);
        for index in 0..nodes {
            let node = Self::node_name(&namespaces.prefix, index);
            run_ip(&["netns", "add", &node]);
            run_ip(&["-n", &node, "link", "set", "lo", "up"]);
            for (net, bridge, subnet) in [("p", "brp", 91), ("c", "brc", 92)] {
                let inside = format!("{net}{index}a");
                let outside = format!("{net}{index}b");
                run_ip(&[
                    "link", "add", &inside, "netns", &node, "type", "veth", "peer", "name",
                    &outside, "netns", &hub,
                ]);
                let address = format!("10.{subnet}.0.{}/24", index + 1);
                run_ip(&["-n", &node, "addr", "add", &address, "dev", &inside]);
                run_ip(&["-n", &node, "link", "set", &inside, "up"]);
                run_ip(&["-n", &hub, "link", "set", &outside, "master", bridge, "up"]);
            }
        }
        namespaces
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let names: Vec<String> = (0..self.nodes)
            .map(|index| Self::node_name(&self.prefix, index))
            .chain([self.hub()])
            .collect();
        for name in &names {
            // Every process in these namespaces was started by this test.
            if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `ip` with `args` and panics if it fails.
fn run_ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(
        status.success(),
        "ip {} failed with {status}",
        args.join(" ")
    );
}

/// Partitions in network namespaces: needs root and `ip netns`, so it only
/// runs with `WSTICKET_CLUSTER_NETNS=1` (as `scripts/cluster-partition` and
/// the CI script set it). It builds the namespaces and runs
/// `partition_history_in_namespaces` inside the hub namespace.
#[test]
fn partitions_never_double_accept() {
    if std::env::var("WSTICKET_CLUSTER_NETNS").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set WSTICKET_CLUSTER_NETNS=1 to run partitions (needs root and ip netns)"
        );
        return;
    }
    let namespaces = Namespaces::create(5);
    let test_binary = std::env::current_exe().expect("test binary path");
    let output = Command::new("ip")
        .args(["netns", "exec", &namespaces.hub(), "timeout", "300"])
        .arg(test_binary)
        .args([
            "--exact",
            "partition_history_in_namespaces",
            "--ignored",
            "--nocapture",
        ])
        .env("WSTICKET_CLUSTER_NETNS_PREFIX", &namespaces.prefix)
        .output()
        .expect("run the partition history");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the partition history failed with {}:\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the partition history did not run:\n{stdout}"
    );
}

/// Drives the clients' side of [`partitions_never_double_accept`], inside
/// the hub namespace. Five nodes go through: no fault, one node cut off from the
/// cluster network, the cluster split into {0, 1} and {2, 3, 4}, and healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs inside namespaces, started by partitions_never_double_accept"]
async fn partition_history_in_namespaces() {
    let prefix = std::env::var("WSTICKET_CLUSTER_NETNS_PREFIX").expect("namespace prefix");
    let cluster = TestCluster::start_in(5, Some(&prefix)).await;
    let mut rng = Rng::from_env();
    let mut driver = Driver::new("partition-user");
    for _ in 0..10 {
        driver.round(&cluster, &mut rng, 3).await;
    }

    let isolated = rng.below(5);
    run_ip(&["link", "set", &format!("c{isolated}b"), "down"]);
    for _ in 0..20 {
        driver.round(&cluster, &mut rng, 3).await;
    }
    run_ip(&["link", "set", &format!("c{isolated}b"), "up"]);
    cluster.wait_converged().await;

    for index in 2..5 {
        run_ip(&["link", "set", &format!("c{index}b"), "master", "brc2"]);
    }
    for _ in 0..20 {
        driver.round(&cluster, &mut rng, 3).await;
    }
    for index in 2..5 {
        run_ip(&["link", "set", &format!("c{index}b"), "master", "brc"]);
    }
    cluster.wait_converged().await;
    for _ in 0..10 {
        driver.round(&cluster, &mut rng, 3).await;
    }

    let verdict = check(&driver.finish());
    println!(
        "partition runs, tickets, double_accepts, lost_to_home_down: 1, {}, {}, {}",
        verdict.tickets, verdict.double_accepts, verdict.lost_to_home_down
    );
    println!(
        "partition home-unavailable rejections: {}",
        verdict.home_down_rejections
    );
    assert_eq!(verdict.double_accepts, 0, "{verdict:?}");
    assert_eq!(verdict.accepted_after_ack, 0, "{verdict:?}");
    assert!(verdict.unexpected.is_empty(), "{verdict:?}");
    assert!(
        verdict.home_down_rejections > 0,
        "no upgrade met an unreachable home, so the partitions did not bite: {verdict:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_ticket_states_reach_restarted_node() {
    // A node that restarts catches up on 3,000 states at once, so chitchat
    // sends deltas near its size limit (about 56 KB in this test). The
    // transport splits any that would exceed the largest UDP payload once
    // sealed.
    let mut cluster = TestCluster::start(2).await;
    cluster.kill_node(1).await;
    let tickets = 3_008;
    let clients = 16;
    let mut issuing = Vec::new();
    let issuer = cluster.node(0);
    for client in 0..clients {
        issuing.push(async move {
            let token = Signer::token(&format!("bulk-{client}"));
            for _ in 0..tickets / clients {
                ticket_for(issuer, &token).await;
            }
        });
    }
    futures_util::future::join_all(issuing).await;
    cluster.start_node(1).await;

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let published = published_by_others(&client, cluster.node(1)).await;
        if published >= tickets as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 received {published} of {tickets} ticket states in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn single_node_has_no_cluster_surface() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = JwksServer::start(common::default_jwks()).await;
    let server = Server::start(ServerOptions::new(jwks.url(), dir.path())).await;

    let metrics = reqwest::get(server.admin_url("/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    assert!(
        !metrics.contains("wsticket_cluster_"),
        "cluster metrics in single-node mode"
    );

    let ready: Value = reqwest::get(server.admin_url("/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("readyz JSON");
    assert!(ready.get("cluster").is_none(), "{ready}");

    let internal = reqwest::Client::new()
        .post(server.admin_url("/internal/cluster/consume"))
        .body("{}")
        .send()
        .await
        .expect("internal request");
    assert_eq!(internal.status(), 404);
    let internal_get = reqwest::get(server.admin_url("/internal/cluster/consume"))
        .await
        .expect("internal request");
    assert_eq!(internal_get.status(), 404);

    let ticket = ticket_for(&server, &Signer::token("single")).await;
    assert_eq!(upgrade(&server, &ticket).await, "ok");
    assert!(server.events("cluster_joined").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_forward_is_rejected() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let ticket = ticket_for(node, &Signer::token("forged-user")).await;
    let hash = ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes());
    let body = serde_json::json!({ "key": hex::encode(hash.as_ref()), "origin": null }).to_string();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
        .to_string();
    let client = reqwest::Client::new();

    let unsigned = client
        .post(node.admin_url("/internal/cluster/consume"))
        .body(body.clone())
        .send()
        .await
        .expect("unsigned request");
    assert_eq!(unsigned.status(), 401);
    let wrong_mac = client
        .post(node.admin_url("/internal/cluster/consume"))
        .header("x-wsticket-cluster-time", &now_ms)
        .header("x-wsticket-cluster-nonce", "00")
        .header("x-wsticket-cluster-mac", "ab".repeat(32))
        .body(body)
        .send()
        .await
        .expect("request with a wrong MAC");
    assert_eq!(wrong_mac.status(), 401);

    let rejected = node
        .metric("wsticket_cluster_forward_unauthenticated_total")
        .await;
    assert_eq!(rejected, 2.0);
    assert_eq!(upgrade(node, &ticket).await, "ok");
}

/// A copy of a forwarded consumption with a valid MAC, sent again, is
/// rejected by its nonce, while a new request for the same ticket is run and
/// finds the ticket used. Without the nonce check, an attacker who captures a
/// request could spend a client's ticket and read its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_forward_is_rejected() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let ticket = ticket_for(node, &Signer::token("replay-user")).await;
    let hash = ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes());
    let body = serde_json::json!({ "key": hex::encode(hash.as_ref()), "origin": null }).to_string();
    let secret = std::fs::read_to_string(&cluster.secret_file).expect("read secret");
    let keys = wsticket::cluster::ClusterKeys::derive(secret.trim_end().as_bytes());
    let client = reqwest::Client::new();
    let send = |nonce: &'static str| {
        let time_ms = wsticket::cluster::unix_ms();
        let mac =
            wsticket::cluster::forward::request_mac(&keys.forward, time_ms, nonce, body.as_bytes());
        client
            .post(node.admin_url("/internal/cluster/consume"))
            .header("x-wsticket-cluster-time", time_ms.to_string())
            .header("x-wsticket-cluster-nonce", nonce)
            .header("x-wsticket-cluster-mac", mac)
            .body(body.clone())
            .send()
    };

    let first = send("0123456789abcdef").await.expect("first request");
    assert_eq!(first.status(), 200);
    let answer: Value = first.json().await.expect("answer JSON");
    assert_eq!(answer["outcome"], "consumed", "{answer}");

    let replay = send("0123456789abcdef").await.expect("replayed request");
    assert_eq!(replay.status(), 401);
    let rejection: Value = replay.json().await.expect("rejection JSON");
    assert_eq!(rejection["error"], "invalid_cluster_mac", "{rejection}");
    let replays = node
        .metric("wsticket_cluster_forward_unauthenticated_total")
        .await;
    assert_eq!(replays, 1.0);

    let fresh = send("fedcba9876543210")
        .await
        .expect("request with a new nonce");
    assert_eq!(fresh.status(), 200);
    let answer: Value = fresh.json().await.expect("answer JSON");
    assert_eq!(answer["outcome"], "already_used", "{answer}");
}

/// Random 32-character tickets sent to a settled 3-node cluster are all
/// rejected as `invalid_ticket`, also those whose last character decodes to a
/// node index that no node runs. Such a ticket cannot have been issued, so it
/// is no reason for `ticket_home_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_tickets_are_invalid_not_home_unavailable() {
    let cluster = TestCluster::start(3).await;
    let mut rng = Rng::from_env();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let random_ticket = |rng: &mut Rng| -> String {
        (0..32)
            .map(|_| char::from(ALPHABET[rng.below(ALPHABET.len())]))
            .collect()
    };
    // A node returns `ticket_home_unavailable` for an index it has not seen
    // during its first seconds, while it may still be learning the members.
    // Five `invalid_ticket` in a row mean that time is over: a random ticket
    // decodes to one of the 3 live indexes only 3 times in 62.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut results = Vec::new();
        for _ in 0..5 {
            results.push(upgrade(cluster.node(1), &random_ticket(&mut rng)).await);
        }
        if results.iter().all(|result| result == "invalid_ticket") {
            break;
        }
        for result in &results {
            assert!(
                result == "invalid_ticket" || result == "ticket_home_unavailable",
                "{results:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "random tickets are still home_unavailable"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for _ in 0..20 {
        let ticket = random_ticket(&mut rng);
        let result = upgrade(cluster.node(1), &ticket).await;
        assert_eq!(result, "invalid_ticket");
    }
}
