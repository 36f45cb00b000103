//! `failureMode: closed` across restarts of the observer, on the node lab:
//! a client connects every few milliseconds, to a destination its policy
//! denies at `connect()`, to one an ingress rule of another pod drops, and
//! to one it may reach, while the observer is stopped with SIGTERM, started
//! again, killed with SIGKILL and started again. No denied connection gets
//! through, no allowed one fails, and every counter goes on exactly, with
//! TCX links and with clsact filters, and when `--tc-attach` changes from
//! one observer to the next. Then `observer cleanup` leaves nothing
//! pinned, no filter and nothing loaded; in open mode nothing is pinned in
//! the first place.

use std::{net::Ipv4Addr, thread, time::Duration};

use integration_test::{
    Bpffs, Observer, Scrape, TempDir,
    container::{Prober, container, listen_overflows, tcp_listener},
    loaded_programs,
    observer::run_to_exit,
};
use lab::{Lab, Plan};

/// The client may not call the external host on 9999 (decided at
/// `connect()`), and the shop pod drops the client's connections to 9090
/// (decided at its `eth0` ingress). Nothing else in the lab uses either
/// port, so the verdict counts are the prober's alone.
const POLICY: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: client-out}
spec:
  podSelector: {namespace: default, matchLabels: {app: client}}
  mode: enforce
  failureMode: MODE
  rules:
    - {name: no-9999, class: external, cidrs: [192.168.200.0/24], ports: [9999], action: deny}
---
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shop-in}
spec:
  podSelector: {namespace: shop, matchLabels: {app: shop}}
  mode: enforce
  failureMode: MODE
  rules:
    - {name: not-client, class: pod, direction: ingress, peer: {namespace: default, matchLabels: {app: client}}, ports: [9090], action: deny}
";

const EXTERNAL: &str = "192.168.200.10";
const WEB_SERVICE: &str = "10.96.0.10";

fn verdicts(m: &Scrape, rule: &str) -> f64 {
    m.sum(
        "observer_policy_verdicts_total",
        &[("rule", rule), ("verdict", "deny")],
    )
}

/// The prober's connections: it runs in the client's `to-pod` container,
/// whose own traffic goes to web's pod address, never to the Service, the
/// external host or shop.
fn opened(m: &Scrape, class: &str, port: &str) -> f64 {
    m.sum(
        "observer_connections_opened_total",
        &[
            ("pod", "client"),
            ("class", class),
            ("port", port),
            ("client_container", "to-pod"),
        ],
    )
}

#[test]
fn closed_policies_hold_through_restarts_and_counters_go_on_exactly() {
    closed_policies_hold("tcx");
}

/// The same with clsact filters: they cannot be pinned, but the closed
/// pods' filters are left in place at exit, and the next observer swaps
/// its programs into them once its maps are written.
#[test]
fn closed_policies_hold_through_restarts_with_clsact_filters() {
    closed_policies_hold("clsact");
}

