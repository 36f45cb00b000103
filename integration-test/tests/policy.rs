//! Policies enforced on the node lab, with real connections from real
//! container cgroups: each README case, audit mode, a reload, a refused
//! file, and failing open when the observer is killed.

use std::{fs, time::Duration};

use integration_test::{
    Observer, Scrape, TempDir,
    container::{Connect, HeldConnection, connect_from, container, udp_echo},
};
use lab::{Lab, Plan};

const SHOP_PORT: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-port}
spec:
  podSelector: {namespace: shop, matchLabels: {app: shop}}
  mode: MODE
  rules:
    - {name: sidecar-ok, class: localhost, ports: [8080], clientContainers: [sidecar], action: allow}
    - {name: no-one-else, class: localhost, ports: [8080], action: deny}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: client-not-shop}
spec:
  podSelector: {namespace: default, matchLabels: {app: client}}
  mode: MODE
  rules:
    - {name: no-shop, class: service, service: {namespace: shop, name: shop}, action: deny}
";

#[test]
fn policies_deny_at_connect_audit_counts_and_a_bad_file_changes_nothing() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("policy");
    let (policy, observer) =
        Observer::with_policy(&lab, &dir, &SHOP_PORT.replace("MODE", "enforce"));

    // Localhost: the wrong container is refused at once (EPERM, no hang);
    // the sidecar still gets through.
    let (app, shop_netns) = container(&lab, "shop", "shop", "app");
    let (sidecar, _) = container(&lab, "shop", "shop", "sidecar");
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::NotPermitted
    );
    assert_eq!(
        connect_from(&sidecar, &shop_netns, "127.0.0.1", 8080),
        Connect::Connected
    );

    // A Service: denied before DNAT, by name; another Service works.
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        connect_from(&client, &client_netns, "10.96.0.20", 8080),
        Connect::NotPermitted
    );
    assert_eq!(
        connect_from(&client, &client_netns, "10.96.0.10", 80),
        Connect::Connected
    );
    // An IPv6 socket to the v4-mapped address is the same connection.
    assert_eq!(
        connect_from(&client, &client_netns, "::ffff:10.96.0.20", 8080),
        Connect::NotPermitted
    );
    // The pod behind it, by its own address: not a Service, allowed.
    let shop_ip = lab.pod("shop", "shop").unwrap().ip.to_string();
    assert_eq!(
        connect_from(&client, &client_netns, &shop_ip, 8080),
        Connect::Connected
    );

    let verdicts = |m: &Scrape, rule: &str, verdict: &str| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", rule), ("verdict", verdict)],
        )
    };
    let m = observer.eventually("the verdicts counted", |m| {
        verdicts(m, "no-one-else", "deny") >= 1.0 && verdicts(m, "no-shop", "deny") >= 1.0
    });
    assert!(m.has("observer_policy_verdicts_total", "class", "service"));

    // Audit: everything goes through, the would-be denials are counted.
    fs::write(&policy, SHOP_PORT.replace("MODE", "audit")).unwrap();
    observer.eventually("the reload", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "ok")]) >= 1.0
    });
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::Connected
    );
    assert_eq!(
        connect_from(&client, &client_netns, "10.96.0.20", 8080),
        Connect::Connected
    );
    observer.eventually("audit denials counted", |m| {
        verdicts(m, "no-one-else", "audit_deny") >= 1.0
            && verdicts(m, "no-shop", "audit_deny") >= 1.0
    });

    // Opened while allowed: stays up whatever comes next.
    let held = HeldConnection::open(&app, &shop_netns, "127.0.0.1", 8080);

    // A broken file: refused, counted; the audit policy stays in force.
    fs::write(
        &policy,
        "apiVersion: observer.dev/v1alpha1\nkind: TrafficPolicy\nspec: [",
    )
    .unwrap();
    observer.eventually("the refusal", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "refused")]) >= 1.0
    });
    let before = verdicts(&observer.scrape(), "no-one-else", "audit_deny");
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::Connected
    );
    observer.eventually("the old policy still counting", |m| {
        verdicts(m, "no-one-else", "audit_deny") > before
    });

    // Enforce again: new connections are refused; one opened before is
    // left alone. Then kill the observer: the hooks go with it (fail open:
    // no policy at all applies until it is back).
    fs::write(&policy, SHOP_PORT.replace("MODE", "enforce")).unwrap();
    observer.eventually("the second reload", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "ok")]) >= 2.0
    });
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::NotPermitted
    );
    let status = held.request();
    assert!(
        status.contains(" 200 "),
        "the established connection: {status}"
    );
    observer.kill();
    assert_eq!(
        connect_from(&app, &shop_netns, "127.0.0.1", 8080),
        Connect::Connected
    );
}

