//! Relays frames between an authenticated client and its upstream.
//!
//! Each direction is one loop that reads a frame and waits until the other
//! side has taken it before reading the next. A peer that reads slowly thus
//! stops the reads from the other peer, and TCP flow control pushes back on
//! that peer: a connection holds at most one message per direction (bounded
//! by `--max-message-size`) plus tungstenite's buffers, whatever the peers
//! send.
//!
//! Frames go across unchanged, close frames with their code and reason.
//! NOTE: tungstenite answers every ping with a pong itself and has no
//! setting to stop that, so a ping that crosses the gateway is answered twice:
//! once by wsticket and once by the other peer. RFC 6455 allows unsolicited
//! pongs, so clients accept this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// Payload of the server's keepalive pings. The client's pongs with this
/// payload are neither relayed nor counted as activity.
pub const KEEPALIVE_PAYLOAD: &[u8] = b"wsticket-keepalive";
/// How long a closing connection waits for each peer's close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Close code sent to the client when its token expires.
pub const TOKEN_EXPIRED_CODE: u16 = 4401;

/// What ends a connection, besides the peers themselves.
pub struct Limits {
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    /// Time left until the token expires, when the connection closes then.
    pub token_expiry: Option<Duration>,
    pub shutdown: CancellationToken,
}

/// How a connection ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    pub reason: &'static str,
    /// The close code the client was sent or sent, when there was one.
    pub code: Option<u16>,
}

/// Why the relay stopped.
enum Ending {
    ClientClosed(Option<CloseFrame>),
    UpstreamClosed(Option<CloseFrame>),
    /// The client's socket ended or failed; `too_big` when its message
    /// exceeded `--max-message-size`.
    ClientFailed {
        too_big: bool,
    },
    UpstreamFailed {
        too_big: bool,
    },
    Idle,
    TokenExpired,
    Shutdown,
}

/// Time of the last frame from either peer, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> tokio::time::Instant {
        let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        tokio::time::Instant::from_std(last + idle_timeout)
    }
}

/// Relays between `client` and `upstream` until either closes, a limit is
/// reached or the server shuts down, then closes both.
pub async fn relay<C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    limits: &Limits,
) -> Closed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut upstream_tx, mut upstream_rx) = upstream.split();
    let activity = Activity::new();

    let ending = {
        let upward = client_to_upstream(&mut client_rx, &mut upstream_tx, &activity);
        let downward = upstream_to_client(
            &mut upstream_rx,
            &mut client_tx,
            &activity,
            limits.ping_interval,
        );
        tokio::select! {
            ending = upward => ending,
            ending = downward => ending,
            () = wait_idle(&activity, limits.idle_timeout) => Ending::Idle,
            () = wait_expiry(limits.token_expiry) => Ending::TokenExpired,
            () = limits.shutdown.cancelled() => Ending::Shutdown,
        }
    };

    let client_side = Side {
        tx: &mut client_tx,
        rx: &mut client_rx,
    };
    let upstream_side = Side {
        tx: &mut upstream_tx,
        rx: &mut upstream_rx,
    };
    match ending {
        Ending::ClientClosed(frame) => {
            // The close went upstream as it came; both sides now only need
            // their closing handshake finished.
            tokio::join!(client_side.finish(None), upstream_side.finish(None));
            Closed {
                reason: "client_closed",
                code: frame.map(|frame| u16::from(frame.code)),
            }
        }
        Ending::UpstreamClosed(frame) => {
            tokio::join!(client_side.finish(None), upstream_side.finish(None));
            Closed {
                reason: "upstream_closed",
                code: frame.map(|frame| u16::from(frame.code)),
            }
        }
        Ending::ClientFailed { too_big } => {
            let client_frame = too_big.then(|| close_frame(CloseCode::Size, "message too big"));
            let upstream_frame = close_frame(CloseCode::Away, "client disconnected");
            tokio::join!(
                client_side.finish(client_frame),
                upstream_side.finish(Some(upstream_frame))
            );
            Closed {
                reason: if too_big {
                    "client_message_too_big"
                } else {
                    "client_disconnected"
                },
                code: too_big.then_some(1009),
            }
        }
        Ending::UpstreamFailed { too_big } => {
            let upstream_frame = too_big.then(|| close_frame(CloseCode::Size, "message too big"));
            let client_frame = close_frame(CloseCode::Error, "upstream disconnected");
            tokio::join!(
                client_side.finish(Some(client_frame)),
                upstream_side.finish(upstream_frame)
            );
            Closed {
                reason: if too_big {
                    "upstream_message_too_big"
                } else {
                    "upstream_disconnected"
                },
                code: Some(1011),
            }
        }
        Ending::Idle => {
            tokio::join!(
                client_side.finish(Some(close_frame(CloseCode::Normal, "idle_timeout"))),
                upstream_side.finish(Some(close_frame(CloseCode::Away, "idle_timeout")))
            );
            Closed {
                reason: "idle_timeout",
                code: Some(1000),
            }
        }
        Ending::TokenExpired => {
            let code = CloseCode::from(TOKEN_EXPIRED_CODE);
            tokio::join!(
                client_side.finish(Some(close_frame(code, "token_expired"))),
                upstream_side.finish(Some(close_frame(CloseCode::Away, "token_expired")))
            );
            Closed {
                reason: "token_expired",
                code: Some(TOKEN_EXPIRED_CODE),
            }
        }
        Ending::Shutdown => {
            tokio::join!(
                client_side.finish(Some(close_frame(CloseCode::Away, "server shutting down"))),
                upstream_side.finish(Some(close_frame(CloseCode::Away, "server shutting down")))
            );
            Closed {
                reason: "server_shutdown",
                code: Some(1001),
            }
        }
    }
}