fn closed_policies_hold(tc_attach: &str) {
    let setup = Setup::up(&format!("closed-{tc_attach}"), "closed");
    let Setup {
        lab, pins, pin_dir, ..
    } = &setup;
    let state = setup.dir.path().join("state").display().to_string();
    let mut args = setup.args();
    args.extend(["--state-dir", &state, "--tc-attach", tc_attach]);
    let (shop_app, shop_netns) = container(lab, "shop", "shop", "app");
    let mut listener = tcp_listener(&shop_app, &shop_netns, 9090, 60);
    let shop_ip = lab.pod("shop", "shop").unwrap().ip.to_string();
    let (client, client_netns) = container(lab, "default", "client", "to-pod");
    let (_, web_netns) = container(lab, "default", "web", "web");

    let first = Observer::start(&args);
    first.eventually("the policies in force", |m| {
        m.sum("observer_programs_attached", &[]) > 0.0
    });
    let overflows_before = listen_overflows(&web_netns);
    // 50 ms for what is refused or dropped, so that there are many; the
    // allowed ones may take longer on a loaded machine, but not a SYN
    // retransmission (1 s): a timeout there is a SYN or its answer lost.
    let prober = Prober::start(
        &client,
        &client_netns,
        &[
            (EXTERNAL, 9999, 50),
            (&shop_ip, 9090, 50),
            (WEB_SERVICE, 80, 500),
        ],
        3,
        14,
    );
    // When each step began, in ms from the prober's start: to place an
    // attempt that failed.
    let began = std::time::Instant::now();
    let mut steps: Vec<(&str, u128)> = Vec::new();
    let mut step = |name| steps.push((name, began.elapsed().as_millis()));
    thread::sleep(Duration::from_secs(1));
    step("SIGTERM");
    assert!(first.terminate().success());
    step("first exited");
    let left = pins.pins();
    assert!(
        left.iter().any(|p| p.contains("pods/")) && left.iter().any(|p| p.contains("maps-v")),
        "the closed pods' links and the maps stay pinned: {left:?}"
    );
    if tc_attach == "clsact" {
        assert_eq!(our_filters(&client_netns), 3, "the client's filters stay");
        assert_eq!(kept_filters(pins), 6, "the client's and shop's recorded");
    }
    // As an observer from before the unix-socket hooks would have left
    // them: without those. The next one takes over what is there and
    // attaches what is not, beside it.
    let unix_pins: Vec<&String> = left
        .iter()
        .filter(|p| p.ends_with("/unix_connect") || p.ends_with("/unix_sendmsg"))
        .collect();
    assert!(
        !unix_pins.is_empty(),
        "the unix-socket hooks pinned: {left:?}"
    );
    for pin in unix_pins {
        std::fs::remove_file(pins.path().join(pin)).expect("an older observer's pins");
    }
    // No observer at all for a second: the pinned programs hold.
    thread::sleep(Duration::from_secs(1));
    step("second starting");
    let second = Observer::start(&args);
    step("second started");
    assert!(
        second.log().contains("took over"),
        "the second observer takes over:\n{}",
        second.log()
    );
    assert!(
        !second.log().contains("attaching anew"),
        "what it took over runs its programs:\n{}",
        second.log()
    );
    assert!(
        pins.pins().iter().any(|p| p.ends_with("/unix_connect")),
        "the hooks it did not find attached and pinned anew: {:?}",
        pins.pins()
    );
    thread::sleep(Duration::from_secs(1));
    step("SIGKILL");
    second.kill();
    thread::sleep(Duration::from_secs(1));
    step("third starting");
    let third = Observer::start(&args);
    step("third started");
    let attempts = prober.finish();
    let overflows = listen_overflows(&web_netns) - overflows_before;

    let [external, shop, web] = &attempts[..] else {
        unreachable!()
    };

    // Nothing denied got through, nothing allowed failed, at any moment.
    assert_eq!(
        (external.connected, external.timed_out, external.other),
        (0, 0, 0),
        "to the denied external port: {external:?}"
    );
    assert!(external.not_permitted > 100, "{external:?}");
    assert_eq!(
        (shop.connected, shop.not_permitted, shop.other),
        (0, 0, 0),
        "to the port shop's ingress rule drops: {shop:?}"
    );
    assert!(shop.timed_out > 20, "{shop:?}");
    assert_eq!(
        (web.not_permitted, web.other),
        (0, 0),
        "to the Service the client may call: {web:?}"
    );
    // But for what the web server could not take itself: its accept queue
    // (a Python http.server's five) overflows now and then on a loaded
    // machine, and the kernel drops the SYN.
    assert!(
        web.timed_out <= overflows,
        "to the Service the client may call, {} lost (its listener overflowed {overflows} times): {web:?}; steps (ms from the start): {steps:?}",
        web.timed_out
    );
    assert!(web.connected > 100, "{web:?}");

    // Every decision and every connection counted once, through a SIGTERM,
    // a second without an observer, a SIGKILL and another second.
    let counted = |m: &Scrape| {
        [
            verdicts(m, "no-9999"),
            verdicts(m, "not-client"),
            opened(m, "pod", "9090"),
        ]
    };
    let made = [external.not_permitted, shop.timed_out, shop.timed_out].map(|n| n as f64);
    // The connections that were let through: what the kernel's flow map
    // counted for the client pod's flows to web since the first observer
    // made it (its counts are cumulative, and no flow was evicted) is what
    // the three observers together exported, to the connection. By pod:
    // its containers share its ports, and a port one of them used may be
    // used again by another (the prober, after a lab container's curl): the
    // kernel's flow then holds both connections, under the cgroup of the
    // last, where the observers counted each under its container. (The
    // prober's own tally can be a SYN off: the kernel sends one now and
    // then without its socket, counted as the kernel's; the wire is what
    // counts.)
    let client_ip: Ipv4Addr = lab
        .pod("default", "client")
        .unwrap()
        .ip
        .to_string()
        .parse()
        .unwrap();
    let from_pod = |m: &Scrape| {
        m.sum(
            "observer_connections_opened_total",
            &[
                ("pod", "client"),
                ("class", "service"),
                ("port", "80"),
                ("direction", "egress"),
            ],
        )
    };
    // The last attempts may be a collection away: a scrape that arrives
    // while a collection runs is answered by it, and that collection may
    // have read the maps before the prober's last connection.
    let mut m = third.scrape();
    let mut in_kernel = kernel_connections(pins, client_ip, WEB_SERVICE, 80);
    for _ in 0..50 {
        if counted(&m) == made && from_pod(&m) == in_kernel as f64 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        in_kernel = kernel_connections(pins, client_ip, WEB_SERVICE, 80);
        m = third.scrape();
    }
    assert_eq!(
        counted(&m),
        made,
        "counted (deny no-9999, deny not-client, opened to shop) against made:\n{}",
        third.log()
    );
    let to_pod = lab::cgroup_id(&client).expect("the container's cgroup id");
    assert_eq!(
        from_pod(&m),
        in_kernel as f64,
        "exported against the kernel's count; exported:\n{}in the kernel (source cgroup, class, server, flows, connections; the prober's container's is {to_pod}):\n{:?}\nflows of more than one connection: {:?}\nthe prober's attempts to web: {web:?} (its listener overflowed {overflows} times)\n{}",
        m.samples(
            "observer_connections_opened_total",
            &[("pod", "client"), ("port", "80")]
        ),
        kernel_flows(pins, client_ip, WEB_SERVICE, 80),
        flows_to(pins, client_ip, WEB_SERVICE, 80)
            .filter(|(_, v)| v.connections > 1)
            .collect::<Vec<_>>(),
        third.log(),
    );
    // The prober's connections, under its container.
    let to_web = opened(&m, "service", "80");
    assert!(
        (to_web - web.connected as f64).abs() <= 2.0,
        "{to_web} connections to web counted; the prober made {}",
        web.connected
    );
    assert!(third.terminate().success());

    // An uninstall: `observer cleanup` removes every pin; nothing of the
    // observer's stays loaded.
    assert!(!pins.pins().is_empty());
    let (status, err) = run_to_exit(&["cleanup", "--pin-dir", pin_dir]);
    assert!(status.success(), "{err}");
    assert_eq!(pins.pins(), Vec::<String>::new());
    assert_eq!(our_filters(&client_netns), 0, "the filters removed");
    assert_unloaded();
    let _ = listener.kill();
    let _ = listener.wait();
}

