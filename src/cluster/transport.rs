//! chitchat's gossip over UDP, encrypted and authenticated with the cluster
//! secret.
//!
//! chitchat 0.13 has no authentication of its own, and its envelope
//! (de)serialisation is private to the crate, so this transport cannot seal
//! chitchat's bytes directly. Instead it keeps chitchat's own UDP socket on an
//! ephemeral loopback port as a codec. An outgoing envelope is sent to a local
//! pipe socket and read back as bytes. Those are sealed with
//! ChaCha20-Poly1305 and sent to the peer from the public gossip socket. An
//! incoming datagram is opened (datagrams that fail to open are dropped and
//! counted), passed to the codec socket through the pipe, and returned with
//! the real sender's address.
//!
//! A datagram is `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)` with a
//! random nonce. chitchat fills its messages up to the largest UDP payload,
//! which leaves no room for the nonce and the tag, so a message that would
//! not fit is sent as two halves. The plaintext starts with a frame byte:
//! `WHOLE`, or `FIRST_HALF` / `SECOND_HALF` followed by an 8-byte
//! message id. A half whose other half is lost is dropped, as a lost datagram
//! would be. A node without the secret can neither read gossip nor inject
//! any. A captured datagram can be replayed, which chitchat tolerates because
//! its state updates carry versions and an old version changes nothing.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpTransport};
use chitchat::ChitchatEnvelope;
use prometheus::IntCounter;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// Bytes that sealing adds: the nonce and the tag.
const SEAL_OVERHEAD: usize = NONCE_LEN + 16;
/// Frame bytes of the plaintext.
const WHOLE: u8 = 0;
const FIRST_HALF: u8 = 1;
const SECOND_HALF: u8 = 2;
/// Senders whose first half is kept while its second half is awaited.
const MAX_PENDING_HALVES: usize = 64;
/// How long the codec socket may take to hand a datagram through the pipe.
/// Both ends are on loopback, so this is only hit when a datagram is lost.
const PIPE_TIMEOUT: Duration = Duration::from_millis(200);

/// A [`Transport`] whose sockets seal every datagram with the gossip key.
pub struct SealedTransport {
    key: [u8; 32],
    rejected: IntCounter,
}

impl SealedTransport {
    /// `rejected` counts datagrams dropped because they do not open.
    pub fn new(key: [u8; 32], rejected: IntCounter) -> Self {
        SealedTransport { key, rejected }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = UdpSocket::bind(listen_addr).await?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let codec = UdpTransport.open(loopback).await?;
        let pipe = UdpSocket::bind(loopback).await?;
        let codec_addr = codec.local_addr()?;
        let pipe_addr = pipe.local_addr()?;
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &self.key).expect("the key has 32 bytes"),
        );
        Ok(Box::new(SealedSocket {
            public,
            codec,
            codec_addr,
            pipe,
            pipe_addr,
            key,
            rng: SystemRandom::new(),
            rejected: self.rejected.clone(),
            buffer: vec![0u8; MAX_DATAGRAM],
            pending_from: None,
            first_halves: HashMap::new(),
            next_message_id: 0,
        }))
    }
}

struct SealedSocket {
    public: UdpSocket,
    codec: Box<dyn Socket>,
    codec_addr: SocketAddr,
    pipe: UdpSocket,
    pipe_addr: SocketAddr,
    key: LessSafeKey,
    rng: SystemRandom,
    rejected: IntCounter,
    buffer: Vec<u8>,
    /// Sender of a datagram already handed to the codec socket but not yet
    /// returned, because the `recv` that handed it over was cancelled.
    pending_from: Option<SocketAddr>,
    /// First halves by sender, with their message id.
    first_halves: HashMap<SocketAddr, (u64, Vec<u8>)>,
    next_message_id: u64,
}

impl SealedSocket {
    fn seal(&self, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no system randomness for a gossip nonce"))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut sealed[NONCE_LEN..],
            )
            .map_err(|_| anyhow::anyhow!("sealing a gossip datagram failed"))?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(sealed)
    }
}

