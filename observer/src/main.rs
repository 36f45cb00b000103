//! observer: counts the traffic inside pod network namespaces with eBPF and
//! serves it as Prometheus metrics.
//!
//! Data path: tc programs (observer-ebpf) count flows in a kernel map
//! (`datapath`); the `collector` turns the map into `metrics`; the `server`
//! serves them. The `attach` worker enters namespaces (`netns`) to attach.

mod attach;
mod bpffs;
mod cli;
mod cluster;
mod collector;
mod config;
mod datapath;
mod discovery;
mod flow_metrics;
mod flows_view;
mod identities;
mod inventory;
mod kernel_maps;
mod metrics;
mod netns;
mod policy;
mod reconcile;
mod run;
mod server;
mod verdicts;
mod watch;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, LogFormat, PolicyCommand};

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    let out = match command {
        PolicyCommand::Check { file, inventory } => {
            policy::explain::check(&file, inventory.as_deref())?
        }
        PolicyCommand::Explain {
            file,
            inventory,
            pod,
            connect,
            client,
            udp,
        } => {
            let connect = connect.map(|to| policy::explain::Probe { to, client, udp });
            policy::explain::explain(&file, &inventory, &pod, connect.as_ref())?
        }
    };
    print!("{}", out.trim_end());
    println!();
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(err) = config::apply(&args) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|err| {
        eprintln!("error: --log-level {}: {err}", cli.log_level);
        std::process::exit(2);
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let result = match cli.command {
        Command::Run(args) => run::enter_host_cgroup_namespace(&args)
            .and_then(|()| tokio::runtime::Runtime::new().map_err(run::RunError::Runtime))
            .map_err(anyhow::Error::from)
            .and_then(|runtime| Ok(runtime.block_on(run::run(args))?)),
        Command::FindContainer(args) => find_container(&args.ids),
        Command::Policy(command) => policy_command(command),
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

/// `observer find-container`: exits non-zero if any id is not found.
fn find_container(ids: &[String]) -> anyhow::Result<()> {
    let ids: Vec<&str> = ids
        .iter()
        .map(|id| discovery::status_id(id).unwrap_or(id))
        .collect();
    let cgroup_root = discovery::cgroup2_root()
        .ok_or_else(|| anyhow::anyhow!("no cgroup v2 hierarchy is mounted"))?;
    let found = discovery::find(std::path::Path::new("/proc"), &cgroup_root, &ids);
    let mut missing = Vec::new();
    for id in ids {
        match found.get(id) {
            Some(c) => println!(
                "{id} pid={} netns={} cgroup={}",
                c.pid,
                c.netns.display(),
                c.cgroup.display()
            ),
            None => missing.push(id),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("no running container with id {}", missing.join(", "));
    }
    Ok(())
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
