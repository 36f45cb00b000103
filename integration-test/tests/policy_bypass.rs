//! Ways around a policy, each closed: an inbound connection that inherits
//! what its flow held from before a listener existed, and a UDP socket that
//! sends what it likes because its port is low. Each test failed before
//! its fix (see the commit that added it).

use std::{
    net::{TcpListener, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

use integration_test::{
    Observer, TempDir,
    container::{Connect, connect_from, container, in_container},
};
use lab::{Lab, Plan};

const WEB_LATE_LISTENERS: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web-ingress}
spec:
  podSelector: {namespace: default, matchLabels: {app: web}}
  mode: enforce
  rules:
    - name: not-from-client
      class: pod
      direction: ingress
      peer: {namespace: default, matchLabels: {app: client}}
      ports: [9000, 9001]
      action: deny
";

/// Runs a python3 snippet in the container; its last line of output.
fn python(cgroup: &Path, netns: &Path, script: &str) -> String {
    let output = in_container(cgroup, netns, Command::new("python3").args(["-c", script]))
        .output()
        .expect("python3");
    let out = String::from_utf8_lossy(&output.stdout);
    out.lines().last().unwrap_or_default().trim().to_owned()
}

/// A TCP connection to `host:port` from a fixed source port, 3 s at most:
/// "connected", "refused", "timeout" or "eperm".
fn connect_from_port(cgroup: &Path, netns: &Path, source: u16, host: &str, port: u16) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {source}))\n\
         s.settimeout(3)\n\
         try:\n    s.connect(('{host}', {port})); print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')\n\
         except PermissionError:\n    print('eperm')\n\
         except socket.timeout:\n    print('timeout')\n"
    );
    python(cgroup, netns, &script)
}

/// A datagram to `host:port` from a socket bound to `source`: "sent" or
/// "eperm".
fn send_from_port(cgroup: &Path, netns: &Path, source: u16, host: &str, port: u16) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', {source}))\n\
         try:\n    s.sendto(b'late', ('{host}', {port})); print('sent')\n\
         except PermissionError:\n    print('eperm')\n"
    );
    python(cgroup, netns, &script)
}

#[test]
fn an_inbound_connection_is_decided_as_one_whatever_its_flow_held() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("bypass-listener");
    let (_policy, observer) = Observer::with_policy(&lab, &dir, WEB_LATE_LISTENERS);
    let web = lab.pod("default", "web").unwrap().ip.to_string();
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");

    // TCP: a SYN to a port nobody listens on yet (answered by a RST), then
    // the server starts, then the same source port connects again.
    assert_eq!(
        connect_from_port(&client, &client_netns, 41000, &web, 9000),
        "refused",
        "nobody listens yet"
    );
    let _listener = lab
        .pod_netns("default", "web")
        .run(|| TcpListener::bind("0.0.0.0:9000").expect("listen"))
        .unwrap();
    assert_eq!(
        connect_from_port(&client, &client_netns, 41000, &web, 9000),
        "timeout",
        "the seeded source port got in"
    );
    assert_eq!(
        connect_from_port(&client, &client_netns, 41002, &web, 9000),
        "timeout",
        "another source port got in"
    );

    // UDP: a datagram to a port no socket has yet, then a socket binds it,
    // then the same source port sends again.
    assert_eq!(
        send_from_port(&client, &client_netns, 41001, &web, 9001),
        "sent"
    );
    let receiver = lab
        .pod_netns("default", "web")
        .run(|| UdpSocket::bind("0.0.0.0:9001").expect("bind"))
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert_eq!(
        send_from_port(&client, &client_netns, 41001, &web, 9001),
        "sent"
    );
    let mut buf = [0u8; 8];
    assert!(
        receiver.recv(&mut buf).is_err(),
        "the datagram from the seeded source port got in"
    );

    let m = observer.eventually("the denials counted", |m| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "not-from-client"), ("verdict", "deny")],
        ) >= 3.0
    });
    // One decision per connection, not per retransmitted SYN: two TCP
    // connections and one UDP flow (the first datagram reached nobody).
    assert_eq!(
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "not-from-client"), ("verdict", "deny")],
        ),
        3.0
    );
    assert!(observer.terminate().success());
}

