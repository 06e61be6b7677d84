//! The link's main task on its own thread: takes publishes and interest changes from the worker
//! cores, hands them to one publisher and one subscriber task per Redis master, writes the
//! registry entry, and follows the Redis Cluster slot table.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{info, warn, Logger};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::connection::{self, Backoff};
use super::interest::RedisSub;
use super::publisher::{self, Outgoing, PublisherHandle};
use super::registry;
use super::resp;
use super::router::{encode_announcement, Router};
use super::settings::{LinkSettings, Mode};
use super::status::{Component, LinkStatus, Transition};
use super::subscriber::{self, SubscriberHandle};
use super::topology::{Endpoint, Topology};
use crate::bus::Publication;
use crate::core::NodeShared;
use crate::logging::RepeatCounter;

/// Maximum queued publishes or interest changes handled before the driver lets other tasks run.
const INTAKE_BATCH: usize = 4096;

/// Time between slot table refreshes when no task requests one.
const PERIODIC_REFRESH: Duration = Duration::from_secs(30);

/// Shortest time between two slot table refreshes.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(500);

/// A worker core's first subscriber of a pattern arrived (`added`) or its last one left.
#[derive(Debug)]
pub struct InterestChange {
    /// The core.
    pub core: usize,
    /// The pattern, as the client sent it.
    pub pattern: Box<str>,
    /// Whether the pattern was added.
    pub added: bool,
}

/// The queues from the worker cores and the shutdown signal.
pub struct Inputs {
    /// Publishes by local clients.
    pub publishes: UnboundedReceiver<Arc<Publication>>,
    /// Interest changes of the cores.
    pub interest: UnboundedReceiver<InterestChange>,
    /// Fires when the node has drained and the link should leave the cluster.
    pub shutdown: oneshot::Receiver<()>,
}

/// State shared by the tasks of the link thread.
pub struct Context {
    /// Settings.
    pub settings: LinkSettings,
    /// Health shared with the cores.
    pub status: Arc<LinkStatus>,
    /// The node, for its core inboxes and connection count.
    pub node: Arc<NodeShared>,
    /// The address the node listens on.
    pub listen: SocketAddr,
    /// Random id of this process in the cluster, the origin of its messages.
    pub instance: u64,
    /// Start time, in seconds since the Unix epoch.
    pub started_at: u64,
    /// The link's logger.
    pub log: Logger,
    /// Interest and routing.
    pub router: RefCell<Router>,
    /// The Redis servers; `None` until the first slot table of a Redis Cluster arrives.
    pub topology: RefCell<Option<Topology>>,
    /// Classic channel on which nodes of a Redis Cluster announce their wildcard patterns. `#`
    /// cannot appear in a topic, so no client topic maps to it.
    pub announcement_channel: String,
    /// Bytes of publishes accepted from the cores and not yet written to Redis.
    pub backlog: Arc<AtomicUsize>,
    refresh: Notify,
}

/// State shared by the link handle and its thread, fixed at creation except for the status and
/// the backlog counter.
pub struct Shared {
    /// Settings.
    pub settings: LinkSettings,
    /// Health.
    pub status: Arc<LinkStatus>,
    /// Bytes of publishes accepted from the cores and not yet written to Redis.
    pub backlog: Arc<AtomicUsize>,
    /// Random id of this process in the cluster.
    pub instance: u64,
    /// Start time, in seconds since the Unix epoch.
    pub started_at: u64,
}

impl Context {
    /// Creates the context of the link thread of `node`, which listens on `listen`.
    pub fn new(shared: &Shared, node: Arc<NodeShared>, listen: SocketAddr, log: Logger) -> Context {
        let settings = shared.settings.clone();
        let cluster = matches!(settings.mode, Mode::Cluster(_));
        let mut interest = super::interest::Interest::new(&settings.prefix, cluster);
        let announcement_channel = format!("{}#wildcards", settings.prefix);
        if cluster {
            interest.pin(RedisSub::Channel(announcement_channel.clone().into()));
        }
        let router = Router::new(
            interest,
            &settings.prefix,
            shared.instance,
            node.cores.len(),
        );
        Context {
            settings,
            status: Arc::clone(&shared.status),
            node,
            listen,
            instance: shared.instance,
            started_at: shared.started_at,
            log,
            router: RefCell::new(router),
            topology: RefCell::new(None),
            announcement_channel,
            backlog: Arc::clone(&shared.backlog),
            refresh: Notify::new(),
        }
    }

