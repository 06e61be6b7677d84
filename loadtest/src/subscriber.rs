//! Subscriber connections: setup, the delivery hot path and reconnects.
//!
//! Per delivery a subscriber searches the stamp, updates one sequence track,
//! records one histogram value and one in-flight receipt. Everything else
//! (counters, buckets) is per read or per connection.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, timeout};

use crate::cli::{Protocol, RunConfig, Scenario};
use crate::payload::{Stamp, PUSHER_EVENT};
use crate::placement::TopicCycle;
use crate::procfs::now_ns;
use crate::report::{add_to_bucket, Counts};
use crate::shard::{Phase, Shard};
use crate::track::{Arrival, SeqTrack};
use crate::frame::{self, Event, FrameError, FrameReader, MaskSource};
use crate::ws::{self, ConnectError, WsUrl};

/// Connection attempts per subscriber during setup.
const SETUP_ATTEMPTS: u32 = 3;

/// Largest message a subscriber accepts, in bytes.
const MAX_MESSAGE: usize = 1 << 20;

/// First and longest pause between reconnect attempts in a storm.
const RECONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// What one subscriber does: where, on which topic, and whom it hears.
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

/// Why a connection's read loop returned.
enum Outcome {
    Stop,
    StormNow,
    /// The connection ended; the reason is a short stable key.
    Dropped(String),
}

/// Per-connection protocol state and the subscriber's own counters.
struct State {
    protocol: Protocol,
    tracks: Vec<SeqTrack>,
    first_sender: u32,
    cycle: TopicCycle,
    counts: Counts,
    /// Deliveries in the current read.
    batch: u64,
    established: bool,
    subscribed: bool,
    setup_error: Option<String>,
    closed: Option<Option<u16>>,
    /// Framed replies waiting to be written.
    replies: Vec<u8>,
    masks: MaskSource,
}

struct Subscriber {
    shard: Rc<Shard>,
    spec: SubSpec,
    reader: FrameReader,
    state: State,
}

