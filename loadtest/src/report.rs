//! Raw results of one shard, and how results of several shards merge.
//!
//! A shard report keeps everything needed to compute the final numbers of
//! any time window later: full latency histograms, publish and delivery
//! counts per 100 ms bucket and CPU time samples. Worker processes print
//! their report as JSON, so merging across processes is exact.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::de::Deserializer;
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// Width of one publish or delivery bucket in nanoseconds.
pub const BUCKET_NS: i64 = 100_000_000;

/// Highest value a histogram records: one hour in microseconds.
const HIST_MAX_US: u64 = 3_600_000_000;

/// An HDR histogram of microseconds (3 significant digits, 1 us to 1 h)
/// that serializes as `[[value, count], ...]`.
#[derive(Clone, Debug)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Hist {
        Hist(Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds"))
    }
}

impl Hist {
    /// Records one value in microseconds; values outside 1 us..1 h are
    /// clamped to the range.
    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.max(1));
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Hist) {
        // Every `Hist` is built by `Default` (also when deserialized), so
        // both have the same bounds and adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialEq for Hist {
    fn eq(&self, other: &Hist) -> bool {
        self.0 == other.0
    }
}

impl Serialize for Hist {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for bucket in self.0.iter_recorded() {
            seq.serialize_element(&[bucket.value_iterated_to(), bucket.count_at_value()])?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Hist {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Hist, D::Error> {
        let buckets: Vec<[u64; 2]> = Vec::deserialize(deserializer)?;
        let mut hist = Hist::default();
        for [value, count] in buckets {
            hist.0
                .record_n(value, count)
                .map_err(serde::de::Error::custom)?;
        }
        Ok(hist)
    }
}

/// Message counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Messages published (sent by the publishers).
    pub published: u64,
    /// Deliveries the published messages should cause: each message times
    /// the number of subscribers of its topic.
    pub expected: u64,
    /// Stamped messages received by subscribers, duplicates included.
    pub received: u64,
    pub duplicated: u64,
    /// Messages that arrived after a later message of the same publisher on
    /// the same topic.
    pub out_of_order: u64,
    /// Stamped messages from a publisher the subscriber should not hear.
    pub unexpected: u64,
    /// Text messages that carry no stamp and are no known control message.
    pub unparsed: u64,
    /// Publishes the broker rejected (error frames or HTTP errors).
    pub publish_errors: u64,
    /// Connections that the broker or the network closed during the run.
    pub disconnects: u64,
    /// Times a publisher stopped waiting for receipts that did not come
    /// within the drain time and emptied its in-flight window.
    pub window_give_ups: u64,
}

impl Counts {
    fn merge(&mut self, other: &Counts) {
        self.published += other.published;
        self.expected += other.expected;
        self.received += other.received;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.unexpected += other.unexpected;
        self.unparsed += other.unparsed;
        self.publish_errors += other.publish_errors;
        self.disconnects += other.disconnects;
        self.window_give_ups += other.window_give_ups;
    }
}

/// Connection setup statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectStats {
    /// Connection attempts, retries included.
    pub attempts: u64,
    pub failures: u64,
    /// Connections that completed the handshake and the subscription.
    pub connected: u64,
    pub first_start_ns: Option<i64>,
    pub last_ready_ns: Option<i64>,
    /// Microseconds from the start of the TCP connect to the `101` response.
    pub handshake_us: Hist,
    /// Microseconds from the start of the TCP connect to the subscription's
    /// confirmation.
    pub subscribed_us: Hist,
    /// CPU time of the shard threads during setup, in nanoseconds.
    pub setup_cpu_ns: u64,
}

impl ConnectStats {
    fn merge(&mut self, other: &ConnectStats) {
        self.attempts += other.attempts;
        self.failures += other.failures;
        self.connected += other.connected;
        self.first_start_ns = min_option(self.first_start_ns, other.first_start_ns);
        self.last_ready_ns = self.last_ready_ns.max(other.last_ready_ns);
        self.handshake_us.merge(&other.handshake_us);
        self.subscribed_us.merge(&other.subscribed_us);
        self.setup_cpu_ns += other.setup_cpu_ns;
    }
}

