//! The listener's guard: a cap on open connections, in all and per IP address, a deadline by
//! which a connection must have joined a room, and a frame and a byte budget per IP address,
//! kept after its last connection closes until they are full again (closing every connection
//! and opening new ones does not fill them). An IPv6 address counts by its /64 prefix (see
//! [`address_key`]).
//!
//! Without it a silent TCP connection, or one that sends an HTTP request line a byte at a time
//! (slowloris), holds a file descriptor forever, and a few hundred of them lock every new
//! member out. With it such a connection is closed at its deadline, and one over a cap is
//! closed as soon as it is accepted.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use pattern_mesh_core::pace::TokenBucket;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use crate::metrics::Metrics;

/// The limits the guard enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardConfig {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one IP address at most.
    pub max_per_ip: usize,
    /// From its accept, the time a connection has to join a room (an HTTP request that is
    /// not a WebSocket must be over by then too).
    pub deadline: Duration,
    /// Frames per second from one IP address, all its connections together (and as many at
    /// once).
    pub ip_rate: u64,
    /// Bytes per second from one IP address, all its connections together, and how many at
    /// once.
    pub ip_bandwidth: u64,
    pub ip_burst: u64,
    /// Rooms one IP address may open per minute (and as many at once).
    pub ip_room_opens: u64,
    /// Bytes the relay holds for frames and messages still arriving, all connections together
    /// (`--max-partial-bytes`), and one address's connections together.
    pub max_partial: u64,
    pub max_partial_per_ip: u64,
}

/// What the relay knows of a connection: its peer address, a switch that lifts its deadline
/// once it has joined, and what the connections of its address share.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    joined: Arc<AtomicBool>,
    address: Arc<Address>,
    /// What the connection's stream read since the last whole WebSocket message (see
    /// [`GuardedStream`]).
    unframed: Arc<Unframed>,
}

/// What the connections of one address share.
#[derive(Debug)]
pub(crate) struct Address {
    /// The address's frame and byte budgets.
    budgets: Mutex<Budgets>,
    /// Bytes its connections hold for messages whose parts are still arriving.
    pub(crate) partial: AtomicU64,
    /// Bytes of WebSocket frames still arriving on its connections (see [`Unframed`]).
    pub(crate) unframed: AtomicU64,
}

#[derive(Debug)]
struct Budgets {
    frames: TokenBucket,
    bytes: TokenBucket,
    /// Rooms opened.
    opens: TokenBucket,
}

/// Which of an address's budgets a frame is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    Frames,
    Bytes,
}

impl Address {
    fn new(config: &GuardConfig, now: u64) -> Self {
        let rate = config.ip_rate as f64;
        Self {
            budgets: Mutex::new(Budgets {
                frames: TokenBucket::new(rate, rate, now),
                bytes: TokenBucket::new(config.ip_bandwidth as f64, config.ip_burst as f64, now),
                opens: TokenBucket::new(
                    config.ip_room_opens as f64 / 60.0,
                    config.ip_room_opens as f64,
                    now,
                ),
            }),
            partial: AtomicU64::new(0),
            unframed: AtomicU64::new(0),
        }
    }

    /// Whether both budgets are full at `now`: the address may be forgotten once no
    /// connection of it is open.
    fn full(&self, now: u64) -> bool {
        let budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        budgets.frames.full_at() <= now
            && budgets.bytes.full_at() <= now
            && budgets.opens.full_at() <= now
    }
}

impl Peer {
    /// The connection has joined a room: its deadline no longer applies.
    pub(crate) fn joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Takes a frame, of `bytes` bytes if it costs bytes, from the address's budgets at `now`
    /// (milliseconds), or says which one it is over (then it takes nothing).
    pub(crate) fn take(&self, bytes: Option<u64>, now: u64) -> Result<(), Over> {
        let mut budgets = self
            .address
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !budgets.frames.can_take_n(1, now) {
            return Err(Over::Frames);
        }
        if let Some(bytes) = bytes {
            if !budgets.bytes.try_take_n(bytes, now) {
                return Err(Over::Bytes);
            }
        }
        if budgets.frames.try_take_n(1, now) {
            Ok(())
        } else {
            Err(Over::Frames)
        }
    }

    /// Takes the opening of a room from the address's budget at `now` (milliseconds); false if
    /// it is spent.
    pub(crate) fn take_open(&self, now: u64) -> bool {
        let mut budgets = self
            .address
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        budgets.opens.try_take_n(1, now)
    }

