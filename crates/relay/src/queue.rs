//! A member's send queue: bounded, one producer (the room) and one consumer (the connection),
//! and the reason the room gives when it lets the member go.
//!
//! tokio's `mpsc` allocates a 32-slot block for every channel up front, a kilobyte for each
//! idle member. This queue allocates only for what it holds, gives the memory back once a burst
//! has drained, and carries the close reason in the same allocation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use pattern_mesh_core::wire::part;
use tokio::sync::Notify;

/// Capacity kept after a burst has drained; anything larger is released.
const KEEP: usize = 16;

/// Why a frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The queue holds its capacity (in frames, or in bytes): the member is not keeping up.
    Full {
        /// Whether the bound reached is the one in bytes.
        bytes: bool,
    },
    /// The connection has gone.
    Closed,
}

struct State {
    items: VecDeque<Bytes>,
    capacity: usize,
    /// Bytes the items hold, and the most they may hold (one item is always let in, whatever
    /// its size, so a message at the message limit still reaches an empty queue).
    bytes: usize,
    max_bytes: usize,
    /// Whether the queue let in the start of a message sent in parts and not yet its end: the
    /// rest of it is let in whatever the bounds. The room queues every part of a message at
    /// once, so a message larger than the bounds (a paste of 20 MB against 16 MiB) would
    /// otherwise cut off every member it went to.
    in_message: bool,
    /// The newest message in parts, in frames and bytes, while it is queued: the frames that
    /// follow are judged without it, or the next keystroke of a busy room would cut the
    /// member off (the messages before it count as any frame).
    over_items: usize,
    over_bytes: usize,
    /// The part frames queued, of every message: the newest message's are the last of them.
    parts: usize,
    sender_gone: bool,
    receiver_gone: bool,
    close: Option<(u16, String)>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the consumer; a wake-up with no consumer waiting is kept for its next wait.
    notify: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A queue of at most `capacity` frames and `max_bytes` bytes.
pub(crate) fn queue(capacity: usize, max_bytes: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            capacity,
            bytes: 0,
            max_bytes,
            in_message: false,
            over_items: 0,
            over_bytes: 0,
            parts: 0,
            sender_gone: false,
            receiver_gone: false,
            close: None,
        }),
        notify: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// The room's end.
pub(crate) struct Sender(Arc<Shared>);

impl Sender {
    /// Queues `bytes` unless the queue is full or the connection has gone; a part that
    /// continues a message whose start the queue let in is let in whatever the bounds.
    pub(crate) fn try_send(&self, bytes: Bytes) -> Result<(), SendError> {
        {
            let mut state = self.0.lock();
            if state.receiver_gone {
                return Err(SendError::Closed);
            }
            let span = part::span(&bytes);
            let continues = state.in_message && span.is_some_and(|s| !s.starts());
            if !continues {
                // A message's start is judged with everything queued, earlier messages too,
                // and the rest of it comes in whole; other frames are judged without the
                // newest message. So a queue holds at most its bounds and one message.
                let (items, held) = if span.is_some() {
                    (state.items.len(), state.bytes)
                } else {
                    (
                        state.items.len() - state.over_items,
                        state.bytes - state.over_bytes,
                    )
                };
                let full = if items >= state.capacity {
                    Some(false)
                } else if items > 0 && held + bytes.len() > state.max_bytes {
                    Some(true)
                } else {
                    None
                };
                if let Some(bytes) = full {
                    state.in_message = false;
                    return Err(SendError::Full { bytes });
                }
            }
            if let Some(span) = span {
                state.in_message = !span.ends();
                // The message, its start included, is judged at its start only.
                if !continues {
                    state.over_items = 0;
                    state.over_bytes = 0;
                }
                state.over_items += 1;
                state.over_bytes += bytes.len();
                state.parts += 1;
            }
            state.bytes += bytes.len();
            state.items.push_back(bytes);
        }
        self.0.notify.notify_one();
        Ok(())
    }

    /// Records why the room lets the member go (the first reason given stands). The connection
    /// reads it once the queue has ended, that is once this sender is dropped.
    pub(crate) fn set_close(&self, code: u16, reason: &str) {
        self.0
            .lock()
            .close
            .get_or_insert_with(|| (code, reason.to_owned()));
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.lock().sender_gone = true;
        self.0.notify.notify_one();
    }
}

/// The connection's end.
pub(crate) struct Receiver(Arc<Shared>);

impl Receiver {
    /// The next frame; `None` once the room has dropped its end and everything queued before
    /// has been received.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        loop {
            {
                let mut state = self.0.lock();
                if let Some(bytes) = pop(&mut state) {
                    return Some(bytes);
                }
                if state.sender_gone {
                    return None;
                }
            }
            self.0.notify.notified().await;
        }
    }

    /// The next frame if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<Bytes> {
        pop(&mut self.0.lock())
    }

    /// The reason the room gave for ending the queue, if it gave one.
    pub(crate) fn close_reason(&self) -> Option<(u16, String)> {
        self.0.lock().close.take()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver_gone = true;
        state.items = VecDeque::new();
        state.bytes = 0;
    }
}