    /// Returns whether the link talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.settings.mode, Mode::Cluster(_))
    }

    /// Asks for a fresh slot table (Redis Cluster mode; otherwise nothing happens).
    pub fn request_refresh(&self) {
        if self.is_cluster() {
            self.refresh.notify_one();
        }
    }

    /// Records a connection's state and logs when the link as a whole goes up or down.
    pub fn set_status(&self, component: Component, error: Option<String>) {
        let transition = self.status.set(component, error);
        self.log_transition(transition);
    }

    /// Forgets a connection that was closed on purpose.
    pub fn remove_status(&self, component: &Component) {
        let transition = self.status.remove(component);
        self.log_transition(transition);
    }

    fn log_transition(&self, transition: Option<Transition>) {
        match transition {
            Some(Transition::Up) => info!(self.log, "cluster link up"),
            Some(Transition::Down(reason)) => {
                warn!(self.log, "cluster link down"; "reason" => reason)
            }
            None => {}
        }
    }

    /// Takes `bytes` off the publish backlog.
    pub fn release_backlog(&self, bytes: usize) {
        self.backlog.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Routes one message from Redis to the cores.
    pub fn route(&self, channel: &[u8], payload: &[u8]) {
        let mut router = self.router.borrow_mut();
        let _ = router.route(channel, payload, &self.node.cores, &self.log);
    }
}

/// The driver's own state.
struct Driver {
    ctx: Rc<Context>,
    subscribers: BTreeMap<Endpoint, Rc<SubscriberHandle>>,
    publishers: BTreeMap<Endpoint, Rc<PublisherHandle>>,
    tasks: Vec<JoinHandle<()>>,
    refresh_task: Option<JoinHandle<()>>,
    seq: u64,
    unroutable: RepeatCounter,
}

/// Runs the link until the shutdown signal, then leaves the cluster.
pub async fn run(ctx: Rc<Context>, mut inputs: Inputs) {
    let topology_changed = Rc::new(Notify::new());
    let mut driver = Driver {
        ctx: Rc::clone(&ctx),
        subscribers: BTreeMap::new(),
        publishers: BTreeMap::new(),
        tasks: Vec::new(),
        refresh_task: None,
        seq: 0,
        unroutable: RepeatCounter::default(),
    };
    match &ctx.settings.mode {
        Mode::Single(endpoint) => {
            *ctx.topology.borrow_mut() = Some(Topology::single(endpoint.clone()));
            ctx.set_status(Component::Topology, None);
            driver.apply_topology();
        }
        Mode::Cluster(_) => {
            let refresh = refresh_loop(Rc::clone(&ctx), Rc::clone(&topology_changed));
            driver.refresh_task = Some(tokio::task::spawn_local(refresh));
        }
    }

    let mut registry_tick = tokio::time::interval(ctx.settings.registry_interval);
    registry_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(publication) = inputs.publishes.recv() => {
                driver.dispatch(publication);
                for _ in 1..INTAKE_BATCH {
                    let Ok(publication) = inputs.publishes.try_recv() else { break };
                    driver.dispatch(publication);
                }
            }
            Some(change) = inputs.interest.recv() => {
                let mut changes = vec![change];
                while changes.len() < INTAKE_BATCH {
                    let Ok(change) = inputs.interest.try_recv() else { break };
                    changes.push(change);
                }
                driver.apply_interest(changes);
            }
            _ = registry_tick.tick() => driver.tick(),
            _ = topology_changed.notified() => driver.apply_topology(),
            _ = &mut inputs.shutdown => break,
        }
        tokio::task::yield_now().await;
    }
    driver.shutdown().await;
}

impl Driver {
    /// Starts a publisher and a subscriber task for each new master, stops those of former
    /// masters, and makes every subscriber compare all its subscriptions.
    fn apply_topology(&mut self) {
        let masters: BTreeSet<Endpoint> = match self.ctx.topology.borrow().as_ref() {
            Some(topology) => topology.masters.iter().cloned().collect(),
            None => return,
        };
        self.subscribers.retain(|endpoint, handle| {
            let keep = masters.contains(endpoint);
            if !keep {
                handle.stop();
            }
            keep
        });
        self.publishers.retain(|endpoint, handle| {
            let keep = masters.contains(endpoint);
            if !keep {
                handle.stop();
            }
            keep
        });
        for endpoint in masters {
            if !self.subscribers.contains_key(&endpoint) {
                let handle = SubscriberHandle::new(endpoint.clone());
                let task = subscriber::run(Rc::clone(&self.ctx), Rc::clone(&handle));
                self.tasks.push(tokio::task::spawn_local(task));
                self.subscribers.insert(endpoint.clone(), handle);
            }
            if !self.publishers.contains_key(&endpoint) {
                let (handle, queue) = PublisherHandle::new(endpoint.clone());
                let task = publisher::run(Rc::clone(&self.ctx), Rc::clone(&handle), queue);
                self.tasks.push(tokio::task::spawn_local(task));
                self.publishers.insert(endpoint, handle);
            }
        }
        for handle in self.subscribers.values() {
            handle.mark_all_dirty();
            handle.wake();
        }
        self.tasks.retain(|task| !task.is_finished());
    }

