//! Message size in a cluster: large messages cross nodes intact, and a node warns at start when
//! `max_message_size` does not fit Redis' output buffer limit for pub/sub clients.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::{cluster_node, wait_link_up, RedisServer, LINK_TIMEOUT};
use common::client::Client;

#[test]
fn large_message_crosses_nodes_intact() {
    let redis = RedisServer::start();
    let start = |id: &str| {
        let node = cluster_node(&redis.url(), id)
            .arg("--max-message-size", "2097152")
            .arg("--max-outbound-queue", "4194304")
            .start();
        wait_link_up(&node);
        node
    };
    let sender = start("big-0");
    let receiver = start("big-1");
    let mut subscriber = Client::connect(receiver.addr);
    subscriber.subscribe("bulk");
    redis.wait_numsub("nexus:bulk", 1);

    // Past 65535 bytes a WebSocket frame needs the 8-byte length field.
    for len in [100, 70_000, 1_500_000] {
        let data = format!("\"{}\"", "x".repeat(len));
        let mut publisher = Client::connect(sender.addr);
        publisher.publish("bulk", &data);
        let delivery = subscriber.recv();
        let text = delivery["data"].as_str().unwrap_or_default();
        assert_eq!(text.len(), len, "delivered length");
        assert!(text.bytes().all(|b| b == b'x'));
    }
}

#[test]
fn oversized_max_message_size_is_reported_at_start() {
    let redis = RedisServer::start();
    let fitting = cluster_node(&redis.url(), "fits").start();
    let line = fitting.wait_for_log("the buffer limit check", LINK_TIMEOUT, |line| {
        line["msg"] == "redis pub/sub buffer limits fit max_message_size"
    });
    assert_eq!(line["pubsub_hard_limit"], 33_554_432, "{line}");

    let oversized = cluster_node(&redis.url(), "too-big")
        .arg("--max-message-size", "41943040")
        .arg("--max-outbound-queue", "83886080")
        .start();
    let warning = oversized.wait_for_log("the buffer limit warning", LINK_TIMEOUT, |line| {
        let message = line["msg"].as_str().unwrap_or_default();
        message.starts_with("max_message_size exceeds the Redis pub/sub hard output buffer limit")
    });
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["max_message_size"], 41_943_040, "{warning}");

    // Raising Redis' limit silences the warning for nodes that connect afterwards.
    redis.cli(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 134217728 67108864 60",
    ]);
    let raised = cluster_node(&redis.url(), "raised")
        .arg("--max-message-size", "41943040")
        .arg("--max-outbound-queue", "83886080")
        .start();
    raised.wait_for_log("the buffer limit check", LINK_TIMEOUT, |line| {
        line["msg"] == "redis pub/sub buffer limits fit max_message_size"
    });
}
