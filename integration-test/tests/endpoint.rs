//! The endpoint as an operator needs it: `--secure-serving` (HTTPS, and
//! only tokens the Kubernetes API allows to read), scraped by a real
//! Prometheus with a bearer token; and limits that keep a flood of idle
//! connections and a crowd of scrapers from keeping anyone out.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use integration_test::{
    FakeApi, Observer, Prometheus, TempDir, kube_api, loaded_programs,
    observer::{free_port, http_get, https_get},
};
use lab::{Lab, Netns, Plan};

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus";

#[test]
fn secure_serving_lets_only_allowed_tokens_read_and_prometheus_scrapes_over_tls() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("secure-serving");
    let api_addr = free_port();
    let api = FakeApi::serve(api_addr);
    api.load(lab.inventory());
    api.add_token("prometheus-token", PROMETHEUS);
    api.add_token("stranger-token", "system:serviceaccount:default:stranger");
    api.grant(PROMETHEUS, "/metrics");
    let kubeconfig = kube_api::kubeconfig(api_addr, dir.path());
    let observer = Observer::start_secure(
        &[
            "--kubernetes",
            "--node",
            "node-1",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
        "prometheus-token",
    );
    let addr = observer.addr();
    let code = |path: &str, token: Option<&str>| https_get(addr, path, token).map(|(code, _)| code);
    // No plain HTTP at all.
    assert!(http_get(addr, "/metrics").is_none_or(|(code, _)| code != 200));
    assert_eq!(code("/metrics", None), Some(401), "no token");
    assert_eq!(
        code("/metrics", Some("forged")),
        Some(401),
        "a token the API does not know"
    );
    assert_eq!(
        code("/metrics", Some("stranger-token")),
        Some(403),
        "a user without the permission"
    );
    assert_eq!(
        code("/flows", Some("prometheus-token")),
        Some(403),
        "per path"
    );
    let (status, body) = https_get(addr, "/metrics", Some("prometheus-token")).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("observer_build_info"));
    // The probes stay open: they tell nothing.
    assert_eq!(code("/healthz", None), Some(200));
    assert_eq!(code("/readyz", None), Some(200));
    // Answers are kept: scrapes do not ask the API each time.
    let reviews = api.reviews();
    for _ in 0..5 {
        assert_eq!(code("/metrics", Some("prometheus-token")), Some(200));
        assert_eq!(code("/metrics", Some("forged")), Some(401));
    }
    assert_eq!(api.reviews(), reviews, "asked the API again");

    // A real Prometheus, over TLS with its token.
    let prometheus = Prometheus::scraping_securely(addr, "prometheus-token");
    let timeout = Duration::from_secs(30);
    prometheus.wait_positive_or("up{job=\"observer\"}", timeout, "scraped over TLS");
    prometheus.wait_positive_or(
        "sum(observer_flow_packets_total{pod=\"web\",class=\"localhost\"})",
        timeout,
        "the lab's traffic, in Prometheus",
    );
    let m = observer.scrape();
    assert!(
        m.sum(
            "observer_http_requests_total",
            &[("path", "/metrics"), ("code", "401")]
        ) >= 2.0
    );
    assert!(observer.terminate().success());
}

#[test]
fn idle_connections_and_concurrent_scrapes_keep_no_one_out() {
    raise_file_limit();
    let _lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    // A file limit of 1,024, as container runtimes often set it: before the
    // endpoint had limits, 1,100 idle connections took every descriptor.
    let observer = Observer::start_with_file_limit(&["--netns-dir", "/var/run/netns"], 1024);
    let addr = observer.addr();

    // 2,000 connections that never send a byte, held open by this test.
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
        .collect();
    // 50 scrapers at once, meanwhile. Patient to connect, as Prometheus is
    // (its scrape timeout is 10 s): while the 2,000 connect, the listen
    // queue can overflow and a SYN wait for its retransmission, 1 s later.
    let scrapers: Vec<_> = (0..50)
        .map(|_| thread::spawn(move || scrape_status(addr)))
        .collect();
    // A new pod meanwhile: attached as fast as ever.
    let started = Instant::now();
    let pod = Netns::create("storm").expect("a namespace");
    let name = pod.name().to_owned();
    let attached = observer.eventually("the new pod attached", |m| {
        m.sum("observer_programs_attached", &[("pod", &name)]) >= 1.0
    });
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "attached after {took:?}");
    for scraper in scrapers {
        assert_eq!(scraper.join().unwrap(), Ok(200), "a scrape went unanswered");
    }
    assert!(
        attached.sum(
            "observer_http_connections_closed_total",
            &[("reason", "evicted")]
        ) >= 1_000.0,
        "idle connections made room for the scrapes"
    );
    assert!(observer.scrape().sum("observer_http_connections", &[]) <= 256.0);

    // SIGTERM with the idle connections still open: all detached at once.
    let stopping = Instant::now();
    assert!(observer.terminate().success());
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    for _ in 0..50 {
        if loaded_programs("observe_egress") == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(loaded_programs("observe_egress"), 0, "programs left");
    drop(idle);
    drop(pod);
}

/// Scrapes that come together share one collection; a client that sends
/// half a request is cut off at the header timeout; one that asks and never
/// reads does not hold up the shutdown.
#[test]
fn scrapes_coalesce_and_slow_clients_are_cut_off() {
    let pod = Netns::create("coalesce").expect("a namespace");
    let path = pod.path().display().to_string();
    let observer = Observer::start(&[
        "--netns",
        &path,
        "--header-timeout",
        "1s",
        "--collect-interval",
        "60m",
    ]);
    let addr = observer.addr();
    // Enough flows that a collection takes a while: scrapes overlap it.
    pod.run(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        for n in 0..200_000u32 {
            let to = (
                Ipv4Addr::new(127, 0, 1 + (n / 50_000) as u8, 1),
                1 + (n % 50_000) as u16,
            );
            let _ = socket.send_to(&[0; 8], to);
        }
    })
    .expect("enter namespace");
    let collections =
        |m: &integration_test::Scrape| m.sum("observer_collection_duration_seconds_count", &[]);
    let before = collections(&observer.scrape());
    let scrapers: Vec<_> = (0..10)
        .map(|_| thread::spawn(move || http_get(addr, "/metrics").map(|(code, _)| code)))
        .collect();
    for scraper in scrapers {
        assert_eq!(scraper.join().unwrap(), Some(200));
    }
    let after = collections(&observer.scrape());
    // The scrape that reads `after` runs one more collection of its own.
    let shared = after - before - 1.0;
    assert!(
        (1.0..=2.0).contains(&shared),
        "ten scrapes at once ran {shared} collections"
    );

    // Half a request: closed at the header timeout, not held.
    let mut half = TcpStream::connect(addr).expect("connect");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    half.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = half.read_to_end(&mut answer);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "half a request held the connection for {took:?}"
    );

    // A client that asks for a hundred scrapes and reads none: its socket
    // fills; SIGTERM still ends the observer at once.
    let mut silent = TcpStream::connect(addr).expect("connect");
    for _ in 0..100 {
        let _ = silent.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    assert!(observer.terminate().success());
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "stopped after {took:?} with a client that does not read"
    );
    drop(silent);
}

/// This test holds 2,000 sockets of its own.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct of our own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.max(8192).min(limit.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// `GET /metrics` within 10 s, connecting within 5: its status, or what
/// went wrong.
fn scrape_status(addr: std::net::SocketAddr) -> Result<u16, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&response[..response.len().min(64)]).into_owned();
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))
}
