//! The JSON protocol: parsing client requests and encoding the node's replies and deliveries.
//!
//! Requests are validated in full with simd-json. The `data` and `id` values are then located in
//! the original text so that they can be passed through byte for byte: a delivery carries the
//! publisher's `data` exactly as sent, and a reply echoes the request's `id` exactly as sent.

use std::borrow::Cow;
use std::cell::RefCell;

use simd_json::{Node, StaticNode};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::codes::ErrorCode;

/// The operation a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Add a topic pattern to the connection's subscriptions.
    Subscribe,
    /// Remove a topic pattern from the connection's subscriptions.
    Unsubscribe,
    /// Deliver `data` to every subscriber of `topic`.
    Publish,
    /// Reply with a pong.
    Ping,
}

impl Action {
    /// Returns the action's name as clients write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "SUBSCRIBE",
            Action::Unsubscribe => "UNSUBSCRIBE",
            Action::Publish => "PUBLISH",
            Action::Ping => "PING",
        }
    }
}

/// A parsed client request. Borrowed values point into the received text.
#[derive(Debug)]
pub struct Request<'a> {
    /// The requested action.
    pub action: Action,
    /// The topic or pattern, unescaped.
    pub topic: Option<Cow<'a, str>>,
    /// The raw JSON text of `data`.
    pub data: Option<&'a [u8]>,
    /// The raw JSON text of `id`: a string (quotes included) or an integer.
    pub id: Option<&'a [u8]>,
}

/// A request that could not be parsed, with what the error frame needs.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestError {
    /// The stable error code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: Cow<'static, str>,
    /// The raw `id` of the request, when it could be read.
    pub id: Option<Vec<u8>>,
}

impl RequestError {
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>, id: Option<&[u8]>) -> Self {
        RequestError {
            code,
            message: message.into(),
            id: id.map(<[u8]>::to_vec),
        }
    }
}

thread_local! {
    /// simd-json works in place, so each core keeps one copy buffer and its parser buffers.
    static PARSER: RefCell<(Vec<u8>, simd_json::Buffers)> =
        RefCell::new((Vec::new(), simd_json::Buffers::default()));
}

/// Parses one request from the text of a WebSocket text message (already valid UTF-8).
pub fn parse_request(text: &[u8]) -> Result<Request<'_>, RequestError> {
    PARSER.with(|parser| {
        let (copy, buffers) = &mut *parser.borrow_mut();
        copy.clear();
        copy.extend_from_slice(text);
        let tape = simd_json::to_tape_with_buffers(copy, buffers).map_err(|e| {
            RequestError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}"), None)
        })?;
        read_fields(&tape.0, text)
    })
}

/// Known top-level fields, as positions among the object's members.
#[derive(Default)]
struct Fields<'t> {
    action: Option<&'t Node<'t>>,
    topic: Option<(usize, &'t Node<'t>)>,
    data: Option<usize>,
    id: Option<(usize, &'t Node<'t>)>,
}

fn read_fields<'a>(nodes: &[Node<'_>], text: &'a [u8]) -> Result<Request<'a>, RequestError> {
    let fields = collect_fields(nodes)?;
    let spans = member_spans(text);
    let raw = |member: usize| &text[spans[member].0..spans[member].1];

    // The id is read first so that every later error can echo it.
    let id = match fields.id {
        None => None,
        Some((member, node)) => match node {
            Node::String(_) | Node::Static(StaticNode::I64(_) | StaticNode::U64(_)) => {
                Some(raw(member))
            }
            _ => {
                let message = "`id` must be a string or an integer";
                return Err(RequestError::new(ErrorCode::InvalidRequest, message, None));
            }
        },
    };

    let action = match fields.action {
        None => {
            let message = "missing `action`";
            return Err(RequestError::new(ErrorCode::InvalidRequest, message, id));
        }
        Some(Node::String(name)) => parse_action(name, id)?,
        Some(_) => {
            let message = "`action` must be a string";
            return Err(RequestError::new(ErrorCode::InvalidRequest, message, id));
        }
    };

    let topic = match fields.topic {
        None => None,
        Some((member, Node::String(unescaped))) => Some(topic_text(raw(member), unescaped)),
        Some(_) => {
            let message = "`topic` must be a string";
            return Err(RequestError::new(ErrorCode::InvalidRequest, message, id));
        }
    };

    Ok(Request {
        action,
        topic,
        data: fields.data.map(raw),
        id,
    })
}

