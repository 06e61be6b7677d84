//! The coordinator: starts the shards (on threads or in worker processes),
//! starts them together, samples the node processes and merges the results.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{RunConfig, Scenario};
use crate::procfs::{memory, now_ns, process_cpu_ns, Memory};
use crate::report::{CpuSeries, ShardReport};
use crate::results::{self, Report};
use crate::worker::LocalShards;

/// Time between the end of setup and the shared start, so that every
/// worker has the start signal before it is due.
const GO_DELAY: Duration = Duration::from_millis(200);

/// Interval of the node samples and progress updates.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Runs are shown with a progress bar from this length on.
const PROGRESS_MIN: Duration = Duration::from_secs(3);

/// Memory of each `--pid`; `None` when it could not be read.
pub type MemoryByPid = Vec<(u32, Option<Memory>)>;

/// CPU time samples of each `--pid`.
pub type CpuByPid = Vec<(u32, CpuSeries)>;

/// Samples of the node processes taken by the coordinator.
pub struct NodeSamples {
    /// Memory before setup.
    pub memory_before: MemoryByPid,
    /// Memory when the measured window started.
    pub memory_measured: MemoryByPid,
    /// CPU time from the start to the end of the run.
    pub cpu: CpuByPid,
    /// CPU nanoseconds of each `--pid` during setup, while the clients
    /// connected; `None` when it could not be read.
    pub setup_cpu: Vec<(u32, Option<u64>)>,
}

/// Runs the load described by `config` and returns its results.
pub fn run(config: Arc<RunConfig>) -> Result<Report, String> {
    let pids = config.common.pids.clone();
    let memory_before: Vec<_> = pids.iter().map(|&pid| (pid, memory(pid))).collect();
    for (pid, found) in &memory_before {
        if found.is_none() {
            return Err(format!("no process with --pid {pid}"));
        }
    }

    eprintln!(
        "{}: setting up {} clients on {} shard(s)",
        config.label,
        config.placement.subscribers + config.placement.publishers,
        config.placement.shards
    );
    let cpu_before: Vec<_> = pids.iter().map(|&pid| process_cpu_ns(pid)).collect();
    let mut workers = Workers::start(&config)?;
    if let Err(error) = workers.wait_ready() {
        workers.abort();
        return Err(error);
    }
    let setup_cpu = pids
        .iter()
        .zip(cpu_before)
        .map(|(&pid, before)| {
            let spent = process_cpu_ns(pid).zip(before);
            (
                pid,
                spent.map(|(after, before)| after.saturating_sub(before)),
            )
        })
        .collect();

    let go_ns = now_ns() + GO_DELAY.as_nanos() as i64;
    let sampler = Sampler::start(&config, go_ns);
    if let Err(error) = workers.go(go_ns) {
        workers.abort();
        return Err(error);
    }
    let merged = workers.join();
    let (memory_measured, cpu) = sampler.stop();
    let samples = NodeSamples {
        memory_before,
        memory_measured,
        cpu,
        setup_cpu,
    };
    Ok(results::build(&config, &merged?, &samples, go_ns))
}

/// The shards of the run: threads of this process, or worker processes.
enum Workers {
    Local(LocalShards),
    Processes(Vec<WorkerProcess>, mpsc::Receiver<(usize, String)>),
}

