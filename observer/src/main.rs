//! observer: counts the traffic inside pod network namespaces with eBPF and
//! serves it as Prometheus metrics.
//!
//! Data path: tc programs (observer-ebpf) count flows in a kernel map
//! (`datapath`); the `collector` turns the map into `metrics`; the `server`
//! serves them. The `attach` worker enters namespaces (`netns`) to attach.

mod attach;
mod bpffs;
mod cli;
mod collector;
mod datapath;
mod flow_metrics;
mod flows_view;
mod identities;
mod inventory;
mod kernel_maps;
mod metrics;
mod netns;
mod reconcile;
mod run;
mod server;
mod watch;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|err| {
        eprintln!("error: --log-level {}: {err}", cli.log_level);
        std::process::exit(2);
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| Ok(runtime.block_on(run::run(args))?)),
        Command::Flows(args) => {
            flows_view::run(args.addr, args.pod.as_deref(), args.interval, args.once)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&*err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its sources on one line, without repeating a source that
/// the message already quotes.
fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
