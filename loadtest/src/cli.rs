//! Command-line interface: scenarios as subcommands and their options.
//! [`crate::config`] checks them and builds the run configuration.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "ws://127.0.0.1:3001/"
    )]
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

    /// Local address to connect from; repeat to use several, round-robin.
    /// Each source address has its own ephemeral ports (about 28,000 with
    /// Linux's default range), which limit the connections to one node.
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

    /// Maximum messages published but not yet received by every subscriber,
    /// over all publishers. Each thread counts the receipts of its own
    /// subscribers only. Default: 1000 without --rate, unlimited with it.
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

/// Returns the protocol's name as used in labels and results.
pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Nexus => "nexus",
        Protocol::Pusher => "pusher",
    }
}
