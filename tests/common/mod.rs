//! Helpers shared by the integration tests.
//!
//! [`Node`] runs the real `nexus-node` binary on port 0 and collects its JSON log lines from
//! stdout. [`client::Client`] speaks WebSocket through tungstenite, [`raw::RawClient`] writes
//! frames byte by byte (for input no library would send), and [`http`] sends plain HTTP requests.
//! Every socket read has a timeout and every wait has a deadline, so a broken node fails a test
//! instead of hanging it.

// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod client;
pub mod http;
pub mod process;
pub mod raw;

use client::Client;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Time allowed for the node to log "node started": a debug build on a shared 2-core machine
/// can take a while to set up its cores.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed for one expected event: a reply, a delivery, a log line, an exit.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags every test node gets unless the test sets or omits them.
const DEFAULT_ARGS: [(&str, &str); 3] = [
    ("--listen", "127.0.0.1:0"),
    ("--cores", "2"),
    ("--log-level", "debug"),
];

/// Command line and environment for one `nexus-node` process.
#[derive(Default)]
pub struct NodeBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    omitted: Vec<String>,
}

impl NodeBuilder {
    /// Adds `flag value`; it replaces the default for the same flag.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.push(flag.to_owned());
        self.args.push(value.to_owned());
        self
    }

    /// Adds an argument as is (a flag without a value, or an invalid one).
    pub fn raw_arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Sets an environment variable for the node.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Leaves out one of the default flags, so that the environment or a config file sets it.
    pub fn without_default(mut self, flag: &str) -> Self {
        self.omitted.push(flag.to_owned());
        self
    }

    /// Starts the node and waits for its "node started" log line.
    pub fn start(self) -> Node {
        let mut command = self.command();
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = process::spawn(&mut command);
        let logs = Arc::new(LogBook::default());
        read_log_lines(child.stdout.take().expect("stdout is piped"), logs.clone());
        let stderr = Arc::new(Mutex::new(String::new()));
        read_stderr(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
        );

        let mut node = Node {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_id: String::new(),
            cores: 0,
            logs,
            stderr,
        };
        let started = node.wait_for_log("the \"node started\" log line", STARTUP_TIMEOUT, |l| {
            l["msg"] == "node started"
        });
        node.addr = started["listen"]
            .as_str()
            .and_then(|listen| listen.parse().ok())
            .unwrap_or_else(|| {
                panic!("\"node started\" has no socket address in `listen`: {started}")
            });
        node.node_id = field_text(&started["node_id"]);
        node.cores = started["cores"]
            .as_u64()
            .unwrap_or_else(|| panic!("\"node started\" has no integer `cores`: {started}"))
            as usize;
        node
    }

    /// Runs the node and expects it to exit within `timeout`, as it must on invalid configuration.
    pub fn run_to_exit(self, timeout: Duration) -> process::Finished {
        process::run(self.command(), timeout)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus-node"));
        for (flag, value) in DEFAULT_ARGS {
            let with_value = format!("{flag}=");
            let set_by_test = self
                .args
                .iter()
                .any(|a| a == flag || a.starts_with(&with_value));
            let omitted = self.omitted.iter().any(|arg| arg == flag);
            if !set_by_test && !omitted {
                command.args([flag, value]);
            }
        }
        command.args(&self.args);

        // The test's own environment must not configure the node.
        for (key, _) in std::env::vars() {
            if key.starts_with("NEXUS_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command.stdin(Stdio::null());
        command
    }
}

/// Log lines received so far, and whether stdout has closed (the node exited).
#[derive(Default)]
struct LogBook {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<Value>,
    stdout_closed: bool,
}

impl LogBook {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Parses each stdout line as JSON; a line that is not JSON is kept as a JSON string.
fn read_log_lines(stdout: impl Read + Send + 'static, logs: Arc<LogBook>) {
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
            logs.lock().lines.push(value);
            logs.changed.notify_all();
        }
        logs.lock().stdout_closed = true;
        logs.changed.notify_all();
    });
}

fn read_stderr(mut stderr: impl Read + Send + 'static, text: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buffer) {
            let chunk = String::from_utf8_lossy(&buffer[..n]);
            text.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&chunk);
        }
    });
}

/// One running `nexus-node` process, killed with SIGKILL when dropped if it is still running.
pub struct Node {
    child: Child,
    /// Address from the "node started" log line.
    pub addr: SocketAddr,
    /// `node_id` from the "node started" log line.
    pub node_id: String,
    /// `cores` from the "node started" log line.
    pub cores: usize,
    logs: Arc<LogBook>,
    stderr: Arc<Mutex<String>>,
}

/// The `conn_id` and `core` that the node logged for one connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub conn_id: String,
    pub core: String,
}

impl Node {
    /// Starts a node with the default test flags.
    pub fn start() -> Node {
        NodeBuilder::default().start()
    }

    /// Starts a node with the default test flags plus `flag value` pairs.
    pub fn start_with(args: &[(&str, &str)]) -> Node {
        let mut builder = NodeBuilder::default();
        for (flag, value) in args {
            builder = builder.arg(flag, value);
        }
        builder.start()
    }

    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// WebSocket URL of the node's root path.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Returns a copy of every log line so far.
    pub fn logs(&self) -> Vec<Value> {
        self.logs.lock().lines.clone()
    }

