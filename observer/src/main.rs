//! The `observer` command: parse, set up logging, run the command, report
//! an error on one line. The library's documentation describes the layers.

use std::process::ExitCode;

use anyhow::Context as _;
use observer::{
    cli::{Command, LogFormat, PolicyCommand, config, flows},
    kernel::{bpffs, tc},
    pods::discovery,
    policy::explain,
    run,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match config::parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let filter = match EnvFilter::try_new(&cli.log_level) {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("error: --log-level {}: {err}", cli.log_level);
            return ExitCode::from(2);
        }
    };
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
            .and_then(|runtime| Ok(runtime.block_on(run::run(*args))?)),
        Command::FindContainer(args) => find_container(&args.ids),
        Command::Policy(command) => policy_command(command),
        Command::Flows(args) => flows::run(&args).map_err(anyhow::Error::from),
        Command::Cleanup(args) => cleanup(&args.pin_dir).map(|()| {
            if args.hold {
                wait_for_stop();
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&*err));
            ExitCode::FAILURE
        }
    }
}

fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    let out = match command {
        PolicyCommand::Check { file, inventory } => explain::check(&file, inventory.as_deref())?,
        PolicyCommand::Explain {
            file,
            inventory,
            pod,
            connect,
            connect_unix,
            client,
            udp,
        } => {
            let to = match (connect, connect_unix) {
                (Some(to), _) => Some(explain::ProbeTo::Address { to, udp }),
                (None, Some(path)) => Some(explain::ProbeTo::Unix(path)),
                (None, None) => None,
            };
            let probe = to.map(|to| explain::Probe { to, client });
            explain::explain(&file, &inventory, &pod, probe.as_ref())?
        }
    };
    print!("{}", out.trim_end());
    println!();
    Ok(())
}

/// `observer cleanup`: removes every pin observers left in `dir` (links of
/// pods that fail closed, maps), and the clsact filters they left in pods'
/// namespaces, for an uninstall.
fn cleanup(dir: &std::path::Path) -> anyhow::Result<()> {
    // Not from under an observer that still runs (an uninstall's observers
    // may take their 30 s to go): it waits, saying so, and no observer
    // starts on the node until it has removed its pins and filters.
    let mut _lock = None;
    if !dir.exists() {
        println!("nothing pinned: {} does not exist", dir.display());
    } else if !bpffs::on_bpffs(dir) {
        anyhow::bail!(
            "{} is not on a bpffs: no observer pinned anything there",
            dir.display()
        );
    } else {
        _lock = Some(
            bpffs::lock(dir, bpffs::Waiter::Cleanup)
                .with_context(|| format!("locking {}", dir.display()))?,
        );
        let removed = bpffs::NodePins::at(dir).remove_all();
        println!(
            "removed {removed} pins from {}: pods that failed closed are detached, the maps are freed",
            dir.display()
        );
    }
    // clsact filters outlive the observer (one killed, or pods that failed
    // closed): they are found in the namespaces of the node's processes.
    let left = tc::remove_left_filters_on_node(std::path::Path::new("/proc"))
        .context("looking for the clsact filters observers left")?;
    println!(
        "removed {} clsact filters in {} network namespaces",
        left.removed, left.namespaces
    );
    if left.refused > 0 {
        anyhow::bail!(
            "{} network namespaces could not be opened, entered or changed (CAP_SYS_PTRACE, CAP_SYS_ADMIN and CAP_NET_ADMIN are needed): filters observers left there stay until their pods go",
            left.refused
        );
    }
    Ok(())
}

/// Blocks until SIGTERM or SIGINT.
fn wait_for_stop() {
    // SAFETY: a signal set of our own; the signals are blocked first, so
    // that sigwait takes them rather than their default action.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut signal = 0;
        libc::sigwait(&set, &mut signal);
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
