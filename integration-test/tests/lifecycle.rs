//! Pods that come and go while the observer runs: attached when they appear,
//! detached when they are gone. (How fast: `cargo xtask bench`.)

use std::{
    fs,
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use integration_test::{Bpffs, Observer, Scrape, TempDir, observer::CAP_NET_ADMIN};
use lab::{Lab, Netns, Plan};

#[test]
fn namespaces_created_and_deleted_while_running_are_attached_and_detached() {
    let observer = Observer::start(&["--netns-dir", "/var/run/netns", "--series-grace", "1s"]);

    let pod = Netns::create("late").expect("namespace");
    let name = pod.name().to_owned();
    observer.eventually("the new namespace attached", |m| {
        m.sum("observer_programs_attached", &[("pod", &name)]) == 1.0
    });
    let count = pod
        .run(|| {
            let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..3 {
                sender
                    .send_to(b"hi", receiver.local_addr().unwrap())
                    .unwrap();
            }
            3.0
        })
        .unwrap();
    let m = observer.scrape();
    assert_eq!(
        m.sum("observer_flow_packets_total", &[("pod", &name)]),
        count
    );

    drop(pod);
    observer.eventually("the deleted namespace detached", |m| {
        !m.has("observer_programs_attached", "pod", &name)
    });
    observer.eventually("its series expired", |m| {
        !m.has("observer_flow_packets_total", "pod", &name)
    });
    assert!(observer.terminate().success());
}

#[test]
fn the_inventory_is_watched() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("inventory");
    let path = dir.path().join("inventory.json");
    let full = fs::read_to_string(lab.inventory_path()).unwrap();
    fs::write(&path, &full).unwrap();
    let inventory = path.display().to_string();
    let observer = Observer::start(&["--inventory", &inventory]);
    let attached = |m: &Scrape, pod: &str| m.sum("observer_programs_attached", &[("pod", pod)]);
    observer.eventually("all pods attached", |m| attached(m, "pipes") == 3.0);

    // The inventory loses a pod: it is detached.
    let mut less = lab.inventory().clone();
    less.pods.retain(|p| p.name != "pipes");
    fs::write(&path, serde_json::to_string(&less).unwrap()).unwrap();
    observer.eventually("pipes detached", |m| attached(m, "pipes") == 0.0);
    assert_eq!(attached(&observer.scrape(), "web"), 3.0, "the others stay");

    // A broken file changes nothing; the pod comes back with the next good one.
    fs::write(&path, "{ not json").unwrap();
    thread::sleep(Duration::from_millis(300));
    let m = observer.scrape();
    assert_eq!(attached(&m, "web"), 3.0);
    assert!(m.sum("observer_errors_total", &[("kind", "inventory")]) >= 1.0);
    fs::write(&path, &full).unwrap();
    observer.eventually("pipes attached again", |m| attached(m, "pipes") == 3.0);

    assert!(observer.terminate().success());
}

/// Loaded instances of the per-namespace programs (any observer's).
/// Namespaces that vanish while the observer attaches to them (created and
/// deleted at once): errors to log and count at most, never a crash, and
/// nothing left attached.
#[test]
fn namespaces_vanishing_mid_attach_leave_nothing_attached() {
    let observer = Observer::start(&["--netns-dir", "/var/run/netns"]);
    let before_instances = instances();
    for i in 0..20 {
        drop(Netns::create(&format!("blink{i}")).expect("namespace"));
    }
    let survivor = Netns::create("survivor").expect("namespace");
    let name = survivor.name().to_owned();
    observer.eventually("the survivor attached, the others not", |m| {
        m.sum("observer_programs_attached", &[("pod", &name)]) == 1.0
            && m.sum("observer_pods", &[("state", "attached")]) == 1.0
    });
    drop(survivor);
    observer.eventually("nothing attached", |m| {
        m.sum("observer_pods", &[("state", "attached")]) == 0.0
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while instances() > before_instances {
        assert!(Instant::now() < deadline, "program instances left");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        observer.terminate().success(),
        "{}",
        "still running at the end"
    );
}

fn instances() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("observe_egress"))
        .count()
}

