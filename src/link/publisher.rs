//! The publishing connection to one Redis server.
//!
//! Publishes are written in the order the driver hands them over, many per write, without
//! waiting for replies in between (pipelining). Redis runs one connection's commands in order,
//! so messages of one client connection to one topic reach every node in publish order. Replies
//! are counted: a command unanswered for `redis_timeout` marks the connection dead.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slog::{debug, info, warn, Logger};
use tokio::sync::mpsc::{error::TryRecvError, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use super::connection::{self, Backoff, Connection};
use super::driver::Context;
use super::envelope;
use super::resp::{self, Reply};
use super::status::Component;
use super::topology::Endpoint;
use crate::bus::Publication;
use crate::logging::RepeatCounter;

/// Maximum commands written in one system call.
const MAX_BATCH_COMMANDS: usize = 1024;

/// Bytes after which a batch is written even if more publishes are queued.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Something to send on a publishing connection.
pub enum Outgoing {
    /// A message from a local client.
    Publish {
        /// The message.
        publication: Arc<Publication>,
        /// This node's sequence number for it.
        seq: u64,
        /// Also PUBLISH it on the classic channel, for wildcard subscribers of a Redis Cluster.
        classic_copy: bool,
    },
    /// An encoded command whose reply is only checked for an error (registry, announcements).
    Command(Vec<u8>),
}

impl Outgoing {
    /// Returns the publish backlog bytes this item holds.
    fn backlog_bytes(&self) -> usize {
        match self {
            Outgoing::Publish { publication, .. } => publication.frame.len(),
            Outgoing::Command(_) => 0,
        }
    }
}

/// Shared between the driver and one publisher task.
pub struct PublisherHandle {
    /// The server this task publishes to.
    pub endpoint: Endpoint,
    sender: UnboundedSender<Outgoing>,
    stop: Cell<bool>,
    wake: Notify,
}

impl PublisherHandle {
    /// Creates the handle and the queue its task reads.
    pub fn new(endpoint: Endpoint) -> (Rc<PublisherHandle>, UnboundedReceiver<Outgoing>) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let handle = Rc::new(PublisherHandle {
            endpoint,
            sender,
            stop: Cell::new(false),
            wake: Notify::new(),
        });
        (handle, receiver)
    }

    /// Queues an item; it is dropped when the task has ended.
    pub fn send(&self, item: Outgoing) -> Result<(), Outgoing> {
        self.sender.send(item).map_err(|error| error.0)
    }

    /// Makes the task write what is queued, wait for the replies (at most `redis_timeout`) and
    /// end.
    pub fn stop(&self) {
        self.stop.set(true);
        self.wake.notify_one();
    }
}

/// Runs the publishing connection of `handle` until it is stopped.
pub async fn run(
    ctx: Rc<Context>,
    handle: Rc<PublisherHandle>,
    mut queue: UnboundedReceiver<Outgoing>,
) {
    let component = Component::Publisher(handle.endpoint.clone());
    let name = format!("nexus-{}-pub", ctx.settings.node_id);
    let log = ctx
        .log
        .new(slog::o!("redis" => handle.endpoint.to_string(), "role" => "publish"));
    let mut backoff = Backoff::default();
    let mut failures = RepeatCounter::default();
    while !handle.stop.get() {
        let opened = connection::open(
            &handle.endpoint,
            &ctx.settings.auth,
            &name,
            ctx.settings.timeout,
        )
        .await;
        let error = match opened {
            Ok(connection) => {
                debug!(log, "redis connection opened");
                backoff.reset();
                ctx.set_status(component.clone(), None);
                match serve(&ctx, &handle, connection, &mut queue, &log).await {
                    Ok(()) => break,
                    Err(error) => error,
                }
            }
            Err(error) => format!("connect failed: {error}"),
        };
        ctx.set_status(component.clone(), Some(error.clone()));
        if ctx.is_cluster() {
            ctx.request_refresh();
        }
        let delay = backoff.next_delay();
        if let Some(suppressed) = failures.record(Duration::from_secs(10)) {
            warn!(log, "redis connection lost"; "error" => %error,
                "retry_ms" => delay.as_millis() as u64, "suppressed" => suppressed);
        }
        discard_until(&ctx, &handle, &mut queue, Instant::now() + delay, &log).await;
    }
    ctx.remove_status(&component);
    info!(log, "redis publishing connection closed");
}

