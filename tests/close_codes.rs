//! WebSocket protocol violations and the close code the node sends for each (RFC 6455 section
//! 7.4.1 and the close code table of docs/protocol.md).
//!
//! Each case runs on a raw connection while a bystander connection stays open; afterwards the
//! bystander must still receive publishes and a new connection must work, so no input can
//! disturb other clients or crash the node. A failed assertion prints the frames sent and
//! received.

mod common;

use common::client::Client;
use common::raw::{opcode, OutFrame, RawClient, ReadOutcome};
use common::{assert_node_serves, Bystander, Node};
use std::time::Duration;

/// Default `--max-message-size`.
const MAX_MESSAGE: usize = 65_536;

/// Sends `frames` on a new raw connection and asserts that the node closes it with `code`.
fn assert_closes_with(frames: &[OutFrame], code: u16) {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    assert_closes_on(&node, frames, code);
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

fn assert_closes_on(node: &Node, frames: &[OutFrame], code: u16) {
    let mut raw = RawClient::connect(node.addr);
    raw.send_all(frames);
    raw.expect_close(code);
}

/// Builds a PING request padded with spaces to exactly `len` bytes.
fn padded_ping(len: usize) -> Vec<u8> {
    let mut text = br#"{"action":"PING","id":"big"}"#.to_vec();
    text.resize(len, b' ');
    text
}

#[test]
fn invalid_utf8_text_closes_1007() {
    assert_closes_with(&[OutFrame::text(&b"{\"a\":\"\xff\xfe\"}"[..])], 1007);
}

#[test]
fn invalid_utf8_across_fragments_closes_1007() {
    // U+20AC is E2 82 AC; here the second fragment continues it with an invalid byte.
    let frames = [
        OutFrame::text(&b"\"\xe2"[..]).fin(false),
        OutFrame::continuation(&b"\x28\""[..]),
    ];
    assert_closes_with(&frames, 1007);
}

#[test]
fn truncated_utf8_at_message_end_closes_1007() {
    assert_closes_with(&[OutFrame::text(&b"\"\xe2\x82"[..])], 1007);
}

#[test]
fn utf8_split_across_fragments_is_accepted() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    let frames = [
        OutFrame::text(&b"{\"action\":\"PING\",\"id\":\"\xe2"[..]).fin(false),
        OutFrame::continuation(&b"\x82"[..]).fin(false),
        OutFrame::continuation(&b"\xac\"}"[..]),
    ];
    raw.send_all(&frames);
    let reply = match raw.read_frame(common::EVENT_TIMEOUT) {
        common::raw::ReadOutcome::Frame(frame) => frame,
        other => panic!("expected the pong, got {other:?}\n{}", raw.transcript()),
    };
    assert_eq!(reply.opcode, opcode::TEXT, "{}", raw.transcript());
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(reply["type"], "pong", "{}", raw.transcript());
    assert_eq!(reply["id"], "\u{20ac}", "{}", raw.transcript());
}

#[test]
fn max_size_message_is_accepted() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    raw.send_all(&[OutFrame::text(padded_ping(MAX_MESSAGE))]);
    match raw.read_frame(common::EVENT_TIMEOUT) {
        common::raw::ReadOutcome::Frame(frame) if frame.opcode == opcode::TEXT => {
            let reply: serde_json::Value = serde_json::from_slice(&frame.payload).expect("JSON");
            assert_eq!(reply["type"], "pong", "{}", raw.transcript());
        }
        other => panic!("expected the pong, got {other:?}\n{}", raw.transcript()),
    }
}

#[test]
fn oversized_single_frame_closes_1009() {
    assert_closes_with(&[OutFrame::text(padded_ping(MAX_MESSAGE + 1))], 1009);
}

#[test]
fn oversized_fragmented_message_closes_1009() {
    // Each fragment is below the limit; together they pass it.
    let text = padded_ping(MAX_MESSAGE + 1);
    let (first, rest) = text.split_at(30_000);
    let (second, third) = rest.split_at(30_000);
    let frames = [
        OutFrame::text(first).fin(false),
        OutFrame::continuation(second).fin(false),
        OutFrame::continuation(third),
    ];
    assert_closes_with(&frames, 1009);
}

