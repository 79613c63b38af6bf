//! One WebSocket connection: the join handshake, the catch-up replay, then the live loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::mpsc;

use crate::envelope::{Frame, NodeId, Reason};

use super::queue;
use super::room::Command;
use super::{close_code, Relay};

/// Consecutive undecodable frames after which a connection is closed.
const MAX_MALFORMED: u32 = 16;

struct Gauge(Arc<Relay>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.metrics.connections.fetch_sub(1, Relaxed);
    }
}

async fn send(socket: &mut WebSocket, relay: &Relay, bytes: Bytes) -> bool {
    relay
        .metrics
        .bytes_out
        .fetch_add(bytes.len() as u64, Relaxed);
    socket.send(Message::Binary(bytes)).await.is_ok()
}

/// Sends `first` and up to 63 more queued frames, then flushes once.
async fn send_batch(
    socket: &mut WebSocket,
    relay: &Relay,
    first: Bytes,
    queue: &mut queue::Receiver,
) -> bool {
    let mut next = Some(first);
    let mut sent = 0;
    while let Some(bytes) = next.take() {
        relay
            .metrics
            .bytes_out
            .fetch_add(bytes.len() as u64, Relaxed);
        if socket.feed(Message::Binary(bytes)).await.is_err() {
            return false;
        }
        sent += 1;
        if sent < 64 {
            next = queue.try_recv();
        }
    }
    socket.flush().await.is_ok()
}

/// Closes with `code` and `reason`, in its own allocation: the close handshake is rare, and
/// inline it would enlarge every connection's task for its whole life.
fn close(
    mut socket: WebSocket,
    code: u16,
    reason: &str,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    tracing::debug!(code, reason, "closing a connection");
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    Box::pin(async move {
        let _ = socket.send(Message::Close(Some(frame))).await;
        // Let the client's close reply arrive so the close handshake completes.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    })
}

/// Closes as [`close`] does, for the handshake, whose result is then "no connection".
async fn refuse<T>(socket: WebSocket, code: u16, reason: &str) -> Option<T> {
    close(socket, code, reason).await;
    None
}

fn reject(step: u64, reason: Reason, detail: String) -> Bytes {
    Bytes::from(
        Frame::Reject {
            step,
            reason,
            detail,
        }
        .encode(),
    )
}

/// A token bucket: `rate` messages a second, bursts of `rate`.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(crate) async fn run(socket: WebSocket, relay: Arc<Relay>) {
    relay.metrics.connections.fetch_add(1, Relaxed);
    let _gauge = Gauge(relay.clone());
    // The handshake's state (the join timeout, the room's answer, the catch-up read) lives in
    // its own allocation, freed once the connection is live: an idle member's task holds only
    // what the live loop needs.
    let Some((socket, live)) = Box::pin(handshake(socket, &relay)).await else {
        return;
    };
    live_loop(socket, relay, live).await
}

/// What the live loop needs from the handshake.
struct Live {
    node: NodeId,
    commands: mpsc::Sender<Command>,
    leave: LeaveOnDrop,
    queue: queue::Receiver,
}

/// The join, the welcome and the catch-up replay; `None` if the connection ended.
async fn handshake(mut socket: WebSocket, relay: &Arc<Relay>) -> Option<(WebSocket, Live)> {
    let conn = relay.next_conn.fetch_add(1, Relaxed);
    let limits = relay.config.limits;

    // 1. The join.
    let first = tokio::time::timeout(relay.config.join_timeout, socket.recv()).await;
    let bytes = match first {
        Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return None,
        Ok(Some(Ok(_))) => {
            return refuse(
                socket,
                close_code::POLICY,
                "the first message must be a binary join frame",
            )
            .await
        }
        Err(_) => {
            return refuse(
                socket,
                close_code::POLICY,
                "no join frame within the join timeout",
            )
            .await
        }
    };
    relay
        .metrics
        .bytes_in
        .fetch_add(bytes.len() as u64, Relaxed);
    let (room, name, since, resume, requested) = match Frame::decode_with(&bytes, &limits) {
        Ok(Frame::Join {
            room,
            name,
            since,
            resume,
            config,
        }) => (room, name, since, resume, config),
        Ok(other) => {
            let reason = format!("the first frame must be a join, not {:?}", other.kind());
            return refuse(socket, close_code::POLICY, &reason).await;
        }
        Err(e) => {
            relay.metrics.reject(e.reason());
            // A close reason is at most 123 bytes.
            let mut reason = format!("the join frame is invalid: {e}");
            reason.truncate(120);
            return refuse(socket, close_code::POLICY, &reason).await;
        }
    };
    let (commands, joined) = match relay.join(&room, name, resume, requested, conn).await {
        Ok(joined) => joined,
        Err(refused) => return refuse(socket, refused.code, &refused.reason).await,
    };
    let node = joined.node;
    let leave = LeaveOnDrop {
        commands: commands.clone(),
        node,
        conn,
    };
    tracing::debug!(%room, node, since, "joined");
    if let Some(registered) = joined.registered {
        if !matches!(registered.await, Ok(Ok(()))) {
            return refuse(
                socket,
                close_code::INTERNAL,
                "the relay could not register the node",
            )
            .await;
        }
    }

    // 2. Welcome, catch-up, live.
    let welcome = Frame::Welcome {
        node,
        resume: joined.token,
        config: joined.config,
        high: joined.high,
        peers: joined.peers,
    };
    if !send(&mut socket, relay, Bytes::from(welcome.encode())).await {
        return None;
    }
    if since < joined.position {
        let log = match relay.store.read_after(&room, since, joined.position).await {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(%room, error = %e, "catch-up read failed");
                return refuse(
                    socket,
                    close_code::INTERNAL,
                    "the relay could not read the room log",
                )
                .await;
            }
        };
        // Queue the whole catch-up without a flush per frame; the caught-up frame below
        // flushes it in as few writes as the socket takes.
        for entry in log.into_iter().filter(|entry| entry.sender != node) {
            relay
                .metrics
                .bytes_out
                .fetch_add(entry.bytes.len() as u64, Relaxed);
            if socket.feed(Message::Binary(entry.bytes)).await.is_err() {
                return None;
            }
        }
    }
    let caught_up = Frame::CaughtUp {
        high: joined.high,
        position: joined.position,
    };
    if !send(&mut socket, relay, Bytes::from(caught_up.encode())).await {
        return None;
    }

    Some((
        socket,
        Live {
            node,
            commands,
            leave,
            queue: joined.queue,
        },
    ))
}

