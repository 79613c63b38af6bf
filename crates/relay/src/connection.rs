//! One WebSocket connection: the join, the catch-up streamed from the store, then the live loop.
//!
//! The connection decides nothing about the protocol: it reads the join, asks the room to admit
//! it, sends what the room gives (the welcome, the log after the client's position, the
//! caught-up frame), then hands every binary message to the room and writes what the room
//! queues for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures_util::SinkExt;
use pattern_mesh_core::room::{Access, ConnId, JoinRequest, Read, Reader};
use pattern_mesh_core::wire::{close, part, Frame, Positioned, Reason};
use tokio::sync::mpsc;

use super::auth::{Denied, Grant};
use super::guard::{Address, HeldTooMuch, Over, Peer};
use super::offences::Offender;
use super::queue;
use super::room::{Admitted, Command};
use super::{enter_user_room, Relay, UserRoom};

/// Consecutive text messages after which a connection is closed (binary frames are the room's
/// to count).
const MAX_TEXT: u32 = 16;

/// The catch-up reads the log in pages of about this many bytes, and writes each page before it
/// reads the next: a joiner that does not read holds at most a page.
const CATCH_UP_PAGE: usize = 256 * 1024;

struct Gauge(Arc<Relay>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.metrics.connections.fetch_sub(1, Relaxed);
    }
}

/// The longest one write may wait for the socket: a peer that reads nothing for this long is
/// let go, during its catch-up as in the live loop.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// While the connection's task writes it does not read, and the room hears nothing from the
/// member, not even its heartbeats (a long catch-up; a large batch on a slow link). A write the
/// peer had to drain first shows it is alive (one to a dead peer stalls instead, for
/// [`WRITE_STALL`]): the room hears that, at most this often.
const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A write that took at least this long waited for the peer to read.
const WAITED: std::time::Duration = std::time::Duration::from_millis(500);

/// Tells the room that `conn` is alive, if it was not told in the last [`ALIVE_EVERY`]; never
/// waits for the room.
fn alive(commands: &mpsc::Sender<Command>, conn: ConnId, told: &mut std::time::Instant) {
    if told.elapsed() >= ALIVE_EVERY {
        *told = std::time::Instant::now();
        let _ = commands.try_send(Command::Frame {
            conn,
            read: Read::Alive,
        });
    }
}

/// Whether `write` completed within [`WRITE_STALL`].
async fn within_stall<E>(write: impl Future<Output = Result<(), E>>) -> bool {
    matches!(tokio::time::timeout(WRITE_STALL, write).await, Ok(Ok(())))
}

async fn send(socket: &mut WebSocket, relay: &Relay, bytes: Bytes) -> bool {
    relay
        .metrics
        .bytes_out
        .fetch_add(bytes.len() as u64, Relaxed);
    within_stall(socket.send(Message::Binary(bytes))).await
}

/// Queues `bytes` on the socket without flushing.
async fn feed(socket: &mut WebSocket, relay: &Relay, bytes: Bytes) -> bool {
    relay
        .metrics
        .bytes_out
        .fetch_add(bytes.len() as u64, Relaxed);
    within_stall(socket.feed(Message::Binary(bytes))).await
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
        if !feed(socket, relay, bytes).await {
            return false;
        }
        sent += 1;
        if sent < 64 {
            next = queue.try_recv();
        }
    }
    within_stall(socket.flush()).await
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
        reason: close::truncate_reason(reason).into(),
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

/// Runs a connection; `grant` is the check of its access token, when the relay checks tokens.
pub(crate) async fn run(
    socket: WebSocket,
    relay: Arc<Relay>,
    peer: Peer,
    grant: Option<Result<Grant, Denied>>,
) {
    relay.metrics.connections.fetch_add(1, Relaxed);
    let _gauge = Gauge(relay.clone());
    // The handshake's state (the join timeout, the room's answer, the catch-up read) lives in
    // its own allocation, freed once the connection is live: an idle member's task holds only
    // what the live loop needs.
    let Some((socket, live)) = Box::pin(handshake(socket, &relay, &peer, grant)).await else {
        return;
    };
    tracing::debug!(addr = %peer.addr, "member connected");
    live_loop(socket, relay, live, peer).await
}

