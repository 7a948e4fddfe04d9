//! Measures how many ticket states per second chitchat gossip replicates, for
//! the value wsticket publishes (`i:<expiry ms>`) against the full record of
//! the original design (the same plus subject, session and Origin).
//!
//! ```text
//! cargo run --release --example gossip_capacity -- --repeats 2
//! ```
//!
//! Each run starts `--nodes` chitchat nodes in this process on 127.0.0.21 and
//! up, with free UDP ports, wsticket's `SealedTransport` and the settings of
//! `wsticket serve` (`wsticket::cluster::chitchat_config`). Node 0 publishes
//! one shape at one rate for `--publish-for`, as `Cluster::publish` does, and
//! every `--sample-every`th entry is timed until every other node has it.
//! A run stops when the last entry has reached every node, or at
//! `--deadline` after its first entry. Both shapes run at each rate before the
//! next rate, in alternating order, so that their ratio is measured under the
//! same load of the shared machine.
//!
//! The full record is written as `i:<expiry ms>|<subject>|<session>|<origin>`,
//! the shortest text form of those fields, so its cost here is a lower bound
//! for a JSON encoding. Subjects and sessions are random 36-character UUIDs,
//! the worst case for chitchat's zstd compression, and Origins are 30
//! characters from a set of 1,000.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{spawn_chitchat, ChitchatEnvelope, ChitchatHandle, ChitchatId};
use clap::Parser;
use prometheus::IntCounter;
use ring::digest::{digest, SHA256};
use wsticket::cluster::home::MAX_NODES;
use wsticket::cluster::records::{gossip_key, Published, KEY_PREFIX};
use wsticket::cluster::transport::SealedTransport;
use wsticket::cluster::{chitchat_config, unix_ms, ClusterConfig, ClusterKeys, Consistency};
use wsticket::config::Profile;
use wsticket::ticket::TicketKey;

/// Address of node 0. Node i listens on the i-th address after it.
const FIRST_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 21);
/// Default of `--expired-grace`, which with the ticket lifetime sets how
/// long published states stay in gossip.
const EXPIRED_GRACE: Duration = Duration::from_secs(300);
/// How long the nodes may take to see each other before a run fails.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Gossip traffic is measured for this long before publishing starts, to
/// subtract the heartbeats and digests from the bytes per entry.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Period of the loop that publishes due entries and checks arrivals. It
/// bounds the resolution of the latencies.
const TICK: Duration = Duration::from_millis(2);

#[derive(Parser)]
#[command(about = "Measures gossip replication of ticket states on loopback")]
struct Cli {
    /// Nodes in each run, the publishing node included (2 to 61).
    #[arg(long, default_value_t = 3)]
    nodes: u8,

    /// Publish rates to measure, in entries per second, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,3000,4000,6000,8000,12000"
    )]
    rates: Vec<u32>,

    /// How long node 0 publishes in each run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    publish_for: Duration,

    /// Hard limit of each run, counted from its first entry. Entries that
    /// have not reached every node by then are reported as missing.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    deadline: Duration,

    /// Time one entry out of this many (the last entry is always timed).
    #[arg(long, default_value_t = 10)]
    sample_every: u64,

    /// How many times to run every rate with both shapes.
    #[arg(long, default_value_t = 1)]
    repeats: u32,

    /// Interval between two gossip rounds, as `--cluster-gossip-interval`.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    gossip_interval: Duration,
}

/// The value published for each ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// wsticket's value, `i:<expiry ms>`.
    State,
    /// The design's record: the state, subject, session and Origin.
    Full,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::State => "state",
            Shape::Full => "full",
        }
    }
}

/// The figures of one run.
struct RunReport {
    published: u64,
    latencies: Vec<Duration>,
    /// Entries that had not reached every other node when publishing ended.
    behind_at_stop: u64,
    /// Time from the end of publishing until the last entry reached every
    /// other node, if it did before the deadline.
    drain: Option<Duration>,
    /// Entries that had not reached every other node at the end of the run.
    missing: u64,
    value_bytes: u64,
    /// Sealed bytes sent by all nodes while publishing and draining, less
    /// the idle rate over the same time.
    net_bytes: f64,
    idle_bytes_per_second: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    validate(&cli)?;
    println!(
        "gossip_capacity nodes={} gossip_interval_ms={} publish_for_s={} deadline_s={} sample_every={}",
        cli.nodes,
        cli.gossip_interval.as_millis(),
        cli.publish_for.as_secs_f64(),
        cli.deadline.as_secs_f64(),
        cli.sample_every
    );
    let mut run_index = 0u32;
    for _ in 0..cli.repeats {
        for &rate in &cli.rates {
            let shapes = if run_index.is_multiple_of(2) {
                [Shape::State, Shape::Full]
            } else {
                [Shape::Full, Shape::State]
            };
            run_index += 1;
            for shape in shapes {
                let report = run(&cli, shape, rate)
                    .await
                    .with_context(|| format!("run shape={} rate={rate}", shape.name()))?;
                print_report(shape, rate, &report);
            }
        }
    }
    Ok(())
}

