//! `nexus-loadtest`: load generator for NexusNode (and Pusher-protocol
//! brokers such as Sockudo).
//!
//! - [`cli`]: options; [`config`]: the checked run configuration.
//! - [`coordinator`]: starts shards on threads or in worker processes
//!   ([`worker`]), samples the node processes, merges results.
//! - [`shard`]: one single-threaded runtime with its share of the clients:
//!   [`subscriber`] with its [`inbox`] (the delivery hot path),
//!   [`publisher`], with [`http_pool`] and [`pusher`] for Pusher HTTP API
//!   publishing.
//! - [`ws`]: WebSocket handshake; [`frame`]: frame reader and writer;
//!   [`payload`]: stamped payloads; [`track`]: order checks and in-flight
//!   windows; [`placement`]: which shard, URL and topic each client uses.
//! - [`report`]: mergeable raw results; [`results`] and [`summary`]: the
//!   final JSON line and text; [`svg`]: the percentile plot.

mod cli;
mod config;
mod coordinator;
mod frame;
mod http_pool;
mod inbox;
mod payload;
mod placement;
mod procfs;
mod publisher;
mod pusher;
mod report;
mod results;
mod shard;
mod subscriber;
mod summary;
mod svg;
mod track;
mod worker;
mod ws;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::RunConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Plot(args) = &cli.command {
        return exit(svg::run(args));
    }
    let config = match RunConfig::from_command(&cli.command) {
        Ok(config) => Arc::new(config),
        Err(error) => return exit(Err(error)),
    };
    if let Some(index) = config.common.worker_index {
        return ExitCode::from(worker::run_worker(config, index) as u8);
    }
    exit(run_load(&config))
}

/// Runs a load scenario and prints its results.
fn run_load(config: &Arc<RunConfig>) -> Result<(), String> {
    let report = coordinator::run(config.clone())?;
    eprint!("{}", summary::format(&report));
    if config.common.json {
        let line = serde_json::to_string(&report)
            .map_err(|error| format!("cannot encode the results: {error}"))?;
        println!("{line}");
    }
    Ok(())
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nexus-loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}
