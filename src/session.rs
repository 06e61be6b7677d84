//! The WebSocket session of one connection: frames in, requests handled, replies queued.

use std::rc::Rc;

use slog::{trace, Logger};
use tungstenite::protocol::frame::coding::Control;

use crate::codes::ErrorCode;
use crate::core::{Conn, Core};
use crate::protocol::{self, Action, Request};
use crate::topic::{self, TopicError};
use crate::ws::{self, Decode, FrameInfo, FrameKind, WsError};

/// A partly written buffer above this capacity is released once empty, in bytes.
const KEEP_CAPACITY: usize = 4096;

/// The connection's next step after a batch of bytes.
#[derive(Debug)]
pub enum Step {
    /// Keep reading.
    Continue,
    /// Close with the error's close code.
    Close(WsError),
    /// The client sent a close frame with this code.
    ClientClose(Option<u16>),
}

/// A message whose frames have not all arrived.
struct Fragment {
    kind: FrameKind,
    payload: Vec<u8>,
}

/// Inbound state of one connection: the incomplete frame, if any, and the fragmented message.
pub struct Reader {
    partial: Vec<u8>,
    fragment: Option<Fragment>,
}

impl Reader {
    /// Creates a reader that starts with bytes received along with the handshake.
    pub fn new(leftover: Vec<u8>) -> Reader {
        Reader {
            partial: leftover,
            fragment: None,
        }
    }

    /// Returns whether no received bytes wait for processing.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Handles newly read bytes: every complete frame is acted on, a trailing partial frame is
    /// kept for the next read.
    pub fn feed(&mut self, fresh: &mut [u8], core: &Core, conn: &Rc<Conn>, log: &Logger) -> Step {
        if self.partial.is_empty() {
            let (consumed, step) = self.frames(fresh, core, conn, log);
            self.partial.extend_from_slice(&fresh[consumed..]);
            return step;
        }
        let mut buffer = std::mem::take(&mut self.partial);
        buffer.extend_from_slice(fresh);
        let (consumed, step) = self.frames(&mut buffer, core, conn, log);
        buffer.drain(..consumed);
        if buffer.is_empty() && buffer.capacity() > KEEP_CAPACITY {
            buffer = Vec::new();
        }
        self.partial = buffer;
        step
    }

    fn frames(
        &mut self,
        buf: &mut [u8],
        core: &Core,
        conn: &Rc<Conn>,
        log: &Logger,
    ) -> (usize, Step) {
        let max = core.config().max_message_size;
        let mut pos = 0;
        loop {
            let fragmented = self.fragment.as_ref().map(|f| f.payload.len());
            match ws::decode_frame(&mut buf[pos..], fragmented, max) {
                Err(error) => return (pos, Step::Close(error)),
                Ok(Decode::Incomplete { .. }) => return (pos, Step::Continue),
                Ok(Decode::Frame(info)) => {
                    let payload = &buf[pos + info.payload_start..pos + info.end];
                    let step = self.on_frame(info, payload, core, conn, log);
                    pos += info.end;
                    if !matches!(step, Step::Continue) {
                        return (pos, step);
                    }
                }
            }
        }
    }

    fn on_frame(
        &mut self,
        info: FrameInfo,
        payload: &[u8],
        core: &Core,
        conn: &Rc<Conn>,
        log: &Logger,
    ) -> Step {
        match info.kind {
            FrameKind::Text | FrameKind::Binary if info.fin => {
                on_message(info.kind, payload, core, conn, log)
            }
            FrameKind::Text | FrameKind::Binary => {
                self.fragment = Some(Fragment {
                    kind: info.kind,
                    payload: payload.to_vec(),
                });
                Step::Continue
            }
            FrameKind::Continuation => {
                let Some(fragment) = self.fragment.as_mut() else {
                    return Step::Close(WsError::Protocol("continuation frame without a message"));
                };
                fragment.payload.extend_from_slice(payload);
                if !info.fin {
                    return Step::Continue;
                }
                let Fragment { kind, payload } =
                    self.fragment.take().expect("fragment checked above");
                on_message(kind, &payload, core, conn, log)
            }
            FrameKind::Ping => {
                // RFC 6455 5.5.3: the pong for a ping carries the same payload.
                let pong = ws::encode_control(Control::Pong, payload);
                core.enqueue(conn, Rc::from(pong));
                Step::Continue
            }
            FrameKind::Pong => Step::Continue,
            FrameKind::Close => match ws::parse_close(payload) {
                Ok(code) => Step::ClientClose(code),
                Err(error) => Step::Close(error),
            },
        }
    }
}