    /// Gives back an opening taken by [`Peer::take_open`] for a join that opened no room.
    pub(crate) fn give_back_open(&self, now: u64) {
        let mut budgets = self
            .address
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        budgets.opens.give_back(1, now);
    }

    /// What the connections of this address share.
    pub(crate) fn address(&self) -> Arc<Address> {
        self.address.clone()
    }

    /// The remote address as its caps and budgets are kept (see [`address_key`]).
    pub(crate) fn key(&self) -> IpAddr {
        address_key(self.addr.ip())
    }

    /// The connection handled a whole WebSocket message: what its stream read before is no
    /// longer held for a frame still arriving.
    pub(crate) fn framed(&self) {
        self.unframed.give_back(&self.address);
    }
}

/// The bytes a joined connection's stream read since the connection last handled a whole
/// WebSocket message: a frame still arriving, which the WebSocket holds until it ends (up to
/// twice the frame limit, and a message of many frames until its last). They are counted for
/// the relay and for the address, apart from the parts of large messages, and held to the same
/// bounds (`--max-partial-bytes`, a quarter per address): a member that starts frames on every
/// socket its address may open, and finishes none, is closed past them. The parts of large
/// messages are refused when both together are past them (see `connection::Partial`): an
/// honest member's part is refused for a while, and its connection stays.
pub(crate) struct Unframed {
    read: AtomicU64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Unframed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Unframed").field(&self.read).finish()
    }
}

impl Unframed {
    /// Counts `bytes` more; says which bound the totals are then over, if any.
    fn count(&self, bytes: u64, address: &Address, config: &GuardConfig) -> Result<(), String> {
        self.read.fetch_add(bytes, Ordering::Relaxed);
        let total = self
            .metrics
            .unframed_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        let held = address.unframed.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total > config.max_partial {
            Err(format!(
                "the relay holds {} bytes of frames still arriving, its most; try again later",
                config.max_partial
            ))
        } else if held > config.max_partial_per_ip {
            Err(format!(
                "this address holds {} bytes of frames still arriving, its most; try again later",
                config.max_partial_per_ip
            ))
        } else {
            Ok(())
        }
    }

    /// Takes what is counted out of the totals.
    fn give_back(&self, address: &Address) {
        let bytes = self.read.swap(0, Ordering::Relaxed);
        if bytes > 0 {
            self.metrics
                .unframed_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            address.unframed.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// Why a joined connection's read failed: it held more of frames still arriving than the
/// relay's or its address's bound. The connection closes with 1013 and this reason.
#[derive(Debug)]
pub(crate) struct HeldTooMuch(pub(crate) String);

impl std::fmt::Display for HeldTooMuch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeldTooMuch {}

impl Connected<IncomingStream<'_, Guarded>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Guarded>) -> Self {
        stream.remote_addr().clone()
    }
}

#[derive(Default)]
struct Counts {
    open: usize,
    /// Per address with a connection open, or whose budgets are not full again yet: how many
    /// connections, and what they share.
    per_ip: HashMap<IpAddr, (usize, Arc<Address>)>,
    /// Twice the addresses the last pruning of `per_ip` kept: the next waits until there are
    /// more, so that addresses whose budgets are not full yet, however many, do not have every
    /// admission scan them all (under the lock every accept takes).
    kept: usize,
    /// How many times `per_ip` was pruned.
    #[cfg(test)]
    prunes: usize,
}

/// A TCP listener that enforces a [`GuardConfig`].
pub(crate) struct Guarded {
    listener: TcpListener,
    config: GuardConfig,
    counts: Arc<Mutex<Counts>>,
    /// The clock of the address budgets (milliseconds since the relay started).
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Where the bytes held for what is still arriving are counted.
    metrics: Arc<Metrics>,
}

impl Guarded {
    pub(crate) fn new(
        listener: TcpListener,
        config: GuardConfig,
        clock: Arc<dyn Fn() -> u64 + Send + Sync>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            listener,
            config,
            counts: Arc::default(),
            clock,
            metrics,
        }
    }

