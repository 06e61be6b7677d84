//! Publishers: paced by a fixed rate, by the in-flight window, or both.
//!
//! A publisher sends its due messages in batches: one clock read and one
//! socket write per batch. With `--rate`, message `k` of a publisher is due
//! `k / rate` seconds after the start; a publisher that falls behind sends
//! what is due at once. Latency counts from the moment of the write, not
//! from the scheduled time.
//!
//! Pusher publishers send through [`crate::http_pool`] instead: one request
//! per message, up to [`crate::http_pool::SLOTS`] at a time.

use std::io;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::sleep_until;

use crate::cli::Protocol;
use crate::config::RunConfig;
use crate::frame::{self, Event, FrameReader, MaskSource};
use crate::http_pool::{HttpPool, Job, Target};
use crate::inbox::error_code;
use crate::payload::{write_publish, Stamp};
use crate::placement::TopicCycle;
use crate::procfs::now_ns;
use crate::pusher::App;
use crate::report::add_to_bucket;
use crate::shard::{Shard, Timeline};
use crate::ws::{self, WsUrl};

/// Maximum messages written in one batch.
const MAX_BATCH: u64 = 256;

/// Shortest wait before a publisher gives up on missing receipts.
const MIN_GIVE_UP: Duration = Duration::from_secs(1);

/// Settings of one publisher: node, topics, message cap and rate.
pub struct PubSpec {
    pub index: u32,
    pub url: WsUrl,
    pub bind: Option<IpAddr>,
    pub cycle: TopicCycle,
    /// Topic names by position in `cycle`.
    pub topic_names: Vec<String>,
    /// Subscribers per topic, by position in `cycle`.
    pub receivers: Vec<u64>,
    /// Maximum messages this publisher sends.
    pub cap: u64,
    /// Messages per second for this publisher.
    pub rate: Option<f64>,
}

impl PubSpec {
    pub fn new(config: &RunConfig, index: u32) -> PubSpec {
        let placement = &config.placement;
        let cycle = placement.publisher_topics(index);
        let topics: Vec<u32> = (0..u64::from(cycle.count))
            .map(|seq| cycle.topic(seq))
            .collect();
        let publishers = f64::from(placement.publishers);
        PubSpec {
            index,
            url: config.urls[placement.publisher_url(index)].clone(),
            bind: config.bind_ip(placement.subscribers + index),
            cycle,
            topic_names: topics
                .iter()
                .map(|&topic| config.topic_name(topic))
                .collect(),
            receivers: topics
                .iter()
                .map(|&topic| placement.receivers(topic))
                .collect(),
            cap: config
                .common
                .messages
                .map_or(u64::MAX, |total| placement.publisher_cap(index, total)),
            rate: config.rate.map(|rate| rate / publishers),
        }
    }
}

/// A publisher's connection.
enum Conn {
    Nexus(WsConn),
    Pusher(HttpPool),
}

struct WsConn {
    stream: TcpStream,
    reader: FrameReader,
    masks: MaskSource,
    scratch: Vec<u8>,
    replies: Vec<u8>,
}

/// A connected publisher, ready to run.
pub struct Client {
    spec: PubSpec,
    conn: Conn,
}

/// Connects publisher `spec` during setup.
pub async fn connect(shard: &Rc<Shard>, spec: PubSpec) -> Result<Client, String> {
    let config = &shard.config;
    let failed = |error: String| {
        format!(
            "publisher {} cannot connect to {}: {error}",
            spec.index, spec.url.text
        )
    };
    let conn = match config.common.protocol {
        Protocol::Nexus => {
            let mut reader = FrameReader::new(4096, 1 << 20);
            let mut masks = MaskSource::new(shard.next_seed());
            let connecting = ws::connect(&spec.url, spec.bind, &mut reader, &mut masks);
            let stream = tokio::time::timeout(config.connect_timeout, connecting)
                .await
                .map_err(|_| failed("timed out".to_string()))?
                .map_err(|error| failed(error.to_string()))?;
            Conn::Nexus(WsConn {
                stream,
                reader,
                masks,
                scratch: Vec::new(),
                replies: Vec::new(),
            })
        }
        Protocol::Pusher => {
            let app = App {
                id: config.common.app_id.clone(),
                key: config.common.app_key.clone(),
                secret: config.common.app_secret.clone(),
            };
            let target = Target {
                addr: spec.url.addr,
                bind: spec.bind,
                publisher: spec.index,
                size: config.common.size,
                topics: spec.topic_names.clone(),
            };
            let connecting = HttpPool::connect(shard, &spec.url, &app, target);
            let pool = tokio::time::timeout(config.connect_timeout, connecting)
                .await
                .map_err(|_| failed("timed out".to_string()))?
                .map_err(|error| failed(error.to_string()))?;
            Conn::Pusher(pool)
        }
    };
    Ok(Client { spec, conn })
}