    /// Returns the first log line that matches `matches`, waiting up to `timeout` for it.
    ///
    /// Panics with the recent log lines and stderr when none arrives or the node exits first.
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut state = self.logs.lock();
        loop {
            if let Some(line) = state.lines.iter().find(|line| matches(line)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || state.stdout_closed {
                let closed = state.stdout_closed;
                drop(state);
                panic!(
                    "no log line for {what} after {timeout:?} (node exited: {closed})\n{}",
                    self.diagnostics()
                );
            }
            state = self
                .logs
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Returns the "connection opened" record of the client whose local address is `client`.
    pub fn connection_opened(&self, client: SocketAddr) -> ConnInfo {
        let remote = client.to_string();
        let line = self.wait_for_log(
            &format!("\"connection opened\" from {remote}"),
            EVENT_TIMEOUT,
            |l| l["msg"] == "connection opened" && field_text(&l["remote_addr"]) == remote,
        );
        ConnInfo {
            conn_id: field_text(&line["conn_id"]),
            core: field_text(&line["core"]),
        }
    }

    /// Returns the "connection closed" log line of `conn_id`, waiting up to `timeout` for it.
    pub fn connection_closed(&self, conn_id: &str, timeout: Duration) -> Value {
        self.wait_for_log(
            &format!("\"connection closed\" of conn_id {conn_id}"),
            timeout,
            |l| l["msg"] == "connection closed" && field_text(&l["conn_id"]) == conn_id,
        )
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGINT`, ...) to the node.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits up to `timeout` for the node to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid on the node failed") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "node still running {timeout:?} after the wait began\n{}",
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Panics unless the node process is still running.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("waitpid on the node failed") {
            panic!("node exited with {status}\n{}", self.diagnostics());
        }
    }

    /// Returns the node's resident set size in KiB, from `VmRSS` in /proc/PID/status.
    pub fn vm_rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid()).unwrap_or_else(|| panic!("no VmRSS for pid {}", self.pid()))
    }

    /// Returns what the node printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Formats the last log lines and stderr for a failure message.
    pub fn diagnostics(&self) -> String {
        let lines = self.logs();
        let tail: Vec<String> = lines
            .iter()
            .skip(lines.len().saturating_sub(40))
            .map(Value::to_string)
            .collect();
        format!(
            "--- last {} of {} node log lines ---\n{}\n--- node stderr ---\n{}",
            tail.len(),
            lines.len(),
            tail.join("\n"),
            self.stderr()
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Child::kill sends SIGKILL to the child's pid.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Returns `VmRSS` in KiB of process `pid`, or None when the process is gone.
pub fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns a log field as text: strings as they are, numbers and others as JSON.
pub fn field_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Polls `probe` every 20 ms until it returns Some, and panics after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client placed on a known core.
pub struct PlacedClient {
    pub client: Client,
    pub conn: ConnInfo,
}

/// Opens connections until each of the node's cores has `per_core` of them.
///
/// The kernel or the node picks the core of each connection, so this keeps opening connections
/// (at most 64) and closes those that land on a core that already has enough.
pub fn connect_on_every_core(node: &Node, per_core: usize) -> Vec<PlacedClient> {
    const MAX_ATTEMPTS: usize = 64;
    let mut by_core: BTreeMap<String, Vec<PlacedClient>> = BTreeMap::new();
    for _ in 0..MAX_ATTEMPTS {
        let client = Client::connect(node.addr);
        let conn = node.connection_opened(client.local_addr);
        let placed = by_core.entry(conn.core.clone()).or_default();
        if placed.len() < per_core {
            placed.push(PlacedClient { client, conn });
        } else {
            client.close();
        }
        let full = by_core.values().filter(|p| p.len() == per_core).count();
        if full == node.cores {
            return by_core.into_values().flatten().collect();
        }
    }
    let counts: BTreeMap<&String, usize> = by_core.iter().map(|(c, p)| (c, p.len())).collect();
    panic!(
        "after {MAX_ATTEMPTS} connections the node used cores {counts:?}, \
         expected {} cores with {per_core} connections each",
        node.cores
    );
}

/// Panics unless the node is running and a fresh subscriber receives a fresh publish.
pub fn assert_node_serves(node: &mut Node) {
    node.assert_running();
    let mut subscriber = Client::connect(node.addr);
    subscriber.subscribe("health.check");
    let mut publisher = Client::connect(node.addr);
    publisher.publish("health.check", "\"alive\"");
    let delivery = subscriber.recv();
    assert_eq!(delivery["type"], "message", "delivery: {delivery}");
    assert_eq!(delivery["data"], "alive", "delivery: {delivery}");
}

/// A connection opened before a test disturbs the node, to check afterwards that it still works.
pub struct Bystander {
    client: Client,
}

impl Bystander {
    pub fn new(node: &Node) -> Bystander {
        let mut client = Client::connect(node.addr);
        client.subscribe("bystander");
        Bystander { client }
    }

    /// Panics unless the bystander still receives a publish made on a new connection.
    pub fn assert_undisturbed(&mut self, node: &Node) {
        let mut publisher = Client::connect(node.addr);
        publisher.publish("bystander", "\"still here\"");
        let delivery = self.client.recv();
        assert_eq!(delivery["data"], "still here", "bystander got: {delivery}");
        self.client.ping();
    }
}

/// Returns a path in the temp dir that no other test or process uses.
pub fn unique_temp_path(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("nexus-test-{}-{n}-{name}", std::process::id()))
}

/// Path of a file in tests/interop.
pub fn interop_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
        .join(file)
}
