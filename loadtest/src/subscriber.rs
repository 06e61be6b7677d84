//! Subscriber connections: setup, the read loop and storm reconnects.
//!
//! Messages are handled by the subscriber's [`Inbox`]; counters and
//! delivery buckets are updated per read or per connection, not per message.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout};

use crate::cli::Protocol;
use crate::config::{RunConfig, Scenario};
use crate::frame::{self, FrameError, FrameReader, MaskSource};
use crate::inbox::{subscribe_request, Inbox};
use crate::placement::TopicCycle;
use crate::procfs::now_ns;
use crate::report::add_to_bucket;
use crate::shard::{Phase, Shard};
use crate::ws::{self, ConnectError, WsUrl};

/// Connection attempts per subscriber during setup.
const SETUP_ATTEMPTS: u32 = 3;

/// Largest message a subscriber accepts, in bytes.
const MAX_MESSAGE: usize = 1 << 20;

/// First and longest pause between reconnect attempts in a storm.
const RECONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Settings of one subscriber: node, topic and the publishers it receives
/// from.
pub struct SubSpec {
    pub index: u32,
    pub url: WsUrl,
    pub bind: Option<IpAddr>,
    pub topic: u32,
    pub topic_name: String,
    pub first_sender: u32,
    pub senders: u32,
    /// Topics of the senders, to turn a publisher's counter into the
    /// position on this topic.
    pub cycle: TopicCycle,
}

impl SubSpec {
    pub fn new(config: &RunConfig, index: u32) -> SubSpec {
        let placement = &config.placement;
        let url = &config.urls[placement.subscriber_url(index)];
        let url = match config.common.protocol {
            Protocol::Nexus => url.clone(),
            Protocol::Pusher => url.with_resource(format!(
                "/app/{}?protocol=7&client=nexus-loadtest&version={}",
                config.common.app_key,
                env!("CARGO_PKG_VERSION")
            )),
        };
        let topic = placement.subscriber_topic(index);
        let (first_sender, senders) = placement.senders_of(index);
        let cycle = placement.publisher_topics(first_sender);
        SubSpec {
            index,
            url,
            bind: config.bind_ip(index),
            topic,
            topic_name: config.topic_name(topic),
            first_sender,
            senders,
            cycle,
        }
    }
}

/// Reason a connection's read loop returned.
enum Outcome {
    Stop,
    StormNow,
    /// The connection ended; the reason is a short stable key.
    Dropped(String),
}

struct Subscriber {
    shard: Rc<Shard>,
    spec: SubSpec,
    reader: FrameReader,
    state: Inbox,
}