    /// Returns the master that owns `channel`, or with `None` the first master, which carries
    /// the classic subscriptions and the wildcard announcements.
    fn owner(&self, channel: Option<&[u8]>) -> Option<Endpoint> {
        let topology = self.ctx.topology.borrow();
        let topology = topology.as_ref()?;
        let index = match channel {
            Some(channel) => topology.owner(channel)?,
            None => 0,
        };
        topology.masters.get(index).cloned()
    }

    /// Hands one local publish to the publisher of the master that owns its channel.
    fn dispatch(&mut self, publication: Arc<Publication>) {
        let ctx = &self.ctx;
        let bytes = publication.frame.len();
        let owner = if ctx.is_cluster() {
            let channel = format!("{}{}", ctx.settings.prefix, publication.topic);
            self.owner(Some(channel.as_bytes()))
        } else {
            self.owner(None)
        };
        let Some(handle) = owner.and_then(|endpoint| self.publishers.get(&endpoint)) else {
            ctx.release_backlog(bytes);
            if let Some(suppressed) = self.unroutable.record(Duration::from_secs(10)) {
                warn!(ctx.log, "publish dropped: no Redis master serves its channel";
                    "topic" => &*publication.topic, "suppressed" => suppressed);
            }
            return;
        };
        self.seq += 1;
        let classic_copy = ctx.is_cluster()
            && ctx
                .router
                .borrow()
                .remote_wildcards
                .wants(&publication.topic);
        let item = Outgoing::Publish {
            publication,
            seq: self.seq,
            classic_copy,
        };
        if handle.send(item).is_err() {
            ctx.release_backlog(bytes);
        }
    }

    /// Applies interest changes and wakes the subscribers whose subscriptions changed.
    fn apply_interest(&mut self, changes: Vec<InterestChange>) {
        let mut touched = BTreeSet::new();
        for change in changes {
            let changed = self.ctx.router.borrow_mut().interest.apply(
                change.core,
                &change.pattern,
                change.added,
            );
            let Some(sub) = changed else { continue };
            let owner = match &sub {
                RedisSub::Sharded(channel) => self.owner(Some(channel.as_bytes())),
                RedisSub::Channel(_) | RedisSub::Pattern(_) => self.owner(None),
            };
            // Without a topology there is no subscriber yet; its first sync covers the change.
            if let Some(handle) = owner.and_then(|endpoint| self.subscribers.get(&endpoint)) {
                handle.mark_dirty(sub);
                touched.insert(handle.endpoint.clone());
            }
        }
        for endpoint in touched {
            if let Some(handle) = self.subscribers.get(&endpoint) {
                handle.wake();
            }
        }
        let changed = self
            .ctx
            .router
            .borrow_mut()
            .interest
            .take_changed_wildcards()
            .is_some();
        if changed && self.ctx.is_cluster() {
            self.announce_wildcards();
        }
    }

    /// Publishes this node's wildcard patterns on the announcement channel.
    fn announce_wildcards(&self) {
        let ctx = &self.ctx;
        let message = {
            let router = ctx.router.borrow();
            encode_announcement(
                ctx.instance,
                &ctx.settings.node_id,
                &router.interest.wildcards(),
            )
        };
        let mut command = Vec::with_capacity(message.len() + 64);
        resp::push_command(
            &mut command,
            &[b"PUBLISH", ctx.announcement_channel.as_bytes(), &message],
        );
        self.send_command(None, command);
    }

    /// Sends a command to the master that owns `key`, or with `None` to the first master.
    fn send_command(&self, key: Option<&[u8]>, command: Vec<u8>) {
        if let Some(handle) = self
            .owner(key)
            .and_then(|endpoint| self.publishers.get(&endpoint))
        {
            let _ = handle.send(Outgoing::Command(command));
        }
    }

    /// Writes the registry entry, repeats the wildcard announcement and drops state about quiet
    /// nodes.
    fn tick(&mut self) {
        let ctx = &self.ctx;
        let key = ctx.settings.registry_key();
        let expiry = ctx.settings.registry_interval * 3;
        let value = {
            let router = ctx.router.borrow();
            let patterns = router.interest.patterns();
            let names = patterns.iter().map(|pattern| &**pattern);
            let listen = ctx.listen.to_string();
            registry::Entry {
                node_id: &ctx.settings.node_id,
                listen: &listen,
                started_at: ctx.started_at,
                connections: ctx.node.connections.load(Ordering::Relaxed),
                patterns: names,
                pattern_count: patterns.len(),
                link: if ctx.status.is_up() { "up" } else { "down" },
            }
            .encode()
        };
        let expiry_ms = expiry.as_millis().to_string();
        let mut command = Vec::with_capacity(value.len() + 64);
        resp::push_command(
            &mut command,
            &[b"SET", key.as_bytes(), &value, b"PX", expiry_ms.as_bytes()],
        );
        self.send_command(Some(key.as_bytes()), command);

        ctx.router.borrow_mut().forget_idle(Instant::now(), expiry);
        let has_wildcards = !ctx.router.borrow().interest.wildcards().is_empty();
        if ctx.is_cluster() && has_wildcards {
            self.announce_wildcards();
        }
        self.tasks.retain(|task| !task.is_finished());
    }

