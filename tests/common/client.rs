//! A WebSocket client on tungstenite's blocking API, with a read timeout on every call.

use super::EVENT_TIMEOUT;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// What one read returned.
#[derive(Debug)]
pub enum Incoming {
    /// A text message.
    Text(String),
    /// A close frame (None when it had no payload).
    Close(Option<CloseFrame>),
    /// The connection ended without a close frame, or failed.
    Ended(String),
    /// Nothing arrived before the timeout.
    TimedOut,
}

/// A connected WebSocket client.
///
/// Replies are matched to requests by `id`. Deliveries that arrive while a reply is awaited are
/// kept and returned by the next [`Client::recv`].
pub struct Client {
    ws: WebSocket<TcpStream>,
    /// The client's local address, which the node logs as `remote_addr`.
    pub local_addr: SocketAddr,
    pending: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects to the root path and panics if the handshake fails.
    pub fn connect(addr: SocketAddr) -> Client {
        Self::connect_path(addr, "/")
    }

    /// Connects to `path` and panics if the handshake fails.
    pub fn connect_path(addr: SocketAddr, path: &str) -> Client {
        Self::try_connect(addr, path, EVENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("WebSocket handshake with {addr}{path} failed: {e}"))
    }

    /// Connects to `path`; the error describes a failed TCP connect or handshake.
    pub fn try_connect(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Client, String> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("TCP connect to {addr} failed: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
        stream
            .set_write_timeout(Some(EVENT_TIMEOUT))
            .expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        let local_addr = stream.local_addr().expect("local_addr");
        let url = format!("ws://{addr}{path}");
        match tungstenite::client::client(url.as_str(), stream) {
            Ok((ws, _response)) => Ok(Client {
                ws,
                local_addr,
                pending: VecDeque::new(),
                next_id: 1,
            }),
            Err(HandshakeError::Failure(e)) => Err(format!("handshake failed: {e}")),
            Err(HandshakeError::Interrupted(_)) => {
                Err(format!("handshake timed out ({timeout:?})"))
            }
        }
    }

    /// Sends one text message.
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("sending {text:?} failed: {e}"));
    }

    /// Sends one binary message.
    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .unwrap_or_else(|e| panic!("sending a binary message failed: {e}"));
    }

    /// Queues one text message without flushing. [`Client::flush`] sends the queue.
    pub fn write_text(&mut self, text: &str) {
        self.ws
            .write(Message::text(text))
            .unwrap_or_else(|e| panic!("writing {text:?} failed: {e}"));
    }

    pub fn flush(&mut self) {
        self.ws
            .flush()
            .unwrap_or_else(|e| panic!("flush failed: {e}"));
    }

    /// Reads the next text message, close frame or end of connection, waiting up to `timeout`.
    ///
    /// Pings and pongs are skipped because tungstenite replies to pings by itself. A binary
    /// message panics, since the node sends only text.
    pub fn read_incoming(&mut self, timeout: Duration) -> Incoming {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = remaining.max(Duration::from_millis(1));
            self.ws
                .get_ref()
                .set_read_timeout(Some(wait))
                .expect("set_read_timeout");
            match self.ws.read() {
                Ok(Message::Text(text)) => return Incoming::Text(text.as_str().to_owned()),
                Ok(Message::Close(frame)) => return Incoming::Close(frame),
                Ok(Message::Binary(bytes)) => {
                    panic!("unexpected binary message of {} bytes", bytes.len())
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if Instant::now() >= deadline {
                        return Incoming::TimedOut;
                    }
                }
                Err(e) => return Incoming::Ended(e.to_string()),
            }
        }
    }

    /// Returns the next JSON message (kept deliveries first) and panics if none arrives within
    /// [`EVENT_TIMEOUT`].
    pub fn recv(&mut self) -> Value {
        if let Some(value) = self.pending.pop_front() {
            return value;
        }
        self.read_json(EVENT_TIMEOUT)
    }

    fn read_json(&mut self, timeout: Duration) -> Value {
        match self.read_incoming(timeout) {
            Incoming::Text(text) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the node sent text that is not JSON ({e}): {text:?}")),
            other => panic!("expected a text message within {timeout:?}, got {other:?}"),
        }
    }

    /// Returns the next message within `timeout`, or None if nothing arrives.
    pub fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(value) = self.pending.pop_front() {
            return Some(value);
        }
        match self.read_incoming(timeout) {
            Incoming::Text(text) => Some(serde_json::from_str(&text).expect("the node sent JSON")),
            Incoming::TimedOut => None,
            other => panic!("expected a text message or nothing, got {other:?}"),
        }
    }

    /// Returns the reply whose `id` is `id`, keeping deliveries that arrive before it.
    pub fn reply(&mut self, id: &Value) -> Value {
        loop {
            let value = self.read_json(EVENT_TIMEOUT);
            if value["type"] == "message" {
                self.pending.push_back(value);
            } else if &value["id"] == id {
                return value;
            } else {
                panic!("waiting for the reply with id {id}, got {value}");
            }
        }
    }

    /// Returns the next frame that is not a delivery, keeping deliveries that arrive before it.
    pub fn next_reply(&mut self) -> Value {
        loop {
            let value = self.read_json(EVENT_TIMEOUT);
            if value["type"] == "message" {
                self.pending.push_back(value);
            } else {
                return value;
            }
        }
    }

    /// Sends `request` (the text exactly) and returns the next frame that is not a delivery.
    pub fn request(&mut self, request: &str) -> Value {
        self.send_text(request);
        self.next_reply()
    }

    /// Sends `request` and asserts that the reply is an error frame with `code` and with `id`
    /// (None: the reply must have no `id`).
    pub fn expect_error(&mut self, request: &str, code: &str, id: Option<Value>) {
        let reply = self.request(request);
        assert_eq!(reply["type"], "error", "request {request}\nreply {reply}");
        assert_eq!(reply["code"], code, "request {request}\nreply {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "error without a message: {reply}");
        match id {
            Some(id) => assert_eq!(reply["id"], id, "request {request}\nreply {reply}"),
            None => assert!(
                reply.get("id").is_none(),
                "request {request} has no readable id but the reply has one: {reply}"
            ),
        }
    }

    fn take_id(&mut self) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        json!(id)
    }

    /// Subscribes to `pattern` and waits for the acknowledgement.
    pub fn subscribe(&mut self, pattern: &str) {
        let id = self.take_id();
        let request = json!({"action": "SUBSCRIBE", "topic": pattern, "id": id});
        self.send_text(&request.to_string());
        let reply = self.reply(&id);
        assert_reply(&reply, "subscribed", Some(pattern), &request.to_string());
    }

    /// Unsubscribes from `pattern` and waits for the acknowledgement.
    pub fn unsubscribe(&mut self, pattern: &str) {
        let id = self.take_id();
        let request = json!({"action": "UNSUBSCRIBE", "topic": pattern, "id": id});
        self.send_text(&request.to_string());
        let reply = self.reply(&id);
        assert_reply(&reply, "unsubscribed", Some(pattern), &request.to_string());
    }

    /// Publishes `data` (JSON text, sent verbatim) with an id and waits for the acknowledgement,
    /// after which every local subscriber has the message queued.
    pub fn publish(&mut self, topic: &str, data: &str) {
        let id = self.take_id();
        let request = publish_request(topic, data, Some(&id));
        self.send_text(&request);
        let reply = self.reply(&id);
        assert_reply(&reply, "published", Some(topic), &request);
    }

    /// Publishes `data` without an id, so the node sends no reply.
    pub fn publish_no_ack(&mut self, topic: &str, data: &str) {
        self.send_text(&publish_request(topic, data, None));
    }

    /// Sends the PING action and waits for the pong: proof the connection still works.
    pub fn ping(&mut self) {
        let id = self.take_id();
        let request = json!({"action": "PING", "id": id}).to_string();
        self.send_text(&request);
        let reply = self.reply(&id);
        assert_reply(&reply, "pong", None, &request);
    }

    /// Returns the deliveries that arrive before the one on `sentinel_topic`.
    pub fn deliveries_until(&mut self, sentinel_topic: &str) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let value = self.recv();
            assert_eq!(
                value["type"], "message",
                "expected only deliveries, got {value}"
            );
            if value["topic"] == sentinel_topic {
                return before;
            }
            before.push(value);
        }
    }

    /// Reads until a close frame arrives and returns it; text messages before it are skipped.
    pub fn expect_close(&mut self, timeout: Duration) -> Option<CloseFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.read_incoming(remaining) {
                Incoming::Text(_) => continue,
                Incoming::Close(frame) => {
                    // tungstenite queued the close reply; send it now, as a client would.
                    let _ = self.ws.flush();
                    return frame;
                }
                other => panic!("expected a close frame within {timeout:?}, got {other:?}"),
            }
        }
    }

    /// Closes the connection with 1000 and waits briefly for the node's close frame.
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match self.read_incoming(Duration::from_millis(200)) {
                Incoming::Text(_) | Incoming::TimedOut => continue,
                Incoming::Close(_) | Incoming::Ended(_) => break,
            }
        }
    }
}