/// Drops what arrives while the connection is down, until `deadline` or a stop. The cores stop
/// handing over publishes once the status is down, so these were accepted just before.
async fn discard_until(
    ctx: &Context,
    handle: &PublisherHandle,
    queue: &mut UnboundedReceiver<Outgoing>,
    deadline: Instant,
    log: &Logger,
) {
    let mut dropped = 0_u64;
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => break,
            _ = handle.wake.notified() => break,
            item = queue.recv() => match item {
                Some(item) => {
                    ctx.release_backlog(item.backlog_bytes());
                    dropped += u64::from(matches!(item, Outgoing::Publish { .. }));
                }
                None => break,
            },
        }
    }
    if dropped > 0 {
        warn!(log, "publishes dropped while Redis is unreachable"; "count" => dropped);
    }
}

/// Replies still expected, per batch written: when it was written and how many are left.
type Pending = VecDeque<(Instant, usize)>;

/// Serves one connection until it fails (`Err` with the reason) or the task is stopped.
async fn serve(
    ctx: &Context,
    handle: &PublisherHandle,
    connection: Connection,
    queue: &mut UnboundedReceiver<Outgoing>,
    log: &Logger,
) -> Result<(), String> {
    let Connection {
        mut reader,
        mut writer,
    } = connection;
    let timeout = ctx.settings.timeout;
    let mut pending = Pending::new();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut errors = RepeatCounter::default();
    let mut ticker = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = queue.recv() => {
                let Some(item) = item else { return Ok(()) };
                out.clear();
                let mut commands = encode(ctx, &item, &mut out);
                while commands < MAX_BATCH_COMMANDS && out.len() < MAX_BATCH_BYTES {
                    match queue.try_recv() {
                        Ok(item) => commands += encode(ctx, &item, &mut out),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                connection::write_all(&mut writer, &out, timeout).await.map_err(|e| e.to_string())?;
                pending.push_back((Instant::now(), commands));
            }
            reply = reader.next() => {
                let reply = reply.map_err(|error| format!("read failed: {error}"))?;
                acknowledge(&mut pending)?;
                if let Reply::Error(error) = reply {
                    report_error(ctx, &error, &mut errors, log);
                }
            }
            _ = ticker.tick() => check_overdue(&pending, timeout)?,
            _ = handle.wake.notified() => {
                if handle.stop.get() {
                    return finish(ctx, &mut reader, &mut writer, queue, pending).await;
                }
            }
        }
    }
}

/// Writes what is still queued and waits for every reply, at most `redis_timeout`.
async fn finish(
    ctx: &Context,
    reader: &mut connection::Reader,
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    queue: &mut UnboundedReceiver<Outgoing>,
    mut pending: Pending,
) -> Result<(), String> {
    let timeout = ctx.settings.timeout;
    let mut out = Vec::new();
    let mut commands = 0;
    while let Ok(item) = queue.try_recv() {
        commands += encode(ctx, &item, &mut out);
    }
    connection::write_all(writer, &out, timeout)
        .await
        .map_err(|e| e.to_string())?;
    pending.push_back((Instant::now(), commands));
    let drained = tokio::time::timeout(timeout, async {
        while pending.iter().any(|(_, left)| *left > 0) {
            reader.next().await?;
            let _ = acknowledge(&mut pending);
        }
        Ok::<(), std::io::Error>(())
    });
    match drained.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("replies still missing at shutdown".to_owned()),
    }
}