fn on_message(kind: FrameKind, payload: &[u8], core: &Core, conn: &Rc<Conn>, log: &Logger) -> Step {
    if kind == FrameKind::Binary {
        let message = "binary messages are not enabled on this node; send JSON text messages";
        reply(
            core,
            conn,
            protocol::encode_error(ErrorCode::BinaryNotSupported, message, None),
        );
        return Step::Continue;
    }
    // RFC 6455 8.1: a text message that is not UTF-8 fails the connection with 1007.
    if std::str::from_utf8(payload).is_err() {
        return Step::Close(WsError::InvalidUtf8);
    }
    match protocol::parse_request(payload) {
        Ok(request) => handle_request(request, core, conn, log),
        Err(error) => {
            let frame = protocol::encode_error(error.code, &error.message, error.id.as_deref());
            reply(core, conn, frame);
        }
    }
    Step::Continue
}

fn handle_request(request: Request<'_>, core: &Core, conn: &Rc<Conn>, log: &Logger) {
    trace!(log, "request";
        "conn_id" => conn.id, "action" => request.action.as_str(), "topic" => request.topic.as_deref());
    let id = request.id;
    let result = match request.action {
        Action::Ping => Ok(protocol::encode_reply("pong", None, id)),
        Action::Subscribe => subscribe(&request, core, conn),
        Action::Unsubscribe => unsubscribe(&request, core, conn),
        Action::Publish => publish(&request, core),
    };
    match result {
        Ok(frame) if !frame.is_empty() => reply(core, conn, frame),
        Ok(_) => {}
        Err((code, message)) => reply(core, conn, protocol::encode_error(code, &message, id)),
    }
}

type Outcome = Result<Vec<u8>, (ErrorCode, String)>;

fn required_topic<'r>(request: &'r Request<'_>) -> Result<&'r str, (ErrorCode, String)> {
    request
        .topic
        .as_deref()
        .ok_or((ErrorCode::MissingTopic, "missing `topic`".to_owned()))
}

fn topic_error(error: TopicError) -> (ErrorCode, String) {
    let code = match error.code() {
        "topic_too_long" => ErrorCode::TopicTooLong,
        "wildcard_publish" => ErrorCode::WildcardPublish,
        _ => ErrorCode::InvalidTopic,
    };
    (code, error.to_string())
}

fn subscribe(request: &Request<'_>, core: &Core, conn: &Rc<Conn>) -> Outcome {
    let pattern = required_topic(request)?;
    topic::validate_pattern(pattern, core.config().max_topic_length).map_err(topic_error)?;

    let held = conn.patterns.borrow().iter().any(|p| &**p == pattern);
    if !held {
        let max = core.config().max_subscriptions;
        if conn.patterns.borrow().len() >= max {
            let message =
                format!("this connection already holds the maximum of {max} subscriptions");
            return Err((ErrorCode::TooManySubscriptions, message));
        }
        core.add_subscription(pattern, conn);
        conn.patterns.borrow_mut().push(pattern.into());
    }
    Ok(protocol::encode_reply(
        "subscribed",
        Some(pattern),
        request.id,
    ))
}

fn unsubscribe(request: &Request<'_>, core: &Core, conn: &Rc<Conn>) -> Outcome {
    let pattern = required_topic(request)?;
    topic::validate_pattern(pattern, core.config().max_topic_length).map_err(topic_error)?;
    let position = conn.patterns.borrow().iter().position(|p| &**p == pattern);
    let Some(position) = position else {
        return Err((
            ErrorCode::NotSubscribed,
            format!("not subscribed to `{pattern}`"),
        ));
    };
    conn.patterns.borrow_mut().swap_remove(position);
    core.remove_subscription(pattern, conn.key);
    Ok(protocol::encode_reply(
        "unsubscribed",
        Some(pattern),
        request.id,
    ))
}

fn publish(request: &Request<'_>, core: &Core) -> Outcome {
    let topic = required_topic(request)?;
    topic::validate_topic(topic, core.config().max_topic_length).map_err(topic_error)?;
    let Some(data) = request.data else {
        return Err((
            ErrorCode::MissingData,
            "missing `data`; use null for an empty message".to_owned(),
        ));
    };
    let frame = protocol::encode_delivery(topic, data);
    core.publish(topic, frame)
        .map_err(|down| (ErrorCode::ClusterUnavailable, down.to_string()))?;
    match request.id {
        Some(id) => Ok(protocol::encode_reply("published", Some(topic), Some(id))),
        None => Ok(Vec::new()),
    }
}

fn reply(core: &Core, conn: &Rc<Conn>, frame: Vec<u8>) {
    core.enqueue(conn, Rc::from(frame));
}
