//! What a lab may leave on the machine: nothing. The machine's own network
//! (interfaces, addresses, routes, rules, qdiscs, firewall), and what a lab
//! makes by name (namespaces, cgroups in every hierarchy, its state),
//! mounts, and the directories a container runtime writes by default.

use std::{fs, path::Path, process::Command};

/// Directories a containerd, its shims or the CNI plugins would make on the
/// machine if they ran in its filesystem rather than the lab node's.
const RUNTIME_DIRS: &[&str] = &[
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/etc/cni",
    "/var/log/pods",
    // The pods' resolv.conf for `ip netns exec`.
    "/etc/netns",
];

/// The machine as a lab must leave it.
#[derive(Debug, PartialEq, Eq)]
pub struct Machine {
    network: String,
    mounts: Vec<String>,
    runtime_dirs: Vec<&'static str>,
}

impl Machine {
    pub fn now() -> Self {
        Self {
            network: root_namespace(),
            mounts: mounts(),
            runtime_dirs: RUNTIME_DIRS
                .iter()
                .copied()
                .filter(|dir| Path::new(dir).exists())
                .collect(),
        }
    }
}

/// Panics unless nothing of lab `name` is left and the machine is as it
/// was `before`.
pub fn assert_lab_gone(name: &str, before: &Machine) {
    let prefix = format!("obslab-{name}-");
    let left: Vec<_> = fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let cgroups: Vec<_> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - cgroup2 ") || l.contains(" - cgroup "))
        .map(|l| Path::new(l.split_whitespace().nth(4).unwrap()).join(format!("obslab-{name}")))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert!(!Path::new(lab::STATE_DIR).join(name).exists(), "state left");
    let now = Machine::now();
    assert_eq!(now.mounts, before.mounts, "mounts changed");
    assert_eq!(now.runtime_dirs, before.runtime_dirs, "runtime directories");
    assert_eq!(now.network, before.network, "the root namespace changed");
}

/// What the root namespace looks like: none of it may change.
fn root_namespace() -> String {
    let mut snapshot = String::new();
    for (program, args) in [
        ("ip", &["-d", "link", "show"][..]),
        ("ip", &["addr", "show"]),
        ("ip", &["route", "show", "table", "all"]),
        ("ip", &["rule", "show"]),
        ("tc", &["qdisc", "show"]),
        ("iptables-save", &[]),
    ] {
        let out = Command::new(program).args(args).output().expect(program);
        let text = String::from_utf8_lossy(&out.stdout);
        // iptables-save stamps its output with the time.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            snapshot.push_str(line);
            snapshot.push('\n');
        }
    }
    snapshot
}

/// Mount points, but the other tests' namespaces (`/run/netns`, which come
/// and go as tests run).
fn mounts() -> Vec<String> {
    let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|p| !p.starts_with("/run/netns/") && !p.starts_with("/var/run/netns/"))
        .collect();
    points.sort();
    points
}

/// PIDs (of `pids`) that are still alive; a zombie waiting for init to reap
/// it is dead already.
pub fn alive(pids: &[String]) -> Vec<String> {
    pids.iter()
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        })
        .cloned()
        .collect()
}
