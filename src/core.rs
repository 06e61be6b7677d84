//! One worker core: its connections, its subscription index, and the loops that serve them.
//!
//! A core runs on its own pinned glommio executor and shares none of this state. It accepts on
//! its own listener, parses requests on the connection's core, and fans each message out to its
//! own subscribers. Other cores get the message through their inboxes (see `bus`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use slab::Slab;
use slog::{debug, info, o, warn, Logger};

use crate::bus::{CoreMessage, CoreReceiver, CoreSender, Publication};
use crate::codes::close;
use crate::config::Config;
use crate::link::{ClusterLink, LinkDown};
use crate::logging::RepeatCounter;
use crate::outbound::{Outbound, Push};
use crate::topic::{Insertion, Removal, SubscriptionIndex};

/// Size of each core's read buffer, shared by all its connections, in bytes.
const READ_SCRATCH: usize = 64 * 1024;

/// Number of held messages at which a core queues them on their subscribers without waiting
/// for the flush round.
const MAX_HELD: usize = 4096;

/// Frame bytes at which a core queues its held messages without waiting for the flush round.
const MAX_HELD_BYTES: usize = 4 << 20;

/// Most inbox messages handled before the core lets other tasks run.
const INBOX_BATCH: usize = 256;

/// State shared by every core of the node, read-only after start except for the counters.
pub struct NodeShared {
    /// Validated settings.
    pub config: Config,
    /// The inbox of each core, by core id.
    pub cores: Vec<CoreSender>,
    /// Open WebSocket connections on all cores.
    pub connections: AtomicUsize,
    /// Set once shutdown starts.
    pub shutting_down: AtomicBool,
    /// Cores that have stopped reading requests during shutdown.
    pub intake_stopped: AtomicUsize,
    /// The cluster link.
    pub link: Arc<dyn ClusterLink>,
    /// When the node started.
    pub started: Instant,
}

/// A request to close a connection, made by the core or by the connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    /// The close code to send, or `None` to drop the socket without a close frame.
    pub code: Option<u16>,
    /// The close reason sent to the client and logged.
    pub reason: &'static str,
}

/// The core's record of one connection. The connection's own task owns the socket.
///
/// `repr(C)` keeps the fields a fan-out touches for every delivery (`last_delivery`, `close`,
/// `out`, `dirty`, `closed`, `write_blocked`) together at the front, in the first two cache
/// lines of the allocation.
#[repr(C)]
pub struct Conn {
    last_delivery: Cell<u64>,
    close: Cell<Option<CloseRequest>>,
    /// Frames waiting to be written.
    pub out: RefCell<Outbound>,
    dirty: Cell<bool>,
    /// Whether the socket is gone: nothing may be written to `fd` any more.
    closed: Cell<bool>,
    /// Set when the socket's send buffer is full and the task waits for it to drain.
    pub write_blocked: Cell<bool>,
    fd: RawFd,
    /// Index of this connection in its core's table.
    pub key: u32,
    /// Node-wide connection id, for logs.
    pub id: u64,
    task_waker: RefCell<Option<Waker>>,
    last_seen: Cell<Instant>,
    next_ping: Cell<Instant>,
    ping: Cell<Option<PendingPing>>,
    /// Patterns this connection subscribes to.
    pub patterns: RefCell<Vec<Box<str>>>,
}

/// A message published on or delivered to this core, held until the flush round queues it.
struct Undelivered {
    topic: Box<str>,
    frame: Rc<[u8]>,
}

/// A ping that has been queued and not yet followed by any byte from the client.
#[derive(Debug, Clone, Copy)]
struct PendingPing {
    queued_at: Instant,
    /// Byte position in the outbound stream at which the ping has been fully written.
    written_at_mark: u64,
    on_wire_since: Option<Instant>,
}

impl Conn {
    /// Records activity from the client: any received byte counts for the heartbeat.
    pub fn touch(&self) {
        self.last_seen.set(Instant::now());
    }

    /// Asks the connection's task to close; the first request wins.
    pub fn request_close(&self, request: CloseRequest) {
        if self.close.get().is_none() {
            self.close.set(Some(request));
            self.wake_task();
        }
    }

