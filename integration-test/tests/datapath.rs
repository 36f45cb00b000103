//! The observer against the real kernel: two pod-like namespaces joined by a
//! veth pair, real packets, exact counts, and nothing left after SIGTERM.
//! (Longer than most files: these checks share the helpers below.)

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};
use integration_test::{Observer, Scrape};
use lab::{Netns, veth};

const A_ADDR: &str = "10.231.0.1";
const B_ADDR: &str = "10.231.0.2";
/// Nothing listens here: a TCP connect is one SYN answered by one RST.
const CLOSED_PORT: u16 = 9;
const PAYLOAD: usize = 100;
/// A UDP datagram of PAYLOAD bytes as tc sees it: Ethernet + IPv4 + UDP.
const UDP_FRAME: f64 = (14 + 20 + 8 + PAYLOAD) as f64;

/// Two namespaces, each with `lo` and an `eth0` on one veth pair.
fn two_pods() -> (Netns, Netns) {
    let a = Netns::create("a").expect("namespace a");
    let b = Netns::create("b").expect("namespace b");
    veth(
        (&a, "eth0", &format!("{A_ADDR}/24")),
        (&b, "eth0", &format!("{B_ADDR}/24")),
    )
    .expect("veth pair");
    (a, b)
}

fn observe(pods: &[&Netns]) -> Observer {
    let mut args = Vec::new();
    for pod in pods {
        args.push("--netns".to_owned());
        args.push(pod.path().display().to_string());
    }
    Observer::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Sends `count` datagrams to `to` from inside `from`, and checks that
/// `receiver` got every one of them.
fn udp(from: &Netns, source: &str, to: SocketAddr, count: usize, receiver: &UdpSocket) {
    from.run(|| {
        let sender = UdpSocket::bind((source, 0)).expect("bind sender");
        for _ in 0..count {
            sender.send_to(&[7; PAYLOAD], to).expect("send");
        }
    })
    .expect("enter namespace");
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0; 2 * PAYLOAD];
    for i in 0..count {
        let (len, _) = receiver
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {count} to {to} lost: {e}"));
        assert_eq!(len, PAYLOAD);
    }
}

/// A UDP socket bound inside `netns`.
fn udp_receiver(netns: &Netns, addr: &str) -> UdpSocket {
    netns
        .run(|| UdpSocket::bind((addr, 0)).expect("bind receiver"))
        .expect("enter namespace")
}

/// `count` TCP connects to a closed port from inside `from`: each is exactly
/// one SYN and one RST.
fn refused_connects(from: &Netns, to: &str, count: usize) {
    from.run(|| {
        let to: SocketAddr = format!("{to}:{CLOSED_PORT}").parse().unwrap();
        for _ in 0..count {
            let err = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .expect_err("nothing listens on the closed port");
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
        }
    })
    .expect("enter namespace");
}

/// Traffic of `netns` on `interface`: on `lo` all of it (class localhost,
/// each packet counted once), on `eth0` in `direction` (no inventory: the
/// peers are external).
fn traffic(
    scrape: &Scrape,
    family: &str,
    netns: &Netns,
    interface: &str,
    direction: &str,
    protocol: &str,
) -> f64 {
    let mut labels = vec![("pod", netns.name()), ("protocol", protocol)];
    if interface == "lo" {
        labels.push(("class", "localhost"));
    } else {
        labels.push(("class", "external"));
        labels.push(("direction", direction));
    }
    scrape.sum(family, &labels)
}

fn packets(
    scrape: &Scrape,
    netns: &Netns,
    interface: &str,
    direction: &str,
    protocol: &str,
) -> f64 {
    traffic(
        scrape,
        "observer_flow_packets_total",
        netns,
        interface,
        direction,
        protocol,
    )
}

fn bytes(scrape: &Scrape, netns: &Netns, interface: &str, direction: &str, protocol: &str) -> f64 {
    traffic(
        scrape,
        "observer_flow_bytes_total",
        netns,
        interface,
        direction,
        protocol,
    )
}

