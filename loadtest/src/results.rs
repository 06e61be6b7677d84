//! Final results of a run: the JSON line and the human summary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cli::protocol_name;
use crate::config::{RunConfig, Scenario};
use crate::coordinator::NodeSamples;
use crate::procfs::Memory;
use crate::report::{Hist, ShardReport, BUCKET_NS};

/// Threshold of a generator thread's CPU use, as a fraction of one core,
/// above which the results may describe the generator rather than the node.
const SATURATION: f64 = 0.9;

/// Summary of a latency histogram, in microseconds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub max: u64,
}

impl Summary {
    fn of(hist: &Hist) -> Option<Summary> {
        let h = &hist.0;
        (!h.is_empty()).then(|| Summary {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// The options that shaped the run, echoed in the results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigEcho {
    pub subscribers: u32,
    pub publishers: u32,
    pub rate: Option<f64>,
    pub in_flight: Option<u64>,
    pub size: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub messages: Option<u64>,
    pub processes: u32,
    pub threads: u32,
    pub storm_after_s: Option<f64>,
}

/// One measured node process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PidReport {
    pub pid: u32,
    /// CPU seconds (user plus system) in the measured window.
    pub cpu_s: Option<f64>,
    pub memory_before: Option<Memory>,
    /// Memory when the measured window started.
    pub memory_measured: Option<Memory>,
    /// Growth of `VmRSS` per connection of the run, in bytes (connections
    /// scenario only).
    pub rss_bytes_per_connection: Option<f64>,
    /// Growth of `Pss` (smaps_rollup) per connection of the run, in bytes
    /// (connections scenario only).
    pub pss_bytes_per_connection: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeReport {
    pub pids: Vec<PidReport>,
    /// CPU seconds of all `--pid` processes in the measured window.
    pub cpu_s: Option<f64>,
    /// Average cores used: `cpu_s` divided by the window.
    pub cores: Option<f64>,
    pub deliveries_per_cpu_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GeneratorReport {
    pub processes: u32,
    pub threads: u32,
    /// CPU seconds of the shard threads in the measured window.
    pub cpu_s: f64,
    /// CPU seconds of the generator processes from start to end (getrusage).
    pub process_cpu_s: f64,
    /// Highest CPU use of one shard thread in the window, in cores.
    pub max_thread_utilization: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionsReport {
    pub target: u32,
    pub connected: u64,
    pub attempts: u64,
    pub failures: u64,
    /// Seconds from the first connection attempt to the last confirmed
    /// subscription.
    pub connect_s: Option<f64>,
    pub connect_rate_per_s: Option<f64>,
    pub handshake_us: Option<Summary>,
    pub subscribed_us: Option<Summary>,
    /// Sum over `--pid` processes of the `VmRSS` growth per connection.
    pub rss_bytes_per_connection: Option<f64>,
    /// CPU seconds of the generator's shard threads during setup.
    pub generator_cpu_s: f64,
    /// CPU seconds of the `--pid` processes during setup, from the start of
    /// the generator's workers until all clients were ready.
    pub node_cpu_s: Option<f64>,
    /// Connections set up per CPU second of the `--pid` processes.
    pub connections_per_node_cpu_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StormReport {
    pub clients: u64,
    pub dropped: u64,
    pub reconnected: u64,
    /// Clients that had no connection when the run ended.
    pub not_reconnected: u64,
    /// Seconds from the first drop to the last confirmed resubscription.
    pub all_back_s: Option<f64>,
    pub attempts: u64,
    pub failures: u64,
    pub reconnect_us: Option<Summary>,
}

/// The results of one run: the `--json` line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub label: String,
    pub protocol: String,
    pub run_id: String,
    pub urls: Vec<String>,
    /// Start of the run, nanoseconds since the Unix epoch.
    pub started_at_ns: i64,
    pub config: ConfigEcho,
    /// Length of the measured window in seconds.
    pub window_s: f64,
    pub published: u64,
    pub publishes_per_s: f64,
    /// Stamped messages received, whole run, duplicates included.
    pub delivered: u64,
    /// Deliveries received per second in the measured window.
    pub deliveries_per_s: f64,
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    pub unparsed: u64,
    pub publish_errors: u64,
    pub disconnects: u64,
    pub window_give_ups: u64,
    pub errors: BTreeMap<String, u64>,
    /// Latency of messages sent after the warmup, end to end.
    pub latency_us: Option<Summary>,
    /// `[percentile, microseconds]` pairs for plots.
    pub percentiles: Vec<(f64, u64)>,
    pub node: NodeReport,
    pub generator: GeneratorReport,
    pub generator_saturated: bool,
    /// Setup of the run's connections (every scenario).
    pub connections: ConnectionsReport,
    pub storm: Option<StormReport>,
}

/// A time window in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug)]
struct Window {
    start_ns: i64,
    end_ns: i64,
}

impl Window {
    fn secs(&self) -> f64 {
        (self.end_ns - self.start_ns).max(0) as f64 / 1e9
    }

    /// Sums the buckets that lie inside the window.
    fn sum(&self, buckets: &[u64], go_ns: i64) -> u64 {
        let first = ((self.start_ns - go_ns) / BUCKET_NS).max(0) as usize;
        let last = ((self.end_ns - go_ns) / BUCKET_NS).max(0) as usize;
        buckets.iter().take(last).skip(first).sum()
    }
}

/// Computes the final results from the merged shard reports.
pub fn build(
    config: &RunConfig,
    merged: &ShardReport,
    samples: &NodeSamples,
    go_ns: i64,
) -> Report {
    let window = measured_window(config, merged, go_ns);
    let secs = window.secs();
    let rate = |count: u64| if secs > 0.0 { count as f64 / secs } else { 0.0 };
    let delivered_in_window = window.sum(&merged.delivery_buckets, go_ns);
    let counts = &merged.counts;
    let unique = counts.received.saturating_sub(counts.duplicated);
    let node = node_report(config, merged, samples, window);
    let generator = generator_report(config, merged, window);
    Report {
        scenario: config.scenario.name().to_string(),
        label: config.label.clone(),
        protocol: protocol_name(config.common.protocol).to_string(),
        run_id: config.run_id.clone(),
        urls: config.urls.iter().map(|url| url.text.clone()).collect(),
        started_at_ns: go_ns,
        config: echo(config),
        window_s: secs,
        published: counts.published,
        publishes_per_s: rate(window.sum(&merged.publish_buckets, go_ns)),
        delivered: counts.received,
        deliveries_per_s: rate(delivered_in_window),
        expected: counts.expected,
        lost: counts.expected.saturating_sub(unique),
        duplicated: counts.duplicated,
        out_of_order: counts.out_of_order,
        unexpected: counts.unexpected,
        unparsed: counts.unparsed,
        publish_errors: counts.publish_errors,
        disconnects: counts.disconnects,
        window_give_ups: counts.window_give_ups,
        errors: merged.errors.clone(),
        latency_us: Summary::of(&merged.latency_us),
        percentiles: percentiles(&merged.latency_us),
        node: NodeReport {
            deliveries_per_cpu_s: node_per_cpu(&node, delivered_in_window),
            cores: node
                .iter()
                .filter_map(|pid| pid.cpu_s)
                .reduce(|a, b| a + b)
                .map(|cpu| cpu / secs.max(1e-9)),
            cpu_s: node.iter().filter_map(|pid| pid.cpu_s).reduce(|a, b| a + b),
            pids: node,
        },
        generator_saturated: generator.max_thread_utilization > SATURATION,
        generator,
        connections: connections_report(config, merged, samples),
        storm: (config.scenario == Scenario::Storm).then(|| storm_report(merged)),
    }
}

/// Returns the window the rates and CPU times refer to.
fn measured_window(config: &RunConfig, merged: &ShardReport, go_ns: i64) -> Window {
    let warmup_end = go_ns + config.warmup.as_nanos() as i64;
    let planned_end = warmup_end + config.duration.as_nanos() as i64;
    match config.scenario {
        Scenario::Connections => Window {
            start_ns: warmup_end,
            end_ns: planned_end,
        },
        Scenario::Storm => {
            let storm = &merged.storm;
            let start_ns = storm.first_drop_ns.unwrap_or(go_ns);
            let end_ns = storm
                .last_back_ns
                .unwrap_or(go_ns + config.duration.as_nanos() as i64);
            Window {
                start_ns,
                end_ns: end_ns.max(start_ns),
            }
        }
        _ => {
            // End at the bucket of the last publish when the message cap
            // stopped the publishers early.
            let last_bucket_end = merged.last_publish_ns.map_or(warmup_end, |last| {
                go_ns + ((last - go_ns) / BUCKET_NS + 1) * BUCKET_NS
            });
            Window {
                start_ns: warmup_end,
                end_ns: planned_end.min(last_bucket_end).max(warmup_end),
            }
        }
    }
}

fn echo(config: &RunConfig) -> ConfigEcho {
    ConfigEcho {
        subscribers: config.placement.subscribers,
        publishers: config.placement.publishers,
        rate: config.rate,
        in_flight: config.in_flight,
        size: config.common.size,
        duration_s: config.duration.as_secs_f64(),
        warmup_s: config.warmup.as_secs_f64(),
        drain_s: config.drain.as_secs_f64(),
        messages: config.common.messages,
        processes: config.common.processes,
        threads: config.common.threads,
        storm_after_s: config.storm_after.map(|after| after.as_secs_f64()),
    }
}

/// Returns the latency at percentiles spaced evenly on a log scale of
/// `1 / (1 - p)`: 0, 20.6, 36.9, ... 90, ... 99, ... 99.999, then 100.
fn percentiles(hist: &Hist) -> Vec<(f64, u64)> {
    if hist.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, u64)> = (0..=50)
        .map(|step| {
            let quantile = 1.0 - 10f64.powf(-f64::from(step) / 10.0);
            let percentile = (quantile * 100.0 * 10_000.0).round() / 10_000.0;
            (percentile, hist.0.value_at_quantile(quantile))
        })
        .collect();
    points.push((100.0, hist.0.max()));
    points
}

fn node_report(
    config: &RunConfig,
    merged: &ShardReport,
    samples: &NodeSamples,
    window: Window,
) -> Vec<PidReport> {
    let connections = merged.connect.connected.max(1) as f64;
    config
        .common
        .pids
        .iter()
        .map(|&pid| {
            let find = |list: &[(u32, Option<Memory>)]| {
                list.iter()
                    .find(|(id, _)| *id == pid)
                    .and_then(|(_, memory)| memory.clone())
            };
            let before = find(&samples.memory_before);
            let measured = find(&samples.memory_measured);
            // Memory per connection means something only when the
            // connections are all the run adds to the node.
            let idle = config.scenario == Scenario::Connections;
            let growth = |field: fn(&Memory) -> Option<u64>| {
                if !idle {
                    return None;
                }
                let (before, after) = (field(before.as_ref()?)?, field(measured.as_ref()?)?);
                Some((after as f64 - before as f64) * 1024.0 / connections)
            };
            let cpu = samples.cpu.iter().find(|(id, _)| *id == pid);
            PidReport {
                pid,
                cpu_s: cpu
                    .and_then(|(_, series)| series.spent(window.start_ns, window.end_ns))
                    .map(|ns| ns / 1e9),
                rss_bytes_per_connection: growth(|memory| Some(memory.rss_kib)),
                pss_bytes_per_connection: growth(|memory| memory.pss_kib),
                memory_before: before,
                memory_measured: measured,
            }
        })
        .collect()
}

fn node_per_cpu(pids: &[PidReport], deliveries: u64) -> Option<f64> {
    let cpu: f64 = pids.iter().filter_map(|pid| pid.cpu_s).sum();
    (cpu > 0.0).then(|| deliveries as f64 / cpu)
}

fn generator_report(config: &RunConfig, merged: &ShardReport, window: Window) -> GeneratorReport {
    let secs = window.secs();
    let spent: Vec<f64> = merged
        .thread_cpu
        .iter()
        .filter_map(|series| series.spent(window.start_ns, window.end_ns))
        .map(|ns| ns / 1e9)
        .collect();
    let max_spent = spent.iter().copied().fold(0.0, f64::max);
    GeneratorReport {
        processes: config.common.processes,
        threads: config.common.threads,
        cpu_s: spent.iter().sum(),
        process_cpu_s: merged.process_cpu_ns as f64 / 1e9,
        max_thread_utilization: if secs > 0.0 { max_spent / secs } else { 0.0 },
    }
}

fn connections_report(
    config: &RunConfig,
    merged: &ShardReport,
    samples: &NodeSamples,
) -> ConnectionsReport {
    let connect = &merged.connect;
    let connect_s = match (connect.first_start_ns, connect.last_ready_ns) {
        (Some(first), Some(last)) => Some((last - first).max(0) as f64 / 1e9),
        _ => None,
    };
    let per_pid = node_report(
        config,
        merged,
        samples,
        Window {
            start_ns: 0,
            end_ns: 0,
        },
    );
    let rss = per_pid
        .iter()
        .filter_map(|pid| pid.rss_bytes_per_connection)
        .reduce(|a, b| a + b);
    let node_cpu_s = samples
        .setup_cpu
        .iter()
        .map(|(_, spent)| *spent)
        .reduce(|a, b| Some(a? + b?))
        .flatten()
        .map(|spent| spent as f64 / 1e9);
    ConnectionsReport {
        target: config.placement.subscribers,
        connected: connect.connected,
        attempts: connect.attempts,
        failures: connect.failures,
        connect_rate_per_s: connect_s
            .filter(|secs| *secs > 0.0)
            .map(|secs| connect.connected as f64 / secs),
        connect_s,
        handshake_us: Summary::of(&connect.handshake_us),
        subscribed_us: Summary::of(&connect.subscribed_us),
        rss_bytes_per_connection: rss,
        generator_cpu_s: connect.setup_cpu_ns as f64 / 1e9,
        node_cpu_s,
        connections_per_node_cpu_s: node_cpu_s
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| connect.connected as f64 / cpu),
    }
}

fn storm_report(merged: &ShardReport) -> StormReport {
    let storm = &merged.storm;
    let all_back_s = match (storm.first_drop_ns, storm.last_back_ns) {
        (Some(first), Some(last)) if storm.reconnected >= storm.dropped => {
            Some((last - first).max(0) as f64 / 1e9)
        }
        _ => None,
    };
    StormReport {
        clients: storm.clients,
        dropped: storm.dropped,
        reconnected: storm.reconnected,
        not_reconnected: storm.dropped.saturating_sub(storm.reconnected),
        all_back_s,
        attempts: storm.attempts,
        failures: storm.failures,
        reconnect_us: Summary::of(&storm.reconnect_us),
    }
}
