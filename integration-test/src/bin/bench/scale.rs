//! Scale: start-up with 250 pods, and 1 M flows collected.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
    time::Instant,
};

use integration_test::{Observer, observer::http_get};
use lab::{Netns, veth};

use crate::{
    Subject,
    process::{cpu_seconds, map_memlock_kib, rss_kib, status_kib},
};

const PODS: usize = 250;
const FLOWS: usize = 1_000_000;
const CAPACITY: usize = FLOWS / 4 * 5;

/// One observer's figures.
struct Figures {
    startup: f64,
    /// The same with clsact filters (`--tc-netlink`) instead of TCX links.
    startup_clsact: f64,
    /// From SIGTERM to exit with clsact filters (each removed by netlink).
    shutdown_clsact: f64,
    /// Kernel memory of the maps before any traffic.
    idle_map_memory: u64,
    /// From SIGTERM to the exit, every pod detached.
    shutdown: f64,
    idle_rss: u64,
    send: f64,
    entries: f64,
    overflow: f64,
    first_collection: f64,
    first_cpu: (f64, f64),
    second_collection: f64,
    second_cpu: (f64, f64),
    rss: u64,
    peak: u64,
    map_memory: u64,
}

pub fn run(report: &mut String, subjects: &[Subject]) {
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
    // Room to spare: at nine tenths full the collector starts taking quiet
    // flows out, which is not what these figures measure.
    // No collection of its own while the flows are sent: the first one
    // measured is the first one.
    let mut args = vec![
        "--flow-capacity".to_owned(),
        CAPACITY.to_string(),
        "--collect-interval".to_owned(),
        "60m".to_owned(),
    ];
    for pod in &pods {
        args.push("--netns".into());
        args.push(pod.path().display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let figures: Vec<Figures> = subjects
        .iter()
        .map(|s| {
            let (startup_clsact, shutdown_clsact) = clsact(s, &args, &pods);
            Figures {
                startup_clsact,
                shutdown_clsact,
                ..measure(s, &args, &pods[0])
            }
        })
        .collect();

    writeln!(report, "## Scale: {PODS} pods, {FLOWS} flows\n").unwrap();
    let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
    writeln!(report, "| figure | {} |", names.join(" | ")).unwrap();
    writeln!(report, "|---|{}", "---|".repeat(subjects.len())).unwrap();
    let mut row = |figure: &str, value: &dyn Fn(&Figures) -> String| {
        let values: Vec<String> = figures.iter().map(value).collect();
        writeln!(report, "| {figure} | {} |", values.join(" | ")).unwrap();
    };
    row(&format!("start-up to ready, {PODS} pods attached"), &|f| {
        format!(
            "{:.2} s ({:.0} ms per pod)",
            f.startup,
            f.startup * 1e3 / PODS as f64
        )
    });
    row(
        &format!("start-up to ready, {PODS} pods attached with clsact filters (`--tc-netlink`)"),
        &|f| {
            format!(
                "{:.2} s ({:.0} ms per pod)",
                f.startup_clsact,
                f.startup_clsact * 1e3 / PODS as f64
            )
        },
    );
    row(
        &format!("SIGTERM to exit, {PODS} pods detached (TCX)"),
        &|f| format!("{:.2} s", f.shutdown),
    );
    row(
        &format!("SIGTERM to exit, {PODS} pods detached (clsact)"),
        &|f| format!("{:.2} s", f.shutdown_clsact),
    );
    row(
        &format!("resident memory, {PODS} pods, before traffic"),
        &|f| format!("{:.1} MiB", f.idle_rss as f64 / 1024.0),
    );
    row(&format!("{FLOWS} flows sent in"), &|f| {
        format!("{:.2} s", f.send)
    });
    row("flows in the kernel map", &|f| {
        format!("{} (overflow packets: {})", f.entries, f.overflow)
    });
    let cpu = |(user, system): (f64, f64)| format!("CPU {user:.2} s user, {system:.2} s system");
    row("first collection (all flows new)", &|f| {
        format!("{:.2} s ({})", f.first_collection, cpu(f.first_cpu))
    });
    row("next collection (no change)", &|f| {
        format!("{:.2} s ({})", f.second_collection, cpu(f.second_cpu))
    });
    row("resident memory after the collections", &|f| {
        format!("{:.1} MiB", f.rss as f64 / 1024.0)
    });
    row("peak resident memory (VmHWM)", &|f| {
        format!("{:.1} MiB", f.peak as f64 / 1024.0)
    });
    row(
        &format!(
            "kernel memory of the observer's maps before traffic (memlock; flow map for {CAPACITY} flows)"
        ),
        &|f| {
            format!(
                "{:.1} MiB ({:.0} bytes per flow of capacity)",
                f.idle_map_memory as f64 / 1024.0,
                f.idle_map_memory as f64 * 1024.0 / CAPACITY as f64
            )
        },
    );
    row(
        &format!("kernel memory of the observer's maps with {FLOWS} flows"),
        &|f| {
            format!(
                "{:.1} MiB ({:.0} bytes per flow of capacity, {:.0} per flow present beyond the idle figure)",
                f.map_memory as f64 / 1024.0,
                f.map_memory as f64 * 1024.0 / CAPACITY as f64,
                (f.map_memory - f.idle_map_memory) as f64 * 1024.0 / f.entries.max(1.0)
            )
        },
    );
    writeln!(report).unwrap();
}

fn measure(subject: &Subject, args: &[&str], first: &Netns) -> Figures {
    let started = Instant::now();
    let observer = Observer::start_binary(&subject.binary, args);
    let startup = started.elapsed().as_secs_f64();
    let pid = observer.pid();
    let idle_rss = rss_kib(pid);
    let idle_map_memory = map_memlock_kib(pid);

    // FLOWS distinct flows: one datagram from one socket to as many
    // (address, port) pairs on the loopback of the first pod.
    eprintln!("bench: {}: sending {FLOWS} flows", subject.name);
    let sent = Instant::now();
    first
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
    let send = sent.elapsed().as_secs_f64();

    let since = |(user, system): (f64, f64)| {
        let (u, s) = cpu_seconds(pid);
        (u - user, s - system)
    };
    let (cpu, collect) = (cpu_seconds(pid), Instant::now());
    let scrape = observer.scrape();
    let first_collection = collect.elapsed().as_secs_f64();
    let first_cpu = since(cpu);
    let (cpu, collect) = (cpu_seconds(pid), Instant::now());
    let _ = http_get(observer.addr(), "/metrics");
    let second_collection = collect.elapsed().as_secs_f64();
    let second_cpu = since(cpu);
    let figures = Figures {
        startup,
        startup_clsact: 0.0,
        shutdown_clsact: 0.0,
        shutdown: 0.0,
        idle_map_memory,
        idle_rss,
        send,
        entries: scrape.sum("observer_flow_map_entries", &[]),
        overflow: scrape.sum("observer_flow_map_overflow_packets_total", &[]),
        first_collection,
        first_cpu,
        second_collection,
        second_cpu,
        rss: rss_kib(pid),
        peak: status_kib(pid, "VmHWM:"),
        map_memory: map_memlock_kib(pid),
    };
    // Each TCX link's detach waits for an RCU grace period too.
    let stopping = Instant::now();
    assert!(observer.terminate_within(Duration::from_secs(60)).success());
    Figures {
        shutdown: stopping.elapsed().as_secs_f64(),
        ..figures
    }
}

/// Start-up and shutdown with clsact filters instead of TCX links
/// (`--tc-netlink`, which older builds know too). The empty qdiscs the
/// filters leave are removed, so that the next observer finds the pods as
/// they were.
fn clsact(subject: &Subject, args: &[&str], pods: &[Netns]) -> (f64, f64) {
    let mut clsact = args.to_vec();
    clsact.push("--tc-netlink");
    let started = Instant::now();
    let observer = Observer::start_binary(&subject.binary, &clsact);
    let startup = started.elapsed().as_secs_f64();
    let stopping = Instant::now();
    assert!(observer.terminate_within(Duration::from_secs(60)).success());
    let shutdown = stopping.elapsed().as_secs_f64();
    for pod in pods {
        for device in ["lo", "eth0"] {
            let _ = pod.ip(&["qdisc", "del", "dev", device, "clsact"]);
        }
    }
    (startup, shutdown)
}