    /// Returns the pending close request, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.close.get()
    }

    /// Stores the waker of the connection's task.
    pub fn register_waker(&self, waker: &Waker) {
        let mut slot = self.task_waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn wake_task(&self) {
        if let Some(waker) = self.task_waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }

    /// Marks the socket as gone, before the task drops it.
    pub fn mark_closed(&self) {
        self.closed.set(true);
    }
}

/// One worker core.
pub struct Core {
    /// This core's id, from 0.
    pub id: usize,
    /// Node-wide shared state.
    pub node: Arc<NodeShared>,
    /// This core's logger.
    pub log: Logger,
    conns: RefCell<Slab<Rc<Conn>>>,
    index: RefCell<SubscriptionIndex<u32>>,
    delivery_seq: Cell<u64>,
    /// Messages published since the last flush round, not yet queued on any connection.
    undelivered: RefCell<Vec<Undelivered>>,
    /// Frame bytes in `undelivered`.
    held_bytes: Cell<usize>,
    dirty: RefCell<Vec<Rc<Conn>>>,
    flusher: RefCell<Option<Waker>>,
    /// The read buffer all connections of this core read into.
    pub scratch: RefCell<Box<[u8]>>,
    stopping: Cell<bool>,
    intake_stopped: Cell<bool>,
    ping_frame: Rc<[u8]>,
    next_conn_id: Cell<u64>,
    write_errors: RefCell<RepeatCounter>,
}

impl Core {
    /// Creates the state of core `id`.
    pub fn new(id: usize, node: Arc<NodeShared>, log: &Logger) -> Rc<Core> {
        let ping =
            crate::ws::encode_control(tungstenite::protocol::frame::coding::Control::Ping, b"");
        Rc::new(Core {
            id,
            log: log.new(o!("core" => id)),
            node,
            conns: RefCell::new(Slab::new()),
            index: RefCell::new(SubscriptionIndex::new()),
            delivery_seq: Cell::new(0),
            undelivered: RefCell::new(Vec::new()),
            held_bytes: Cell::new(0),
            dirty: RefCell::new(Vec::new()),
            flusher: RefCell::new(None),
            scratch: RefCell::new(vec![0; READ_SCRATCH].into_boxed_slice()),
            stopping: Cell::new(false),
            intake_stopped: Cell::new(false),
            ping_frame: Rc::from(ping),
            next_conn_id: Cell::new(0),
            write_errors: RefCell::new(RepeatCounter::default()),
        })
    }

    /// Returns whether sessions must stop reading requests because the node is shutting down.
    pub fn intake_stopped(&self) -> bool {
        self.intake_stopped.get()
    }

    /// Returns the node's settings.
    pub fn config(&self) -> &Config {
        &self.node.config
    }

