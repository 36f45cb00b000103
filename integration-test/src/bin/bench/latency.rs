//! Attach latency: from a pod appearing to its programs attached.

use std::{
    fmt::Write as _,
    fs, thread,
    time::{Duration, Instant},
};

use integration_test::{
    FakeApi, Observer, Scrape,
    kube_api::{self, Kind},
    observer::{free_port, http_get},
};
use lab::{Lab, Netns, Plan};

use crate::{Subject, median};

const ROUNDS: usize = 20;

pub fn run(report: &mut String, subjects: &[Subject]) {
    writeln!(report, "## Attach latency, {ROUNDS} new pods\n").unwrap();
    writeln!(
        report,
        "| event | observer | median | max |\n|---|---|---|---|"
    )
    .unwrap();
    // Local mode: `ip netns add` while the observer watches the directory;
    // TCX links, then clsact filters (`--tc-netlink`, which older builds
    // know too: `--tc-attach clsact`).
    let modes = [
        ("namespace created (local mode)", false),
        ("namespace created (local mode, clsact filters)", true),
    ];
    for (event, clsact) in modes {
        for subject in subjects {
            let mut args = vec!["--netns-dir", "/var/run/netns"];
            if clsact {
                args.push("--tc-netlink");
            }
            let observer = Observer::start_binary(&subject.binary, &args);
            let mut times = Vec::new();
            let mut pods = Vec::new();
            for i in 0..ROUNDS {
                let started = Instant::now();
                let pod = Netns::create(&format!("late{i}")).expect("namespace");
                let name = pod.name().to_owned();
                times.push(until_attached(&observer, &name, started));
                pods.push(pod);
            }
            assert!(observer.terminate().success());
            drop(pods);
            row(report, event, subject, &times);
        }
    }

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
    // Deleted and applied again: its namespace stays, so that clsact
    // filters go through the search for an earlier observer's each time.
    let modes = [
        ("pod reported by the API (Kubernetes mode)", false),
        (
            "pod reported by the API (Kubernetes mode, clsact filters)",
            true,
        ),
    ];
    for ((event, clsact), subject) in modes
        .into_iter()
        .flat_map(|mode| subjects.iter().map(move |subject| (mode, subject)))
    {
        let mut args = vec![
            "--kubernetes",
            "--node",
            "node-1",
            "--kubeconfig",
            &kubeconfig,
        ];
        if clsact {
            args.push("--tc-netlink");
        }
        let observer = Observer::start_binary(&subject.binary, &args);
        let mut times = Vec::new();
        for _ in 0..ROUNDS {
            let started = Instant::now();
            api.apply(Kind::Pods, kube_api::pod_object(&pipes));
            times.push(until_attached(&observer, "pipes", started));
            api.delete(Kind::Pods, &pipes.uid);
            while attached(&observer, "pipes") {
                thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(observer.terminate().success());
        row(report, event, subject, &times);
    }
    let _ = fs::remove_dir_all(&dir);
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

fn row(report: &mut String, event: &str, subject: &Subject, times: &[f64]) {
    let max = times.iter().copied().fold(0.0, f64::max);
    writeln!(
        report,
        "| {event} | {} | {:.0} ms | {:.0} ms |",
        subject.name,
        median(times) * 1e3,
        max * 1e3
    )
    .unwrap();
}
