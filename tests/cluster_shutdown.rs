//! The node registry and leaving the cluster: a running node keeps `nexus:node:<id>` fresh, and
//! SIGTERM closes clients with 1001, unsubscribes and deletes the key before the node exits.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{cluster_node, wait_link_up, RedisServer};
use common::client::Client;
use common::{wait_until, EVENT_TIMEOUT};
use serde_json::Value;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;

#[test]
fn registry_key_describes_the_node() {
    let redis = RedisServer::start();
    let node = cluster_node(&redis.url(), "listed").start();
    wait_link_up(&node);
    let mut client = Client::connect(node.addr);
    client.subscribe("metrics.cpu");
    client.subscribe("metrics.*");

    let entry: Value = wait_until(
        "a registry entry with both patterns",
        cluster::LINK_TIMEOUT,
        || {
            let text = redis.cli(&["GET", "nexus:node:listed"]);
            let entry: Value = serde_json::from_str(text.trim()).ok()?;
            (entry["pattern_count"] == 2).then_some(entry)
        },
    );
    assert_eq!(entry["id"], "listed", "{entry}");
    assert_eq!(entry["listen"], node.addr.to_string(), "{entry}");
    assert_eq!(entry["connections"], 1, "{entry}");
    assert_eq!(entry["link"], "up", "{entry}");
    assert_eq!(
        entry["patterns"],
        serde_json::json!(["metrics.*", "metrics.cpu"]),
        "{entry}"
    );
    let started_at = entry["started_at"].as_u64().expect("started_at");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(started_at) < 120,
        "started_at {started_at}, now {now}"
    );

    // The key expires after three registry intervals (3 x 500 ms in these tests).
    let ttl: i64 = redis
        .cli(&["PTTL", "nexus:node:listed"])
        .trim()
        .parse()
        .expect("PTTL");
    assert!(ttl > 0, "PTTL {ttl}: the key has no expiry");
    assert!(
        ttl <= 1500,
        "PTTL {ttl}: more than three registry intervals"
    );
}

#[test]
fn sigterm_drains_and_leaves_the_cluster() {
    let redis = RedisServer::start();
    // A long registry interval, so the key can only disappear through DEL, not expiry.
    let mut leaving = cluster_node(&redis.url(), "leaving")
        .arg("--registry-interval", "20s")
        .arg("--drain-timeout", "3s")
        .start();
    let staying = cluster_node(&redis.url(), "staying").start();
    wait_link_up(&leaving);
    wait_link_up(&staying);
    let mut client = Client::connect(leaving.addr);
    client.subscribe("farewell");
    let mut survivor = Client::connect(staying.addr);
    survivor.subscribe("farewell");
    redis.wait_numsub("nexus:farewell", 2);
    wait_until(
        "the registry key of the leaving node",
        cluster::LINK_TIMEOUT,
        || (redis.cli(&["EXISTS", "nexus:node:leaving"]).trim() == "1").then_some(()),
    );

    leaving.signal(libc::SIGTERM);
    let frame = client
        .expect_close(EVENT_TIMEOUT)
        .expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "node shutting down");
    let status = leaving.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", leaving.diagnostics());
    leaving.wait_for_log("\"cluster link stopped\"", EVENT_TIMEOUT, |line| {
        line["msg"] == "cluster link stopped"
    });

    assert_eq!(
        redis.cli(&["EXISTS", "nexus:node:leaving"]).trim(),
        "0",
        "registry key left behind"
    );
    assert_eq!(redis.numsub("nexus:farewell"), 1);
    assert_eq!(
        redis.client_subscriptions("leaving"),
        None,
        "pub/sub connection still open"
    );

    let mut publisher = Client::connect(staying.addr);
    publisher.publish("farewell", r#""bye""#);
    assert_eq!(survivor.recv()["data"], "bye");
}
