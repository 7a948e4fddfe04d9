//! An authenticated WebSocket connection after the `101`.
//!
//! With `--upstream`, frames are relayed to the upstream application
//! ([`crate::gateway::relay`]). Without it the server sends one text frame
//! saying who is authenticated, then echoes every text and binary frame, for
//! development. Either way the server sends its own keepalive pings (warp and
//! hyper have none), closes an idle connection after `--idle-timeout`, with
//! `--close-on-token-expiry` closes with 4401 when the JWT expires, and on
//! shutdown closes with 1001.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::app::AppState;
use crate::clock::format_rfc3339;
use crate::gateway::limits::SubjectSlot;
use crate::gateway::relay::{self, Closed, Limits, CLOSE_TIMEOUT, TOKEN_EXPIRED_CODE};
use crate::gateway::upstream::UpstreamSocket;
use crate::http::ApiError;
use crate::store::TicketRecord;

/// Read buffer of each connection. tungstenite's default is 128 KiB, which
/// dominates the memory of an idle connection; frames larger than this are
/// still read, in several steps.
const READ_BUFFER_BYTES: usize = 4 * 1024;

pub fn websocket_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// One authenticated connection, ready to run once the upgrade completes.
pub struct Connection {
    pub state: Arc<AppState>,
    pub record: TicketRecord,
    pub ticket_id: String,
    pub request_id: String,
    /// Id of this connection in the audit log and the connection's log lines.
    pub connection_id: String,
    /// The open upstream connection; `None` to echo.
    pub upstream: Option<UpstreamSocket>,
    /// Held while the connection is open, for `--max-connections-per-subject`.
    pub subject_slot: SubjectSlot,
}

impl Connection {
    pub async fn run(mut self, on_upgrade: OnUpgrade) {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::warn!(event = "connection_failed", ticket_id = %self.ticket_id, request_id = %self.request_id, connection_id = %self.connection_id, error = %err, "WebSocket upgrade did not complete");
                if let Some(mut upstream) = self.upstream.take() {
                    close_gracefully(&mut upstream, CloseCode::Away, "client disconnected").await;
                }
                return;
            }
        };
        let config = websocket_config(self.state.config.max_message_size);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;

        let metrics = self.state.metrics.clone();
        metrics.open_connections.inc();
        let opened = Instant::now();
        let via = if self.upstream.is_some() {
            "upstream"
        } else {
            "echo"
        };
        tracing::info!(event = "connection_opened", ticket_id = %self.ticket_id, subject = %self.record.subject, request_id = %self.request_id, connection_id = %self.connection_id, via, "WebSocket opened");
        let limits = self.limits();
        let closed = match self.upstream.take() {
            Some(upstream) => relay::relay(socket, upstream, &limits).await,
            None => self.echo(socket, &limits).await,
        };
        metrics.open_connections.dec();
        tracing::info!(
            event = "connection_closed",
            ticket_id = %self.ticket_id,
            subject = %self.record.subject,
            request_id = %self.request_id,
            connection_id = %self.connection_id,
            reason = closed.reason,
            close_code = closed.code,
            duration_ms = opened.elapsed().as_millis() as u64,
            "WebSocket closed"
        );
    }

    fn limits(&self) -> Limits {
        let settings = &self.state.config.gateway;
        let token_expiry = settings.close_on_token_expiry.then(|| {
            let expires_ms = self.record.token_expires_at.saturating_mul(1000);
            Duration::from_millis(expires_ms.saturating_sub(self.state.clock.now_ms()))
        });
        Limits {
            idle_timeout: settings.idle_timeout,
            ping_interval: self.state.config.ping_interval,
            token_expiry,
            shutdown: self.state.shutdown.clone(),
        }
    }

    async fn echo<S>(&self, mut socket: WebSocketStream<S>, limits: &Limits) -> Closed
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let closed = |reason, code| Closed { reason, code };
        let greeting = serde_json::json!({
            "type": "authenticated",
            "subject": self.record.subject,
            "session": self.record.session,
            "expires_at": format_rfc3339(self.record.token_expires_at.saturating_mul(1000)),
        });
        if socket
            .send(Message::text(greeting.to_string()))
            .await
            .is_err()
        {
            return closed("send_failed", None);
        }

        let mut keepalive = tokio::time::interval(limits.ping_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        let idle = tokio::time::sleep(limits.idle_timeout);
        tokio::pin!(idle);
        let expiry = relay::wait_expiry(limits.token_expiry);
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                frame = socket.next() => {
                    if !matches!(&frame, Some(Ok(Message::Pong(payload))) if payload.as_ref() == relay::KEEPALIVE_PAYLOAD) {
                        idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                    }
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            if socket.send(Message::Text(text)).await.is_err() {
                                return closed("send_failed", None);
                            }
                        }
                        Some(Ok(Message::Binary(data))) => {
                            if socket.send(Message::Binary(data)).await.is_err() {
                                return closed("send_failed", None);
                            }
                        }
                        // tungstenite queues the pong itself and the close reply.
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Ok(Message::Close(frame))) => {
                            let _ = socket.flush().await;
                            return closed("client_closed", frame.map(|frame| u16::from(frame.code)));
                        }
                        Some(Err(err)) if relay::is_too_big(&err) => {
                            close_gracefully(&mut socket, CloseCode::Size, "message too big").await;
                            return closed("message_too_big", Some(1009));
                        }
                        Some(Err(err)) => {
                            tracing::debug!(error = %err, "WebSocket read failed");
                            return closed("protocol_error", None);
                        }
                        None => return closed("disconnected", None),
                    }
                }
                _ = keepalive.tick() => {
                    let ping = Message::Ping(relay::KEEPALIVE_PAYLOAD.to_vec().into());
                    if socket.send(ping).await.is_err() {
                        return closed("send_failed", None);
                    }
                }
                () = &mut idle => {
                    close_gracefully(&mut socket, CloseCode::Normal, "idle_timeout").await;
                    return closed("idle_timeout", Some(1000));
                }
                () = &mut expiry => {
                    close_gracefully(&mut socket, CloseCode::from(TOKEN_EXPIRED_CODE), "token_expired").await;
                    return closed("token_expired", Some(TOKEN_EXPIRED_CODE));
                }
                _ = limits.shutdown.cancelled() => {
                    close_gracefully(&mut socket, CloseCode::Away, "server shutting down").await;
                    return closed("server_shutdown", Some(1001));
                }
            }
        }
    }
}

/// Completes a rejected upgrade of `--reject-with close`: sends a close
/// frame with `error`'s close code and JSON reason, and waits briefly for
/// the client's reply.
pub async fn close_rejected(on_upgrade: OnUpgrade, error: ApiError, max_message_size: usize) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let config = websocket_config(max_message_size);
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let reason = error.close_reason();
    close_gracefully(&mut socket, CloseCode::from(error.close_code()), &reason).await;
}

/// Sends a close frame and waits for the peer's reply, both within
/// [`CLOSE_TIMEOUT`], so a peer that stopped reading cannot hold the task.
pub async fn close_gracefully<S>(socket: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if socket.close(Some(frame)).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}
