//! One table of expected rows, on every dataplane users run: kube-proxy
//! (iptables DNAT in the node), a socket load balancer (Cilium's kube-proxy
//! replacement: the ClusterIP is translated at `connect()`, inside the pod),
//! a translation inside the pod (iptables DNAT in the pod's own `OUTPUT`
//! chain), and a sidecar mesh (the pod's outbound TCP redirected to a proxy
//! container); on the lab's process pods and on real pods (containerd). The
//! same (pod, container, class, peer, Service) rows must show, through a
//! real Prometheus, whatever the dataplane, the cluster DNS queries among
//! them; and a policy on the Service must apply to it.

use std::time::Duration;

use integration_test::{
    Observer, Prometheus, TempDir,
    container::{Connect, connect_from, container},
};
use lab::{Lab, Plan, Runtime};

const WAIT: Duration = Duration::from_secs(40);

/// A web server and its Service, and a client pod calling both the Service
/// and the pod, with a StatsD-style one-way UDP pair inside the client pod.
const LAB: &str = r#"
apiVersion: observer-lab/v1
kind: Lab
name: dataplanes
runtime: RUNTIME
network:
  dataplane: DATAPLANE
nodes:
  - name: node-1
    podCIDR: 10.244.1.0/24
pods:
  - name: web
    node: node-1
    ip: 10.244.1.10
    labels: {app: web}
    containers:
      - name: web
        command: [python3, -m, http.server, "80", --bind, 0.0.0.0, --directory, /tmp]
        ports: [{containerPort: 80}]
  - name: client
    node: node-1
    labels: {app: client}
    mesh: MESH
    containers:
      - name: to-service
        command: [sh, -c, 'for i in $(seq 600); do curl -s -m 2 -o /dev/null http://web/; sleep 1; done']
      - name: to-pod
        command: [sh, -c, 'for i in $(seq 600); do curl -s -m 2 -o /dev/null http://10.244.1.10/; sleep 1; done']
      - name: stats
        command: [python3, -c, "import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range(600):\n    s.sendto(b'x:1|c', ('127.0.0.1', 8125)); time.sleep(1)"]
      - name: agent
        command: [python3, -c, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 8125)); s.settimeout(600)\nfor i in range(600): s.recv(512)"]
services:
  - name: web
    clusterIP: 10.96.0.10
    selector: {app: web}
    ports: [{port: 80, targetPort: 80}]
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    KubeProxy,
    SocketLb,
    PodDnat,
    Sidecar,
}

/// A row that must have traffic: a selector of `observer_flow_packets_total`.
struct Row {
    what: &'static str,
    selector: String,
}

/// The expected rows: the same on every dataplane, but behind a sidecar,
/// where each call of the client's is a localhost call to the proxy that
/// says where it was going, and the proxy makes the call.
fn expected(mode: Mode) -> Vec<Row> {
    let sidecar = mode == Mode::Sidecar;
    let caller = |container: &'static str| if sidecar { "proxy" } else { container };
    let mut rows = vec![
        Row {
            what: "the client calls the Service, by name",
            selector: format!(
                r#"pod="client",client_container="{}",class="service",direction="egress",peer_namespace="default",peer="web",port="80""#,
                caller("to-service")
            ),
        },
        Row {
            what: "the Service's answers, by name",
            selector: format!(
                r#"pod="client",client_container="{}",class="service",direction="ingress",peer="web""#,
                caller("to-service")
            ),
        },
        Row {
            what: "the client calls the pod",
            selector: format!(
                r#"pod="client",client_container="{}",class="pod",direction="egress",peer="web",port="80""#,
                caller("to-pod")
            ),
        },
        Row {
            what: "the server's container receives",
            selector: r#"pod="web",server_container="web",class="pod",direction="ingress",peer="client",port="80""#.into(),
        },
        Row {
            what: "the server's container answers",
            selector: r#"pod="web",server_container="web",class="pod",direction="egress",peer="client""#.into(),
        },
        Row {
            // UDP is not redirected to a sidecar: the container asks.
            what: "the name asked of the cluster's DNS, by the container that calls",
            selector: r#"pod="client",client_container="to-service",class="service",direction="egress",peer_namespace="kube-system",peer="kube-dns",protocol="udp",port="53""#.into(),
        },
        Row {
            what: "the DNS server's answers",
            selector: r#"pod="kube-dns",server_container="dnsmasq",class="pod",direction="egress",peer="client",protocol="udp""#.into(),
        },
        Row {
            what: "one-way datagrams name their receiver",
            selector: r#"pod="client",class="localhost",protocol="udp",port="8125",client_container="stats",server_container="agent""#.into(),
        },
    ];
    if sidecar {
        rows.extend([
            Row {
                what: "the app's call to the Service goes to the proxy, and says where to",
                selector: r#"pod="client",class="localhost",direction="request",port="15001",client_container="to-service",server_container="proxy",original_class="service",original_namespace="default",original_peer="web",original_port="80""#.into(),
            },
            Row {
                what: "the proxy's answers are the same conversation",
                selector: r#"pod="client",class="localhost",direction="response",port="15001",client_container="to-service",server_container="proxy",original_peer="web""#.into(),
            },
            Row {
                what: "the app's call to the pod likewise",
                selector: r#"pod="client",class="localhost",client_container="to-pod",server_container="proxy",original_class="pod",original_peer="web""#.into(),
            },
        ]);
    }
    rows
}