/// TCP connections the pinned flow map counted from the pod with address
/// `from` to `host:port` (egress, on `eth0`).
fn kernel_connections(pins: &Bpffs, from: Ipv4Addr, host: &str, port: u16) -> u64 {
    flows_to(pins, from, host, port)
        .map(|(_, v)| u64::from(v.connections))
        .sum()
}

/// The flows from the pod with address `from` to `host:port`, egress on
/// `eth0`, in the pinned flow map.
fn flows_to(
    pins: &Bpffs,
    from: Ipv4Addr,
    host: &str,
    port: u16,
) -> impl Iterator<Item = (observer_common::FlowKey, observer_common::FlowValue)> {
    use aya::maps::{HashMap, MapData};
    use observer_common::{FlowKey, FlowValue, direction, interface, ipv4_mapped};
    let map = MapData::from_pin(pins.path().join("observer/maps-v1/FLOWS")).expect("the flow map");
    let flows: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(aya::maps::Map::HashMap(map)).expect("a hash map");
    let addr = ipv4_mapped(host.parse::<Ipv4Addr>().unwrap().octets());
    let from = ipv4_mapped(from.octets());
    let all: Vec<_> = flows.iter().flatten().collect();
    all.into_iter().filter(move |(k, _)| {
        k.src_addr == from
            && k.dst_addr == addr
            && k.dst_port == port
            && k.direction == direction::EGRESS
            && k.interface == interface::POD
    })
}

