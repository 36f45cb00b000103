//! Per-program cost: the kernel's BPF run-time statistics (run time and
//! run count per program) of the observer's programs, next to a no-op
//! classifier that the observer attaches on the same tc hooks
//! (`--attach-noop`), in the same run, on the same packets.
//!
//! The traffic runs between containers of a small node lab (two pods on one
//! node, a bridge between them), so that every program runs where it runs
//! for users: the tc programs on each pod's `lo` and `eth0`, and the socket
//! hooks on the pods' cgroups. One case at a time, each observer in turn,
//! round after round.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, process::Command};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use integration_test::{
    Observer,
    container::{container, in_container},
};
use lab::{Lab, Plan};

use crate::{Subject, median, spread};

/// The per-packet programs (a pod's own: their time includes the shared
/// programs they tail-call).
const TC: [&str; 2] = ["observe_egress", "observe_ingress"];

/// Every program reported, with what it does. The IPC tracepoints run at
/// every socket message of the node, TCP and UDP included, and leave at
/// once where the socket is no pod's unix socket: that is their cost here.
const PROGRAMS: [(&str, &str); 10] = [
    ("observe_egress", "tc, lo and eth0 egress (per packet)"),
    ("observe_ingress", "tc, eth0 ingress (per packet)"),
    ("socket_bind4", "socket hook, bind()"),
    ("policy_connect4", "socket hook, connect()"),
    (
        "policy_sendmsg4",
        "socket hook, UDP sendmsg() with an address",
    ),
    ("socket_bind6", "socket hook, bind() (IPv6 socket)"),
    ("policy_connect6", "socket hook, connect() (IPv6 socket)"),
    ("policy_sendmsg6", "socket hook, sendmsg() (IPv6 socket)"),
    (
        "unix_sent",
        "tracepoint, every socket's sendmsg() (unix sockets)",
    ),
    (
        "unix_received",
        "tracepoint, every socket's recvmsg() (unix sockets)",
    ),
];

/// Two pods on one node: `a` runs the clients and a server on its `lo`,
/// `b` a server on its address. Servers live an hour at most.
const LAB: &str = "
apiVersion: observer-lab/v1
kind: Lab
name: cost
network:
  serviceCIDR: 10.96.0.0/16
  nodeCIDR: 172.18.0.0/24
  externalCIDR: 192.168.200.0/24
nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24}
pods:
  - name: a
    namespace: bench
    node: node-1
    ip: 10.244.1.10
    containers:
      - {name: client, command: [sleep, '3600']}
      - {name: lo-server, command: [timeout, '3600', iperf3, -s, -B, 127.0.0.1, -p, '5201']}
  - name: b
    namespace: bench
    node: node-1
    ip: 10.244.1.11
    containers:
      - {name: server, command: [timeout, '3600', iperf3, -s, -p, '5202']}
      - name: acceptor
        command:
          - timeout
          - '3600'
          - python3
          - -c
          - |
            import socket
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(('0.0.0.0', 5300))
            s.listen(4096)
            while True:
                s.accept()[0].close()
";

/// One kind of traffic, from `a`'s client container.
struct Case {
    name: &'static str,
    command: fn(seconds: u32) -> Vec<String>,
}

const CASES: [Case; 6] = [
    Case {
        name: "lo, TCP",
        command: |s| iperf("127.0.0.1", 5201, false, s),
    },
    Case {
        name: "lo, UDP 64 B",
        command: |s| iperf("127.0.0.1", 5201, true, s),
    },
    Case {
        name: "pod to pod (veth), TCP",
        command: |s| iperf("10.244.1.11", 5202, false, s),
    },
    Case {
        name: "pod to pod (veth), UDP 64 B",
        command: |s| iperf("10.244.1.11", 5202, true, s),
    },
    Case {
        name: "UDP sendto() to many ports (DNS-like clients)",
        command: |s| {
            python(&format!(
                "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             end = time.time() + {s}\n\
             n = 0\n\
             while time.time() < end and n < 2000000:\n\
             \x20   s.sendto(b'x' * 32, ('10.244.1.11', 20000 + n % 1000)); n += 1\n"
            ))
        },
    },
    Case {
        name: "TCP connect() (short connections)",
        command: |s| {
            python(&format!(
                "import socket, time\n\
             end = time.time() + {s}\n\
             n = 0\n\
             while time.time() < end and n < 100000:\n\
             \x20   c = socket.socket(); c.connect(('10.244.1.11', 5300)); c.close(); n += 1\n"
            ))
        },
    },
];

fn iperf(server: &str, port: u16, udp: bool, seconds: u32) -> Vec<String> {
    let mut args: Vec<String> = ["iperf3", "-c", server, "-p", &port.to_string()]
        .map(String::from)
        .into();
    args.extend(["-t".into(), seconds.to_string()]);
    if udp {
        args.extend(["-u", "-b", "0", "-l", "64"].map(String::from));
    }
    args
}

fn python(script: &str) -> Vec<String> {
    vec!["python3".into(), "-c".into(), script.into()]
}

/// Run time (ns) and run count per program name, summed over instances.
#[derive(Default, Clone)]
pub struct ProgramCost(BTreeMap<String, (u64, u64)>);

impl ProgramCost {
    pub fn read() -> Self {
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

    /// What ran between `before` and `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(name, (ns, runs))| {
                    let (ns0, runs0) = before.0.get(name).copied().unwrap_or_default();
                    (name.clone(), (ns - ns0, runs - runs0))
                })
                .collect(),
        )
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

    /// The per-packet programs against the no-op on the same hooks.
    pub fn ratio(&self) -> f64 {
        self.per_run(&TC) / self.per_run(&["noop"])
    }
}