/// Asserts the `type` and `topic` of a reply; unknown fields are allowed, as the protocol lets
/// the node add fields.
pub fn assert_reply(reply: &Value, kind: &str, topic: Option<&str>, request: &str) {
    assert_eq!(reply["type"], kind, "request {request}\nreply {reply}");
    if let Some(topic) = topic {
        assert_eq!(reply["topic"], topic, "request {request}\nreply {reply}");
    }
}

/// Asserts that `delivery` is a message on `topic` carrying `data`; other fields are allowed,
/// since the protocol adds envelope fields between `topic` and `data`.
pub fn assert_delivery(delivery: &Value, topic: &str, data: &Value, context: &str) {
    assert_eq!(delivery["type"], "message", "{context}: {delivery}");
    assert_eq!(delivery["topic"], topic, "{context}: {delivery}");
    assert!(
        delivery.get("data").is_some(),
        "{context}: no data in {delivery}"
    );
    assert_eq!(&delivery["data"], data, "{context}: {delivery}");
}

/// Builds a PUBLISH request with `data` inserted verbatim.
pub fn publish_request(topic: &str, data: &str, id: Option<&Value>) -> String {
    let topic = Value::from(topic);
    match id {
        Some(id) => format!(r#"{{"action":"PUBLISH","topic":{topic},"data":{data},"id":{id}}}"#),
        None => format!(r#"{{"action":"PUBLISH","topic":{topic},"data":{data}}}"#),
    }
}