fn validate(cli: &Cli) -> anyhow::Result<()> {
    if cli.nodes < 2 || cli.nodes >= MAX_NODES {
        bail!(
            "invalid --nodes {}: must be between 2 and {}",
            cli.nodes,
            MAX_NODES - 1
        );
    }
    if cli.rates.is_empty() || cli.rates.contains(&0) {
        bail!(
            "invalid --rates {:?}: give one or more rates above 0",
            cli.rates
        );
    }
    if cli.sample_every == 0 {
        bail!("invalid --sample-every 0: must be at least 1");
    }
    if cli.publish_for.is_zero() || cli.deadline <= cli.publish_for {
        bail!(
            "invalid --deadline {}: must be longer than --publish-for {}, which must be above 0",
            humantime::format_duration(cli.deadline),
            humantime::format_duration(cli.publish_for)
        );
    }
    if cli.gossip_interval < Duration::from_millis(10) {
        bail!(
            "invalid --gossip-interval {}: must be at least 10ms, as for wsticket serve",
            humantime::format_duration(cli.gossip_interval)
        );
    }
    Ok(())
}

fn print_report(shape: Shape, rate: u32, report: &RunReport) {
    let mut latencies = report.latencies.clone();
    latencies.sort_unstable();
    let millis = |quantile: f64| {
        percentile(&latencies, quantile).map_or_else(
            || "none".to_owned(),
            |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
        )
    };
    let drain = report.drain.map_or_else(
        || "none".to_owned(),
        |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
    );
    let bytes_per_entry = report.net_bytes / report.published.max(1) as f64;
    let value_bytes = report.value_bytes as f64 / report.published.max(1) as f64;
    println!(
        "gossip shape={} rate={rate} published={} p50_ms={} p99_ms={} max_ms={} behind_at_stop={} drain_ms={drain} missing={} value_bytes={value_bytes:.0} bytes_per_entry={bytes_per_entry:.0} idle_bytes_per_s={:.0}",
        shape.name(),
        report.published,
        millis(0.50),
        millis(0.99),
        millis(1.0),
        report.behind_at_stop,
        report.missing,
        report.idle_bytes_per_second,
    );
}

/// Returns the nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], quantile: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A published entry that is timed until every other node has it.
struct Sample {
    index: u64,
    key: String,
    published_at: Instant,
    /// When each other node was first seen with it.
    arrived_at: Vec<Option<Instant>>,
}

/// Starts a cluster, publishes one shape at one rate, and measures it.
async fn run(cli: &Cli, shape: Shape, rate: u32) -> anyhow::Result<RunReport> {
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let nodes = start_nodes(cli, &sent_bytes).await?;
    let result = measure(cli, &nodes, &sent_bytes, shape, rate).await;
    for node in nodes {
        if let Err(err) = node.shutdown().await {
            eprintln!("stopping a gossip node failed: {err:#}");
        }
    }
    result
}

