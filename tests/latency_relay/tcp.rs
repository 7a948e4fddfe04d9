//! The TCP relay: each accepted connection gets its own connection to the
//! target, and each direction delays every chunk it reads before writing it
//! on. A chunk is never written before the one read ahead of it, so the
//! stream stays in order whatever the jitter.
//!
//! When one side closes, the chunks already read are still delivered late, as
//! packets in flight would be. After them, the other side's write half is
//! shut.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::Latency;

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// What a relay has carried.
#[derive(Debug, Default)]
pub struct TcpCounts {
    pub connections: AtomicU64,
    pub bytes_to_target: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

/// A running relay from `listen` to one target address.
pub struct TcpRelay {
    pub listen: SocketAddr,
    pub counts: Arc<TcpCounts>,
    /// Milliseconds added to every delay drawn from now on, towards the
    /// target and towards the client.
    extra_ms: Arc<[AtomicU64; 2]>,
    task: JoinHandle<()>,
}

impl TcpRelay {
    /// Listens on `listen` and relays each connection to `target` for at
    /// most `lifetime`.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        latency: Latency,
        seed: u64,
        lifetime: Duration,
    ) -> Self {
        let listener = TcpListener::bind(listen).await.expect("bind the relay");
        let listen = listener.local_addr().expect("relay address");
        let counts = Arc::new(TcpCounts::default());
        let extra_ms = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let relay = accept_connections(
            listener,
            target,
            latency,
            seed | 1,
            counts.clone(),
            extra_ms.clone(),
        );
        let task = tokio::spawn(async move {
            let _ = tokio::time::timeout(lifetime, relay).await;
        });
        TcpRelay {
            listen,
            counts,
            extra_ms,
            task,
        }
    }

    /// Adds `to_target` to the delay of every chunk the client sends from
    /// now on, and `to_client` to that of every chunk the target sends.
    pub fn set_extra_delay(&self, to_target: Duration, to_client: Duration) {
        for (slot, extra) in self.extra_ms.iter().zip([to_target, to_client]) {
            let millis = u64::try_from(extra.as_millis()).expect("delay fits in u64 milliseconds");
            slot.store(millis, Ordering::Relaxed);
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until the listener fails. Dropping the returned
/// future aborts every relayed connection.
async fn accept_connections(
    listener: TcpListener,
    target: SocketAddr,
    latency: Latency,
    mut rng: u64,
    counts: Arc<TcpCounts>,
    extra_ms: Arc<[AtomicU64; 2]>,
) {
    let mut connections = JoinSet::new();
    let ip: IpAddr = listener.local_addr().expect("relay address").ip();
    while let Ok((client, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        counts.connections.fetch_add(1, Ordering::Relaxed);
        rng = rng.rotate_left(23) ^ 0x9E37_79B9_7F4A_7C15;
        let seed = rng | 1;
        let latency = latency.clone();
        let counts = counts.clone();
        let extra_ms = extra_ms.clone();
        connections.spawn(async move {
            let Ok(upstream) = connect_from(ip, target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            let forward = Direction {
                latency: latency.clone(),
                rng: seed,
                extra_ms: extra_ms.clone(),
                counts: counts.clone(),
                towards_target: true,
            };
            let backward = Direction {
                latency,
                rng: seed.rotate_left(29) | 1,
                extra_ms,
                counts,
                towards_target: false,
            };
            tokio::join!(
                forward.pipe(client_read, upstream_write),
                backward.pipe(upstream_read, client_write),
            );
        });
    }
}

/// Connects to `target` from the relay's own IP, so the connection reaches
/// the target from the same loopback address as the relay.
async fn connect_from(ip: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

/// One direction of a relayed connection.
struct Direction {
    latency: Latency,
    rng: u64,
    extra_ms: Arc<[AtomicU64; 2]>,
    counts: Arc<TcpCounts>,
    towards_target: bool,
}

impl Direction {
    /// Reads chunks from `from` and writes each to `to` once its delay has
    /// passed, until `from` ends or `to` fails.
    async fn pipe(self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
        let Direction {
            latency,
            mut rng,
            extra_ms,
            counts,
            towards_target,
        } = self;
        let (sender, mut receiver) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let read = async move {
            let mut last_due = Instant::now();
            let mut buffer = vec![0u8; CHUNK];
            loop {
                let len = match from.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(len) => len,
                };
                let slot = if towards_target { 0 } else { 1 };
                let extra = Duration::from_millis(extra_ms[slot].load(Ordering::Relaxed));
                let due = (Instant::now() + latency.sample(&mut rng) + extra).max(last_due);
                last_due = due;
                if sender.send((due, buffer[..len].to_vec())).is_err() {
                    return;
                }
            }
        };
        let write = async move {
            while let Some((due, chunk)) = receiver.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
                let counter = if towards_target {
                    &counts.bytes_to_target
                } else {
                    &counts.bytes_to_client
                };
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            let _ = to.shutdown().await;
        };
        tokio::join!(read, write);
    }
}
