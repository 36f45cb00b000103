//! `cargo xtask bench`: what the observer costs, measured side by side in
//! one run (these machines are noisy), on topologies of its own namespaces.
//!
//! 1. Per-packet cost: the kernel's BPF run-time statistics of the
//!    observer's programs and of a no-op classifier on the same hooks.
//! 2. Throughput: iperf3 TCP and 64-byte UDP over `lo` and over a veth pair,
//!    without and with the observer, in alternating rounds (medians).
//! 3. Scale: 250 pods (attach time) and 1 M flows (collection time, the
//!    observer's resident memory, the kernel maps' memory).
//! 4. Attach latency: from a new pod's namespace appearing (local mode), or
//!    from the API reporting a pod whose processes run (Kubernetes mode), to
//!    its programs attached.
//!
//! Prints a Markdown report and writes it to `target/bench.md`.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use integration_test::{
    FakeApi, Observer, Scrape,
    kube_api::{self, Kind},
    observer::{free_port, http_get},
};
use lab::{Lab, Netns, Plan, veth};

const ROUNDS: usize = 3;
const SECONDS: u32 = 3;
const PODS: usize = 250;
const FLOWS: usize = 1_000_000;

struct Case {
    name: &'static str,
    server: &'static str,
    port: u16,
    udp: bool,
}

const CASES: [Case; 4] = [
    Case {
        name: "lo, TCP",
        server: "127.0.0.1",
        port: 5201,
        udp: false,
    },
    Case {
        name: "lo, UDP 64 B",
        server: "127.0.0.1",
        port: 5201,
        udp: true,
    },
    Case {
        name: "veth, TCP",
        server: "10.77.0.2",
        port: 5202,
        udp: false,
    },
    Case {
        name: "veth, UDP 64 B",
        server: "10.77.0.2",
        port: 5202,
        udp: true,
    },
];

fn main() {
    let mut report = String::new();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        report,
        "Kernel {}, {cpus} CPUs; {ROUNDS} rounds of {SECONDS} s per case.\n",
        kernel.trim()
    )
    .unwrap();

    if std::env::args().any(|a| a == "--cost-only") {
        cost_only(&mut report);
    } else if std::env::args().any(|a| a == "--latency-only") {
        attach_latency(&mut report);
    } else {
        throughput_and_cost(&mut report);
        scale(&mut report);
        attach_latency(&mut report);
    }

    println!("{report}");
    let out = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench.md");
    fs::write(out, &report).expect("write target/bench.md");
    eprintln!("bench: written to target/bench.md");
}

/// A quick reading of the per-packet cost alone (for working on the
/// programs): one run of 64-byte UDP on lo, observer and no-op side by side.
fn cost_only(report: &mut String) {
    let a = Netns::create("cost").expect("namespace");
    let _server = Server::start(&a, "127.0.0.1", 5201);
    let path = a.path().display().to_string();
    let (cost, pps) = measure_cost(&["--netns", &path], || iperf(&a, &CASES[1]));
    let (noop, observe) = (cost.per_run(&cost.noop), cost.per_run(&cost.observe));
    writeln!(
        report,
        "lo UDP 64 B: {pps:.1} k packets/s; no-op {noop:.1} ns, observer {observe:.1} ns per run ({:.2}x)",
        observe / noop
    )
    .unwrap();
}