    /// Deletes the registry entry, withdraws the wildcard announcement, unsubscribes and waits
    /// for every task to end, at most `redis_timeout` plus one second.
    async fn shutdown(self) {
        let ctx = &self.ctx;
        if let Some(task) = &self.refresh_task {
            task.abort();
        }

        let key = ctx.settings.registry_key();
        let mut command = Vec::new();
        resp::push_command(&mut command, &[b"DEL", key.as_bytes()]);
        self.send_command(Some(key.as_bytes()), command);
        if ctx.is_cluster() {
            // An empty list withdraws this node's wildcards at once instead of at expiry.
            let mut command = Vec::new();
            let message = encode_announcement(ctx.instance, &ctx.settings.node_id, &[]);
            resp::push_command(
                &mut command,
                &[b"PUBLISH", ctx.announcement_channel.as_bytes(), &message],
            );
            self.send_command(None, command);
        }

        for handle in self.subscribers.values() {
            handle.stop();
        }
        for handle in self.publishers.values() {
            handle.stop();
        }

        let deadline = ctx.settings.timeout + Duration::from_secs(1);
        let all_done = async {
            for task in self.tasks {
                if !task.is_finished() {
                    let _ = task.await;
                }
            }
        };
        if tokio::time::timeout(deadline, all_done).await.is_err() {
            warn!(ctx.log, "cluster link tasks still running at shutdown");
        }
    }
}

/// Keeps the Redis Cluster slot table fresh: at start, when a task requests it (MOVED, lost
/// connection, dropped shard channel) and every 30 s.
async fn refresh_loop(ctx: Rc<Context>, changed: Rc<Notify>) {
    let mut backoff = Backoff::default();
    loop {
        match fetch_topology(&ctx).await {
            Ok(topology) => {
                backoff.reset();
                let uncovered = topology.uncovered_slots();
                let error =
                    (uncovered > 0).then(|| format!("{uncovered} hash slots have no master"));
                let differs = ctx.topology.borrow().as_ref() != Some(&topology);
                if differs {
                    info!(ctx.log, "redis cluster slot table changed"; "masters" => topology.masters.len());
                    *ctx.topology.borrow_mut() = Some(topology);
                    changed.notify_one();
                }
                ctx.set_status(Component::Topology, error);
                tokio::select! {
                    _ = ctx.refresh.notified() => {}
                    _ = tokio::time::sleep(PERIODIC_REFRESH) => {}
                }
                tokio::time::sleep(MIN_REFRESH_GAP).await;
            }
            Err(error) => {
                ctx.set_status(Component::Topology, Some(error));
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Sends `CLUSTER SLOTS` to the known masters, then to the seed nodes, until one replies.
async fn fetch_topology(ctx: &Context) -> Result<Topology, String> {
    let mut candidates: Vec<Endpoint> = match ctx.topology.borrow().as_ref() {
        Some(topology) => topology.masters.clone(),
        None => Vec::new(),
    };
    if let Mode::Cluster(seeds) = &ctx.settings.mode {
        candidates.extend(
            seeds
                .iter()
                .filter(|seed| !candidates.contains(seed))
                .cloned()
                .collect::<Vec<_>>(),
        );
    }
    let name = format!("nexus-{}-admin", ctx.settings.node_id);
    let timeout = ctx.settings.timeout;
    let mut last_error = "no Redis Cluster node to ask".to_owned();
    for endpoint in candidates {
        let attempt = async {
            let mut connection =
                connection::open(&endpoint, &ctx.settings.auth, &name, timeout).await?;
            let mut command = Vec::new();
            resp::push_command(&mut command, &["CLUSTER", "SLOTS"]);
            connection::write_all(&mut connection.writer, &command, timeout).await?;
            tokio::time::timeout(timeout, connection.reader.next())
                .await
                .map_err(|_| connection::timed_out("CLUSTER SLOTS"))?
        };
        match attempt.await {
            Ok(resp::Reply::Error(error)) => {
                last_error = format!("CLUSTER SLOTS on {endpoint} failed: {error}")
            }
            Ok(reply) => return Topology::from_cluster_slots(&reply, &endpoint),
            Err(error) => last_error = format!("cannot reach {endpoint}: {error}"),
        }
    }
    Err(last_error)
}
