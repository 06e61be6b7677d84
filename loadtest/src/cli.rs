//! Command-line interface: scenarios as subcommands, and the checked run
//! configuration built from them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::placement::{Layout, Placement};
use crate::ws::WsUrl;

/// Load generator for NexusNode and Pusher-protocol brokers.
///
/// Every scenario stops by itself: publishing ends after --duration or
/// --messages, whichever comes first, and subscribers wait --drain seconds
/// more before missing messages count as lost.
#[derive(Parser, Debug)]
#[command(name = "nexus-loadtest", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// N subscribers on one topic, P publishers; every message reaches every
    /// subscriber.
    Fanout(PublishArgs),
    /// N subscribers, each alone on its own topic; publisher j publishes to
    /// the topics t with t % P == j.
    Topics(PublishArgs),
    /// Publishers on the first --url, subscribers on the other URLs, all on
    /// one topic: delivery across nodes through the cluster link.
    Cluster(PublishArgs),
    /// C idle subscribed connections: connect rate, handshake latency and
    /// the node's memory per connection (needs --pid).
    Connections(ConnectionArgs),
    /// C connected clients reconnect at once, after --storm-after seconds or
    /// when the node drops them; measures the time until all are back.
    Storm(StormArgs),
    /// Draws a latency-percentile SVG plot from result lines (--json output).
    Plot(PlotArgs),
}

/// Wire protocol of the broker under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// NexusNode: SUBSCRIBE and PUBLISH JSON requests over WebSocket.
    Nexus,
    /// Pusher channels protocol 7 (Sockudo): WebSocket subscribers,
    /// publishes through the signed HTTP API.
    Pusher,
}

/// Options every load scenario takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Node WebSocket URL; repeat for several nodes. Clients are spread over
    /// the URLs round-robin.
    #[arg(long = "url", value_name = "URL", default_value = "ws://127.0.0.1:3001/")]
    pub urls: Vec<String>,

    /// Seconds of measured load after the warmup. Default: 10, or 300 when
    /// --messages is given; for storm, the maximum seconds to wait for the
    /// storm and the reconnects (default 60).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,

    /// Seconds of load before measuring starts; connections: seconds to let
    /// the node settle before its memory is read.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub warmup: f64,

    /// Seconds to wait after publishing ends, and after the last delivery,
    /// before missing messages count as lost.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub drain: f64,

    /// Maximum number of messages published in total, warmup included.
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,

    /// Length in bytes of each published `data` JSON value, padded with
    /// `x`. The default makes a NexusNode delivery about 100 bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 56)]
    pub size: usize,

    /// Print one JSON line of results on stdout; the summary goes to stderr.
    #[arg(long)]
    pub json: bool,

    /// Node process to measure (CPU time; memory for connections); repeat
    /// for several nodes.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Number of OS processes to run the clients in. One process may hold
    /// only as many sockets as its open-file limit allows.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub processes: u32,

    /// Threads per process, each with its own single-threaded runtime.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: u32,

    #[arg(long, value_enum, default_value_t = Protocol::Nexus)]
    pub protocol: Protocol,

    /// Pusher app id, used in the HTTP API path (default of Sockudo's
    /// example configuration).
    #[arg(long, value_name = "ID", default_value = "app-id")]
    pub app_id: String,

    /// Pusher app key, used in the WebSocket path and to sign publishes.
    #[arg(long, value_name = "KEY", default_value = "app-key")]
    pub app_key: String,

    /// Pusher app secret, used to sign publishes.
    #[arg(long, value_name = "SECRET", default_value = "app-secret")]
    pub app_secret: String,

    /// Name of this run in the results and in plots. Default: the scenario
    /// and its main options.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// Prefix of the topic names. Default: `lt-` and a random run id, so that
    /// runs never share topics.
    #[arg(long, value_name = "PREFIX")]
    pub topic_prefix: Option<String>,

    /// Local address to connect from; repeat to use several, round-robin
    /// (each source address has its own ~28,000 ephemeral ports).
    #[arg(long = "bind-ip", value_name = "IP")]
    pub bind_ips: Vec<IpAddr>,

    /// Maximum connection attempts in progress at once per thread.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Maximum new connections per second in total while setting up.
    #[arg(long, value_name = "CONN/S")]
    pub connect_rate: Option<f64>,

    /// Internal: index of this worker process.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,

    /// Internal: run id shared by the worker processes.
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

