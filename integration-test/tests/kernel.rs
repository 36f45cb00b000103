//! The kernel programs on their own, in milliseconds: the flow classifier
//! on synthetic packets (`BPF_PROG_TEST_RUN`), and the socket hooks on real
//! `connect()` and `sendto()` calls that go nowhere (a pod namespace
//! without routes), with the maps filled as the daemon fills them. The
//! shared policy table (observer/src/policy/cases.yaml) runs through them
//! here, as it runs through user space in the observer's unit tests: the
//! two must agree on every case.

use std::{
    collections::HashMap,
    net::{SocketAddrV4, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
};

use aya::programs::{TestRun, TestRunOptions};
use integration_test::{TempDir, container::in_container};
use lab::{Cgroup, Netns, cgroup_id};
use observer::{
    kernel::{
        class_maps::ClassMapsWriter,
        datapath::{Datapath, DatapathConfig, EGRESS_PROGRAM, INGRESS_PROGRAM, Maps, Opened},
        netns,
        policy_maps::{KernelPolicyMaps, PolicyEntries},
    },
    names::{CgroupIds, ObjectRef},
    policy::{compile::RuleName, explain::World, table::Table},
};
use observer_common::{
    FlowKey, VerdictKey, class, classify, direction, family, interface, ipv4_mapped, protocol,
    server, verdict,
};

const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// The programs loaded with their maps, as the daemon loads them.
struct Kernel {
    datapath: Datapath,
    maps: Maps,
    class_maps: ClassMapsWriter,
    policy_maps: KernelPolicyMaps,
    /// Last: the private bpffs inside it is unmounted first.
    _runtime: TempDir,
}

impl Kernel {
    fn load() -> Self {
        let runtime = TempDir::new("kernel");
        let Opened {
            datapath,
            maps,
            class_maps,
            policy_maps,
            ..
        } = Datapath::open(&DatapathConfig {
            flow_capacity: 4096,
            runtime_dir: runtime.path().to_path_buf(),
            log_level: None,
        })
        .expect("loading the programs (as root, with BTF)");
        Self {
            datapath,
            maps,
            class_maps: ClassMapsWriter::new(class_maps),
            policy_maps,
            _runtime: runtime,
        }
    }

    fn verdicts(&self) -> HashMap<VerdictKey, u64> {
        self.maps
            .verdicts
            .iter()
            .map(|entry| entry.expect("reading VERDICTS"))
            .collect()
    }

    /// The rule (by names) and verdict counted for `cookie` since `before`.
    fn counted_since(
        &self,
        before: &HashMap<VerdictKey, u64>,
        cookie: u64,
        names: &HashMap<u32, RuleName>,
    ) -> Vec<(String, String, u8)> {
        self.verdicts()
            .into_iter()
            .filter(|(key, count)| {
                key.netns_cookie == cookie && before.get(key).copied().unwrap_or(0) < *count
            })
            .map(|(key, _)| {
                let name = &names[&key.rule];
                (name.policy.clone(), name.rule.clone(), key.verdict)
            })
            .collect()
    }
}

/// A pod of the table: a namespace with `lo` and an `eth0` (down, with no
/// address and no route: nothing leaves it), its cgroups, its cookie.
struct Pod {
    netns: Netns,
    cookie: u64,
    eth0: u32,
    /// Its cgroup, and that of a process that is no container of the pod.
    cgroup: PathBuf,
    stranger: PathBuf,
}

fn make_pod(name: &str, cgroup: PathBuf, stranger: PathBuf) -> Pod {
    let netns = Netns::create(name).expect("namespace");
    netns
        .ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ])
        .expect("an eth0 (a veth pair, both ends in the namespace)");
    let (cookie, eth0) = netns
        .run(|| {
            let cookie = netns::cookie_of_current().expect("cookie");
            let name = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: a NUL-terminated name.
            (cookie, unsafe { libc::if_nametoindex(name.as_ptr()) })
        })
        .expect("enter namespace");
    Pod {
        netns,
        cookie,
        eth0,
        cgroup,
        stranger,
    }
}