#[test]
fn counts_exact_packets_per_namespace_on_lo_and_veth() {
    let (a, b) = two_pods();
    let observer = observe(&[&a, &b]);

    // Over lo, different numbers in each namespace: if the two `lo` (both
    // ifindex 1) were mixed up, the counts would show it.
    let a_lo = udp_receiver(&a, "127.0.0.1");
    udp(&a, "127.0.0.1", a_lo.local_addr().unwrap(), 3, &a_lo);
    refused_connects(&a, "127.0.0.1", 2);
    let b_lo = udp_receiver(&b, "127.0.0.1");
    udp(&b, "127.0.0.1", b_lo.local_addr().unwrap(), 5, &b_lo);
    refused_connects(&b, "127.0.0.1", 3);

    // Over the veth: UDP from a to b, TCP from b to a.
    let b_eth0 = udp_receiver(&b, B_ADDR);
    udp(&a, A_ADDR, b_eth0.local_addr().unwrap(), 4, &b_eth0);
    refused_connects(&b, A_ADDR, 2);

    let m = observer.scrape();
    // Loopback: counted once (at lo egress), not again at lo ingress.
    assert_eq!(packets(&m, &a, "lo", "egress", "udp"), 3.0);
    assert_eq!(bytes(&m, &a, "lo", "egress", "udp"), 3.0 * UDP_FRAME);
    assert_eq!(packets(&m, &a, "lo", "egress", "tcp"), 4.0);
    assert_eq!(packets(&m, &b, "lo", "egress", "udp"), 5.0);
    assert_eq!(bytes(&m, &b, "lo", "egress", "udp"), 5.0 * UDP_FRAME);
    assert_eq!(packets(&m, &b, "lo", "egress", "tcp"), 6.0);
    // The refused connects on lo: each SYN is a request to port 9.
    let syns = m.sum(
        "observer_flow_packets_total",
        &[
            ("pod", a.name()),
            ("class", "localhost"),
            ("direction", "request"),
            ("port", "9"),
        ],
    );
    assert_eq!(syns, 2.0);
    assert_eq!(
        m.sum(
            "observer_connections_opened_total",
            &[("pod", a.name()), ("port", "9")]
        ),
        2.0
    );
    // The veth, seen from each end.
    assert_eq!(packets(&m, &a, "eth0", "egress", "udp"), 4.0);
    assert_eq!(bytes(&m, &a, "eth0", "egress", "udp"), 4.0 * UDP_FRAME);
    assert_eq!(packets(&m, &b, "eth0", "ingress", "udp"), 4.0);
    assert_eq!(bytes(&m, &b, "eth0", "ingress", "udp"), 4.0 * UDP_FRAME);
    assert_eq!(packets(&m, &a, "eth0", "ingress", "udp"), 0.0);
    assert_eq!(packets(&m, &b, "eth0", "egress", "tcp"), 2.0, "SYNs b -> a");
    assert_eq!(
        packets(&m, &a, "eth0", "ingress", "tcp"),
        2.0,
        "SYNs b -> a"
    );
    assert_eq!(packets(&m, &a, "eth0", "egress", "tcp"), 2.0, "RSTs a -> b");
    assert_eq!(
        packets(&m, &b, "eth0", "ingress", "tcp"),
        2.0,
        "RSTs a -> b"
    );

    // Health figures.
    for netns in [&a, &b] {
        assert_eq!(
            m.sum("observer_programs_attached", &[("pod", netns.name())]),
            3.0,
            "lo egress, eth0 egress and ingress"
        );
    }
    assert!(m.sum("observer_flow_map_entries", &[]) >= 10.0);
    assert_eq!(m.sum("observer_flow_map_overflow_packets_total", &[]), 0.0);

    // A second scrape adds nothing that did not happen.
    let again = observer.scrape();
    assert_eq!(packets(&again, &a, "lo", "egress", "udp"), 3.0);
    assert_eq!(packets(&again, &b, "eth0", "ingress", "udp"), 4.0);

    let status = observer.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// Our programs on each hook of a namespace, as the kernel reports them.
fn attached_programs(netns: &Netns) -> Vec<String> {
    netns
        .run(|| {
            let mut names = Vec::new();
            for (interface, direction) in [
                ("lo", TcAttachType::Egress),
                ("lo", TcAttachType::Ingress),
                ("eth0", TcAttachType::Egress),
                ("eth0", TcAttachType::Ingress),
            ] {
                let (_, programs) = SchedClassifier::query_tcx(interface, direction)
                    .unwrap_or_else(|e| panic!("query tcx {interface} {direction:?}: {e}"));
                for program in programs {
                    let name = program.name_as_str().unwrap_or("?");
                    names.push(format!("{interface}/{direction:?}/{name}"));
                }
            }
            names.sort();
            names
        })
        .expect("enter namespace")
}

/// Ids of the observer's programs loaded in the kernel (any observer's).
fn observer_programs() -> Vec<u32> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| n.starts_with("observe_") || n == "classify_flow")
        })
        .map(|p| p.id())
        .collect()
}

#[test]
fn sigterm_detaches_everything() {
    let (a, b) = two_pods();
    // Another observer (a developer's) may run: only ours must go.
    let before = observer_programs();
    let observer = observe(&[&a, &b]);
    assert!(observer_programs().len() > before.len(), "ours are loaded");
    for netns in [&a, &b] {
        assert_eq!(
            attached_programs(netns),
            [
                "eth0/Egress/observe_egress",
                "eth0/Ingress/observe_ingress",
                "lo/Egress/observe_egress",
            ]
        );
    }

    let status = observer.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}");

    for netns in [&a, &b] {
        assert_eq!(attached_programs(netns), Vec::<String>::new());
        for interface in ["lo", "eth0"] {
            let qdiscs = netns
                .exec("tc", &["qdisc", "show", "dev", interface])
                .unwrap();
            assert!(!qdiscs.contains("clsact"), "{interface}: {qdiscs}");
            for hook in ["ingress", "egress"] {
                let filters = netns
                    .exec("tc", &["filter", "show", "dev", interface, hook])
                    .unwrap();
                assert_eq!(filters.trim(), "", "{interface} {hook} filters");
            }
        }
    }
    let left: Vec<u32> = observer_programs()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(left, Vec::<u32>::new(), "programs of ours still loaded");
    if let Ok(pins) = std::fs::read_dir("/sys/fs/bpf") {
        let ours: Vec<_> = pins
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains("observ"))
            .collect();
        assert!(ours.is_empty(), "pinned: {ours:?}");
    }
}

