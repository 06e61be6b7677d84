//! Handling of the messages a subscriber receives: the delivery hot path,
//! subscription confirmations, errors and pings.
//!
//! Per delivery the inbox searches the stamp, updates one sequence track,
//! records one histogram value and one in-flight receipt.

use memchr::memmem;

use crate::cli::Protocol;
use crate::frame::{self, Event, MaskSource};
use crate::payload::{Stamp, PUSHER_EVENT};
use crate::placement::TopicCycle;
use crate::report::Counts;
use crate::shard::Shard;
use crate::subscriber::SubSpec;
use crate::track::{Arrival, SeqTrack};

/// Per-connection protocol state and the counters of one subscriber.
pub struct Inbox {
    pub protocol: Protocol,
    tracks: Vec<SeqTrack>,
    first_sender: u32,
    cycle: TopicCycle,
    pub counts: Counts,
    /// Deliveries in the current read.
    pub batch: u64,
    pub established: bool,
    pub subscribed: bool,
    pub setup_error: Option<String>,
    pub closed: Option<Option<u16>>,
    /// Framed replies waiting to be written.
    pub replies: Vec<u8>,
    pub masks: MaskSource,
}

impl Inbox {
    /// Creates the inbox of a subscriber that hears `senders` publishers,
    /// numbered from `first_sender`, whose topics cycle as `cycle`.
    pub fn new(
        protocol: Protocol,
        first_sender: u32,
        senders: u32,
        cycle: TopicCycle,
        masks: MaskSource,
    ) -> Inbox {
        Inbox {
            protocol,
            tracks: vec![SeqTrack::default(); senders as usize],
            first_sender,
            cycle,
            counts: Counts::default(),
            batch: 0,
            established: false,
            subscribed: false,
            setup_error: None,
            closed: None,
            replies: Vec::new(),
            masks,
        }
    }

    /// Forgets the state of the previous connection.
    pub fn start_session(&mut self) {
        self.established = false;
        self.subscribed = false;
        self.setup_error = None;
        self.closed = None;
        self.replies.clear();
    }

    /// Frames a message for the server and queues it.
    pub fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.masks.next_mask();
        frame::write_frame(&mut self.replies, opcode, payload, mask);
    }

    /// Handles one message or control frame; `now_ns` is the time of the read.
    pub fn on_event(
        &mut self,
        shard: &Shard,
        event: Event<'_>,
        now_ns: i64,
        measure_start_ns: i64,
    ) {
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
                self.queue(
                    frame::OPCODE_CLOSE,
                    echo.as_ref().map_or(&[][..], |code| &code[..]),
                );
                self.closed = Some(code);
            }
        }
    }

    /// Records one stamped delivery; this is the hot path.
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
            shard
                .report
                .borrow_mut()
                .count_error(&format!("subscriber:{code}"));
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

