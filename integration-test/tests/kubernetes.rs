//! Kubernetes mode on the node lab: the observer of node-1 learns its pods
//! from an API server (a stand-in on loopback serving the lab's objects),
//! finds them on the node through /proc and their cgroups, and follows pods
//! the API adds and deletes. The API server is not up when the observer
//! starts: it must serve its metrics and wait.

use std::time::Duration;

use integration_test::{
    FakeApi, Observer, TempDir,
    container::{Connect, connect_from, container},
    kube_api::{self, Kind},
    observer::{free_port, http_get},
};
use lab::{Lab, Plan, Runtime};
use serde_json::json;

#[test]
fn kubernetes_mode_follows_the_api_and_finds_pods_on_the_node() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("kube");
    let api_addr = free_port();
    let kubeconfig = kube_api::kubeconfig(api_addr, dir.path());
    let kubeconfig = kubeconfig.to_str().unwrap();
    // A policy, to see that Kubernetes mode enforces it too.
    let policy = dir.write(
        "policy.yaml",
        "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: client-not-shop}\n\
         spec:\n  podSelector: {namespace: default, matchLabels: {app: client}}\n  mode: enforce\n\
         \x20 rules:\n  - {class: service, service: {namespace: shop, name: shop}, action: deny}\n",
    );
    let observer = Observer::spawn(&[
        "--policy",
        &policy,
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        kubeconfig,
        "--service-cidr",
        "10.96.0.0/16",
        "--collect-interval",
        "1s",
        "--series-grace",
        "1s",
    ]);

    // No API server yet: alive, not ready, the failures counted.
    observer.eventually("a counted API error", |m| {
        m.sum("observer_errors_total", &[("kind", "kubernetes_api")]) >= 1.0
    });
    assert_eq!(
        http_get(observer.addr(), "/healthz").map(|r| r.0),
        Some(200)
    );
    assert_eq!(http_get(observer.addr(), "/readyz").map(|r| r.0), Some(503));

    // The API server comes up: the watches back off and retry.
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    let mut observer = observer;
    observer.wait_ready(Duration::from_secs(60));

    let local: Vec<&str> = lab
        .inventory()
        .pods
        .iter()
        .filter(|p| p.node == "node-1")
        .map(|p| p.name.as_str())
        .collect();
    let m = observer.eventually("node-1's pods attached", |m| {
        local
            .iter()
            .all(|pod| m.sum("observer_programs_attached", &[("pod", pod)]) == 3.0)
    });
    assert!(
        !m.has("observer_programs_attached", "pod", "remote"),
        "node-2's pod"
    );
    assert_eq!(
        m.sum("observer_pods", &[("state", "attached")]),
        local.len() as f64
    );

    // Containers named through the pod status' ids and their cgroups; peers
    // and Services named from the API.
    let packets = "observer_flow_packets_total";
    observer.eventually("sidecar to app on localhost", |m| {
        m.sum(
            packets,
            &[
                ("pod", "shop"),
                ("class", "localhost"),
                ("client_container", "sidecar"),
                ("server_container", "app"),
            ],
        ) > 0.0
    });
    observer.eventually("client to Service web, and to pod web", |m| {
        m.sum(
            packets,
            &[("pod", "client"), ("class", "service"), ("peer", "web")],
        ) > 0.0
            && m.sum(
                packets,
                &[("pod", "client"), ("class", "pod"), ("peer", "web")],
            ) > 0.0
    });
    observer.eventually("remote (node-2) named as web's peer", |m| {
        m.sum(
            packets,
            &[("pod", "web"), ("class", "pod"), ("peer", "remote")],
        ) > 0.0
    });

    // The policy, compiled from the API's names, enforced at connect.
    let (to_pod, netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        connect_from(&to_pod, &netns, "10.96.0.20", 8080),
        Connect::NotPermitted
    );
    assert_eq!(
        connect_from(&to_pod, &netns, "10.96.0.10", 80),
        Connect::Connected
    );

    // A host-network pod: recognised, not attached.
    api.apply(
        Kind::Pods,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "kube-system", "name": "kube-proxy",
                         "uid": "5b0f3c1e-6a3d-4c2b-9e8f-7a6b5c4d3e2f"},
            "spec": {"nodeName": "node-1", "hostNetwork": true, "containers": [{"name": "kube-proxy"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }),
    );
    observer.eventually("the host-network pod counted", |m| {
        m.sum("observer_pods", &[("state", "host_network")]) == 1.0
    });
    assert!(
        !observer
            .scrape()
            .has("observer_programs_attached", "pod", "kube-proxy")
    );

    // A pod the API reports but the node does not run (yet): waiting.
    api.apply(
        Kind::Pods,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "default", "name": "starting",
                         "uid": "9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
            "status": {"phase": "Pending"},
        }),
    );
    observer.eventually("the pod not on the node yet counted as waiting", |m| {
        m.sum("observer_pods", &[("state", "waiting")]) == 1.0
    });

    // Deleted from the API: detached, though its processes still run.
    let pipes = lab.pod("default", "pipes").expect("pipes pod").clone();
    api.delete(Kind::Pods, &pipes.uid);
    observer.eventually("pipes detached", |m| {
        !m.has("observer_programs_attached", "pod", "pipes")
    });
    // Created again: attached again.
    api.apply(Kind::Pods, kube_api::pod_object(&pipes));
    observer.eventually("pipes attached again", |m| {
        m.sum("observer_programs_attached", &[("pod", "pipes")]) == 3.0
    });

    assert!(observer.terminate().success());
    drop(api);
}