/// Starts the nodes and waits until every node reports all of them as live.
async fn start_nodes(
    cli: &Cli,
    sent_bytes: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<ChitchatHandle>> {
    let addresses = (0..cli.nodes)
        .map(|index| free_udp_address(node_ip(index)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The secret only has to be the same on every node of the run.
    let keys = ClusterKeys::derive(b"gossip_capacity benchmark secret, loopback only");
    let record_lifetime = Profile::Prod.default_ticket_ttl() + EXPIRED_GRACE;
    let rejected = IntCounter::new("gossip_rejected", "Gossip datagrams that did not open.")
        .expect("the metric name is valid");
    let mut nodes = Vec::with_capacity(addresses.len());
    for (index, &listen) in addresses.iter().enumerate() {
        // Every node joins through node 0, and node 0 through node 1.
        let seed = if index == 0 {
            addresses[1]
        } else {
            addresses[0]
        };
        let config = ClusterConfig {
            listen,
            advertise: listen,
            admin_advertise: None,
            peers: vec![seed.to_string()],
            node_id: u8::try_from(index).expect("--nodes is below 62"),
            keys: keys.clone(),
            consistency: Consistency::Strict,
            forward_timeout: Duration::from_secs(2),
            gossip_interval: cli.gossip_interval,
        };
        let transport = CountingTransport {
            sealed: SealedTransport::new(keys.gossip, rejected.clone()),
            sent_bytes: sent_bytes.clone(),
        };
        let handle = spawn_chitchat(
            chitchat_config(&config, record_lifetime),
            Vec::new(),
            &transport,
        )
        .await
        .with_context(|| format!("starting gossip on {listen} failed"))?;
        nodes.push(handle);
    }

    let started = Instant::now();
    loop {
        let mut joined = true;
        for node in &nodes {
            let live = node.chitchat().lock().await.live_nodes().count();
            joined &= live >= nodes.len();
        }
        if joined {
            break;
        }
        if started.elapsed() > JOIN_TIMEOUT {
            bail!(
                "timed out after {} waiting for the {} gossip nodes to report each other as live",
                humantime::format_duration(JOIN_TIMEOUT),
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if rejected.get() > 0 {
        bail!(
            "{} gossip datagrams did not open with the shared key",
            rejected.get()
        );
    }
    Ok(nodes)
}

fn node_ip(index: u8) -> Ipv4Addr {
    let [a, b, c, d] = FIRST_ADDRESS.octets();
    Ipv4Addr::new(a, b, c, d + index)
}

/// Returns an address on `ip` with a UDP port that was free a moment ago.
/// chitchat advertises its listen address, so port 0 cannot be passed on.
fn free_udp_address(ip: Ipv4Addr) -> anyhow::Result<SocketAddr> {
    let socket = StdUdpSocket::bind((ip, 0))
        .with_context(|| format!("binding a UDP socket on {ip} failed"))?;
    Ok(socket.local_addr()?)
}

/// Publishes entries at `rate` from node 0 and times their arrival on the
/// other nodes.
async fn measure(
    cli: &Cli,
    nodes: &[ChitchatHandle],
    sent_bytes: &AtomicU64,
    shape: Shape,
    rate: u32,
) -> anyhow::Result<RunReport> {
    let publisher = nodes[0].chitchat_id().clone();
    let receivers = &nodes[1..];

    let idle_start = sent_bytes.load(Ordering::Relaxed);
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_bytes_per_second =
        (sent_bytes.load(Ordering::Relaxed) - idle_start) as f64 / IDLE_WINDOW.as_secs_f64();

    let total = (f64::from(rate) * cli.publish_for.as_secs_f64()).round() as u64;
    let mut generator = EntryGenerator::new(shape);
    let mut samples: Vec<Sample> = Vec::new();
    // Index into `samples` of the first sample each receiver has not shown
    // yet. chitchat sends a node's entries in version order and applies
    // none above a gap, so a node that has a sample has all before it.
    let mut next_unseen = vec![0usize; receivers.len()];
    let mut published = 0u64;
    let mut value_bytes = 0u64;
    let mut behind_at_stop = None;
    let mut stopped_at = None;
    let mut drain = None;

    let bytes_start = sent_bytes.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while start.elapsed() < cli.deadline {
        ticker.tick().await;

        if published < total {
            let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
            let batch: Vec<(u64, String, String)> = (published..due)
                .map(|index| {
                    let (key, value) = generator.entry(index);
                    (index, key, value)
                })
                .collect();
            let chitchat = nodes[0].chitchat();
            let mut chitchat = chitchat.lock().await;
            let published_at = Instant::now();
            for (index, key, value) in batch {
                value_bytes += value.len() as u64;
                if index.is_multiple_of(cli.sample_every) || index + 1 == total {
                    samples.push(Sample {
                        index,
                        key: key.clone(),
                        published_at,
                        arrived_at: vec![None; receivers.len()],
                    });
                }
                chitchat.self_node_state().set_with_ttl(key, value);
            }
            drop(chitchat);
            published = due;
            if published == total {
                stopped_at = Some(Instant::now());
            }
        }

        for (receiver_index, receiver) in receivers.iter().enumerate() {
            let chitchat = receiver.chitchat();
            let chitchat = chitchat.lock().await;
            let Some(state) = chitchat.node_state(&publisher) else {
                continue;
            };
            let now = Instant::now();
            let next = &mut next_unseen[receiver_index];
            while let Some(sample) = samples.get_mut(*next) {
                if !state.contains_key(&sample.key) {
                    break;
                }
                sample.arrived_at[receiver_index] = Some(now);
                *next += 1;
            }
        }

        if let Some(stopped_at) = stopped_at {
            if behind_at_stop.is_none() {
                behind_at_stop = Some(count_missing(nodes, &publisher, published).await);
            }
            let last_arrived = samples.last().is_some_and(|last| {
                last.index + 1 == total && last.arrived_at.iter().all(Option::is_some)
            });
            if last_arrived {
                drain = Some(stopped_at.elapsed());
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let bytes = sent_bytes.load(Ordering::Relaxed) - bytes_start;
    let missing = count_missing(nodes, &publisher, published).await;

    let latencies = samples
        .iter()
        .filter_map(|sample| {
            let arrived = sample
                .arrived_at
                .iter()
                .copied()
                .collect::<Option<Vec<_>>>()?;
            let last = arrived.into_iter().max()?;
            Some(last - sample.published_at)
        })
        .collect();
    Ok(RunReport {
        published,
        latencies,
        behind_at_stop: behind_at_stop.unwrap_or(missing),
        drain,
        missing,
        value_bytes,
        net_bytes: bytes as f64 - idle_bytes_per_second * elapsed.as_secs_f64(),
        idle_bytes_per_second,
    })
}

/// Counts the published entries that the receiver furthest behind lacks.
async fn count_missing(nodes: &[ChitchatHandle], publisher: &ChitchatId, published: u64) -> u64 {
    let mut missing = 0;
    for receiver in &nodes[1..] {
        let chitchat = receiver.chitchat();
        let chitchat = chitchat.lock().await;
        let received = chitchat
            .node_state(publisher)
            .map_or(0, |state| state.iter_prefix(KEY_PREFIX).count() as u64);
        missing = missing.max(published.saturating_sub(received));
    }
    missing
}

/// Makes the chitchat key and value of the n-th ticket of a run.
struct EntryGenerator {
    shape: Shape,
    /// Distinguishes the keys of runs started in the same process.
    run_nonce: u64,
    /// State of the splitmix64 generator for subjects and sessions, which
    /// need to look random but not to be unpredictable.
    random_state: u64,
}

impl EntryGenerator {
    fn new(shape: Shape) -> Self {
        let run_nonce = unix_ms();
        EntryGenerator {
            shape,
            run_nonce,
            random_state: run_nonce,
        }
    }

    fn entry(&mut self, index: u64) -> (String, String) {
        let mut seed = [0u8; 16];
        seed[..8].copy_from_slice(&self.run_nonce.to_be_bytes());
        seed[8..].copy_from_slice(&index.to_be_bytes());
        let hash: TicketKey = digest(&SHA256, &seed)
            .as_ref()
            .try_into()
            .expect("SHA-256 has 32 bytes");
        let expires_at_ms = unix_ms() + Profile::Prod.default_ticket_ttl().as_millis() as u64;
        let state = Published::Issued { expires_at_ms }.encode();
        let value = match self.shape {
            Shape::State => state,
            Shape::Full => {
                let subject = self.uuid();
                let session = self.uuid();
                let origin = format!("https://tenant-{:03}.example.com", index % 1000);
                format!("{state}|{subject}|{session}|{origin}")
            }
        };
        (gossip_key(&hash), value)
    }

    /// Returns a random UUID in its 36-character text form.
    fn uuid(&mut self) -> String {
        let high = self.next_random();
        let low = self.next_random();
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            high >> 32,
            (high >> 16) & 0xffff,
            high & 0xffff,
            low >> 48,
            low & 0xffff_ffff_ffff
        )
    }

    fn next_random(&mut self) -> u64 {
        self.random_state = self.random_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.random_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// A [`SealedTransport`] that adds the bytes of every datagram it sends to
/// a shared counter.
struct CountingTransport {
    sealed: SealedTransport,
    sent_bytes: Arc<AtomicU64>,
}

#[async_trait]
impl Transport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(CountingSocket {
            inner: self.sealed.open(listen_addr).await?,
            sent_bytes: self.sent_bytes.clone(),
        }))
    }
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    sent_bytes: Arc<AtomicU64>,
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let outcome = self.inner.send(to, envelope).await?;
        self.sent_bytes
            .fetch_add(outcome.num_bytes_sent as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}
