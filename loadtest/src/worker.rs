//! Running shards on threads of this process, and worker processes.
//!
//! With `--processes N` the coordinator re-executes this program N times
//! with `--worker-index I`. A worker talks to the coordinator in lines:
//! it prints `ready` (or `error MESSAGE`) on stdout once its clients are
//! set up, reads `go NANOS` (the shared start, `CLOCK_REALTIME`) on stdin,
//! and prints `result JSON` with its merged [`ShardReport`] at the end.

use std::io::{BufRead, Write};
use std::ops::Range;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::config::RunConfig;
use crate::procfs::process_self_cpu_ns;
use crate::report::ShardReport;
use crate::shard::{self, ShardLink};

/// Shards running on threads of this process.
pub struct LocalShards {
    threads: Vec<JoinHandle<Result<ShardReport, String>>>,
    ready: mpsc::Receiver<Result<(), String>>,
    go: Vec<oneshot::Sender<i64>>,
    cpu_at_go: u64,
}

impl LocalShards {
    /// Starts one thread per shard index in `shards`.
    pub fn start(config: &Arc<RunConfig>, shards: Range<u32>) -> Result<LocalShards, String> {
        let (ready_tx, ready) = mpsc::channel();
        let mut threads = Vec::new();
        let mut go = Vec::new();
        for index in shards {
            let (go_tx, go_rx) = oneshot::channel();
            let link = ShardLink {
                ready: ready_tx.clone(),
                go: go_rx,
            };
            let config = config.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || shard::run(config, index, link))
                .map_err(|error| format!("cannot start the thread of shard {index}: {error}"))?;
            threads.push(thread);
            go.push(go_tx);
        }
        Ok(LocalShards {
            threads,
            ready,
            go,
            cpu_at_go: 0,
        })
    }

    /// Waits until every shard finished setup; returns the first failure.
    pub fn wait_ready(&self) -> Result<(), String> {
        for _ in 0..self.threads.len() {
            match self.ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err("a shard thread ended during setup".to_string()),
            }
        }
        Ok(())
    }

    /// Starts the run at `go_ns` in every shard.
    pub fn go(&mut self, go_ns: i64) {
        self.cpu_at_go = process_self_cpu_ns();
        for sender in self.go.drain(..) {
            let _ = sender.send(go_ns);
        }
    }

    /// Waits for every shard and merges their reports.
    pub fn join(self) -> Result<ShardReport, String> {
        drop(self.go);
        let mut merged = ShardReport::default();
        let mut failure = None;
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(report)) => merged.merge(&report),
                Ok(Err(error)) => failure = failure.or(Some(error)),
                Err(_) => failure = failure.or(Some("a shard thread panicked".to_string())),
            }
        }
        if let Some(error) = failure {
            return Err(error);
        }
        merged.process_cpu_ns = process_self_cpu_ns().saturating_sub(self.cpu_at_go);
        Ok(merged)
    }
}

/// Main of a worker process: runs shards `index * threads ..` and talks to
/// the coordinator over stdin and stdout. Returns the exit code.
pub fn run_worker(config: Arc<RunConfig>, index: u32) -> i32 {
    let threads = config.common.threads;
    let first = index * threads;
    let mut stdout = std::io::stdout().lock();
    let result = (|| {
        let mut shards = LocalShards::start(&config, first..first + threads)?;
        shards.wait_ready()?;
        writeln!(stdout, "ready")
            .and_then(|()| stdout.flush())
            .map_err(|e| e.to_string())?;
        let go_ns = read_go(&mut std::io::stdin().lock())?;
        shards.go(go_ns);
        shards.join()
    })();
    let line = match result {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(json) => format!("result {json}"),
            Err(error) => format!("error cannot encode the results: {error}"),
        },
        Err(error) => format!("error {error}"),
    };
    let code = if line.starts_with("result ") { 0 } else { 1 };
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
    code
}

/// Reads the `go NANOS` line from the coordinator.
fn read_go(input: &mut impl BufRead) -> Result<i64, String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|error| format!("cannot read the start signal: {error}"))?;
    line.trim()
        .strip_prefix("go ")
        .and_then(|nanos| nanos.parse().ok())
        .ok_or_else(|| {
            format!(
                "invalid start signal {:?}, expected `go NANOS`",
                line.trim()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_line_parses() {
        assert_eq!(read_go(&mut "go 123\n".as_bytes()), Ok(123));
        assert!(read_go(&mut "".as_bytes()).is_err());
        assert!(read_go(&mut "start 1\n".as_bytes()).is_err());
    }
}
