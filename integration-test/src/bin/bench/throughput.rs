//! Throughput without and with the observer(s), in alternating rounds, and
//! the per-program cost on the whole traffic mix (cost.rs).

use std::fmt::Write as _;

use integration_test::Observer;
use lab::{Netns, veth};

use crate::{
    Subject, cost,
    iperf::{self, CASES, Server},
    median, spread,
};

// The iperf3 client and server are pinned to different CPUs (iperf.rs).

/// Many short rounds, alternating: this VM's noise is slow, and a round
/// with and one without sit close together.
const ROUNDS: usize = 7;
const SECONDS: u32 = 2;
const COST_ROUNDS: usize = 3;
const COST_SECONDS: u32 = 2;

pub fn run(report: &mut String, subjects: &[Subject]) {
    // Cost first, on its own (on a lab of its own, gone before the
    // namespaces below are made): the no-op baseline and the statistics' clock
    // reads would otherwise weigh on the throughput figures.
    writeln!(
        report,
        "## Per-program cost (kernel BPF run-time statistics; {COST_ROUNDS} rounds of {COST_SECONDS} s per case, medians)\n"
    )
    .unwrap();
    writeln!(
        report,
        "The tc programs and the no-op run on the same hooks, on the same packets, in the same run; the socket hooks have no no-op to compare with.\n"
    )
    .unwrap();
    cost::run(report, subjects, COST_ROUNDS, COST_SECONDS);

    let a = Netns::create("bench-a").expect("namespace");
    let b = Netns::create("bench-b").expect("namespace");
    veth((&a, "eth0", "10.77.0.1/24"), (&b, "eth0", "10.77.0.2/24")).expect("veth");
    let _servers = [
        Server::start(&a, "127.0.0.1", 5201),
        Server::start(&b, "10.77.0.2", 5202),
    ];
    let netns_args = [
        "--netns".to_owned(),
        a.path().display().to_string(),
        "--netns".to_owned(),
        b.path().display().to_string(),
    ];
    let args: Vec<&str> = netns_args.iter().map(String::as_str).collect();

    // results[case][mode] = one value per round; mode 0 without, then each
    // observer.
    let modes: Vec<Option<&Subject>> = std::iter::once(None)
        .chain(subjects.iter().map(Some))
        .collect();
    let mut results = vec![vec![Vec::new(); modes.len()]; CASES.len()];
    for round in 0..ROUNDS {
        for (mode, subject) in modes.iter().enumerate() {
            let observer = subject.map(|s| Observer::start_binary(&s.binary, &args));
            for (i, case) in CASES.iter().enumerate() {
                let value = iperf::run(&a, case, SECONDS);
                eprintln!(
                    "bench: round {} {:<15} {:<12} {value:.2}",
                    round + 1,
                    case.name,
                    subject.map_or("none", |s| s.name.as_str())
                );
                results[i][mode].push(value);
            }
            if let Some(observer) = observer {
                assert!(observer.terminate().success());
            }
        }
    }

    writeln!(
        report,
        "## Throughput, without and with the observer (medians of {ROUNDS}; spread min–max)\n"
    )
    .unwrap();
    writeln!(
        report,
        "| traffic | unit | observer | without | with | change |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (case, values) in CASES.iter().zip(&results) {
        let without = median(&values[0]);
        let unit = if case.udp { "k packets/s" } else { "Gbit/s" };
        for (subject, with) in subjects.iter().zip(&values[1..]) {
            writeln!(
                report,
                "| {} | {unit} | {} | {without:.2} ({}) | {:.2} ({}) | {:+.1} % |",
                case.name,
                subject.name,
                spread(&values[0], 2),
                median(with),
                spread(with, 2),
                (median(with) / without - 1.0) * 100.0
            )
            .unwrap();
        }
    }
    writeln!(report).unwrap();
}