    /// Runs the core until shutdown has drained its connections.
    /// `listener_fd` is the listener's descriptor, shut down when the core stops accepting.
    pub async fn run(
        self: Rc<Self>,
        listener: TcpListener,
        listener_fd: RawFd,
        inbox: CoreReceiver,
    ) {
        let accept = glommio::spawn_local(Rc::clone(&self).accept_loop(listener));
        glommio::spawn_local(Rc::clone(&self).flush_loop()).detach();
        glommio::spawn_local(Rc::clone(&self).heartbeat_loop()).detach();

        self.inbox_loop(inbox).await;

        // Shutdown: stop accepting, ask every client to go elsewhere, wait for them to close.
        self.stopping.set(true);
        // Shutting the listener down takes it out of LISTEN at once, so the port is free for a
        // restarted node even while the kernel still keeps the socket open for io_uring. The accept
        // task still owns the descriptor, so it cannot have been reused.
        // SAFETY: shutdown() on a descriptor the accept task keeps open.
        unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
        accept.cancel().await;
        // Held messages go out ahead of the close frames, because a closing connection takes no
        // more frames.
        self.deliver_undelivered();
        let request = CloseRequest {
            code: Some(close::GOING_AWAY),
            reason: "node shutting down",
        };
        for (_, conn) in self.conns.borrow().iter() {
            conn.request_close(request);
        }
        let deadline = Instant::now() + self.config().drain_timeout;
        while !self.conns.borrow().is_empty() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        let left = self.conns.borrow().len();
        debug!(self.log, "core stopped"; "connections_left" => left);
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        let mut errors = RepeatCounter::default();
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(crate::conn::serve(Rc::clone(&self), stream)).detach();
                }
                // The listener was shut down for the node's shutdown.
                Err(_) if self.stopping.get() => return,
                Err(error) => {
                    // Typically EMFILE: out of file descriptors. Back off instead of spinning.
                    if let Some(suppressed) = errors.record(Duration::from_secs(10)) {
                        warn!(self.log, "accept failed"; "error" => %error, "suppressed" => suppressed);
                    }
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn inbox_loop(&self, inbox: CoreReceiver) {
        let mut batch = Vec::with_capacity(INBOX_BATCH);
        loop {
            inbox.recv_batch(&mut batch, INBOX_BATCH).await;
            for message in batch.drain(..) {
                match message {
                    CoreMessage::Deliver(publication) => self.deliver_remote(&publication),
                    CoreMessage::StopIntake => {
                        self.intake_stopped.set(true);
                        self.node.intake_stopped.fetch_add(1, Ordering::AcqRel);
                    }
                    CoreMessage::Shutdown => return,
                }
            }
            glommio::yield_if_needed().await;
        }
    }

    /// Registers an upgraded connection, or returns `None` when the node is full.
    pub fn register(&self, fd: RawFd) -> Option<Rc<Conn>> {
        let max = self.config().max_connections;
        let previous = self.node.connections.fetch_add(1, Ordering::Relaxed);
        let stopping = self.stopping.get() || self.node.shutting_down.load(Ordering::Relaxed);
        if previous >= max || stopping {
            self.node.connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let id = (self.id as u64) << 48 | self.next_conn_id.replace(self.next_conn_id.get() + 1);
        let now = Instant::now();
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let conn = Rc::new(Conn {
            key: entry.key() as u32,
            id,
            fd,
            out: RefCell::new(Outbound::default()),
            dirty: Cell::new(false),
            write_blocked: Cell::new(false),
            task_waker: RefCell::new(None),
            close: Cell::new(None),
            closed: Cell::new(false),
            last_seen: Cell::new(now),
            next_ping: Cell::new(now + self.config().ping_interval),
            ping: Cell::new(None),
            last_delivery: Cell::new(0),
            patterns: RefCell::new(Vec::new()),
        });
        entry.insert(Rc::clone(&conn));
        Some(conn)
    }

    /// Removes a closed connection and all its subscriptions.
    pub fn unregister(&self, conn: &Conn) {
        conn.mark_closed();
        for pattern in conn.patterns.borrow_mut().drain(..) {
            self.remove_subscription(&pattern, conn.key);
        }
        self.conns.borrow_mut().try_remove(conn.key as usize);
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds `pattern` for `conn`, telling the link when it is new on this core.
    pub fn add_subscription(&self, pattern: &str, conn: &Conn) -> bool {
        // Messages published before the subscription must not reach it.
        self.deliver_undelivered();
        let insertion = self.index.borrow_mut().insert(pattern, conn.key);
        if insertion == Insertion::FirstForPattern {
            self.node.link.subscribe(self.id, pattern);
        }
        insertion.is_added()
    }

    /// Removes `pattern` for the connection `key`, telling the link when it was the last.
    pub fn remove_subscription(&self, pattern: &str, key: u32) -> bool {
        // Messages published before the removal still reach the connection.
        self.deliver_undelivered();
        let removal = self.index.borrow_mut().remove(pattern, key);
        if removal == Removal::LastForPattern {
            self.node.link.unsubscribe(self.id, pattern);
        }
        removal.is_removed()
    }

    /// Publishes a message from a client of this core to every subscriber in the node and the
    /// cluster. `frame` is the encoded delivery.
    ///
    /// Subscribers on this node get the message even when the cluster link is down. The error
    /// then reports to the publisher that other nodes did not.
    pub fn publish(&self, topic: &str, frame: Vec<u8>) -> Result<(), LinkDown> {
        // Read from the settings, not from link.health(), which may lock while the link is down.
        let clustered = self.config().redis_url.is_some();
        if self.node.cores.len() == 1 && !clustered {
            self.deliver_local(topic, &frame);
            return Ok(());
        }

        let publication = Arc::new(Publication {
            topic: topic.into(),
            frame: frame.into_boxed_slice(),
        });
        for (id, core) in self.node.cores.iter().enumerate() {
            if id != self.id {
                core.send(CoreMessage::Deliver(Arc::clone(&publication)));
            }
        }
        let result = if clustered {
            self.node.link.publish(&publication)
        } else {
            Ok(())
        };
        self.deliver_local(topic, &publication.frame);
        result
    }

    fn deliver_remote(&self, publication: &Publication) {
        self.deliver_local(&publication.topic, &publication.frame);
    }

    /// Holds `frame` for each local connection subscribed to `topic` until the next flush round.
    ///
    /// Queuing waits so that the messages a core reads in one round, which in a fan-out mostly
    /// share a topic, are matched once per run of equal topics and queued connection by
    /// connection: each connection's state is then touched once per run, not once per message.
    fn deliver_local(&self, topic: &str, frame: &[u8]) {
        // A message that matches nothing now cannot match at the flush round either, because a
        // new subscription first queues the held messages and only then joins the index.
        if !self.index.borrow().has_match(topic) {
            return;
        }
        let mut undelivered = self.undelivered.borrow_mut();
        undelivered.push(Undelivered {
            topic: topic.into(),
            frame: Rc::from(frame),
        });
        let bytes = self.held_bytes.get() + frame.len();
        self.held_bytes.set(bytes);
        if undelivered.len() == 1 {
            self.wake_flusher();
        }
        // The outbound queue limits apply only once messages are queued, so a core that keeps
        // reading without a flush round queues them early.
        if undelivered.len() >= MAX_HELD || bytes >= MAX_HELD_BYTES {
            drop(undelivered);
            self.deliver_undelivered();
        }
    }

    /// Queues every held message on the connections subscribed to its topic, in the order the
    /// messages were published.
    ///
    /// Everything that could reorder a connection's frames calls this first: a change to the
    /// subscription index, a reply or control frame, and the flush itself.
    pub fn deliver_undelivered(&self) {
        // Every reply calls this, so the common empty case must not give up the list's buffer.
        if self.undelivered.borrow().is_empty() {
            return;
        }
        let mut messages = std::mem::take(&mut *self.undelivered.borrow_mut());
        self.held_bytes.set(0);
        let conns = self.conns.borrow();
        let index = self.index.borrow();
        for run in messages.chunk_by(|a, b| a.topic == b.topic) {
            let seq = self.delivery_seq.get() + 1;
            self.delivery_seq.set(seq);
            index.for_each_match(&run[0].topic, |key| {
                let Some(conn) = conns.get(key as usize) else {
                    return;
                };
                // A connection with several patterns matching the topic gets the run once.
                if conn.last_delivery.replace(seq) != seq {
                    self.enqueue_run(conn, run);
                }
            });
        }
        drop((conns, index));
        messages.clear();
        // Give the buffer back for the next round.
        let mut undelivered = self.undelivered.borrow_mut();
        if undelivered.is_empty() {
            *undelivered = messages;
        }
    }

    /// Queues the frames of one run of messages on one connection. A full queue closes the
    /// connection as a slow consumer.
    fn enqueue_run(&self, conn: &Rc<Conn>, run: &[Undelivered]) {
        if conn.close.get().is_some() {
            return;
        }
        let limit = self.config().max_outbound_queue;
        let mut out = conn.out.borrow_mut();
        for message in run {
            if out.push(Rc::clone(&message.frame), limit) == Push::Full {
                drop(out);
                conn.request_close(CloseRequest {
                    code: Some(close::SLOW_CONSUMER),
                    reason: "slow consumer",
                });
                return;
            }
        }
        drop(out);
        self.mark_dirty(conn);
    }

    /// Queues a reply for one connection, behind every message published before it. A full
    /// queue closes the connection as a slow consumer.
    pub fn enqueue(&self, conn: &Rc<Conn>, frame: Rc<[u8]>) {
        self.deliver_undelivered();
        if conn.close.get().is_some() {
            return;
        }
        let limit = self.config().max_outbound_queue;
        match conn.out.borrow_mut().push(frame, limit) {
            Push::Queued => self.mark_dirty(conn),
            Push::Full => conn.request_close(CloseRequest {
                code: Some(close::SLOW_CONSUMER),
                reason: "slow consumer",
            }),
        }
    }

    /// Queues a frame that must go out even past the queue limit (replies, pongs, close).
    pub fn enqueue_control(&self, conn: &Rc<Conn>, frame: Rc<[u8]>) {
        self.deliver_undelivered();
        conn.out.borrow_mut().push_unbounded(frame);
        self.mark_dirty(conn);
    }

    fn mark_dirty(&self, conn: &Rc<Conn>) {
        if !conn.dirty.replace(true) {
            let mut dirty = self.dirty.borrow_mut();
            dirty.push(Rc::clone(conn));
            if dirty.len() == 1 {
                drop(dirty);
                self.wake_flusher();
            }
        }
    }

    fn wake_flusher(&self) {
        if let Some(waker) = self.flusher.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Writes every dirty connection once, after the other ready tasks have queued their frames,
    /// so that several frames for one connection leave in one system call.
    async fn flush_loop(self: Rc<Self>) {
        let mut batch = Vec::new();
        loop {
            poll_fn(|cx| {
                if self.dirty.borrow().is_empty() && self.undelivered.borrow().is_empty() {
                    *self.flusher.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            self.take_dirty(&mut batch);
            for conn in batch.drain(..) {
                self.flush(&conn);
            }
        }
    }

    /// Queues the held messages, then moves the connections with frames queued since the last
    /// call to the end of `batch`. Their marks are cleared: the next queued frame marks them
    /// again.
    pub fn take_dirty(&self, batch: &mut Vec<Rc<Conn>>) {
        self.deliver_undelivered();
        let start = batch.len();
        batch.append(&mut self.dirty.borrow_mut());
        for conn in &batch[start..] {
            conn.dirty.set(false);
        }
    }

    /// Writes as much of the connection's queue as the socket takes without blocking.
    pub fn flush(&self, conn: &Conn) {
        if conn.closed.get() || conn.write_blocked.get() {
            return;
        }
        match conn.out.borrow_mut().write_to(conn.fd) {
            Ok(true) => {}
            Ok(false) => {
                // The send buffer is full: the task waits for the socket to become writable.
                conn.write_blocked.set(true);
                conn.wake_task();
            }
            Err(error) => {
                if let Some(suppressed) = self
                    .write_errors
                    .borrow_mut()
                    .record(Duration::from_secs(10))
                {
                    debug!(self.log, "write failed"; "conn_id" => conn.id, "error" => %error, "suppressed" => suppressed);
                }
                conn.request_close(CloseRequest {
                    code: None,
                    reason: "write failed",
                });
            }
        }
    }

    /// Sends pings on schedule and closes connections that stay silent after one.
    async fn heartbeat_loop(self: Rc<Self>) {
        let config = self.config();
        let tick = (config.ping_interval.min(config.pong_timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1));
        loop {
            glommio::timer::sleep(tick).await;
            let now = Instant::now();
            let conns: Vec<Rc<Conn>> = self
                .conns
                .borrow()
                .iter()
                .map(|(_, c)| Rc::clone(c))
                .collect();
            for conn in conns {
                self.check_heartbeat(&conn, now);
            }
        }
    }

    fn check_heartbeat(&self, conn: &Rc<Conn>, now: Instant) {
        if conn.close.get().is_some() {
            return;
        }
        let config = self.config();
        if let Some(mut ping) = conn.ping.get() {
            if conn.last_seen.get() > ping.queued_at {
                conn.ping.set(None);
            } else if let Some(since) = ping.on_wire_since {
                if now.duration_since(since) >= config.pong_timeout {
                    info!(self.log, "heartbeat timeout"; "conn_id" => conn.id);
                    conn.request_close(CloseRequest {
                        code: Some(close::HEARTBEAT_TIMEOUT),
                        reason: "heartbeat timeout",
                    });
                }
                return;
            } else {
                // The pong timeout counts from when the ping left the queue, so that a client
                // still receiving a long backlog is not blamed for the node's own queue.
                if conn.out.borrow().written_total() >= ping.written_at_mark {
                    ping.on_wire_since = Some(now);
                    conn.ping.set(Some(ping));
                }
                return;
            }
        }
        if now >= conn.next_ping.get() {
            conn.next_ping.set(now + config.ping_interval);
            self.enqueue_control(conn, Rc::clone(&self.ping_frame));
            let mark = conn.out.borrow().queued_total();
            conn.ping.set(Some(PendingPing {
                queued_at: now,
                written_at_mark: mark,
                on_wire_since: None,
            }));
        }
    }

    /// Returns this core's open connection count and subscription pattern count.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.conns.borrow().len(),
            self.index.borrow().pattern_count(),
        )
    }
}