/// A full flow map: the inbound connections of flows that find no room
/// are decided all the same (they were let in, undecided, before).
#[test]
fn a_full_flow_map_lets_no_denied_connection_in() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("bypass-full");
    let policy = dir.write("policy.yaml", WEB_LATE_LISTENERS);
    let inventory = lab.inventory_path().display().to_string();
    // A small map, and no collection to make room in it meanwhile.
    let observer = Observer::start(&[
        "--inventory",
        &inventory,
        "--policy",
        &policy,
        "--flow-capacity",
        "64",
        "--collect-interval",
        "60m",
    ]);
    let web_netns = lab.pod_netns("default", "web");
    let _listeners = web_netns
        .run(|| [9000, 9002].map(|port| TcpListener::bind(("0.0.0.0", port)).expect("listen")))
        .unwrap();
    // The web pod fills the map: 200 flows over its own lo.
    web_netns
        .run(|| {
            let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
            for port in 20_000..20_200u16 {
                let _ = socket.send_to(b"fill", ("127.0.0.1", port));
            }
        })
        .unwrap();
    let web = lab.pod("default", "web").unwrap().ip.to_string();
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        connect_from_port(&client, &client_netns, 41010, &web, 9000),
        "timeout",
        "a denied connection got in while the flow map was full"
    );
    assert_eq!(
        connect_from_port(&client, &client_netns, 41011, &web, 9002),
        "connected",
        "an allowed connection was kept out"
    );
    let m = observer.scrape();
    assert!(
        m.sum("observer_flow_map_overflow_packets_total", &[]) > 0.0,
        "the map was full"
    );
    assert!(
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "not-from-client"), ("verdict", "deny")],
        ) >= 1.0,
        "the denial counted"
    );
    assert!(observer.terminate().success());
}

const CLIENT_EGRESS: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: client-egress}
spec:
  podSelector: {namespace: default, matchLabels: {app: client}}
  mode: enforce
  defaultAction: deny
  rules:
    - {name: dns, class: service, protocol: UDP, ports: [53], action: allow}
    - {name: to-echo, class: localhost, protocol: UDP, ports: [5354], action: allow}
    - {name: to-echo-by-address, class: pod, protocol: UDP, ports: [5354], action: allow}
";

/// Sends "ping" to `host:port` and returns the answer, or "timeout".
fn ask(cgroup: &Path, netns: &Path, host: &str, port: u16) -> String {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.sendto(b'ping', ('{host}', {port}))\n\
         try:\n    print(s.recv(16).decode())\n\
         except socket.timeout:\n    print('timeout')\n"
    );
    python(cgroup, netns, &script)
}

#[test]
fn a_udp_socket_on_a_low_port_sends_only_answers() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("bypass-udp");
    let (_policy, _observer) = Observer::with_policy(&lab, &dir, CLIENT_EGRESS);
    let web = lab.pod("default", "web").unwrap().ip.to_string();
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");

    // Unasked, from a server's port to a client's: denied like any send.
    assert_eq!(
        send_from_port(&client, &client_netns, 53, &web, 40000),
        "eperm",
        "a low source port walked around the default deny"
    );
    assert_eq!(
        send_from_port(&client, &client_netns, 41003, &web, 40000),
        "eperm"
    );

    // Asked: a UDP server in the client answers web, from any port to any
    // port (here from a high one, which the old rule judged as egress).
    for port in [5353u16, 45000] {
        let mut echo = integration_test::container::udp_echo(&client, &client_netns, port, 1);
        let client_ip = lab.pod("default", "client").unwrap().ip.to_string();
        let echoed = lab
            .pod_netns("default", "web")
            .run(move || {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                socket
                    .send_to(b"ping", format!("{client_ip}:{port}"))
                    .unwrap();
                let mut buf = [0u8; 8];
                socket.recv(&mut buf).map(|n| buf[..n].to_vec())
            })
            .unwrap();
        assert_eq!(echoed.expect("the answer"), b"ping", "port {port}");
        assert!(echo.wait().unwrap().success());
    }

    // Asked by another container of the pod, over lo: to 127.0.0.1 and to
    // the pod's own address (which also goes over lo).
    let (asker, _) = container(&lab, "default", "client", "to-service");
    let client_ip = lab.pod("default", "client").unwrap().ip.to_string();
    let mut echo = integration_test::container::udp_echo(&client, &client_netns, 5354, 2);
    for host in ["127.0.0.1", client_ip.as_str()] {
        assert_eq!(ask(&asker, &client_netns, host, 5354), "ping", "via {host}");
    }
    assert!(echo.wait().unwrap().success());
}

const WEB_ONLY_FROM_REMOTE: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web-in}
spec:
  podSelector: {namespace: default, matchLabels: {app: web}}
  mode: enforce
  defaultAction: deny
  rules:
    - name: from-remote
      class: pod
      direction: ingress
      peer: {namespace: default, matchLabels: {app: remote}}
      ports: [80]
      action: allow
