//! Heartbeat: the node pings every `--ping-interval` and closes a connection from which it has
//! received no byte for `--pong-timeout` after a ping, with close code 4001.

mod common;

use common::http::health_connections;
use common::process::Script;
use common::raw::{opcode, OutFrame, RawClient, ReadOutcome};
use common::{interop_path, wait_until, Node};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Flags for a node with a 1 s heartbeat.
const FAST_HEARTBEAT: [(&str, &str); 2] = [("--ping-interval", "1s"), ("--pong-timeout", "1s")];

#[test]
fn stalled_client_process_is_removed() {
    let node = Node::start_with(&FAST_HEARTBEAT);
    let before = health_connections(node.addr);
    let mut command = Command::new("python3");
    command
        .arg(interop_path("idle_subscriber.py"))
        .arg(node.url())
        .arg("heartbeat");
    let mut script = Script::start(command);
    let line = script.next_line(Duration::from_secs(30));
    let local_addr: SocketAddr = serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| v["local_addr"].as_str().and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("idle_subscriber.py printed {line:?}, expected local_addr"));
    let conn = node.connection_opened(local_addr);
    wait_until("/health to count the client", common::EVENT_TIMEOUT, || {
        (health_connections(node.addr) == before + 1).then_some(())
    });

    // While it runs, the library replies to pings, so three heartbeat periods must not close it.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        health_connections(node.addr),
        before + 1,
        "responsive client was removed"
    );
    let closed_early = node.logs().into_iter().find(|l| {
        l["msg"] == "connection closed" && common::field_text(&l["conn_id"]) == conn.conn_id
    });
    assert!(
        closed_early.is_none(),
        "responsive client closed: {closed_early:?}"
    );

    script.signal(libc::SIGSTOP);
    let stopped_at = Instant::now();
    wait_until(
        "/health to drop the stopped client",
        Duration::from_secs(15),
        || (health_connections(node.addr) == before).then_some(()),
    );
    let removed_after = stopped_at.elapsed();
    let closed = node.connection_closed(&conn.conn_id, common::EVENT_TIMEOUT);
    assert_eq!(closed["close_code"], 4001, "{closed}");
    let reason = closed["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "no reason in {closed}");
    // At most one ping interval until the next ping, then the pong timeout, plus slack.
    assert!(
        removed_after < Duration::from_secs(6),
        "stopped client removed only after {removed_after:?}"
    );

    script.signal(libc::SIGCONT);
    drop(script);
}

#[test]
fn node_pings_every_interval() {
    let node = Node::start_with(&[("--ping-interval", "1s"), ("--pong-timeout", "5s")]);
    let mut raw = RawClient::connect(node.addr);
    let start = Instant::now();
    let mut pings = 0;
    while pings < 2 {
        match raw.read_frame(Duration::from_secs(3)) {
            ReadOutcome::Frame(frame) if frame.opcode == opcode::PING => {
                pings += 1;
                raw.send(&OutFrame::new(opcode::PONG, frame.payload))
                    .expect("send pong");
            }
            other => panic!(
                "expected a ping within 3 s, got {other:?}\n{}",
                raw.transcript()
            ),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "two pings took {:?} with a 1 s interval",
        start.elapsed()
    );
}

#[test]
fn unanswered_pings_close_with_4001() {
    let node = Node::start_with(&FAST_HEARTBEAT);
    let mut raw = RawClient::connect(node.addr);
    let conn = node.connection_opened(raw.local_addr());
    // read_close skips the pings without replying to them.
    let frame = raw.read_close();
    assert_eq!(frame.close_code(), Some(4001), "{}", raw.transcript());
    let closed = node.connection_closed(&conn.conn_id, common::EVENT_TIMEOUT);
    assert_eq!(closed["close_code"], 4001, "{closed}");
}

#[test]
fn any_received_byte_counts_as_activity() {
    // The client never replies to a ping but sends a PING request every 200 ms for 4 s, which is
    // two pong timeouts; the node must keep the connection open.
    let node = Node::start_with(&FAST_HEARTBEAT);
    let mut raw = RawClient::connect(node.addr);
    let start = Instant::now();
    let mut replies = 0;
    while start.elapsed() < Duration::from_secs(4) {
        raw.send(&OutFrame::text(r#"{"action":"PING","id":1}"#))
            .expect("send PING request");
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match raw.read_frame(remaining) {
                ReadOutcome::Frame(frame) if frame.opcode == opcode::TEXT => replies += 1,
                ReadOutcome::Frame(frame) if frame.opcode == opcode::PING => {}
                ReadOutcome::TimedOut => break,
                other => panic!("connection disturbed: {other:?}\n{}", raw.transcript()),
            }
        }
    }
    assert!(replies >= 10, "only {replies} PING replies in 4 s");
}