/// Runs one subscriber: sets it up, reports on `ready`, then serves
/// deliveries until the shard stops.
pub async fn run(
    shard: Rc<Shard>,
    spec: SubSpec,
    ready: mpsc::UnboundedSender<Result<(), String>>,
) {
    let mut phase = shard.phase.subscribe();
    let mut subscriber = Subscriber::new(shard, spec);
    let mut stream = match subscriber.open_for_setup().await {
        Ok(stream) => stream,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let storm = subscriber.shard.config.scenario == Scenario::Storm;
    loop {
        match subscriber.serve(&mut stream, &mut phase).await {
            Outcome::Stop => break,
            Outcome::StormNow | Outcome::Dropped(_) if storm => {
                drop(stream);
                match subscriber.reconnect(&phase).await {
                    Some(next) => stream = next,
                    None => break,
                }
            }
            // Only the storm scenario sets `Phase::Storm`.
            Outcome::StormNow => break,
            Outcome::Dropped(reason) => {
                subscriber.record_disconnect(&reason);
                break;
            }
        }
    }
    subscriber.flush_counts();
}

impl Subscriber {
    fn new(shard: Rc<Shard>, spec: SubSpec) -> Subscriber {
        let capacity = if shard.config.scenario.publishes() {
            16 * 1024
        } else {
            1024
        };
        let masks = MaskSource::new(shard.next_seed());
        Subscriber {
            reader: FrameReader::new(capacity, MAX_MESSAGE),
            state: Inbox::new(
                shard.config.common.protocol,
                spec.first_sender,
                spec.senders,
                spec.cycle,
                masks,
            ),
            shard,
            spec,
        }
    }

    /// Connects and subscribes during setup, retrying a few times, and
    /// records the connection statistics.
    async fn open_for_setup(&mut self) -> Result<TcpStream, String> {
        let mut attempt = 1;
        loop {
            let shard = self.shard.clone();
            let permit = shard.connect_slots.acquire().await;
            shard.pace_connect().await;
            let result = self.open_measured().await;
            drop(permit);
            match result {
                Ok(stream) => return Ok(stream),
                Err(error) if attempt >= SETUP_ATTEMPTS => {
                    return Err(format!(
                        "subscriber {} cannot subscribe to {} at {} after {attempt} attempts: {error}",
                        self.spec.index, self.spec.topic_name, self.spec.url.text
                    ));
                }
                Err(_) => sleep(Duration::from_millis(200) * attempt).await,
            }
            attempt += 1;
        }
    }

    async fn open_measured(&mut self) -> Result<TcpStream, String> {
        let started = Instant::now();
        {
            let mut report = self.shard.report.borrow_mut();
            report.connect.attempts += 1;
            let start_ns = now_ns();
            let first = report.connect.first_start_ns.get_or_insert(start_ns);
            *first = (*first).min(start_ns);
        }
        let limit = self.shard.config.connect_timeout;
        let result = match timeout(limit, self.open()).await {
            Ok(result) => result,
            Err(_) => Err(OpenError::Connect(ConnectError::TimedOut)),
        };
        let mut report = self.shard.report.borrow_mut();
        match result {
            Ok((stream, handshake)) => {
                let connect = &mut report.connect;
                connect.connected += 1;
                connect.handshake_us.record(handshake.as_micros() as u64);
                connect
                    .subscribed_us
                    .record(started.elapsed().as_micros() as u64);
                connect.last_ready_ns = connect.last_ready_ns.max(Some(now_ns()));
                Ok(stream)
            }
            Err(error) => {
                report.connect.failures += 1;
                report.count_error(&format!("connect:{}", error.kind()));
                Err(error.to_string())
            }
        }
    }

    /// Connects, subscribes, and returns the stream with the handshake time.
    async fn open(&mut self) -> Result<(TcpStream, Duration), OpenError> {
        let started = Instant::now();
        let mut stream = ws::connect(
            &self.spec.url,
            self.spec.bind,
            &mut self.reader,
            &mut self.state.masks,
        )
        .await
        .map_err(OpenError::Connect)?;
        let handshake = started.elapsed();
        self.subscribe(&mut stream)
            .await
            .map_err(OpenError::Subscribe)?;
        Ok((stream, handshake))
    }

    /// Sends the subscription and reads until the server confirms it.
    async fn subscribe(&mut self, stream: &mut TcpStream) -> Result<(), String> {
        self.state.start_session();
        let mut sent = false;
        loop {
            self.process(now_ns()).map_err(|error| error.to_string())?;
            if let Some(error) = self.state.setup_error.take() {
                return Err(error);
            }
            if !sent && (self.state.protocol == Protocol::Nexus || self.state.established) {
                let request = subscribe_request(self.state.protocol, &self.spec);
                self.state.queue(frame::OPCODE_TEXT, request.as_bytes());
                sent = true;
            }
            self.write_replies(stream)
                .await
                .map_err(|error| error.to_string())?;
            if self.state.subscribed {
                return Ok(());
            }
            if self.state.closed.is_some() {
                return Err(
                    "server closed the connection before confirming the subscription".into(),
                );
            }
            let read = stream
                .read(self.reader.spare())
                .await
                .map_err(|error| error.to_string())?;
            if read == 0 {
                return Err("connection closed before the subscription was confirmed".into());
            }
            self.reader.filled(read);
        }
    }

    /// Reads and handles messages until the phase or the connection ends.
    async fn serve(
        &mut self,
        stream: &mut TcpStream,
        phase: &mut watch::Receiver<Phase>,
    ) -> Outcome {
        // React to the current phase only if it is the end: a client back
        // from a storm must not take the storm phase as a new order.
        if *phase.borrow_and_update() == Phase::Stop {
            return Outcome::Stop;
        }
        loop {
            let read = tokio::select! {
                biased;
                changed = phase.changed() => {
                    let next = if changed.is_ok() { *phase.borrow_and_update() } else { Phase::Stop };
                    match phase_outcome(next) {
                        Some(outcome) => return outcome,
                        None => continue,
                    }
                }
                ready = stream.readable() => ready.and_then(|()| read_available(stream, &mut self.reader)),
            };
            match read {
                Ok(None) => continue,
                Ok(Some(0)) => return Outcome::Dropped("eof".to_string()),
                Ok(Some(count)) => self.reader.filled(count),
                Err(error) => return Outcome::Dropped(io_reason(&error)),
            }
            if let Err(error) = self.process(now_ns()) {
                return Outcome::Dropped(format!("frame_error:{error}"));
            }
            if let Err(error) = self.write_replies(stream).await {
                return Outcome::Dropped(io_reason(&error));
            }
            if let Some(code) = self.state.closed {
                return Outcome::Dropped(format!("close_{}", code.unwrap_or(1005)));
            }
        }
    }

    /// Handles every complete message in the buffer.
    fn process(&mut self, now_ns: i64) -> Result<(), FrameError> {
        let Subscriber {
            shard,
            reader,
            state,
            ..
        } = self;
        let timeline = shard.timeline();
        let measure_start_ns = timeline.map_or(i64::MAX, |timeline| timeline.measure_start_ns);
        state.batch = 0;
        let result =
            reader.read_events(|event| state.on_event(shard, event, now_ns, measure_start_ns));
        if state.batch > 0 {
            if let Some(timeline) = timeline {
                let mut report = shard.report.borrow_mut();
                add_to_bucket(
                    &mut report.delivery_buckets,
                    timeline.bucket(now_ns),
                    state.batch,
                );
            }
            shard.last_delivery_ns.set(now_ns);
        }
        result
    }

    async fn write_replies(&mut self, stream: &mut TcpStream) -> std::io::Result<()> {
        if self.state.replies.is_empty() {
            return Ok(());
        }
        let result = stream.write_all(&self.state.replies).await;
        self.state.replies.clear();
        result
    }

    /// Reconnects after a drop until it succeeds or the run ends, and
    /// records the storm statistics.
    async fn reconnect(&mut self, phase: &watch::Receiver<Phase>) -> Option<TcpStream> {
        let dropped = Instant::now();
        self.record_drop();
        let end = self
            .shard
            .timeline()
            .map_or(dropped, |timeline| timeline.end);
        let mut backoff = RECONNECT_BACKOFF.0;
        loop {
            let now = Instant::now();
            if now >= end || *phase.borrow() == Phase::Stop {
                return None;
            }
            self.shard.report.borrow_mut().storm.attempts += 1;
            let limit = self.shard.config.connect_timeout.min(end - now);
            let result = match timeout(limit, self.open()).await {
                Ok(result) => result,
                Err(_) => Err(OpenError::Connect(ConnectError::TimedOut)),
            };
            match result {
                Ok((stream, _)) => {
                    self.record_back(dropped);
                    return Some(stream);
                }
                Err(error) => {
                    let mut report = self.shard.report.borrow_mut();
                    report.storm.failures += 1;
                    report.count_error(&format!("reconnect:{}", error.kind()));
                }
            }
            let jitter = 0.5 + (self.state.masks.next_u64() % 1000) as f64 / 1000.0;
            let pause = backoff.mul_f64(jitter);
            sleep_until((Instant::now() + pause).min(end).into()).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
        }
    }

    fn record_drop(&mut self) {
        let shard = &self.shard;
        if self.state.counts.disconnects == 0 {
            shard.storm_hit.set(shard.storm_hit.get() + 1);
        }
        self.state.counts.disconnects += 1;
        let mut report = shard.report.borrow_mut();
        report.storm.dropped += 1;
        let drop_ns = now_ns();
        let first = report.storm.first_drop_ns.get_or_insert(drop_ns);
        *first = (*first).min(drop_ns);
        shard.storm_down.set(shard.storm_down.get() + 1);
    }

    fn record_back(&mut self, dropped: Instant) {
        let shard = &self.shard;
        let mut report = shard.report.borrow_mut();
        report.storm.reconnected += 1;
        report
            .storm
            .reconnect_us
            .record(dropped.elapsed().as_micros() as u64);
        report.storm.last_back_ns = report.storm.last_back_ns.max(Some(now_ns()));
        shard
            .storm_down
            .set(shard.storm_down.get().saturating_sub(1));
        shard.storm_changed.notify_one();
    }

    fn record_disconnect(&mut self, reason: &str) {
        self.state.counts.disconnects += 1;
        self.shard
            .report
            .borrow_mut()
            .count_error(&format!("disconnect:{reason}"));
        self.shard.inflight.on_subscriber_lost(self.spec.topic);
    }

    /// Adds this subscriber's counters to the shard report.
    fn flush_counts(&mut self) {
        let counts = std::mem::take(&mut self.state.counts);
        let mut report = self.shard.report.borrow_mut();
        let total = &mut report.counts;
        total.received += counts.received;
        total.duplicated += counts.duplicated;
        total.out_of_order += counts.out_of_order;
        total.unexpected += counts.unexpected;
        total.unparsed += counts.unparsed;
        if self.shard.config.scenario != Scenario::Storm {
            total.disconnects += counts.disconnects;
        }
    }
}

/// Reads the bytes the socket has received into `reader`, or returns `None`
/// when there were none.
///
/// A read shorter than the free space means the socket is drained, so the
/// readiness is cleared at once instead of by a second `read` that would
/// only return `WouldBlock`; that saves one syscall per wakeup. This is
/// sound on a current-thread runtime only: the I/O driver cannot record new
/// readiness between the read and the clear, and data that arrives later
/// raises a new edge-triggered event.
fn read_available(stream: &TcpStream, reader: &mut FrameReader) -> std::io::Result<Option<usize>> {
    let spare = reader.spare();
    let capacity = spare.len();
    match stream.try_read(spare) {
        Ok(count) => {
            if count > 0 && count < capacity {
                let drained = || Err::<(), _>(std::io::ErrorKind::WouldBlock.into());
                let _ = stream.try_io(Interest::READABLE, drained);
            }
            Ok(Some(count))
        }
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(error) => Err(error),
    }
}

fn phase_outcome(phase: Phase) -> Option<Outcome> {
    match phase {
        Phase::Setup | Phase::Running => None,
        Phase::Storm => Some(Outcome::StormNow),
        Phase::Stop => Some(Outcome::Stop),
    }
}

fn io_reason(error: &std::io::Error) -> String {
    format!("io_{:?}", error.kind()).to_lowercase()
}

/// Failure to connect or to subscribe.
enum OpenError {
    Connect(ConnectError),
    Subscribe(String),
}

impl OpenError {
    fn kind(&self) -> String {
        match self {
            OpenError::Connect(error) => error.kind(),
            OpenError::Subscribe(_) => "subscribe_failed".to_string(),
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Connect(error) => write!(f, "{error}"),
            OpenError::Subscribe(error) => write!(f, "{error}"),
        }
    }
}
