//! Topic patterns: `*` matches exactly one segment, `>` as the last segment matches one or more
//! trailing segments, and matching is case sensitive.
//!
//! Each table row publishes one topic and lists the patterns that must receive it; every other
//! pattern must not. A sentinel published after each topic bounds the wait for the negative cases
//! (see tests/pubsub.rs).

mod common;

use common::client::Client;
use common::Node;
use serde_json::Value;

/// Subscribes one connection per pattern, publishes each topic of `cases` in turn and asserts
/// that exactly the listed patterns received it, with the published topic in the delivery.
fn assert_matches(patterns: &[&str], cases: &[(&str, &[&str])]) {
    let node = Node::start();
    let mut subscribers: Vec<(&str, Client)> = patterns
        .iter()
        .map(|pattern| {
            let mut client = Client::connect(node.addr);
            client.subscribe(pattern);
            client.subscribe("sentinel");
            (*pattern, client)
        })
        .collect();
    let mut publisher = Client::connect(node.addr);

    for (n, (topic, matching)) in cases.iter().enumerate() {
        publisher.publish(topic, &n.to_string());
        publisher.publish("sentinel", "null");
        for (pattern, client) in &mut subscribers {
            let received: Vec<Value> = client.deliveries_until("sentinel");
            let expected = usize::from(matching.contains(pattern));
            assert_eq!(
                received.len(),
                expected,
                "pattern {pattern:?}, published topic {topic:?}: deliveries {received:?}"
            );
            for delivery in received {
                assert_eq!(delivery["topic"], *topic, "pattern {pattern:?}: {delivery}");
                assert_eq!(delivery["data"], n, "pattern {pattern:?}: {delivery}");
            }
        }
    }
}

#[test]
fn star_matches_exactly_one_segment() {
    let patterns = ["orders.*.created", "*", "*.b", "a.*", "*.*"];
    let cases: &[(&str, &[&str])] = &[
        ("orders.eu.created", &["orders.*.created"]),
        ("orders.created", &["*.*"]),
        ("orders.eu.west.created", &[]),
        ("orders.eu.updated", &[]),
        ("a", &["*"]),
        ("a.b", &["*.b", "a.*", "*.*"]),
        ("x.b", &["*.b", "*.*"]),
        ("a.b.c", &[]),
    ];
    assert_matches(&patterns, cases);
}

#[test]
fn tail_wildcard_matches_one_or_more() {
    let patterns = ["orders.>", ">", "orders.*.>", "a.b.>"];
    let cases: &[(&str, &[&str])] = &[
        ("orders", &[">"]),
        ("orders.created", &["orders.>", ">"]),
        ("orders.eu.created", &["orders.>", ">", "orders.*.>"]),
        ("orders.eu.west.created", &["orders.>", ">", "orders.*.>"]),
        ("order.created", &[">"]),
        ("ordersx.created", &[">"]),
        ("a.b", &[">"]),
        ("a.b.c", &[">", "a.b.>"]),
        ("a.b.c.d", &[">", "a.b.>"]),
    ];
    assert_matches(&patterns, cases);
}

#[test]
fn topics_are_case_sensitive() {
    let patterns = ["Chat.Room", "chat.*", "chat.room"];
    let cases: &[(&str, &[&str])] = &[
        ("Chat.Room", &["Chat.Room"]),
        ("chat.room", &["chat.*", "chat.room"]),
        ("CHAT.room", &[]),
        ("chat.Room", &["chat.*"]),
    ];
    assert_matches(&patterns, cases);
}

#[test]
fn literal_topic_matches_only_itself() {
    let patterns = ["a.b", "a", "a.b.c", "a_b", "a-b:c@d"];
    let cases: &[(&str, &[&str])] = &[
        ("a.b", &["a.b"]),
        ("a", &["a"]),
        ("a.b.c", &["a.b.c"]),
        ("a_b", &["a_b"]),
        ("a-b:c@d", &["a-b:c@d"]),
        ("b.a", &[]),
    ];
    assert_matches(&patterns, cases);
}
