//! Messages from one publisher to one topic reach every subscriber in publish order, whichever
//! cores the publisher and the subscribers are on.

mod common;

use common::{client::Client, Node};
use common::{connect_on_every_core, PlacedClient};
use std::thread;

const MESSAGES: u64 = 10_000;

#[test]
fn one_publisher_order_holds_across_cores() {
    let node = Node::start();
    let mut subscribers = connect_on_every_core(&node, 2);
    for placed in &mut subscribers {
        placed.client.subscribe("sequence");
    }
    let mut publisher = Client::connect(node.addr);
    let publisher_core = node.connection_opened(publisher.local_addr).core;

    // Subscribers read while the publisher writes, so none becomes a slow consumer.
    let readers: Vec<_> = subscribers.into_iter().map(spawn_reader).collect();
    for n in 0..MESSAGES {
        publisher.write_text(&format!(
            r#"{{"action":"PUBLISH","topic":"sequence","data":{n}}}"#
        ));
    }
    publisher.flush();
    publisher.ping();

    for reader in readers {
        let (core, result) = reader.join().expect("reader thread panicked");
        if let Err(problem) = result {
            panic!("subscriber on core {core} (publisher on core {publisher_core}): {problem}");
        }
    }
}

/// Reads [`MESSAGES`] deliveries and checks that `data` counts up from 0 without gaps.
fn spawn_reader(placed: PlacedClient) -> thread::JoinHandle<(String, Result<(), String>)> {
    let PlacedClient { mut client, conn } = placed;
    thread::spawn(move || {
        for expected in 0..MESSAGES {
            let delivery = client.recv();
            if delivery["type"] != "message" || delivery["topic"] != "sequence" {
                return (conn.core, Err(format!("unexpected frame {delivery}")));
            }
            if delivery["data"] != expected {
                let problem = format!("delivery {expected} carried {}", delivery["data"]);
                return (conn.core, Err(problem));
            }
        }
        (conn.core, Ok(()))
    })
}

/// Requests that reach the node in one read are handled in order, even though the node keeps
/// the messages of a read until it writes: a subscription does not receive what was published
/// before it, an unsubscription still receives what was published before it, and replies
/// come after the messages published before the request they answer.
#[test]
fn requests_in_one_read_keep_their_order() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    for request in [
        r#"{"action":"PUBLISH","topic":"order.t","data":"before subscribe"}"#,
        r#"{"action":"SUBSCRIBE","topic":"order.t","id":1}"#,
        r#"{"action":"PUBLISH","topic":"order.t","data":"first"}"#,
        r#"{"action":"PUBLISH","topic":"order.t","data":"second","id":2}"#,
        r#"{"action":"PUBLISH","topic":"order.t","data":"third"}"#,
        r#"{"action":"UNSUBSCRIBE","topic":"order.t","id":3}"#,
        r#"{"action":"PUBLISH","topic":"order.t","data":"after unsubscribe"}"#,
        r#"{"action":"PING","id":4}"#,
    ] {
        client.write_text(request);
    }
    client.flush();

    let mut seen = Vec::new();
    loop {
        let frame = client.recv();
        let entry = match frame["type"].as_str() {
            Some("message") => format!("message {}", frame["data"].as_str().unwrap_or("?")),
            Some(kind) => format!("{kind} {}", frame["id"]),
            None => panic!("frame without a type: {frame}"),
        };
        let last = frame["type"] == "pong";
        seen.push(entry);
        if last {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "subscribed 1",
            "message first",
            "message second",
            "published 2",
            "message third",
            "unsubscribed 3",
            "pong 4",
        ]
    );
}