/// Options of the scenarios that publish.
#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Number of subscriber connections.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub subscribers: u32,

    /// Number of publisher connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub publishers: u32,

    /// Total publish rate in messages per second over all publishers.
    /// Without it, publishers send as fast as --in-flight allows.
    #[arg(long, value_name = "MSGS/S")]
    pub rate: Option<f64>,

    /// Maximum messages published but not yet received by every subscriber
    /// of the same process, over all publishers. Default: 1000 without
    /// --rate, unlimited with it.
    #[arg(long, value_name = "K")]
    pub in_flight: Option<u64>,
}

/// Options of the connections scenario.
#[derive(Args, Debug, Clone)]
pub struct ConnectionArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Number of connections.
    #[arg(long, value_name = "C", default_value_t = 1000)]
    pub connections: u32,

    /// Number of topics the connections subscribe to, round-robin.
    /// Default: one topic per connection.
    #[arg(long, value_name = "T")]
    pub topics: Option<u32>,
}

/// Options of the storm scenario.
#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub connections: ConnectionArgs,

    /// Seconds after the start at which every client drops its connection
    /// and reconnects. Without it, clients reconnect when the node drops
    /// them (for example, on restart).
    #[arg(long, value_name = "SECS")]
    pub storm_after: Option<f64>,
}

/// Options of the plot command.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// File of result lines (one JSON object per line, from --json); repeat
    /// to combine files.
    #[arg(long = "input", value_name = "FILE", required = true)]
    pub inputs: Vec<PathBuf>,

    /// SVG file to write.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,

    /// Title above the plot.
    #[arg(long, default_value = "End-to-end latency by percentile")]
    pub title: String,

    /// Use a logarithmic latency axis.
    #[arg(long)]
    pub log_latency: bool,
}

/// Scenario of a load run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Fanout,
    Topics,
    Cluster,
    Connections,
    Storm,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Topics => "topics",
            Scenario::Cluster => "cluster",
            Scenario::Connections => "connections",
            Scenario::Storm => "storm",
        }
    }

    /// Whether the scenario publishes messages.
    pub fn publishes(self) -> bool {
        matches!(
            self,
            Scenario::Fanout | Scenario::Topics | Scenario::Cluster
        )
    }
}

/// Checked configuration of one load run, the same in every worker.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub scenario: Scenario,
    pub common: CommonArgs,
    pub urls: Vec<WsUrl>,
    pub placement: Placement,
    pub rate: Option<f64>,
    pub in_flight: Option<u64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    pub storm_after: Option<Duration>,
    pub connect_timeout: Duration,
    pub run_id: String,
    pub topic_prefix: String,
    pub label: String,
}

/// Default total in-flight limit when publishing without --rate.
const DEFAULT_IN_FLIGHT: u64 = 1000;

/// Limit on processes times threads.
const MAX_SHARDS: u32 = 256;

impl RunConfig {
    /// Checks the options of a load scenario and builds its configuration.
    pub fn from_command(command: &Command) -> Result<RunConfig, String> {
        match command {
            Command::Fanout(args) => Self::publishing(Scenario::Fanout, args),
            Command::Topics(args) => Self::publishing(Scenario::Topics, args),
            Command::Cluster(args) => Self::publishing(Scenario::Cluster, args),
            Command::Connections(args) => Self::idle(Scenario::Connections, args, None),
            Command::Storm(args) => {
                Self::idle(Scenario::Storm, &args.connections, args.storm_after)
            }
            Command::Plot(_) => Err("plot is not a load scenario".to_string()),
        }
    }