/// In Kubernetes mode the Services are known once the API is listed: a
/// policy naming one that does not exist is refused then.
/// A rule naming a Service the API does not have (yet) waits for it; the
/// rest of the file holds from the start, and the gauge says which pods
/// wait. (It used to refuse the whole file once the API was listed: after
/// a restart, no policy at all.)
#[test]
fn a_rule_naming_a_service_that_does_not_exist_waits_and_the_rest_holds() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("kube-svc");
    let api_addr = free_port();
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    let kubeconfig = kube_api::kubeconfig(api_addr, dir.path());
    let policy = dir.write(
        "policy.yaml",
        "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {namespace: default, matchLabels: {app: client}}\n  mode: enforce\n  rules:\n  - {name: later, class: service, service: {namespace: shop, name: later}, action: deny}\n  - {name: no-shop, class: service, service: {namespace: shop, name: shop}, action: deny}\n",
    );
    let observer = Observer::start(&[
        "--policy",
        &policy,
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]);
    let waiting = |m: &integration_test::Scrape| {
        m.sum(
            "observer_policy_unenforced_pods",
            &[("pod", "client"), ("reason", "unknown_service")],
        )
    };
    let m = observer.eventually("the rule waits", |m| waiting(m) == 1.0);
    assert_eq!(
        m.sum("observer_policy_reloads_total", &[("result", "refused")]),
        0.0
    );
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        connect_from(&client, &client_netns, "10.96.0.20", 8080),
        Connect::NotPermitted,
        "the rest of the file holds"
    );

    // The Service is made: its rule holds, and nothing waits any more.
    api.apply(
        Kind::Services,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "shop", "name": "later", "uid": "svc-shop-later"},
            "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]},
        }),
    );
    observer.eventually("the rule holds", |m| waiting(m) == 0.0);
    assert_eq!(
        connect_from(&client, &client_netns, "10.96.0.30", 80),
        Connect::NotPermitted
    );
    assert!(observer.terminate().success());
}

/// In the shop pod, only the sidecar may reach the app's 8080 over
/// localhost.
const SHOP_LOCALHOST: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-localhost}
spec:
  podSelector: {namespace: shop, matchLabels: {app: shop}}
  mode: enforce
  rules:
  - {name: sidecar, class: localhost, ports: [8080], clientContainers: [sidecar], action: allow}
  - {name: no-one-else, class: localhost, ports: [8080], action: deny}
";