/// Runs one subscriber: sets it up, reports on `ready`, then serves
/// deliveries until the shard stops.
pub async fn run(shard: Rc<Shard>, spec: SubSpec, ready: mpsc::UnboundedSender<Result<(), String>>) {
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
        let capacity = if shard.config.scenario.publishes() { 16 * 1024 } else { 1024 };
        let masks = MaskSource::new(shard.next_seed());
        Subscriber {
            reader: FrameReader::new(capacity, MAX_MESSAGE),
            state: State {
                protocol: shard.config.common.protocol,
                tracks: vec![SeqTrack::default(); spec.senders as usize],
                first_sender: spec.first_sender,
                cycle: spec.cycle,
                counts: Counts::default(),
                batch: 0,
                established: false,
                subscribed: false,
                setup_error: None,
                closed: None,
                replies: Vec::new(),
                masks,
            },
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
                connect.subscribed_us.record(started.elapsed().as_micros() as u64);
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
        self.subscribe(&mut stream).await.map_err(OpenError::Subscribe)?;
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
            self.write_replies(stream).await.map_err(|error| error.to_string())?;
            if self.state.subscribed {
                return Ok(());
            }
            if self.state.closed.is_some() {
                return Err("server closed the connection before confirming the subscription".into());
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
    async fn serve(&mut self, stream: &mut TcpStream, phase: &mut watch::Receiver<Phase>) -> Outcome {
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
        let result = reader.read_events(|event| state.on_event(shard, event, now_ns, measure_start_ns));
        if state.batch > 0 {
            if let Some(timeline) = timeline {
                let mut report = shard.report.borrow_mut();
                add_to_bucket(&mut report.delivery_buckets, timeline.bucket(now_ns), state.batch);
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
        let end = self.shard.timeline().map_or(dropped, |timeline| timeline.end);
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
        report.storm.reconnect_us.record(dropped.elapsed().as_micros() as u64);
        report.storm.last_back_ns = report.storm.last_back_ns.max(Some(now_ns()));
        shard.storm_down.set(shard.storm_down.get().saturating_sub(1));
        shard.storm_changed.notify_one();
    }

    fn record_disconnect(&mut self, reason: &str) {
        self.state.counts.disconnects += 1;
        self.shard.report.borrow_mut().count_error(&format!("disconnect:{reason}"));
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

impl State {
    fn start_session(&mut self) {
        self.established = false;
        self.subscribed = false;
        self.setup_error = None;
        self.closed = None;
        self.replies.clear();
    }

    /// Frames a message for the server and queues it.
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.masks.next_mask();
        frame::write_frame(&mut self.replies, opcode, payload, mask);
    }

    fn on_event(&mut self, shard: &Shard, event: Event<'_>, now_ns: i64, measure_start_ns: i64) {
        match event {
            Event::Text(text) => match shard.finder.find(text) {
                Some(stamp) => self.on_delivery(shard, stamp, now_ns, measure_start_ns),
                None => self.on_control(shard, text),
            },
            Event::Binary(_) => self.counts.unparsed += 1,
            Event::Ping(payload) => self.queue(frame::OPCODE_PONG, payload),
            Event::Pong => {}
            Event::Close(code) => {
                let echo = code.map(u16::to_be_bytes);
                self.queue(frame::OPCODE_CLOSE, echo.as_ref().map_or(&[][..], |code| &code[..]));
                self.closed = Some(code);
            }
        }
    }

    /// The hot path: one stamped message arrived.
    fn on_delivery(&mut self, shard: &Shard, stamp: Stamp, now_ns: i64, measure_start_ns: i64) {
        self.counts.received += 1;
        self.batch += 1;
        let slot = stamp.publisher.wrapping_sub(self.first_sender) as usize;
        match self.tracks.get_mut(slot) {
            Some(track) => match track.observe(self.cycle.topic_seq(stamp.seq)) {
                Arrival::InOrder => {}
                Arrival::Duplicate => self.counts.duplicated += 1,
                Arrival::Late => self.counts.out_of_order += 1,
            },
            None => self.counts.unexpected += 1,
        }
        if stamp.sent_ns >= measure_start_ns {
            let micros = (now_ns - stamp.sent_ns).max(0) as u64 / 1000;
            shard.report.borrow_mut().latency_us.record(micros);
        }
        shard.inflight.on_delivery(stamp.publisher, stamp.seq);
    }

    /// Handles a text message without a stamp: confirmations, errors and
    /// Pusher pings.
    fn on_control(&mut self, shard: &Shard, text: &[u8]) {
        let has = |needle: &str| memmem::find(text, needle.as_bytes()).is_some();
        let (confirmed, error, ours) = match self.protocol {
            Protocol::Nexus => (
                has(r#""type":"subscribed""#),
                has(r#""type":"error""#),
                has(r#""type":"message""#),
            ),
            Protocol::Pusher => {
                if has("pusher:connection_established") {
                    self.established = true;
                    return;
                }
                if has("pusher:ping") {
                    self.queue(frame::OPCODE_TEXT, br#"{"event":"pusher:pong","data":{}}"#);
                    return;
                }
                (
                    has("pusher_internal:subscription_succeeded"),
                    has("pusher:error"),
                    has(&format!(r#""event":"{PUSHER_EVENT}""#)),
                )
            }
        };
        if confirmed {
            self.subscribed = true;
        } else if error {
            let code = error_code(text);
            shard.report.borrow_mut().count_error(&format!("subscriber:{code}"));
            if !self.subscribed {
                self.setup_error = Some(format!(
                    "subscription rejected: {}",
                    String::from_utf8_lossy(text)
                ));
            }
        } else if ours {
            self.counts.unparsed += 1;
        }
    }
}

/// Reads what the socket holds into `reader`; `None` when nothing was there.
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

fn subscribe_request(protocol: Protocol, spec: &SubSpec) -> String {
    match protocol {
        Protocol::Nexus => format!(
            r#"{{"action":"SUBSCRIBE","topic":"{}","id":{}}}"#,
            spec.topic_name, spec.index
        ),
        Protocol::Pusher => format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"{}"}}}}"#,
            spec.topic_name
        ),
    }
}

/// Returns the `code` of a NexusNode error or of a Pusher error's data.
pub fn error_code(text: &[u8]) -> String {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(text) else {
        return "invalid_json".to_string();
    };
    let code = value
        .get("code")
        .or_else(|| value.get("data").and_then(|data| data.get("code")));
    match code {
        Some(serde_json::Value::String(code)) => code.clone(),
        Some(other) => other.to_string(),
        None => "unknown".to_string(),
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
