//! The node lab, built for real: its scenarios produce real traffic, and
//! taking it down leaves the machine as it was.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_test::leftovers::{Machine, alive, assert_lab_gone};
use lab::{Lab, Netns, Plan};
use observer_common::inventory::Inventory;

fn curl(netns: &Netns, url: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns.name(), "curl", "-s", "-m", "2", url])
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!("curl {url}: exit {:?}", out.status.code()))
    }
}

/// A counter of `interface` in `netns` (`/sys/class/net/*/statistics/*`).
fn counter(netns: &Netns, interface: &str, name: &str) -> u64 {
    let path = format!("/sys/class/net/{interface}/statistics/{name}");
    netns
        .exec("cat", &[&path])
        .expect("read counter")
        .trim()
        .parse()
        .expect("number")
}

/// Waits (at most 10 s) until `condition` holds.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_default_lab_produces_every_scenario_and_leaves_nothing() {
    let before = Machine::now();
    let started = Instant::now();
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "up took {:?}",
        started.elapsed()
    );
    let name = lab.name().to_owned();
    let web = lab.pod_netns("default", "web");
    let client = lab.pod_netns("default", "client");
    let remote = lab.pod_netns("default", "remote");
    let pipes = lab.pod_netns("default", "pipes");

    // Containers: each a process in its own cgroup, in its pod's namespace.
    for pod in &lab.inventory().pods {
        let pod_netns = fs::metadata(pod.netns.as_ref().unwrap()).unwrap().ino();
        for c in &pod.containers {
            let procs = fs::read_to_string(c.cgroup.join("cgroup.procs")).unwrap();
            let pid = procs
                .lines()
                .next()
                .unwrap_or_else(|| panic!("{} has no process", c.name));
            let netns = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
            assert_eq!(
                netns, pod_netns,
                "{}/{} container {}",
                pod.namespace, pod.name, c.name
            );
            assert!(
                c.cgroup
                    .to_string_lossy()
                    .contains(&format!("/pod{}/{}", pod.uid, c.id))
            );
        }
    }

    // "Hello" over localhost inside the web pod.
    assert_eq!(curl(&web, "http://localhost/").unwrap(), "Hello");
    // The Service answers through DNAT: nothing owns 10.96.0.10.
    assert_eq!(curl(&client, "http://10.96.0.10/").unwrap(), "Hello");
    // By name, through the cluster's DNS (the pod's resolv.conf, which
    // `ip netns exec` honours, searches its namespace's Services first).
    assert_eq!(curl(&client, "http://web/").unwrap(), "Hello");
    assert_eq!(curl(&client, "http://shop.shop:8080/").unwrap(), "shop");
    assert_eq!(
        curl(&client, "http://web.default.svc.cluster.local/").unwrap(),
        "Hello"
    );
    eventually("the DNS server's log of the queries", || {
        lab.log("kube-system", "kube-dns", "dnsmasq")
            .contains("web.default.svc.cluster.local is 10.96.0.10")
    });
    assert_eq!(curl(&client, "http://10.96.0.20:8080/").unwrap(), "shop");
    // A ClusterIP that no Service has is dropped inside the lab (a timeout).
    assert_eq!(
        curl(&client, "http://10.96.0.99/"),
        Err("curl http://10.96.0.99/: exit Some(28)".into())
    );
    // Pod to pod, across nodes.
    assert_eq!(curl(&remote, "http://10.244.1.10/").unwrap(), "Hello");
    // To the external host, masqueraded to the node's address.
    assert_eq!(
        curl(&client, "http://192.168.200.10:8080/").unwrap(),
        "external"
    );
    let node_1 = lab.inventory().nodes[0].address.to_string();
    eventually("the external host logging the node as the client", || {
        lab.external_log("internet")
            .contains(&format!("{node_1} - - "))
    });

    // The containers' own traffic: the sidecar polls the app over localhost,
    // the fetcher polls the web container, the clients reach everything.
    eventually("the sidecar's requests in the app's log", || {
        lab.log("shop", "shop", "app").contains("127.0.0.1 - - ")
    });
    eventually("the fetcher's requests in the web log", || {
        lab.log("default", "web", "web").contains("127.0.0.1 - - ")
    });
    let client_ip = lab.pod("default", "client").unwrap().ip.to_string();
    let remote_ip = lab.pod("default", "remote").unwrap().ip.to_string();
    eventually("client and remote requests in the web log", || {
        let log = lab.log("default", "web", "web");
        log.contains(&client_ip) && log.contains(&remote_ip)
    });
    assert!(counter(&web, "lo", "tx_packets") > 0);
    assert!(counter(&client, "eth0", "tx_packets") > 0);

    // The named pipe carries data, and the pipes pod sends no packet at all.
    eventually("messages through the named pipe", || {
        lab.log("default", "pipes", "reader").contains("message 1")
    });
    assert_eq!(counter(&pipes, "lo", "tx_packets"), 0);
    assert_eq!(counter(&pipes, "eth0", "tx_packets"), 0);

    // The inventory file is what the lab says it is.
    let file: Inventory = serde_json::from_str(&fs::read_to_string(lab.inventory_path()).unwrap())
        .expect("a valid inventory");
    assert_eq!(&file, lab.inventory());
    assert_eq!(file.version, 1);
    assert_eq!(file.pods.len(), 9);
    assert_eq!(file.services[0].endpoints[0].ip.to_string(), "10.244.1.10");

    let pids: Vec<String> = lab
        .inventory()
        .pods
        .iter()
        .flat_map(|p| &p.containers)
        .flat_map(|c| {
            fs::read_to_string(c.cgroup.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(pids.len() >= 11, "{pids:?}");
    drop(lab);
    assert_lab_gone(&name, &before);
    assert_eq!(alive(&pids), Vec::<String>::new(), "processes left");
}

#[test]
fn a_lab_that_fails_to_start_leaves_nothing() {
    let yaml = Plan::default_lab().source.replace(
        "command: [sh, -c, 'for i in $(seq 1200); do curl -s -m 2 -o /dev/null http://10.244.1.10/; sleep 3; done']\n\nservices",
        "command: [/nonexistent/program]\n\nservices",
    );
    let plan = Plan::from_yaml(&yaml, "broken.yaml").expect("valid file");
    let err = Lab::up_for_test(&plan)
        .err()
        .expect("cannot start /nonexistent/program");
    assert!(err.to_string().contains("/nonexistent/program"), "{err}");
    let prefix = format!("obslab-{}-", std::process::id());
    let left: Vec<_> = fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
}

#[test]
fn a_killed_run_is_cleaned_up() {
    let before = Machine::now();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_lab-holder"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("lab-holder");
    let mut name = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut name)
        .expect("lab name");
    let name = name.trim().to_owned();
    assert!(Path::new(lab::STATE_DIR).join(&name).exists());
    holder.kill().expect("SIGKILL");
    holder.wait().unwrap();

    // Its containers outlive it (they are in sessions of their own) ...
    let removed = lab::cleanup_stale();
    assert!(removed.contains(&format!("lab {name}")), "{removed:?}");
    // ... until the cleanup of killed runs.
    assert_lab_gone(&name, &before);
}
