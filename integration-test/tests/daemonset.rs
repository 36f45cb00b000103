//! The DaemonSet, run for real: the observer's own image (built as `cargo
//! xtask image` builds it, around the binary under test) as a pod that a
//! lab node's containerd makes, with what deploy/daemonset.yaml and
//! deploy/configmap.yaml say, read from them: host PID namespace, the
//! capabilities and nothing else, a read-only root filesystem, no privilege
//! escalation, the runtime's seccomp profile, the mounts, the environment,
//! the service account's token for the API server (https, in-cluster
//! configuration). From inside its pod the observer finds the node's pods in
//! Kubernetes mode, names their containers, and enforces a policy. Then
//! least privilege: without any one of the listed capabilities, something
//! the observer must do fails, and the test says what.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, thread, time::Duration};

use integration_test::{
    FakeApi, Scrape,
    container::{Connect, connect_from, container},
    kube_api::{Kind, pod_object},
    observer::https_get,
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use lab::{ApiServer, Lab, ManifestPod, Netns, Plan, Runtime};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const WAIT: Duration = Duration::from_secs(60);
/// The API server, on node-1's address.
const API: &str = "172.18.0.2:6443";

/// In the shop pod, only the sidecar may reach the app's 8080, also while
/// no observer runs (the policy fails closed).
const POLICY: &str = "apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-localhost}
spec:
  podSelector: {namespace: shop, matchLabels: {app: shop}}
  mode: enforce
  failureMode: closed
  rules:
  - {name: sidecar, class: localhost, ports: [8080], clientContainers: [sidecar], action: allow}
  - {name: no-one-else, class: localhost, ports: [8080], action: deny}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: observer-namespace}
spec:
  podSelector: {namespace: observer}
  mode: enforce
  defaultAction: deny
  rules:
  - {name: nothing-out, class: any, action: deny}
";

/// The DaemonSet's pod as the manifests say, with the test's policy in the
/// policy ConfigMap.
fn observer_pod(api: &ApiServer) -> ManifestPod {
    let daemonset: DaemonSet = serde_norway::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/daemonset.yaml")).unwrap(),
    )
    .expect("deploy/daemonset.yaml");
    let namespace = daemonset.metadata.namespace.clone().unwrap();
    let template = daemonset.spec.unwrap().template;
    let text = std::fs::read_to_string(format!("{DEPLOY}/configmap.yaml")).unwrap();
    let mut config_maps: Vec<ConfigMap> = text
        .split("\n---\n")
        .map(|doc| serde_norway::from_str(doc).expect("deploy/configmap.yaml"))
        .collect();
    for config_map in &mut config_maps {
        if let Some(data) = &mut config_map.data
            && data.contains_key("policy.yaml")
        {
            data.insert("policy.yaml".into(), POLICY.into());
        }
    }
    ManifestPod {
        namespace,
        name: "observer-node-1".into(),
        labels: template.metadata.and_then(|m| m.labels).unwrap_or_default(),
        spec: template.spec.expect("a pod template"),
        config_maps,
        api: Some(api.clone()),
    }
}

/// The uninstall's cleanup pod, as deploy/cleanup says. The lab's kubelet
/// runs no init containers: its main container runs the same cleanup.
fn cleanup_pod() -> ManifestPod {
    let daemonset: DaemonSet = serde_norway::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/cleanup/daemonset.yaml")).unwrap(),
    )
    .expect("deploy/cleanup/daemonset.yaml");
    let namespace = daemonset.metadata.namespace.clone().unwrap();
    let template = daemonset.spec.unwrap().template;
    let mut spec = template.spec.expect("a pod template");
    let init = spec.init_containers.take().unwrap_or_default();
    assert!(
        init.iter()
            .all(|c| c.args == spec.containers[0].args.as_ref().map(|a| a[..3].to_vec())),
        "the init container runs the main container's cleanup"
    );
    ManifestPod {
        namespace,
        name: "observer-cleanup-node-1".into(),
        labels: template.metadata.and_then(|m| m.labels).unwrap_or_default(),
        spec,
        config_maps: Vec::new(),
        api: None,
    }
}

/// The observer's image archive (`cargo xtask test` builds it).
fn image() -> PathBuf {
    std::env::var_os("OBSERVER_IMAGE")
        .map(PathBuf::from)
        .expect("OBSERVER_IMAGE: run through `cargo xtask test`, which builds the image")
}