/// Returns the plaintext of a sealed datagram, or `None` if it does not open
/// with the key.
fn open<'a>(key: &LessSafeKey, datagram: &'a mut [u8]) -> Option<&'a [u8]> {
    if datagram.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, sealed) = datagram.split_at_mut(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let plain = key.open_in_place(nonce, Aad::empty(), sealed).ok()?;
    Some(plain)
}

/// Returns the whole message once a frame completes one, or `None` while
/// a second half is awaited or for a malformed frame.
fn reassemble(
    first_halves: &mut HashMap<SocketAddr, (u64, Vec<u8>)>,
    from_addr: SocketAddr,
    frame: Vec<u8>,
) -> Option<Vec<u8>> {
    let (&kind, rest) = frame.split_first()?;
    if kind == WHOLE {
        return Some(rest.to_vec());
    }
    if rest.len() < 8 {
        return None;
    }
    let (id, half) = rest.split_at(8);
    let id = u64::from_be_bytes(id.try_into().expect("split at 8 bytes"));
    match kind {
        FIRST_HALF => {
            if first_halves.len() >= MAX_PENDING_HALVES {
                first_halves.clear();
            }
            first_halves.insert(from_addr, (id, half.to_vec()));
            None
        }
        SECOND_HALF => {
            let (first_id, first) = first_halves.remove(&from_addr)?;
            (first_id == id).then(|| [first.as_slice(), half].concat())
        }
        _ => None,
    }
}