    /// Takes a slot for `ip` and hands out what the connections of its address share, or says
    /// which cap is reached.
    fn admit(&self, ip: IpAddr) -> Result<(Slot, Arc<Address>), &'static str> {
        let ip = address_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.open >= self.config.max_connections {
            return Err("the relay is at its connection limit");
        }
        let now = (self.clock)();
        // The addresses with no connection whose budgets are full again go, now and then.
        if counts.per_ip.len() > (2 * counts.open + 1024).max(counts.kept) {
            counts
                .per_ip
                .retain(|_, (open, address)| *open > 0 || !address.full(now));
            counts.kept = 2 * counts.per_ip.len();
            #[cfg(test)]
            {
                counts.prunes += 1;
            }
        }
        let config = self.config;
        let (open, budget) = counts
            .per_ip
            .entry(ip)
            .or_insert_with(|| (0, Arc::new(Address::new(&config, now))));
        if *open >= self.config.max_per_ip {
            return Err("the address is at its connection limit");
        }
        *open += 1;
        let budget = budget.clone();
        counts.open += 1;
        let slot = Slot {
            ip,
            counts: self.counts.clone(),
        };
        Ok((slot, budget))
    }
}

/// What an address's caps and budgets are kept under: an IPv4 address as it is (and an
/// IPv6 address that carries one as the IPv4 address it carries: IPv4-mapped, as a dual-stack
/// listener gives an IPv4 peer, or in the well-known prefix `64:ff9b::/96` of a translator in
/// front of the relay), an IPv6 address by its /64 prefix. A subscriber's line gets at least a
/// /64, and its hosts pick addresses in it at will: counted one /128 at a time, one host would
/// have as many connections and budgets as it liked. (The hosts of one /64 share them, as the
/// hosts behind one IPv4 NAT do.)
fn address_key(ip: IpAddr) -> IpAddr {
    const TRANSLATED: u128 = 0x0064_ff9b_u128 << 96;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if bits >> 32 == TRANSLATED >> 32 {
                IpAddr::V4((bits as u32).into())
            } else {
                IpAddr::V6(Ipv6Addr::from(bits & !u128::from(u64::MAX)))
            }
        }
    }
}

/// A connection's place under the caps, given back when the connection is dropped.
struct Slot {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.open -= 1;
        // The address stays, with its budgets, until they are full again (see `admit`).
        if let Some((open, _)) = counts.per_ip.get_mut(&self.ip) {
            *open -= 1;
        }
    }
}

impl Listener for Guarded {
    type Io = GuardedStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: the guard's deadlines free some.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            };
            let (slot, address) = match self.admit(addr.ip()) {
                Ok(admitted) => admitted,
                Err(why) => {
                    tracing::debug!(%addr, why, "connection refused");
                    // Dropped: the peer sees the connection close at once.
                    continue;
                }
            };
            // Small frames must leave at once: without TCP_NODELAY, Nagle's algorithm and
            // delayed acknowledgements hold them for up to 40 ms.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY");
            }
            let joined = Arc::new(AtomicBool::new(false));
            let unframed = Arc::new(Unframed {
                read: AtomicU64::new(0),
                metrics: self.metrics.clone(),
            });
            let io = GuardedStream {
                stream,
                deadline: Box::pin(tokio::time::sleep(self.config.deadline)),
                joined: joined.clone(),
                unjoined_read: 0,
                address: address.clone(),
                unframed: unframed.clone(),
                config: self.config,
                _slot: slot,
            };
            return (
                io,
                Peer {
                    addr,
                    joined,
                    address,
                    unframed,
                },
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.listener.local_addr()?,
            joined: Arc::default(),
            address: Arc::new(Address::new(&self.config, 0)),
            unframed: Arc::new(Unframed {
                read: AtomicU64::new(0),
                metrics: self.metrics.clone(),
            }),
        })
    }
}

/// What a connection may send before it joins a room: HTTP requests (the demo's pages, the
/// metrics) and a WebSocket's upgrade and join need far less. Past it, the WebSocket would
/// hold a frame that no budget counts (a frame may be twice the frame limit), on each of up to
/// `--max-connections-per-ip` sockets of an address that needs no token to open them.
pub(crate) const UNJOINED_BYTES: usize = 64 * 1024;

/// A TCP stream that fails its reads once its deadline has passed, or once it read more than
/// [`UNJOINED_BYTES`], unless it joined a room before; and, once it joined, when what it read
/// since its last whole WebSocket message takes the bytes held for what is still arriving over
/// the relay's or its address's bound ([`HeldTooMuch`], see [`Unframed`]). Whoever is reading
/// it (the HTTP server, then the WebSocket) then drops it.
pub(crate) struct GuardedStream {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    joined: Arc<AtomicBool>,
    /// The bytes read while the connection had not joined.
    unjoined_read: usize,
    address: Arc<Address>,
    unframed: Arc<Unframed>,
    config: GuardConfig,
    _slot: Slot,
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.unframed.give_back(&self.address);
    }
}

