//! chitchat's gossip over UDP, encrypted and authenticated with the cluster
//! secret.
//!
//! chitchat 0.13 has no authentication of its own, and its envelope
//! (de)serialisation is private to the crate, so this transport cannot seal
//! chitchat's bytes directly. Instead it keeps chitchat's own UDP socket on an
//! ephemeral loopback port as a codec. An outgoing envelope is sent to a local
//! pipe socket and read back as bytes. Those are sealed with
//! ChaCha20-Poly1305 and sent to the peer from the public gossip socket. An incoming datagram is opened
//! (datagrams that fail to open are dropped and counted), passed to the codec
//! socket through the pipe, and returned with the real sender's address.
//!
//! A datagram is `nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)` with a
//! random nonce. A node without the secret can neither read gossip nor inject
//! any. A captured datagram can be replayed, which chitchat tolerates because
//! its state updates carry versions and an old version changes nothing.

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
        let sealed = self.seal(&plain[..read])?;
        match self.public.send_to(&sealed, to).await {
            Ok(num_bytes_sent) => Ok(SendOutcome { num_bytes_sent }),
            // A peer that is down or unreachable is the failure detector's
            // business, not a broken transport.
            Err(err) => {
                tracing::debug!(peer = %to, error = %err, "sending gossip failed");
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
        }
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
            let Some(plain) = opened else {
                self.rejected.inc();
                tracing::debug!(peer = %from_addr, bytes = read, "dropped a gossip datagram that does not open with the cluster key");
                continue;
            };
            self.pipe.send_to(&plain, self.codec_addr).await?;
            self.pending_from = Some(from_addr);
            if let Some(outcome) = self.decoded(from_addr).await? {
                return Ok(outcome);
            }
        }
    }
}
