//! Publish and subscribe on one node: delivery across cores, the delivery envelope,
//! unsubscribe, and exactly-once delivery with duplicate and overlapping subscriptions.
//!
//! Negative checks ("nothing else arrived") publish a sentinel with an id after the messages
//! under test: the `published` reply means every local subscriber has the message queued, so
//! anything queued for a subscriber earlier arrives before the sentinel.

mod common;

use common::client::{assert_delivery, Client};
use common::{connect_on_every_core, Node};
use serde_json::{json, Value};
use std::collections::BTreeSet;

#[test]
fn publish_reaches_subscribers_on_both_cores() {
    let node = Node::start();
    let mut subscribers = connect_on_every_core(&node, 2);
    for placed in &mut subscribers {
        placed.client.subscribe("market_updates");
    }
    let cores: BTreeSet<&String> = subscribers.iter().map(|p| &p.conn.core).collect();
    assert_eq!(
        cores.len(),
        2,
        "subscribers should be on two cores: {cores:?}"
    );

    // Publish once from a connection on each core, so each core sends to the other.
    let mut publishers = connect_on_every_core(&node, 1);
    for (i, publisher) in publishers.iter_mut().enumerate() {
        publisher
            .client
            .publish("market_updates", &format!("{{\"n\":{i}}}"));
        for placed in &mut subscribers {
            let delivery = placed.client.recv();
            let context = format!(
                "subscriber on core {} from publisher on core {}",
                placed.conn.core, publisher.conn.core
            );
            assert_delivery(&delivery, "market_updates", &json!({"n": i}), &context);
        }
    }
}

#[test]
fn publisher_receives_own_message() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    client.subscribe("echo");
    client.publish("echo", "\"to myself\"");
    let delivery = client.recv();
    assert_eq!(delivery["topic"], "echo");
    assert_eq!(delivery["data"], "to myself");
}

#[test]
fn delivery_keeps_data_bytes_verbatim() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("raw");
    let mut publisher = Client::connect(node.addr);

    // A parser that re-serialized this would drop the spaces, print 2.5 and rewrite \u00e9.
    let data = r#"{ "a" : [1, 2.50, "x\u00e9"],  "b":{} }"#;
    publisher.publish("raw", data);
    let text = match subscriber.read_incoming(common::EVENT_TIMEOUT) {
        common::client::Incoming::Text(text) => text,
        other => panic!("expected the delivery, got {other:?}"),
    };
    assert!(
        text.contains(data),
        "delivery does not carry the published bytes {data:?}: {text:?}"
    );
}

#[test]
fn every_json_value_is_delivered() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("values");
    let mut publisher = Client::connect(node.addr);
    let values = [
        "{\"k\":1}",
        "[1,\"two\",null]",
        "\"text\"",
        "-12.5e3",
        "0",
        "true",
        "false",
        "null",
    ];
    for data in values {
        publisher.publish("values", data);
        let delivery = subscriber.recv();
        let expected: Value = serde_json::from_str(data).expect("test data is JSON");
        assert_delivery(&delivery, "values", &expected, &format!("data {data}"));
    }
}

#[test]
fn unknown_request_fields_are_ignored() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let reply = client.request(r#"{"action":"SUBSCRIBE","topic":"x","id":1,"future":[1,2]}"#);
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["id"], 1, "{reply}");
    let reply = client.request(r#"{"extra":true,"action":"PING","id":"p"}"#);
    assert_eq!(reply["type"], "pong", "{reply}");
    assert_eq!(reply["id"], "p", "{reply}");
}

