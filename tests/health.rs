//! Plain HTTP on the WebSocket port: GET /health, rejected handshakes, and the JSON log lines.

mod common;

use common::client::Client;
use common::raw::RawClient;
use common::{http, wait_until, Node, EVENT_TIMEOUT};
use serde_json::Value;

#[test]
fn health_returns_status_json() {
    let node = Node::start_with(&[("--node-id", "health-node")]);
    let response = http::get(node.addr, "/health");
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "Content-Type {content_type:?}"
    );
    let body: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", response.body_text()));
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["node_id"], "health-node", "{body}");
    assert_eq!(body["node_id"], node.node_id.as_str(), "{body}");
    assert_eq!(body["cores"], 2, "{body}");
    assert!(body["connections"].is_u64(), "{body}");
}

#[test]
fn health_counts_open_connections() {
    let node = Node::start();
    let before = http::health_connections(node.addr);
    let clients: Vec<Client> = (0..3).map(|_| Client::connect(node.addr)).collect();
    wait_until("/health to count 3 more", EVENT_TIMEOUT, || {
        (http::health_connections(node.addr) == before + 3).then_some(())
    });
    for client in clients {
        client.close();
    }
    wait_until("/health to count them gone", EVENT_TIMEOUT, || {
        (http::health_connections(node.addr) == before).then_some(())
    });
}

#[test]
fn any_path_accepts_websocket() {
    let node = Node::start();
    for path in ["/", "/ws", "/a/b/c", "/ws?token=1&x=2"] {
        let mut client = Client::connect_path(node.addr, path);
        client.ping();
    }
}

#[test]
fn health_path_is_never_upgraded() {
    let node = Node::start();
    let response = http::exchange(node.addr, &http::upgrade_request(node.addr, "/health", ""));
    assert_ne!(response.status, 101, "{response:?}");
}

#[test]
fn unknown_path_without_upgrade_gets_404() {
    let node = Node::start();
    let response = http::get(node.addr, "/no-such-page");
    assert_eq!(response.status, 404, "{response:?}");
}

#[test]
fn invalid_upgrades_get_400() {
    let node = Node::start();
    let addr = node.addr;
    let cases = [
        (
            "no Sec-WebSocket-Key",
            format!(
                "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
        (
            "no Connection: Upgrade",
            http::upgrade_request(addr, "/", "").replace("Connection: Upgrade\r\n", ""),
        ),
        (
            "HTTP/1.0",
            http::upgrade_request(addr, "/", "").replace("HTTP/1.1", "HTTP/1.0"),
        ),
    ];
    for (case, request) in cases {
        let response = http::exchange(addr, &request);
        assert_eq!(response.status, 400, "{case}: {response:?}");
    }
    let mut client = Client::connect(addr);
    client.ping();
}

#[test]
fn upgrade_with_post_is_rejected() {
    // 405 Method Not Allowed names the broken rule more precisely than 400; both reject.
    let node = Node::start();
    let request = http::upgrade_request(node.addr, "/", "").replacen("GET", "POST", 1);
    let response = http::exchange(node.addr, &request);
    assert!(
        response.status == 400 || response.status == 405,
        "{response:?}"
    );
}

#[test]
fn unsupported_version_names_version_13() {
    // RFC 6455 section 4.4: the server rejects the handshake with an error status (426 Upgrade
    // Required, for example) and a Sec-WebSocket-Version header listing the versions it speaks.
    let node = Node::start();
    let request = http::upgrade_request(node.addr, "/", "").replace("Version: 13", "Version: 8");
    let response = http::exchange(node.addr, &request);
    assert!(
        response.status == 400 || response.status == 426,
        "{response:?}"
    );
    assert_eq!(
        response.header("sec-websocket-version"),
        Some("13"),
        "{response:?}"
    );
}

#[test]
fn garbage_request_does_not_disturb_node() {
    let mut node = Node::start();
    let mut bystander = common::Bystander::new(&node);
    for bytes in [
        &b"\x00\x01\x02\x03\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"\x16\x03\x01\x02\x00",
    ] {
        let mut stream = std::net::TcpStream::connect(node.addr).expect("connect");
        stream
            .set_read_timeout(Some(EVENT_TIMEOUT))
            .expect("timeout");
        std::io::Write::write_all(&mut stream, bytes).expect("write");
        drop(stream);
    }
    bystander.assert_undisturbed(&node);
    common::assert_node_serves(&mut node);
}

#[test]
fn offered_deflate_is_not_negotiated() {
    let node = Node::start();
    let extension = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let request = http::upgrade_request(node.addr, "/", extension);
    let response = http::exchange(node.addr, &request);
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(
        response.header("sec-websocket-extensions"),
        None,
        "{response:?}"
    );
    // The same handshake on a raw client gives a working, uncompressed connection.
    let mut raw = RawClient::connect_with(node.addr, &request);
    raw.send(&common::raw::OutFrame::text(r#"{"action":"PING","id":1}"#))
        .expect("send");
    match raw.read_frame(EVENT_TIMEOUT) {
        common::raw::ReadOutcome::Frame(frame) => {
            assert_eq!(frame.rsv, 0, "compressed reply\n{}", raw.transcript());
        }
        other => panic!("expected the pong, got {other:?}\n{}", raw.transcript()),
    }
}

#[test]
fn log_lines_are_json_objects() {
    let node = Node::start();
    let mut client = Client::connect(node.addr);
    let conn = node.connection_opened(client.local_addr);
    client.ping();
    client.close();
    node.connection_closed(&conn.conn_id, EVENT_TIMEOUT);
    for line in node.logs() {
        assert!(line.is_object(), "log line is not a JSON object: {line}");
        assert!(
            line["ts"].is_string() || line["ts"].is_number(),
            "no ts: {line}"
        );
        assert!(line["level"].is_string(), "no level: {line}");
        assert!(line["msg"].is_string(), "no msg: {line}");
    }
    let started = node
        .logs()
        .into_iter()
        .find(|l| l["msg"] == "node started")
        .expect("a \"node started\" line");
    assert_eq!(started["level"], "INFO", "{started}");
}