#[test]
fn churn_of_a_hundred_pods_leaves_nothing_behind() {
    const WAVES: usize = 4;
    const PER_WAVE: usize = 25;
    let observer = Observer::start(&["--netns-dir", "/var/run/netns", "--series-grace", "1s"]);
    let before_instances = instances();
    // Measured from the end of the first wave: the first object loads warm
    // the allocator up (about 20 MiB, once).
    let mut warm_rss = 0;
    let mut churned = Vec::new();
    for wave in 0..WAVES {
        let pods: Vec<Netns> = (0..PER_WAVE)
            .map(|i| Netns::create(&format!("churn{wave}x{i}")).expect("namespace"))
            .collect();
        let names: Vec<String> = pods.iter().map(|p| p.name().to_owned()).collect();
        observer.eventually("the wave attached", |m| {
            names
                .iter()
                .all(|n| m.sum("observer_programs_attached", &[("pod", n)]) == 1.0)
        });
        for pod in &pods {
            pod.run(|| {
                let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
                UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .send_to(b"x", receiver.local_addr().unwrap())
                    .unwrap();
            })
            .unwrap();
        }
        let m = observer.scrape();
        for name in &names {
            assert_eq!(
                m.sum("observer_flow_packets_total", &[("pod", name)]),
                1.0,
                "{name}: attached once, counted once"
            );
        }
        drop(pods);
        observer.eventually("the wave detached", |m| {
            names
                .iter()
                .all(|n| !m.has("observer_programs_attached", "pod", n))
        });
        if wave == 0 {
            warm_rss = observer.rss_kib();
        }
        churned.extend(names);
    }
    observer.eventually("every churned pod's series expired", |m| {
        churned
            .iter()
            .all(|n| !m.has("observer_flow_packets_total", "pod", n))
    });
    // The namespaces' programs are unloaded with their links.
    let deadline = Instant::now() + Duration::from_secs(10);
    while instances() > before_instances {
        assert!(
            Instant::now() < deadline,
            "program instances left: {}",
            instances() - before_instances
        );
        thread::sleep(Duration::from_millis(100));
    }
    let growth = observer.rss_kib().saturating_sub(warm_rss);
    eprintln!(
        "resident memory grew by {growth} KiB over the last {} pods",
        (WAVES - 1) * PER_WAVE
    );
    assert!(
        growth < 2 * 1024,
        "resident memory grew by {growth} KiB over {} pods",
        (WAVES - 1) * PER_WAVE
    );
    assert!(observer.terminate().success());
}

#[test]
fn after_sigkill_traffic_flows_and_a_restart_attaches_cleanly() {
    sigkill_and_restart(false);
}

/// Kernels before 6.6 have no TCX: clsact filters, which outlive the process.
#[test]
fn after_sigkill_a_restart_replaces_leftover_clsact_filters() {
    sigkill_and_restart(true);
}

/// An observer with clsact filters killed, the next with TCX links: the
/// filter it left is removed once the link is there (it would count every
/// packet a second time).
#[test]
fn a_restart_with_tcx_links_removes_the_clsact_filter_left_behind() {
    let pod = Netns::create("switch").expect("namespace");
    let path = pod.path().display().to_string();
    let send = |count| send_on_lo(&pod, count);
    let first = Observer::start(&["--netns", &path, "--tc-attach", "clsact"]);
    send(1);
    assert_eq!(
        first
            .scrape()
            .sum("observer_flow_packets_total", &[("pod", pod.name())]),
        1.0
    );
    first.kill();
    assert_eq!(
        clsact_filters_on_lo(&pod),
        1,
        "the killed observer's filter"
    );

    let second = Observer::start(&["--netns", &path, "--tc-attach", "tcx"]);
    assert_eq!(clsact_filters_on_lo(&pod), 0, "removed:\n{}", second.log());
    send(4);
    let m = second.scrape();
    assert_eq!(
        m.sum("observer_flow_packets_total", &[("pod", pod.name())]),
        4.0,
        "each packet counted once"
    );
    // A filter that stays beside the link would be counted here.
    assert_eq!(
        m.sum("observer_errors_total", &[("kind", "detach")]),
        0.0,
        "removed, not left"
    );
    assert!(second.terminate().success());
}

