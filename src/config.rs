//! Node configuration: command-line flags, `NEXUS_*` environment variables and an optional TOML
//! file, in that order of precedence, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

/// Command-line flags. Each flag can also be set by its environment variable or by the key of the
/// same name (with underscores) in the `--config` file; a flag wins over the variable, which wins
/// over the file.
#[derive(Debug, Default, Parser)]
#[command(
    name = "nexus-node",
    version,
    about = "A thread-per-core WebSocket pub/sub broker"
)]
pub struct Args {
    /// TOML file with settings; keys are the long flag names with underscores.
    #[arg(long, env = "NEXUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on for WebSocket and HTTP; port 0 picks a free port [default: 127.0.0.1:3001]
    #[arg(long, env = "NEXUS_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Worker cores [default: every core, less one for the cluster link when --redis is set; at least 1]
    #[arg(long, env = "NEXUS_CORES", value_name = "N")]
    pub cores: Option<usize>,

    /// Largest message a client may send, in bytes, all fragments together [default: 65536]
    #[arg(long, env = "NEXUS_MAX_MESSAGE_SIZE", value_name = "BYTES")]
    pub max_message_size: Option<usize>,

    /// Subscriptions one connection may hold [default: 1024]
    #[arg(long, env = "NEXUS_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Connections the node accepts; further handshakes get 503 [default: 100000]
    #[arg(long, env = "NEXUS_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Maximum length of a topic or pattern, in bytes [default: 255]
    #[arg(long, env = "NEXUS_MAX_TOPIC_LENGTH", value_name = "BYTES")]
    pub max_topic_length: Option<usize>,

    /// Bytes queued for one connection before it is closed as a slow consumer [default: 1048576]
    #[arg(long, env = "NEXUS_MAX_OUTBOUND_QUEUE", value_name = "BYTES")]
    pub max_outbound_queue: Option<usize>,

    /// Time between WebSocket pings to each client, e.g. 25s or 500ms [default: 25s]
    #[arg(long, env = "NEXUS_PING_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub ping_interval: Option<Duration>,

    /// Time after a ping within which a client must send something [default: 10s]
    #[arg(long, env = "NEXUS_PONG_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub pong_timeout: Option<Duration>,

    /// Time clients get to close after SIGTERM or SIGINT before the node exits [default: 5s]
    #[arg(long, env = "NEXUS_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Log level: trace, debug, info, warn or error [default: info]
    #[arg(long, env = "NEXUS_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// This node's identity in logs and in the cluster [default: random]
    #[arg(long, env = "NEXUS_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,

    /// Redis URL that makes this node a cluster member: redis://[user:password@]host[:port][/db]
    /// for one Redis server, or redis+cluster://[user:password@]host:port[,host:port...] for the
    /// seed nodes of a Redis Cluster (sharded pub/sub, Redis 7 or later) [default: none, single node]
    #[arg(long = "redis", env = "NEXUS_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Prefix of every Redis channel and key this node uses; nodes with the same prefix form one
    /// cluster [default: nexus:]
    #[arg(long, env = "NEXUS_REDIS_PREFIX", value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// Time between PINGs on each Redis pub/sub connection [default: 1s]
    #[arg(long, env = "NEXUS_REDIS_PING_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub redis_ping_interval: Option<Duration>,

    /// Time allowed to connect to Redis and for Redis to reply to a command or PING before the
    /// connection counts as dead and is reopened [default: 3s]
    #[arg(long, env = "NEXUS_REDIS_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub redis_timeout: Option<Duration>,

    /// Time between writes of this node's registry key <prefix>node:<node_id>, which expires
    /// after three intervals [default: 2s]
    #[arg(long, env = "NEXUS_REGISTRY_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub registry_interval: Option<Duration>,
}

/// The same settings as [`Args`], read from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    cores: Option<usize>,
    max_message_size: Option<usize>,
    max_subscriptions: Option<usize>,
    max_connections: Option<usize>,
    max_topic_length: Option<usize>,
    max_outbound_queue: Option<usize>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    pong_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    drain_timeout: Option<Duration>,
    log_level: Option<String>,
    node_id: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    redis_ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    redis_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "deserialize_duration")]
    registry_interval: Option<Duration>,
}

/// Validated node settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address for WebSocket and HTTP.
    pub listen: SocketAddr,
    /// Number of worker cores.
    pub cores: usize,
    /// Largest inbound message, in bytes.
    pub max_message_size: usize,
    /// Subscriptions per connection.
    pub max_subscriptions: usize,
    /// Connections per node.
    pub max_connections: usize,
    /// Maximum topic length, in bytes.
    pub max_topic_length: usize,
    /// Outbound bytes queued per connection before it is closed.
    pub max_outbound_queue: usize,
    /// Time between server pings.
    pub ping_interval: Duration,
    /// Time allowed for a client to show life after a ping.
    pub pong_timeout: Duration,
    /// Time allowed for clients to close at shutdown.
    pub drain_timeout: Duration,
    /// Minimum log level.
    pub log_level: slog::Level,
    /// Node identity.
    pub node_id: String,
    /// Redis URL for cluster mode.
    pub redis_url: Option<String>,
    /// Prefix of the link's Redis channels and keys.
    pub redis_prefix: String,
    /// Time between PINGs on a Redis pub/sub connection.
    pub redis_ping_interval: Duration,
    /// Time allowed for a Redis connect, reply or PONG.
    pub redis_timeout: Duration,
    /// Time between registry writes.
    pub registry_interval: Duration,
}

