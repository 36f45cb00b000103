//! Every counter means what it says, to the packet and the byte: with a
//! flow map too small for the traffic, and with pods that come and go.
//! Nothing is evicted uncounted: a flow leaves the map once counted to its
//! last packet, and packets whose flow finds no room are counted in their
//! pod's overflow series.

use std::{net::UdpSocket, thread, time::Duration};

use integration_test::{Observer, Scrape};
use lab::Netns;

const PAYLOAD: usize = 100;
/// A UDP datagram of PAYLOAD bytes at `lo` egress: Ethernet + IPv4 + UDP.
const FRAME: u64 = (14 + 20 + 8 + PAYLOAD) as u64;

/// `flows` UDP flows on the pod's `lo`, `each` datagrams apiece (every
/// sender socket kept open to the end, so that no port is used twice).
fn send(pod: &Netns, flows: usize, each: usize) {
    pod.run(|| {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        let to = receiver.local_addr().unwrap();
        let senders: Vec<_> = (0..flows)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind sender"))
            .collect();
        for _ in 0..each {
            for sender in &senders {
                sender.send_to(&[1; PAYLOAD], to).expect("send");
            }
        }
    })
    .expect("enter namespace");
}

fn totals(m: &Scrape, pod: &str) -> (f64, f64) {
    (
        m.sum("observer_flow_packets_total", &[("pod", pod)]),
        m.sum("observer_flow_bytes_total", &[("pod", pod)]),
    )
}

#[test]
fn a_full_flow_map_loses_no_packet() {
    const CAPACITY: usize = 64;
    const FLOWS: usize = 300;
    let pod = Netns::create("full").expect("namespace");
    let name = pod.name().to_owned();
    let path = pod.path().display().to_string();
    let observer = Observer::start(&["--netns", &path, "--flow-capacity", &CAPACITY.to_string()]);

    // FLOWS distinct flows, one datagram each: most find no room.
    send(&pod, FLOWS, 1);
    let m = observer.scrape();
    assert_eq!(m.sum("observer_flow_map_capacity", &[]), CAPACITY as f64);
    assert!(m.sum("observer_flow_map_entries", &[]) <= CAPACITY as f64);
    assert_eq!(
        totals(&m, &name),
        (FLOWS as f64, (FLOWS as u64 * FRAME) as f64)
    );
    let overflowed = m.sum("observer_flow_map_overflow_packets_total", &[]);
    assert!(overflowed >= (FLOWS - CAPACITY) as f64, "{overflowed}");
    assert_eq!(
        m.sum(
            "observer_flow_packets_total",
            &[("pod", &name), ("class", "localhost"), ("port", "overflow")]
        ),
        overflowed,
        "the overflow series"
    );
    assert_eq!(m.sum("observer_flow_insert_failures_total", &[]), 0.0);

    // Quiet while the map is nearly full: taken out, counted to the end,
    // and there is room for the next ones.
    let m = observer.scrape();
    assert!(m.sum("observer_flow_map_reclaimed_total", &[]) >= 1.0);
    send(&pod, FLOWS, 1);
    let m = observer.scrape();
    assert_eq!(
        totals(&m, &name),
        ((2 * FLOWS) as f64, (2 * FLOWS as u64 * FRAME) as f64)
    );
    assert!(observer.terminate().success());
}

/// A flow map of more than one batch is read by two walks side by side,
/// from its first bucket and from its middle one (`kernel::bpf`); the flows
/// where they meet are read twice. Each is counted once, and once in the
/// map's entries.
#[test]
fn a_map_read_by_two_walks_counts_each_flow_once() {
    const FLOWS: u32 = 20_000;
    let pod = Netns::create("walks").expect("namespace");
    let name = pod.name().to_owned();
    let path = pod.path().display().to_string();
    let observer = Observer::start(&[
        "--netns",
        &path,
        "--flow-capacity",
        "65536",
        "--collect-interval",
        "60m",
    ]);
    // FLOWS flows a round, one datagram each, from a new socket to as many
    // loopback addresses: one receiver on every address takes them all (no
    // ICMP error comes back to count).
    let round = || {
        pod.run(|| {
            let receiver = UdpSocket::bind("0.0.0.0:0").expect("bind receiver");
            let port = receiver.local_addr().unwrap().port();
            let sender = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
            for n in 0..FLOWS {
                let to = std::net::Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8);
                sender.send_to(&[1; PAYLOAD], (to, port)).expect("send");
            }
        })
        .expect("enter namespace");
    };
    for rounds in 1..=2u32 {
        round();
        let m = observer.scrape();
        let flows = f64::from(rounds * FLOWS);
        assert_eq!(totals(&m, &name), (flows, flows * FRAME as f64));
        assert_eq!(m.sum("observer_flow_map_entries", &[]), flows);
    }
    assert!(observer.terminate().success());
}

/// Pods made and deleted in waves, each sending a known number of packets
/// over more flows than the map holds; every pod's totals come out exact,
/// the last packets before it went included.
#[test]
fn pods_that_come_and_go_are_counted_exactly_through_a_small_flow_map() {
    const WAVES: usize = 3;
    const PODS: usize = 4;
    const FLOWS: usize = 40;
    const EACH: usize = 3;
    let observer = Observer::start(&[
        "--netns-dir",
        "/var/run/netns",
        "--flow-capacity",
        "64",
        "--collect-interval",
        "200ms",
        "--series-grace",
        "10m",
    ]);
    let mut names = Vec::new();
    for wave in 0..WAVES {
        let pods: Vec<Netns> = (0..PODS)
            .map(|i| Netns::create(&format!("churn-{wave}-{i}")).expect("namespace"))
            .collect();
        for pod in &pods {
            let name = pod.name().to_owned();
            observer.eventually("the pod attached", |m| {
                m.sum("observer_programs_attached", &[("pod", &name)]) >= 1.0
            });
        }
        for pod in &pods {
            send(pod, FLOWS, EACH);
        }
        // Gone right after sending: their last packets were not collected.
        names.extend(pods.iter().map(|p| p.name().to_owned()));
        let gone: Vec<String> = pods.iter().map(|p| p.name().to_owned()).collect();
        drop(pods);
        for name in &gone {
            observer.eventually("the pod detached", |m| {
                !m.has("observer_programs_attached", "pod", name)
            });
        }
        thread::sleep(Duration::from_millis(300));
    }
    let m = observer.scrape();
    let packets = (FLOWS * EACH) as f64;
    for name in &names {
        assert_eq!(
            totals(&m, name),
            (packets, packets * FRAME as f64),
            "pod {name}: packets and bytes"
        );
    }
    assert!(
        m.sum("observer_flow_map_overflow_packets_total", &[]) > 0.0,
        "the map was too small: the test tests the overflow too"
    );
    assert!(observer.terminate().success());
}
