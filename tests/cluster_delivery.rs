//! Delivery between nodes joined through one Redis server. Every subscriber gets each message
//! once and in publish order, wildcards included. Redis sends a node only the topics it needs,
//! and nodes can join and die while the others keep serving.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{cluster_node, wait_link_up, Cluster, LINK_TIMEOUT};
use common::client::Client;
use common::{wait_until, EVENT_TIMEOUT};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Reads deliveries until `sentinels` messages with `"end"` data arrived, and returns the others.
fn read_until_sentinels(client: &mut Client, sentinels: usize) -> Vec<Value> {
    let mut seen_sentinels = 0;
    let mut messages = Vec::new();
    while seen_sentinels < sentinels {
        let delivery = client.recv();
        assert_eq!(
            delivery["type"], "message",
            "expected a delivery: {delivery}"
        );
        if delivery["data"]["end"] == true {
            seen_sentinels += 1;
        } else {
            messages.push(delivery);
        }
    }
    messages
}

#[test]
fn publish_on_each_node_reaches_every_subscriber_once() {
    let cluster = Cluster::start(3);
    // On every node: an exact subscriber, a wildcard subscriber, and one connection holding two
    // patterns that both match.
    let mut subscribers = Vec::new();
    for node in &cluster.nodes {
        let mut exact = Client::connect(node.addr);
        exact.subscribe("chat.room");
        let mut wildcard = Client::connect(node.addr);
        wildcard.subscribe("chat.*");
        let mut both = Client::connect(node.addr);
        both.subscribe("chat.room");
        both.subscribe("chat.>");
        subscribers.push((node.node_id.clone(), [exact, wildcard, both]));
    }
    // `chat.*` and `chat.>` share the glob `nexus:chat.*`: one channel and one glob per node.
    for node in &cluster.nodes {
        cluster.redis.wait_client_subscriptions(&node.node_id, 1, 1);
    }

    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut publisher = Client::connect(node.addr);
        publisher.publish("chat.room", &json!({ "from": i }).to_string());
        publisher.publish("chat.room", r#"{"end":true}"#);
    }

    for (node_id, clients) in &mut subscribers {
        for (role, client) in ["exact", "wildcard", "both"].iter().zip(clients.iter_mut()) {
            let messages = read_until_sentinels(client, 3);
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            for message in &messages {
                assert_eq!(message["topic"], "chat.room", "{node_id} {role}: {message}");
                let from = message["data"]["from"].as_u64().expect("from");
                *counts.entry(from).or_default() += 1;
            }
            let expected: BTreeMap<u64, usize> = (0..3).map(|i| (i, 1)).collect();
            assert_eq!(
                counts, expected,
                "{node_id} {role} subscriber: {messages:?}"
            );
        }
    }
}

#[test]
fn wildcards_on_other_nodes_filter_with_topic_rules() {
    let cluster = Cluster::start(2);
    let mut subscriber = Client::connect(cluster.nodes[1].addr);
    subscriber.subscribe("orders.*.created");
    cluster.redis.wait_client_subscriptions("node-1", 0, 1);

    // Redis' glob `nexus:orders.*.created` matches both topics; only the first matches the
    // pattern, since `*` is exactly one segment.
    let mut publisher = Client::connect(cluster.nodes[0].addr);
    publisher.publish("orders.eu.west.created", r#""two segments""#);
    publisher.publish("orders.eu.created", r#""one segment""#);
    let delivery = subscriber.recv();
    assert_eq!(delivery["topic"], "orders.eu.created", "{delivery}");
    assert_eq!(delivery["data"], "one segment");
    assert!(
        subscriber
            .try_recv(std::time::Duration::from_millis(300))
            .is_none(),
        "a second delivery arrived"
    );
}

#[test]
fn one_publisher_arrives_in_order_on_every_node() {
    const COUNT: usize = 5000;
    let cluster = Cluster::start(3);
    let mut subscribers: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut client = Client::connect(node.addr);
            client.subscribe("ticks");
            client
        })
        .collect();
    cluster.redis.wait_numsub("nexus:ticks", 3);

    let mut publisher = Client::connect(cluster.nodes[0].addr);
    for seq in 0..COUNT {
        publisher.publish_no_ack("ticks", &seq.to_string());
    }
    publisher.ping();

    for (node, subscriber) in cluster.nodes.iter().zip(subscribers.iter_mut()) {
        for expected in 0..COUNT {
            let delivery = subscriber.recv();
            assert_eq!(
                delivery["data"],
                json!(expected),
                "node {} delivery {expected}: {delivery}",
                node.node_id
            );
        }
    }
    // The publisher got no error frame: every publish was accepted.
    assert!(publisher
        .try_recv(std::time::Duration::from_millis(100))
        .is_none());
}

