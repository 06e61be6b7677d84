//! Nodes on a Redis Cluster of three masters (`redis+cluster://`). Exact topics travel over
//! sharded pub/sub, so each message reaches only the master that owns its channel. Wildcard
//! subscriptions work through classic PUBLISH copies, sent only while some node announces a
//! matching wildcard.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{cluster_node, wait_link_up, RedisCluster, LINK_TIMEOUT};
use common::client::Client;
use common::{wait_until, Node};
use serde_json::json;
use std::time::Duration;

const TOPICS: [&str; 6] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];

fn start_nodes(redis: &RedisCluster, count: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (0..count)
        .map(|i| cluster_node(&redis.url(), &format!("shard-node-{i}")).start())
        .collect();
    for node in &nodes {
        wait_link_up(node);
    }
    nodes
}

/// Waits until every other node's link has applied the wildcard announcement of `origin`.
fn wait_announcement(nodes: &[Node], origin: &str) {
    for node in nodes.iter().filter(|node| node.node_id != origin) {
        node.wait_for_log("the wildcard announcement", LINK_TIMEOUT, |line| {
            line["msg"] == "wildcard announcement applied" && line["origin_node"] == origin
        });
    }
}

#[test]
fn hash_slots_match_the_link() {
    // The link's own CRC16 must agree with Redis, or shard channels would be sent to the wrong
    // master; the link's unit tests use these values.
    let redis = RedisCluster::start();
    for (key, slot) in [("123456789", "12739"), ("foo", "12182"), ("bar", "5061")] {
        assert_eq!(
            redis.servers[0].cli(&["CLUSTER", "KEYSLOT", key]).trim(),
            slot,
            "{key}"
        );
    }
}

#[test]
fn exact_topics_use_the_owning_shard_only() {
    let redis = RedisCluster::start();
    let nodes = start_nodes(&redis, 3);
    let mut subscribers: Vec<Client> = nodes
        .iter()
        .map(|node| {
            let mut client = Client::connect(node.addr);
            for topic in TOPICS {
                client.subscribe(topic);
            }
            client
        })
        .collect();

    // Every node's subscription sits on the one master that owns the channel, and the topics
    // spread over more than one master.
    let mut owners = Vec::new();
    for topic in TOPICS {
        let channel = format!("nexus:{topic}");
        let counts = wait_until(
            &format!("3 shard subscribers of {channel}"),
            LINK_TIMEOUT,
            || {
                let counts = redis.shard_numsub(&channel);
                (counts.iter().sum::<u64>() == 3).then_some(counts)
            },
        );
        let owner: Vec<usize> = (0..3).filter(|&i| counts[i] > 0).collect();
        assert_eq!(
            owner.len(),
            1,
            "{channel} subscribed on several masters: {counts:?}"
        );
        assert_eq!(counts[owner[0]], 3, "{channel}: {counts:?}");
        owners.push(owner[0]);
    }
    owners.sort();
    owners.dedup();
    assert!(
        owners.len() > 1,
        "all topics on one master; pick other names"
    );

    for (i, node) in nodes.iter().enumerate() {
        let mut publisher = Client::connect(node.addr);
        for topic in TOPICS {
            publisher.publish(topic, &json!({ "from": i }).to_string());
        }
    }
    for (index, subscriber) in subscribers.iter_mut().enumerate() {
        let mut received: Vec<(String, u64)> = (0..TOPICS.len() * 3)
            .map(|_| {
                let delivery = subscriber.recv();
                let topic = delivery["topic"].as_str().unwrap_or_default().to_owned();
                (topic, delivery["data"]["from"].as_u64().unwrap_or(99))
            })
            .collect();
        received.sort();
        let mut expected: Vec<(String, u64)> = TOPICS
            .iter()
            .flat_map(|topic| (0..3).map(move |from| (topic.to_string(), from)))
            .collect();
        expected.sort();
        assert_eq!(received, expected, "subscriber on shard-node-{index}");
        assert!(
            subscriber.try_recv(Duration::from_millis(300)).is_none(),
            "a duplicate arrived"
        );
    }

    // Without wildcard subscribers no classic PUBLISH ran: every message went by SPUBLISH.
    assert_eq!(redis.command_calls("publish"), [0, 0, 0]);
    let spublished: u64 = redis.command_calls("spublish").iter().sum();
    assert_eq!(spublished, (TOPICS.len() * 3) as u64);
}

#[test]
fn wildcards_reach_other_nodes_once() {
    let redis = RedisCluster::start();
    let nodes = start_nodes(&redis, 3);
    // node-1 has an exact and a wildcard subscriber of the same topic, so each message reaches
    // it twice: on the shard channel and as the classic copy. node-2 has a `>` pattern.
    let mut exact = Client::connect(nodes[1].addr);
    exact.subscribe("room.x");
    let mut single = Client::connect(nodes[1].addr);
    single.subscribe("room.*");
    let mut deep = Client::connect(nodes[2].addr);
    deep.subscribe("room.>");
    wait_announcement(&nodes, "shard-node-1");
    wait_announcement(&nodes, "shard-node-2");
    wait_until("node-1's shard subscription", LINK_TIMEOUT, || {
        (redis.shard_numsub("nexus:room.x").iter().sum::<u64>() == 1).then_some(())
    });

    let mut publisher = Client::connect(nodes[0].addr);
    publisher.publish("room.x", r#""one""#);
    publisher.publish("room.x.y", r#""two""#);
    publisher.publish("room.x", r#""three""#);

    let data = |client: &mut Client| {
        client.recv()["data"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(data(&mut exact), "one");
    assert_eq!(data(&mut exact), "three");
    assert_eq!(data(&mut single), "one");
    assert_eq!(data(&mut single), "three");
    // Order holds per topic only: `room.x.y` may overtake `room.x`, since the classic copies of
    // the two topics reach the subscribing master through different masters.
    let deep_data: Vec<String> = (0..3).map(|_| data(&mut deep)).collect();
    let same_topic: Vec<&str> = deep_data
        .iter()
        .map(String::as_str)
        .filter(|d| *d != "two")
        .collect();
    assert_eq!(
        same_topic,
        ["one", "three"],
        "room.x messages: {deep_data:?}"
    );
    assert!(
        deep_data.iter().any(|d| d == "two"),
        "room.x.y message: {deep_data:?}"
    );
    for client in [&mut exact, &mut single, &mut deep] {
        assert!(
            client.try_recv(Duration::from_millis(300)).is_none(),
            "a duplicate arrived"
        );
    }
}