/// Reconnect storm statistics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StormStats {
    pub clients: u64,
    /// Clients whose connection dropped or was dropped for the storm.
    pub dropped: u64,
    /// Dropped clients that connected and subscribed again.
    pub reconnected: u64,
    pub first_drop_ns: Option<i64>,
    pub last_back_ns: Option<i64>,
    /// Reconnect attempts, retries included.
    pub attempts: u64,
    pub failures: u64,
    /// Microseconds from a client's drop to its new subscription's
    /// confirmation.
    pub reconnect_us: Hist,
}

impl StormStats {
    fn merge(&mut self, other: &StormStats) {
        self.clients += other.clients;
        self.dropped += other.dropped;
        self.reconnected += other.reconnected;
        self.first_drop_ns = min_option(self.first_drop_ns, other.first_drop_ns);
        self.last_back_ns = self.last_back_ns.max(other.last_back_ns);
        self.attempts += other.attempts;
        self.failures += other.failures;
        self.reconnect_us.merge(&other.reconnect_us);
    }
}

/// Samples of a cumulative CPU time: `(realtime ns, cpu ns)` pairs in time
/// order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuSeries {
    pub samples: Vec<(i64, u64)>,
}

impl CpuSeries {
    /// Returns the CPU time at `at_ns`, interpolated between samples and
    /// clamped to the first and last one.
    pub fn value_at(&self, at_ns: i64) -> Option<f64> {
        let first = self.samples.first()?;
        let after = self.samples.partition_point(|&(time, _)| time <= at_ns);
        if after == 0 {
            return Some(first.1 as f64);
        }
        let (t0, v0) = self.samples[after - 1];
        let Some(&(t1, v1)) = self.samples.get(after) else {
            return Some(v0 as f64);
        };
        let fraction = (at_ns - t0) as f64 / (t1 - t0).max(1) as f64;
        Some(v0 as f64 + fraction * (v1 as f64 - v0 as f64))
    }

    /// Returns the CPU nanoseconds spent between `from_ns` and `to_ns`.
    pub fn spent(&self, from_ns: i64, to_ns: i64) -> Option<f64> {
        Some(self.value_at(to_ns)? - self.value_at(from_ns)?)
    }
}

/// Measurements of one shard, or of several merged shards.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardReport {
    /// Number of shards merged into this report.
    pub shards: u32,
    pub counts: Counts,
    /// Error counts by code: broker error codes, `http_STATUS`, close codes
    /// and connect failures.
    pub errors: BTreeMap<String, u64>,
    /// End-to-end latency of messages sent after the warmup.
    pub latency_us: Hist,
    /// Publishes per 100 ms bucket since the start of the run.
    pub publish_buckets: Vec<u64>,
    /// Deliveries per 100 ms bucket since the start of the run.
    pub delivery_buckets: Vec<u64>,
    pub last_publish_ns: Option<i64>,
    pub connect: ConnectStats,
    pub storm: StormStats,
    /// CPU time of each shard's thread.
    pub thread_cpu: Vec<CpuSeries>,
    /// CPU time of the worker processes over the run (`getrusage`).
    pub process_cpu_ns: u64,
}

impl ShardReport {
    /// Adds `other`'s results to these.
    pub fn merge(&mut self, other: &ShardReport) {
        self.shards += other.shards;
        self.counts.merge(&other.counts);
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += count;
        }
        self.latency_us.merge(&other.latency_us);
        add_buckets(&mut self.publish_buckets, &other.publish_buckets);
        add_buckets(&mut self.delivery_buckets, &other.delivery_buckets);
        self.last_publish_ns = self.last_publish_ns.max(other.last_publish_ns);
        self.connect.merge(&other.connect);
        self.storm.merge(&other.storm);
        self.thread_cpu.extend(other.thread_cpu.iter().cloned());
        self.process_cpu_ns += other.process_cpu_ns;
    }

    /// Counts one more occurrence of `code`.
    pub fn count_error(&mut self, code: &str) {
        *self.errors.entry(code.to_string()).or_default() += 1;
    }
}