async fn live_loop(mut socket: WebSocket, relay: Arc<Relay>, live: Live) {
    let Live {
        node,
        commands,
        leave,
        mut queue,
    } = live;
    let limits = relay.config.limits;
    let mut shutdown = relay.shutdown.clone();
    let mut rate = RateLimit::new(relay.config.max_rate);
    let mut malformed = 0u32;
    let mut over_rate = 0u32;
    loop {
        tokio::select! {
            _ = stopping(&mut shutdown) => {
                drop(leave);
                return close(socket, close_code::GOING_AWAY, "the relay is shutting down").await;
            }
            outgoing = queue.recv() => match outgoing {
                Some(bytes) => {
                    // Write what is queued in one go: one flush (one system call) for many frames.
                    if !send_batch(&mut socket, &relay, bytes, &mut queue).await {
                        return;
                    }
                }
                None => {
                    let (code, reason) = queue
                        .close_reason()
                        .unwrap_or((close_code::INTERNAL, "the room closed".into()));
                    drop(leave);
                    return close(socket, code, &reason).await;
                }
            },
            incoming = socket.recv() => {
                let bytes = match incoming {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Text(_))) => {
                        malformed += 1;
                        let detail = "text messages are not part of the protocol: send binary frames".into();
                        relay.metrics.reject(Reason::Malformed);
                        if !send(&mut socket, &relay, reject(0, Reason::Malformed, detail)).await {
                            return;
                        }
                        if malformed >= MAX_MALFORMED {
                            return close(socket, close_code::POLICY, "too many malformed frames").await;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                relay.metrics.bytes_in.fetch_add(bytes.len() as u64, Relaxed);
                if !rate.allow() {
                    over_rate += 1;
                    relay.metrics.reject(Reason::RateLimited);
                    let detail = format!("over {} messages per second; this frame was dropped", relay.config.max_rate);
                    if !send(&mut socket, &relay, reject(0, Reason::RateLimited, detail)).await {
                        return;
                    }
                    if over_rate > relay.config.max_rate {
                        return close(socket, close_code::RATE_LIMITED, "kept sending over the rate limit").await;
                    }
                    continue;
                }
                over_rate = 0;
                match Frame::decode_with(&bytes, &limits) {
                    Ok(frame) => {
                        malformed = 0;
                        if commands.send(Command::Frame { node, frame, bytes }).await.is_err() {
                            return close(socket, close_code::INTERNAL, "the room stopped; reconnect to resume").await;
                        }
                    }
                    Err(e) => {
                        malformed += 1;
                        relay.metrics.reject(e.reason());
                        let step = crate::envelope::peek_stamp(&bytes).map_or(0, |(_, s)| s.step);
                        if !send(&mut socket, &relay, reject(step, e.reason(), e.to_string())).await {
                            return;
                        }
                        if malformed >= MAX_MALFORMED {
                            return close(socket, close_code::POLICY, "too many malformed frames").await;
                        }
                    }
                }
            }
        }
    }
}

/// Completes when the relay starts shutting down.
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Tells the room that the connection left, however the connection ends.
struct LeaveOnDrop {
    commands: mpsc::Sender<Command>,
    node: NodeId,
    conn: u64,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        let leave = Command::Leave {
            node: self.node,
            conn: self.conn,
        };
        if let Err(mpsc::error::TrySendError::Full(leave)) = self.commands.try_send(leave) {
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(leave).await;
            });
        }
    }
}