/// Returns the subscription request for `spec`'s topic.
pub fn subscribe_request(protocol: Protocol, spec: &SubSpec) -> String {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use clap::Parser;

    use super::*;
    use crate::cli::Cli;
    use crate::config::RunConfig;
    use crate::payload::write_data;

    fn shard(args: &[&str]) -> Shard {
        let cli = Cli::try_parse_from(args).expect("valid options");
        let config = RunConfig::from_command(&cli.command).expect("valid config");
        Shard::new(Arc::new(config), 0)
    }

    fn inbox(protocol: Protocol, senders: u32) -> Inbox {
        let cycle = TopicCycle {
            first: 0,
            step: 1,
            count: 1,
        };
        Inbox::new(protocol, 0, senders, cycle, MaskSource::new(1))
    }

    fn delivery(publisher: u32, seq: u64, sent_ns: i64) -> Vec<u8> {
        let mut text = br#"{"type":"message","topic":"lt.0","data":"#.to_vec();
        let stamp = Stamp {
            sent_ns,
            seq,
            publisher,
        };
        write_data(&mut text, &stamp, 80, false);
        text.push(b'}');
        text
    }

    fn feed(inbox: &mut Inbox, shard: &Shard, text: &[u8]) {
        inbox.on_event(shard, Event::Text(text), 5_000_000, 1_000_000);
    }

    #[test]
    fn inbox_counts_duplicates_and_late_arrivals() {
        let shard = shard(&["t", "fanout", "--subscribers", "1", "--publishers", "2"]);
        let mut inbox = inbox(Protocol::Nexus, 2);
        for (publisher, seq) in [(0, 0), (0, 1), (0, 1), (0, 0), (1, 5), (1, 3)] {
            feed(&mut inbox, &shard, &delivery(publisher, seq, 2_000_000));
        }
        assert_eq!(inbox.counts.received, 6);
        assert_eq!(inbox.counts.duplicated, 2);
        assert_eq!(inbox.counts.out_of_order, 1);
        assert_eq!(inbox.batch, 6);
        let latency = &shard.report.borrow().latency_us;
        assert_eq!(latency.0.len(), 6);
        assert!(latency.0.equivalent(latency.0.max(), 3000));
    }

    #[test]
    fn inbox_skips_latency_before_measuring() {
        let shard = shard(&["t", "fanout", "--subscribers", "1"]);
        let mut inbox = inbox(Protocol::Nexus, 1);
        feed(&mut inbox, &shard, &delivery(0, 0, 999_999));
        feed(&mut inbox, &shard, &delivery(7, 0, 999_999));
        assert_eq!(inbox.counts.received, 2);
        assert_eq!(inbox.counts.unexpected, 1);
        assert!(shard.report.borrow().latency_us.is_empty());
    }

    #[test]
    fn inbox_handles_nexus_confirmation_and_error() {
        let shard = shard(&["t", "fanout"]);
        let mut inbox = inbox(Protocol::Nexus, 1);
        feed(
            &mut inbox,
            &shard,
            br#"{"type":"error","code":"invalid_topic","message":"bad","id":3}"#,
        );
        assert!(inbox.setup_error.is_some());
        assert_eq!(shard.report.borrow().errors["subscriber:invalid_topic"], 1);
        feed(
            &mut inbox,
            &shard,
            br#"{"type":"subscribed","topic":"lt.0","id":3}"#,
        );
        assert!(inbox.subscribed);
        feed(
            &mut inbox,
            &shard,
            br#"{"type":"message","topic":"lt.0","data":1}"#,
        );
        assert_eq!(inbox.counts.unparsed, 1);
    }

    #[test]
    fn inbox_follows_pusher_handshake_and_pings() {
        let shard = shard(&["t", "fanout", "--protocol", "pusher"]);
        let mut inbox = inbox(Protocol::Pusher, 1);
        let established = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":120}"}"#;
        feed(&mut inbox, &shard, established);
        assert!(inbox.established);
        assert!(!inbox.subscribed);
        feed(&mut inbox, &shard, br#"{"event":"pusher:ping","data":{}}"#);
        let reply = &inbox.replies;
        assert_eq!(reply[0], 0x81);
        let mut body = reply[6..].to_vec();
        frame::apply_mask(&mut body, [reply[2], reply[3], reply[4], reply[5]]);
        assert_eq!(body, br#"{"event":"pusher:pong","data":{}}"#);
        feed(
            &mut inbox,
            &shard,
            br#"{"event":"pusher_internal:subscription_succeeded","channel":"lt.0"}"#,
        );
        assert!(inbox.subscribed);
    }

    #[test]
    fn inbox_answers_ping_and_records_close() {
        let shard = shard(&["t", "fanout"]);
        let mut inbox = inbox(Protocol::Nexus, 1);
        inbox.on_event(&shard, Event::Ping(b"hi"), 0, 0);
        assert_eq!(inbox.replies[0], 0x8A);
        inbox.on_event(&shard, Event::Close(Some(1001)), 0, 0);
        assert_eq!(inbox.closed, Some(Some(1001)));
    }
}