/// Ends a connection whose read failed. A frame over the size limit is answered with 1009 and
/// a reason; after any other error there is no socket left to close.
async fn read_failed(socket: WebSocket, relay: &Relay, error: axum::Error) {
    let error = error.into_inner();
    let failed = error.downcast_ref::<tungstenite::Error>();
    let too_big = matches!(failed, Some(tungstenite::Error::Capacity(_)));
    tracing::debug!(%error, "read failed");
    let held = match failed {
        Some(tungstenite::Error::Io(io)) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<HeldTooMuch>()),
        _ => None,
    };
    if let Some(HeldTooMuch(reason)) = held {
        relay.metrics.reject(Reason::RateLimited);
        close(socket, close::TRY_AGAIN_LATER, reason).await;
    } else if too_big {
        relay.metrics.reject(Reason::TooLarge);
        let reason = format!(
            "a frame over {} bytes: send larger messages in parts",
            relay.config.limits.max_frame
        );
        close(socket, close::TOO_BIG, &reason).await;
    }
}

/// What the live loop needs from the handshake.
struct Live {
    conn: ConnId,
    commands: mpsc::Sender<Command>,
    leave: LeaveOnDrop,
    queue: queue::Receiver,
    /// When the access token expires: the connection is closed then.
    expires: Option<tokio::time::Instant>,
    /// This connection, counted among its user's rooms.
    _user_room: Option<UserRoom>,
}

