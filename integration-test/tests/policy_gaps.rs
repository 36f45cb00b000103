//! No silent gaps: every pod a policy selects and does not (fully) hold
//! shows in `observer_policy_unenforced_pods{reason}`, for each reason, and
//! what can be retried is, without waiting for a change.

use std::{fs, path::PathBuf};

use integration_test::{
    Observer, Scrape, TempDir,
    container::{Connect, connect_from, container},
};
use lab::{Lab, Plan};

/// One policy per reason, each on a pod of its own.
fn policies() -> String {
    // One more CIDR than the kernel's map holds.
    let cidrs: Vec<String> = (0..16_385u32)
        .map(|i| format!("\"172.16.{}.{}/32\"", i / 256, i % 256))
        .collect();
    let ports: Vec<String> = (1..=observer_common::MAX_POD_RULES + 1)
        .map(|p| p.to_string())
        .collect();
    format!(
        "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: shop-sidecar}}
spec:
  podSelector: {{namespace: shop, matchLabels: {{app: shop}}}}
  mode: enforce
  rules:
    - {{name: sidecar-ok, class: localhost, ports: [8080], clientContainers: [sidecar], action: allow}}
    - {{name: no-one-else, class: localhost, ports: [8080], action: deny}}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: web-out}}
spec:
  podSelector: {{namespace: default, matchLabels: {{app: web}}}}
  mode: enforce
  rules:
    - {{name: nowhere, class: external, action: deny}}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: client-ports}}
spec:
  podSelector: {{namespace: default, matchLabels: {{app: client}}}}
  mode: enforce
  rules:
    - {{name: many, class: external, ports: [{}], action: deny}}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: metrics-cidrs}}
spec:
  podSelector: {{namespace: default, matchLabels: {{app: metrics}}}}
  mode: enforce
  rules:
    - {{name: huge, class: external, cidrs: [{}], action: deny}}
",
        ports.join(", "),
        cidrs.join(", ")
    )
}

fn unenforced(m: &Scrape, pod: &str, reason: &str) -> f64 {
    m.sum(
        "observer_policy_unenforced_pods",
        &[("pod", pod), ("reason", reason)],
    )
}

#[test]
fn every_pod_a_policy_does_not_hold_is_told_with_its_reason() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("policy-gaps");

    // The inventory as the lab wrote it, but: the shop's sidecar has a new
    // cgroup not made yet (a container the runtime is about to start), and
    // the web pod's cgroups are plain directories (no hooks attach there).
    let mut inventory = lab.inventory().clone();
    let shop = inventory
        .pods
        .iter_mut()
        .find(|p| p.name == "shop")
        .unwrap();
    let sidecar = shop
        .containers
        .iter_mut()
        .find(|c| c.name == "sidecar")
        .unwrap();
    let later: PathBuf = sidecar.cgroup.with_file_name("sidecar-restarted");
    sidecar.cgroup = later.clone();
    let web = inventory.pods.iter_mut().find(|p| p.name == "web").unwrap();
    for c in &mut web.containers {
        c.cgroup = dir.path().join("not-a-cgroup").join(&c.name);
        fs::create_dir_all(&c.cgroup).unwrap();
    }
    // And a pod whose namespace never appears: it is never attached.
    let mut ghost = inventory
        .pods
        .iter()
        .find(|p| p.name == "metrics")
        .unwrap()
        .clone();
    ghost.name = "ghost".into();
    ghost.uid = "ghost".into();
    ghost.ip = "10.244.1.250".parse().unwrap();
    ghost.netns = Some("/var/run/netns/obslab-gaps-never".into());
    ghost.containers.clear();
    inventory.pods.push(ghost);
    let inventory_path = dir.write(
        "inventory.json",
        &serde_json::to_string(&inventory).unwrap(),
    );
    let policy = dir.write("policy.yaml", &policies());
    let observer = Observer::start(&["--inventory", &inventory_path, "--policy", &policy]);

    let m = observer.eventually("every reason", |m| {
        unenforced(m, "shop", "no_cgroup") == 1.0
            && unenforced(m, "web", "no_hooks") == 1.0
            && unenforced(m, "client", "too_many_rules") == 1.0
            && unenforced(m, "metrics", "map_full") == 1.0
            && unenforced(m, "ghost", "not_attached") == 1.0
    });
    assert_eq!(
        m.sum("observer_policy_unenforced_pods", &[]),
        5.0,
        "nothing else: {}",
        observer.log()
    );
    let log = observer.log();
    for reason in [
        "no_cgroup",
        "no_hooks",
        "too_many_rules",
        "map_full",
        "not_attached",
    ] {
        assert!(log.contains(reason), "no log line for {reason}: {log}");
    }

    // What is held is held: the shop's app may not reach 8080 over localhost.
    let (app, shop_netns) = container(&lab, "shop", "shop", "app");
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::NotPermitted
    );

    // The sidecar's cgroup appears: the observer finds it on its own (a
    // retry, no event), and the gauge clears.
    fs::create_dir(&later).unwrap();
    observer.eventually("the sidecar's cgroup found", |m| {
        unenforced(m, "shop", "no_cgroup") == 0.0
    });
    assert!(observer.terminate().success());
    fs::remove_dir(&later).unwrap();
}