/// Publishes until the end of the publishing time or the message cap.
pub async fn run(shard: Rc<Shard>, mut client: Client) {
    let Some(timeline) = shard.timeline() else {
        return;
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut seq = 0u64;
    let mut blocked_since: Option<Instant> = None;
    while Instant::now() < timeline.publish_end && seq < client.spec.cap {
        let due = client
            .spec
            .rate
            .map_or(u64::MAX, |rate| due_count(timeline.go.elapsed(), rate, seq));
        let window = shard.inflight.room(client.spec.index);
        let count = due
            .min(window)
            .min(client.conn.room())
            .min(client.spec.cap - seq)
            .min(MAX_BATCH);
        let result = if count > 0 {
            blocked_since = None;
            out.clear();
            client.write_batch(&shard, &mut out, seq, count);
            seq += count;
            client.conn.send(&out).await
        } else {
            let waiting = Waiting {
                seq,
                due,
                window,
                blocked_since: &mut blocked_since,
            };
            client.wait(&shard, &timeline, waiting).await
        };
        if let Err(error) = result {
            client.record_failure(&shard, &error);
            return;
        }
    }
    client.finish(&shard, timeline.end).await;
}

/// State of a publisher that cannot send now.
struct Waiting<'a> {
    /// Messages sent so far.
    seq: u64,
    /// Messages due by the rate schedule.
    due: u64,
    /// Room left in the in-flight window.
    window: u64,
    /// Start of the current wait for window room.
    blocked_since: &'a mut Option<Instant>,
}

/// Returns how many messages are due `elapsed` after the start at `rate`
/// per second, given that `sent` were sent; message `k` is due at `k / rate`.
fn due_count(elapsed: Duration, rate: f64, sent: u64) -> u64 {
    let due = (elapsed.as_secs_f64() * rate).floor() as u64 + 1;
    due.saturating_sub(sent)
}

impl Client {
    /// Waits until the next message is due, the in-flight window has room,
    /// a Pusher connection became idle, or the server sent something, which
    /// it handles. Gives the window up
    /// when receipts have not come for the drain time (at least 1 s).
    async fn wait(
        &mut self,
        shard: &Shard,
        timeline: &Timeline,
        waiting: Waiting<'_>,
    ) -> io::Result<()> {
        let now = Instant::now();
        let index = self.spec.index;
        let mut wake = timeline.publish_end;
        if let Some(rate) = self.spec.rate.filter(|_| waiting.due == 0) {
            let next_due = Duration::from_secs_f64(waiting.seq as f64 / rate);
            wake = wake.min(timeline.go + next_due);
        }
        if waiting.window == 0 {
            let since = *waiting.blocked_since.get_or_insert(now);
            let give_up_at = since + shard.config.drain.max(MIN_GIVE_UP);
            if now >= give_up_at {
                shard.inflight.give_up(index);
                shard.report.borrow_mut().counts.window_give_ups += 1;
                *waiting.blocked_since = None;
                return Ok(());
            }
            wake = wake.min(give_up_at);
        }
        tokio::select! {
            () = shard.inflight.changed(index), if waiting.window == 0 => Ok(()),
            () = sleep_until(wake.into()) => Ok(()),
            ready = self.conn.ready() => match ready {
                Ok(()) => self.conn.poll(shard).await,
                Err(error) => Err(error),
            },
        }
    }

    /// Writes messages `first..first + count` into `out` and records them.
    fn write_batch(&mut self, shard: &Shard, out: &mut Vec<u8>, first: u64, count: u64) {
        let sent_ns = now_ns();
        let size = shard.config.common.size;
        let mut expected = 0;
        for seq in first..first + count {
            let position = (seq % u64::from(self.spec.cycle.count)) as usize;
            let stamp = Stamp {
                sent_ns,
                seq,
                publisher: self.spec.index,
            };
            let topic = &self.spec.topic_names[position];
            expected += self.spec.receivers[position];
            match &mut self.conn {
                Conn::Nexus(conn) => conn.write_publish(out, topic, &stamp, size),
                Conn::Pusher(pool) => {
                    let job = Job {
                        seq,
                        topic: position,
                    };
                    // `run` sends at most `room()` messages per batch.
                    let dispatched = pool.dispatch(job);
                    debug_assert!(dispatched, "no idle Pusher connection");
                }
            }
        }

        // Record before sending, so that no delivery can precede its publish.
        shard.inflight.on_publish(self.spec.index, count);
        let bucket = shard
            .timeline()
            .map_or(0, |timeline| timeline.bucket(sent_ns));
        let mut report = shard.report.borrow_mut();
        report.counts.published += count;
        report.counts.expected += expected;
        add_to_bucket(&mut report.publish_buckets, bucket, count);
        report.last_publish_ns = report.last_publish_ns.max(Some(sent_ns));
    }