/// A setting that cannot be used, named with its value.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        source: toml::de::Error,
    },
    /// A value is out of its range.
    #[error("invalid {name} {value}: {expected}")]
    Invalid {
        /// The setting's name.
        name: &'static str,
        /// The value given.
        value: String,
        /// The accepted range or form.
        expected: &'static str,
    },
}

/// The topic length limit cannot pass this, so that topics stay short keys.
pub const TOPIC_LENGTH_CEILING: usize = 1024;

impl Config {
    /// Builds the configuration from parsed flags, reading the TOML file they name.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let redis_url = args.redis_url.or(file.redis_url);
        let default_cores = default_cores(redis_url.is_some());
        let config = Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3001))),
            cores: args.cores.or(file.cores).unwrap_or(default_cores),
            max_message_size: args
                .max_message_size
                .or(file.max_message_size)
                .unwrap_or(65_536),
            max_subscriptions: args
                .max_subscriptions
                .or(file.max_subscriptions)
                .unwrap_or(1024),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(100_000),
            max_topic_length: args
                .max_topic_length
                .or(file.max_topic_length)
                .unwrap_or(255),
            max_outbound_queue: args
                .max_outbound_queue
                .or(file.max_outbound_queue)
                .unwrap_or(1 << 20),
            ping_interval: args
                .ping_interval
                .or(file.ping_interval)
                .unwrap_or(Duration::from_secs(25)),
            pong_timeout: args
                .pong_timeout
                .or(file.pong_timeout)
                .unwrap_or(Duration::from_secs(10)),
            drain_timeout: args
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(Duration::from_secs(5)),
            log_level: parse_level(
                args.log_level
                    .or(file.log_level)
                    .as_deref()
                    .unwrap_or("info"),
            )?,
            node_id: args.node_id.or(file.node_id).unwrap_or_else(random_node_id),
            redis_url,
            redis_prefix: args
                .redis_prefix
                .or(file.redis_prefix)
                .unwrap_or_else(|| "nexus:".to_owned()),
            redis_ping_interval: args
                .redis_ping_interval
                .or(file.redis_ping_interval)
                .unwrap_or(Duration::from_secs(1)),
            redis_timeout: args
                .redis_timeout
                .or(file.redis_timeout)
                .unwrap_or(Duration::from_secs(3)),
            registry_interval: args
                .registry_interval
                .or(file.registry_interval)
                .unwrap_or(Duration::from_secs(2)),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check(self.cores, 1, 1024, "cores", "must be between 1 and 1024")?;
        check(
            self.max_message_size,
            64,
            64 << 20,
            "max_message_size",
            "must be between 64 bytes and 64 MiB",
        )?;
        check(
            self.max_subscriptions,
            1,
            1 << 20,
            "max_subscriptions",
            "must be between 1 and 1048576",
        )?;
        check(
            self.max_connections,
            1,
            10_000_000,
            "max_connections",
            "must be between 1 and 10000000",
        )?;
        check(
            self.max_topic_length,
            1,
            TOPIC_LENGTH_CEILING,
            "max_topic_length",
            "must be between 1 and 1024",
        )?;
        // A queue must hold at least one largest message, or every such delivery would be lost.
        if self.max_outbound_queue < self.max_message_size + 512 {
            return Err(invalid(
                "max_outbound_queue",
                self.max_outbound_queue,
                "must be at least max_message_size plus 512 bytes",
            ));
        }
        for (name, value) in [
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
        ] {
            if value < Duration::from_millis(10) {
                let shown = humantime::format_duration(value).to_string();
                return Err(invalid(name, shown, "must be at least 10ms"));
            }
        }
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || self.node_id.contains(char::is_whitespace)
        {
            return Err(invalid(
                "node_id",
                &self.node_id,
                "must be 1 to 64 characters without spaces",
            ));
        }
        self.validate_redis()
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis_url {
            if let Err(reason) = crate::link::settings::parse_url(url) {
                let shown = format!("{} ({reason})", crate::link::settings::redact(url));
                return Err(invalid(
                    "redis_url",
                    shown,
                    "must be redis://[user:password@]host[:port][/db] or \
                     redis+cluster://[user:password@]host:port[,host:port...]",
                ));
            }
        }
        // Topics may contain ':', so a prefix with a ':' before its end could be the start of
        // another cluster's channel names (`nexus:` and `nexus:staging:`). With exactly one ':'
        // at the end, the first ':' of a channel name always ends its prefix.
        let name = self.redis_prefix.strip_suffix(':').unwrap_or("");
        let valid_name = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if name.is_empty() || name.len() > 63 || !valid_name {
            return Err(invalid(
                "redis_prefix",
                &self.redis_prefix,
                "must be 1 to 63 letters, digits, '_' or '-' followed by one ':', e.g. nexus:",
            ));
        }
        for (name, value) in [
            ("redis_ping_interval", self.redis_ping_interval),
            ("redis_timeout", self.redis_timeout),
            ("registry_interval", self.registry_interval),
        ] {
            if value < Duration::from_millis(10) || value > Duration::from_secs(3600) {
                let shown = humantime::format_duration(value).to_string();
                return Err(invalid(name, shown, "must be between 10ms and 1h"));
            }
        }
        Ok(())
    }
}

