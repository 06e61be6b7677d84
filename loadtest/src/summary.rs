//! Human-readable summary of a run, written to stderr.

use std::fmt::Write;

use crate::results::{Report, Summary};

/// Formats the summary of `report` as lines of text.
pub fn format(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (run {}), window {:.1} s",
        report.label, report.run_id, report.window_s
    );
    match report.scenario.as_str() {
        "connections" => write_connections(&mut out, report),
        "storm" => write_storm(&mut out, report),
        _ => write_messages(&mut out, report),
    }
    write_node(&mut out, report);
    write_generator(&mut out, report);
    if !report.errors.is_empty() {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(code, count)| format!("{code}={count}"))
            .collect();
        let _ = writeln!(out, "  errors: {}", errors.join(" "));
    }
    out
}

fn write_messages(out: &mut String, report: &Report) {
    let _ = writeln!(
        out,
        "  published {} ({:.0}/s), delivered {} ({:.0}/s in the window)",
        report.published, report.publishes_per_s, report.delivered, report.deliveries_per_s
    );
    let _ = writeln!(
        out,
        "  lost {} of {} expected, duplicated {}, out of order {}, publish errors {}, disconnects {}",
        report.lost,
        report.expected,
        report.duplicated,
        report.out_of_order,
        report.publish_errors,
        report.disconnects
    );
    if report.unexpected + report.unparsed + report.window_give_ups > 0 {
        let _ = writeln!(
            out,
            "  unexpected {}, unparsed {}, in-flight windows given up {}",
            report.unexpected, report.unparsed, report.window_give_ups
        );
    }
    write_latency(out, "latency", report.latency_us.as_ref());
    if report.window_s == 0.0 {
        let _ = writeln!(
            out,
            "  WARNING: publishing ended before the warmup did, so nothing was measured; \
             lower --warmup or raise --messages"
        );
    }
}

fn write_connections(out: &mut String, report: &Report) {
    let connections = &report.connections;
    let _ = writeln!(
        out,
        "  connected {} of {} in {} ({} conn/s), {} failed attempts",
        connections.connected,
        connections.target,
        optional(connections.connect_s, "s", 2),
        optional(connections.connect_rate_per_s, "", 0),
        connections.failures
    );
    let _ = writeln!(
        out,
        "  setup CPU: generator {:.2}s, node {} ({} conn per node CPU-second)",
        connections.generator_cpu_s,
        optional(connections.node_cpu_s, "s", 2),
        optional(connections.connections_per_node_cpu_s, "", 0)
    );
    write_latency(out, "handshake", connections.handshake_us.as_ref());
    write_latency(out, "subscribed", connections.subscribed_us.as_ref());
    if let Some(bytes) = connections.rss_bytes_per_connection {
        let _ = writeln!(
            out,
            "  node memory per connection: {bytes:.0} bytes (VmRSS growth)"
        );
    }
}

fn write_storm(out: &mut String, report: &Report) {
    let Some(storm) = &report.storm else {
        return;
    };
    let _ = writeln!(
        out,
        "  {} clients, {} drops, {} reconnected, {} not back; all back after {}",
        storm.clients,
        storm.dropped,
        storm.reconnected,
        storm.not_reconnected,
        optional(storm.all_back_s, "s", 3)
    );
    let _ = writeln!(
        out,
        "  reconnect attempts {}, failed {}",
        storm.attempts, storm.failures
    );
    write_latency(out, "reconnect", storm.reconnect_us.as_ref());
}

fn write_latency(out: &mut String, name: &str, summary: Option<&Summary>) {
    let Some(summary) = summary else {
        let _ = writeln!(out, "  {name}: no samples");
        return;
    };
    let _ = writeln!(
        out,
        "  {name} us: p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
        summary.p50, summary.p90, summary.p99, summary.p99_9, summary.max, summary.count
    );
}

fn write_node(out: &mut String, report: &Report) {
    for pid in &report.node.pids {
        let _ = writeln!(
            out,
            "  node pid {}: cpu {} in the window",
            pid.pid,
            optional(pid.cpu_s, "s", 2)
        );
    }
    let Some(cores) = report.node.cores else {
        return;
    };
    match report
        .node
        .deliveries_per_cpu_s
        .filter(|per_cpu| *per_cpu > 0.0)
    {
        Some(per_cpu) => {
            let _ = writeln!(
                out,
                "  node: {cores:.2} cores, {per_cpu:.0} deliveries per CPU-second"
            );
        }
        None => {
            let _ = writeln!(out, "  node: {cores:.2} cores");
        }
    }
}

fn write_generator(out: &mut String, report: &Report) {
    let generator = &report.generator;
    let _ = writeln!(
        out,
        "  generator: {:.2} CPU-s in the window, busiest thread {:.0}% of a core",
        generator.cpu_s,
        generator.max_thread_utilization * 100.0
    );
    if report.generator_saturated {
        let _ = writeln!(
            out,
            "  WARNING: a generator thread was above 90% of a core; add --threads or --processes, \
             or the numbers may describe the generator rather than the node"
        );
    }
}

fn optional(value: Option<f64>, unit: &str, decimals: usize) -> String {
    match value {
        Some(value) => format!("{value:.decimals$}{unit}"),
        None => "n/a".to_string(),
    }
}