/// Every case, `rounds` times, each observer in turn: what each program
/// cost, per case.
fn run(report: &mut String, subjects: &[Subject], rounds: usize, seconds: u32) {
    let plan = Plan::from_yaml(LAB, "cost lab").expect("the cost lab");
    let lab = Lab::up_for_test(&plan).expect("lab up");
    let inventory = lab.inventory_path().display().to_string();
    let client = container(&lab, "bench", "a", "client");
    // [subject][case] = one reading per round.
    let mut readings = vec![vec![Vec::new(); CASES.len()]; subjects.len()];
    let _stats = enable_stats(Stats::RunTime).expect("enable BPF run-time statistics (root?)");
    for round in 0..rounds {
        for (s, subject) in subjects.iter().enumerate() {
            let observer = Observer::start_binary(
                &subject.binary,
                &["--inventory", &inventory, "--attach-noop"],
            );
            for (c, case) in CASES.iter().enumerate() {
                let before = ProgramCost::read();
                drive(&client, (case.command)(seconds));
                let cost = ProgramCost::read().since(&before);
                eprintln!(
                    "bench: round {} {:<12} {:<48} {:.2}x",
                    round + 1,
                    subject.name,
                    case.name,
                    cost.ratio()
                );
                readings[s][c].push(cost);
            }
            assert!(observer.terminate().success());
        }
    }
    drop(lab);
    table(report, subjects, &readings);
}

/// Runs a command in the client container to its end.
fn drive(client: &(PathBuf, PathBuf), args: Vec<String>) {
    let (cgroup, netns) = client;
    let status = in_container(cgroup, netns, Command::new(&args[0]).args(&args[1..]))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("the client");
    assert!(status.success(), "{}: {status}", args.join(" "));
}

/// Per case and observer: the no-op's ns per run on the tc hooks, the tc
/// programs', their ratio (median and spread over the rounds), then every
/// program that ran, with its ns per run.
fn table(report: &mut String, subjects: &[Subject], readings: &[Vec<Vec<ProgramCost>>]) {
    writeln!(
        report,
        "| traffic | observer | no-op, ns per run | tc programs, ns per run | vs. no-op (spread) | per program: ns per run (runs) |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (c, case) in CASES.iter().enumerate() {
        for (subject, cases) in subjects.iter().zip(readings) {
            let rounds = &cases[c];
            let noop: Vec<f64> = rounds.iter().map(|r| r.per_run(&["noop"])).collect();
            let tc: Vec<f64> = rounds.iter().map(|r| r.per_run(&TC)).collect();
            let ratios: Vec<f64> = rounds.iter().map(ProgramCost::ratio).collect();
            let programs: Vec<String> = PROGRAMS
                .iter()
                .filter_map(|(program, _)| {
                    let runs: u64 = rounds.iter().map(|r| r.runs(&[program])).sum();
                    (runs > 0).then(|| {
                        let ns: Vec<f64> = rounds.iter().map(|r| r.per_run(&[program])).collect();
                        format!("`{program}` {:.1} ({runs})", median(&ns))
                    })
                })
                .collect();
            writeln!(
                report,
                "| {} | {} | {:.1} | {:.1} | {:.2}x ({}) | {} |",
                case.name,
                subject.name,
                median(&noop),
                median(&tc),
                median(&ratios),
                spread(&ratios, 2),
                programs.join(", ")
            )
            .unwrap();
        }
    }
    // All cases together: the traffic mix.
    for (subject, cases) in subjects.iter().zip(readings) {
        let rounds = cases[0].len();
        let ratios: Vec<f64> = (0..rounds)
            .map(|r| {
                let (mut tc, mut noop) = ((0.0, 0u64), (0.0, 0u64));
                for case in cases {
                    let reading = &case[r];
                    tc.0 += reading.per_run(&TC) * reading.runs(&TC) as f64;
                    tc.1 += reading.runs(&TC);
                    noop.0 += reading.per_run(&["noop"]) * reading.runs(&["noop"]) as f64;
                    noop.1 += reading.runs(&["noop"]);
                }
                (tc.0 / tc.1.max(1) as f64) / (noop.0 / noop.1.max(1) as f64)
            })
            .collect();
        writeln!(
            report,
            "| **the whole mix** | {} | | | **{:.2}x** ({}) | |",
            subject.name,
            median(&ratios),
            spread(&ratios, 2)
        )
        .unwrap();
    }
    writeln!(report, "\nWhat each program does:\n").unwrap();
    for (program, what) in PROGRAMS {
        writeln!(report, "- `{program}`: {what}").unwrap();
    }
    writeln!(report).unwrap();
}

/// The per-program section of the report (all of `--cost-only`). In the
/// whole benchmark it runs first, on a lab of its own that is gone before
/// the throughput's namespaces are made: the no-op baseline and the
/// statistics' clock reads would otherwise weigh on those figures.
pub fn report(report: &mut String, subjects: &[Subject]) {
    writeln!(
        report,
        "## Per-program cost (kernel BPF run-time statistics; {ROUNDS} rounds of {SECONDS} s per case, medians)\n"
    )
    .unwrap();
    writeln!(
        report,
        "The tc programs and the no-op run on the same hooks, on the same packets, in the same run; the socket hooks have no no-op to compare with.\n"
    )
    .unwrap();
    run(report, subjects, ROUNDS, SECONDS);
}

const ROUNDS: usize = 3;
const SECONDS: u32 = 2;