/// Adds `count` to bucket `index`, growing the list as needed.
pub fn add_to_bucket(buckets: &mut Vec<u64>, index: usize, count: u64) {
    if buckets.len() <= index {
        buckets.resize(index + 1, 0);
    }
    buckets[index] += count;
}

fn add_buckets(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (sum, count) in into.iter_mut().zip(from) {
        *sum += count;
    }
}

fn min_option(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(latencies: &[u64], deliveries: &[u64]) -> ShardReport {
        let mut report = ShardReport {
            shards: 1,
            delivery_buckets: deliveries.to_vec(),
            ..ShardReport::default()
        };
        for &micros in latencies {
            report.latency_us.record(micros);
        }
        report.counts.received = latencies.len() as u64;
        report
    }

    #[test]
    fn merge_adds_counts_buckets_and_histograms() {
        let mut merged = report(&[100, 200], &[1, 2]);
        merged.count_error("http_429");
        let mut other = report(&[300], &[0, 1, 5]);
        other.count_error("http_429");
        other.count_error("cluster_unavailable");
        merged.merge(&other);

        assert_eq!(merged.shards, 2);
        assert_eq!(merged.counts.received, 3);
        assert_eq!(merged.delivery_buckets, [1, 3, 5]);
        assert_eq!(merged.latency_us.0.len(), 3);
        assert_eq!(merged.latency_us.0.max(), 300);
        assert_eq!(merged.errors["http_429"], 2);
        assert_eq!(merged.errors["cluster_unavailable"], 1);
    }

    #[test]
    fn merge_keeps_time_extremes() {
        let mut a = ShardReport::default();
        a.connect.first_start_ns = Some(50);
        a.connect.last_ready_ns = Some(70);
        let mut b = ShardReport::default();
        b.connect.first_start_ns = Some(40);
        b.storm.first_drop_ns = Some(10);
        b.last_publish_ns = Some(99);
        a.merge(&b);
        assert_eq!(a.connect.first_start_ns, Some(40));
        assert_eq!(a.connect.last_ready_ns, Some(70));
        assert_eq!(a.storm.first_drop_ns, Some(10));
        assert_eq!(a.last_publish_ns, Some(99));
    }

    #[test]
    fn report_survives_json_round_trip() {
        let mut original = report(&[1, 17, 4_000, 250_000, 9_000_000], &[3, 0, 7]);
        original.thread_cpu.push(CpuSeries {
            samples: vec![(0, 0), (100, 50)],
        });
        original.count_error("connection_refused");
        let text = serde_json::to_string(&original).expect("serializable");
        let parsed: ShardReport = serde_json::from_str(&text).expect("parsable");
        assert_eq!(parsed, original);
        assert_eq!(
            parsed.latency_us.0.value_at_quantile(0.5),
            original.latency_us.0.value_at_quantile(0.5)
        );
    }

    #[test]
    fn histogram_clamps_out_of_range_values() {
        let mut hist = Hist::default();
        hist.record(0);
        hist.record(u64::MAX);
        assert_eq!(hist.0.len(), 2);
        assert_eq!(hist.0.min(), 1);
    }

    #[test]
    fn cpu_series_interpolates_and_clamps() {
        let series = CpuSeries {
            samples: vec![(100, 1_000), (200, 2_000), (300, 2_000)],
        };
        assert_eq!(series.value_at(50), Some(1_000.0));
        assert_eq!(series.value_at(150), Some(1_500.0));
        assert_eq!(series.value_at(400), Some(2_000.0));
        assert_eq!(series.spent(100, 250), Some(1_000.0));
        assert_eq!(CpuSeries::default().value_at(0), None);
    }
}
