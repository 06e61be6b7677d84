//! The pub/sub connection to one Redis server: keeps its subscriptions equal to what the node
//! wants, routes incoming messages to the cores, and PINGs to notice a dead connection.
//!
//! After every (re)connect the connection starts from nothing and subscribes again to every
//! channel and glob the node needs, then PINGs. Redis replies in order, so the PONG arrives after
//! every subscription is in place, and only then does the connection count as up.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use slog::{debug, info, warn};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use super::connection::{self, Backoff, Connection};
use super::driver::Context;
use super::interest::{Changes, Projection, RedisSub};
use super::limits;
use super::resp::{self, Reply};
use super::status::Component;
use super::topology::{Endpoint, Topology};
use crate::logging::RepeatCounter;

/// Changes queued for one connection before they are replaced by a full comparison.
const MAX_DIRTY: usize = 100_000;

/// Shared between the driver and one subscriber task.
pub struct SubscriberHandle {
    /// The server this task subscribes on.
    pub endpoint: Endpoint,
    dirty: RefCell<Vec<RedisSub>>,
    full_sync: Cell<bool>,
    stop: Cell<bool>,
    wake: Notify,
}

impl SubscriberHandle {
    /// Creates the handle of a task for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Rc<SubscriberHandle> {
        Rc::new(SubscriberHandle {
            endpoint,
            dirty: RefCell::new(Vec::new()),
            full_sync: Cell::new(true),
            stop: Cell::new(false),
            wake: Notify::new(),
        })
    }

    /// Queues a subscription whose desired state changed; the task syncs it on its next wake-up.
    pub fn mark_dirty(&self, sub: RedisSub) {
        let mut dirty = self.dirty.borrow_mut();
        // While the connection is down nothing drains the list; past this size one full
        // comparison at reconnect is cheaper than keeping every change.
        if dirty.len() >= MAX_DIRTY {
            dirty.clear();
            self.full_sync.set(true);
        } else if !self.full_sync.get() {
            dirty.push(sub);
        }
    }

    /// Makes the task compare every subscription, as after a topology change.
    pub fn mark_all_dirty(&self) {
        self.full_sync.set(true);
    }

    /// Wakes the task to sync its subscriptions.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Makes the task unsubscribe from everything, close its connection and end.
    pub fn stop(&self) {
        self.stop.set(true);
        self.wake.notify_one();
    }
}

/// Returns whether the connection to `endpoint` is the one that should carry `sub`: the owner of
/// the channel's slot for a shard channel, the first master for classic channels and globs.
pub fn carries(topology: &Topology, endpoint: &Endpoint, sub: &RedisSub) -> bool {
    let owner = match sub {
        RedisSub::Sharded(channel) => topology.owner(channel.as_bytes()),
        RedisSub::Channel(_) | RedisSub::Pattern(_) => Some(0),
    };
    owner.and_then(|index| topology.masters.get(index)) == Some(endpoint)
}

/// Runs the pub/sub connection of `handle` until it is stopped.
pub async fn run(ctx: Rc<Context>, handle: Rc<SubscriberHandle>) {
    let component = Component::Subscriber(handle.endpoint.clone());
    let name = format!("nexus-{}-sub", ctx.settings.node_id);
    let log = ctx
        .log
        .new(slog::o!("redis" => handle.endpoint.to_string(), "role" => "pubsub"));
    let mut backoff = Backoff::default();
    let mut failures = RepeatCounter::default();
    let mut limits_checked = false;
    while !handle.stop.get() {
        let opened = connection::open(
            &handle.endpoint,
            &ctx.settings.auth,
            &name,
            ctx.settings.timeout,
        )
        .await;
        let error = match opened {
            Ok(mut connection) => {
                debug!(log, "redis connection opened");
                let checked = if limits_checked {
                    Ok(())
                } else {
                    limits::check_pubsub_limits(&ctx, &mut connection, &log).await
                };
                limits_checked |= checked.is_ok();
                match checked {
                    Ok(()) => match serve(&ctx, &handle, connection, &mut backoff).await {
                        Ok(()) => break,
                        Err(error) => error,
                    },
                    Err(error) => format!("connection setup failed: {error}"),
                }
            }
            Err(error) => format!("connect failed: {error}"),
        };
        ctx.set_status(component.clone(), Some(error.clone()));
        if ctx.is_cluster() {
            ctx.request_refresh();
        }
        let delay = backoff.next_delay();
        if let Some(suppressed) = failures.record(std::time::Duration::from_secs(10)) {
            warn!(log, "redis connection lost"; "error" => %error,
                "retry_ms" => delay.as_millis() as u64, "suppressed" => suppressed);
        }
        // Interest changes also wake the task; only a stop cuts the delay short.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        while !handle.stop.get() {
            tokio::select! {
                _ = &mut sleep => break,
                _ = handle.wake.notified() => {}
            }
        }
    }
    ctx.remove_status(&component);
    info!(log, "redis pub/sub connection closed");
}