impl SealedSocket {
    /// Waits for the codec socket to decode what the pipe handed it.
    async fn decoded(&mut self, from_addr: SocketAddr) -> anyhow::Result<Option<RecvOutcome>> {
        match tokio::time::timeout(PIPE_TIMEOUT, self.codec.recv()).await {
            Ok(outcome) => {
                self.pending_from = None;
                let mut outcome = outcome?;
                outcome.from_addr = from_addr;
                Ok(Some(outcome))
            }
            Err(_) => {
                self.pending_from = None;
                Ok(None)
            }
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.public.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let mut plain = vec![0u8; MAX_DATAGRAM];
        // A `send` cancelled after the codec wrote would leave its datagram
        // in the pipe, to be sealed for the wrong peer by the next one.
        while self.pipe.try_recv_from(&mut plain).is_ok() {}
        self.codec.send(self.pipe_addr, envelope).await?;
        let read = loop {
            let received = tokio::time::timeout(PIPE_TIMEOUT, self.pipe.recv_from(&mut plain))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the gossip codec socket did not hand over a datagram")
                })??;
            if received.1 == self.codec_addr {
                break received.0;
            }
        };
        let message = &plain[..read];
        let frames: Vec<Vec<u8>> = if 1 + message.len() + SEAL_OVERHEAD <= MAX_DATAGRAM {
            vec![[&[WHOLE][..], message].concat()]
        } else {
            self.next_message_id = self.next_message_id.wrapping_add(1);
            let id = self.next_message_id.to_be_bytes();
            let (first, second) = message.split_at(message.len() / 2);
            vec![
                [&[FIRST_HALF][..], &id, first].concat(),
                [&[SECOND_HALF][..], &id, second].concat(),
            ]
        };
        let mut num_bytes_sent = 0;
        for frame in frames {
            let sealed = self.seal(&frame)?;
            match self.public.send_to(&sealed, to).await {
                Ok(sent) => num_bytes_sent += sent,
                // A peer that is down or unreachable is the failure
                // detector's business, not a broken transport.
                Err(err) => {
                    tracing::debug!(peer = %to, error = %err, "sending gossip failed");
                    break;
                }
            }
        }
        Ok(SendOutcome { num_bytes_sent })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            if let Some(from_addr) = self.pending_from {
                if let Some(outcome) = self.decoded(from_addr).await? {
                    return Ok(outcome);
                }
            }
            // The buffer stays in `self`, because chitchat cancels `recv`
            // between gossip rounds.
            let received = self.public.recv_from(&mut self.buffer).await;
            let (read, from_addr) = match received {
                Ok(received) => received,
                // Linux reports an ICMP "port unreachable" from an earlier
                // send to a stopped peer on the next receive.
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    tracing::debug!(error = %err, "receiving gossip failed");
                    continue;
                }
                Err(err) => {
                    return Err(anyhow::Error::new(err).context("receiving gossip failed"));
                }
            };
            let opened = open(&self.key, &mut self.buffer[..read]).map(<[u8]>::to_vec);
            let Some(frame) = opened else {
                self.rejected.inc();
                tracing::debug!(peer = %from_addr, bytes = read, "dropped a gossip datagram that does not open with the cluster key");
                continue;
            };
            let Some(message) = reassemble(&mut self.first_halves, from_addr, frame) else {
                continue;
            };
            self.pipe.send_to(&message, self.codec_addr).await?;
            self.pending_from = Some(from_addr);
            if let Some(outcome) = self.decoded(from_addr).await? {
                return Ok(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::{ChitchatMessage, ProtocolVersion};

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    async fn open_socket(key: [u8; 32], rejected: &IntCounter) -> Box<dyn Socket> {
        SealedTransport::new(key, rejected.clone())
            .open(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("open a gossip socket")
    }

    #[tokio::test]
    async fn sealed_message_arrives_with_sender_address() {
        let rejected = IntCounter::new("rejected", "test").expect("counter");
        let mut sender = open_socket([7; 32], &rejected).await;
        let mut receiver = open_socket([7; 32], &rejected).await;
        let to = receiver.local_addr().expect("address");
        sender.send(to, bad_cluster()).await.expect("send");
        let received = receiver.recv().await.expect("receive");
        assert_eq!(received.envelope, bad_cluster());
        assert_eq!(received.from_addr, sender.local_addr().expect("address"));
        assert_eq!(rejected.get(), 0);
    }

    #[tokio::test]
    async fn datagrams_without_key_are_dropped() {
        let rejected = IntCounter::new("rejected", "test").expect("counter");
        let mut intruder = open_socket([1; 32], &rejected).await;
        let mut member = open_socket([2; 32], &rejected).await;
        let mut receiver = open_socket([2; 32], &rejected).await;
        let to = receiver.local_addr().expect("address");
        intruder.send(to, bad_cluster()).await.expect("send");
        let raw = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        raw.send_to(b"plain chitchat bytes", to)
            .await
            .expect("send raw");
        member.send(to, bad_cluster()).await.expect("send");

        let received = receiver.recv().await.expect("receive");
        assert_eq!(received.from_addr, member.local_addr().expect("address"));
        assert_eq!(rejected.get(), 2);
    }

    #[test]
    fn halves_reassemble_in_order_only() {
        let from = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let mut halves = HashMap::new();
        let frame =
            |kind: u8, id: u64, data: &[u8]| [&[kind][..], &id.to_be_bytes(), data].concat();

        assert_eq!(reassemble(&mut halves, from, vec![WHOLE, 9]), Some(vec![9]));
        assert_eq!(
            reassemble(&mut halves, from, frame(FIRST_HALF, 5, b"ab")),
            None
        );
        assert_eq!(
            reassemble(&mut halves, from, frame(SECOND_HALF, 5, b"cd")),
            Some(b"abcd".to_vec())
        );
        assert_eq!(
            reassemble(&mut halves, from, frame(SECOND_HALF, 5, b"cd")),
            None
        );
        assert_eq!(
            reassemble(&mut halves, from, frame(FIRST_HALF, 6, b"ab")),
            None
        );
        assert_eq!(
            reassemble(&mut halves, from, frame(SECOND_HALF, 7, b"cd")),
            None
        );
        assert_eq!(reassemble(&mut halves, from, vec![FIRST_HALF, 1]), None);
        assert_eq!(reassemble(&mut halves, from, vec![9, 1, 2]), None);
    }
}
