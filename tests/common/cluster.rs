//! Helpers for the cluster tests: a real `redis-server` (or a three-master Redis Cluster) on
//! free loopback ports, nodes joined to it, and `redis-cli` queries.
//!
//! The cluster test files include this file with `#[path]`, beside `mod common;`, so that
//! tests/common/mod.rs does not have to list it.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use crate::common::process::{self, Finished};
use crate::common::{http, wait_until, Node, NodeBuilder, EVENT_TIMEOUT};
use serde_json::Value;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Time allowed for Redis to start or for the link to (re)connect and subscribe: the backoff is
/// at most 5 s, and a debug build on a busy machine is slow.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns a loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A `redis-server` child process on a loopback port, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    /// The TCP port.
    pub port: u16,
    extra: Vec<String>,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a Redis server without persistence on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(free_port(), &[])
    }

    /// Starts a Redis server on `port` with extra `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir = crate::common::unique_temp_path(&format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("create the Redis directory");
        let mut server = RedisServer {
            child: None,
            port,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            dir,
        };
        server.restart();
        server
    }

    /// Starts the server again on the same port after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "redis-server on {} still runs",
            self.port
        );
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(process::spawn(&mut command));
        let port = self.port;
        wait_until(
            &format!("redis-server on {port} to answer PING"),
            LINK_TIMEOUT,
            || {
                let reply = try_cli(port, &["PING"])?;
                (reply.trim() == "PONG").then_some(())
            },
        );
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the server, such as SIGSTOP to freeze it without closing its sockets.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("redis-server is running");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        let result = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", child.id());
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Returns the number of subscribers of `channel` (`PUBSUB NUMSUB`).
    pub fn numsub(&self, channel: &str) -> u64 {
        let output = self.cli(&["PUBSUB", "NUMSUB", channel]);
        let count = output.lines().nth(1).unwrap_or_default().trim();
        count
            .parse()
            .unwrap_or_else(|_| panic!("PUBSUB NUMSUB {channel}: {output:?}"))
    }

    /// Waits until `channel` has exactly `count` subscribers.
    pub fn wait_numsub(&self, channel: &str, count: u64) {
        wait_until(
            &format!("{count} subscribers of {channel}"),
            LINK_TIMEOUT,
            || (self.numsub(channel) == count).then_some(()),
        );
    }

    /// Returns the `sub` and `psub` counts that `CLIENT LIST` shows for the pub/sub connection
    /// of `node_id`, or None when that connection is not open.
    pub fn client_subscriptions(&self, node_id: &str) -> Option<(u64, u64)> {
        let name = format!("name=nexus-{node_id}-sub ");
        let clients = self.cli(&["CLIENT", "LIST"]);
        let line = clients.lines().find(|line| line.contains(&name))?;
        let field = |key: &str| -> Option<u64> {
            let value = line.split(' ').find_map(|pair| pair.strip_prefix(key))?;
            value.parse().ok()
        };
        Some((field("sub=")?, field("psub=")?))
    }

    /// Waits until the pub/sub connection of `node_id` has `sub` channels and `psub` globs.
    pub fn wait_client_subscriptions(&self, node_id: &str, sub: u64, psub: u64) {
        wait_until(
            &format!("{node_id} to hold {sub} channels and {psub} globs"),
            LINK_TIMEOUT,
            || (self.client_subscriptions(node_id) == Some((sub, psub))).then_some(()),
        );
    }

    /// Returns the number of distinct globs subscribed by any client (`PUBSUB NUMPAT`).
    pub fn numpat(&self) -> u64 {
        let output = self.cli(&["PUBSUB", "NUMPAT"]);
        output
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PUBSUB NUMPAT: {output:?}"))
    }

    /// Returns the channels with at least one subscriber that match `glob` (`PUBSUB CHANNELS`).
    pub fn channels(&self, glob: &str) -> Vec<String> {
        let output = self.cli(&["PUBSUB", "CHANNELS", glob]);
        let mut channels: Vec<String> = output.lines().map(str::to_owned).collect();
        channels.retain(|line| !line.is_empty());
        channels.sort();
        channels
    }

    /// Returns the URL nodes use to reach this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        if let Some(child) = &self.child {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -p port --raw args...` and returns stdout; panics on failure.
pub fn cli(port: u16, args: &[&str]) -> String {
    try_cli(port, args).unwrap_or_else(|| panic!("redis-cli -p {port} {args:?} failed"))
}

/// Runs `redis-cli`, returning None when it fails (server not up yet).
pub fn try_cli(port: u16, args: &[&str]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args);
    let finished: Finished = process::run(command, EVENT_TIMEOUT);
    let failed = !finished.status.success() || finished.stdout.starts_with("ERR");
    let refused = finished.stderr.contains("Could not connect");
    (!failed && !refused).then_some(finished.stdout)
}