/// What [`flows_to`] finds by source cgroup, class and server: how many
/// flows, and their connections.
fn kernel_flows(
    pins: &Bpffs,
    from: Ipv4Addr,
    host: &str,
    port: u16,
) -> Vec<(u64, u8, u8, u64, u64)> {
    let mut by = std::collections::BTreeMap::<(u64, u8, u8), (u64, u64)>::new();
    for (_, v) in flows_to(pins, from, host, port) {
        let entry = by.entry((v.src_cgroup, v.class, v.server)).or_default();
        entry.0 += 1;
        entry.1 += u64::from(v.connections);
    }
    by.into_iter()
        .map(|((cgroup, class, server), (flows, connections))| {
            (cgroup, class, server, flows, connections)
        })
        .collect()
}

/// The observer's filters (priority 20290, handle 0x4f425356) on a pod's
/// three hooks, as `tc` lists them.
fn our_filters(netns: &std::path::Path) -> usize {
    [("lo", "egress"), ("eth0", "egress"), ("eth0", "ingress")]
        .into_iter()
        .map(|(dev, direction)| {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["tc", "filter", "show", "dev", dev, direction])
                .output()
                .expect("tc");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("pref 20290 bpf") && l.contains("handle 0x4f425356"))
                .count()
        })
        .sum()
}

/// The filters recorded as left for the next observer, of every pod.
fn kept_filters(pins: &Bpffs) -> usize {
    let pods = std::fs::read_dir(pins.path().join("observer/pods"));
    pods.into_iter()
        .flatten()
        .flatten()
        .map(|pod| std::fs::read_dir(pod.path().join("filters")).map_or(0, |hooks| hooks.count()))
        .sum()
}

/// A test's lab, its own bpffs for the pins, and the policy in `mode`.
struct Setup {
    lab: Lab,
    pins: Bpffs,
    dir: TempDir,
    policy: String,
    pin_dir: String,
    inventory: String,
}

impl Setup {
    fn up(name: &str, mode: &str) -> Self {
        let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
        let pins = Bpffs::mount(&format!("pins-{name}"));
        let dir = TempDir::new(&format!("failure-mode-{name}"));
        let policy = dir.write("policy.yaml", &POLICY.replace("MODE", mode));
        let pin_dir = pins.path().join("observer").display().to_string();
        let inventory = lab.inventory_path().display().to_string();
        Self {
            lab,
            pins,
            dir,
            policy,
            pin_dir,
            inventory,
        }
    }

    /// `--inventory`, `--policy` and `--pin-dir`.
    fn args(&self) -> Vec<&str> {
        vec![
            "--inventory",
            &self.inventory,
            "--policy",
            &self.policy,
            "--pin-dir",
            &self.pin_dir,
        ]
    }
}

