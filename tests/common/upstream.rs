//! A real upstream WebSocket server for gateway tests, on 127.0.0.1:0, that
//! records each connection's request (path, query, headers) and every frame
//! it receives.
//!
//! Text frames steer it: `close:<code>:<reason>` makes it close with that
//! code, `ping:<payload>` makes it send a ping; other text and binary frames
//! are echoed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// The five events an agent-style app sends right after the connection opens.
pub const FIVE_EVENTS: [&str; 5] = [
    r#"{"seq":1,"type":"started"}"#,
    r#"{"seq":2,"type":"thinking"}"#,
    r#"{"seq":3,"type":"tool_running","tool":"search"}"#,
    r#"{"seq":4,"type":"tool_done","tool":"search"}"#,
    r#"{"seq":5,"type":"completed"}"#,
];

/// What the upstream does on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Echo, and obey the `close:` and `ping:` commands.
    Echo,
    /// Send [`FIVE_EVENTS`] at once, then echo.
    FiveEvents,
    /// Send up to `frames` binary frames of `size` bytes as fast as the
    /// connection takes them, stopping early when one send has waited a
    /// second (the gateway pushes back). Gives up after 30 s in all.
    Flood { frames: usize, size: usize },
}

/// What one upstream connection received.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub messages: Vec<Message>,
    /// Frames sent by [`Behavior::Flood`].
    pub flood_sent: usize,
    /// Whether a flood stopped because a send waited a second.
    pub flood_blocked: bool,
}

/// A running upstream.
pub struct Upstream {
    pub addr: std::net::SocketAddr,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream that picks `accept_protocol` when the client
    /// offers it.
    pub async fn start(behavior: Behavior, accept_protocol: Option<&'static str>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let connections = connections.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let recorded = Arc::new(Mutex::new(Recorded::default()));
                    connections.lock().expect("lock").push(recorded.clone());
                    tokio::spawn(serve(stream, recorded, behavior, accept_protocol));
                }
            })
        };
        Upstream {
            addr,
            connections,
            task,
        }
    }

    /// Returns the `--upstream` URL of this server with `path`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Returns the connections accepted so far.
    pub fn connections(&self) -> Vec<Recorded> {
        self.connections
            .lock()
            .expect("lock")
            .iter()
            .map(|recorded| recorded.lock().expect("lock").clone())
            .collect()
    }

    /// Waits up to 10 s for connection `index` to satisfy `condition`.
    pub async fn wait_for(&self, index: usize, condition: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(recorded) = self.connections().get(index) {
                if condition(recorded) {
                    return recorded.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "upstream connection {index} did not reach the condition in 10 s: {:?}",
                self.connections().get(index).map(|r| &r.messages)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// tungstenite's handshake callback must return its large error type.
#[allow(clippy::result_large_err)]
async fn serve(
    stream: TcpStream,
    recorded: Arc<Mutex<Recorded>>,
    behavior: Behavior,
    accept_protocol: Option<&'static str>,
) {
    let record_request = |request: &Request, mut response: Response| {
        let mut entry = recorded.lock().expect("lock");
        entry.path = request.uri().path().to_owned();
        entry.query = request.uri().query().map(str::to_owned);
        entry.headers = request.headers().clone();
        let offered: Vec<String> = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(',').map(|p| p.trim().to_owned()))
            .collect();
        if let Some(protocol) = accept_protocol.filter(|p| offered.iter().any(|o| o == p)) {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                protocol.parse().expect("header value"),
            );
        }
        Ok(response)
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, record_request).await else {
        return;
    };

    match behavior {
        Behavior::Echo => {}
        Behavior::FiveEvents => {
            for event in FIVE_EVENTS {
                if socket.send(Message::text(event)).await.is_err() {
                    return;
                }
            }
        }
        Behavior::Flood { frames, size } => {
            let started = Instant::now();
            let payload = vec![7u8; size];
            for _ in 0..frames {
                if started.elapsed() > Duration::from_secs(30) {
                    break;
                }
                let send = socket.send(Message::binary(payload.clone()));
                match tokio::time::timeout(Duration::from_secs(1), send).await {
                    Ok(Ok(())) => recorded.lock().expect("lock").flood_sent += 1,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        // The frame stays queued in tungstenite and goes out
                        // once the peer reads again, so it counts as sent.
                        {
                            let mut entry = recorded.lock().expect("lock");
                            entry.flood_sent += 1;
                            entry.flood_blocked = true;
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(30), socket.flush()).await;
                        break;
                    }
                }
            }
        }
    }

    while let Some(Ok(message)) = socket.next().await {
        recorded
            .lock()
            .expect("lock")
            .messages
            .push(message.clone());
        let reply = match &message {
            Message::Text(text) => command(text.as_str()),
            Message::Binary(data) => Some(Message::Binary(data.clone())),
            _ => None,
        };
        if let Some(reply) = reply {
            if socket.send(reply).await.is_err() {
                return;
            }
        }
    }
}

fn command(text: &str) -> Option<Message> {
    if let Some(rest) = text.strip_prefix("close:") {
        let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
        let code: u16 = code.parse().expect("close code");
        return Some(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        })));
    }
    if let Some(payload) = text.strip_prefix("ping:") {
        return Some(Message::Ping(payload.as_bytes().to_vec().into()));
    }
    Some(Message::text(text))
}