/// Builds a node that joins the cluster at `url`, with short Redis timeouts so that tests
/// notice a dead connection quickly. The timeouts are set through the environment, so a test can
/// still pass the flags, which take precedence.
pub fn cluster_node(url: &str, node_id: &str) -> NodeBuilder {
    Node::builder()
        .arg("--redis", url)
        .arg("--node-id", node_id)
        .env("NEXUS_REDIS_PING_INTERVAL", "200ms")
        .env("NEXUS_REDIS_TIMEOUT", "1s")
        .env("NEXUS_REGISTRY_INTERVAL", "500ms")
}

/// Starts a node on `url` and waits until its link is up.
pub fn start_cluster_node(url: &str, node_id: &str) -> Node {
    let node = cluster_node(url, node_id).start();
    wait_link_up(&node);
    node
}

/// Returns the body of GET /health.
pub fn health(node: &Node) -> Value {
    http::health(node.addr)
}

/// Waits until /health reports `status: ok` and `link: up`.
pub fn wait_link_up(node: &Node) {
    wait_until(
        &format!("link of {} to be up", node.node_id),
        LINK_TIMEOUT,
        || {
            let body = health(node);
            (body["status"] == "ok" && body["link"] == "up").then_some(())
        },
    );
}

/// Waits until /health reports `status: degraded` and returns the body.
pub fn wait_degraded(node: &Node) -> Value {
    wait_until(
        &format!("/health of {} to say degraded", node.node_id),
        LINK_TIMEOUT,
        || {
            let body = health(node);
            (body["status"] == "degraded").then_some(body)
        },
    )
}

/// Returns whether something accepts TCP connections on the loopback `port`.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// One Redis server and the nodes joined to it.
pub struct Cluster {
    /// The Redis server.
    pub redis: RedisServer,
    /// The nodes, `node-0`, `node-1`, ...
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts Redis and `count` nodes, and waits until every link is up.
    pub fn start(count: usize) -> Cluster {
        let redis = RedisServer::start();
        let url = redis.url();
        let nodes = (0..count)
            .map(|i| cluster_node(&url, &format!("node-{i}")).start())
            .collect::<Vec<_>>();
        for node in &nodes {
            wait_link_up(node);
        }
        Cluster { redis, nodes }
    }
}

/// A Redis Cluster of three masters without replicas on loopback ports.
pub struct RedisCluster {
    /// The masters.
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three `redis-server --cluster-enabled yes` processes, joins them with
    /// `redis-cli --cluster create` and waits until the cluster state is ok on every one.
    pub fn start() -> RedisCluster {
        let servers: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    free_cluster_port(),
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
                )
            })
            .collect();
        // Listed from the highest port down, so hash slot 0 lands on a master other than the
        // lowest address, which the link uses for classic subscriptions.
        let addresses: Vec<String> = servers
            .iter()
            .rev()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let mut command = Command::new("redis-cli");
        command
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = process::run(command, LINK_TIMEOUT);
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            created.describe()
        );
        for server in &servers {
            wait_until(
                &format!("cluster_state:ok on {}", server.port),
                LINK_TIMEOUT,
                || {
                    server
                        .cli(&["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                        .then_some(())
                },
            );
        }
        RedisCluster { servers }
    }

    /// Returns the URL that names the first master as the seed.
    pub fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.servers[0].port)
    }

    /// Returns the subscriber count of shard channel `channel` on each master
    /// (`PUBSUB SHARDNUMSUB`).
    pub fn shard_numsub(&self, channel: &str) -> Vec<u64> {
        self.servers
            .iter()
            .map(|server| {
                let output = server.cli(&["PUBSUB", "SHARDNUMSUB", channel]);
                let count = output.lines().nth(1).unwrap_or_default().trim();
                count
                    .parse()
                    .unwrap_or_else(|_| panic!("SHARDNUMSUB {channel}: {output:?}"))
            })
            .collect()
    }

    /// Returns how often `command` ran on each master, from `INFO commandstats`.
    pub fn command_calls(&self, command: &str) -> Vec<u64> {
        let prefix = format!("cmdstat_{command}:calls=");
        self.servers
            .iter()
            .map(|server| {
                let stats = server.cli(&["INFO", "commandstats"]);
                let line = stats
                    .lines()
                    .find_map(|line| line.strip_prefix(prefix.as_str()));
                let calls = line.and_then(|rest| rest.split(',').next());
                calls.map_or(0, |calls| calls.parse().expect("calls"))
            })
            .collect()
    }
}

/// Returns a free port below 55000 whose cluster bus port (the port plus 10000) is free too.
/// Each test process starts from its own base, so parallel test binaries rarely collide.
fn free_cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1000) as u16 * 30;
    for _ in 0..1000 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed);
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a Redis Cluster node from {base}");
}
