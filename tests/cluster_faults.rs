//! Redis failures: a crash and restart, killed pub/sub connections and repeated restarts. Clients
//! stay connected throughout, local delivery keeps working, PUBLISH fails with
//! `cluster_unavailable` while Redis is gone, and delivery resumes without duplicates.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{cluster_node, wait_degraded, wait_link_up, Cluster, RedisServer};
use common::client::Client;
use common::wait_until;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long Redis stays dead before it restarts. It only spaces the events of the test; nothing
/// is asserted about it.
const DOWNTIME: Duration = Duration::from_secs(3);

/// Subscribes one client to `topic` on each node, before anything fails.
fn subscribe_everywhere(cluster: &Cluster, topic: &str) -> Vec<Client> {
    let clients: Vec<Client> = cluster
        .nodes
        .iter()
        .map(|node| {
            let mut client = Client::connect(node.addr);
            client.subscribe(topic);
            client
        })
        .collect();
    cluster
        .redis
        .wait_numsub(&format!("nexus:{topic}"), cluster.nodes.len() as u64);
    clients
}

/// Publishes `per_node` numbered messages and a sentinel from every node, then checks that each
/// subscriber got every message exactly once.
fn assert_exactly_once(
    cluster: &Cluster,
    subscribers: &mut [Client],
    topic: &str,
    per_node: usize,
) {
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut publisher = Client::connect(node.addr);
        for n in 0..per_node {
            publisher.publish(topic, &json!({ "node": i, "n": n }).to_string());
        }
        publisher.publish(topic, r#"{"end":true}"#);
    }
    for (index, subscriber) in subscribers.iter_mut().enumerate() {
        let mut counts: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        let mut sentinels = 0;
        while sentinels < cluster.nodes.len() {
            let delivery = subscriber.recv();
            assert_eq!(
                delivery["type"], "message",
                "subscriber on node-{index}: {delivery}"
            );
            let data = &delivery["data"];
            if data["end"] == true {
                sentinels += 1;
                continue;
            }
            let key = (data["node"].as_u64().unwrap(), data["n"].as_u64().unwrap());
            *counts.entry(key).or_default() += 1;
        }
        let nodes = cluster.nodes.len() as u64;
        let expected: BTreeMap<(u64, u64), usize> = (0..nodes)
            .flat_map(|node| (0..per_node as u64).map(move |n| ((node, n), 1)))
            .collect();
        assert_eq!(counts, expected, "deliveries on node-{index}");
    }
}

/// Counts the open connections named `nexus-<node_id>-<role>` in `CLIENT LIST`.
fn named_connections(redis: &RedisServer, node_id: &str, role: &str) -> usize {
    let name = format!("name=nexus-{node_id}-{role} ");
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| line.contains(&name))
        .count()
}

#[test]
fn redis_crash_and_restart_resumes_delivery() {
    let mut cluster = Cluster::start(3);
    let mut subscribers = subscribe_everywhere(&cluster, "feed");

    cluster.redis.kill();
    for node in &cluster.nodes {
        let body = wait_degraded(node);
        assert_eq!(body["link"], "down", "{body}");
        let reason = body["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "degraded without a reason: {body}");
    }
    std::thread::sleep(DOWNTIME);
    cluster.redis.restart();
    for node in &cluster.nodes {
        wait_link_up(node);
    }
    cluster.redis.wait_numsub("nexus:feed", 3);

    // The same client connections, opened before the crash, receive again.
    assert_exactly_once(&cluster, &mut subscribers, "feed", 3);
}

#[test]
fn publish_while_redis_is_down_is_cluster_unavailable() {
    let mut cluster = Cluster::start(2);
    let mut local = Client::connect(cluster.nodes[0].addr);
    local.subscribe("status");
    let mut remote = Client::connect(cluster.nodes[1].addr);
    remote.subscribe("status");
    cluster.redis.wait_numsub("nexus:status", 2);

    cluster.redis.kill();
    // The reason names the first connection that is down; publishing stops once the publishing
    // connection is.
    let body = wait_until(
        "the publishing connection to be down",
        cluster::LINK_TIMEOUT,
        || {
            let body = cluster::health(&cluster.nodes[0]);
            let reason = body["reason"].as_str().unwrap_or_default();
            reason
                .starts_with("publishing connection to 127.0.0.1")
                .then_some(body)
        },
    );
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["link"], "down", "{body}");

    let mut publisher = Client::connect(cluster.nodes[0].addr);
    publisher.expect_error(
        r#"{"action":"PUBLISH","topic":"status","data":"down","id":"p1"}"#,
        "cluster_unavailable",
        Some(json!("p1")),
    );
    // Subscribers on the publishing node still get the message.
    assert_eq!(local.recv()["data"], "down");
    publisher.ping();

    cluster.redis.restart();
    for node in &cluster.nodes {
        wait_link_up(node);
    }
    cluster.redis.wait_numsub("nexus:status", 2);
    publisher.publish("status", r#""up""#);
    assert_eq!(local.recv()["data"], "up");
    assert_eq!(
        remote.recv()["data"],
        "up",
        "the message published while down never arrives"
    );
}

#[test]
fn killed_pubsub_connections_are_recovered() {
    let cluster = Cluster::start(3);
    let mut subscribers = subscribe_everywhere(&cluster, "resilient");

    let killed = cluster.redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "3", "pub/sub connections killed");
    cluster.redis.wait_numsub("nexus:resilient", 3);
    for node in &cluster.nodes {
        wait_link_up(node);
    }
    assert_exactly_once(&cluster, &mut subscribers, "resilient", 2);
}

