//! Start-up failures: the node must exit with a message that names the cause and the fix.

use std::process::Command;

/// Runs the node under `prlimit` with no locked memory, which glommio needs for io_uring.
#[test]
fn no_locked_memory_names_fix() {
    let output = Command::new("prlimit")
        .args(["--memlock=0:0", env!("CARGO_BIN_EXE_nexus-node")])
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
        .output()
        .expect("prlimit runs (Debian package util-linux)");
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("io_uring runtime"), "stderr: {stderr}");
    assert!(stderr.contains("ulimit -l"), "stderr: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("node failed to start"), "stdout: {stdout}");
}

/// A listen address that is already taken by another program stops the node with exit code 1.
#[test]
fn taken_address_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_node_on(&addr);

    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "stderr: {stderr}"
    );
}

/// A second node on the port of a running one must not start: with `SO_REUSEPORT` the kernel
/// would otherwise share the port's connections between the two.
#[test]
fn second_node_on_same_port_fails() {
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_nexus-node"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = KillOnDrop(first);
    let mut line = String::new();
    let stdout = first.0.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let log: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = log["listen"]
        .as_str()
        .expect("node started names its address")
        .to_owned();

    let (code, stderr) = run_node_on(&addr);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert!(stderr.contains("another node"), "stderr: {stderr}");
}

/// Runs a one-core node on `addr` until it exits and returns its exit code and standard error.
fn run_node_on(addr: &str) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_nexus-node"))
        .args(["--listen", addr, "--cores", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

/// Kills the child process when the test ends, whatever its outcome.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two nodes started at the same moment on one free port: exactly one may run. Each passes the
/// check that no socket listens on the port before the other has bound it, so only a lock taken
/// between that check and the bind keeps them from sharing the port through `SO_REUSEPORT`.
#[test]
fn simultaneous_nodes_on_one_port_one_runs() {
    for attempt in 0..5 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .unwrap()
            .to_string();
        let start = || {
            Command::new(env!("CARGO_BIN_EXE_nexus-node"))
                .args(["--listen", &addr, "--cores", "1", "--log-level", "warn"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut first = KillOnDrop(start());
        let mut second = KillOnDrop(start());

        // The loser exits at once; give it time, then count the nodes still running.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let mut running = 0;
        for node in [&mut first, &mut second] {
            if node.0.try_wait().unwrap().is_none() {
                running += 1;
            }
        }
        assert_eq!(
            running, 1,
            "attempt {attempt}: {running} nodes run on {addr}"
        );
    }
}