/// Forwards client frames upstream until the client closes or fails.
async fn client_to_upstream<C, U>(
    from: &mut SplitStream<WebSocketStream<C>>,
    to: &mut SplitSink<WebSocketStream<U>, Message>,
    activity: &Activity,
) -> Ending
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = match from.next().await {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "reading from the client failed");
                return Ending::ClientFailed {
                    too_big: is_too_big(&err),
                };
            }
            None => return Ending::ClientFailed { too_big: false },
        };
        if matches!(&message, Message::Pong(payload) if payload.as_ref() == KEEPALIVE_PAYLOAD) {
            continue;
        }
        activity.touch();
        let close = match &message {
            Message::Close(frame) => Some(frame.clone()),
            _ => None,
        };
        if let Err(err) = to.send(message).await {
            tracing::debug!(error = %err, "writing to the upstream failed");
            return Ending::UpstreamFailed { too_big: false };
        }
        if let Some(frame) = close {
            return Ending::ClientClosed(frame);
        }
    }
}

/// Forwards upstream frames to the client until the upstream closes or
/// fails, and sends the server's keepalive pings to the client in between.
async fn upstream_to_client<U, C>(
    from: &mut SplitStream<WebSocketStream<U>>,
    to: &mut SplitSink<WebSocketStream<C>, Message>,
    activity: &Activity,
    ping_interval: Duration,
) -> Ending
where
    U: AsyncRead + AsyncWrite + Unpin,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut keepalive = tokio::time::interval(ping_interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.tick().await;
    loop {
        let next = tokio::select! {
            next = from.next() => next,
            _ = keepalive.tick() => {
                let ping = Message::Ping(KEEPALIVE_PAYLOAD.to_vec().into());
                if to.send(ping).await.is_err() {
                    return Ending::ClientFailed { too_big: false };
                }
                continue;
            }
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "reading from the upstream failed");
                return Ending::UpstreamFailed {
                    too_big: is_too_big(&err),
                };
            }
            None => return Ending::UpstreamFailed { too_big: false },
        };
        activity.touch();
        let close = match &message {
            Message::Close(frame) => Some(frame.clone()),
            _ => None,
        };
        if let Err(err) = to.send(message).await {
            tracing::debug!(error = %err, "writing to the client failed");
            return Ending::ClientFailed { too_big: false };
        }
        if let Some(frame) = close {
            return Ending::UpstreamClosed(frame);
        }
    }
}

/// Resolves once no frame has arrived for `idle_timeout`.
async fn wait_idle(activity: &Activity, idle_timeout: Duration) {
    loop {
        let deadline = activity.idle_deadline(idle_timeout);
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Resolves when the token expires; never without a token expiry.
pub async fn wait_expiry(left: Option<Duration>) {
    match left {
        Some(left) => tokio::time::sleep(left).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn is_too_big(err: &WsError) -> bool {
    matches!(err, WsError::Capacity(CapacityError::MessageTooLong { .. }))
}

fn close_frame(code: CloseCode, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

/// The two halves of one peer's socket.
struct Side<'a, S> {
    tx: &'a mut SplitSink<WebSocketStream<S>, Message>,
    rx: &'a mut SplitStream<WebSocketStream<S>>,
}

impl<S> Side<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Sends `frame`, when given, then reads until the peer's close frame
    /// or the end of the socket, for at most [`CLOSE_TIMEOUT`]. Reading also
    /// flushes the close reply tungstenite queued for a received close.
    async fn finish(self, frame: Option<CloseFrame>) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if let Some(frame) = frame {
                if self.tx.send(Message::Close(Some(frame))).await.is_err() {
                    return;
                }
            }
            while let Some(Ok(_)) = self.rx.next().await {}
        })
        .await;
    }
}