    fn publishing(scenario: Scenario, args: &PublishArgs) -> Result<RunConfig, String> {
        let layout = match scenario {
            Scenario::Topics => Layout::Topics,
            Scenario::Cluster => Layout::Cluster,
            _ => Layout::Fanout,
        };
        let in_flight = match (args.rate, args.in_flight) {
            (_, Some(limit)) => Some(limit),
            (None, None) => Some(DEFAULT_IN_FLIGHT),
            (Some(_), None) => None,
        };
        let default_duration = if args.common.messages.is_some() { 300.0 } else { 10.0 };
        let mut config = Self::base(scenario, &args.common, layout, args.subscribers, default_duration)?;
        config.placement.publishers = args.publishers;
        config.rate = args.rate;
        config.in_flight = in_flight;
        config.label = args.common.label.clone().unwrap_or_else(|| {
            let load = match args.rate {
                Some(rate) => format!("rate={rate}"),
                None => format!("in_flight={}", in_flight.unwrap_or(0)),
            };
            format!(
                "{} {} subs={} pubs={} {load} size={}",
                scenario.name(),
                protocol_name(args.common.protocol),
                args.subscribers,
                args.publishers,
                args.common.size
            )
        });
        config.check_publishing()?;
        Ok(config)
    }

    fn idle(
        scenario: Scenario,
        args: &ConnectionArgs,
        storm_after: Option<f64>,
    ) -> Result<RunConfig, String> {
        let topics = args.topics.unwrap_or(args.connections).max(1);
        let default_duration = if scenario == Scenario::Storm { 60.0 } else { 10.0 };
        let layout = Layout::Idle { topics };
        let mut config = Self::base(scenario, &args.common, layout, args.connections, default_duration)?;
        config.storm_after = storm_after.map(|secs| seconds("--storm-after", secs)).transpose()?;
        if let Some(after) = config.storm_after {
            if after >= config.duration {
                return Err(format!(
                    "--storm-after ({}s) must be less than --duration ({}s)",
                    after.as_secs_f64(),
                    config.duration.as_secs_f64()
                ));
            }
        }
        config.label = args.common.label.clone().unwrap_or_else(|| {
            format!(
                "{} {} conns={} topics={topics}",
                scenario.name(),
                protocol_name(args.common.protocol),
                args.connections
            )
        });
        if args.connections == 0 {
            return Err("--connections must be at least 1".to_string());
        }
        Ok(config)
    }

    fn base(
        scenario: Scenario,
        common: &CommonArgs,
        layout: Layout,
        subscribers: u32,
        default_duration: f64,
    ) -> Result<RunConfig, String> {
        let urls = common
            .urls
            .iter()
            .map(|url| WsUrl::parse(url))
            .collect::<Result<Vec<_>, _>>()?;
        let shards = common.processes.saturating_mul(common.threads);
        if common.processes == 0 || common.threads == 0 || shards > MAX_SHARDS {
            return Err(format!(
                "--processes times --threads must be between 1 and {MAX_SHARDS}"
            ));
        }
        if common.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".to_string());
        }
        if let Some(rate) = common.connect_rate {
            positive("--connect-rate", rate)?;
        }
        let run_id = common.run_id.clone().unwrap_or_else(new_run_id);
        let topic_prefix = common
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("lt-{run_id}"));
        check_topic_prefix(&topic_prefix)?;
        Ok(RunConfig {
            scenario,
            common: common.clone(),
            placement: Placement {
                layout,
                subscribers,
                publishers: 0,
                shards,
                urls: urls.len(),
            },
            urls,
            rate: None,
            in_flight: None,
            duration: seconds("--duration", common.duration.unwrap_or(default_duration))?,
            warmup: seconds("--warmup", common.warmup)?,
            drain: seconds("--drain", common.drain)?,
            storm_after: None,
            connect_timeout: Duration::from_secs(10),
            run_id,
            topic_prefix,
            label: String::new(),
        })
    }

    fn check_publishing(&self) -> Result<(), String> {
        let placement = &self.placement;
        if placement.publishers == 0 || placement.subscribers == 0 {
            return Err("--publishers and --subscribers must be at least 1".to_string());
        }
        if let Some(rate) = self.rate {
            positive("--rate", rate)?;
        }
        if self.in_flight == Some(0) {
            return Err("--in-flight must be at least 1".to_string());
        }
        if self.common.size > 60_000 {
            return Err(format!(
                "--size {} is too large: at most 60000 bytes fit the broker's default 64 KiB message limit",
                self.common.size
            ));
        }
        match self.scenario {
            Scenario::Topics if placement.publishers > placement.subscribers => Err(format!(
                "topics: --publishers ({}) must not exceed --subscribers ({}), since each topic has one subscriber and one publisher",
                placement.publishers, placement.subscribers
            )),
            Scenario::Cluster if self.urls.len() < 2 => Err(
                "cluster needs at least two --url options: publishers use the first, subscribers the others"
                    .to_string(),
            ),
            Scenario::Fanout | Scenario::Cluster if placement.subscribers < placement.shards => {
                Err(format!(
                    "--subscribers ({}) must be at least --processes times --threads ({}), so that every process has subscribers to pace its publishers",
                    placement.subscribers, placement.shards
                ))
            }
            _ => Ok(()),
        }
    }

    /// Returns the name of `topic` as sent to the broker.
    pub fn topic_name(&self, topic: u32) -> String {
        format!("{}.{topic}", self.topic_prefix)
    }

    /// Returns the local address connection `index` binds to, if any.
    pub fn bind_ip(&self, index: u32) -> Option<IpAddr> {
        let ips = &self.common.bind_ips;
        (!ips.is_empty()).then(|| ips[index as usize % ips.len()])
    }

    /// Returns the time from the start until publishing stops.
    pub fn publish_time(&self) -> Duration {
        self.warmup + self.duration
    }
}

pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Nexus => "nexus",
        Protocol::Pusher => "pusher",
    }
}

fn seconds(option: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{option} must be a number of seconds of 0 or more, got {secs}"))
}

fn positive(option: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(format!("{option} must be greater than 0, got {value}"))
    }
}

/// Topic segments allow ASCII letters, digits and `_ - : @`; the prefix may
/// hold several segments separated by `.`.
fn check_topic_prefix(prefix: &str) -> Result<(), String> {
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:@".contains(&b))
    };
    if prefix.split('.').all(valid_segment) {
        Ok(())
    } else {
        Err(format!(
            "invalid --topic-prefix {prefix:?}: use ASCII letters, digits and _ - : @, in segments separated by ."
        ))
    }
}

/// Returns a random 8-hex-digit id from the clock and the process id.
fn new_run_id() -> String {
    let seed = crate::procfs::now_ns() as u64 ^ (u64::from(std::process::id()) << 32);
    let mut source = crate::frame::MaskSource::new(seed);
    format!("{:08x}", source.next_u64() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<RunConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|error| error.to_string())?;
        RunConfig::from_command(&cli.command)
    }

    #[test]
    fn fanout_defaults_to_in_flight_window() {
        let run = config(&["nexus-loadtest", "fanout"]).expect("valid");
        assert_eq!(run.in_flight, Some(DEFAULT_IN_FLIGHT));
        assert_eq!(run.duration, Duration::from_secs(10));
        assert_eq!(run.placement.subscribers, 100);
        assert!(run.topic_prefix.starts_with("lt-"));
    }

    #[test]
    fn rate_without_in_flight_is_unlimited() {
        let run = config(&["nexus-loadtest", "fanout", "--rate", "500"]).expect("valid");
        assert_eq!(run.in_flight, None);
    }

    #[test]
    fn invalid_combinations_are_rejected() {
        let cases: &[&[&str]] = &[
            &["nexus-loadtest", "cluster"],
            &["nexus-loadtest", "topics", "--subscribers", "2", "--publishers", "3"],
            &["nexus-loadtest", "fanout", "--rate", "0"],
            &["nexus-loadtest", "fanout", "--subscribers", "1", "--threads", "2"],
            &["nexus-loadtest", "fanout", "--topic-prefix", "a..b"],
            &["nexus-loadtest", "fanout", "--url", "http://127.0.0.1:3001/"],
            &["nexus-loadtest", "storm", "--storm-after", "70"],
        ];
        for args in cases {
            assert!(config(args).is_err(), "accepted {args:?}");
        }
    }

    #[test]
    fn messages_cap_extends_default_duration() {
        let run = config(&["nexus-loadtest", "fanout", "--messages", "10"]).expect("valid");
        assert_eq!(run.duration, Duration::from_secs(300));
    }
}