fn throughput_and_cost(report: &mut String) {
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

    // Cost first, on its own: the no-op baseline and the statistics' clock
    // reads would otherwise weigh on the throughput figures.
    let (cost, _) = measure_cost(&args, || {
        for case in &CASES {
            iperf(&a, case);
        }
    });

    // results[case][mode] = one value per round; mode 0 without, 1 with.
    let mut results = vec![[Vec::new(), Vec::new()]; CASES.len()];
    for round in 0..ROUNDS {
        for with_observer in [false, true] {
            let observer = with_observer.then(|| Observer::start(&args));
            for (i, case) in CASES.iter().enumerate() {
                let value = iperf(&a, case);
                eprintln!(
                    "bench: round {} {:<15} {:<8} {value:.2}",
                    round + 1,
                    case.name,
                    if with_observer { "observer" } else { "none" }
                );
                results[i][usize::from(with_observer)].push(value);
            }
            if let Some(observer) = observer {
                assert!(observer.terminate().success());
            }
        }
    }

    writeln!(
        report,
        "## Per-packet cost (kernel BPF run-time statistics)\n"
    )
    .unwrap();
    writeln!(
        report,
        "Both programs run on the same hooks, on the same packets, in the same run.\n"
    )
    .unwrap();
    writeln!(
        report,
        "| program | runs | ns per run | vs. no-op |\n|---|---|---|---|"
    )
    .unwrap();
    let noop = cost.per_run(&cost.noop);
    for (name, stat) in [
        ("no-op classifier (baseline)", &cost.noop),
        ("observe_egress + observe_ingress", &cost.observe),
    ] {
        let per_run = cost.per_run(stat);
        writeln!(
            report,
            "| {name} | {} | {per_run:.1} | {:.2}x |",
            stat.1,
            per_run / noop
        )
        .unwrap();
    }
    writeln!(report).unwrap();

    writeln!(
        report,
        "## Throughput, without and with the observer (medians of {ROUNDS})\n"
    )
    .unwrap();
    writeln!(
        report,
        "| traffic | unit | without | with | change |\n|---|---|---|---|---|"
    )
    .unwrap();
    for (case, values) in CASES.iter().zip(&results) {
        let without = median(&values[0]);
        let with = median(&values[1]);
        let unit = if case.udp { "k packets/s" } else { "Gbit/s" };
        writeln!(
            report,
            "| {} | {unit} | {without:.2} | {with:.2} | {:+.1} % |",
            case.name,
            (with / without - 1.0) * 100.0
        )
        .unwrap();
    }
    writeln!(report, "\nRounds: {results:.2?}\n").unwrap();
}

/// Runs `traffic` with the observer (`args`) and the no-op baseline on the
/// same hooks, with the kernel's run-time statistics on (only meanwhile).
fn measure_cost<T>(args: &[&str], traffic: impl FnOnce() -> T) -> (ProgramCost, T) {
    let _stats = enable_stats(Stats::RunTime).expect("enable BPF run-time statistics (root?)");
    let mut args = args.to_vec();
    args.push("--attach-noop");
    let observer = Observer::start(&args);
    let result = traffic();
    let cost = ProgramCost::read();
    assert!(observer.terminate().success());
    (cost, result)
}

/// Run time (ns) and run count, summed over program instances.
#[derive(Default, Clone, Copy)]
struct ProgramCost {
    noop: (u64, u64),
    observe: (u64, u64),
}

impl ProgramCost {
    fn read() -> Self {
        let mut cost = Self::default();
        for program in loaded_programs().filter_map(Result::ok) {
            let slot = match program.name_as_str() {
                Some("noop") => &mut cost.noop,
                Some("observe_egress" | "observe_ingress") => &mut cost.observe,
                _ => continue,
            };
            slot.0 += program.run_time().as_nanos() as u64;
            slot.1 += program.run_count();
        }
        cost
    }

    fn per_run(&self, stat: &(u64, u64)) -> f64 {
        stat.0 as f64 / stat.1.max(1) as f64
    }
}

/// An iperf3 server in a namespace, killed on drop.
struct Server(Child);

