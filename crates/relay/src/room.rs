//! One room: a task that drives the core's [`RoomCore`].
//!
//! Every frame of the room passes through this one task, in order. The task hands the core its
//! inputs (joins, frames, leaves, and the store's answers) and carries out its outputs: frames
//! go into the members' bounded queues (a member whose queue is full is let go, it never slows
//! the room), appends go to the store, many in flight at once so that the store can commit them
//! in one batch, and `FuturesOrdered` hands their answers back in the order they were made.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use pattern_mesh_core::room::{ConnId, JoinRefused, JoinRequest, Joined, Output, Read, RoomCore};
use pattern_mesh_core::store::{Appended, StoreFuture};
use pattern_mesh_core::validate::Counters;
use pattern_mesh_core::wire::{close, Reason, ResumeToken};
use tokio::sync::{mpsc, oneshot};

use super::queue;
use super::Relay;

/// What a connection asks of its room.
pub(crate) enum Command {
    Join {
        conn: ConnId,
        request: JoinRequest,
        reply: oneshot::Sender<Result<Admitted, JoinRefused>>,
    },
    Frame {
        conn: ConnId,
        read: Read,
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

struct RoomTask {
    core: RoomCore,
    relay: Arc<Relay>,
    queues: HashMap<ConnId, queue::Sender>,
    appends: FuturesOrdered<StoreFuture<Appended>>,
    registrations: FuturesUnordered<StoreFuture<()>>,
    counted: Counters,
    slow: Vec<ConnId>,
}

pub(crate) async fn run(core: RoomCore, relay: Arc<Relay>, mut commands: mpsc::Receiver<Command>) {
    let name = core.name().to_owned();
    let mut task = RoomTask {
        counted: core.counters().clone(),
        core,
        relay,
        queues: HashMap::new(),
        appends: FuturesOrdered::new(),
        registrations: FuturesUnordered::new(),
        slow: Vec::new(),
    };
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => task.handle(command),
                None => break,
            },
            Some(result) = task.appends.next(), if !task.appends.is_empty() => {
                task.core.appended(result);
            }
            Some(result) = task.registrations.next(), if !task.registrations.is_empty() => {
                if let Err(error) = result {
                    tracing::error!(room = %name, %error, "a node could not be registered");
                }
            }
        }
        task.drain();
        if task.core.is_idle()
            && task.appends.is_empty()
            && task.registrations.is_empty()
            && task.relay.retire(&name, &commands)
        {
            break;
        }
    }
    for (_, queue) in task.queues.drain() {
        queue.set_close(close::INTERNAL, "the room stopped; reconnect to resume");
    }
    tracing::debug!(room = %name, "room closed");
}

impl RoomTask {
    fn handle(&mut self, command: Command) {
        let now = self.relay.now_ms();
        match command {
            Command::Join {
                conn,
                request,
                reply,
            } => {
                let mut fresh = ResumeToken::default();
                if getrandom::fill(&mut fresh).is_err() {
                    let _ = reply.send(Err(JoinRefused {
                        code: close::INTERNAL,
                        reason: "no randomness for a resume token".into(),
                    }));
                    return;
                }
                match self.core.join(now, conn, request, fresh) {
                    Ok(joined) => {
                        let (sender, receiver) = queue::queue(self.relay.config.send_queue);
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
            Command::Frame { conn, read } => self.core.receive(now, conn, read),
            Command::Leave { conn } => self.leave(conn),
        }
    }

    fn leave(&mut self, conn: ConnId) {
        self.queues.remove(&conn);
        self.core.leave(conn);
    }

    fn send(&mut self, to: ConnId, bytes: Bytes) {
        if let Some(queue) = self.queues.get(&to) {
            if let Err(queue::SendError::Full) = queue.try_send(bytes) {
                self.slow.push(to);
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
                            if let Err(queue::SendError::Full) = queue.try_send(bytes.clone()) {
                                self.slow.push(conn);
                            }
                        }
                    }
                    Output::Close { conn, code, reason } => {
                        if let Some(queue) = self.queues.remove(&conn) {
                            queue.set_close(code, &reason);
                        }
                    }
                    Output::Register(node) => {
                        self.registrations
                            .push(self.relay.store.register_node(&name, node));
                    }
                    Output::Append(append) => {
                        self.appends
                            .push_back(self.relay.store.append(&name, append));
                    }
                    Output::Stop { reason } => {
                        tracing::error!(room = %name, %reason, "the room stops");
                    }
                }
            }
            if self.slow.is_empty() {
                break;
            }
            for conn in std::mem::take(&mut self.slow) {
                if self.queues.contains_key(&conn) {
                    self.relay.metrics.slow_consumers.fetch_add(1, Relaxed);
                    tracing::warn!(room = %name, conn, "send queue full: disconnecting a slow consumer");
                    self.core.drop_member(
                        conn,
                        close::SLOW_CONSUMER,
                        "send queue full: the connection did not keep up with the room",
                    );
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