#[test]
fn repeated_redis_restarts_give_no_duplicates() {
    let mut cluster = Cluster::start(3);
    let mut subscribers = subscribe_everywhere(&cluster, "steady");
    let mut wildcard = Client::connect(cluster.nodes[1].addr);
    wildcard.subscribe("steady.>");

    for _ in 0..3 {
        cluster.redis.kill();
        for node in &cluster.nodes {
            wait_degraded(node);
        }
        cluster.redis.restart();
        for node in &cluster.nodes {
            wait_link_up(node);
        }
    }
    cluster.redis.wait_numsub("nexus:steady", 3);
    for node in &cluster.nodes {
        let psub = u64::from(node.node_id == "node-1");
        cluster
            .redis
            .wait_client_subscriptions(&node.node_id, 1, psub);
        assert_eq!(named_connections(&cluster.redis, &node.node_id, "sub"), 1);
        assert_eq!(named_connections(&cluster.redis, &node.node_id, "pub"), 1);
    }
    assert_exactly_once(&cluster, &mut subscribers, "steady", 5);
    // The wildcard subscriber shares node-1 with an exact one and still gets nothing from
    // `steady`, which `steady.>` does not match.
    wildcard.ping();
    let mut publisher = Client::connect(cluster.nodes[2].addr);
    publisher.publish("steady.x", r#""deep""#);
    assert_eq!(wildcard.recv()["data"], "deep");
    assert!(wildcard.try_recv(Duration::from_millis(300)).is_none());
}

#[test]
fn node_started_before_redis_joins_when_it_appears() {
    let port = cluster::free_port();
    let node = cluster_node(&format!("redis://127.0.0.1:{port}"), "early").start();
    let body = wait_degraded(&node);
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&port.to_string())),
        "{body}"
    );
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("later");

    let redis = RedisServer::start_with(port, &[]);
    wait_link_up(&node);
    redis.wait_numsub("nexus:later", 1);
    wait_until(
        "the registry key of the early node",
        cluster::LINK_TIMEOUT,
        || (redis.cli(&["EXISTS", "nexus:node:early"]).trim() == "1").then_some(()),
    );
}

#[test]
fn frozen_redis_is_noticed_by_ping() {
    // SIGSTOP keeps Redis' sockets open, so only the missing PONG (or reply) shows the link is
    // dead; the test nodes allow 1 s for it.
    let cluster = Cluster::start(2);
    let mut subscribers = subscribe_everywhere(&cluster, "frozen");

    cluster.redis.signal(libc::SIGSTOP);
    for node in &cluster.nodes {
        let body = wait_degraded(node);
        let reason = body["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("no reply") || reason.contains("timed out"),
            "reason: {body}"
        );
    }
    cluster.redis.signal(libc::SIGCONT);
    for node in &cluster.nodes {
        wait_link_up(node);
    }
    cluster.redis.wait_numsub("nexus:frozen", 2);
    assert_exactly_once(&cluster, &mut subscribers, "frozen", 2);
}