/// The same switch, the next observer without CAP_NET_ADMIN (TCX links
/// need only CAP_SYS_ADMIN): it cannot remove the filter left behind, but
/// finds it (asking needs no capability), says so and counts it: the
/// killed observer's program runs beside its link until `observer
/// cleanup` removes it.
#[test]
fn without_net_admin_a_clsact_filter_left_behind_is_found_and_counted() {
    let pod = Netns::create("no-net-admin").expect("namespace");
    let path = pod.path().display().to_string();
    let first = Observer::start(&["--netns", &path, "--tc-attach", "clsact"]);
    send_on_lo(&pod, 1);
    first.kill();
    assert_eq!(
        clsact_filters_on_lo(&pod),
        1,
        "the killed observer's filter"
    );

    let second = Observer::start_without_capability(
        &["--netns", &path, "--tc-attach", "tcx"],
        CAP_NET_ADMIN,
    );
    send_on_lo(&pod, 4);
    let m = second.scrape();
    assert_eq!(
        m.sum("observer_programs_attached", &[("pod", pod.name())]),
        1.0,
        "attached as a TCX link:\n{}",
        second.log()
    );
    assert_eq!(
        m.sum("observer_flow_packets_total", &[("pod", pod.name())]),
        4.0
    );
    assert_eq!(clsact_filters_on_lo(&pod), 1, "it cannot remove the filter");
    assert_eq!(
        m.sum("observer_errors_total", &[("kind", "detach")]),
        1.0,
        "the filter left beside the link, counted:\n{}",
        second.log()
    );
    assert!(
        second
            .log()
            .contains("without CAP_NET_ADMIN, the clsact filter"),
        "{}",
        second.log()
    );
    assert!(second.terminate().success());
}

/// Two observers on a node at once, without `--pin-dir` (whose lock keeps
/// them apart): the next observer starts while the last still runs, and swaps its program into the clsact filter
/// in place. The last, going, leaves the filter: it runs the next one's
/// program now (removing it would leave the pod unobserved, and a policy
/// that fails closed unenforced, while the next one counts on it).
#[test]
fn an_observer_going_after_the_next_started_leaves_it_the_clsact_filter() {
    let pod = Netns::create("surge").expect("namespace");
    let path = pod.path().display().to_string();
    let args = ["--netns", &path, "--tc-attach", "clsact"];
    let send = |count| send_on_lo(&pod, count);
    let packets = |observer: &Observer| {
        observer
            .scrape()
            .sum("observer_flow_packets_total", &[("pod", pod.name())])
    };
    let first = Observer::start(&args);
    send(1);
    assert_eq!(packets(&first), 1.0);

    let second = Observer::start(&args);
    assert_swapped_in_place(&second);
    let (status, log) = first.terminate_with_log();
    assert!(status.success());
    assert_eq!(
        clsact_filters_on_lo(&pod),
        1,
        "the next observer's filter stays:\n{log}"
    );
    assert!(
        log.contains("left the filter in place: it runs another observer's program now"),
        "{log}"
    );
    send(4);
    assert_eq!(packets(&second), 4.0, "counted by the next observer");
    assert!(second.terminate().success());
    assert_eq!(
        clsact_filters_on_lo(&pod),
        0,
        "removed by the observer whose program it ran"
    );
}

/// The observer swapped its program into the filter an earlier one left.
fn assert_swapped_in_place(observer: &Observer) {
    let log = observer.log();
    assert!(
        log.contains("replaced in place the program of the filter an earlier observer left"),
        "{log}"
    );
}

