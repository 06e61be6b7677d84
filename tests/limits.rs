//! Per-node and per-connection limits: `--max-connections` (503 on the handshake) and
//! `--max-subscriptions` (the `too_many_subscriptions` error).

mod common;

use common::client::Client;
use common::{http, wait_until, Node, EVENT_TIMEOUT};
use serde_json::json;

#[test]
fn connection_beyond_limit_gets_503() {
    let node = Node::start_with(&[("--max-connections", "3")]);
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(node.addr)).collect();

    // Several attempts, so that both cores see a handshake over the node-wide limit.
    for attempt in 0..8 {
        let request = http::upgrade_request(node.addr, "/", "");
        let response = http::exchange(node.addr, &request);
        assert_eq!(response.status, 503, "attempt {attempt}: {response:?}");
        assert_eq!(
            response.header("retry-after"),
            Some("1"),
            "attempt {attempt}: {response:?}"
        );
    }
    for client in &mut clients {
        client.ping();
    }

    // Closing one connection frees a slot.
    clients.pop().expect("three clients").close();
    let mut replacement = wait_until("a free connection slot", EVENT_TIMEOUT, || {
        Client::try_connect(node.addr, "/", EVENT_TIMEOUT).ok()
    });
    replacement.ping();
}

#[test]
fn subscription_limit_returns_too_many_subscriptions() {
    let node = Node::start_with(&[("--max-subscriptions", "3")]);
    let mut client = Client::connect(node.addr);
    for pattern in ["a", "b.*", "c.>"] {
        client.subscribe(pattern);
    }
    client.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"d","id":"fourth"}"#,
        "too_many_subscriptions",
        Some(json!("fourth")),
    );
    client.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"e"}"#,
        "too_many_subscriptions",
        None,
    );

    // A pattern already held is acknowledged at the limit, since it adds nothing.
    client.subscribe("a");

    // The held subscriptions still deliver, and the rejected one does not.
    let mut publisher = Client::connect(node.addr);
    publisher.publish("d", "0");
    publisher.publish("a", "1");
    let delivery = client.recv();
    assert_eq!(delivery["topic"], "a", "{delivery}");

    // Unsubscribing frees a slot.
    client.unsubscribe("b.*");
    client.subscribe("d");
    publisher.publish("d", "2");
    let delivery = client.recv();
    assert_eq!(delivery["topic"], "d", "{delivery}");
    assert_eq!(delivery["data"], 2, "{delivery}");
}

#[test]
fn subscription_limit_is_per_connection() {
    let node = Node::start_with(&[("--max-subscriptions", "2")]);
    let mut first = Client::connect(node.addr);
    first.subscribe("a");
    first.subscribe("b");
    let mut second = Client::connect(node.addr);
    second.subscribe("a");
    second.subscribe("b");
    second.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"c","id":1}"#,
        "too_many_subscriptions",
        Some(json!(1)),
    );
}