/// Appends the commands for one item; returns how many replies they will get.
fn encode(ctx: &Context, item: &Outgoing, out: &mut Vec<u8>) -> usize {
    match item {
        Outgoing::Command(command) => {
            out.extend_from_slice(command);
            1
        }
        Outgoing::Publish {
            publication,
            seq,
            classic_copy,
        } => {
            ctx.release_backlog(publication.frame.len());
            let cluster = ctx.is_cluster();
            let verb: &[u8] = if cluster { b"SPUBLISH" } else { b"PUBLISH" };
            push_publish(
                out,
                verb,
                &ctx.settings.prefix,
                publication,
                ctx.instance,
                *seq,
            );
            if cluster && *classic_copy {
                push_publish(
                    out,
                    b"PUBLISH",
                    &ctx.settings.prefix,
                    publication,
                    ctx.instance,
                    *seq,
                );
                return 2;
            }
            1
        }
    }
}

/// Appends `verb <prefix><topic> <envelope>` without building the payload separately.
fn push_publish(
    out: &mut Vec<u8>,
    verb: &[u8],
    prefix: &str,
    publication: &Publication,
    origin: u64,
    seq: u64,
) {
    resp::push_array_header(out, 3);
    resp::push_bulk(out, verb);
    resp::push_bulk_header(out, prefix.len() + publication.topic.len());
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(publication.topic.as_bytes());
    out.extend_from_slice(b"\r\n");
    resp::push_bulk_header(out, envelope::HEADER_LEN + publication.frame.len());
    envelope::push_header(out, origin, seq);
    out.extend_from_slice(&publication.frame);
    out.extend_from_slice(b"\r\n");
}

/// Counts one reply against the oldest batch.
fn acknowledge(pending: &mut Pending) -> Result<(), String> {
    loop {
        let Some((_, left)) = pending.front_mut() else {
            return Err("Redis sent a reply to no command".to_owned());
        };
        if *left == 0 {
            pending.pop_front();
            continue;
        }
        *left -= 1;
        if *left == 0 {
            pending.pop_front();
        }
        return Ok(());
    }
}

fn check_overdue(pending: &Pending, timeout: Duration) -> Result<(), String> {
    match pending.front() {
        Some((written, _)) if written.elapsed() > timeout => Err(format!(
            "no reply from Redis within {} ms",
            timeout.as_millis()
        )),
        _ => Ok(()),
    }
}

fn report_error(ctx: &Context, error: &str, errors: &mut RepeatCounter, log: &Logger) {
    // A shard channel whose slot moved: the slot table is stale. The message is lost.
    if error.starts_with("MOVED") || error.starts_with("ASK") {
        ctx.request_refresh();
    }
    if let Some(suppressed) = errors.record(Duration::from_secs(10)) {
        warn!(log, "redis command failed"; "error" => error, "suppressed" => suppressed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_delivery;

    #[test]
    fn publish_command_carries_envelope_and_frame() {
        let frame = encode_delivery("a.b", b"1");
        let publication = Publication {
            topic: "a.b".into(),
            frame: frame.clone().into(),
        };
        let mut out = Vec::new();
        push_publish(&mut out, b"PUBLISH", "p:", &publication, 7, 3);
        let (reply, used) = resp::parse(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        let items = reply.as_array().unwrap();
        assert_eq!(items[0].as_bytes(), Some(&b"PUBLISH"[..]));
        assert_eq!(items[1].as_bytes(), Some(&b"p:a.b"[..]));
        let parsed = envelope::parse(items[2].as_bytes().unwrap()).unwrap();
        assert_eq!((parsed.origin, parsed.seq), (7, 3));
        assert_eq!(parsed.frame, &frame[..]);
    }

    #[test]
    fn replies_are_counted_per_batch() {
        let mut pending = Pending::new();
        pending.push_back((Instant::now(), 2));
        pending.push_back((Instant::now(), 0));
        pending.push_back((Instant::now(), 1));
        assert!(acknowledge(&mut pending).is_ok());
        assert!(acknowledge(&mut pending).is_ok());
        assert!(acknowledge(&mut pending).is_ok());
        assert!(pending.is_empty());
        assert!(acknowledge(&mut pending).is_err());
    }

    #[test]
    fn overdue_reply_is_an_error() {
        let mut pending = Pending::new();
        assert!(check_overdue(&pending, Duration::from_millis(1)).is_ok());
        pending.push_back((Instant::now() - Duration::from_secs(1), 1));
        assert!(check_overdue(&pending, Duration::from_millis(10)).is_err());
    }
}