/// The README's other two cases, on the lab: a namespace kept from another's
/// pods, and no egress to the internet but one range.
const PEERS_AND_CIDRS: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: default-not-shop}
spec:
  podSelector: {namespace: default, matchLabels: {app: client}}
  mode: enforce
  rules:
    - {name: no-shop-pods, class: pod, peer: {namespace: shop}, action: deny}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: web-egress}
spec:
  podSelector: {namespace: default, matchLabels: {app: web}}
  mode: enforce
  defaultAction: deny
  rules:
    - {name: in-pod, class: localhost, action: allow}
    - {name: in-cluster-pods, class: pod, action: allow}
    - {name: in-cluster-services, class: service, action: allow}
    - {name: partner-api, class: external, cidrs: [192.168.200.0/24], action: allow}
";

#[test]
fn peer_namespaces_and_external_cidrs() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("policy2");
    let (policy, observer) = Observer::with_policy(&lab, &dir, PEERS_AND_CIDRS);

    // Pods of namespace shop are off limits to the client; others are not.
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    let ip = |ns, name| lab.pod(ns, name).unwrap().ip.to_string();
    assert_eq!(
        connect_from(&client, &client_netns, &ip("shop", "shop"), 8080),
        Connect::NotPermitted
    );
    assert_eq!(
        connect_from(&client, &client_netns, &ip("default", "web"), 80),
        Connect::Connected
    );

    // Web reaches the partner range and nothing else outside: the default
    // denies before a packet leaves (the address below is nowhere).
    let (fetcher, web_netns) = container(&lab, "default", "web", "fetcher");
    assert_eq!(
        connect_from(&fetcher, &web_netns, "192.168.200.10", 8080),
        Connect::Connected
    );
    assert_eq!(
        connect_from(&fetcher, &web_netns, "203.0.113.7", 80),
        Connect::NotPermitted
    );
    assert_eq!(
        connect_from(&fetcher, &web_netns, "127.0.0.1", 80),
        Connect::Connected
    );
    assert_eq!(
        connect_from(&fetcher, &web_netns, "10.96.0.20", 8080),
        Connect::Connected
    );

    // The client may not talk to shop's pods, but a UDP server in the client
    // answers them: a reply (from its port to the asker's ephemeral one) is
    // not a new conversation of the client's.
    let (to_service, _) = container(&lab, "default", "client", "to-service");
    let mut echo = udp_echo(&to_service, &client_netns, 5353, 1);
    let client_ip = ip("default", "client");
    let echoed = lab
        .pod_netns("shop", "shop")
        .run(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            socket
                .send_to(b"ping", format!("{client_ip}:5353"))
                .unwrap();
            let mut buf = [0u8; 8];
            socket.recv(&mut buf).map(|n| buf[..n].to_vec())
        })
        .unwrap();
    assert_eq!(echoed.expect("the reply"), b"ping");
    assert!(echo.wait().unwrap().success());

    let m = observer.eventually("the verdicts", |m| {
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "no-shop-pods"), ("verdict", "deny")],
        ) >= 1.0
            && m.sum(
                "observer_policy_verdicts_total",
                &[("rule", "default"), ("verdict", "deny")],
            ) >= 1.0
    });
    assert!(
        m.sum(
            "observer_policy_verdicts_total",
            &[("rule", "partner-api"), ("verdict", "allow")]
        ) >= 1.0
    );

    // Audit: the same connections go through, counted as would-be denials.
    fs::write(&policy, PEERS_AND_CIDRS.replace("enforce", "audit")).unwrap();
    observer.eventually("the reload", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "ok")]) >= 1.0
    });
    assert_eq!(
        connect_from(&client, &client_netns, &ip("shop", "shop"), 8080),
        Connect::Connected
    );
    // Let through, with nowhere to go: the lab has no such host.
    let outside = connect_from(&fetcher, &web_netns, "203.0.113.7", 80);
    assert!(matches!(outside, Connect::Other(_)), "{outside:?}");
    observer.eventually("audit denials", |m| {
        let audit = |rule| {
            m.sum(
                "observer_policy_verdicts_total",
                &[("rule", rule), ("verdict", "audit_deny")],
            )
        };
        audit("no-shop-pods") >= 1.0 && audit("default") >= 1.0
    });
    assert!(observer.terminate().success());
}