#[test]
fn oversized_frame_header_closes_1009() {
    // Only the header of a 16 MiB frame: the node can reject it without reading the payload.
    let mut node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(16u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
    raw.send_bytes(&header, "header of a masked 16 MiB text frame, no payload")
        .expect("send header");
    raw.expect_close(1009);
    assert_node_serves(&mut node);
}

#[test]
fn reserved_bits_close_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    for bits in [0b100, 0b010, 0b001, 0b111] {
        let frame = OutFrame::text(r#"{"action":"PING"}"#).rsv(bits);
        assert_closes_on(&node, &[frame], 1002);
    }
    // Reserved bits on a control frame.
    assert_closes_on(&node, &[OutFrame::ping("p").rsv(0b100)], 1002);
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn unknown_opcodes_close_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    for code in (0x3..=0x7).chain(0xB..=0xF) {
        assert_closes_on(&node, &[OutFrame::new(code, "x")], 1002);
    }
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn unmasked_client_frame_closes_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    assert_closes_on(
        &node,
        &[OutFrame::text(r#"{"action":"PING"}"#).unmasked()],
        1002,
    );
    assert_closes_on(&node, &[OutFrame::ping("p").unmasked()], 1002);
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn fragmented_control_frame_closes_1002() {
    let frames = [
        OutFrame::ping("part").fin(false),
        OutFrame::continuation("rest"),
    ];
    assert_closes_with(&frames, 1002);
}

#[test]
fn control_frame_over_125_bytes_closes_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    assert_closes_on(&node, &[OutFrame::ping(vec![b'p'; 126])], 1002);
    assert_closes_on(&node, &[OutFrame::close(1000, &[b'r'; 124])], 1002);
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn control_frame_of_125_bytes_is_accepted() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    let payload = vec![b'p'; 125];
    raw.send(&OutFrame::ping(payload.clone()))
        .expect("send ping");
    match raw.read_frame(common::EVENT_TIMEOUT) {
        common::raw::ReadOutcome::Frame(frame) => {
            assert_eq!(frame.opcode, opcode::PONG, "{}", raw.transcript());
            assert_eq!(frame.payload, payload, "{}", raw.transcript());
        }
        other => panic!("expected a pong, got {other:?}\n{}", raw.transcript()),
    }
}

#[test]
fn continuation_without_start_closes_1002() {
    assert_closes_with(&[OutFrame::continuation(r#"{"action":"PING"}"#)], 1002);
}

#[test]
fn new_message_inside_fragmented_closes_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    let text = [
        OutFrame::text(r#"{"action":"#).fin(false),
        OutFrame::text(r#"{"action":"PING"}"#),
    ];
    assert_closes_on(&node, &text, 1002);
    let binary = [
        OutFrame::text(r#"{"action":"#).fin(false),
        OutFrame::binary("x"),
    ];
    assert_closes_on(&node, &binary, 1002);
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn ping_inside_fragmented_message_is_answered() {
    // RFC 6455 section 5.4: control frames may be injected between fragments.
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    let frames = [
        OutFrame::text(r#"{"action":"PI"#).fin(false),
        OutFrame::ping("mid"),
        OutFrame::continuation(r#"NG","id":1}"#),
    ];
    raw.send_all(&frames);
    let mut got_pong = false;
    let mut got_reply = false;
    while !(got_pong && got_reply) {
        match raw.read_frame(common::EVENT_TIMEOUT) {
            common::raw::ReadOutcome::Frame(frame) if frame.opcode == opcode::PONG => {
                assert_eq!(frame.payload, b"mid", "{}", raw.transcript());
                got_pong = true;
            }
            common::raw::ReadOutcome::Frame(frame) if frame.opcode == opcode::TEXT => {
                let reply: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                assert_eq!(reply["type"], "pong", "{}", raw.transcript());
                got_reply = true;
            }
            other => panic!("unexpected {other:?}\n{}", raw.transcript()),
        }
    }
}

#[test]
fn one_byte_close_payload_closes_1002() {
    assert_closes_with(&[OutFrame::new(opcode::CLOSE, vec![0x03])], 1002);
}

#[test]
fn forbidden_close_codes_close_1002() {
    let mut node = Node::start();
    let mut bystander = Bystander::new(&node);
    // 1004, 1005, 1006 and 1015 may not be sent; 1016-2999 are reserved by RFC 6455; codes
    // below 1000 and above 4999 are outside every range.
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        assert_closes_on(&node, &[OutFrame::close(code, b"")], 1002);
    }
    bystander.assert_undisturbed(&node);
    assert_node_serves(&mut node);
}

#[test]
fn invalid_utf8_close_reason_closes_1007() {
    assert_closes_with(&[OutFrame::close(1000, b"bye \xff\xfe")], 1007);
}

#[test]
fn normal_close_is_echoed() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    raw.send(&OutFrame::close(1000, b"done"))
        .expect("send close");
    let frame = raw.read_close();
    assert_eq!(frame.close_code(), Some(1000), "{}", raw.transcript());
    raw.expect_eof(Duration::from_secs(3));
}

#[test]
fn valid_close_codes_are_accepted() {
    let node = Node::start();
    for code in [1001, 1003, 1007, 1008, 1011, 3000, 3999, 4000, 4999] {
        let mut raw = RawClient::connect(node.addr);
        raw.send(&OutFrame::close(code, b"")).expect("send close");
        let frame = raw.read_close();
        // RFC 6455 section 5.5.1: the reply typically echoes the code; 1000 is also fine.
        let reply = frame.close_code();
        assert!(
            reply == Some(code) || reply == Some(1000),
            "client close {code} answered with {reply:?}\n{}",
            raw.transcript()
        );
        raw.expect_eof(Duration::from_secs(3));
    }
}

#[test]
fn empty_close_is_answered() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    raw.send(&OutFrame::new(opcode::CLOSE, Vec::new()))
        .expect("send close");
    let frame = raw.read_close();
    let reply = frame.close_code();
    assert!(
        reply.is_none() || reply == Some(1000),
        "empty close answered with {reply:?}\n{}",
        raw.transcript()
    );
    raw.expect_eof(Duration::from_secs(3));
}

#[test]
fn silent_client_is_dropped_after_close() {
    // After its close frame the node waits up to 1 s for the client's close, then drops TCP.
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    raw.send(&OutFrame::text(&b"\xff"[..])).expect("send");
    let frame = raw.read_close();
    assert_eq!(frame.close_code(), Some(1007), "{}", raw.transcript());
    let elapsed = raw.expect_eof(Duration::from_secs(5));
    assert!(
        elapsed < Duration::from_millis(2500),
        "TCP dropped {elapsed:?} after the close frame, expected about 1 s"
    );
}

#[test]
fn close_codes_are_logged() {
    let node = Node::start();
    let mut raw = RawClient::connect(node.addr);
    let conn = node.connection_opened(raw.local_addr());
    raw.send(&OutFrame::text(r#"{"action":"PING"}"#).rsv(0b100))
        .expect("send");
    raw.expect_close(1002);
    let line = node.connection_closed(&conn.conn_id, common::EVENT_TIMEOUT);
    assert_eq!(line["close_code"], 1002, "{line}");
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "no reason in {line}");
    assert_eq!(common::field_text(&line["core"]), conn.core, "{line}");
}

/// No frame follows the node's close frame. The client closes while its close reply still waits
/// behind a backlog of messages, and further messages for it arrive meanwhile: they must not be
/// written after the close frame (RFC 6455 5.5.1).
#[test]
fn no_frame_follows_the_close_frame() {
    let node = Node::builder()
        .arg("--cores", "1")
        .arg("--max-outbound-queue", "67108864")
        .start();
    let mut subscriber = subscribed_raw_client(&node, "closing");

    // 12 MB that the subscriber does not read yet: more than the kernel buffers of both sockets
    // hold, so the rest, and the close reply behind it, wait in the node's queue.
    let mut publisher = Client::connect(node.addr);
    let request = format!(
        r#"{{"action":"PUBLISH","topic":"closing","data":"{}"}}"#,
        "x".repeat(8 * 1024)
    );
    let publish = |publisher: &mut Client, count: usize| {
        for _ in 0..count {
            publisher.write_text(&request);
        }
        publisher.flush();
        publisher.ping();
    };
    publish(&mut publisher, 1500);
    subscriber
        .send(&OutFrame::close(1000, b""))
        .expect("close sent");
    // Time for the node to read the close frame, which it does while its writes are blocked.
    std::thread::sleep(Duration::from_millis(200));
    publish(&mut publisher, 50);

    let mut after_close = 0;
    let mut closed = false;
    loop {
        match subscriber.read_frame(common::EVENT_TIMEOUT) {
            ReadOutcome::Frame(frame) if frame.opcode == opcode::CLOSE => closed = true,
            ReadOutcome::Frame(_) if closed => after_close += 1,
            ReadOutcome::Frame(_) => {}
            ReadOutcome::Eof | ReadOutcome::Failed(_) => break,
            ReadOutcome::TimedOut => panic!("the node kept the connection open"),
        }
    }
    assert!(closed, "the node sent no close frame");
    assert_eq!(after_close, 0, "frames written after the close frame");
}

/// A client that publishes to its own topic and closes in the same write receives its messages
/// before the close reply: the close does not drop what was published before it.
#[test]
fn own_messages_precede_close_reply() {
    let node = Node::builder().arg("--cores", "1").start();
    let mut client = subscribed_raw_client(&node, "mine");

    let mut burst = Vec::new();
    for n in 0..5 {
        let publish = format!(r#"{{"action":"PUBLISH","topic":"mine","data":{n}}}"#);
        burst.extend(OutFrame::text(publish).encode());
    }
    burst.extend(OutFrame::close(1000, b"").encode());
    client
        .send_bytes(&burst, "5 PUBLISH frames and a close frame")
        .expect("burst sent");

    let mut messages = 0;
    loop {
        match client.read_frame(common::EVENT_TIMEOUT) {
            ReadOutcome::Frame(frame) if frame.opcode == opcode::TEXT => messages += 1,
            ReadOutcome::Frame(frame) if frame.opcode == opcode::CLOSE => {
                assert_eq!(frame.close_code(), Some(1000), "{}", client.transcript());
                break;
            }
            other => panic!("expected messages and a close reply, got {other:?}"),
        }
    }
    assert_eq!(messages, 5, "{}", client.transcript());
}

/// Opens a raw connection subscribed to `topic`, its reply read.
fn subscribed_raw_client(node: &Node, topic: &str) -> RawClient {
    let mut client = RawClient::connect(node.addr);
    let request = format!(r#"{{"action":"SUBSCRIBE","topic":"{topic}","id":1}}"#);
    client
        .send(&OutFrame::text(request))
        .expect("subscribe sent");
    match client.read_frame(common::EVENT_TIMEOUT) {
        ReadOutcome::Frame(frame) if frame.opcode == opcode::TEXT => {}
        other => panic!("no reply to SUBSCRIBE {topic}: {other:?}"),
    }
    client
}
