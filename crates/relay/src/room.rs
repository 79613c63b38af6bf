//! One room: a task that drives the core's [`RoomCore`].
//!
//! Every frame of the room passes through this one task, in order. The task hands the core its
//! inputs (joins, frames, leaves, the store's answers and the time) and carries out its outputs:
//! frames go into the members' bounded queues (a member whose queue is full is let go, it never
//! slows the room), appends go to the store, many in flight at once so that the store can commit
//! them in one batch, and `FuturesOrdered` hands their answers back in the order they were made.
//!
//! A join whose resume token the room does not hold waits for the store's record of it, looked
//! up beside the room's other work; then it takes what the relay kept when the room let that
//! node go ([`Releases`]). The task times each frame the core takes: an update that
//! took longer than the relay's apply budget is taken back before anything of it leaves.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use pattern_mesh_core::room::{
    ConnId, JoinRefused, JoinRequest, Joined, Output, Read, Release, RoomCore,
};
use pattern_mesh_core::store::{Appended, NodeRecord, StoreError, StoreFuture};
use pattern_mesh_core::validate::Counters;
use pattern_mesh_core::wire::{close, NodeId, Reason, ResumeToken};
use tokio::sync::{mpsc, oneshot};

use super::offences::Offender;
use super::queue;
use super::store::redis::{BusMark, FeedEvent};
use super::Relay;

/// The nodes the rooms let go ([`Output::Released`]), with their last steps, for as long as the
/// relay runs: at most `capacity`, the oldest forgotten first (a node forgotten here is welcomed
/// back without a floor, as after a restart).
pub(crate) struct Releases {
    by_token: HashMap<(String, ResumeToken), (u64, Release)>,
    order: VecDeque<(u64, String, ResumeToken)>,
    next: u64,
    capacity: usize,
}

impl Releases {
    /// Keeps at most `capacity` releases.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            by_token: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity,
        }
    }

    fn keep(&mut self, room: &str, release: Release) {
        let key = (room.to_owned(), release.token);
        self.next += 1;
        self.by_token.insert(key, (self.next, release));
        self.order
            .push_back((self.next, room.to_owned(), release.token));
        while self.by_token.len() > self.capacity || self.order.len() > 2 * self.capacity.max(1) {
            let Some((seq, room, token)) = self.order.pop_front() else {
                break;
            };
            let key = (room, token);
            if self
                .by_token
                .get(&key)
                .is_some_and(|(kept, _)| *kept == seq)
            {
                self.by_token.remove(&key);
            }
        }
    }

    /// The release of `token` in `room`, if it is `user`'s: another user's join with the token
    /// leaves it for its own user.
    fn take(&mut self, room: &str, token: ResumeToken, user: u64) -> Option<Release> {
        let key = (room.to_owned(), token);
        match self.by_token.get(&key) {
            Some((_, release)) if release.user == user => {
                self.by_token.remove(&key).map(|(_, release)| release)
            }
            _ => None,
        }
    }
}

/// What a connection asks of its room.
pub(crate) enum Command {
    Join {
        conn: ConnId,
        request: JoinRequest,
        /// Who a stop by this member counts against.
        offender: Offender,
        reply: oneshot::Sender<Result<Admitted, JoinRefused>>,
    },
    Frame {
        conn: ConnId,
        read: Read,
    },
    /// The connection has read its catch-up to the end.
    CaughtUp {
        conn: ConnId,
    },
    Leave {
        conn: ConnId,
    },
}

/// A member admitted: what its connection sends first, and its queue for the rest.
pub(crate) struct Admitted {
    pub joined: Joined,
    pub queue: queue::Receiver,
}

/// A join waiting for the store's record of its resume token.
struct Lookup {
    conn: ConnId,
    request: JoinRequest,
    offender: Offender,
    reply: oneshot::Sender<Result<Admitted, JoinRefused>>,
}

type LookupFuture =
    Pin<Box<dyn Future<Output = (Lookup, Result<Option<NodeRecord>, StoreError>)> + Send>>;