const WEB_INGRESS: &str = "
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
      ports: [80]
      action: deny
    - name: no-udp-from-client
      class: pod
      direction: ingress
      protocol: UDP
      peer: {namespace: default, matchLabels: {app: client}}
      ports: [5353]
      action: deny
";

#[test]
fn ingress_rules_drop_inbound_connections_at_eth0() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("policy3");
    let (policy, observer) = Observer::with_policy(&lab, &dir, WEB_INGRESS);

    // The client's SYNs are dropped on web's eth0 (tc can only drop): the
    // connection times out. The remote pod on node-2 still gets in.
    let web = lab.pod("default", "web").unwrap().ip.to_string();
    let (client, client_netns) = container(&lab, "default", "client", "to-pod");
    let (remote, remote_netns) = container(&lab, "default", "remote", "to-pod");
    match connect_from(&client, &client_netns, &web, 80) {
        Connect::Other(error) => assert!(error.contains("timed out"), "{error}"),
        other => panic!("the client got in: {other:?}"),
    }
    assert_eq!(
        connect_from(&remote, &remote_netns, &web, 80),
        Connect::Connected
    );
    // UDP: datagrams to a socket bound in web (no listener to speak of).
    let receiver = lab
        .pod_netns("default", "web")
        .run(|| std::net::UdpSocket::bind("0.0.0.0:5353").expect("bind"))
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let send = |netns: lab::Netns, text: &'static [u8]| {
        let target = format!("{web}:5353");
        netns
            .run(move || {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.send_to(text, &target).unwrap();
            })
            .unwrap();
    };
    let mut buf = [0u8; 16];
    send(lab.pod_netns("default", "client"), b"client");
    assert!(
        receiver.recv(&mut buf).is_err(),
        "the client's datagram was dropped"
    );
    send(lab.pod_netns("default", "remote"), b"remote");
    let n = receiver.recv(&mut buf).expect("the remote's datagram");
    assert_eq!(&buf[..n], b"remote");

    let m = observer.eventually("the ingress denial counted", |m| {
        m.sum(
            "observer_policy_verdicts_total",
            &[
                ("rule", "not-from-client"),
                ("direction", "ingress"),
                ("verdict", "deny"),
            ],
        ) >= 1.0
    });
    assert!(m.has("observer_policy_verdicts_total", "class", "pod"));

    // Policy gone: the live flows are classified again, and the client gets in.
    fs::write(&policy, "").unwrap();
    observer.eventually("the reload", |m| {
        m.sum("observer_policy_reloads_total", &[("result", "ok")]) >= 1.0
    });
    assert_eq!(
        connect_from(&client, &client_netns, &web, 80),
        Connect::Connected
    );
    assert!(observer.terminate().success());
}
