//! An authenticated WebSocket connection after the `101`.
//!
//! The server first sends one text frame saying who is authenticated, then
//! echoes every text and binary frame. It sends its own keepalive pings
//! (warp and hyper have none), and on shutdown it closes with 1001.

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
use crate::store::TicketRecord;

/// Read buffer of each connection. tungstenite's default is 128 KiB, which
/// dominates the memory of an idle connection; frames larger than this are
/// still read, in several steps.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// How long a closing connection waits for the client's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

impl Connection {
    pub async fn run(self, on_upgrade: OnUpgrade) {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::warn!(event = "connection_failed", ticket_id = %self.ticket_id, request_id = %self.request_id, error = %err, "WebSocket upgrade did not complete");
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
        tracing::info!(event = "connection_opened", ticket_id = %self.ticket_id, subject = %self.record.subject, request_id = %self.request_id, "WebSocket opened");
        let close_reason = self.echo(socket).await;
        metrics.open_connections.dec();
        tracing::info!(
            event = "connection_closed",
            ticket_id = %self.ticket_id,
            subject = %self.record.subject,
            request_id = %self.request_id,
            reason = close_reason,
            duration_ms = opened.elapsed().as_millis() as u64,
            "WebSocket closed"
        );
    }

    async fn echo<S>(&self, mut socket: WebSocketStream<S>) -> &'static str
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
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
            return "send_failed";
        }

        let mut keepalive = tokio::time::interval(self.state.config.ping_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.tick().await;
        let shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if socket.send(Message::Text(text)).await.is_err() {
                            return "send_failed";
                        }
                    }
                    Some(Ok(Message::Binary(data))) => {
                        if socket.send(Message::Binary(data)).await.is_err() {
                            return "send_failed";
                        }
                    }
                    // tungstenite queues the pong itself and the close reply.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_))) => {
                        let _ = socket.flush().await;
                        return "client_closed";
                    }
                    Some(Err(err)) => {
                        tracing::debug!(error = %err, "WebSocket read failed");
                        return "protocol_error";
                    }
                    None => return "disconnected",
                },
                _ = keepalive.tick() => {
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return "send_failed";
                    }
                }
                _ = shutdown.cancelled() => {
                    close_gracefully(&mut socket, CloseCode::Away, "server shutting down").await;
                    return "server_shutdown";
                }
            }
        }
    }
}

/// Sends a close frame and waits briefly for the peer's reply.
pub async fn close_gracefully<S>(socket: &mut WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    if socket.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}
