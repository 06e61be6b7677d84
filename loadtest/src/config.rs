//! The checked configuration of a load run, built from the command line.

use std::net::IpAddr;
use std::time::Duration;

use crate::cli::{protocol_name, Command, CommonArgs, ConnectionArgs, PublishArgs};
use crate::placement::{Layout, Placement};
use crate::ws::WsUrl;

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

    /// Returns whether the scenario publishes messages.
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
        let default_duration = if args.common.messages.is_some() {
            300.0
        } else {
            10.0
        };
        let mut config = Self::base(
            scenario,
            &args.common,
            layout,
            args.subscribers,
            default_duration,
        )?;
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
        let default_duration = if scenario == Scenario::Storm {
            60.0
        } else {
            10.0
        };
        let layout = Layout::Idle { topics };
        let mut config = Self::base(
            scenario,
            &args.common,
            layout,
            args.connections,
            default_duration,
        )?;
        config.storm_after = storm_after
            .map(|secs| seconds("--storm-after", secs))
            .transpose()?;
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
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

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
            &[
                "nexus-loadtest",
                "topics",
                "--subscribers",
                "2",
                "--publishers",
                "3",
            ],
            &["nexus-loadtest", "fanout", "--rate", "0"],
            &[
                "nexus-loadtest",
                "fanout",
                "--subscribers",
                "1",
                "--threads",
                "2",
            ],
            &["nexus-loadtest", "fanout", "--topic-prefix", "a..b"],
            &[
                "nexus-loadtest",
                "fanout",
                "--url",
                "http://127.0.0.1:3001/",
            ],
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
