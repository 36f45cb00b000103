//! What following unix sockets and named pipes costs, per call: a unix
//! stream ping-pong and 64-byte writes through a named pipe, in a pod of a
//! small node lab (attached, so its calls are counted) and in a namespace
//! of no pod (so its calls stop at the early filter), and system calls
//! that are neither (with `--named-pipes`, every system call runs the
//! `sys_exit` program); and unix `connect()`s, which a policy with unix
//! rules decides (the observers here run with one). Without this tree's
//! observer, with it, and with it following named pipes, alternating round
//! by round; the kernel's BPF run-time statistics give each IPC program's
//! own time per run.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use aya::sys::{Stats, enable_stats};
use integration_test::{
    Observer,
    container::{container, in_container},
};
use lab::{Lab, Plan};

use crate::{Subject, cost::ProgramCost, median, spread};

/// The IPC programs, with what they do.
const PROGRAMS: [(&str, &str); 4] = [
    (
        "unix_sent",
        "raw tracepoint `sock_send_length`: after every socket `sendmsg()`",
    ),
    (
        "unix_received",
        "raw tracepoint `sock_recv_length`: after every socket `recvmsg()`",
    ),
    (
        "fifo_called",
        "raw tracepoint `sys_exit`: after every system call",
    ),
    (
        "unix_connect",
        "cgroup `connect_unix`: every unix `connect()` of a pod's process (the unix-socket policy)",
    ),
];

/// The bench pod's unix rules: its client may reach the bench's sockets.
const POLICY: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: bench-sockets}
spec:
  podSelector: {namespace: bench}
  mode: enforce
  rules:
    - {name: bench, class: unix, clientContainers: [client], paths: [CONNECT_PATH], action: allow}
    - {name: rest, class: unix, action: deny}
";

const ROUNDS: usize = 5;
/// Calls per case and round: bounded, a second or two each.
const CALLS: u32 = 40_000;

const LAB: &str = "
apiVersion: observer-lab/v1
kind: Lab
name: ipc-cost
network:
  serviceCIDR: 10.96.0.0/16
  nodeCIDR: 172.18.0.0/24
  externalCIDR: 192.168.200.0/24
nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24}
pods:
  - name: p
    namespace: bench
    node: node-1
    containers:
      - {name: client, command: [sleep, '3600']}
";

/// A unix stream ping-pong of 64-byte messages, the server a child process:
/// microseconds per round trip (two sends, two receives).
const PING_PONG: &str = r#"
import os, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(1)
pid = os.fork()
if pid == 0:
    c, _ = s.accept()
    for i in range(n):
        c.recv(64)
        c.sendall(b"y" * 64)
    os._exit(0)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(path)
start = time.perf_counter()
for i in range(n):
    c.sendall(b"x" * 64)
    c.recv(64)
print((time.perf_counter() - start) / n * 1e6)
os.waitpid(pid, 0)
os.unlink(path)
"#;

/// 64-byte writes through a named pipe to a reading child: microseconds
/// per write.
const PIPE: &str = r#"
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
if os.path.exists(path):
    os.unlink(path)
os.mkfifo(path)
pid = os.fork()
if pid == 0:
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, 65536):
        pass
    os._exit(0)
fd = os.open(path, os.O_WRONLY)
data = b"w" * 64
start = time.perf_counter()
for i in range(n):
    os.write(fd, data)
print((time.perf_counter() - start) / n * 1e6)
os.close(fd)
os.waitpid(pid, 0)
os.unlink(path)
"#;

/// Unix stream connections to a listening child, closed at once:
/// microseconds per `connect()` and `close()`.
const CONNECTS: &str = r#"
import os, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2]) // 10
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(128)
pid = os.fork()
if pid == 0:
    for i in range(n):
        s.accept()[0].close()
    os._exit(0)
start = time.perf_counter()
for i in range(n):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.close()
print((time.perf_counter() - start) / n * 1e6)
os.waitpid(pid, 0)
os.unlink(path)
"#;

