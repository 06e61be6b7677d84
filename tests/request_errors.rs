//! Every error code of the protocol that a single node can produce, with the frame that triggers
//! it. The connection must stay open after each error frame, which a PING after each case checks.
//!
//! `too_many_subscriptions` is in tests/limits.rs. `cluster_unavailable` needs a cluster link
//! that is down, so a single node cannot produce it.

mod common;

use common::client::Client;
use common::Node;
use serde_json::{json, Value};

/// Sends each request, asserts the error frame and that the connection still replies to PING.
fn assert_errors(client: &mut Client, code: &str, cases: &[(&str, Option<Value>)]) {
    for (request, id) in cases {
        client.expect_error(request, code, id.clone());
        client.ping();
    }
}

#[test]
fn invalid_json_is_reported() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        (r#"{"action":"PING""#, None),
        ("not json", None),
        ("", None),
        (r#"{"action":"PING",}"#, None),
        (r#"{"action":"PING","id":1} trailing"#, None),
        (r#"{"action":"PUBLISH","topic":"t","data":{"a":}}"#, None),
    ];
    assert_errors(&mut client, "invalid_json", &cases);
}

#[test]
fn invalid_request_for_wrong_types() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        ("[1,2]", None),
        (r#""SUBSCRIBE""#, None),
        ("42", None),
        ("null", None),
        (r#"{"action":5,"id":1}"#, Some(json!(1))),
        (r#"{"action":null}"#, None),
        (r#"{"action":"PING","id":1.5}"#, None),
        (r#"{"action":"PING","id":{"n":1}}"#, None),
        (r#"{"action":"PING","id":[1]}"#, None),
        (
            r#"{"action":"SUBSCRIBE","topic":5,"id":"s"}"#,
            Some(json!("s")),
        ),
        (
            r#"{"action":"PUBLISH","topic":["t"],"data":1,"id":2}"#,
            Some(json!(2)),
        ),
    ];
    assert_errors(&mut client, "invalid_request", &cases);
}

#[test]
fn missing_action_is_invalid_request() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    // A request without `action` matches none of the four actions. Both codes ask the client to
    // fix the request, so both are accepted.
    let reply = client.request(r#"{"topic":"t","id":3}"#);
    assert_eq!(reply["type"], "error", "{reply}");
    let code = reply["code"].as_str().unwrap_or_default();
    assert!(
        code == "invalid_request" || code == "unknown_action",
        "request without action: {reply}"
    );
    assert_eq!(reply["id"], 3, "{reply}");
    client.ping();
}

#[test]
fn unknown_action_is_reported() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        (r#"{"action":"FETCH","id":1}"#, Some(json!(1))),
        (
            r#"{"action":"subscribe","topic":"t","id":"lower"}"#,
            Some(json!("lower")),
        ),
        (r#"{"action":"","id":2}"#, Some(json!(2))),
        (r#"{"action":"PING "}"#, None),
    ];
    assert_errors(&mut client, "unknown_action", &cases);
}

#[test]
fn missing_topic_for_each_action() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        (r#"{"action":"SUBSCRIBE","id":1}"#, Some(json!(1))),
        (r#"{"action":"UNSUBSCRIBE","id":2}"#, Some(json!(2))),
        (r#"{"action":"PUBLISH","data":1,"id":3}"#, Some(json!(3))),
        (r#"{"action":"PUBLISH","data":1}"#, None),
    ];
    assert_errors(&mut client, "missing_topic", &cases);
}

/// Topics and patterns that break the topic rules.
const BAD_TOPICS: [&str; 17] = [
    "",
    "a..b",
    ".a",
    "a.",
    ".",
    "a b",
    "a/b",
    "a#b",
    "caf\u{e9}",
    "a\tb",
    "ord*",
    "a.b*",
    "*a",
    "a.>.b",
    ">.a",
    "a.>>",
    "a.*x",
];

#[test]
fn topic_rules_are_enforced() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    for (n, topic) in BAD_TOPICS.iter().enumerate() {
        let topic_json = Value::from(*topic);
        let request = format!(r#"{{"action":"SUBSCRIBE","topic":{topic_json},"id":{n}}}"#);
        client.expect_error(&request, "invalid_topic", Some(json!(n)));
        // A PUBLISH topic containing `*` or `>` is the wildcard_publish case instead.
        if !topic.contains(['*', '>']) {
            let request =
                format!(r#"{{"action":"PUBLISH","topic":{topic_json},"data":1,"id":{n}}}"#);
            client.expect_error(&request, "invalid_topic", Some(json!(n)));
        }
        client.ping();
    }

    // The same connection can still subscribe and receive.
    client.subscribe("a.b");
    client.publish("a.b", "1");
    assert_eq!(client.recv()["data"], 1);
}

#[test]
fn unsubscribe_checks_topic_rules() {
    // An invalid pattern can never be held, but the client should learn that the topic is
    // invalid rather than merely not subscribed.
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    for (n, topic) in BAD_TOPICS.iter().enumerate() {
        let topic_json = Value::from(*topic);
        let request = format!(r#"{{"action":"UNSUBSCRIBE","topic":{topic_json},"id":{n}}}"#);
        client.expect_error(&request, "invalid_topic", Some(json!(n)));
        client.ping();
    }
}

#[test]
fn topic_length_limit_is_enforced() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let longest = "t".repeat(255);
    let too_long = "t".repeat(256);
    let segmented_too_long = format!("{}.{}", "a".repeat(128), "b".repeat(127));

    client.subscribe(&longest);
    client.publish(&longest, "1");
    assert_eq!(client.recv()["topic"], longest.as_str());

    for topic in [&too_long, &segmented_too_long] {
        let subscribe = format!(r#"{{"action":"SUBSCRIBE","topic":"{topic}","id":1}}"#);
        client.expect_error(&subscribe, "topic_too_long", Some(json!(1)));
        let publish = format!(r#"{{"action":"PUBLISH","topic":"{topic}","data":1,"id":2}}"#);
        client.expect_error(&publish, "topic_too_long", Some(json!(2)));
        client.ping();
    }
}

#[test]
fn topic_length_flag_is_honoured() {
    let node = Node::start_with(&[("--max-topic-length", "10")]);
    let mut client = Client::connect(node.addr);
    client.subscribe("abcde.ghij");
    client.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"abcde.ghijk","id":1}"#,
        "topic_too_long",
        Some(json!(1)),
    );
    client.ping();
}

#[test]
fn wildcard_publish_is_rejected() {
    let node = Node::start();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe(">");
    let mut client = Client::connect(node.addr);
    let cases = [
        (
            r#"{"action":"PUBLISH","topic":"orders.*","data":1,"id":1}"#,
            Some(json!(1)),
        ),
        (
            r#"{"action":"PUBLISH","topic":"orders.>","data":1,"id":2}"#,
            Some(json!(2)),
        ),
        (
            r#"{"action":"PUBLISH","topic":"*","data":1,"id":3}"#,
            Some(json!(3)),
        ),
        (r#"{"action":"PUBLISH","topic":">","data":1}"#, None),
    ];
    assert_errors(&mut client, "wildcard_publish", &cases);

    // None of them reached the subscriber to everything.
    client.publish("sentinel", "0");
    let before = subscriber.deliveries_until("sentinel");
    assert!(
        before.is_empty(),
        "rejected publishes were delivered: {before:?}"
    );
}

#[test]
fn missing_data_is_reported() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let cases = [
        (r#"{"action":"PUBLISH","topic":"t","id":1}"#, Some(json!(1))),
        (r#"{"action":"PUBLISH","topic":"t"}"#, None),
    ];
    assert_errors(&mut client, "missing_data", &cases);

    // `null` is data, not missing data.
    let reply = client.request(r#"{"action":"PUBLISH","topic":"t","data":null,"id":2}"#);
    assert_eq!(reply["type"], "published", "{reply}");
}

#[test]
fn unsubscribe_unknown_pattern_is_reported() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    client.subscribe("orders.eu");
    client.subscribe("orders.*");
    let cases = [
        (
            r#"{"action":"UNSUBSCRIBE","topic":"never","id":1}"#,
            Some(json!(1)),
        ),
        // The pattern must be the same string as a held one, not merely match it.
        (
            r#"{"action":"UNSUBSCRIBE","topic":"orders.>","id":2}"#,
            Some(json!(2)),
        ),
        (
            r#"{"action":"UNSUBSCRIBE","topic":"orders.us","id":3}"#,
            Some(json!(3)),
        ),
        (r#"{"action":"UNSUBSCRIBE","topic":"Orders.eu"}"#, None),
    ];
    assert_errors(&mut client, "not_subscribed", &cases);
    client.unsubscribe("orders.eu");
    client.unsubscribe("orders.*");
}

#[test]
fn binary_message_is_not_supported() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    for payload in [&b"{\"action\":\"PING\",\"id\":1}"[..], b"\x00\x01\x02", b""] {
        client.send_binary(payload);
        let reply = client.next_reply();
        assert_eq!(reply["type"], "error", "binary {payload:?}: {reply}");
        assert_eq!(
            reply["code"], "binary_not_supported",
            "binary {payload:?}: {reply}"
        );
        client.ping();
    }
}

#[test]
fn error_message_is_readable_text() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let reply = client.request(r#"{"action":"SUBSCRIBE","topic":"a..b","id":7}"#);
    assert_eq!(reply["code"], "invalid_topic", "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(!message.trim().is_empty(), "empty message: {reply}");
}