/// The observer pod's endpoint, reached from its node.
struct Endpoint<'a> {
    node: &'a Netns,
    addr: SocketAddr,
}

/// The scraper's service account, which the API lets read /metrics and
/// /flows (the DaemonSet serves securely, as deploy/ configures it).
const SCRAPER: (&str, &str) = (
    "scraper-token",
    "system:serviceaccount:monitoring:prometheus-k8s",
);

impl Endpoint<'_> {
    /// HTTPS from the node, with the scraper's token.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.addr;
        let path = path.to_owned();
        self.node
            .run(move || https_get(addr, &path, Some(SCRAPER.0)))
            .ok()
            .flatten()
    }

    fn eventually(&self, lab: &Lab, what: &str, condition: impl Fn(&Scrape) -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some((200, body)) = self.get("/metrics")
                && condition(&Scrape::parse(&body))
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within {WAIT:?}; the observer's log:\n{}",
                lab.log("observer", "observer-node-1", "observer")
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn the_daemonset_runs_from_its_image_with_only_its_capabilities() {
    let mut lab =
        Lab::up_for_test(&Plan::default_lab().with_runtime(Runtime::Containerd)).expect("lab up");
    lab.load_image(&image()).expect("the observer's image");
    let node = lab.node_netns("node-1");
    let (api, server) = FakeApi::serve_tls_in(&node, API.parse().unwrap());
    api.load(lab.inventory());
    api.add_token(SCRAPER.0, SCRAPER.1);
    for path in ["/metrics", "/flows"] {
        api.grant(SCRAPER.1, path);
    }

    let pod = lab
        .run_manifest_pod("node-1", &observer_pod(&server))
        .unwrap_or_else(|e| panic!("the observer's pod: {e}"));
    // The API lists the observer's own pod too, as a real one does.
    api.apply(Kind::Pods, pod_object(&pod));
    let endpoint = Endpoint {
        node: &node,
        addr: SocketAddr::new(pod.ip.into(), 9465),
    };
    let local: Vec<String> = lab
        .inventory()
        .pods
        .iter()
        .filter(|p| p.node == "node-1")
        .map(|p| p.name.clone())
        .collect();
    endpoint.eventually(&lab, "node-1's pods attached, its own too", |m| {
        local
            .iter()
            .all(|p| m.sum("observer_programs_attached", &[("pod", p)]) == 3.0)
            && m.sum("observer_programs_attached", &[("pod", "observer-node-1")]) == 3.0
    });
    // Ready once every kind the API serves is listed (the readiness probe's
    // answer).
    let deadline = std::time::Instant::now() + WAIT;
    while endpoint.get("/readyz").is_none_or(|r| r.0 != 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready; the log:\n{}",
            lab.log("observer", "observer-node-1", "observer")
        );
        thread::sleep(Duration::from_millis(250));
    }
    endpoint.eventually(&lab, "containers named, by the API's ids", |m| {
        let packets = "observer_flow_packets_total";
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
                    ("pod", "client"),
                    ("class", "service"),
                    ("peer", "kube-dns"),
                    ("client_container", "to-service"),
                ],
            ) > 0.0
    });
    let (sidecar, netns) = container(&lab, "shop", "shop", "sidecar");
    let (app, _) = container(&lab, "shop", "shop", "app");
    assert_eq!(
        connect_from(&sidecar, &netns, "127.0.0.1", 8080),
        Connect::Connected
    );
    assert_eq!(
        connect_from(&app, &netns, "127.0.0.1", 8080),
        Connect::NotPermitted,
        "the policy from the ConfigMap, enforced"
    );
    // A policy selects the observer's own pod and denies everything: it is
    // never held to it (it would cut the observer off from the API server).
    let own = &pod.containers[0];
    assert_eq!(
        connect_from(&own.cgroup, pod.netns.as_ref().unwrap(), "172.18.0.2", 6443),
        Connect::Connected,
        "the observer's own pod was held to a policy"
    );
    // Deleted (SIGTERM, as the kubelet stops it): the policy that fails
    // closed stays, pinned on the node's bpffs.
    lab.delete_manifest_pod("observer", "observer-node-1")
        .expect("delete");
    assert_eq!(
        connect_from(&app, &netns, "127.0.0.1", 8080),
        Connect::NotPermitted,
        "a policy that fails closed, enforced with no observer"
    );
    assert_eq!(
        connect_from(&sidecar, &netns, "127.0.0.1", 8080),
        Connect::Connected
    );
    // The uninstall's cleanup, as a pod of deploy/cleanup: nothing is left.
    lab.run_manifest_pod("node-1", &cleanup_pod())
        .unwrap_or_else(|e| panic!("the cleanup pod: {e}"));
    let deadline = std::time::Instant::now() + WAIT;
    let log = loop {
        let log = lab.log("observer", "observer-cleanup-node-1", "done");
        if log.contains("removed") || std::time::Instant::now() > deadline {
            break log;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        log.contains("removed") && !log.contains("removed 0 pins"),
        "the cleanup removed the pins: {log}"
    );
    assert_eq!(
        connect_from(&app, &netns, "127.0.0.1", 8080),
        Connect::Connected,
        "nothing left enforcing after the cleanup"
    );
    lab.delete_manifest_pod("observer", "observer-cleanup-node-1")
        .expect("delete");

    // Least privilege: each capability in turn taken away.
    let mut table = BTreeMap::new();
    let pod = observer_pod(&server);
    let added = pod.spec.containers[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .expect("the DaemonSet adds capabilities");
    for capability in &added {
        let mut without = pod.clone();
        let caps = without.spec.containers[0]
            .security_context
            .as_mut()
            .unwrap()
            .capabilities
            .as_mut()
            .unwrap();
        caps.add.as_mut().unwrap().retain(|c| c != capability);
        let outcome = match lab.run_manifest_pod("node-1", &without) {
            Err(error) => {
                lab.delete_manifest_pod("observer", "observer-node-1")
                    .expect("delete");
                format!("does not start: {}", last_line(&error.to_string()))
            }
            Ok(pod) => {
                let endpoint = Endpoint {
                    node: &node,
                    addr: SocketAddr::new(pod.ip.into(), 9465),
                };
                let outcome = degraded(&lab, &endpoint, &local, &app, &netns);
                lab.delete_manifest_pod("observer", "observer-node-1")
                    .expect("delete");
                outcome
            }
        };
        println!("without {capability}: {outcome}");
        table.insert(capability.clone(), outcome);
    }
    println!("| capability | without it |\n|---|---|");
    for (capability, outcome) in &table {
        println!("| `{capability}` | {outcome} |");
    }
    // Each is needed; but from Linux 6.6 tc programs attach as TCX links,
    // which CAP_SYS_ADMIN permits: CAP_NET_ADMIN is for older kernels'
    // netlink.
    for (capability, outcome) in &table {
        let needed = capability != "NET_ADMIN" || kernel() < (6, 6);
        assert_eq!(
            !outcome.starts_with("nothing"),
            needed,
            "without {capability}: {outcome}"
        );
    }
    drop(api);
}

/// What goes wrong with the observer running without a capability, after
/// it had time to attach every pod; "nothing" if all works.
fn degraded(
    lab: &Lab,
    endpoint: &Endpoint,
    local: &[String],
    app: &std::path::Path,
    netns: &std::path::Path,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Some((200, body)) = endpoint.get("/metrics") {
            let m = Scrape::parse(&body);
            let attached = local
                .iter()
                .filter(|p| m.sum("observer_programs_attached", &[("pod", p)]) == 3.0)
                .count();
            if attached == local.len() {
                break;
            }
        }
        thread::sleep(Duration::from_millis(250));
    }
    let log = lab.log("observer", "observer-node-1", "observer");
    let Some((_, body)) = endpoint.get("/metrics") else {
        return format!("no endpoint: {}", last_line(&log));
    };
    let m = Scrape::parse(&body);
    let attached = local
        .iter()
        .filter(|p| m.sum("observer_programs_attached", &[("pod", p)]) == 3.0)
        .count();
    let mut problems = Vec::new();
    if attached < local.len() {
        problems.push(format!("{attached} of {} pods attached", local.len()));
    }
    let errors = m.sum("observer_errors_total", &[]);
    if errors > 0.0 {
        problems.push(format!("{errors} errors counted"));
    }
    if connect_from(app, netns, "127.0.0.1", 8080) != Connect::NotPermitted {
        problems.push("the policy not enforced".into());
    }
    if problems.is_empty() {
        "nothing".into()
    } else {
        format!("{}; the log: {}", problems.join(", "), last_line(&log))
    }
}

/// The running kernel's version (major, minor).
fn kernel() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The last line that says something (a log's, an error's).
fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("WARN"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}