#[test]
fn node_without_subscribers_gets_no_traffic() {
    let cluster = Cluster::start(3);
    let mut subscriber = Client::connect(cluster.nodes[0].addr);
    subscriber.subscribe("only.here");
    cluster.redis.wait_numsub("nexus:only.here", 1);

    // Redis lists exactly one subscribed channel, and only node-0's pub/sub connection
    // subscribes to anything.
    assert_eq!(cluster.redis.channels("nexus:*"), ["nexus:only.here"]);
    let counts: Vec<_> = ["node-0", "node-1", "node-2"]
        .iter()
        .map(|id| cluster.redis.client_subscriptions(id))
        .collect();
    assert_eq!(counts, [Some((1, 0)), Some((0, 0)), Some((0, 0))]);

    let mut publisher = Client::connect(cluster.nodes[2].addr);
    publisher.publish("only.here", r#""hello""#);
    assert_eq!(subscriber.recv()["data"], "hello");

    // The last local subscriber leaving unsubscribes the node from Redis.
    subscriber.unsubscribe("only.here");
    cluster.redis.wait_numsub("nexus:only.here", 0);
    assert!(cluster.redis.channels("nexus:*").is_empty());
}

#[test]
fn fourth_node_started_later_receives_traffic() {
    let cluster = Cluster::start(3);
    let late = cluster_node(&cluster.redis.url(), "node-late").start();
    wait_link_up(&late);
    let mut subscriber = Client::connect(late.addr);
    subscriber.subscribe("news.>");
    cluster.redis.wait_client_subscriptions("node-late", 0, 1);

    for node in &cluster.nodes {
        let mut publisher = Client::connect(node.addr);
        publisher.publish("news.sport", &json!(node.node_id).to_string());
    }
    let mut senders: Vec<String> = (0..3)
        .map(|_| {
            subscriber.recv()["data"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    senders.sort();
    assert_eq!(senders, ["node-0", "node-1", "node-2"]);
}

#[test]
fn killed_node_leaves_the_others_serving() {
    let mut cluster = Cluster::start(3);
    let mut subscribers: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut client = Client::connect(node.addr);
            client.subscribe("alive");
            client
        })
        .collect();
    cluster.redis.wait_numsub("nexus:alive", 3);

    cluster.nodes[1].signal(libc::SIGKILL);
    cluster.nodes[1].wait_exit(EVENT_TIMEOUT);
    cluster.redis.wait_numsub("nexus:alive", 2);
    // The dead node's registry key expires after three registry intervals.
    wait_until("the registry key of node-1 to expire", LINK_TIMEOUT, || {
        (cluster.redis.cli(&["EXISTS", "nexus:node:node-1"]).trim() == "0").then_some(())
    });

    let mut publisher = Client::connect(cluster.nodes[2].addr);
    publisher.publish("alive", r#""still""#);
    for index in [0, 2] {
        let delivery = subscribers[index].recv();
        assert_eq!(delivery["data"], "still", "node-{index}: {delivery}");
        cluster.nodes[index].assert_running();
    }
}

#[test]
fn subscription_storm_ends_in_the_wanted_state() {
    let cluster = Cluster::start(2);
    let mut client = Client::connect(cluster.nodes[0].addr);
    // Requests go out back to back without waiting for replies, so the link receives the
    // changes faster than it can send them one at a time.
    let mut requests = 0;
    let mut send = |client: &mut Client, action: &str, topic: &str| {
        client.write_text(&json!({ "action": action, "topic": topic }).to_string());
        requests += 1;
    };
    for i in 0..300 {
        send(&mut client, "SUBSCRIBE", &format!("storm.{i}"));
    }
    for i in (0..300).filter(|i| i % 2 == 1) {
        send(&mut client, "UNSUBSCRIBE", &format!("storm.{i}"));
    }
    for _ in 0..50 {
        send(&mut client, "UNSUBSCRIBE", "storm.0");
        send(&mut client, "SUBSCRIBE", "storm.0");
    }
    send(&mut client, "UNSUBSCRIBE", "storm.2");
    client.flush();
    for _ in 0..requests {
        let reply = client.next_reply();
        assert!(
            reply["type"] == "subscribed" || reply["type"] == "unsubscribed",
            "{reply}"
        );
    }

    let mut expected: Vec<String> = (0..300)
        .filter(|i| i % 2 == 0 && *i != 2)
        .map(|i| format!("nexus:storm.{i}"))
        .collect();
    expected.sort();
    wait_until(
        "Redis to hold exactly the wanted channels",
        LINK_TIMEOUT,
        || (cluster.redis.channels("nexus:storm.*") == expected).then_some(()),
    );
    cluster
        .redis
        .wait_client_subscriptions("node-0", expected.len() as u64, 0);

    let mut publisher = Client::connect(cluster.nodes[1].addr);
    publisher.publish("storm.0", r#""kept""#);
    publisher.publish("storm.2", r#""dropped""#);
    publisher.publish("storm.4", r#""kept""#);
    assert_eq!(client.recv()["topic"], "storm.0");
    assert_eq!(client.recv()["topic"], "storm.4");
}