/// System calls that are no IPC (`getppid`): microseconds per call.
const SYSCALLS: &str = r#"
import os, sys, time
n = int(sys.argv[2]) * 10
start = time.perf_counter()
for i in range(n):
    os.getppid()
print((time.perf_counter() - start) / n * 1e6)
"#;

struct Case {
    name: &'static str,
    script: &'static str,
    /// In the attached pod, or in a namespace of no pod.
    in_pod: bool,
}

const CASES: [Case; 6] = [
    Case {
        name: "unix stream ping-pong, 64 B (µs per round trip), in a pod",
        script: PING_PONG,
        in_pod: true,
    },
    Case {
        name: "the same, in a namespace of no pod",
        script: PING_PONG,
        in_pod: false,
    },
    Case {
        name: "named pipe, 64-byte writes (µs per write), in a pod",
        script: PIPE,
        in_pod: true,
    },
    Case {
        name: "the same, in a namespace of no pod",
        script: PIPE,
        in_pod: false,
    },
    Case {
        name: "`getppid()`, no IPC (µs per call), in a pod",
        script: SYSCALLS,
        in_pod: true,
    },
    Case {
        name: "unix `connect()` and `close()` (µs per connection), in a pod with unix rules",
        script: CONNECTS,
        in_pod: true,
    },
];

/// A namespace of no pod, removed when dropped.
struct Unattached(&'static str);

impl Unattached {
    fn new() -> Self {
        let name = "observer-bench-ipc";
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let made = Command::new("ip").args(["netns", "add", name]).status();
        assert!(made.is_ok_and(|s| s.success()), "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Unattached {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", self.0]).status();
    }
}

pub fn run(report: &mut String, subjects: &[Subject]) {
    let plan = Plan::from_yaml(LAB, "ipc cost lab").expect("the ipc cost lab");
    let lab = Lab::up_for_test(&plan).expect("lab up");
    let inventory = lab.inventory_path().display().to_string();
    let pod = container(&lab, "bench", "p", "client");
    let unattached = Unattached::new();
    let dir = tempfile_dir();
    let policy = dir.join("policy.yaml");
    let socket = dir.join("ipc").display().to_string();
    fs::write(&policy, POLICY.replace("CONNECT_PATH", &socket)).expect("the bench's policy");
    let policy = policy.display().to_string();
    let _stats = enable_stats(Stats::RunTime).expect("enable BPF run-time statistics (root?)");
    // The settings, in each round: no observer; then each observer, and
    // it with named pipes (`--named-pipes`).
    let settings: Vec<Option<(&Subject, bool)>> = std::iter::once(None)
        .chain(
            subjects
                .iter()
                .flat_map(|s| [Some((s, false)), Some((s, true))]),
        )
        .collect();
    // Per setting and case: the time per call of each round, and the
    // programs' cost.
    let mut times = vec![vec![Vec::new(); CASES.len()]; settings.len()];
    let mut programs = vec![vec![Vec::new(); CASES.len()]; settings.len()];
    for round in 0..ROUNDS {
        // Each round starts one setting further on: with a fixed order,
        // the same tree against itself measured 41 to 73 ns a run apart in
        // a pod (BENCHMARKS.md), the slot's bias, not the tree's.
        let order = (0..settings.len()).map(|i| (i + round) % settings.len());
        for (setting, observer) in order.map(|i| (i, &settings[i])) {
            let observer = observer.map(|(subject, pipes)| {
                let mut args = vec!["--inventory", inventory.as_str(), "--policy", &policy];
                if pipes {
                    args.push("--named-pipes");
                }
                Observer::start_binary(&subject.binary, &args)
            });
            for (c, case) in CASES.iter().enumerate() {
                let before = ProgramCost::read();
                times[setting][c].push(call(case, &pod, &unattached, &dir));
                programs[setting][c].push(ProgramCost::read().since(&before));
            }
            if let Some(observer) = observer {
                assert!(observer.terminate().success());
            }
        }
        eprintln!("bench: IPC round {} of {ROUNDS}", round + 1);
    }
    drop(lab);
    let _ = fs::remove_dir_all(&dir);

    let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
    writeln!(
        report,
        "## In-pod IPC: cost per call ({ROUNDS} alternating rounds of {CALLS} calls; medians, spread min–max)\n\n\
         Without any observer, with each observer ({}: one table each, the same rounds) following unix sockets, and with it and `--named-pipes`; the programs' own time from the kernel's BPF run-time statistics, with `--named-pipes`.\n",
        names.join(", ")
    )
    .unwrap();
    for (i, subject) in subjects.iter().enumerate() {
        // Its two settings: `--named-pipes` off, then on.
        let (with, pipes) = (1 + 2 * i, 2 + 2 * i);
        writeln!(
            report,
            "### {}\n\n\
             | case | without | with | change | with `--named-pipes` | change | IPC programs, ns per run (runs per call) |\n|---|---|---|---|---|---|---|",
            subject.name
        )
        .unwrap();
        table(report, &times, &programs, with, pipes);
        writeln!(report).unwrap();
    }
    writeln!(report, "What each program does:\n").unwrap();
    for (program, what) in PROGRAMS {
        writeln!(report, "- `{program}`: {what}").unwrap();
    }
    writeln!(report).unwrap();
}