/// A frame as tc sees it: Ethernet, IPv4, then TCP (SYN if `syn`, else
/// ACK) or UDP, without payload.
fn frame(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, syn: bool) -> Vec<u8> {
    let l4 = if proto == protocol::TCP { 20 } else { 8 };
    let mut f = vec![0u8; 14];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    if proto == protocol::TCP {
        let flags = if syn { 0x02 } else { 0x10 };
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&(8u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f
}

/// `struct __sk_buff` up to `ifindex` (offset 40): the device the packet
/// is on. The rest is zero, as the kernel requires.
fn skb_on(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Runs program `name` of the instance for `pod` on a frame on `ifindex`,
/// from inside the pod's namespace (where its socket lookups look).
fn run(kernel: &Kernel, pod: &Pod, name: &'static str, ifindex: u32, frame: &[u8]) -> u32 {
    let mut programs = kernel
        .datapath
        .instance(pod.cookie, false)
        .expect("an instance of the programs");
    let program = programs.get(name).expect("the program");
    let ctx = skb_on(ifindex);
    pod.netns
        .run(|| {
            program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN")
                .return_value
        })
        .expect("enter namespace")
}

/// What `connect()` (TCP) or `sendto()` (UDP) from a process in `cgroup`,
/// in `pod`'s namespace, answered: `eperm`, `ok`, or `errno N`.
fn probe(pod: &Pod, cgroup: &Path, proto: u8, to: SocketAddrV4) -> String {
    let script = "import socket, sys\n\
        kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])\n\
        try:\n\
        \x20   if kind == 'tcp':\n\
        \x20       s = socket.socket(); s.settimeout(2); s.connect((host, port))\n\
        \x20   else:\n\
        \x20       s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', (host, port))\n\
        \x20   print('ok')\n\
        except PermissionError:\n\
        \x20   print('eperm')\n\
        except OSError as e:\n\
        \x20   print('errno', e.errno)\n";
    let kind = if proto == protocol::UDP { "udp" } else { "tcp" };
    let out = in_container(
        cgroup,
        &pod.netns.path(),
        Command::new("python3").args([
            "-c",
            script,
            kind,
            &to.ip().to_string(),
            &to.port().to_string(),
        ]),
    )
    .output()
    .expect("python3");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !answer.is_empty(),
        "the probe said nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer
}

/// The table's world on this machine: a namespace and cgroups for each pod
/// of node-1, the maps written from the table's policies.
struct TableWorld {
    kernel: Kernel,
    pods: HashMap<String, Pod>,
    world: World,
    names: HashMap<u32, RuleName>,
    _hooks: Vec<aya::programs::cgroup_sock_addr::CgroupSockAddrLink>,
    _cgroups: Cgroup,
}

fn table_world(table: &Table) -> TableWorld {
    let mut kernel = Kernel::load();
    let cgroups = Cgroup::create("kernel-table").expect("a cgroup of the test's own");
    let mut inventory = table.inventory.clone();
    let mut ids = CgroupIds::new();
    let mut pods = HashMap::new();
    let mut attached = HashMap::new();
    for pod in inventory.pods.iter_mut().filter(|p| p.node == "node-1") {
        for container in &mut pod.containers {
            let path = cgroups.child(&container.cgroup).expect("container cgroup");
            ids.insert(path.clone(), cgroup_id(&path).expect("cgroup id"));
            container.cgroup = path;
        }
        let cgroup = cgroups.child(Path::new(&pod.name)).expect("pod cgroup");
        let stranger = cgroups
            .child(&Path::new(&pod.name).join("stranger"))
            .expect("a cgroup that is no container's");
        let made = make_pod(&pod.name, cgroup, stranger);
        attached.insert(ObjectRef::new(&pod.namespace, &pod.name), made.cookie);
        pods.insert(format!("{}/{}", pod.namespace, pod.name), made);
    }
    let world = World::with_cgroups(inventory, ids);
    kernel
        .class_maps
        .sync(world.class_entries().clone())
        .expect("writing the classification maps");
    let compiled = world.compile(&table.policies, &attached);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    kernel
        .policy_maps
        .sync(&PolicyEntries::default(), &compiled.entries)
        .expect("writing the policy maps");
    let hooks = pods
        .values()
        .flat_map(|pod| {
            kernel
                .datapath
                .attach_policy(&pod.cgroup)
                .expect("the policy hooks")
        })
        .collect();
    TableWorld {
        kernel,
        pods,
        world,
        names: compiled.names,
        _hooks: hooks,
        _cgroups: cgroups,
    }
}

#[test]
fn the_shared_policy_table_decides_in_the_kernel() {
    let table = Table::load();
    let t = table_world(&table);
    let mut failures = Vec::new();
    for case in &table.cases {
        let pod = &t.pods[&case.pod];
        let (namespace, name) = case.pod();
        let inventory_pod = t.world.pod(namespace, name).expect("the case's pod");
        let before = t.kernel.verdicts();
        let enforced_deny = if case.direction == direction::EGRESS {
            let cgroup = match &case.client {
                Some(client) => inventory_pod
                    .containers
                    .iter()
                    .find(|c| &c.name == client)
                    .map(|c| c.cgroup.clone())
                    .expect("the client container"),
                None => pod.stranger.clone(),
            };
            probe(pod, &cgroup, case.protocol, case.remote) == "eperm"
        } else {
            let port = case.port.expect("an ingress case's port");
            let local = SocketAddrV4::new(inventory_pod.ip, port);
            // The pod's server, for the kernel to see it is the server.
            let (tcp, udp) = pod
                .netns
                .run(|| {
                    let any = SocketAddrV4::new([0, 0, 0, 0].into(), port);
                    if case.protocol == protocol::TCP {
                        (Some(TcpListener::bind(any).expect("listen")), None)
                    } else {
                        (None, Some(UdpSocket::bind(any).expect("bind")))
                    }
                })
                .expect("enter namespace");
            let packet = frame(case.remote, local, case.protocol, true);
            let action = run(&t.kernel, pod, INGRESS_PROGRAM, pod.eth0, &packet);
            drop((tcp, udp));
            assert!(
                action == TC_ACT_SHOT || action == TC_ACT_UNSPEC,
                "{case:?}: the classifier returned {action}"
            );
            action == TC_ACT_SHOT
        };
        let counted = t.kernel.counted_since(&before, pod.cookie, &t.names);
        let decided = match counted.as_slice() {
            [] => None,
            [(policy, rule, v)] => Some((policy.as_str(), rule.as_str(), *v)),
            more => {
                failures.push(format!("{case:?}: counted more than once: {more:?}"));
                continue;
            }
        };
        if let Err(failure) = case.check(decided) {
            failures.push(failure);
        }
        let denied = decided.is_some_and(|(_, _, v)| v == verdict::DENY);
        if enforced_deny != denied {
            failures.push(format!(
                "{case:?}: counted {decided:?} but the connection was {}",
                if enforced_deny {
                    "refused"
                } else {
                    "let through"
                }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A packet of a flow, what the kernel must make of it, and what user
/// space's classification says of its other end.
struct FlowCase {
    on: &'static str,
    hook: &'static str,
    proto: u8,
    src: &'static str,
    dst: &'static str,
    /// A server in the pod on this port (TCP listener, or bound UDP socket).
    listening: Option<u16>,
    class: u8,
    /// The peer, as `pod NS/NAME`, `service NS/NAME` or `node NAME`.
    peer: Option<&'static str>,
    server: u8,
}

const FLOWS: &[FlowCase] = &[
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41000",
        dst: "10.96.0.20:8080",
        listening: None,
        class: class::SERVICE,
        peer: Some("service shop/shop"),
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::UDP,
        src: "10.244.1.12:41001",
        dst: "10.96.0.53:53",
        listening: None,
        class: class::SERVICE,
        peer: Some("service kube-system/kube-dns"),
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41002",
        dst: "10.96.0.20:9999",
        listening: None,
        class: class::SERVICE,
        peer: None,
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41003",
        dst: "10.244.2.5:5432",
        listening: None,
        class: class::POD,
        peer: Some("pod payments/db"),
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41004",
        dst: "10.244.2.99:80",
        listening: None,
        class: class::POD,
        peer: None,
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41005",
        dst: "172.18.0.3:10250",
        listening: None,
        class: class::NODE,
        peer: Some("node node-2"),
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.1.12:41006",
        dst: "203.0.113.7:443",
        listening: None,
        class: class::EXTERNAL,
        peer: None,
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: INGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.244.2.6:41007",
        dst: "10.244.1.12:80",
        listening: Some(80),
        class: class::POD,
        peer: Some("pod other/caller"),
        server: server::DESTINATION,
    },
    FlowCase {
        on: "eth0",
        hook: INGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "10.96.0.20:8080",
        dst: "10.244.1.12:41000",
        listening: None,
        class: class::SERVICE,
        peer: Some("service shop/shop"),
        server: server::SOURCE,
    },
    FlowCase {
        on: "eth0",
        hook: INGRESS_PROGRAM,
        proto: protocol::UDP,
        src: "172.18.0.2:41008",
        dst: "10.244.1.12:5353",
        listening: Some(5353),
        class: class::NODE,
        peer: Some("node node-1"),
        server: server::UNKNOWN,
    },
    FlowCase {
        on: "lo",
        hook: EGRESS_PROGRAM,
        proto: protocol::TCP,
        src: "127.0.0.1:41009",
        dst: "127.0.0.1:8080",
        listening: Some(8080),
        class: class::LOCALHOST,
        peer: None,
        server: server::DESTINATION,
    },
    FlowCase {
        on: "lo",
        hook: EGRESS_PROGRAM,
        proto: protocol::UDP,
        src: "127.0.0.1:41010",
        dst: "127.0.0.1:8125",
        listening: None,
        class: class::LOCALHOST,
        peer: None,
        server: server::UNKNOWN,
    },
];

#[test]
fn the_classifier_classifies_as_user_space_does() {
    let table = Table::load();
    let t = table_world(&table);
    let pod = &t.pods["default/web"];
    let ids = t.world.ids();
    let peer_id = |peer: &str| -> u32 {
        let (kind, name) = peer.split_once(' ').unwrap();
        let object = || {
            let (ns, name) = name.split_once('/').unwrap();
            ObjectRef::new(ns, name)
        };
        match kind {
            "pod" => ids.pods.get(&object()),
            "service" => ids.services.get(&object()),
            _ => ids.nodes.get(&name.to_owned()),
        }
        .unwrap_or_else(|| panic!("no id for {peer}"))
    };
    let own_cgroup = cgroup_id(&lab_cgroup_of_self()).expect("own cgroup");
    let mut failures = Vec::new();
    for case in FLOWS {
        let src: SocketAddrV4 = case.src.parse().unwrap();
        let dst: SocketAddrV4 = case.dst.parse().unwrap();
        let (ifindex, iface) = match case.on {
            "lo" => (1, interface::LOOPBACK),
            _ => (pod.eth0, interface::POD),
        };
        let server_socket = case.listening.map(|port| {
            pod.netns
                .run(move || {
                    let addr = if case.on == "lo" {
                        SocketAddrV4::new([127, 0, 0, 1].into(), port)
                    } else {
                        SocketAddrV4::new([0, 0, 0, 0].into(), port)
                    };
                    if case.proto == protocol::TCP {
                        (Some(TcpListener::bind(addr).expect("listen")), None)
                    } else {
                        (None, Some(UdpSocket::bind(addr).expect("bind")))
                    }
                })
                .expect("enter namespace")
        });
        let action = run(
            &t.kernel,
            pod,
            case.hook,
            ifindex,
            &frame(src, dst, case.proto, true),
        );
        drop(server_socket);
        let hook_direction = if case.hook == INGRESS_PROGRAM {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        let key = FlowKey {
            netns_cookie: pod.cookie,
            src_addr: ipv4_mapped(src.ip().octets()),
            dst_addr: ipv4_mapped(dst.ip().octets()),
            src_port: src.port(),
            dst_port: dst.port(),
            protocol: case.proto,
            direction: hook_direction,
            family: family::IPV4,
            interface: iface,
        };
        let Ok(value) = t.kernel.maps.flows.get(&key, 0) else {
            failures.push(format!("{} -> {}: no flow in the map", case.src, case.dst));
            continue;
        };
        let peer = case.peer.map_or(0, peer_id);
        let kernel = (value.class, value.peer_id, value.server);
        if kernel != (case.class, peer, case.server) || action != TC_ACT_UNSPEC {
            failures.push(format!(
                "{} -> {}: the kernel said class {}, peer {}, server {} (returned {action}); expected {}, {peer}, {}",
                case.src,
                case.dst,
                class::name(value.class),
                value.peer_id,
                value.server,
                class::name(case.class),
                case.server
            ));
        }
        if case.on == "lo" && value.src_cgroup != own_cgroup {
            failures.push(format!(
                "{} -> {}: sent by cgroup {}, not the sender's {own_cgroup}",
                case.src, case.dst, value.src_cgroup
            ));
        }
        // User space classifies the other end alike.
        if case.on != "lo" {
            let remote = if hook_direction == direction::EGRESS {
                dst
            } else {
                src
            };
            let user = classify::remote(
                t.world.class_entries(),
                ipv4_mapped(remote.ip().octets()),
                remote.port(),
                case.proto,
            );
            if (user.class, user.id) != (value.class, value.peer_id) {
                failures.push(format!(
                    "{} -> {}: user space says class {} peer {}, the kernel {} {}",
                    case.src,
                    case.dst,
                    class::name(user.class),
                    user.id,
                    class::name(value.class),
                    value.peer_id
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_denied_inbound_connection_stays_denied_and_an_allowed_one_is_counted_once() {
    let table = Table::load();
    let t = table_world(&table);
    let pod = &t.pods["default/web"];
    let web = SocketAddrV4::new([10, 244, 1, 12].into(), 80);
    let stranger: SocketAddrV4 = "10.244.2.7:42000".parse().unwrap();
    let caller: SocketAddrV4 = "10.244.2.6:42001".parse().unwrap();
    let _listener = pod
        .netns
        .run(|| TcpListener::bind("0.0.0.0:80").expect("listen"))
        .expect("enter namespace");
    let before = t.kernel.verdicts();
    let ingress = |from, syn| {
        run(
            &t.kernel,
            pod,
            INGRESS_PROGRAM,
            pod.eth0,
            &frame(from, web, protocol::TCP, syn),
        )
    };
    assert_eq!(ingress(stranger, true), TC_ACT_SHOT, "the SYN");
    assert_eq!(
        ingress(stranger, false),
        TC_ACT_SHOT,
        "the flow's next packet"
    );
    assert_eq!(ingress(caller, true), TC_ACT_UNSPEC);
    assert_eq!(ingress(caller, false), TC_ACT_UNSPEC);
    let mut counted = t.kernel.counted_since(&before, pod.cookie, &t.names);
    counted.sort();
    assert_eq!(
        counted,
        [
            ("web-ingress".into(), "default".into(), verdict::DENY),
            ("web-ingress".into(), "from-clients".into(), verdict::ALLOW)
        ]
    );
    let after = t.kernel.verdicts();
    assert!(
        after
            .iter()
            .filter(|(k, _)| k.netns_cookie == pod.cookie)
            .all(|(k, n)| *n == before.get(k).copied().unwrap_or(0) + 1),
        "each connection counted once, not per packet"
    );
}

/// The cgroup this test process runs in (the sender of its test packets).
fn lab_cgroup_of_self() -> PathBuf {
    let line = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let path = line
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let root = observer::pods::discovery::cgroup2_root().expect("cgroup v2");
    root.join(path.trim_start_matches('/'))
}