struct RoomTask {
    core: RoomCore,
    relay: Arc<Relay>,
    queues: HashMap<ConnId, queue::Sender>,
    appends: FuturesOrdered<StoreFuture<Appended>>,
    reservations: FuturesUnordered<StoreFuture<NodeId>>,
    lookups: FuturesUnordered<LookupFuture>,
    counted: Counters,
    /// Connections whose queue was full, and whether the bound reached was in bytes.
    slow: Vec<(ConnId, bool)>,
    /// Who a stop by each node the room holds counts against, until the room lets it go.
    offenders: HashMap<NodeId, Offender>,
    /// The size of `offenders` at which the nodes the room let go are dropped from it (a
    /// shared room's nodes, and those that stored nothing, go without [`Output::Released`]).
    offenders_pruned_at: usize,
}

/// Runs a room; `bus` is where the other relays' publications for a shared room stand, with
/// the relays it has members on.
pub(crate) async fn run(
    core: RoomCore,
    relay: Arc<Relay>,
    mut commands: mpsc::Receiver<Command>,
    bus: Option<(BusMark, Vec<u64>)>,
) {
    let name = core.name().to_owned();
    // A room whose log other relays share hears its log back, its own appends included, and
    // what the other relays publish for it.
    let mut feed = match (&relay.feed, bus) {
        (Some(feed), Some((bus, relays))) => {
            Some(feed.watch(&name, core.log(), core.published(), bus, &relays))
        }
        _ => None,
    };
    let mut task = RoomTask {
        counted: core.counters().clone(),
        core,
        relay,
        queues: HashMap::new(),
        appends: FuturesOrdered::new(),
        reservations: FuturesUnordered::new(),
        lookups: FuturesUnordered::new(),
        slow: Vec::new(),
        offenders: HashMap::new(),
        offenders_pruned_at: 64,
    };
    // The relay stopping: the room lets its nodes go, and retires once its writes are done.
    let mut shutdown = task.relay.shutdown.clone();
    let mut closing = false;
    loop {
        let deadline = task
            .core
            .next_deadline()
            .map(|at| task.relay.instant_at(at));
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => task.handle(command),
                None => break,
            },
            _ = shutdown.wait_for(|stop| *stop), if !closing => {
                closing = true;
                task.core.close_down(task.relay.now_ms());
            }
            Some(result) = task.appends.next(), if !task.appends.is_empty() => {
                task.core.appended(result);
            }
            Some(result) = task.reservations.next(), if !task.reservations.is_empty() => {
                if let Err(error) = &result {
                    tracing::error!(room = %name, %error, "node ids could not be reserved");
                }
                task.core.reserved(result);
            }
            Some((lookup, result)) = task.lookups.next(), if !task.lookups.is_empty() => {
                let stored = result.unwrap_or_else(|error| {
                    // The node comes back under a new id; its client sends again what it had
                    // not seen acknowledged.
                    tracing::error!(room = %name, %error, "a node's record could not be read");
                    None
                });
                task.admit(lookup, stored);
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                task.core.tick(task.relay.now_ms());
            }
            Some(event) = next_event(&mut feed), if feed.is_some() => {
                let now = task.relay.now_ms();
                match event {
                    FeedEvent::Read {
                        logged,
                        relayed,
                        bus_complete,
                    } => task.core.followed(now, &logged, &relayed, bus_complete),
                    FeedEvent::Gone(relay) => task.core.relay_gone(relay),
                    FeedEvent::Lost(error) => task.core.publication_lost(&error),
                    FeedEvent::Lapsed => task.core.announce_members(),
                    FeedEvent::Missed(members) => {
                        tracing::warn!(
                            room = %name,
                            "this relay read the room's bus too late: entries had gone from it; \
                             the other relays' members are read again"
                        );
                        task.relay.metrics.bus_missed.fetch_add(1, Relaxed);
                        task.core.resync_remote(members.members);
                        task.core.remote_presences(members.presences);
                    }
                }
            }
        }
        task.drain();
        if task.core.is_idle()
            && task.appends.is_empty()
            && task.reservations.is_empty()
            && task.lookups.is_empty()
            && task.relay.retire(&name, &commands)
        {
            break;
        }
    }
    if let (Some(relay_feed), Some((id, _))) = (&task.relay.feed, &feed) {
        relay_feed.unwatch(&name, *id);
    }
    for (_, queue) in task.queues.drain() {
        queue.set_close(close::INTERNAL, "the room stopped; reconnect to resume");
    }
    tracing::debug!(room = %name, "room closed");
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