fn collect_fields<'t>(nodes: &'t [Node<'t>]) -> Result<Fields<'t>, RequestError> {
    let Some(&Node::Object { len, .. }) = nodes.first() else {
        let message = "a request must be a JSON object";
        return Err(RequestError::new(ErrorCode::InvalidRequest, message, None));
    };

    let mut fields = Fields::default();
    let mut index = 1;
    for member in 0..len {
        let Node::String(key) = nodes[index] else {
            unreachable!("simd-json object keys are strings")
        };
        let value = &nodes[index + 1];
        let duplicate = match key {
            "action" => fields.action.replace(value).is_some(),
            "topic" => fields.topic.replace((member, value)).is_some(),
            "data" => fields.data.replace(member).is_some(),
            "id" => fields.id.replace((member, value)).is_some(),
            _ => false,
        };
        if duplicate {
            let message = format!("field `{key}` appears more than once");
            return Err(RequestError::new(ErrorCode::InvalidRequest, message, None));
        }
        index += 1 + node_count(value);
    }
    Ok(fields)
}

/// Returns how many tape nodes a value takes, its own header included.
fn node_count(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

fn parse_action(name: &str, id: Option<&[u8]>) -> Result<Action, RequestError> {
    match name {
        "SUBSCRIBE" => Ok(Action::Subscribe),
        "UNSUBSCRIBE" => Ok(Action::Unsubscribe),
        "PUBLISH" => Ok(Action::Publish),
        "PING" => Ok(Action::Ping),
        _ => {
            let mut message = String::from("unknown action `");
            message.extend(name.chars().take(64));
            message.push_str("`; expected SUBSCRIBE, UNSUBSCRIBE, PUBLISH or PING");
            Err(RequestError::new(ErrorCode::UnknownAction, message, id))
        }
    }
}

/// Returns the topic without its quotes, borrowed when the JSON string had no escapes.
fn topic_text<'a>(raw: &'a [u8], unescaped: &str) -> Cow<'a, str> {
    let inner = &raw[1..raw.len() - 1];
    if inner.contains(&b'\\') {
        Cow::Owned(unescaped.to_owned())
    } else {
        // The text was validated as UTF-8 before parsing, and quotes are single bytes.
        Cow::Borrowed(std::str::from_utf8(inner).unwrap_or_default())
    }
}

/// Returns the byte range of each member value of the top-level object, in document order.
///
/// The text must already be valid JSON whose top level is an object.
fn member_spans(text: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut pos = skip_whitespace(text, 0) + 1; // past '{'
    loop {
        pos = skip_whitespace(text, pos);
        if text[pos] == b'}' {
            return spans;
        }
        pos = skip_string(text, pos);
        pos = skip_whitespace(text, pos) + 1; // past ':'
        let start = skip_whitespace(text, pos);
        let end = skip_value(text, start);
        spans.push((start, end));
        pos = skip_whitespace(text, end);
        if text[pos] == b',' {
            pos += 1;
        }
    }
}

fn skip_whitespace(text: &[u8], mut pos: usize) -> usize {
    while matches!(text[pos], b' ' | b'\t' | b'\n' | b'\r') {
        pos += 1;
    }
    pos
}

/// Returns the position just past the string that starts at `pos`.
fn skip_string(text: &[u8], mut pos: usize) -> usize {
    pos += 1;
    loop {
        match text[pos] {
            b'"' => return pos + 1,
            b'\\' => pos += 2,
            _ => pos += 1,
        }
    }
}

