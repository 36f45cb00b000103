//! Developer tasks: `cargo xtask <setup|run|test|lab|bench|image|check-deploy>`.
//!
//! Each task installs what it needs first (`setup`), so a new machine needs
//! nothing but Rust from rustup.

mod buildah;
mod cmd;
mod compare;
mod deploy;
mod image;
mod lab;
mod lab_image;
mod packages;
mod test;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cmd::run;

#[derive(Parser)]
#[command(about = "Build, run and test the observer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Find or install the eBPF toolchain (idempotent).
    Setup,
    /// Build the observer and run it on this machine (as root): by default on
    /// every network namespace under /var/run/netns, metrics on
    /// http://127.0.0.1:9465/metrics.
    Run {
        /// Stand up the default node lab first and observe its pods.
        #[arg(long)]
        lab: bool,
        /// With --lab: how the lab makes pods (process, or containerd for
        /// real pods through CRI).
        #[arg(long, requires = "lab", default_value = "process")]
        runtime: ::lab::Runtime,
        /// Arguments for `observer run` (see `observer run --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The node lab: a simulated Kubernetes node in network namespaces.
    #[command(subcommand)]
    Lab(lab::LabTask),
    /// Measure what the observer costs (see BENCHMARKS.md); about 4 minutes.
    Bench {
        /// Only the per-program cost, every kind of traffic (about a
        /// minute; 2 with --compare).
        #[arg(long, group = "only")]
        cost_only: bool,
        /// Only the throughput with and without the observer, two copies
        /// of the traffic side by side (about 4 minutes; 5 with --compare).
        #[arg(long, group = "only")]
        throughput_only: bool,
        /// Only the attach latency of new pods (about 20 seconds).
        #[arg(long, group = "only")]
        latency_only: bool,
        /// Only the scale figures: 250 pods, 1 M flows (start-up,
        /// collection, memory; about a minute).
        #[arg(long, group = "only")]
        scale_only: bool,
        /// Only Kubernetes mode at cluster scale: 50,000 pods in a scripted
        /// API (memory, reconciliation time; about a minute).
        #[arg(long, group = "only")]
        cluster_only: bool,
        /// Only the cost per call of following unix sockets and named
        /// pipes (about a minute).
        #[arg(long, group = "only")]
        ipc_only: bool,
        /// Also measure the observer of another commit (a branch, tag or
        /// hash), built from it, side by side in the same run.
        #[arg(long, value_name = "REF")]
        compare: Option<String>,
        /// Rounds of the throughput benchmark (7 by default, about 35 s
        /// each): more narrow the medians on a noisy machine.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: Option<u32>,
    },
    /// Validate deploy/ against the Kubernetes schemas (also part of test).
    CheckDeploy,
    /// Build the container image (no Docker engine: buildah) as an OCI
    /// archive in target/image/, and check it.
    Image,
    /// Run every test: unit tests, then the end-to-end tests against the
    /// kernel (as root, one at a time), then the deploy/ manifests.
    Test {
        /// Only the end-to-end tests whose name contains this.
        filter: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let workspace = workspace_root();
    match cli.task {
        Task::Setup => setup(&workspace),
        Task::Run { lab, runtime, args } => run_observer(&workspace, lab.then_some(runtime), &args),
        Task::Lab(task) => lab::run(&workspace, task),
        Task::Bench {
            cost_only,
            throughput_only,
            latency_only,
            scale_only,
            cluster_only,
            ipc_only,
            compare,
            rounds,
        } => {
            let only = [
                (cost_only, "--cost-only"),
                (throughput_only, "--throughput-only"),
                (latency_only, "--latency-only"),
                (scale_only, "--scale-only"),
                (cluster_only, "--cluster-only"),
                (ipc_only, "--ipc-only"),
            ]
            .into_iter()
            .find_map(|(on, flag)| on.then_some(flag));
            bench(&workspace, only, compare.as_deref(), rounds)
        }
        Task::Image => image::build(&workspace).map(|_| ()),
        Task::CheckDeploy => match deploy::check(&workspace)? {
            (_, 0) => Ok(()),
            (_, problems) => anyhow::bail!("deploy/: {problems} problems"),
        },
        Task::Test { filter } => {
            packages::ensure(packages::LAB)?;
            packages::ensure(packages::TEST)?;
            packages::ensure_installed(packages::CONTAINERD)?;
            let observer = build_observer(&workspace)?;
            let images = test::Images {
                lab: lab_image::build(&workspace)?,
                observer: image::package(&observer, &workspace.join("target/image-test"))?,
            };
            test::run_all(&workspace, &observer, &images, filter.as_deref())
        }
    }
}

pub(crate) fn setup(workspace: &Path) -> Result<()> {
    match toolchain::setup(workspace)? {
        toolchain::Outcome::AlreadySetUp => {
            eprintln!("setup: the eBPF toolchain is already set up; nothing to do")
        }
        toolchain::Outcome::Installed(steps) => {
            for step in steps {
                eprintln!("setup: {step}");
            }
        }
    }
    Ok(())
}

/// Builds the observer (debug) and returns the binary's path.
fn build_observer(workspace: &Path) -> Result<PathBuf> {
    setup(workspace)?;
    run(cargo(workspace).args(["build", "--package", "observer"]))?;
    Ok(workspace.join("target/debug/observer"))
}

/// `only`: the bench binary's flag for one part (`--cost-only`, ...).
fn bench(
    workspace: &Path,
    only: Option<&str>,
    compare: Option<&str>,
    rounds: Option<u32>,
) -> Result<()> {
    packages::ensure(packages::LAB)?;
    packages::ensure(packages::BENCH)?;
    setup(workspace)?;
    // The other observer first: a failing build of it stops before anything
    // is measured.
    let compared = compare
        .map(|reference| compare::build(workspace, reference))
        .transpose()?;
    // Release builds: the figures are about what users run.
    run(cargo(workspace).args(["build", "--release", "--package", "observer"]))?;
    let mut command = cargo(workspace);
    command.args([
        "build",
        "--release",
        "--package",
        "integration-test",
        "--bin",
        "bench",
    ]);
    run(&mut command)?;
    let observer = workspace.join("target/release/observer");
    let mut bench = as_root(&workspace.join("target/release/bench"));
    bench.env("OBSERVER_BIN", observer);
    if let Some((name, binary)) = compared {
        bench.env("OBSERVER_COMPARE_BIN", binary);
        bench.env("OBSERVER_COMPARE_NAME", name);
    }
    if let Some(rounds) = rounds {
        bench.env("OBSERVER_BENCH_ROUNDS", rounds.to_string());
    }
    bench.args(only);
    for stale in ::lab::cleanup_stale() {
        eprintln!("bench: removed {stale} of a killed run");
    }
    run(&mut bench)
}

fn run_observer(workspace: &Path, lab: Option<::lab::Runtime>, args: &[String]) -> Result<()> {
    let observer = build_observer(workspace)?;
    let mut command = as_root(&observer);
    command.arg("run");
    if let Some(runtime) = lab {
        let inventory = lab::up(workspace, None, runtime)?;
        // The lab's pipes pod shows only with named pipes followed.
        command
            .arg("--inventory")
            .arg(inventory)
            .arg("--named-pipes");
        eprintln!(
            "run: live view: {} flows   (`cargo xtask lab down` removes the lab)",
            observer.display()
        );
    }
    command.args(args);
    eprintln!("run: {command:?} (Ctrl-C stops it and detaches everything)");
    run(&mut command)
}

pub fn cargo(workspace: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace);
    command
}

/// `program`, through sudo unless we are root already.
fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.arg("-E").arg(program);
        command
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
