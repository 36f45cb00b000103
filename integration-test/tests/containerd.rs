//! The node lab on real pods: a containerd per node, called through CRI by
//! the lab as the kubelet, networked by the CNI bridge plugin. The observer
//! names the containers of the seed's cases on pods a container runtime
//! made, and taking the lab down (also after a killed run) leaves nothing:
//! no process, namespace, cgroup, mount or runtime state.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::MetadataExt,
    process::{Command, Stdio},
};

use integration_test::{
    Observer,
    leftovers::{Machine, alive, assert_lab_gone},
};
use lab::{Lab, Plan, Runtime};

fn containerd_lab() -> Plan {
    Plan::default_lab().with_runtime(Runtime::Containerd)
}

/// The process's parent's command name (`None` if either exited).
fn parent_name(pid: &str) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.to_owned();
    let comm = fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    Some(comm.trim().to_owned())
}

fn processes(cgroup: &std::path::Path) -> Vec<String> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn real_pods_are_observed_with_their_containers_named_and_leave_nothing() {
    let before = Machine::now();
    let lab = Lab::up_for_test(&containerd_lab()).expect("lab up");
    let name = lab.name().to_owned();

    let mut pids = Vec::new();
    for pod in &lab.inventory().pods {
        let pod_netns = fs::metadata(pod.netns.as_ref().unwrap()).unwrap().ino();
        let pod_cgroup = pod.containers[0].cgroup.parent().unwrap();
        assert!(
            pod_cgroup.ends_with(format!("kubepods/besteffort/pod{}", pod.uid)),
            "{}",
            pod_cgroup.display()
        );
        for c in &pod.containers {
            // runc made it: cgroup `<parent>/<id>`, started by a shim.
            assert_eq!(c.cgroup.file_name().unwrap(), c.id.as_str());
            let procs = processes(&c.cgroup);
            // The container's first process (the shim's child; its own
            // children, such as a loop's curl, may come and go).
            let pid = procs
                .iter()
                .find(|pid| parent_name(pid).as_deref() == Some("containerd-shim"))
                .unwrap_or_else(|| panic!("{}/{}: no process of a shim's", pod.name, c.name));
            let netns = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
            assert_eq!(
                netns, pod_netns,
                "{}/{} {}",
                pod.namespace, pod.name, c.name
            );
            pids.extend(procs);
        }
        // The sandbox: one more cgroup in the pod's, its process the pause
        // (the lab image's default command).
        let ids: Vec<&str> = pod.containers.iter().map(|c| c.id.as_str()).collect();
        let sandboxes: Vec<_> = fs::read_dir(pod_cgroup)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .filter(|e| !ids.contains(&e.file_name().to_str().unwrap()))
            .collect();
        assert_eq!(sandboxes.len(), 1, "{}: one sandbox", pod.name);
        let pause = processes(&sandboxes[0].path());
        let cmdline = fs::read(format!("/proc/{}/cmdline", pause[0])).unwrap();
        assert_eq!(cmdline, b"sleep\0infinity\0");
        pids.extend(pause);
    }
    // The pods' namespaces, as the CNI named them, in the node's
    // /var/run/netns (a directory of the node's own filesystem).
    let containerd = lab.containerd_pid("node-1").expect("node-1's containerd");
    let cni: Vec<_> = fs::read_dir(format!("/proc/{containerd}/root/var/run/netns"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .collect();
    assert_eq!(cni.len(), 8, "node-1's pods: {cni:?}");

    // The seed's two cases, named by the observer on these pods.
    let inventory = lab.inventory_path().display().to_string();
    let observer = Observer::start(&["--inventory", &inventory, "--collect-interval", "1s"]);
    let packets = "observer_flow_packets_total";
    observer.eventually("fetcher -> web over localhost, sidecar -> app", |m| {
        m.sum(
            packets,
            &[
                ("pod", "web"),
                ("class", "localhost"),
                ("client_container", "fetcher"),
                ("server_container", "web"),
            ],
        ) > 0.0
            && m.sum(
                packets,
                &[
                    ("pod", "shop"),
                    ("class", "localhost"),
                    ("client_container", "sidecar"),
                    ("server_container", "app"),
                ],
            ) > 0.0
    });
    observer.eventually("client to the web Service, by name", |m| {
        m.sum(
            packets,
            &[
                ("pod", "client"),
                ("class", "service"),
                ("peer", "web"),
                ("client_container", "to-service"),
            ],
        ) > 0.0
    });
    // The name, asked of the cluster's DNS by the container that called.
    observer.eventually("to-service's DNS queries", |m| {
        m.sum(
            packets,
            &[
                ("pod", "client"),
                ("class", "service"),
                ("direction", "egress"),
                ("peer_namespace", "kube-system"),
                ("peer", "kube-dns"),
                ("protocol", "udp"),
                ("port", "53"),
                ("client_container", "to-service"),
            ],
        ) > 0.0
    });
    assert!(observer.terminate().success());

    drop(lab);
    assert_lab_gone(&name, &before);
    assert_eq!(alive(&pids), Vec::<String>::new(), "processes left");
    assert_eq!(alive(&[containerd.to_string()]), Vec::<String>::new());
}

#[test]
fn a_killed_run_on_containerd_is_cleaned_up() {
    let before = Machine::now();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_lab-holder"))
        .arg("containerd")
        .stdout(Stdio::piped())
        .spawn()
        .expect("lab-holder");
    let mut name = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut name)
        .expect("lab name");
    let name = name.trim().to_owned();
    assert!(!name.is_empty(), "the lab did not come up");
    holder.kill().expect("SIGKILL");
    holder.wait().unwrap();

    // containerd and its pods outlive the killed run, until the cleanup.
    let removed = lab::cleanup_stale();
    assert!(removed.contains(&format!("lab {name}")), "{removed:?}");
    assert_lab_gone(&name, &before);
}