/// Serves one connection until it fails (`Err` with the reason) or the task is stopped.
async fn serve(
    ctx: &Context,
    handle: &SubscriberHandle,
    connection: Connection,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let Connection {
        mut reader,
        mut writer,
    } = connection;
    let timeout = ctx.settings.timeout;
    let mut projection = Projection::default();
    let mut out = Vec::new();

    // Everything the node wants, then a PING whose reply proves the subscriptions are in place.
    handle.full_sync.set(true);
    sync(ctx, handle, &mut projection).encode(&mut out);
    resp::push_command(&mut out, &["PING"]);
    let mut ping_sent = Some(Instant::now());
    let mut confirmed = false;
    connection::write_all(&mut writer, &out, timeout)
        .await
        .map_err(|e| e.to_string())?;

    let mut ticker = tokio::time::interval(ctx.settings.ping_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        out.clear();
        tokio::select! {
            reply = reader.next() => {
                let reply = reply.map_err(|error| format!("read failed: {error}"))?;
                if handle_reply(ctx, handle, &mut projection, reply)? {
                    ping_sent = None;
                    if !confirmed {
                        confirmed = true;
                        backoff.reset();
                        ctx.set_status(Component::Subscriber(handle.endpoint.clone()), None);
                    }
                }
            }
            _ = handle.wake.notified() => {
                if handle.stop.get() {
                    for verb in ["UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE"] {
                        if verb != "SUNSUBSCRIBE" || ctx.is_cluster() {
                            resp::push_command(&mut out, &[verb]);
                        }
                    }
                    let _ = connection::write_all(&mut writer, &out, timeout).await;
                    return Ok(());
                }
                let changes = sync(ctx, handle, &mut projection);
                if !changes.is_empty() {
                    debug!(ctx.log, "redis subscriptions changed"; "redis" => %handle.endpoint,
                        "commands" => changes.command_count(), "subscriptions" => projection.len());
                    changes.encode(&mut out);
                }
            }
            _ = ticker.tick() => match ping_sent {
                Some(sent) if sent.elapsed() > timeout => {
                    return Err(format!("no reply to PING within {} ms", timeout.as_millis()));
                }
                Some(_) => {}
                None => {
                    resp::push_command(&mut out, &["PING"]);
                    ping_sent = Some(Instant::now());
                }
            },
        }
        if !out.is_empty() {
            connection::write_all(&mut writer, &out, timeout)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
}

/// Computes the commands that bring the connection to the desired state.
fn sync(ctx: &Context, handle: &SubscriberHandle, projection: &mut Projection) -> Changes {
    let router = ctx.router.borrow();
    let topology = ctx.topology.borrow();
    let carry = |sub: &RedisSub| {
        router.interest.is_desired(sub)
            && topology
                .as_ref()
                .is_some_and(|t| carries(t, &handle.endpoint, sub))
    };
    if handle.full_sync.take() {
        handle.dirty.borrow_mut().clear();
        let candidates: Vec<RedisSub> = router
            .interest
            .desired()
            .chain(projection.iter())
            .cloned()
            .collect();
        projection.sync(&candidates, carry)
    } else {
        let dirty = std::mem::take(&mut *handle.dirty.borrow_mut());
        projection.sync(&dirty, carry)
    }
}

/// Handles one reply or push; returns whether it was a PONG. An error reply ends the connection,
/// because the projection can no longer be trusted; the reconnect starts from a clean state.
fn handle_reply(
    ctx: &Context,
    handle: &SubscriberHandle,
    projection: &mut Projection,
    reply: Reply,
) -> Result<bool, String> {
    let items = match reply {
        Reply::Array(Some(items)) => items,
        Reply::Simple(pong) if pong == "PONG" => return Ok(true),
        Reply::Error(error) => {
            if error.starts_with("MOVED") || error.starts_with("ASK") {
                ctx.request_refresh();
            }
            return Err(format!("Redis returned an error: {error}"));
        }
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let field = |index: usize| {
        items
            .get(index)
            .and_then(Reply::as_bytes)
            .unwrap_or_default()
    };
    match field(0) {
        b"message" if field(1) == ctx.announcement_channel.as_bytes() => {
            let applied = ctx
                .router
                .borrow_mut()
                .apply_announcement(field(2), Instant::now());
            match applied {
                Ok(Some((node_id, patterns))) => debug!(ctx.log, "wildcard announcement applied";
                    "origin_node" => node_id, "patterns" => patterns),
                Ok(None) => {}
                Err(error) => warn!(ctx.log, "invalid wildcard announcement"; "error" => %error),
            }
        }
        b"message" | b"smessage" => ctx.route(field(1), field(2)),
        b"pmessage" if field(2) != ctx.announcement_channel.as_bytes() => {
            ctx.route(field(2), field(3))
        }
        b"pong" => return Ok(true),
        b"sunsubscribe" => {
            // Redis drops the shard channels of a slot that moved to another master. A channel
            // still in the projection was not unsubscribed by this task, so subscribe again once
            // the slot table is fresh.
            let sub = RedisSub::Sharded(String::from_utf8_lossy(field(1)).into());
            if projection.forget(&sub) {
                handle.mark_dirty(sub);
                handle.wake();
                ctx.request_refresh();
            }
        }
        _ => {}
    }
    Ok(false)
}
