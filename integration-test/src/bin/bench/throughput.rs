//! Throughput with and without the observer(s).
//!
//! This VM's speed moves by half within seconds (other tenants on the same
//! cores: the CPU time a packet takes moves with it, so counting CPU time
//! does not help either), so rounds of one setting after another differ by
//! more than the 2 to 5 % to be measured. Each round therefore runs two
//! identical flows at the same time, in two copies of the same topology:
//! one the observer watches, one it does not. Their clients share one CPU
//! and their servers the other, the scheduler gives each the same CPU
//! time, and the ratio of their rates is the ratio of what a packet costs
//! on each path, whatever the machine's speed that moment. Rounds with no
//! observer at all measure the ratio of the two copies themselves; the
//! change is the observed ratio against that one. Rounds with a no-op
//! program on the watched copy's hooks (floor.rs) give the floor: what any
//! program there costs; rounds with a program that only counts, what any
//! program that counts costs.

use std::{fmt::Write as _, thread};

use integration_test::Observer;
use lab::{Netns, veth};

use crate::{
    Subject,
    floor::Floor,
    iperf::{self, CASES, Server},
    median, spread,
};

/// Short rounds; in each, nothing watching, the floors, then each
/// observer. `OBSERVER_BENCH_ROUNDS` (`cargo xtask bench --rounds`) asks
/// for more.
const ROUNDS: usize = 7;
const SECONDS: u32 = 2;

/// One copy of the topology: a client namespace (which also serves on
/// `lo`) and a server namespace behind a veth pair. Both copies have the
/// same names inside, so that their paths are the same.
struct Copy {
    // Declared first: dropped (killed) before their namespaces go.
    _servers: [Server; 2],
    client: Netns,
    server: Netns,
}

impl Copy {
    fn create(name: &str) -> Self {
        let client = Netns::create(&format!("bench-{name}-client")).expect("namespace");
        let server = Netns::create(&format!("bench-{name}-server")).expect("namespace");
        veth(
            (&client, "eth0", "10.77.0.1/24"),
            (&server, "eth0", "10.77.0.2/24"),
        )
        .expect("veth");
        let servers = [
            Server::start(&client, "127.0.0.1", 5201),
            Server::start(&server, "10.77.0.2", 5202),
        ];
        Self {
            _servers: servers,
            client,
            server,
        }
    }
}

/// Rates of the two copies' flows in each round.
#[derive(Default, Clone)]
struct Rounds {
    watched: Vec<f64>,
    unwatched: Vec<f64>,
}

impl Rounds {
    /// The watched flow's rate over the unwatched one's, per round.
    fn ratios(&self) -> Vec<f64> {
        self.watched
            .iter()
            .zip(&self.unwatched)
            .map(|(w, u)| w / u)
            .collect()
    }
}

/// What watches the watched copy in a round.
enum Watcher<'a> {
    /// The baseline: each round's ratio with nothing watching is what the
    /// others are compared with.
    Nothing,
    /// A program that does nothing, on the observer's hooks: the floor.
    Noop,
    /// A program that only counts packets and bytes (one per-CPU slot):
    /// the floor of any program that counts.
    Counter,
    Observer(&'a Subject),
}

impl Watcher<'_> {
    fn name(&self) -> &str {
        match self {
            Self::Nothing => "nothing",
            Self::Noop => "no-op program",
            Self::Counter => "counter only",
            Self::Observer(subject) => &subject.name,
        }
    }
}

pub fn run(report: &mut String, subjects: &[Subject]) {
    let watched = Copy::create("w");
    let unwatched = Copy::create("u");
    let netns_args = [
        "--netns".to_owned(),
        watched.client.path().display().to_string(),
        "--netns".to_owned(),
        watched.server.path().display().to_string(),
    ];
    let args: Vec<&str> = netns_args.iter().map(String::as_str).collect();

    let noop = Floor::noop().expect("load a no-op tc program");
    let counter = Floor::counter().expect("load a counting tc program");
    let watchers: Vec<Watcher> = [Watcher::Nothing, Watcher::Noop, Watcher::Counter]
        .into_iter()
        .chain(subjects.iter().map(Watcher::Observer))
        .collect();
    // results[case][watcher]
    let mut results = vec![vec![Rounds::default(); watchers.len()]; CASES.len()];
    let rounds = std::env::var("OBSERVER_BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        for (mode, watcher) in watchers.iter().enumerate() {
            let (observer, links) = match watcher {
                Watcher::Nothing => (None, Vec::new()),
                Watcher::Noop | Watcher::Counter => {
                    let floor = if matches!(watcher, Watcher::Noop) {
                        &noop
                    } else {
                        &counter
                    };
                    let mut links = floor.attach(&watched.client).expect("attach a floor");
                    links.extend(floor.attach(&watched.server).expect("attach a floor"));
                    (None, links)
                }
                Watcher::Observer(subject) => (
                    Some(Observer::start_binary(&subject.binary, &args)),
                    Vec::new(),
                ),
            };
            for (i, case) in CASES.iter().enumerate() {
                let (w, u) = thread::scope(|s| {
                    let w = s.spawn(|| iperf::run(&watched.client, case, SECONDS));
                    let u = iperf::run(&unwatched.client, case, SECONDS);
                    (w.join().expect("iperf3 thread"), u)
                });
                eprintln!(
                    "bench: round {} {:<15} {:<12} {:.2} beside {:.2} ({:.3})",
                    round + 1,
                    case.name,
                    watcher.name(),
                    w,
                    u,
                    w / u
                );
                results[i][mode].watched.push(w);
                results[i][mode].unwatched.push(u);
            }
            if let Some(observer) = observer {
                assert!(observer.terminate().success());
            }
            drop(links);
        }
    }

    writeln!(
        report,
        "## Throughput, with and without the observer ({rounds} rounds of {SECONDS} s; medians, spread min–max)\n"
    )
    .unwrap();
    writeln!(
        report,
        "Two copies of the topology, the same flow in each at the same time, one copy watched (by nothing in the first row of each traffic, by a program that does nothing in the second: the floor, by one that only counts packets and bytes in a per-CPU slot in the third: the floor of any counting program): the watched flow's rate over the other's, round by round, cancels the machine's changing speed. The change is that ratio against the ratio with nothing watching.\n"
    )
    .unwrap();
    writeln!(
        report,
        "| traffic | unit | watched by | watched copy | other copy | ratio | change |\n|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for (case, by_mode) in CASES.iter().zip(&results) {
        let unit = if case.udp { "k packets/s" } else { "Gbit/s" };
        let baseline = watchers
            .iter()
            .zip(by_mode)
            .find(|(w, _)| matches!(w, Watcher::Nothing))
            .map(|(_, rounds)| median(&rounds.ratios()))
            .expect("a baseline");
        for (watcher, rounds) in watchers.iter().zip(by_mode) {
            let ratios = rounds.ratios();
            let change = match watcher {
                Watcher::Nothing => String::new(),
                _ => format!("{:+.1} %", (median(&ratios) / baseline - 1.0) * 100.0),
            };
            let name = watcher.name();
            writeln!(
                report,
                "| {} | {unit} | {name} | {:.2} ({}) | {:.2} ({}) | {:.3} ({}) | {change} |",
                case.name,
                median(&rounds.watched),
                spread(&rounds.watched, 2),
                median(&rounds.unwatched),
                spread(&rounds.unwatched, 2),
                median(&ratios),
                spread(&ratios, 3),
            )
            .unwrap();
        }
    }
    writeln!(report).unwrap();
}
