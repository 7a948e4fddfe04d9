//! The UDP relay: one front socket that senders send to, and a socket of its
//! own per sender towards the target, so the target's replies to that socket
//! travel back the same way.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};

use super::Latency;

/// Maximum number of senders per relay. Datagrams from further senders are
/// dropped.
const MAX_SENDERS: usize = 64;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;

/// Datagrams a relay has passed on, per direction.
#[derive(Debug, Default)]
pub struct Counts {
    pub to_target: AtomicU64,
    pub to_sender: AtomicU64,
}

/// A running relay from `listen` to one target address.
pub struct UdpRelay {
    pub listen: SocketAddr,
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl UdpRelay {
    /// Binds `ip` on a free port and relays what arrives there to `target`
    /// for at most `lifetime`.
    pub async fn start(
        ip: IpAddr,
        target: SocketAddr,
        latency: Latency,
        seed: u64,
        lifetime: Duration,
    ) -> Self {
        let front = Arc::new(UdpSocket::bind((ip, 0)).await.expect("bind the relay"));
        let listen = front.local_addr().expect("relay address");
        let counts = Arc::new(Counts::default());
        let relay = relay_datagrams(front, target, latency, seed | 1, counts.clone());
        let task = tokio::spawn(async move {
            let _ = tokio::time::timeout(lifetime, relay).await;
        });
        UdpRelay {
            listen,
            counts,
            task,
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays datagrams from senders to `target`, and the target's replies back
/// to each sender, until the front socket fails. Dropping the returned
/// future aborts every pending delayed datagram.
async fn relay_datagrams(
    front: Arc<UdpSocket>,
    target: SocketAddr,
    latency: Latency,
    mut rng: u64,
    counts: Arc<Counts>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let ip = front.local_addr().expect("relay address").ip();
    while let Ok((len, sender)) = front.recv_from(&mut buffer).await {
        while tasks.try_join_next().is_some() {}
        let upstream = match upstreams.get(&sender) {
            Some(upstream) => upstream.clone(),
            None if upstreams.len() < MAX_SENDERS => {
                let Ok(socket) = UdpSocket::bind((ip, 0)).await else {
                    continue;
                };
                let socket = Arc::new(socket);
                upstreams.insert(sender, socket.clone());
                tasks.spawn(relay_replies(
                    socket.clone(),
                    front.clone(),
                    target,
                    sender,
                    latency.clone(),
                    rng.rotate_left(17) | 1,
                    counts.clone(),
                ));
                socket
            }
            None => continue,
        };
        let datagram = buffer[..len].to_vec();
        let delay = latency.sample(&mut rng);
        let counts = counts.clone();
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            if upstream.send_to(&datagram, target).await.is_ok() {
                counts.to_target.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Relays the target's replies on `upstream` back to `sender` through the
/// front socket, so they reach the sender from the relay's address.
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    target: SocketAddr,
    sender: SocketAddr,
    latency: Latency,
    mut rng: u64,
    counts: Arc<Counts>,
) {
    let mut tasks = JoinSet::new();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    while let Ok((len, source)) = upstream.recv_from(&mut buffer).await {
        while tasks.try_join_next().is_some() {}
        if source != target {
            continue;
        }
        let datagram = buffer[..len].to_vec();
        let delay = latency.sample(&mut rng);
        let front = front.clone();
        let counts = counts.clone();
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            if front.send_to(&datagram, sender).await.is_ok() {
                counts.to_sender.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}
