//! `cargo xtask bench`: what the observer costs, measured side by side in
//! one run (these machines are noisy), on topologies of its own namespaces.
//!
//! 1. Per-packet cost ([`cost`]): the kernel's BPF run-time statistics of
//!    the observer's programs and of a no-op classifier on the same hooks.
//! 2. Throughput ([`throughput`]): iperf3 TCP and 64-byte UDP over `lo` and
//!    over a veth pair, in two copies of the topology at once, one watched
//!    (by nothing, by a no-op program, by each observer) and one not.
//! 3. Scale ([`scale`]): 250 pods (attach time) and 1 M flows (collection
//!    time, the observer's resident memory, the kernel maps' memory).
//! 4. Attach latency ([`latency`]): from a new pod's namespace appearing
//!    (local mode), or from the API reporting a pod whose processes run
//!    (Kubernetes mode), to its programs attached.
//! 5. Cluster scale ([`cluster`]): Kubernetes mode with 50,000 pods in the
//!    API: memory, readiness, reconciliation time.
//! 6. In-pod IPC ([`ipc`]): what following unix sockets and named pipes
//!    costs per call, in a pod and outside any.
//!
//! With `OBSERVER_COMPARE_BIN` (`cargo xtask bench --compare REF`), every
//! section measures that observer too, in the same run, alternating.
//!
//! Prints a Markdown report and writes it to `target/bench.md`.

mod cluster;
mod cost;
mod floor;
mod ipc;
mod iperf;
mod latency;
mod process;
mod scale;
mod throughput;

use std::{fmt::Write as _, fs, path::PathBuf, thread};

/// An observer binary under measure.
pub struct Subject {
    /// How the report names it.
    pub name: String,
    pub binary: PathBuf,
}

/// This tree's observer, then (with `--compare`) the other one.
fn subjects() -> Vec<Subject> {
    let mut subjects = vec![Subject {
        name: "this tree".into(),
        binary: integration_test::observer::binary(),
    }];
    if let Some(binary) = std::env::var_os("OBSERVER_COMPARE_BIN") {
        let name = std::env::var("OBSERVER_COMPARE_NAME").unwrap_or_else(|_| "compared".into());
        subjects.push(Subject {
            name,
            binary: binary.into(),
        });
    }
    subjects
}

fn main() {
    let subjects = subjects();
    let mut report = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
    // Each TCX attach and detach waits for an RCU grace period: the
    // kernel's setting decides what start-up and exit with TCX links take.
    let grace_periods = match observer::kernel::tc::grace_periods_expedited() {
        Some(true) => "expedited",
        Some(false) => "normal",
        None => "unknown",
    };
    writeln!(
        report,
        "Kernel {}, {cpus} CPUs, RCU grace periods {grace_periods} (`/sys/kernel/rcu_expedited`, `rcu_normal`); observers measured: {}.\n",
        kernel.trim(),
        names.join(", ")
    )
    .unwrap();

    if std::env::args().any(|a| a == "--cost-only") {
        cost::report(&mut report, &subjects);
    } else if std::env::args().any(|a| a == "--throughput-only") {
        throughput::run(&mut report, &subjects);
    } else if std::env::args().any(|a| a == "--latency-only") {
        latency::run(&mut report, &subjects);
    } else if std::env::args().any(|a| a == "--cluster-only") {
        cluster::run(&mut report, &subjects);
        ipc::run(&mut report, &subjects);
    } else if std::env::args().any(|a| a == "--scale-only") {
        scale::run(&mut report, &subjects);
    } else if std::env::args().any(|a| a == "--ipc-only") {
        ipc::run(&mut report, &subjects);
    } else {
        cost::report(&mut report, &subjects);
        throughput::run(&mut report, &subjects);
        scale::run(&mut report, &subjects);
        latency::run(&mut report, &subjects);
        cluster::run(&mut report, &subjects);
        ipc::run(&mut report, &subjects);
    }

    println!("{report}");
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench.md");
    fs::write(out, &report).expect("write target/bench.md");
    eprintln!("bench: written to target/bench.md");
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// `min–max` of the values.
fn spread(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}