fn check(
    value: usize,
    min: usize,
    max: usize,
    name: &'static str,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(name, value, expected));
    }
    Ok(())
}

fn invalid(name: &'static str, value: impl ToString, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_string(),
        expected,
    }
}

fn read_file(path: &PathBuf) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.clone(),
        source,
    })
}

fn default_cores(cluster: bool) -> usize {
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    let reserved = usize::from(cluster);
    available.saturating_sub(reserved).max(1)
}

fn parse_level(text: &str) -> Result<slog::Level, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "trace" => Ok(slog::Level::Trace),
        "debug" => Ok(slog::Level::Debug),
        "info" => Ok(slog::Level::Info),
        "warn" | "warning" => Ok(slog::Level::Warning),
        "error" => Ok(slog::Level::Error),
        _ => Err(invalid(
            "log_level",
            text,
            "must be trace, debug, info, warn or error",
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (use a unit, e.g. 25s or 500ms)"))
}

fn deserialize_duration<'de, D>(deserializer: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn random_node_id() -> String {
    use rand::Rng;
    let suffix: u32 = rand::thread_rng().gen();
    format!("node-{suffix:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(flags: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["nexus-node"];
        argv.extend_from_slice(flags);
        Config::from_args(Args::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults_are_documented_values() {
        let config = config(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:3001");
        assert_eq!(config.max_message_size, 65_536);
        assert_eq!(config.ping_interval, Duration::from_secs(25));
        assert_eq!(config.pong_timeout, Duration::from_secs(10));
        assert!(config.cores >= 1);
        assert!(config.redis_url.is_none());
        assert_eq!(config.redis_prefix, "nexus:");
        assert_eq!(config.redis_ping_interval, Duration::from_secs(1));
        assert_eq!(config.redis_timeout, Duration::from_secs(3));
        assert_eq!(config.registry_interval, Duration::from_secs(2));
    }

    #[test]
    fn redis_settings_are_validated() {
        assert!(config(&["--redis", "redis://127.0.0.1:6379"]).is_ok());
        assert!(config(&["--redis", "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"]).is_ok());
        for flags in [
            &["--redis", "rediss://127.0.0.1:6379"][..],
            &["--redis", "http://127.0.0.1"],
            &["--redis-prefix", "has space"],
            &["--redis-timeout", "2h"],
            &["--registry-interval", "1ms"],
        ] {
            assert!(config(flags).is_err(), "flags {flags:?}");
        }
    }

    #[test]
    fn invalid_redis_url_error_hides_the_password() {
        let error = config(&["--redis", "rediss://user:hunter2@h:1"])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("redis_url"), "{error}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        for flags in [
            &["--cores", "0"][..],
            &["--max-message-size", "10"],
            &["--max-outbound-queue", "1000"],
            &["--ping-interval", "1ms"],
            &["--log-level", "loud"],
            &["--node-id", "a b"],
        ] {
            assert!(config(flags).is_err(), "flags {flags:?}");
        }
    }

    #[test]
    fn redis_prefix_needs_one_final_colon() {
        for prefix in ["nexus:staging:", "nexus", "", ":", "a b:", "a*:"] {
            let result = config(&["--redis-prefix", prefix]);
            assert!(result.is_err(), "prefix {prefix:?}");
        }
        for prefix in ["nexus:", "staging-2:", "a_b:"] {
            let result = config(&["--redis-prefix", prefix]);
            assert!(result.is_ok(), "prefix {prefix:?}");
        }
    }

    #[test]
    fn file_values_apply_below_flags() {
        let path = std::env::temp_dir().join(format!("nexus-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "max_subscriptions = 7\nping_interval = \"2s\"\ncores = 3\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let config = config(&["--config", file, "--cores", "2"]).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.max_subscriptions, 7);
        assert_eq!(config.ping_interval, Duration::from_secs(2));
        assert_eq!(config.cores, 2);
    }

    #[test]
    fn unknown_file_key_is_an_error() {
        let path = std::env::temp_dir().join(format!("nexus-bad-{}.toml", std::process::id()));
        std::fs::write(&path, "max_subscription = 7\n").unwrap();
        let result = config(&["--config", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(result, Err(ConfigError::Parse { .. })));
    }
}