/// Returns the position just past the value that starts at `pos`.
fn skip_value(text: &[u8], pos: usize) -> usize {
    match text[pos] {
        b'"' => skip_string(text, pos),
        b'{' | b'[' => skip_container(text, pos),
        _ => {
            let mut end = pos;
            while end < text.len()
                && !matches!(text[end], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                end += 1;
            }
            end
        }
    }
}

fn skip_container(text: &[u8], mut pos: usize) -> usize {
    let mut depth = 0usize;
    loop {
        match text[pos] {
            b'"' => {
                pos = skip_string(text, pos);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return pos + 1;
                }
            }
            _ => {}
        }
        pos += 1;
    }
}

/// Appends a WebSocket header for an unmasked, final text frame of `len` bytes.
pub fn push_text_header(out: &mut Vec<u8>, len: usize) {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    // Writing into a Vec cannot fail.
    let _ = header.format(len as u64, out);
}

const DELIVERY_HEAD: &[u8] = br#"{"type":"message","topic":""#;
const DELIVERY_DATA: &[u8] = br#"","data":"#;

/// Encodes the delivery of `data` on `topic` as a complete WebSocket text frame.
///
/// The topic needs no escaping because the topic rules only allow characters that JSON strings
/// carry as they are.
pub fn encode_delivery(topic: &str, data: &[u8]) -> Vec<u8> {
    let len = DELIVERY_HEAD.len() + topic.len() + DELIVERY_DATA.len() + data.len() + 1;
    let mut frame = Vec::with_capacity(len + 10);
    push_text_header(&mut frame, len);
    frame.extend_from_slice(DELIVERY_HEAD);
    frame.extend_from_slice(topic.as_bytes());
    frame.extend_from_slice(DELIVERY_DATA);
    frame.extend_from_slice(data);
    frame.push(b'}');
    frame
}