/// Kubernetes mode on real pods: containerd made them through CRI (the lab
/// as their kubelet), the API reports them as a real API server does, and
/// the observer finds them through /proc and the runtime's cgroups. A
/// container restarted by the runtime (a new id and cgroup), a pod deleted
/// and made again under the same name, and a pod whose sandbox runs alone
/// for a while are all followed, named and held to the policy.
#[test]
fn kubernetes_mode_follows_real_pods_through_restarts_and_recreation() {
    let mut lab =
        Lab::up_for_test(&Plan::default_lab().with_runtime(Runtime::Containerd)).expect("lab up");
    let dir = TempDir::new("kube-containerd");
    let api_addr = free_port();
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    let kubeconfig = kube_api::kubeconfig(api_addr, dir.path());
    let policy = dir.write("policy.yaml", SHOP_LOCALHOST);
    // The node's containerd keeps its bundles in the node's own /run: seen
    // through its process, as the DaemonSet sees the node's through PID 1.
    let bundles = format!(
        "/proc/{}/root/run/containerd/io.containerd.runtime.v2.task/k8s.io",
        lab.containerd_pid("node-1").expect("node-1's containerd")
    );
    let observer = Observer::start(&[
        "--container-bundles",
        &bundles,
        "--policy",
        &policy,
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--collect-interval",
        "1s",
        "--series-grace",
        "1s",
    ]);
    let local: Vec<String> = lab
        .inventory()
        .pods
        .iter()
        .filter(|p| p.node == "node-1")
        .map(|p| p.name.clone())
        .collect();
    observer.eventually("node-1's pods attached", |m| {
        local
            .iter()
            .all(|pod| m.sum("observer_programs_attached", &[("pod", pod)]) == 3.0)
    });
    let packets = "observer_flow_packets_total";
    let fetcher_to_web = [
        ("pod", "web"),
        ("class", "localhost"),
        ("direction", "request"),
        ("client_container", "fetcher"),
        ("server_container", "web"),
    ];
    observer.eventually("fetcher -> web, named through containerd's ids", |m| {
        m.sum(packets, &fetcher_to_web) > 0.0
    });
    observer.eventually(
        "the client's DNS queries, with the container that asked",
        |m| {
            m.sum(
                packets,
                &[
                    ("pod", "client"),
                    ("class", "service"),
                    ("peer_namespace", "kube-system"),
                    ("peer", "kube-dns"),
                    ("client_container", "to-service"),
                ],
            ) > 0.0
        },
    );
    let enforced = |lab: &Lab, what: &str| {
        let (sidecar, netns) = container(lab, "shop", "shop", "sidecar");
        let (app, _) = container(lab, "shop", "shop", "app");
        assert_eq!(
            connect_from(&sidecar, &netns, "127.0.0.1", 8080),
            Connect::Connected,
            "{what}: the sidecar"
        );
        assert_eq!(
            connect_from(&app, &netns, "127.0.0.1", 8080),
            Connect::NotPermitted,
            "{what}: anyone else"
        );
    };
    enforced(&lab, "first");

    // The sidecar restarted by the runtime, and the API not told yet (the
    // kubelet updates the status later): the new container is named from
    // its bundle the moment its cgroup appears, before its process runs,
    // so its very first request (it polls at once) is the sidecar's,
    // allowed, not an unknown container's, denied.
    let verdicts = |m: &integration_test::Scrape, rule: &str| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("pod", "shop"), ("rule", rule)],
        )
    };
    let before = observer.scrape();
    let allowed = verdicts(&before, "sidecar");
    let shop = lab
        .restart_container("shop", "shop", "sidecar")
        .expect("restart");
    // Its first requests (the old one may have made one more before it
    // stopped).
    let m = observer.eventually("the restarted sidecar's requests allowed", |m| {
        verdicts(m, "sidecar") >= allowed + 3.0 || verdicts(m, "unknown-container") > 0.0
    });
    assert_eq!(
        verdicts(&m, "unknown-container"),
        0.0,
        "the restarted sidecar was taken for an unknown container"
    );
    let (sidecar, netns) = container(&lab, "shop", "shop", "sidecar");
    assert_eq!(
        connect_from(&sidecar, &netns, "127.0.0.1", 8080),
        Connect::Connected,
        "the restarted sidecar, the API not told"
    );
    let restarts = lab.restarts("shop", "shop");
    api.apply(Kind::Pods, kube_api::pod_object_restarted(&shop, &restarts));

    // The runtime restarts a container: a new id, a new cgroup, one more
    // restart in the pod's status.
    let old = lab.pod("default", "web").unwrap().clone();
    let web = lab
        .restart_container("default", "web", "fetcher")
        .expect("restart");
    let (old_id, new_id) = (&old.containers[1].id, &web.containers[1].id);
    assert_ne!(old_id, new_id);
    let restarts = lab.restarts("default", "web");
    assert_eq!(restarts["fetcher"], 1);
    api.apply(Kind::Pods, kube_api::pod_object_restarted(&web, &restarts));
    let before = observer.scrape().sum(packets, &fetcher_to_web);
    observer.eventually("the restarted fetcher's requests, named", |m| {
        m.sum(packets, &fetcher_to_web) > before + 2.0
    });
    assert!(
        !observer.scrape().has(packets, "client_container", new_id),
        "the new container went by its id"
    );

    // The shop pod deleted, and made again under its name: a new UID. Its
    // sandbox runs alone for a while (containers being created).
    let shop = lab.pod("shop", "shop").unwrap().clone();
    lab.delete_pod("shop", "shop").expect("delete");
    api.delete(Kind::Pods, &shop.uid);
    observer.eventually("the deleted pod detached", |m| {
        !m.has("observer_programs_attached", "pod", "shop")
    });
    let sandbox = lab.create_pod("shop", "shop", true).expect("a new sandbox");
    assert_ne!(sandbox.uid, shop.uid);
    assert!(sandbox.containers.is_empty());
    api.apply(
        Kind::Pods,
        kube_api::pending_pod_object(&sandbox, &["app", "sidecar"]),
    );
    observer.eventually("the new pod attached through its sandbox alone", |m| {
        m.sum("observer_programs_attached", &[("pod", "shop")]) == 3.0
    });
    let shop = lab.start_containers("shop", "shop").expect("containers");
    api.apply(Kind::Pods, kube_api::pod_object(&shop));
    let sidecar_to_app = [
        ("pod", "shop"),
        ("class", "localhost"),
        ("direction", "request"),
        ("client_container", "sidecar"),
        ("server_container", "app"),
    ];
    observer.eventually("the new pod's sidecar -> app, named", |m| {
        m.sum(packets, &sidecar_to_app) > 0.0
    });
    enforced(&lab, "the pod made again");
    assert!(observer.terminate().success());
}