/// The join, the welcome and the catch-up; `None` if the connection ended.
async fn handshake(
    mut socket: WebSocket,
    relay: &Arc<Relay>,
    peer: &Peer,
    grant: Option<Result<Grant, Denied>>,
) -> Option<(WebSocket, Live)> {
    let conn = relay.next_conn.fetch_add(1, Relaxed);
    let limits = relay.config.limits;

    // A token refused at the upgrade (none, forged, expired) opens no room: said at once, so
    // that a connection with no valid token holds no slot while its join is awaited.
    if let Some(Err(denied)) = &grant {
        relay.metrics.refused_tokens.fetch_add(1, Relaxed);
        return refuse(socket, denied.code, &denied.reason).await;
    }

    // 1. The join.
    let first = tokio::time::timeout(relay.config.join_timeout, socket.recv()).await;
    let bytes = match first {
        Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return None,
        Ok(Some(Err(e))) => {
            read_failed(socket, relay, e).await;
            return None;
        }
        Ok(Some(Ok(_))) => {
            return refuse(
                socket,
                close::POLICY,
                "the first message must be a binary join frame",
            )
            .await
        }
        Err(_) => {
            return refuse(
                socket,
                close::POLICY,
                "no join frame within the join timeout",
            )
            .await
        }
    };
    relay
        .metrics
        .bytes_in
        .fetch_add(bytes.len() as u64, Relaxed);
    let (room, mut request, requested) = match Frame::decode_with(&bytes, &limits) {
        Ok(Frame::Join {
            room,
            name,
            since,
            log,
            resume,
            config,
            floor,
        }) => (
            room,
            JoinRequest {
                name,
                since,
                log,
                resume,
                stored: None,
                access: Access::OPEN,
                floor,
                released: None,
            },
            config,
        ),
        Ok(other) => {
            let reason = format!("the first frame must be a join, not {}", other.kind());
            return refuse(socket, close::POLICY, &reason).await;
        }
        Err(e) => {
            relay.metrics.reject(e.reason());
            let reason = format!("the join frame is invalid: {e}");
            return refuse(socket, close::POLICY, &reason).await;
        }
    };
    // The access token, checked at the upgrade: now that the room is known, does it open it?
    let mut expires = None;
    let mut user = None;
    if let Some(grant) = grant {
        let admitted = grant.and_then(|grant| grant.admits(&room).map(|()| grant));
        match admitted {
            // Checked at the upgrade, it may have expired while the join was on its way.
            Ok(grant) if grant.remaining().is_zero() => {
                relay.metrics.refused_tokens.fetch_add(1, Relaxed);
                return refuse(socket, close::TOKEN_EXPIRED, "the access token expired").await;
            }
            Ok(grant) => {
                tracing::debug!(%room, user = %grant.user, write = grant.access.write, "token accepted");
                if let Some(name) = grant.name.clone() {
                    // At most the bytes a name may have (every welcome lists it, and no client
                    // decodes a longer one), cut between two characters.
                    request.name = cut_name(name, relay.config.limits.max_name);
                }
                request.access = grant.access;
                expires = Some(tokio::time::Instant::now() + grant.remaining());
                user = Some(grant.user);
            }
            Err(denied) => {
                relay.metrics.refused_tokens.fetch_add(1, Relaxed);
                return refuse(socket, denied.code, &denied.reason).await;
            }
        }
    }
    // One user's connections are in a bounded number of rooms: a token for every room under a
    // prefix could otherwise hold every room the relay opens.
    let user_room = match user
        .map(|user| enter_user_room(relay, &user, &room))
        .transpose()
    {
        Ok(counted) => counted,
        Err(held) => {
            let reason = format!(
                "this access token's user is in {held} rooms on this relay, the most one user may be; leave one first"
            );
            return refuse(socket, close::TRY_AGAIN_LATER, &reason).await;
        }
    };
    // A member that stopped this room twice lately is kept out of it for a while.
    let offender = Offender::of(request.access.user, peer.key());
    let barred = relay
        .offences
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .barred(&room, offender, relay.now_ms());
    if let Some(reason) = barred {
        relay.metrics.barred_joins.fetch_add(1, Relaxed);
        // Not final (as 1008 is to a client): the members behind the offender's address,
        // without tokens, try again, and get in once the bar is over.
        return refuse(socket, close::TRY_AGAIN_LATER, &reason).await;
    }
    // A room that is not open costs its opening to the address: each stays open a while after
    // its last member left, and one address could otherwise fill the relay's rooms for all.
    let opens = !relay.is_open(&room);
    if opens && !peer.take_open(relay.now_ms()) {
        let reason = format!(
            "this address opened {} rooms in the last minute; try again later",
            relay.config.ip_room_opens
        );
        return refuse(socket, close::TRY_AGAIN_LATER, &reason).await;
    }
    let since = request.since;
    let (commands, admitted) = match relay.join(&room, request, requested, conn, offender).await {
        Ok(joined) => joined,
        Err(refused) => {
            // A join refused before its room opened (no writer opened it yet, the relay is
            // full) opened nothing: its client tries again, and must not spend the address's
            // openings meanwhile.
            if opens && !relay.is_open(&room) {
                peer.give_back_open(relay.now_ms());
            }
            return refuse(socket, refused.code, &refused.reason).await;
        }
    };
    let Admitted { mut joined, queue } = admitted;
    // A member now: the deadline the listener set at the accept no longer applies (a long
    // catch-up is bounded by the write stall instead).
    peer.joined();
    let node = joined.node;
    let leave = LeaveOnDrop {
        commands: commands.clone(),
        conn,
    };
    tracing::debug!(%room, node, since, "joined");

    // 2. The welcome, the presences of the members present, the log after `since` page by
    //    page (the node's own messages only in a catch-up from the start: see
    //    `Joined::replays`), and the caught-up frame; the live traffic waits in the queue
    //    meanwhile.
    // Larger than a frame (many members, long names, a small `--max-frame`), the welcome goes in
    // parts, as any message does: whole, a client that knew the frame limit from an earlier
    // welcome could not read it, and joined again and again.
    for frame in part::fragment(&joined.welcome, relay.config.limits.max_frame) {
        if !send(&mut socket, relay, Bytes::from(frame)).await {
            return None;
        }
    }
    for presence in std::mem::take(&mut joined.presences) {
        if !send(&mut socket, relay, presence).await {
            return None;
        }
    }
    let mut after = joined.from;
    let mut told = std::time::Instant::now();
    while after < joined.until {
        // A long catch-up does not outlast the token.
        if expires.is_some_and(|at| tokio::time::Instant::now() >= at) {
            return refuse(socket, close::TOKEN_EXPIRED, "the access token expired").await;
        }
        let page = match relay
            .store
            .read_after(&room, after, joined.until, CATCH_UP_PAGE)
            .await
        {
            Ok(page) if !page.is_empty() => page,
            Ok(_) => break,
            Err(e) => {
                tracing::error!(%room, error = %e, "catch-up read failed");
                return refuse(
                    socket,
                    close::INTERNAL,
                    "the relay could not read the room log",
                )
                .await;
            }
        };
        for logged in page {
            after = logged.position;
            if !joined.replays(&logged) {
                continue;
            }
            if logged.bytes.len() <= limits.max_frame {
                if !feed(&mut socket, relay, logged.bytes).await {
                    return None;
                }
                continue;
            }
            for piece in part::fragment(&logged.bytes, limits.max_frame) {
                if !feed(&mut socket, relay, Bytes::from(piece)).await {
                    return None;
                }
            }
        }
        if !within_stall(socket.flush()).await {
            return None;
        }
        // Nothing is read until the catch-up is out: each page it took counts.
        alive(&commands, conn, &mut told);
    }
    // Read to the end: a snapshot stored from now on drops nothing this connection still
    // reads. (A full queue leaves it listed, and it gets the next snapshot, which is harmless.)
    let _ = commands.try_send(Command::CaughtUp { conn });
    if !send(&mut socket, relay, joined.caught_up).await {
        return None;
    }

    Some((
        socket,
        Live {
            conn,
            commands,
            leave,
            queue,
            expires,
            _user_room: user_room,
        },
    ))
}