/// No program of the observer's stays loaded (the kernel frees them a
/// moment after their last link goes).
fn assert_unloaded() {
    for program in ["observe_egress", "policy_connect4"] {
        for _ in 0..50 {
            if loaded_programs(program) == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(loaded_programs(program), 0, "{program} still loaded");
    }
}

#[test]
fn open_policies_leave_nothing_pinned_and_fail_open() {
    let setup = Setup::up("open", "open");
    let Setup { lab, pins, .. } = &setup;
    let args = setup.args();
    let (client, client_netns) = container(lab, "default", "client", "to-pod");
    let observer = Observer::start(&args);
    let denied =
        || integration_test::container::connect_from(&client, &client_netns, EXTERNAL, 9999);
    assert_eq!(denied(), integration_test::container::Connect::NotPermitted);
    assert!(observer.terminate().success());
    assert_eq!(pins.pins(), Vec::<String>::new(), "nothing stays pinned");
    // Failing open: nothing decides any more (the external host does not
    // listen on 9999: refused, not EPERM).
    assert_ne!(denied(), integration_test::container::Connect::NotPermitted);
    assert_unloaded();
}

#[test]
fn closed_without_a_pin_dir_is_refused() {
    let (status, err) = run_to_exit(&[
        "run",
        "--netns-dir",
        "/nonexistent",
        "--failure-mode",
        "closed",
    ]);
    assert!(!status.success());
    assert!(err.contains("--pin-dir"), "{err}");
}

#[test]
fn a_pin_dir_off_bpffs_is_refused_and_nothing_is_made() {
    let dir = TempDir::new("not-bpffs");
    let pins = dir.path().join("observer");
    let (status, err) = run_to_exit(&[
        "run",
        "--netns-dir",
        "/nonexistent",
        "--pin-dir",
        pins.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(err.contains("is not on a bpffs"), "{err}");
    assert!(!pins.exists(), "nothing made where pins cannot go");
}

/// A policy that fails closed where its programs cannot be pinned (no
/// `--pin-dir`): enforced while the observer runs, and the gauge says it
/// would not hold without it.
#[test]
fn a_closed_policy_that_cannot_be_pinned_is_in_the_gauge() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let dir = TempDir::new("fails-open");
    let policy = dir.write("policy.yaml", &POLICY.replace("MODE", "closed"));
    let inventory = lab.inventory_path().display().to_string();
    let observer = Observer::start(&["--inventory", &inventory, "--policy", &policy]);
    let m = observer.eventually("the gauge says fails_open", |m| {
        m.sum(
            "observer_policy_unenforced_pods",
            &[("reason", "fails_open")],
        ) == 2.0
    });
    for pod in ["client", "shop"] {
        assert_eq!(
            m.sum(
                "observer_policy_unenforced_pods",
                &[("pod", pod), ("reason", "fails_open")]
            ),
            1.0,
            "{pod}"
        );
    }
    let (client, netns) = container(&lab, "default", "client", "to-pod");
    assert_eq!(
        integration_test::container::connect_from(&client, &netns, EXTERNAL, 9999),
        integration_test::container::Connect::NotPermitted,
        "enforced all the same while the observer runs"
    );
    assert!(observer.terminate().success());
}

/// `--tc-attach` changed from one observer to the next while a policy
/// fails closed: clsact filters, then TCX links, then clsact filters
/// again. Each observer takes over what the one before left (filters or
/// pinned links), none of them fails open, the denial holds while no
/// observer runs, and no hook is left with two programs.
#[test]
fn changing_tc_attach_across_restarts_keeps_closed_pods_closed() {
    use integration_test::container::{Connect, connect_from};
    let setup = Setup::up("switch", "closed");
    let Setup {
        lab, pins, pin_dir, ..
    } = &setup;
    let args = setup.args();
    let with = |mode| -> Vec<&str> { args.iter().copied().chain(["--tc-attach", mode]).collect() };
    let (client, netns) = container(lab, "default", "client", "to-pod");
    let denied = || connect_from(&client, &netns, EXTERNAL, 9999);
    let closed = |observer: &Observer| {
        let m = observer.eventually("the policies in force", |m| {
            m.sum("observer_programs_attached", &[]) > 0.0
        });
        assert_eq!(
            m.sum(
                "observer_policy_unenforced_pods",
                &[("reason", "fails_open")]
            ),
            0.0,
            "{}",
            observer.log()
        );
        assert_eq!(denied(), Connect::NotPermitted);
    };

    let clsact = Observer::start(&with("clsact"));
    closed(&clsact);
    clsact.eventually("the filters recorded", |_| kept_filters(pins) == 6);
    assert!(clsact.terminate().success());
    assert_eq!(our_filters(&netns), 3, "the client's filters stay");
    assert_eq!(denied(), Connect::NotPermitted, "while no observer runs");

    // TCX links attached at the commit, then the filters removed.
    let tcx = Observer::start(&with("tcx"));
    assert!(tcx.log().contains("took over"), "{}", tcx.log());
    closed(&tcx);
    tcx.eventually("the filters gone", |_| {
        our_filters(&netns) == 0 && kept_filters(pins) == 0
    });
    assert!(tcx.terminate().success());
    assert!(
        pins.pins().iter().any(|p| p.ends_with("/eth0-ingress")),
        "the TCX links pinned: {:?}",
        pins.pins()
    );
    assert_eq!(denied(), Connect::NotPermitted, "while no observer runs");

    // clsact filters again: the pinned TCX links are taken over and stay
    // pinned; no filter is added beside them.
    let clsact = Observer::start(&with("clsact"));
    assert!(clsact.log().contains("took over"), "{}", clsact.log());
    closed(&clsact);
    assert_eq!(our_filters(&netns), 0, "no filter beside the links");
    assert!(clsact.terminate().success());
    assert_eq!(denied(), Connect::NotPermitted, "while no observer runs");

    let (status, err) = run_to_exit(&["cleanup", "--pin-dir", pin_dir]);
    assert!(status.success(), "{err}");
    assert_eq!(pins.pins(), Vec::<String>::new(), "nothing stays pinned");
    assert_ne!(denied(), Connect::NotPermitted, "nothing enforces");
    assert_unloaded();
}