fn pop(state: &mut State) -> Option<Bytes> {
    let bytes = state.items.pop_front()?;
    state.bytes -= bytes.len();
    if part::span(&bytes).is_some() {
        // The oldest part queued is the newest message's once only its parts are left.
        if state.parts <= state.over_items {
            state.over_items -= 1;
            state.over_bytes -= bytes.len();
        }
        state.parts -= 1;
    }
    if state.items.is_empty() && state.items.capacity() > KEEP {
        state.items.shrink_to(KEEP);
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_arrive_in_order_then_the_end() {
        let (tx, mut rx) = queue(4, 1 << 20);
        for i in 0..3u8 {
            tx.try_send(Bytes::from(vec![i])).unwrap();
        }
        tx.set_close(4000, "slow");
        tx.set_close(1001, "ignored: the first reason stands");
        drop(tx);
        for i in 0..3u8 {
            assert_eq!(rx.recv().await.unwrap(), Bytes::from(vec![i]));
        }
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.close_reason(), Some((4000, "slow".into())));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_gone_receiver_is_closed() {
        let (tx, mut rx) = queue(2, 1 << 20);
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        tx.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(
            tx.try_send(Bytes::from_static(b"c")),
            Err(SendError::Full { bytes: false })
        );
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"a")));
        tx.try_send(Bytes::from_static(b"c")).unwrap();
        drop(rx);
        assert_eq!(
            tx.try_send(Bytes::from_static(b"d")),
            Err(SendError::Closed)
        );
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_but_always_takes_one_frame() {
        let (tx, mut rx) = queue(100, 10);
        tx.try_send(Bytes::from(vec![0; 25])).unwrap();
        assert_eq!(
            tx.try_send(Bytes::from(vec![1])),
            Err(SendError::Full { bytes: true })
        );
        assert_eq!(rx.try_recv().map(|b| b.len()), Some(25));
        for _ in 0..10 {
            tx.try_send(Bytes::from(vec![1])).unwrap();
        }
        assert_eq!(
            tx.try_send(Bytes::from(vec![1])),
            Err(SendError::Full { bytes: true })
        );
        rx.try_recv().unwrap();
        tx.try_send(Bytes::from(vec![1])).unwrap();
    }

    /// The parts of a message over the bounds, in bytes and in frames, are let in whole once its
    /// first part is; the next message is judged by the bounds again, and so is a part whose
    /// message's start was refused.
    #[test]
    fn a_message_in_parts_is_let_in_whole_once_its_start_is() {
        let parts = |n: usize| -> Vec<Bytes> {
            part::fragment(&vec![7u8; n], 100)
                .into_iter()
                .map(Bytes::from)
                .collect()
        };
        let (tx, mut rx) = queue(4, 150);
        let message = parts(1_000);
        assert!(message.len() > 4);
        for part in &message {
            tx.try_send(part.clone()).unwrap();
        }
        // Judged without the message: keystrokes after a paste get in, up to the bounds.
        for _ in 0..4 {
            tx.try_send(Bytes::from(vec![1; 30])).unwrap();
        }
        assert_eq!(
            tx.try_send(Bytes::from_static(b"x")),
            Err(SendError::Full { bytes: false })
        );
        assert!(
            matches!(
                tx.try_send(parts(1_000)[0].clone()),
                Err(SendError::Full { .. })
            ),
            "the next message is judged by everything queued"
        );
        assert!(
            matches!(tx.try_send(message[1].clone()), Err(SendError::Full { .. })),
            "a part whose start was refused is judged by the bounds"
        );
        let mut got = 0;
        while rx.try_recv().is_some() {
            got += 1;
        }
        assert_eq!(got, message.len() + 4);
        // An empty queue takes the start again, and with it the rest.
        for part in parts(1_000) {
            tx.try_send(part).unwrap();
        }
    }

    /// Once a message over the bounds is read, the frames queued after it count in full: it
    /// leaves no allowance behind.
    #[test]
    fn a_message_read_leaves_no_allowance_behind() {
        let (tx, mut rx) = queue(100, 150);
        for part in part::fragment(&vec![7u8; 1_000], 100) {
            tx.try_send(Bytes::from(part)).unwrap();
        }
        for _ in 0..5 {
            tx.try_send(Bytes::from(vec![1; 30])).unwrap();
        }
        // The message and one frame after it are read; four frames, 120 bytes, remain.
        while rx.try_recv().is_some_and(|b| b.len() != 30) {}
        tx.try_send(Bytes::from(vec![1; 30])).unwrap();
        assert_eq!(
            tx.try_send(Bytes::from(vec![1; 1])),
            Err(SendError::Full { bytes: true })
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_frame_and_for_the_end() {
        let (tx, mut rx) = queue(8, 1 << 20);
        let consumer = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(bytes) = rx.recv().await {
                got.push(bytes);
            }
            got
        });
        for i in 0..100u8 {
            // Wait for room now and then so that the consumer also waits on an empty queue.
            while tx.try_send(Bytes::from(vec![i])) == Err(SendError::Full { bytes: false }) {
                tokio::task::yield_now().await;
            }
            if i % 10 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        drop(tx);
        let got = consumer.await.unwrap();
        assert_eq!(
            got,
            (0..100u8).map(|i| Bytes::from(vec![i])).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = queue(10_000, usize::MAX);
        for _ in 0..5_000 {
            tx.try_send(Bytes::from_static(b"x")).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert!(rx.0.lock().items.capacity() <= KEEP);
    }
}