struct WorkerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Workers {
    fn start(config: &Arc<RunConfig>) -> Result<Workers, String> {
        let processes = config.common.processes;
        if processes == 1 {
            let shards = 0..config.common.threads;
            return LocalShards::start(config, shards).map(Workers::Local);
        }
        let (lines_tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        for index in 0..processes {
            match spawn_worker(config, index, lines_tx.clone()) {
                Ok(child) => children.push(child),
                Err(error) => {
                    Workers::Processes(children, lines).abort();
                    return Err(error);
                }
            }
        }
        Ok(Workers::Processes(children, lines))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        match self {
            Workers::Local(shards) => shards.wait_ready(),
            Workers::Processes(children, lines) => {
                for _ in 0..children.len() {
                    let (index, line) = lines
                        .recv()
                        .map_err(|_| "worker processes ended during setup".to_string())?;
                    if line != "ready" {
                        return Err(worker_failure(index, &line));
                    }
                }
                Ok(())
            }
        }
    }

    fn go(&mut self, go_ns: i64) -> Result<(), String> {
        match self {
            Workers::Local(shards) => {
                shards.go(go_ns);
                Ok(())
            }
            Workers::Processes(children, _) => {
                for (index, child) in children.iter_mut().enumerate() {
                    let stdin = child.stdin.as_mut().ok_or("worker stdin is closed")?;
                    writeln!(stdin, "go {go_ns}")
                        .and_then(|()| stdin.flush())
                        .map_err(|error| format!("cannot start worker {index}: {error}"))?;
                }
                Ok(())
            }
        }
    }

    fn join(self) -> Result<ShardReport, String> {
        match self {
            Workers::Local(shards) => shards.join(),
            Workers::Processes(mut children, lines) => {
                let mut merged = ShardReport::default();
                for _ in 0..children.len() {
                    let (index, line) = lines
                        .recv()
                        .map_err(|_| "worker processes ended without results".to_string())?;
                    let Some(json) = line.strip_prefix("result ") else {
                        Workers::Processes(children, lines).abort();
                        return Err(worker_failure(index, &line));
                    };
                    let report: ShardReport = serde_json::from_str(json)
                        .map_err(|error| format!("invalid results from worker {index}: {error}"))?;
                    merged.merge(&report);
                }
                for child in &mut children {
                    let _ = child.child.wait();
                }
                Ok(merged)
            }
        }
    }

    /// Stops the worker processes this coordinator started, by their pid.
    fn abort(self) {
        if let Workers::Processes(children, _) = self {
            for mut child in children {
                let _ = child.child.kill();
                let _ = child.child.wait();
            }
        }
    }
}

fn worker_failure(index: usize, line: &str) -> String {
    match line.strip_prefix("error ") {
        Some(error) => format!("worker {index}: {error}"),
        None => format!("worker {index} failed ({line})"),
    }
}

/// Starts worker process `index` and forwards its stdout lines to `lines`.
fn spawn_worker(
    config: &RunConfig,
    index: u32,
    lines: mpsc::Sender<(usize, String)>,
) -> Result<WorkerProcess, String> {
    let program = std::env::current_exe()
        .map_err(|error| format!("cannot find this program to start workers: {error}"))?;
    let mut child = Command::new(program)
        .args(std::env::args_os().skip(1))
        .args([
            "--worker-index",
            &index.to_string(),
            "--run-id",
            &config.run_id,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|error| format!("cannot start worker process {index}: {error}"))?;
    let stdout = child.stdout.take().ok_or("worker stdout is missing")?;
    std::thread::spawn(move || {
        let mut finished = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            finished = line.starts_with("result ") || line.starts_with("error ");
            if lines.send((index as usize, line)).is_err() {
                return;
            }
        }
        if !finished {
            let _ = lines.send((index as usize, "ended without a result".to_string()));
        }
    });
    Ok(WorkerProcess {
        stdin: child.stdin.take(),
        child,
    })
}

/// Background thread that samples the node processes and draws progress.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(MemoryByPid, CpuByPid)>,
}

impl Sampler {
    fn start(config: &RunConfig, go_ns: i64) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let pids = config.common.pids.clone();
        let measure_ns = go_ns + config.warmup.as_nanos() as i64;
        let drain_ns = go_ns + config.publish_time().as_nanos() as i64;
        let total = match config.scenario {
            Scenario::Storm => config.duration,
            Scenario::Connections => config.publish_time(),
            _ => config.publish_time() + config.drain,
        };
        let progress = progress_bar(total);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut cpu: CpuByPid = pids
                .iter()
                .map(|&pid| (pid, CpuSeries::default()))
                .collect();
            let mut measured = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let now = now_ns();
                for (pid, series) in &mut cpu {
                    if let Some(spent) = process_cpu_ns(*pid) {
                        series.samples.push((now, spent));
                    }
                }
                if measured.is_empty() && now >= measure_ns {
                    measured = pids.iter().map(|&pid| (pid, memory(pid))).collect();
                }
                if let Some(bar) = &progress {
                    bar.set_position(((now - go_ns).max(0) / 1_000_000) as u64);
                    bar.set_message(phase_name(now, go_ns, measure_ns, drain_ns));
                }
                std::thread::sleep(SAMPLE_INTERVAL);
            }
            if let Some(bar) = progress {
                bar.finish_and_clear();
            }
            (measured, cpu)
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> (MemoryByPid, CpuByPid) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn phase_name(now: i64, go_ns: i64, measure_ns: i64, drain_ns: i64) -> &'static str {
    if now < go_ns {
        "starting"
    } else if now < measure_ns {
        "warmup"
    } else if now < drain_ns {
        "running"
    } else {
        "draining"
    }
}

/// Returns a progress bar on stderr for runs of 3 s or more; it draws only
/// when stderr is a terminal.
fn progress_bar(total: Duration) -> Option<ProgressBar> {
    if total < PROGRESS_MIN {
        return None;
    }
    let bar = ProgressBar::new(total.as_millis() as u64);
    let style = ProgressStyle::with_template("{msg:>8} [{bar:40}] {elapsed}/{prefix}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{}s", total.as_secs()));
    Some(bar)
}