fn reject(reason: Reason, detail: &str) -> Bytes {
    Bytes::from(
        Frame::Reject {
            step: 0,
            reason,
            detail: detail.into(),
        }
        .encode(),
    )
}

async fn live_loop(mut socket: WebSocket, relay: Arc<Relay>, live: Live, peer: Peer) {
    let Live {
        conn,
        commands,
        leave,
        mut queue,
        expires,
        // Counted for as long as the connection lives.
        _user_room,
    } = live;
    let deadline = expires;
    let expiry = async move {
        match expires {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let mut shutdown = relay.shutdown.clone();
    let mut texts = 0u32;
    // Parts are put together and frames decoded here, in the connection's own task: the room's
    // task, which every frame of the room passes through, only decides.
    let mut reader = Partial {
        reader: Reader::new(relay.config.limits),
        counted: 0,
        relay: relay.clone(),
        address: peer.address(),
    };
    let mut told = std::time::Instant::now();
    // Frames over the address's budgets in the current second, and when it began.
    let mut over = (0u64, 0u64);
    let expired = "the access token expired; reconnect with a fresh one";
    loop {
        // The select below picks among ready branches at random: past the deadline, frames
        // already read or queued could still win it.
        if deadline.is_some_and(|at| tokio::time::Instant::now() >= at) {
            drop(leave);
            return close(socket, close::TOKEN_EXPIRED, expired).await;
        }
        tokio::select! {
            _ = stopping(&mut shutdown) => {
                drop(leave);
                return close(socket, close::GOING_AWAY, "the relay is shutting down").await;
            }
            () = &mut expiry => {
                drop(leave);
                return close(socket, close::TOKEN_EXPIRED, expired).await;
            }
            outgoing = queue.recv() => match outgoing {
                Some(bytes) => {
                    // Write what is queued in one go: one flush (one system call) for many frames.
                    let started = std::time::Instant::now();
                    if !send_batch(&mut socket, &relay, bytes, &mut queue).await {
                        return;
                    }
                    if started.elapsed() >= WAITED {
                        alive(&commands, conn, &mut told);
                    }
                }
                None => {
                    let (code, reason) = queue
                        .close_reason()
                        .unwrap_or((close::INTERNAL, "the room closed".into()));
                    drop(leave);
                    return close(socket, code, &reason).await;
                }
            },
            incoming = socket.recv() => {
                if let Some(Ok(_)) = incoming {
                    peer.framed();
                }
                let bytes = match incoming {
                    Some(Ok(Message::Binary(bytes))) => bytes,
                    Some(Ok(Message::Text(_))) => {
                        texts += 1;
                        relay.metrics.reject(Reason::Malformed);
                        let detail = "text messages are not part of the protocol: send binary frames";
                        if !send(&mut socket, &relay, reject(Reason::Malformed, detail)).await {
                            return;
                        }
                        if texts >= MAX_TEXT {
                            return close(socket, close::POLICY, "too many malformed frames").await;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Err(e)) => return read_failed(socket, &relay, e).await,
                    Some(Ok(_)) => continue,
                };
                texts = 0;
                relay.metrics.bytes_in.fetch_add(bytes.len() as u64, Relaxed);
                let size = bytes.len() as u64;
                let read = match reader.read(bytes) {
                    // The address's budgets, shared by all its connections, count every frame
                    // as it comes, a part too (one abandoned would cost nothing otherwise): a
                    // part over them is refused with the rest of its message.
                    // (The parts of a message refused already are counted and dropped in silence:
                    // one refusal per message.)
                    Read::Pending => match peer.take(Some(size), relay.now_ms()) {
                        Err(over) if reader.reader.assembling() => Read::Throttled {
                            step: reader.abandon(),
                            detail: over_address(&relay, over),
                        },
                        // A part of a large message: the room only hears that the member is
                        // alive.
                        _ => Read::Pending,
                    },
                    // A fence over the budgets goes to the room all the same: one that ends a
                    // gap must never be what keeps a refused message from being sent again
                    // (the room refuses any other). A heartbeat over them is heard and not
                    // answered: refused, it would open a gap. (The parts before a message's
                    // last were counted as they came.)
                    Read::Frame {
                        frame:
                            Positioned {
                                frame: Frame::Fence { step },
                                ..
                            },
                        ..
                    } if peer.take(None, relay.now_ms()).is_err() => Read::ThrottledFence {
                        step,
                        detail: over_address(&relay, Over::Frames),
                    },
                    Read::Frame { frame, bytes, cost }
                        if !matches!(frame.frame, Frame::Fence { .. }) =>
                    {
                        // A heartbeat costs a frame, never bytes: another connection of the
                        // address sending large messages must not leave it unanswered.
                        let bytes_cost = (frame.frame != Frame::Heartbeat).then_some(size);
                        match peer.take(bytes_cost, relay.now_ms()) {
                            Ok(()) => Read::Frame { frame, bytes, cost },
                            Err(Over::Frames) if frame.frame == Frame::Heartbeat => {
                                over.1 += 1;
                                Read::Alive
                            }
                            Err(over) => Read::Throttled {
                                step: frame.frame.stamp().map_or(0, |s| s.step),
                                detail: over_address(&relay, over),
                            },
                        }
                    }
                    // Bytes that are not a frame cost what any frame does.
                    Read::Refused {
                        step,
                        reason,
                        detail,
                    } => match peer.take(Some(size), relay.now_ms()) {
                        Ok(()) => Read::Refused {
                            step,
                            reason,
                            detail,
                        },
                        Err(over) => Read::Throttled {
                            step,
                            detail: over_address(&relay, over),
                        },
                    },
                    read => read,
                };
                if matches!(read, Read::Throttled { .. } | Read::ThrottledFence { .. }) {
                    over.1 += 1;
                }
                // Whatever the room makes of them, a connection that keeps sending over its
                // address's budgets (heartbeats, which are never answered over them, say) is
                // closed: twice the address's rate in one second.
                let now = relay.now_ms();
                if now.saturating_sub(over.0) >= 1_000 {
                    over = (now, 0);
                } else if over.1 > 2 * relay.config.ip_rate {
                    drop(leave);
                    let reason = "kept sending over its address's rate limit";
                    return close(socket, close::RATE_LIMITED, reason).await;
                }
                if commands.send(Command::Frame { conn, read }).await.is_err() {
                    return close(socket, close::INTERNAL, "the room stopped; reconnect to resume").await;
                }
            }
        }
    }
}

/// A connection's reader, with what it holds for a message whose parts are still arriving
/// counted in the relay's total (`--max-partial-bytes`), which bounds what all connections
/// together hold (each may hold a message of the message limit, and a member may start one and
/// never end it), and in its address's, which may hold a quarter of that: one address cannot
/// take it all from the others. What it holds is given back when it is dropped.
struct Partial {
    reader: Reader,
    /// The bytes counted in the totals for this reader.
    counted: usize,
    relay: Arc<Relay>,
    address: Arc<Address>,
}

impl Partial {
    fn read(&mut self, bytes: Bytes) -> Read {
        let read = self.reader.read(bytes);
        let held = self.reader.held();
        if held <= self.counted {
            self.count(held);
            return read;
        }
        // Only a message in progress grows: `read` is `Pending`.
        let grown = (held - self.counted) as u64;
        self.counted = held;
        let (max, per_address) = (self.relay.max_partial(), self.relay.max_partial_per_ip());
        // With the frames still arriving (see `guard::Unframed`).
        let total = self.relay.metrics.partial_bytes.fetch_add(grown, Relaxed)
            + grown
            + self.relay.metrics.unframed_bytes.load(Relaxed);
        let address = self.address.partial.fetch_add(grown, Relaxed)
            + grown
            + self.address.unframed.load(Relaxed);
        let over = if total > max {
            format!("the relay holds {max} bytes of large messages still arriving, its most")
        } else if address > per_address {
            format!(
                "this address holds {per_address} bytes of large messages still arriving, its most (a quarter of the relay's)"
            )
        } else {
            return read;
        };
        Read::Throttled {
            step: self.abandon(),
            detail: format!("{over}; this message was not stored: send it again later"),
        }
    }

    /// Drops the message in progress and the rest of its parts; returns its step.
    fn abandon(&mut self) -> u64 {
        let step = self.reader.abandon();
        self.count(0);
        step
    }

    /// Counts `held` bytes for this reader from now on.
    fn count(&mut self, held: usize) {
        if held < self.counted {
            let freed = (self.counted - held) as u64;
            self.relay.metrics.partial_bytes.fetch_sub(freed, Relaxed);
            self.address.partial.fetch_sub(freed, Relaxed);
        }
        self.counted = held;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.count(0);
    }
}

/// What a member hears of a frame over its address's budgets.
fn over_address(relay: &Relay, over: Over) -> String {
    match over {
        Over::Bytes => format!(
            "over {} bytes per second from this address; this message was not stored: send it again later",
            relay.config.ip_bandwidth
        ),
        Over::Frames => format!(
            "over {} frames per second from this address; this message was not stored: send it again later",
            relay.config.ip_rate
        ),
    }
}

/// `name`, cut to at most `max` bytes between two characters.
fn cut_name(mut name: String, max: usize) -> String {
    if name.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| name.is_char_boundary(i))
            .unwrap_or(0);
        name.truncate(end);
    }
    name
}

/// Completes when the relay starts shutting down.
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Tells the room that the connection left, however the connection ends.
struct LeaveOnDrop {
    commands: mpsc::Sender<Command>,
    conn: ConnId,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        let leave = Command::Leave { conn: self.conn };
        if let Err(mpsc::error::TrySendError::Full(leave)) = self.commands.try_send(leave) {
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(leave).await;
            });
        }
    }
}
