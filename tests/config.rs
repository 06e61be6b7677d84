//! Configuration: every flag can also come from a `NEXUS_*` environment variable or a key of the
//! TOML file given by `--config`. An invalid value makes the node exit with status 2 and a message
//! on stderr that names the value.

mod common;

use common::client::Client;
use common::raw::{OutFrame, RawClient};
use common::{http, unique_temp_path, Node, NodeBuilder};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

/// Time allowed for the node to reject its configuration and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the node with `builder`, asserts exit status 2 and that stderr names the setting and
/// contains `value`.
fn assert_rejected(builder: NodeBuilder, setting: &str, value: &str) {
    let finished = builder.run_to_exit(EXIT_TIMEOUT);
    let context = format!("{setting} = {value:?}\n{}", finished.describe());
    assert_eq!(finished.status.code(), Some(2), "{context}");
    assert!(
        finished.stderr.contains(value),
        "stderr does not name the value: {context}"
    );
    // `--max-message-size`, `max_message_size` and `NEXUS_MAX_MESSAGE_SIZE` all name the setting.
    let normalized = finished.stderr.to_lowercase().replace('_', "-");
    assert!(
        normalized.contains(setting),
        "stderr does not name the setting: {context}"
    );
}

#[test]
fn invalid_flag_values_exit_2() {
    let cases = [
        ("--cores", "0"),
        ("--cores", "many"),
        ("--listen", "nowhere"),
        ("--listen", "127.0.0.1:99999"),
        ("--max-message-size", "big"),
        ("--max-subscriptions", "-1"),
        ("--max-connections", "lots"),
        ("--max-topic-length", "long"),
        ("--max-outbound-queue", "plenty"),
        ("--ping-interval", "often"),
        ("--pong-timeout", "10 parsecs"),
        ("--drain-timeout", "-5s"),
        ("--drain-timeout", "forever"),
        ("--log-level", "loud"),
    ];
    for (flag, value) in cases {
        let setting = flag.trim_start_matches("--");
        // `--flag=value` keeps values such as `-1` from being read as flags.
        let builder = Node::builder().raw_arg(&format!("{flag}={value}"));
        assert_rejected(builder, setting, value);
    }
}

#[test]
fn unknown_flag_exits_2() {
    let finished = Node::builder()
        .raw_arg("--no-such-flag")
        .run_to_exit(EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    assert!(
        finished.stderr.contains("--no-such-flag"),
        "{}",
        finished.describe()
    );
}

#[test]
fn invalid_env_value_exits_2() {
    let builder = Node::builder().env("NEXUS_MAX_MESSAGE_SIZE", "huge");
    assert_rejected(builder, "max-message-size", "huge");
    let builder = Node::builder().env("NEXUS_PING_INTERVAL", "whenever");
    assert_rejected(builder, "ping-interval", "whenever");
}

#[test]
fn invalid_toml_value_exits_2() {
    let path = unique_temp_path("invalid.toml");
    std::fs::write(&path, "max_message_size = \"enormous\"\n").expect("write config");
    let builder = Node::builder().arg("--config", path.to_str().expect("UTF-8 path"));
    assert_rejected(builder, "max-message-size", "enormous");
    let _ = std::fs::remove_file(path);
}

#[test]
fn unreadable_config_file_exits_2() {
    let path = unique_temp_path("missing.toml");
    let path_text = path.to_str().expect("UTF-8 path");
    let finished = Node::builder()
        .arg("--config", path_text)
        .run_to_exit(EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    assert!(
        finished.stderr.contains(path_text),
        "stderr does not name the file: {}",
        finished.describe()
    );

    let broken = unique_temp_path("broken.toml");
    std::fs::write(&broken, "max_subscriptions = [\n").expect("write config");
    let broken_text = broken.to_str().expect("UTF-8 path");
    let finished = Node::builder()
        .arg("--config", broken_text)
        .run_to_exit(EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    assert!(
        finished.stderr.contains(broken_text),
        "stderr does not name the file: {}",
        finished.describe()
    );
    let _ = std::fs::remove_file(broken);
}

#[test]
fn environment_sets_listen_and_cores() {
    // 127.0.0.2 is loopback on Linux; the default 127.0.0.1 would hide an ignored variable.
    let node = Node::builder()
        .without_default("--listen")
        .without_default("--cores")
        .env("NEXUS_LISTEN", "127.0.0.2:0")
        .env("NEXUS_CORES", "1")
        .env("NEXUS_NODE_ID", "env-node")
        .start();
    assert_eq!(node.addr.ip().to_string(), "127.0.0.2");
    assert_eq!(node.cores, 1);
    assert_eq!(node.node_id, "env-node");
    let health = http::health(node.addr);
    assert_eq!(health["cores"], 1, "{health}");
    assert_eq!(health["node_id"], "env-node", "{health}");
}

#[test]
fn environment_sets_subscription_limit() {
    let node = Node::builder().env("NEXUS_MAX_SUBSCRIPTIONS", "2").start();
    let mut client = Client::connect(node.addr);
    client.subscribe("a");
    client.subscribe("b");
    client.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"c","id":3}"#,
        "too_many_subscriptions",
        Some(json!(3)),
    );
}

#[test]
fn toml_file_sets_configuration() {
    let path = unique_temp_path("node.toml");
    let config = r#"
listen = "127.0.0.3:0"
cores = 1
node_id = "toml-node"
max_subscriptions = 2
max_message_size = 1024
ping_interval = "25s"
pong_timeout = "10s"
"#;
    std::fs::write(&path, config).expect("write config");
    let node = Node::builder()
        .without_default("--listen")
        .without_default("--cores")
        .arg("--config", path.to_str().expect("UTF-8 path"))
        .start();
    let _ = std::fs::remove_file(&path);

    assert_eq!(node.addr.ip().to_string(), "127.0.0.3");
    assert_eq!(node.cores, 1);
    assert_eq!(node.node_id, "toml-node");

    let mut client = Client::connect(node.addr);
    client.subscribe("a");
    client.subscribe("b");
    client.expect_error(
        r#"{"action":"SUBSCRIBE","topic":"c","id":3}"#,
        "too_many_subscriptions",
        Some(json!(3)),
    );

    let mut raw = RawClient::connect(node.addr);
    let mut text = br#"{"action":"PING"}"#.to_vec();
    text.resize(1025, b' ');
    raw.send_all(&[OutFrame::text(text)]);
    raw.expect_close(1009);
}

#[test]
fn started_log_reports_listen_address() {
    let node = Node::start();
    let addr: SocketAddr = node.addr;
    assert_ne!(
        addr.port(),
        0,
        "port 0 must be resolved in the \"node started\" line"
    );
    assert_eq!(node.cores, 2);
    assert!(!node.node_id.is_empty(), "empty node_id");
}