#[test]
fn a_namespace_without_eth0_gets_lo_only() {
    let lonely = Netns::create("lo-only").expect("namespace");
    let observer = observe(&[&lonely]);
    let receiver = udp_receiver(&lonely, "127.0.0.1");
    udp(
        &lonely,
        "127.0.0.1",
        receiver.local_addr().unwrap(),
        2,
        &receiver,
    );
    // /flows (what `observer flows` shows): the traffic since the last reading.
    let (code, body) = integration_test::observer::http_get(observer.addr(), "/flows").unwrap();
    assert_eq!(code, 200);
    let rows: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let listed: u64 = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["labels"].to_string().contains(lonely.name()))
        .map(|row| row["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(listed, 2, "{body}");
    let m = observer.scrape();
    assert_eq!(
        m.sum("observer_programs_attached", &[("pod", lonely.name())]),
        1.0
    );
    assert_eq!(packets(&m, &lonely, "lo", "egress", "udp"), 2.0);
    assert!(observer.terminate().success());
}

#[test]
fn series_of_a_pod_that_is_gone_expire_after_the_grace_period() {
    let pod = Netns::create("gone").expect("namespace");
    let name = pod.name().to_owned();
    let path = pod.path().display().to_string();
    let observer = Observer::start(&["--netns", &path, "--series-grace", "1s"]);
    let receiver = udp_receiver(&pod, "127.0.0.1");
    udp(
        &pod,
        "127.0.0.1",
        receiver.local_addr().unwrap(),
        2,
        &receiver,
    );
    let m = observer.scrape();
    assert_eq!(m.sum("observer_flow_packets_total", &[("pod", &name)]), 2.0);

    drop(receiver);
    drop(pod); // deletes the namespace
    let m = observer.scrape();
    assert_eq!(m.sum("observer_programs_attached", &[("pod", &name)]), 0.0);
    assert_eq!(
        m.sum("observer_flow_packets_total", &[("pod", &name)]),
        2.0,
        "still within the grace period"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let m = observer.scrape();
    assert!(
        !m.has("observer_flow_packets_total", "pod", &name),
        "expired"
    );
    assert!(observer.terminate().success());
}

#[test]
fn the_programs_diagnostics_appear_with_debug_logs_only() {
    let pod = Netns::create("diag").expect("namespace");
    let path = pod.path().display().to_string();
    for (level, shown) in [("debug", true), ("info", false)] {
        let observer = Observer::start(&["--netns", &path, "--log-level", level]);
        let receiver = udp_receiver(&pod, "127.0.0.1");
        udp(
            &pod,
            "127.0.0.1",
            receiver.local_addr().unwrap(),
            1,
            &receiver,
        );
        let classified = || observer.log().contains("flow classified: class 1");
        if shown {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !classified() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no kernel diagnostics in the log:\n{}",
                    observer.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            // The flow is counted (so classified) without a word of it.
            observer.eventually("the datagram counted", |m| {
                packets(m, &pod, "lo", "egress", "udp") >= 1.0
            });
            assert!(!classified(), "{}", observer.log());
        }
        assert!(observer.terminate().success());
    }
}

#[test]
fn a_cgroup_no_inventory_names_goes_by_its_directory() {
    // Bare --netns mode: no inventory, no container names but the cgroups'.
    let pod = Netns::create("cgname").expect("namespace");
    let cgroup = lab::Cgroup::create("cgname").expect("cgroup");
    let sender = cgroup
        .child(std::path::Path::new("sender-ctr"))
        .expect("cgroup");
    let path = pod.path().display().to_string();
    let observer = Observer::start(&["--netns", &path]);
    // A server's port (not an ephemeral one): the receiver is the server.
    let _receiver = pod
        .run(|| UdpSocket::bind("127.0.0.1:5300").expect("bind"))
        .expect("enter namespace");
    let port = 5300;
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', {port}))"
    );
    let status = integration_test::container::in_container(
        &sender,
        &pod.path(),
        std::process::Command::new("python3").args(["-c", &script]),
    )
    .status()
    .expect("python3");
    assert!(status.success());
    observer.eventually("the datagram, named after its sender's cgroup", |m| {
        m.sum(
            "observer_flow_packets_total",
            &[("class", "localhost"), ("client_container", "sender-ctr")],
        ) >= 1.0
    });
    assert!(observer.terminate().success());
}