/// One observer at a time uses a node's pins: the next one with the same
/// `--pin-dir` (one started while the last still runs) waits until it has
/// gone, then takes over; it does not attach beside it, nor take its maps
/// while it counts in them. One stopped while it waits exits at once;
/// `observer cleanup` waits too.
#[test]
fn a_second_observer_on_the_same_pins_waits_for_the_first_to_go() {
    let pins = Bpffs::mount("one-at-a-time");
    let pod = Netns::create("one-at-a-time").expect("namespace");
    let path = pod.path().display().to_string();
    let pin_dir = pins.path().join("observer").display().to_string();
    let args = ["--netns", &path, "--pin-dir", &pin_dir];
    let packets = |observer: &Observer| {
        observer
            .scrape()
            .sum("observer_flow_packets_total", &[("pod", pod.name())])
    };
    let waits = |observer: &Observer| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !observer
            .log()
            .contains("uses this pin directory: waiting for it to exit")
        {
            assert!(
                Instant::now() < deadline,
                "not waiting:\n{}",
                observer.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let first = Observer::start(&args);
    send_on_lo(&pod, 2);
    assert_eq!(packets(&first), 2.0);

    let mut second = Observer::spawn(&args);
    waits(&second);
    send_on_lo(&pod, 3);
    assert_eq!(packets(&first), 5.0, "counted once, by the first alone");
    let third = Observer::spawn(&args);
    waits(&third);
    assert!(third.terminate().success(), "stopped while it waited");

    assert!(first.terminate().success());
    second.wait_ready(Duration::from_secs(30));
    assert!(
        second
            .log()
            .contains("the other process has gone: going on"),
        "{}",
        second.log()
    );
    send_on_lo(&pod, 4);
    let counted = packets(&second);
    assert!(counted >= 4.0, "the next observer counts: {counted}");

    // Nor does `observer cleanup` take the pins of an observer that runs
    // (an uninstall's observer may take its time to go): it waits too.
    let pinned = pins.pins();
    assert!(!pinned.is_empty());
    let mut cleanup = std::process::Command::new(integration_test::observer::binary())
        .args(["cleanup", "--pin-dir", &pin_dir])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("observer cleanup");
    thread::sleep(Duration::from_secs(1));
    assert!(cleanup.try_wait().unwrap().is_none(), "waiting");
    assert_eq!(pins.pins(), pinned, "nothing removed while it runs");
    assert!(second.terminate().success());
    let out = cleanup.wait_with_output().expect("cleanup's exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "an observer uses this pin directory: waiting for it to exit before removing its pins"
        ),
        "{err}"
    );
    assert_eq!(
        pins.pins(),
        Vec::<String>::new(),
        "removed once it had gone"
    );
}

/// Sends `count` datagrams over the pod's lo.
fn send_on_lo(pod: &Netns, count: usize) {
    pod.run(|| {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..count {
            sender
                .send_to(b"x", receiver.local_addr().unwrap())
                .unwrap();
        }
    })
    .unwrap()
}

/// Our filters on the pod's lo (clsact), as `tc` lists them.
fn clsact_filters_on_lo(pod: &Netns) -> usize {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.name(),
            "tc",
            "filter",
            "show",
            "dev",
            "lo",
            "egress",
        ])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("observe_egress"))
        .inspect(|l| {
            assert!(
                l.contains("pref 20290 bpf"),
                "at the observer's priority: {l}"
            )
        })
        .count()
}

fn sigkill_and_restart(netlink: bool) {
    let pod = Netns::create("restart").expect("namespace");
    let path = pod.path().display().to_string();
    let mut args = vec!["--netns", &path];
    if netlink {
        args.extend(["--tc-attach", "clsact"]);
    }
    let send = |count: usize| {
        pod.run(|| {
            let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
            receiver
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut buf = [0; 8];
            for _ in 0..count {
                sender
                    .send_to(b"x", receiver.local_addr().unwrap())
                    .unwrap();
                receiver.recv(&mut buf).expect("delivered");
            }
        })
        .unwrap()
    };
    let first = Observer::start(&args);
    send(2);
    assert_eq!(
        first
            .scrape()
            .sum("observer_flow_packets_total", &[("pod", pod.name())]),
        2.0
    );
    first.kill();

    // The programs fail open: traffic flows on.
    send(3);
    if netlink {
        // The filter stays with the kernel, its program still running.
        assert_eq!(
            clsact_filters_on_lo(&pod),
            1,
            "the killed observer's filter"
        );
    } else {
        // TCX links are the process' file descriptors: gone with it.
        let left = pod
            .run(|| {
                aya::programs::SchedClassifier::query_tcx("lo", aya::programs::TcAttachType::Egress)
                    .map(|(_, programs)| programs.len())
            })
            .unwrap()
            .unwrap();
        assert_eq!(left, 0, "no program of the killed observer on lo");
    }

    // A new observer attaches again and counts from zero: no double counting.
    let second = Observer::start(&args);
    if netlink {
        assert_eq!(
            clsact_filters_on_lo(&pod),
            1,
            "the leftover replaced, not doubled"
        );
        // In place: its program swapped into the filter, never removed.
        assert_swapped_in_place(&second);
    }
    send(4);
    assert_eq!(
        second
            .scrape()
            .sum("observer_flow_packets_total", &[("pod", pod.name())]),
        4.0
    );
    assert!(second.terminate().success());
    if netlink {
        assert_eq!(clsact_filters_on_lo(&pod), 0, "detached at exit");
    }
}