fn lab(mode: Mode, runtime: Runtime) -> Plan {
    let dataplane = if mode == Mode::SocketLb {
        "socket-lb"
    } else {
        "kube-proxy"
    };
    let mesh = if mode == Mode::Sidecar {
        "sidecar"
    } else {
        "none"
    };
    let text = LAB
        .replace("DATAPLANE", dataplane)
        .replace("MESH", mesh)
        .replace("RUNTIME", runtime.name());
    Plan::from_yaml(&text, "dataplanes").expect("a valid lab")
}

fn check(mode: Mode, runtime: Runtime) {
    let lab = Lab::up_for_test(&lab(mode, runtime)).expect("lab up");
    if mode == Mode::PodDnat {
        // A translation inside the pod's namespace: its own nat OUTPUT chain
        // sends the ClusterIP to the backend, as a socket load balancer
        // would, but after the socket's connect().
        lab.pod_netns("default", "client")
            .exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-d",
                    "10.96.0.10/32",
                    "-p",
                    "tcp",
                    "--dport",
                    "80",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    "10.244.1.10:80",
                ],
            )
            .expect("DNAT in the pod");
    }
    let inventory = lab.inventory_path().display().to_string();
    let dir = TempDir::new("dataplanes");
    let policy = dir.write("policy.yaml", "");
    let observer = Observer::start(&[
        "--inventory",
        &inventory,
        "--policy",
        &policy,
        "--collect-interval",
        "1s",
    ]);
    let prometheus = Prometheus::scraping(observer.addr());
    for row in expected(mode) {
        let selector = format!("observer_flow_packets_total{{{}}}", row.selector);
        prometheus.wait_positive_or(
            &selector,
            WAIT,
            &format!("{mode:?} on {runtime:?}: {}", row.what),
        );
    }
    // Every row the pods send names the container that sent it.
    let nameless = prometheus.query(
        r#"count(observer_flow_packets_total{pod=~"client|web",direction=~"egress|request",client_container="",server_container=""}) or vector(0)"#,
    );
    assert_eq!(nameless, [0.0], "{mode:?}: egress rows without a container");
    if mode != Mode::Sidecar {
        // The Service is never counted as the backend pod it was sent to.
        let as_pod = prometheus.query(
            r#"count(observer_flow_packets_total{pod="client",client_container="to-service",class="pod"}) or vector(0)"#,
        );
        assert_eq!(
            as_pod,
            [0.0],
            "{mode:?}: Service traffic counted as pod traffic"
        );
    }
    // A policy on the Service applies however the Service is reached: the
    // client's connect() is decided on the ClusterIP it asked for.
    dir.write("policy.yaml", NO_WEB_SERVICE);
    observer.eventually("the policy loaded", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "ok")]) >= 1.0
    });
    let (cgroup, netns) = container(&lab, "default", "client", "to-service");
    assert_eq!(
        connect_from(&cgroup, &netns, "10.96.0.10", 80),
        Connect::NotPermitted,
        "{mode:?}: the Service is denied"
    );
    assert_eq!(
        connect_from(&cgroup, &netns, "10.244.1.10", 80),
        Connect::Connected,
        "{mode:?}: the pod behind it is not"
    );
    assert!(observer.terminate().success());
    // `lab down` leaves no program of the lab's socket load balancer.
    drop(lab);
    let left: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|name| name.starts_with("lb_"))
        .collect();
    assert!(left.is_empty(), "{mode:?}: still loaded: {left:?}");
}

const NO_WEB_SERVICE: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: no-web-service}
spec:
  podSelector: {namespace: default, matchLabels: {app: client}}
  mode: enforce
  rules:
  - {name: no-web, class: service, service: {namespace: default, name: web}, action: deny}
";

#[test]
fn the_same_rows_behind_kube_proxy() {
    check(Mode::KubeProxy, Runtime::Process);
}

#[test]
fn the_same_rows_behind_a_socket_load_balancer() {
    check(Mode::SocketLb, Runtime::Process);
}

#[test]
fn the_same_rows_behind_a_translation_in_the_pod() {
    check(Mode::PodDnat, Runtime::Process);
}

#[test]
fn the_same_rows_behind_a_sidecar_proxy() {
    check(Mode::Sidecar, Runtime::Process);
}

#[test]
fn the_same_rows_on_containerd_pods_behind_kube_proxy() {
    check(Mode::KubeProxy, Runtime::Containerd);
}

#[test]
fn the_same_rows_on_containerd_pods_behind_a_socket_load_balancer() {
    check(Mode::SocketLb, Runtime::Containerd);
}

#[test]
fn the_same_rows_on_containerd_pods_behind_a_sidecar_proxy() {
    check(Mode::Sidecar, Runtime::Containerd);
}