/// One observer's rows: settings 0 (none), `with` and `pipes`.
fn table(
    report: &mut String,
    times: &[Vec<Vec<f64>>],
    programs: &[Vec<Vec<ProgramCost>>],
    with: usize,
    pipes: usize,
) {
    for (c, case) in CASES.iter().enumerate() {
        let time = |setting: usize| median(&times[setting][c]);
        let calls = f64::from(CALLS)
            * if case.script == SYSCALLS {
                10.0
            } else if case.script == CONNECTS {
                0.1
            } else {
                1.0
            };
        let readings = &programs[pipes][c];
        let cost: Vec<String> = PROGRAMS
            .iter()
            .filter_map(|(program, _)| {
                let runs: u64 = readings.iter().map(|r| r.runs(&[program])).sum();
                let per_call = runs as f64 / ROUNDS as f64 / calls;
                (per_call >= 0.05).then(|| {
                    let ns: Vec<f64> = readings.iter().map(|r| r.per_run(&[program])).collect();
                    format!("`{program}` {:.1} ({per_call:.1})", median(&ns))
                })
            })
            .collect();
        writeln!(
            report,
            "| {} | {:.2} ({}) | {:.2} ({}) | {:+.1} % | {:.2} ({}) | {:+.1} % | {} |",
            case.name,
            time(0),
            spread(&times[0][c], 2),
            time(with),
            spread(&times[with][c], 2),
            (time(with) / time(0) - 1.0) * 100.0,
            time(pipes),
            spread(&times[pipes][c], 2),
            (time(pipes) / time(0) - 1.0) * 100.0,
            cost.join(", ")
        )
        .unwrap();
    }
}

/// Runs a case once: its microseconds per call.
fn call(case: &Case, pod: &(PathBuf, PathBuf), unattached: &Unattached, dir: &Path) -> f64 {
    let path = dir.join("ipc").display().to_string();
    let calls = CALLS.to_string();
    let args = ["-c", case.script, &path, &calls];
    let output = if case.in_pod {
        let (cgroup, netns) = pod;
        in_container(cgroup, netns, Command::new("python3").args(args)).output()
    } else {
        Command::new("ip")
            .args(["netns", "exec", unattached.0, "python3"])
            .args(args)
            .output()
    }
    .expect("python3");
    assert!(
        output.status.success(),
        "{}: {}",
        case.name,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("microseconds per call")
}

/// A directory for the sockets and pipes, under the target directory.
fn tempfile_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench-ipc"));
    fs::create_dir_all(&dir).expect("the bench's IPC directory");
    dir
}