/// Encodes a reply such as `{"type":"subscribed","topic":"a.b","id":7}` as a text frame.
pub fn encode_reply(kind: &str, topic: Option<&str>, id: Option<&[u8]>) -> Vec<u8> {
    let mut json = Vec::with_capacity(64);
    json.extend_from_slice(br#"{"type":""#);
    json.extend_from_slice(kind.as_bytes());
    json.push(b'"');
    if let Some(topic) = topic {
        json.extend_from_slice(br#","topic":"#);
        push_json_string(&mut json, topic);
    }
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&json)
}

/// Encodes an error frame such as `{"type":"error","code":"invalid_topic","message":"..."}`.
pub fn encode_error(code: ErrorCode, message: &str, id: Option<&[u8]>) -> Vec<u8> {
    let mut json = Vec::with_capacity(96 + message.len());
    json.extend_from_slice(br#"{"type":"error","code":""#);
    json.extend_from_slice(code.as_str().as_bytes());
    json.extend_from_slice(br#"","message":"#);
    push_json_string(&mut json, message);
    push_id(&mut json, id);
    json.push(b'}');
    text_frame(&json)
}

fn push_id(json: &mut Vec<u8>, id: Option<&[u8]>) {
    if let Some(id) = id {
        json.extend_from_slice(br#","id":"#);
        json.extend_from_slice(id);
    }
}

fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    push_text_header(&mut frame, payload.len());
    frame.extend_from_slice(payload);
    frame
}

/// Appends `text` as a JSON string literal, escaping what RFC 8259 requires.
pub fn push_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(br#"\""#),
            b'\\' => out.extend_from_slice(br"\\"),
            b'\n' => out.extend_from_slice(br"\n"),
            b'\r' => out.extend_from_slice(br"\r"),
            b'\t' => out.extend_from_slice(br"\t"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(br"\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request<'_>, RequestError> {
        parse_request(text.as_bytes())
    }

    fn payload(frame: &[u8]) -> &str {
        let offset = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[offset..]).unwrap()
    }

    #[test]
    fn publish_keeps_data_bytes() {
        let text = r#"{"action":"PUBLISH","topic":"market_updates","data":{"symbol":"BTC/USD", "price":64000}}"#;
        let request = parse(text).unwrap();
        assert_eq!(request.action, Action::Publish);
        assert_eq!(request.topic.as_deref(), Some("market_updates"));
        let data = std::str::from_utf8(request.data.unwrap()).unwrap();
        assert_eq!(data, r#"{"symbol":"BTC/USD", "price":64000}"#);
        assert!(request.id.is_none());
    }

    #[test]
    fn data_of_every_json_type() {
        for data in [
            "null",
            "true",
            "-1.5e3",
            r#""a\"}b""#,
            "[1,[2,{}]]",
            r#"{"a":"}"}"#,
        ] {
            let text = format!(r#"{{ "data" : {data} , "action":"PUBLISH","topic":"t"}}"#);
            let request = parse(&text).unwrap();
            assert_eq!(request.data.unwrap(), data.as_bytes(), "data {data}");
        }
    }

    #[test]
    fn id_is_echoed_raw() {
        let request = parse(r#"{"id":"a\u0062","action":"PING"}"#).unwrap();
        assert_eq!(request.id.unwrap(), br#""a\u0062""#);
        let request = parse(r#"{"action":"PING","id":42}"#).unwrap();
        assert_eq!(request.id.unwrap(), b"42");
    }

    #[test]
    fn escaped_topic_is_unescaped() {
        let request = parse(r#"{"action":"SUBSCRIBE","topic":"a\u002eb"}"#).unwrap();
        assert_eq!(request.topic.as_deref(), Some("a.b"));
    }

    #[test]
    fn errors_carry_codes() {
        let cases = [
            ("{", ErrorCode::InvalidJson),
            ("[1]", ErrorCode::InvalidRequest),
            ("\"x\"", ErrorCode::InvalidRequest),
            (r#"{"topic":"a"}"#, ErrorCode::InvalidRequest),
            (r#"{"action":1}"#, ErrorCode::InvalidRequest),
            (r#"{"action":"FLY"}"#, ErrorCode::UnknownAction),
            (r#"{"action":"PING","id":1.5}"#, ErrorCode::InvalidRequest),
            (r#"{"action":"PING","id":{}}"#, ErrorCode::InvalidRequest),
            (
                r#"{"action":"SUBSCRIBE","topic":7}"#,
                ErrorCode::InvalidRequest,
            ),
            (
                r#"{"action":"PING","action":"PING"}"#,
                ErrorCode::InvalidRequest,
            ),
        ];
        for (text, code) in cases {
            let error = parse(text).unwrap_err();
            assert_eq!(error.code, code, "request {text}");
        }
    }

    #[test]
    fn error_keeps_id() {
        let error = parse(r#"{"action":"FLY","id":"q"}"#).unwrap_err();
        assert_eq!(error.id.as_deref(), Some(&br#""q""#[..]));
    }

    #[test]
    fn delivery_frame_layout() {
        let frame = encode_delivery("a.b", br#"{"x":1}"#);
        assert_eq!(frame[0], 0x81);
        assert_eq!(
            payload(&frame),
            r#"{"type":"message","topic":"a.b","data":{"x":1}}"#
        );
    }

    #[test]
    fn long_delivery_uses_extended_length() {
        let data = format!("\"{}\"", "x".repeat(70_000));
        let frame = encode_delivery("t", data.as_bytes());
        assert_eq!(frame[1], 127);
        assert!(payload(&frame).ends_with("\"}"));
    }

    #[test]
    fn error_message_is_escaped() {
        let frame = encode_error(ErrorCode::InvalidTopic, "bad \"x\"\n", Some(b"3"));
        assert_eq!(
            payload(&frame),
            r#"{"type":"error","code":"invalid_topic","message":"bad \"x\"\n","id":3}"#
        );
    }

    #[test]
    fn reply_with_topic_and_id() {
        let frame = encode_reply("subscribed", Some("a.*"), Some(b"\"s\""));
        assert_eq!(
            payload(&frame),
            r#"{"type":"subscribed","topic":"a.*","id":"s"}"#
        );
    }
}