impl Server {
    fn start(netns: &Netns, address: &str, port: u16) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns.name(), "iperf3", "-s", "-B", address])
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; the server dies with the bench.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let server = Self(
            command
                .spawn()
                .expect("iperf3 (cargo xtask bench installs it)"),
        );
        thread::sleep(Duration::from_millis(300));
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from `client`: Gbit/s received (TCP), or thousands of
/// datagrams received per second (UDP, 64-byte payloads, unthrottled).
fn iperf(client: &Netns, case: &Case) -> f64 {
    let mut args = vec![
        "netns",
        "exec",
        client.name(),
        "iperf3",
        "-J",
        "-c",
        case.server,
    ];
    let port = case.port.to_string();
    let seconds = SECONDS.to_string();
    args.extend(["-p", &port, "-t", &seconds]);
    if case.udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = Command::new("ip").args(&args).output().expect("iperf3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 {}: {e}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let end = &json["end"];
    if case.udp {
        let sum = &end["sum"];
        let received =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        received / sum["seconds"].as_f64().unwrap_or(1.0) / 1e3
    } else {
        end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    }
}

fn scale(report: &mut String) {
    eprintln!("bench: creating {PODS} pod namespaces");
    let pods: Vec<Netns> = (0..PODS)
        .map(|i| Netns::create(&format!("s{i}")).expect("namespace"))
        .collect();
    for (i, pair) in pods.chunks(2).enumerate() {
        if let [x, y] = pair {
            let (hi, lo) = (i / 200, i % 200);
            veth(
                (x, "eth0", &format!("10.{}.{lo}.1/24", 100 + hi)),
                (y, "eth0", &format!("10.{}.{lo}.2/24", 100 + hi)),
            )
            .expect("veth");
        }
    }
    let mut args = vec![
        "--flow-capacity".to_owned(),
        (FLOWS + FLOWS / 10).to_string(),
    ];
    for pod in &pods {
        args.push("--netns".into());
        args.push(pod.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let observer = Observer::start(&args);
    let startup = started.elapsed();
    let pid = observer.pid();
    let idle_rss = rss_kib(pid);

    // FLOWS distinct flows: one datagram from one socket to as many
    // (address, port) pairs on the loopback of the first pod.
    eprintln!("bench: sending {FLOWS} flows");
    let sent = Instant::now();
    pods[0]
        .run(|| {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            let per_address = 60_000;
            for n in 0..FLOWS {
                let address = Ipv4Addr::new(127, 0, 1 + (n / per_address) as u8, 1);
                let port = 1 + (n % per_address) as u16;
                // Closed ports: the kernel may refuse later sends with
                // ECONNREFUSED from an ICMP error; the datagram still left.
                let _ = socket.send_to(&[0; 8], (address, port));
            }
        })
        .expect("enter namespace");
    let send_time = sent.elapsed();

    let collect = Instant::now();
    let scrape = observer.scrape();
    let first_collection = collect.elapsed();
    let collect = Instant::now();
    let _ = http_get(observer.addr(), "/metrics");
    let second_collection = collect.elapsed();
    let entries = scrape.sum("observer_flow_map_entries", &[]);
    let evictions = scrape.sum("observer_flow_map_evictions_total", &[]);
    let rss = rss_kib(pid);
    let peak = status_kib(pid, "VmHWM:");
    let map_memory = map_memlock_kib(pid);
    assert!(observer.terminate().success());

    writeln!(report, "## Scale: {PODS} pods, {FLOWS} flows\n").unwrap();
    writeln!(report, "| figure | value |\n|---|---|").unwrap();
    writeln!(
        report,
        "| start-up to ready, {PODS} pods attached | {:.2} s ({:.0} ms per pod) |",
        startup.as_secs_f64(),
        startup.as_secs_f64() * 1e3 / PODS as f64
    )
    .unwrap();
    writeln!(
        report,
        "| resident memory, {PODS} pods, before traffic | {:.1} MiB |",
        idle_rss as f64 / 1024.0
    )
    .unwrap();
    writeln!(
        report,
        "| {FLOWS} flows sent in | {:.2} s |",
        send_time.as_secs_f64()
    )
    .unwrap();
    writeln!(
        report,
        "| flows in the kernel map | {entries} (evicted: {evictions}) |"
    )
    .unwrap();
    writeln!(
        report,
        "| first collection (all flows new) | {:.2} s |",
        first_collection.as_secs_f64()
    )
    .unwrap();
    writeln!(
        report,
        "| next collection (no change) | {:.2} s |",
        second_collection.as_secs_f64()
    )
    .unwrap();
    writeln!(
        report,
        "| resident memory after the collections | {:.1} MiB |",
        rss as f64 / 1024.0
    )
    .unwrap();
    writeln!(
        report,
        "| peak resident memory (VmHWM) | {:.1} MiB |",
        peak as f64 / 1024.0
    )
    .unwrap();
    writeln!(
        report,
        "| kernel memory of the observer's maps (memlock) | {:.1} MiB |",
        map_memory as f64 / 1024.0
    )
    .unwrap();
    writeln!(report).unwrap();
}

const LATENCY_ROUNDS: usize = 20;

fn attach_latency(report: &mut String) {
    writeln!(report, "## Attach latency, {LATENCY_ROUNDS} new pods\n").unwrap();
    writeln!(report, "| event | median | max |\n|---|---|---|").unwrap();

    // Local mode: `ip netns add` while the observer watches the directory.
    let observer = Observer::start(&["--netns-dir", "/var/run/netns"]);
    let mut times = Vec::new();
    for i in 0..LATENCY_ROUNDS {
        let started = Instant::now();
        let pod = Netns::create(&format!("late{i}")).expect("namespace");
        let name = pod.name().to_owned();
        times.push(until_attached(&observer, &name, started));
    }
    assert!(observer.terminate().success());
    latency_row(report, "namespace created (local mode)", &times);

    // Kubernetes mode: the lab's pipes pod runs; the API reports it.
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = std::env::temp_dir().join(format!("observer-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let api_addr = free_port();
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    let pipes = lab.pod("default", "pipes").expect("pipes").clone();
    api.delete(Kind::Pods, &pipes.uid);
    let kubeconfig = kube_api::kubeconfig(api_addr, &dir).display().to_string();
    let observer = Observer::start(&[
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        &kubeconfig,
    ]);
    let mut times = Vec::new();
    for _ in 0..LATENCY_ROUNDS {
        let started = Instant::now();
        api.apply(Kind::Pods, kube_api::pod_object(&pipes));
        times.push(until_attached(&observer, "pipes", started));
        api.delete(Kind::Pods, &pipes.uid);
        while attached(&observer, "pipes") {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(observer.terminate().success());
    let _ = fs::remove_dir_all(&dir);
    latency_row(report, "pod reported by the API (Kubernetes mode)", &times);
    writeln!(report).unwrap();
}

fn attached(observer: &Observer, pod: &str) -> bool {
    http_get(observer.addr(), "/metrics")
        .is_some_and(|(_, text)| Scrape::parse(&text).has("observer_programs_attached", "pod", pod))
}

/// Seconds from `started` until `pod` shows as attached (polled every 5 ms).
fn until_attached(observer: &Observer, pod: &str, started: Instant) -> f64 {
    while !attached(observer, pod) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{pod} never attached"
        );
        thread::sleep(Duration::from_millis(5));
    }
    started.elapsed().as_secs_f64()
}

fn latency_row(report: &mut String, event: &str, times: &[f64]) {
    let max = times.iter().copied().fold(0.0, f64::max);
    writeln!(
        report,
        "| {event} | {:.0} ms | {:.0} ms |",
        median(times) * 1e3,
        max * 1e3
    )
    .unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sum of `memlock` over the BPF maps the process holds (each counted once).
fn map_memlock_kib(pid: u32) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    for fd in fds.flatten() {
        let info = fs::read_to_string(fd.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:"))
            && seen.insert(id)
        {
            total += memlock;
        }
    }
    total / 1024
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
