//! Per-packet cost: the kernel's BPF run-time statistics (run time and run
//! count per program) of the observer's programs, next to a no-op
//! classifier that the observer attaches on the same hooks
//! (`--attach-noop`), in the same run, on the same packets.

use std::{collections::BTreeMap, fmt::Write as _};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use integration_test::Observer;
use lab::Netns;

use crate::{
    Subject,
    iperf::{self, CASES, Server},
    median, spread,
};

/// Rounds of `--cost-only`, alternating between the observers.
const QUICK_ROUNDS: usize = 5;
const QUICK_SECONDS: u32 = 2;

/// The programs whose cost is reported, with what they do.
const PROGRAMS: [(&str, &str); 2] = [
    ("observe_egress", "tc, lo and eth0 egress (per packet)"),
    ("observe_ingress", "tc, eth0 ingress (per packet)"),
];

/// Run time (ns) and run count per program name, summed over instances.
#[derive(Default, Clone)]
pub struct ProgramCost(BTreeMap<String, (u64, u64)>);

impl ProgramCost {
    fn read() -> Self {
        let mut cost = Self::default();
        for program in loaded_programs().filter_map(Result::ok) {
            let Some(name) = program.name_as_str() else {
                continue;
            };
            let slot = cost.0.entry(name.to_owned()).or_default();
            slot.0 += program.run_time().as_nanos() as u64;
            slot.1 += program.run_count();
        }
        cost
    }

    /// ns per run of the programs named, together.
    pub fn per_run(&self, names: &[&str]) -> f64 {
        let (ns, runs) = names
            .iter()
            .filter_map(|n| self.0.get(*n))
            .fold((0, 0), |(ns, runs), (a, b)| (ns + a, runs + b));
        ns as f64 / runs.max(1) as f64
    }

    pub fn runs(&self, names: &[&str]) -> u64 {
        names
            .iter()
            .filter_map(|n| self.0.get(*n))
            .map(|(_, r)| r)
            .sum()
    }

    /// The observer's per-packet programs against the no-op.
    pub fn ratio(&self) -> f64 {
        self.per_run(&["observe_egress", "observe_ingress"]) / self.per_run(&["noop"])
    }
}

/// Runs `traffic` with `subject` (`args`) and the no-op baseline on the
/// same hooks, with the kernel's run-time statistics on (only meanwhile).
pub fn measure<T>(
    subject: &Subject,
    args: &[&str],
    traffic: impl FnOnce() -> T,
) -> (ProgramCost, T) {
    let _stats = enable_stats(Stats::RunTime).expect("enable BPF run-time statistics (root?)");
    let mut args = args.to_vec();
    args.push("--attach-noop");
    let observer = Observer::start_binary(&subject.binary, &args);
    let result = traffic();
    let cost = ProgramCost::read();
    assert!(observer.terminate().success());
    (cost, result)
}

/// A quick reading of the per-packet cost alone (for working on the
/// programs): 64-byte UDP on lo, observers and no-op side by side, in
/// alternating rounds.
pub fn quick(report: &mut String, subjects: &[Subject]) {
    let a = Netns::create("cost").expect("namespace");
    let _server = Server::start(&a, "127.0.0.1", 5201);
    let path = a.path().display().to_string();
    let mut rounds: Vec<Vec<(ProgramCost, f64)>> = vec![Vec::new(); subjects.len()];
    for round in 0..QUICK_ROUNDS {
        for (i, subject) in subjects.iter().enumerate() {
            let (cost, pps) = measure(subject, &["--netns", &path], || {
                iperf::run(&a, &CASES[1], QUICK_SECONDS)
            });
            eprintln!(
                "bench: round {} {:<12} {:.2}x",
                round + 1,
                subject.name,
                cost.ratio()
            );
            rounds[i].push((cost, pps));
        }
    }
    writeln!(
        report,
        "## Per-packet cost, lo UDP 64 B ({QUICK_ROUNDS} alternating rounds of {QUICK_SECONDS} s; medians)\n"
    )
    .unwrap();
    table(report, subjects, &rounds);
}

/// The cost table: per observer, the no-op's and the programs' ns per run,
/// and their ratio (median, and its spread over the rounds).
pub fn table(report: &mut String, subjects: &[Subject], rounds: &[Vec<(ProgramCost, f64)>]) {
    writeln!(
        report,
        "| observer | program | runs | ns per run | vs. no-op (spread) |\n|---|---|---|---|---|"
    )
    .unwrap();
    for (subject, rounds) in subjects.iter().zip(rounds) {
        let noop: Vec<f64> = rounds.iter().map(|(c, _)| c.per_run(&["noop"])).collect();
        let runs = |names: &[&str]| rounds.iter().map(|(c, _)| c.runs(names)).sum::<u64>();
        writeln!(
            report,
            "| {} | no-op classifier (baseline) | {} | {:.1} | 1.00x |",
            subject.name,
            runs(&["noop"]),
            median(&noop)
        )
        .unwrap();
        for (program, what) in PROGRAMS {
            if runs(&[program]) == 0 {
                continue;
            }
            let ns: Vec<f64> = rounds.iter().map(|(c, _)| c.per_run(&[program])).collect();
            let ratios: Vec<f64> = rounds
                .iter()
                .map(|(c, _)| c.per_run(&[program]) / c.per_run(&["noop"]))
                .collect();
            writeln!(
                report,
                "| {} | `{program}`: {what} | {} | {:.1} | {:.2}x ({}) |",
                subject.name,
                runs(&[program]),
                median(&ns),
                median(&ratios),
                spread(&ratios, 2)
            )
            .unwrap();
        }
        let ratios: Vec<f64> = rounds.iter().map(|(c, _)| c.ratio()).collect();
        writeln!(
            report,
            "| {} | **all per-packet programs** | {} | {:.1} | **{:.2}x** ({}) |",
            subject.name,
            runs(&["observe_egress", "observe_ingress"]),
            median(
                &rounds
                    .iter()
                    .map(|(c, _)| c.per_run(&["observe_egress", "observe_ingress"]))
                    .collect::<Vec<_>>()
            ),
            median(&ratios),
            spread(&ratios, 2)
        )
        .unwrap();
    }
    writeln!(report).unwrap();
}