    fn record_failure(&self, shard: &Shard, error: &io::Error) {
        let mut report = shard.report.borrow_mut();
        report.counts.disconnects += 1;
        report.count_error(&format!("publisher:{}", io_kind(error)));
    }

    /// Closes the connection; a Pusher publisher first waits, until `end`,
    /// for the responses to its last requests.
    async fn finish(&mut self, shard: &Shard, end: Instant) {
        match &mut self.conn {
            Conn::Nexus(conn) => {
                let _ = conn.poll(shard).await;
                let mut close = Vec::new();
                frame::write_frame(
                    &mut close,
                    frame::OPCODE_CLOSE,
                    &1000u16.to_be_bytes(),
                    conn.masks.next_mask(),
                );
                let _ = conn.stream.write_all(&close).await;
            }
            Conn::Pusher(pool) => pool.finish(end).await,
        }
    }
}

impl Conn {
    fn room(&self) -> u64 {
        match self {
            Conn::Nexus(_) => u64::MAX,
            Conn::Pusher(pool) => pool.room(),
        }
    }

    /// Waits until the server sent something (NexusNode) or a connection
    /// became idle (Pusher).
    async fn ready(&self) -> io::Result<()> {
        match self {
            Conn::Nexus(conn) => conn.stream.readable().await,
            Conn::Pusher(pool) => {
                pool.room_added().await;
                Ok(())
            }
        }
    }

    /// Sends the messages of a batch; Pusher slots send their own.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Nexus(conn) => conn.stream.write_all(bytes).await,
            Conn::Pusher(_) => Ok(()),
        }
    }

    /// Handles what the server sent, without waiting for more.
    async fn poll(&mut self, shard: &Shard) -> io::Result<()> {
        match self {
            Conn::Nexus(conn) => conn.poll(shard).await,
            Conn::Pusher(_) => Ok(()),
        }
    }
}

impl WsConn {
    fn write_publish(&mut self, out: &mut Vec<u8>, topic: &str, stamp: &Stamp, size: usize) {
        self.scratch.clear();
        write_publish(&mut self.scratch, topic, stamp, size);
        frame::write_frame(
            out,
            frame::OPCODE_TEXT,
            &self.scratch,
            self.masks.next_mask(),
        );
    }

    /// Reads the bytes available without waiting, counts error replies and
    /// replies to pings with pongs.
    async fn poll(&mut self, shard: &Shard) -> io::Result<()> {
        loop {
            match self.stream.try_read(self.reader.spare()) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(count) => self.reader.filled(count),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        let mut closed = false;
        let WsConn {
            reader,
            masks,
            replies,
            ..
        } = self;
        let result = reader.read_events(|event| match event {
            Event::Text(text) => {
                if memchr::memmem::find(text, br#""type":"error""#).is_some() {
                    let mut report = shard.report.borrow_mut();
                    report.counts.publish_errors += 1;
                    report.count_error(&format!("publish:{}", error_code(text)));
                }
            }
            Event::Ping(payload) => {
                frame::write_frame(replies, frame::OPCODE_PONG, payload, masks.next_mask())
            }
            Event::Close(_) => closed = true,
            Event::Binary(_) | Event::Pong => {}
        });
        result.map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        if !self.replies.is_empty() {
            self.stream.write_all(&self.replies).await?;
            self.replies.clear();
        }
        if closed {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "server sent close",
            ));
        }
        Ok(())
    }
}

/// Returns the kind of `error` as a lowercase error code.
pub fn io_kind(error: &io::Error) -> String {
    format!("{:?}", error.kind()).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_count_follows_schedule() {
        let rate = 10.0;
        assert_eq!(due_count(Duration::ZERO, rate, 0), 1);
        assert_eq!(due_count(Duration::from_millis(99), rate, 1), 0);
        assert_eq!(due_count(Duration::from_millis(100), rate, 1), 1);
        assert_eq!(due_count(Duration::from_millis(1000), rate, 3), 8);
        assert_eq!(due_count(Duration::from_millis(50), rate, 5), 0);
    }
}
