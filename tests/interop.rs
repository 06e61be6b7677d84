//! Interoperability with WebSocket clients written outside this project: the npm package `ws`
//! and the Python package `websockets`, at the versions pinned in tests/interop.
//!
//! The scripts need `npm ci` in tests/interop and `pip install -r tests/interop/requirements.txt`;
//! scripts/test.sh does both.

mod common;

use common::process::{self, Script};
use common::{interop_path, Node};
use std::process::Command;
use std::time::Duration;

/// Time allowed for one script run, including the interpreter's start.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the command that runs `client` ("ws" or "websockets") in `mode` against `node`.
fn client_command(client: &str, node: &Node, mode: &str) -> Command {
    let mut command = match client {
        "ws" => {
            let module = interop_path("node_modules/ws/package.json");
            assert!(
                module.exists(),
                "{} is missing: run `npm ci` in tests/interop (scripts/test.sh does)",
                module.display()
            );
            let mut command = Command::new("node");
            command.arg(interop_path("ws_client.js"));
            command
        }
        "websockets" => {
            let mut command = Command::new("python3");
            command.arg(interop_path("websockets_client.py"));
            command
        }
        other => panic!("unknown client {other}"),
    };
    command.arg(node.url()).arg(mode);
    command
}

/// Runs one client with a subscriber and a publisher and asserts that it exits 0.
fn assert_round_trip(client: &str) {
    let node = Node::start();
    let finished = process::run(client_command(client, &node, "both"), SCRIPT_TIMEOUT);
    assert!(
        finished.status.success(),
        "{client} client failed\n{}\n{}",
        finished.describe(),
        node.diagnostics()
    );
}

/// Starts a subscriber with one client library, publishes with the other, and asserts that the
/// subscriber got the message.
fn assert_cross_client(subscriber_client: &str, publisher_client: &str) {
    let node = Node::start();
    let mut subscriber = Script::start(client_command(subscriber_client, &node, "subscriber"));
    let line = subscriber.next_line(SCRIPT_TIMEOUT);
    assert_eq!(
        line, "subscribed",
        "{subscriber_client} subscriber printed {line:?}"
    );

    let publisher = process::run(
        client_command(publisher_client, &node, "publisher"),
        SCRIPT_TIMEOUT,
    );
    assert!(
        publisher.status.success(),
        "{publisher_client} publisher failed\n{}",
        publisher.describe()
    );
    let (status, output) = subscriber.wait(SCRIPT_TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{subscriber_client} subscriber failed ({status:?})\n{output}\n{}",
        node.diagnostics()
    );
}

#[test]
fn ws_client_round_trip() {
    assert_round_trip("ws");
}

#[test]
fn websockets_client_round_trip() {
    assert_round_trip("websockets");
}

#[test]
fn ws_subscriber_gets_websockets_publish() {
    assert_cross_client("ws", "websockets");
}

#[test]
fn websockets_subscriber_gets_ws_publish() {
    assert_cross_client("websockets", "ws");
}