";

/// Only the node's own processes (the kubelet's probes) are left alone by
/// ingress rules: not whatever comes from a node's address. A client that
/// the policy keeps out does not get in through a NodePort that SNATs it to
/// the node's address, and neither does a host-network pod.
#[test]
fn a_denied_client_does_not_get_in_through_the_node() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("bypass-node");
    let (_policy, observer) = Observer::with_policy(&lab, &dir, WEB_ONLY_FROM_REMOTE);
    let web = lab.pod("default", "web").unwrap().ip.to_string();
    let node = lab.node_netns("node-1");
    let node_address = lab
        .inventory()
        .nodes
        .iter()
        .find(|n| n.name == "node-1")
        .unwrap()
        .address
        .to_string();

    // A NodePort as kube-proxy makes one: DNAT to web, SNAT to the node.
    let nat = |args: &[&str]| node.exec("iptables", args).expect("iptables");
    nat(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &node_address,
        "-p",
        "tcp",
        "--dport",
        "30080",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{web}:80"),
    ]);
    nat(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-d",
        &web,
        "-p",
        "tcp",
        "--dport",
        "80",
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "SNAT",
        "--to-source",
        &node_address,
    ]);
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        connect_from_port(&client, &client_netns, 41010, &node_address, 30080),
        "timeout",
        "the client got in through the NodePort"
    );

    // A host-network pod: the node's namespace, a pod's cgroup.
    let (host_network, _) = container(&lab, "default", "web", "fetcher");
    assert_eq!(
        connect_from_port(&host_network, &node.path(), 41011, &web, 80),
        "timeout",
        "a host-network pod got in"
    );

    // The kubelet: a process of the node, outside every pod's cgroup.
    let probe = node
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &format!("{web}:80").parse().unwrap(),
                Duration::from_secs(3),
            )
            .map(drop)
        })
        .unwrap();
    assert!(probe.is_ok(), "the node's own probe: {probe:?}");

    // And the peer the policy allows.
    let (remote, remote_netns) = container(&lab, "default", "remote", "to-pod");
    assert_eq!(
        connect_from_port(&remote, &remote_netns, 41012, &web, 80),
        "connected"
    );
    observer.eventually("the denials counted", |m| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "default"), ("class", "node"), ("verdict", "deny")],
        ) >= 1.0
    });
    assert!(observer.terminate().success());
}

const SHOP_NOT_SIDECAR: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-admin}
spec:
  podSelector: {namespace: shop, matchLabels: {app: shop}}
  mode: enforce
  rules:
    - {name: not-the-sidecar, class: localhost, ports: [8080], clientContainers: [sidecar], action: deny}
";

/// A container the runtime has just restarted runs in a new cgroup, which
/// the observer names a moment later (from the API's new container id, or
/// the inventory). Meanwhile it must not slip past a rule that names it:
/// before, a new cgroup was in no container's set, and a rule denying the
/// sidecar let the restarted sidecar through. Now a client no name is known
/// for is denied by any rule naming containers that would otherwise match
/// (`unknown-container`), and rules naming none decide as before.
#[test]
fn a_container_not_named_yet_is_held_to_the_rules_naming_containers() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("unknown-container");
    let (_policy, observer) = Observer::with_policy(&lab, &dir, SHOP_NOT_SIDECAR);
    let (sidecar, netns) = container(&lab, "shop", "shop", "sidecar");
    let (app, _) = container(&lab, "shop", "shop", "app");
    let connect = |cgroup: &Path, port| connect_from(cgroup, &netns, "127.0.0.1", port);
    assert_eq!(connect(&sidecar, 8080), Connect::NotPermitted, "the rule");
    assert_eq!(
        connect(&app, 8080),
        Connect::Connected,
        "no rule for the app"
    );

    // What a restart makes: a new cgroup in the pod's, which no inventory
    // names yet.
    let restarted = sidecar.parent().unwrap().join("restarted-sidecar");
    std::fs::create_dir(&restarted).expect("a cgroup in the pod's");
    assert_eq!(
        connect(&restarted, 8080),
        Connect::NotPermitted,
        "a container not named yet passed a rule naming containers"
    );
    // Another port: no rule there, nothing to deny (nobody listens).
    assert_ne!(connect(&restarted, 9), Connect::NotPermitted);
    observer.eventually("the decision counted as unknown-container", |m| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "unknown-container"), ("verdict", "deny")],
        ) == 1.0
    });
    let _ = std::fs::remove_dir(&restarted);
}
