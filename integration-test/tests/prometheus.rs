//! The observer on the node lab, scraped by a real Prometheus: every
//! scenario of the default lab shows up with the right class and names.

use std::{process::Command, time::Duration};

use integration_test::{Observer, Prometheus, observer::http_get};
use lab::{Lab, Plan};

const WAIT: Duration = Duration::from_secs(40);

#[test]
fn prometheus_sees_every_scenario_of_the_default_lab() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let inventory = lab.inventory_path().display().to_string();
    let observer = Observer::start(&[
        "--inventory",
        &inventory,
        "--collect-interval",
        "1s",
        "--named-pipes",
    ]);

    // The exposition format is valid by Prometheus' own checker.
    let (_, text) = http_get(observer.addr(), "/metrics").expect("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let prometheus = Prometheus::scraping(observer.addr());
    let packets = |selector: &str| format!("observer_flow_packets_total{{{selector}}}");

    // Every scenario of the default lab, as a selector that must have traffic.
    let expected = [
        // Intra-pod localhost, with both containers named.
        packets(r#"namespace="shop",pod="shop",class="localhost",direction="request",port="8080",client_container="sidecar",server_container="app""#),
        packets(r#"pod="shop",class="localhost",direction="response",port="8080",client_container="sidecar",server_container="app""#),
        packets(r#"namespace="default",pod="web",class="localhost",port="80",client_container="fetcher",server_container="web""#),
        r#"observer_connections_opened_total{pod="shop",class="localhost",port="8080",client_container="sidecar"}"#.to_owned(),
        // Pod to pod, on one node and across nodes.
        packets(r#"pod="client",class="pod",direction="egress",port="80",peer_namespace="default",peer="web""#),
        packets(r#"pod="web",class="pod",direction="ingress",port="80",peer="client""#),
        packets(r#"pod="remote",class="pod",direction="egress",port="80",peer_namespace="default",peer="web""#),
        // Pod to Service, with the Service's name (before DNAT), both Services.
        packets(r#"pod="client",class="service",direction="egress",port="80",peer_namespace="default",peer="web""#),
        packets(r#"pod="client",class="service",direction="ingress",port="80",peer="web""#),
        packets(r#"pod="client",class="service",port="8080",peer_namespace="shop",peer="shop""#),
        // To the external host.
        packets(r#"pod="client",class="external",direction="egress",port="8080",peer="external""#),
        // A container named on every class.
        packets(r#"pod="client",class="service",direction="egress",peer="web",client_container="to-service""#),
        // Calls by name: the cluster's DNS, asked by the container that calls.
        packets(r#"pod="client",class="service",direction="egress",peer_namespace="kube-system",peer="kube-dns",protocol="udp",port="53",client_container="to-shop""#),
        packets(r#"pod="kube-dns",class="pod",direction="ingress",peer="client",protocol="udp",port="53",server_container="dnsmasq""#),
        packets(r#"pod="web",class="pod",direction="ingress",port="80",server_container="web""#),
        // One-way StatsD datagrams over localhost name their receiver.
        packets(r#"pod="metrics",class="localhost",protocol="udp",port="8125",client_container="app",server_container="agent""#),
        // The meshed pod: the app calls the proxy, on its way to the Service;
        // the proxy calls the Service.
        packets(r#"pod="meshed",class="localhost",port="15001",client_container="app",server_container="proxy",original_class="service",original_peer="web""#),
        packets(r#"pod="meshed",class="service",direction="egress",peer="web",client_container="proxy""#),
        // No network at all: a named pipe from the writer to the reader, and
        // nginx calling php-fpm over a unix socket, both ways.
        packets(r#"pod="pipes",class="fifo",direction="request",path="pipe",client_container="writer",server_container="reader""#),
        packets(r#"pod="php",class="unix",protocol="stream",direction="request",path=~".+/run/php-fpm.sock",client_container="nginx",server_container="php-fpm""#),
        packets(r#"pod="php",class="unix",protocol="stream",direction="response",client_container="nginx",server_container="php-fpm""#),
        r#"observer_connections_opened_total{pod="php",class="unix",direction="request",client_container="nginx",server_container="php-fpm"}"#.to_owned(),
    ];
    for selector in &expected {
        prometheus.wait_positive(selector, WAIT);
    }
    // Never an ephemeral client port (Linux's default range, 32768-60999)
    // as the port label.
    let ephemeral = prometheus.query(&format!(
        "count({}) or vector(0)",
        packets(r#"port=~"3276[89]|327[7-9][0-9]|32[89][0-9]{2}|3[3-9][0-9]{3}|[45][0-9]{4}|60[0-9]{3}""#)
    ));
    assert_eq!(ephemeral, [0.0], "series with an ephemeral port");

    // The named-pipe pair: attached, and silent.
    prometheus.wait_positive(
        r#"observer_programs_attached{namespace="default",pod="pipes"}"#,
        WAIT,
    );
    assert!(
        lab.log("default", "pipes", "reader").contains("message"),
        "the pipe carried messages"
    );
    // Not a packet sent (it may receive the bridge's ARP broadcasts, which
    // are not its doing).
    assert_eq!(
        prometheus.query(&packets(
            r#"pod="pipes",direction!="ingress",class!="fifo""#
        )),
        Vec::<f64>::new()
    );

    // Health figures.
    prometheus.wait_positive("observer_flow_map_entries", WAIT);
    prometheus.wait_positive("observer_build_info", WAIT);
    assert_eq!(
        prometheus.query("sum(observer_programs_attached)"),
        [27.0],
        "9 pods (the cluster DNS among them), 3 programs each"
    );
    assert!(observer.terminate().success());
}