async fn next_event(feed: &mut Option<(u64, mpsc::Receiver<FeedEvent>)>) -> Option<FeedEvent> {
    match feed {
        Some((_, events)) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

impl RoomTask {
    fn handle(&mut self, command: Command) {
        let now = self.relay.now_ms();
        match command {
            Command::Join {
                conn,
                request,
                offender,
                reply,
            } => {
                let lookup = Lookup {
                    conn,
                    request,
                    offender,
                    reply,
                };
                match lookup.request.resume {
                    Some(token) if !self.core.knows(&token) => {
                        let find = self.relay.store.find_node(self.core.name(), token);
                        self.lookups
                            .push(Box::pin(async move { (lookup, find.await) }));
                    }
                    _ => self.admit(lookup, None),
                }
            }
            Command::Frame { conn, read } => {
                let started = Instant::now();
                // A bug that panics on some frame must cost that frame, not the room: the frame
                // is refused and the room loads again from its log.
                let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.core.receive(now, conn, read)
                }));
                if let Err(panic) = received {
                    let detail = panic_message(&*panic);
                    tracing::error!(room = %self.core.name(), conn, %detail, "a frame made the room panic; it reloads without it");
                    self.relay.metrics.room_panics.fetch_add(1, Relaxed);
                    self.core.panicked(&detail);
                    return;
                }
                let took = started.elapsed();
                let budget = self.relay.config.apply_budget;
                if took > budget
                    && self
                        .core
                        .overran(took.as_millis() as u64, budget.as_millis() as u64)
                {
                    tracing::warn!(
                        room = %self.core.name(),
                        conn,
                        ms = took.as_millis() as u64,
                        "an update overran the apply budget; the room reloads without it"
                    );
                }
            }
            Command::CaughtUp { conn } => self.core.caught_up(conn),
            Command::Leave { conn } => self.leave(conn),
        }
    }

    /// Hands the core a join, with the store's record of its token if it was looked up.
    fn admit(&mut self, lookup: Lookup, stored: Option<NodeRecord>) {
        let Lookup {
            conn,
            mut request,
            offender,
            reply,
        } = lookup;
        if reply.is_closed() {
            // The connection went away while its record was looked up.
            return;
        }
        // What the relay kept when the room let the node go, taken as the room takes the node
        // back: a release kept while this lookup was under way (another connection of the
        // token came and went meanwhile) is the newer one.
        if let Some(token) = request.resume.filter(|token| !self.core.knows(token)) {
            request.released = self
                .relay
                .releases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(self.core.name(), token, request.access.user);
        }
        request.stored = stored;
        let mut fresh = ResumeToken::default();
        if getrandom::fill(&mut fresh).is_err() {
            let _ = reply.send(Err(JoinRefused {
                code: close::INTERNAL,
                reason: "no randomness for a resume token".into(),
            }));
            return;
        }
        match self.core.join(self.relay.now_ms(), conn, request, fresh) {
            Ok(joined) => {
                self.offenders.insert(joined.node, offender);
                if self.offenders.len() >= self.offenders_pruned_at {
                    let core = &self.core;
                    self.offenders.retain(|&node, _| core.holds_node(node));
                    self.offenders_pruned_at = (2 * self.offenders.len()).max(64);
                }
                let (sender, receiver) = queue::queue(
                    self.relay.config.send_queue,
                    self.relay.config.send_queue_bytes,
                );
                self.queues.insert(conn, sender);
                let admitted = Admitted {
                    joined,
                    queue: receiver,
                };
                if reply.send(Ok(admitted)).is_err() {
                    // The connection went away before it got its answer.
                    self.leave(conn);
                }
            }
            Err(refused) => {
                let _ = reply.send(Err(refused));
            }
        }
    }

    fn leave(&mut self, conn: ConnId) {
        self.queues.remove(&conn);
        self.core.leave(conn);
    }

    fn send(&mut self, to: ConnId, bytes: Bytes) {
        if let Some(queue) = self.queues.get(&to) {
            if let Err(queue::SendError::Full { bytes }) = queue.try_send(bytes) {
                self.slow.push((to, bytes));
            }
        }
    }

    /// Carries out what the core asks, until it asks nothing more.
    fn drain(&mut self) {
        let name = self.core.name().to_owned();
        loop {
            while let Some(output) = self.core.poll_output() {
                match output {
                    Output::Send { to, bytes } => self.send(to, bytes),
                    Output::Fanout { except, bytes } => {
                        for (&conn, queue) in &self.queues {
                            if Some(conn) == except {
                                continue;
                            }
                            if let Err(queue::SendError::Full { bytes }) =
                                queue.try_send(bytes.clone())
                            {
                                self.slow.push((conn, bytes));
                            }
                        }
                    }
                    Output::Close { conn, code, reason } => {
                        if let Some(queue) = self.queues.remove(&conn) {
                            queue.set_close(code, &reason);
                        }
                    }
                    Output::Reserve { count } => {
                        self.reservations
                            .push(self.relay.store.reserve_nodes(&name, count));
                    }
                    Output::Append(append) => {
                        self.appends
                            .push_back(self.relay.store.append(&name, append));
                    }
                    Output::Released(release) => {
                        self.offenders.remove(&release.node);
                        self.relay
                            .releases
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .keep(&name, release)
                    }
                    Output::Publish {
                        to,
                        after,
                        bytes,
                        roster,
                        step,
                    } => {
                        if let Some(feed) = &self.relay.feed {
                            feed.publish(&name, to, after, bytes, roster, step);
                        }
                    }
                    Output::Stop { reason, by } => {
                        tracing::error!(room = %name, %reason, "the room stops");
                        // Counted against its member here; another relay's member is counted
                        // by its own relay, which stops at the same entry of the log.
                        if let Some(&offender) = by.and_then(|node| self.offenders.get(&node)) {
                            let barred = self
                                .relay
                                .offences
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .count(&name, offender, self.relay.now_ms());
                            if barred {
                                self.relay.metrics.offenders_barred.fetch_add(1, Relaxed);
                                tracing::warn!(room = %name, ?offender, "a member stopped the room twice; it is kept out of the room for a while");
                            }
                        }
                    }
                }
            }
            if self.slow.is_empty() {
                break;
            }
            for (conn, in_bytes) in std::mem::take(&mut self.slow) {
                if self.queues.contains_key(&conn) {
                    self.relay.metrics.slow_consumers.fetch_add(1, Relaxed);
                    tracing::warn!(room = %name, conn, "send queue full: disconnecting a slow consumer");
                    let config = &self.relay.config;
                    let reason = if in_bytes {
                        format!(
                            "send queue full: over {} bytes waiting; read faster",
                            config.send_queue_bytes
                        )
                    } else {
                        format!(
                            "send queue full: over {} frames waiting; read faster",
                            config.send_queue
                        )
                    };
                    self.core.drop_member(conn, close::SLOW_CONSUMER, &reason);
                }
            }
        }
        self.count();
    }

    /// Adds what the core counted since the last time to the relay's metrics.
    fn count(&mut self) {
        let now = self.core.counters();
        let metrics = &self.relay.metrics;
        if now.accepted > self.counted.accepted {
            metrics
                .accepted
                .fetch_add(now.accepted - self.counted.accepted, Relaxed);
        }
        if now.rejected_total() != self.counted.rejected_total() {
            for reason in Reason::ALL {
                let delta = now.rejected(reason) - self.counted.rejected(reason);
                if delta > 0 {
                    metrics.reject_n(reason, delta);
                }
            }
        }
        self.counted = now.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(token: u8, step: u64) -> Release {
        Release {
            node: u64::from(token),
            token: [token; 16],
            user: 5,
            step,
        }
    }

    #[test]
    fn releases_are_taken_once_by_room_token_and_user_and_the_oldest_go_first() {
        let mut releases = Releases::new(2);
        releases.keep("r", release(1, 10));
        releases.keep("r", release(1, 12));
        releases.keep("other", release(2, 20));
        assert_eq!(releases.take("r", [2; 16], 5), None, "another room's");
        releases.keep("r", release(3, 30));
        // The first token's newer release was kept before the other room's: it goes first.
        assert_eq!(releases.take("r", [1; 16], 5), None);
        assert_eq!(releases.take("other", [2; 16], 6), None, "another user's");
        assert_eq!(releases.take("other", [2; 16], 5), Some(release(2, 20)));
        assert_eq!(releases.take("other", [2; 16], 5), None, "taken once");
        assert_eq!(releases.take("r", [3; 16], 5), Some(release(3, 30)));
        // Many keeps of one token leave one release and a bounded queue.
        for step in 0..100 {
            releases.keep("r", release(4, step));
        }
        assert!(releases.order.len() <= 4);
        assert_eq!(releases.take("r", [4; 16], 5), Some(release(4, 99)));
    }
}