#[test]
fn a_changed_inventory_classifies_live_flows_again() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("reclassify");
    let path = dir.path().join("inventory.json");
    let mut without_web = lab.inventory().clone();
    without_web.pods.retain(|p| p.name != "web");
    fs::write(&path, serde_json::to_string(&without_web).unwrap()).unwrap();
    let inventory = path.display().to_string();
    let observer = Observer::start(&["--inventory", &inventory]);

    // One UDP flow from the client to the web pod's address, kept open.
    let socket = lab
        .pod_netns("default", "client")
        .run(|| UdpSocket::bind("0.0.0.0:0").unwrap())
        .unwrap();
    let web = "10.244.1.10:9999";
    let to_web = |labels: &[(&str, &str)], m: &Scrape| {
        let mut all = vec![
            ("pod", "client"),
            ("class", "pod"),
            ("protocol", "udp"),
            ("port", "9999"),
        ];
        all.extend_from_slice(labels);
        m.sum("observer_flow_packets_total", &all)
    };
    for _ in 0..2 {
        socket.send_to(b"x", web).unwrap();
    }
    let m = observer.scrape();
    assert_eq!(
        to_web(&[("peer", "unknown")], &m),
        2.0,
        "not in the inventory yet"
    );

    // The inventory now has the web pod: the same flow names it.
    fs::write(&path, fs::read_to_string(lab.inventory_path()).unwrap()).unwrap();
    observer.eventually("web attached", |m| {
        m.sum("observer_programs_attached", &[("pod", "web")]) == 3.0
    });
    for _ in 0..3 {
        socket.send_to(b"x", web).unwrap();
    }
    let m = observer.scrape();
    assert_eq!(
        to_web(&[("peer", "web"), ("peer_namespace", "default")], &m),
        3.0
    );
    assert_eq!(to_web(&[("peer", "unknown")], &m), 2.0);
    assert!(observer.terminate().success());
}

/// With `--state-dir`, a restarted observer goes on counting from where the
/// last one stopped: no series starts again from zero (Prometheus would see
/// a reset). A file it cannot read is set aside, and it counts from zero.
#[test]
fn counters_continue_across_a_restart() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("state");
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let inventory = lab.inventory_path().display().to_string();
    let args = ["--inventory", &inventory, "--state-dir", state];
    let web = |m: &Scrape| {
        m.sum(
            "observer_flow_packets_total",
            &[("pod", "web"), ("class", "localhost")],
        )
    };

    let first = Observer::start(&args);
    let before = web(&first.eventually("web's localhost traffic", |m| web(m) > 0.0));
    assert!(first.terminate().success());

    // At the last one's count, or beyond, from the first scrape on.
    let second = Observer::start(&args);
    let after = web(&second.scrape());
    assert!(
        after >= before,
        "counted {before}, then {after} after the restart"
    );
    second.eventually("counting on", |m| web(m) > after);
    assert!(second.terminate().success());

    // Unreadable: set aside, counted from zero, and said so.
    fs::write(dir.path().join("state/series.json"), "not json").unwrap();
    let third = Observer::start(&args);
    let m = third.scrape();
    assert_eq!(m.sum("observer_errors_total", &[("kind", "state")]), 1.0);
    assert!(
        third.log().contains("counting from zero"),
        "{}",
        third.log()
    );
    assert!(dir.path().join("state/series.json.unreadable").exists());
    assert!(third.terminate().success());
}
