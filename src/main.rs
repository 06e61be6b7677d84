//! The `nexus-node` binary: parse the configuration, build the logger, run the node.

use std::process::ExitCode;

use clap::Parser;
use nexus_node::config::{Args, Config};

fn main() -> ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("nexus-node: {error}");
            return ExitCode::from(2);
        }
    };
    let (log, guard) = nexus_node::logging::build(config.log_level);
    let result = nexus_node::node::run(config, log.clone());
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            slog::crit!(log, "node failed to start"; "error" => %error);
            eprintln!("nexus-node: {error}");
            ExitCode::from(1)
        }
    };
    drop(log);
    drop(guard);
    code
}
