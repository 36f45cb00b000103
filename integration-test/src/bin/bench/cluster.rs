//! Kubernetes mode at cluster scale: a scripted API server with 50,000 pods
//! on 100 nodes, about 1 KB of labels each, and a policy with a peer rule.
//! How long until ready, the observer's memory, and how long a
//! reconciliation takes (at start, and after a change elsewhere in the
//! cluster).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use integration_test::{
    FakeApi, Observer, Scrape, TempDir,
    kube_api::{self, Kind},
    observer::free_port,
};
use serde_json::{Value, json};

use crate::{
    Subject,
    process::{rss_kib, status_kib},
};

const PODS: usize = 50_000;
const NODES: usize = 100;

/// A pod as a Deployment's replica has it: shared labels of its app and
/// team, its ReplicaSet's hash, and a few per-pod ones: about 1 KB.
fn pod(i: usize) -> Value {
    let app = i / 20;
    let node = i % NODES;
    let labels = json!({
        "app": format!("app-{app}"),
        "app.kubernetes.io/name": format!("app-{app}"),
        "app.kubernetes.io/instance": format!("app-{app}-production-eu-west"),
        "app.kubernetes.io/version": "v2.31.4-build.20261130.8f2c1d7e",
        "app.kubernetes.io/component": "backend-api-server",
        "app.kubernetes.io/part-of": format!("platform-team-{}", app % 40),
        "app.kubernetes.io/managed-by": "helm",
        "helm.sh/chart": format!("app-{app}-chart-1.42.7"),
        "pod-template-hash": format!("{:010x}", app * 7919),
        "team": format!("team-{}", app % 40),
        "cost-center": format!("cc-{:06}", app % 300),
        "environment": "production",
        "region": "eu-west-1",
        "security.example.com/tier": "restricted",
        "observability.example.com/scrape-profile": "default-high-cardinality-off",
        "release.example.com/track": format!("stable-{}", app % 7),
        "example.com/owner-email-hash": format!("{:040x}", app * 104_729),
        "example.com/replica": format!("{i:08}"),
    });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("app-{app}-{i}"), "namespace": format!("ns-{}", app % 200),
            "uid": format!("{:08x}-0000-4000-8000-{:012x}", i, i),
            "labels": labels,
        },
        "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "main", "image": "app"}]},
        "status": {
            "phase": "Running",
            "podIP": format!("10.{}.{}.{}", 100 + node / 100, node % 100, 2 + i / NODES % 250),
            "containerStatuses": [],
        },
    })
}

fn node(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{i}"), "uid": format!("node-uid-{i}")},
        "spec": {"podCIDR": format!("10.{}.{}.0/24", 100 + i / 100, i % 100)},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("172.20.{}.{}", i / 250, 1 + i % 250)}]},
    })
}

const POLICY: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend-peers}
spec:
  podSelector: {matchLabels: {team: team-1}}
  mode: audit
  rules:
    - {name: from-app-1, class: pod, direction: ingress, peer: {matchLabels: {app: app-1}}, action: allow}
";

/// One observer's figures.
struct Figures {
    ready: f64,
    rss: u64,
    peak: u64,
    /// The first reconciliation (everything written), and one after a
    /// change elsewhere in the cluster.
    first: f64,
    later: f64,
}

fn reconciles(m: &Scrape) -> (f64, f64) {
    (
        m.sum("observer_reconcile_duration_seconds_sum", &[]),
        m.sum("observer_reconcile_duration_seconds_count", &[]),
    )
}

pub fn run(report: &mut String, subjects: &[Subject]) {
    eprintln!("bench: a scripted API server with {PODS} pods on {NODES} nodes");
    let dir = TempDir::new("bench-cluster");
    let addr = free_port();
    let api = FakeApi::serve(addr);
    for i in 0..NODES {
        api.apply(Kind::Nodes, node(i));
    }
    for i in 0..PODS {
        api.apply(Kind::Pods, pod(i));
    }
    let kubeconfig = kube_api::kubeconfig(addr, dir.path());
    let policy = dir.write("policy.yaml", POLICY);
    let args = [
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--policy",
        &policy,
    ];
    let mut figures = Vec::new();
    for subject in subjects {
        let started = Instant::now();
        let observer = Observer::start_binary(&subject.binary, &args);
        let ready = started.elapsed().as_secs_f64();
        let (sum, count) = reconciles(&observer.scrape());
        let first = if count > 0.0 { sum / count } else { f64::NAN };
        if count == 0.0 {
            // An observer without the histogram: memory and readiness only.
            figures.push(Figures {
                ready,
                rss: rss_kib(observer.pid()),
                peak: status_kib(observer.pid(), "VmHWM:"),
                first,
                later: f64::NAN,
            });
            assert!(observer.terminate().success());
            continue;
        }
        // A pod elsewhere changes (a new address): one round for it.
        let mut changed = pod(7);
        changed["status"]["podIP"] = json!("10.199.0.7");
        api.apply(Kind::Pods, changed);
        let deadline = Instant::now() + Duration::from_secs(30);
        let later = loop {
            let (s, c) = reconciles(&observer.scrape());
            if c > count {
                break (s - sum) / (c - count);
            }
            assert!(
                Instant::now() < deadline,
                "no reconciliation after a change"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        api.apply(Kind::Pods, pod(7));
        figures.push(Figures {
            ready,
            rss: rss_kib(observer.pid()),
            peak: status_kib(observer.pid(), "VmHWM:"),
            first,
            later,
        });
        assert!(observer.terminate().success());
    }
    writeln!(
        report,
        "## Kubernetes mode at cluster scale ({PODS} pods on {NODES} nodes, about 1 KB of labels each, a peer rule)\n\n\
         | observer | ready | resident memory | peak | a reconciliation (mean of the first rounds) | after a change elsewhere |\n\
         |---|---|---|---|---|---|"
    )
    .unwrap();
    for (subject, f) in subjects.iter().zip(&figures) {
        writeln!(
            report,
            "| {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.0} ms | {:.0} ms |",
            subject.name,
            f.ready,
            f.rss as f64 / 1024.0,
            f.peak as f64 / 1024.0,
            f.first * 1000.0,
            f.later * 1000.0,
        )
        .unwrap();
    }
    report.push('\n');
}