impl GuardedStream {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        !self.joined.load(Ordering::Relaxed) && self.deadline.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let bytes = buf.filled().len() - before;
        if self.joined.load(Ordering::Relaxed) {
            if bytes > 0 {
                let this = &*self;
                if let Err(why) = this
                    .unframed
                    .count(bytes as u64, &this.address, &this.config)
                {
                    return Poll::Ready(Err(io::Error::other(HeldTooMuch(why))));
                }
            }
        } else {
            self.unjoined_read += bytes;
            if self.unjoined_read > UNJOINED_BYTES {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the connection sent more than {UNJOINED_BYTES} bytes before joining a room"),
                )));
            }
        }
        read
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the connection did not join a room in time",
    )
}

// Writes fail at the deadline too: a peer that sends a request and then reads nothing would
// otherwise hold its connection with the server blocked on a write.
impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(timed_out()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_per_ip: usize) -> Guarded {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let config = GuardConfig {
            max_connections: 1_000,
            max_per_ip,
            deadline: Duration::from_secs(10),
            ip_rate: 10,
            ip_bandwidth: 1_000,
            ip_burst: 1_000,
            ip_room_opens: 10,
            max_partial: 1 << 20,
            max_partial_per_ip: 1 << 18,
        };
        Guarded::new(
            TcpListener::from_std(listener).unwrap(),
            config,
            Arc::new(|| 0),
            Arc::default(),
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A connection of the address `address`.
    fn peer(address: &Arc<Address>) -> Peer {
        Peer {
            addr: "[::1]:1".parse().unwrap(),
            joined: Arc::default(),
            address: address.clone(),
            unframed: Arc::new(Unframed {
                read: AtomicU64::new(0),
                metrics: Arc::default(),
            }),
        }
    }

    /// A host on an IPv6 line picks any address of its /64: new addresses do not bring new
    /// connections or new budgets. Another /64 has its own.
    #[tokio::test]
    async fn the_addresses_of_one_ipv6_64_share_their_caps_and_budgets() {
        let guard = guard(2);
        let (_one, first) = guard.admit(ip("2001:db8:1:2::1")).unwrap();
        let (_two, second) = guard.admit(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "one set of budgets");
        assert_eq!(
            guard.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some("the address is at its connection limit")
        );
        for _ in 0..10 {
            peer(&first).take(Some(100), 0).unwrap();
        }
        assert_eq!(peer(&second).take(Some(1), 0), Err(Over::Frames));
        let (_other, other) = guard.admit(ip("2001:db8:1:3::1")).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(peer(&other).take(Some(100), 0), Ok(()));
    }

    /// Addresses whose budgets are not full again yet stay known, however many; pruning the
    /// others waits until the map has doubled since the last, so that admissions do not scan
    /// them all every time.
    #[tokio::test]
    async fn many_addresses_with_budgets_not_full_are_not_scanned_at_every_admission() {
        let guard = guard(1);
        for n in 0..20_000u32 {
            let (slot, address) = guard.admit(IpAddr::V4(n.into())).unwrap();
            peer(&address).take(Some(1), 0).unwrap();
            drop(slot);
        }
        let counts = guard.counts.lock().unwrap();
        assert_eq!(counts.per_ip.len(), 20_000, "none is full again");
        assert!(counts.prunes <= 5, "{} prunes", counts.prunes);
    }

    /// A dual-stack listener gives an IPv4 peer as an IPv4-mapped IPv6 address, and a
    /// translator in front of the relay in `64:ff9b::/96`: it counts as the IPv4 address,
    /// whichever way it came (not as one /64 that every IPv4 peer of the translator shares).
    #[tokio::test]
    async fn an_ipv6_address_that_carries_an_ipv4_one_is_that_ipv4_address() {
        let guard = guard(2);
        let (_slot, _) = guard.admit(ip("192.0.2.7")).unwrap();
        let (_mapped, _) = guard.admit(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(
            guard.admit(ip("64:ff9b::192.0.2.7")).err(),
            Some("the address is at its connection limit")
        );
        let (_one, _) = guard.admit(ip("64:ff9b::198.51.100.1")).unwrap();
        let (_two, _) = guard.admit(ip("64:ff9b::198.51.100.2")).unwrap();
        assert!(guard.admit(ip("64:ff9b::198.51.100.3")).is_ok());
    }
}
