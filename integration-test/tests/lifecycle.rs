//! Pods that come and go while the observer runs: attached when they appear,
//! detached when they are gone. (How fast: `cargo xtask bench`.)

use std::{
    fs,
    net::UdpSocket,
    thread,
    time::{Duration, Instant},
};

use integration_test::{Observer, Scrape};
use lab::{Lab, Netns, Plan};

/// Scrapes until `condition` holds (at most 10 s).
fn eventually(observer: &Observer, what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = observer.scrape();
        if condition(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            observer.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn namespaces_created_and_deleted_while_running_are_attached_and_detached() {
    let observer = Observer::start(&["--netns-dir", "/var/run/netns", "--series-grace", "1s"]);

    let pod = Netns::create("late").expect("namespace");
    let name = pod.name().to_owned();
    eventually(&observer, "the new namespace attached", |m| {
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
    eventually(&observer, "the deleted namespace detached", |m| {
        !m.has("observer_programs_attached", "pod", &name)
    });
    eventually(&observer, "its series expired", |m| {
        !m.has("observer_flow_packets_total", "pod", &name)
    });
    assert!(observer.terminate().success());
}

#[test]
fn the_inventory_is_watched() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = std::env::temp_dir().join(format!("observer-inventory-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("inventory.json");
    let full = fs::read_to_string(lab.inventory_path()).unwrap();
    fs::write(&path, &full).unwrap();
    let inventory = path.display().to_string();
    let observer = Observer::start(&["--inventory", &inventory]);
    let attached = |m: &Scrape, pod: &str| m.sum("observer_programs_attached", &[("pod", pod)]);
    eventually(&observer, "all pods attached", |m| {
        attached(m, "pipes") == 3.0
    });

    // The inventory loses a pod: it is detached.
    let mut less = lab.inventory().clone();
    less.pods.retain(|p| p.name != "pipes");
    fs::write(&path, serde_json::to_string(&less).unwrap()).unwrap();
    eventually(&observer, "pipes detached", |m| attached(m, "pipes") == 0.0);
    assert_eq!(attached(&observer.scrape(), "web"), 3.0, "the others stay");

    // A broken file changes nothing; the pod comes back with the next good one.
    fs::write(&path, "{ not json").unwrap();
    thread::sleep(Duration::from_millis(300));
    let m = observer.scrape();
    assert_eq!(attached(&m, "web"), 3.0);
    assert!(m.sum("observer_errors_total", &[("kind", "inventory")]) >= 1.0);
    fs::write(&path, &full).unwrap();
    eventually(&observer, "pipes attached again", |m| {
        attached(m, "pipes") == 3.0
    });

    assert!(observer.terminate().success());
    let _ = fs::remove_dir_all(&dir);
}