#[test]
fn replies_echo_string_and_integer_ids() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        (r#"{"action":"PING","id":42}"#, json!(42)),
        (r#"{"action":"PING","id":"req-7"}"#, json!("req-7")),
        (r#"{"action":"PING","id":-3}"#, json!(-3)),
        (r#"{"action":"PING","id":""}"#, json!("")),
    ];
    for (request, id) in cases {
        let reply = client.request(request);
        assert_eq!(reply["type"], "pong", "request {request}: {reply}");
        assert_eq!(reply["id"], id, "request {request}: {reply}");
    }
    let reply = client.request(r#"{"action":"PING"}"#);
    assert_eq!(reply["type"], "pong", "{reply}");
    assert!(reply.get("id").is_none(), "PING without id: {reply}");

    let reply = client.request(r#"{"action":"PUBLISH","topic":"t","data":1,"id":"p-1"}"#);
    assert_eq!(reply["type"], "published", "{reply}");
    assert_eq!(reply["topic"], "t", "{reply}");
    assert_eq!(reply["id"], "p-1", "{reply}");
}

#[test]
fn publish_without_id_gets_no_reply() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    client.publish_no_ack("quiet", "1");
    // Replies are sent in request order, so a reply to the PUBLISH would arrive before the pong.
    let reply = client.request(r#"{"action":"PING","id":"after"}"#);
    assert_eq!(reply["type"], "pong", "first frame after PUBLISH: {reply}");
    assert_eq!(reply["id"], "after", "{reply}");
}

#[test]
fn unsubscribe_stops_delivery() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("news");
    subscriber.subscribe("sentinel");
    let mut publisher = Client::connect(node.addr);
    publisher.publish("news", "1");
    assert_eq!(subscriber.recv()["data"], 1);

    subscriber.unsubscribe("news");
    publisher.publish("news", "2");
    publisher.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert!(before.is_empty(), "delivered after UNSUBSCRIBE: {before:?}");

    // Subscribing again restores delivery.
    subscriber.subscribe("news");
    publisher.publish("news", "3");
    assert_eq!(subscriber.recv()["data"], 3);
}

#[test]
fn duplicate_subscribe_delivers_once() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("dup");
    subscriber.subscribe("dup");
    subscriber.subscribe("sentinel");
    let mut publisher = Client::connect(node.addr);
    publisher.publish("dup", "1");
    publisher.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert_eq!(before.len(), 1, "one publish, deliveries: {before:?}");

    // The second SUBSCRIBE changed nothing, so one UNSUBSCRIBE removes the subscription.
    subscriber.unsubscribe("dup");
    let reply = subscriber.request(r#"{"action":"UNSUBSCRIBE","topic":"dup","id":99}"#);
    assert_eq!(
        reply["code"], "not_subscribed",
        "second UNSUBSCRIBE: {reply}"
    );
    publisher.publish("dup", "2");
    publisher.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert!(before.is_empty(), "delivered after UNSUBSCRIBE: {before:?}");
}

#[test]
fn overlapping_patterns_deliver_once() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    for pattern in ["a.b.c", "a.*.c", "a.b.*", "a.>", "*.b.c", ">", "sentinel"] {
        subscriber.subscribe(pattern);
    }
    let mut publisher = Client::connect(node.addr);
    publisher.publish("a.b.c", "1");
    publisher.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert_eq!(before.len(), 1, "six matching patterns: {before:?}");
    assert_eq!(before[0]["topic"], "a.b.c");

    // With some of the patterns gone, the rest still deliver exactly once.
    subscriber.unsubscribe("a.b.c");
    subscriber.unsubscribe(">");
    publisher.publish("a.b.c", "2");
    publisher.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert_eq!(before.len(), 1, "four matching patterns: {before:?}");
    assert_eq!(before[0]["data"], 2);
}

#[test]
fn closed_subscriber_does_not_disturb_publish() {
    let mut node = Node::start();
    let mut departed = Client::connect(node.addr);
    departed.subscribe("topic");
    let conn = node.connection_opened(departed.local_addr);
    departed.close();
    node.connection_closed(&conn.conn_id, common::EVENT_TIMEOUT);

    let mut publisher = Client::connect(node.addr);
    publisher.publish("topic", "1");
    common::assert_node_serves(&mut node);
}