/// Kubernetes mode names a pod's namespace by a process of it
/// (`/proc/<pid>/ns/net`). When that process exits, the pod lives on in its
/// other processes: it stays attached and counted (before, its flows were
/// dropped at every collection after that, and it was never announced
/// again).
#[test]
fn a_pod_stays_observed_when_the_process_it_was_found_by_exits() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("kube-process-exits");
    let api_addr = free_port();
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    let kubeconfig = kube_api::kubeconfig(api_addr, dir.path());
    let observer = Observer::start(&[
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--collect-interval",
        "1s",
    ]);
    let inbound = |m: &integration_test::Scrape| {
        m.sum(
            "observer_flow_packets_total",
            &[("pod", "web"), ("direction", "ingress")],
        )
    };
    observer.eventually("the client's requests to web", |m| inbound(m) > 0.0);
    // The process the observer found web's namespace through.
    let log = strip_colors(&observer.log());
    let pid: i32 = log
        .lines()
        .find(|l| l.contains("attached") && l.contains("netns=default/web"))
        .and_then(|l| l.split("path=/proc/").nth(1))
        .and_then(|rest| rest.split('/').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("web's attach in the log:\n{log}"));
    // SAFETY: a process of the lab's, which the test owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Collections go on; the pod's other container holds its namespace.
    let before = inbound(&observer.scrape());
    std::thread::sleep(Duration::from_secs(4));
    observer.eventually("web still counted after the process went", |m| {
        m.sum("observer_programs_attached", &[("pod", "web")]) == 3.0 && inbound(m) > before
    });
    assert!(observer.terminate().success());
}

/// The log without its terminal colors.
fn strip_colors(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
