//! The kernel programs on their own, in milliseconds: the flow classifier
//! on synthetic packets (`BPF_PROG_TEST_RUN`), and the socket hooks on real
//! `connect()` and `sendto()` calls that go nowhere (a pod namespace
//! without routes), with the maps filled as the daemon fills them. The
//! shared policy table (observer/src/policy/cases.yaml) runs through them
//! here, as it runs through user space in the observer's unit tests: the
//! two must agree on every case.

use std::net::{SocketAddrV4, TcpListener, UdpSocket};

use integration_test::{
    container::{Held, tcp_listener},
    kernel::{
        Kernel, TC_ACT_SHOT, TC_ACT_UNSPEC, flow_key, frame, own_cgroup, probe, run, table_world,
        test_socket_as_node,
    },
};
use lab::cgroup_id;
use observer::{
    kernel::datapath::{EGRESS_PROGRAM, INGRESS_PROGRAM},
    names::ObjectRef,
    policy::table::Table,
};
use observer_common::{
    FlowKey, FlowValue, class, classify, direction, family, interface, ipv4_mapped, protocol,
    server, verdict,
};

#[test]
fn the_shared_policy_table_decides_in_the_kernel() {
    let table = Table::load();
    let mut t = table_world(&table);
    // A synthetic packet's socket reads as a pod's, or for the cases sent
    // by a process of the node, as the node's.
    let as_pod = test_socket_as_node(false);
    let as_node = test_socket_as_node(true);
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
            let node = if case.from_node_process {
                as_node
            } else {
                as_pod
            };
            t.kernel.policy_maps.set_node(node).expect("the node map");
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

/// Packets of new flows of pod default/web, what the kernel must make of
/// them, and what user space's classification says of their other end.
/// Columns: interface, hook, protocol, source, destination, a server in the
/// pod on this port (`-`: none), class, peer (`-`: none), server side.
const FLOWS: &str = "
eth0 egress  tcp 10.244.1.12:41000 10.96.0.20:8080   -    service   service:shop/shop            destination
eth0 egress  udp 10.244.1.12:41001 10.96.0.53:53     -    service   service:kube-system/kube-dns destination
eth0 egress  tcp 10.244.1.12:41002 10.96.0.20:9999   -    service   -                            destination
eth0 egress  tcp 10.244.1.12:41003 10.244.2.5:5432   -    pod       pod:payments/db              destination
eth0 egress  tcp 10.244.1.12:41004 10.244.2.99:80    -    pod       -                            destination
eth0 egress  tcp 10.244.1.12:41005 172.18.0.3:10250  -    node      node:node-2                  destination
eth0 egress  tcp 10.244.1.12:41006 203.0.113.7:443   -    external  -                            destination
eth0 ingress tcp 10.244.2.6:41007  10.244.1.12:80    80   pod       pod:other/caller             destination
eth0 ingress tcp 10.96.0.20:8080   10.244.1.12:41000 -    service   service:shop/shop            source
eth0 ingress udp 172.18.0.2:41008  10.244.1.12:5353  5353 node      node:node-1                  unknown
lo   egress  tcp 127.0.0.1:41009   127.0.0.1:8080    8080 localhost -                            destination
lo   egress  udp 127.0.0.1:41010   127.0.0.1:8125    -    localhost -                            unknown
";

/// One line of [`FLOWS`].
struct FlowCase<'a> {
    on: &'a str,
    ingress: bool,
    proto: u8,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    listening: Option<u16>,
    class: u8,
    peer: Option<&'a str>,
    server: u8,
}

fn flow_cases() -> Vec<FlowCase<'static>> {
    FLOWS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [on, hook, proto, src, dst, listening, class, peer, server] = f[..] else {
                panic!("a FLOWS line has nine columns: {line}");
            };
            FlowCase {
                on,
                ingress: hook == direction::name(direction::INGRESS),
                proto: protocol::from_name(proto).expect("a protocol"),
                src: src.parse().expect("an address"),
                dst: dst.parse().expect("an address"),
                listening: listening.parse().ok(),
                class: class::from_name(class).expect("a class"),
                peer: (peer != "-").then_some(peer),
                server: match server {
                    "destination" => server::DESTINATION,
                    "source" => server::SOURCE,
                    _ => server::UNKNOWN,
                },
            }
        })
        .collect()
}

#[test]
fn the_classifier_classifies_as_user_space_does() {
    let table = Table::load();
    let mut t = table_world(&table);
    // Classification, not policy: the packets from the node's address are
    // the node's own (web's ingress default would drop the others).
    t.kernel
        .policy_maps
        .set_node(test_socket_as_node(true))
        .expect("the node map");
    let pod = &t.pods["default/web"];
    let ids = t.world.ids();
    let peer_id = |peer: &str| -> u32 {
        let (kind, name) = peer.split_once(':').unwrap();
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
    let own_cgroup = cgroup_id(&own_cgroup()).expect("own cgroup");
    let mut failures = Vec::new();
    for case in flow_cases() {
        let (src, dst) = (case.src, case.dst);
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
        let program = if case.ingress {
            INGRESS_PROGRAM
        } else {
            EGRESS_PROGRAM
        };
        let action = run(
            &t.kernel,
            pod,
            program,
            ifindex,
            &frame(src, dst, case.proto, true),
        );
        drop(server_socket);
        let hook_direction = if case.ingress {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        let key = flow_key(pod, src, dst, case.proto, hook_direction, iface);
        let Ok(value) = t.kernel.maps.flows.get(&key, 0) else {
            failures.push(format!("{src} -> {dst}: no flow in the map"));
            continue;
        };
        let peer = case.peer.map_or(0, peer_id);
        let kernel = (value.class, value.peer_id, value.server);
        if kernel != (case.class, peer, case.server) || action != TC_ACT_UNSPEC {
            failures.push(format!(
                "{} -> {}: the kernel said class {}, peer {}, server {} (returned {action}); expected {}, {peer}, {}",
                src,
                dst,
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
                src, dst, value.src_cgroup
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
                    src,
                    dst,
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

/// The collector reads the flow map in batches: every entry with its value,
/// whatever the batch size (a bucket larger than the buffers grows them; a
/// batch of one makes that happen). A map of more than one batch is read by
/// two walks, from the first bucket and from the middle one: only entries
/// of the first walk's last batch, which may run past the middle, come
/// twice.
#[test]
fn the_flow_map_reads_in_batches_every_entry() {
    use std::{collections::HashMap, os::fd::AsFd};

    use aya::maps::IterableMap;

    use observer::kernel::bpf::BatchReader;
    use observer_common::FlowValue;

    let mut kernel = integration_test::kernel::Kernel::load();
    let flows: HashMap<FlowKey, FlowValue> = (0..3000u32)
        .map(|n| {
            let key = FlowKey {
                netns_cookie: 7,
                src_addr: ipv4_mapped([10, 0, 0, 1]),
                dst_addr: ipv4_mapped([10, 1, (n >> 8) as u8, n as u8]),
                src_port: 40000,
                dst_port: 80,
                protocol: protocol::TCP,
                direction: direction::EGRESS,
                family: family::IPV4,
                interface: interface::POD,
            };
            let value = FlowValue {
                packets: u64::from(n),
                bytes: u64::from(n) * 100,
                ..FlowValue::default()
            };
            (key, value)
        })
        .collect();
    for (key, value) in &flows {
        kernel.maps.flows.insert(key, value, 0).expect("room");
    }
    for entries in [1, 7, 4096] {
        let mut read = HashMap::new();
        let mut twice = 0;
        BatchReader::<FlowKey, FlowValue>::new(entries)
            .read(kernel.maps.flows.map().fd().as_fd(), |key, value| {
                if let Some(before) = read.insert(*key, *value) {
                    assert_eq!(before, *value, "{key:?} read twice, differently");
                    twice += 1;
                }
            })
            .expect("batch reads");
        assert_eq!(read, flows, "batches of {entries}");
        // A batch of one grows to the largest bucket's entries (a few).
        assert!(twice <= entries.max(8), "{twice} entries read twice");
    }
}

/// The per-CPU flow cache: the packets of a known flow are counted in this
/// CPU's slot, not in the flow map, and the flush moves them there: every
/// packet counted once. A slot that counted nothing since the last flush
/// is forgotten, and the next packet is counted in the flow map at once.
#[test]
fn the_flow_cache_counts_every_packet_once() {
    let table = Table::load();
    let t = table_world(&table);
    let pod = &t.pods["default/web"];
    let src = SocketAddrV4::new([10, 244, 1, 12].into(), 40123);
    let dst = SocketAddrV4::new([10, 244, 2, 5].into(), 5432);
    let packet = frame(src, dst, protocol::UDP, false);
    let key = flow_key(
        pod,
        src,
        dst,
        protocol::UDP,
        direction::EGRESS,
        interface::POD,
    );
    let in_map = || {
        let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
        (value.packets, value.bytes)
    };
    // A flow is cached from its fourth packet on, on each CPU.
    pin_to_cpu(0);
    for _ in 0..50 {
        run(&t.kernel, pod, EGRESS_PROGRAM, pod.eth0, &packet);
    }
    let (packets, _) = in_map();
    assert!(
        packets < 50,
        "the cache counted none of the 50 packets: {packets} in the map"
    );
    t.kernel.maps.flow_cache.flush().expect("flush");
    let size = packet.len() as u64;
    assert_eq!(
        in_map(),
        (50, 50 * size),
        "every packet once, after a flush"
    );
    // Quiet since: the next flush forgets the slot; a packet then counts in
    // the flow map without waiting for a flush.
    t.kernel.maps.flow_cache.flush().expect("flush");
    run(&t.kernel, pod, EGRESS_PROGRAM, pod.eth0, &packet);
    assert_eq!(in_map(), (51, 51 * size));
    t.kernel.maps.flow_cache.flush().expect("flush");
    assert_eq!(in_map(), (51, 51 * size), "no packet twice");
}

/// Two containers of a pod share its ports: a port one used may be used
/// again by another, on the same addresses, for a new connection. Its SYN
/// classifies the flow again, for the container that sends it now; the
/// flow's other packets do not.
#[test]
fn a_port_used_again_by_another_container_is_counted_for_it() {
    let table = Table::load();
    let mut t = table_world(&table);
    let pod = &t.pods["default/web"];
    let src: SocketAddrV4 = "10.244.1.12:40000".parse().unwrap();
    let dst: SocketAddrV4 = "10.244.2.6:8080".parse().unwrap();
    let key = flow_key(
        pod,
        src,
        dst,
        protocol::TCP,
        direction::EGRESS,
        interface::POD,
    );
    let egress = |kernel: &Kernel, syn| {
        run(
            kernel,
            pod,
            EGRESS_PROGRAM,
            pod.eth0,
            &frame(src, dst, protocol::TCP, syn),
        )
    };
    // The first connection, from this process's cgroup.
    assert_eq!(egress(&t.kernel, true), TC_ACT_UNSPEC);
    assert_eq!(egress(&t.kernel, false), TC_ACT_UNSPEC);
    let own = cgroup_id(&own_cgroup()).expect("own cgroup");
    let first = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!((first.src_cgroup, first.connections), (own, 1));
    // As if another container had made it.
    let other = own + 1_000_000;
    let made_by_other = FlowValue {
        src_cgroup: other,
        ..first
    };
    t.kernel
        .maps
        .flows
        .insert(key, made_by_other, 0)
        .expect("the flow rewritten");
    // Its connection's packets stay its.
    egress(&t.kernel, false);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!((value.src_cgroup, value.packets), (other, 3));
    // A new connection from this process's cgroup: the flow is its now.
    egress(&t.kernel, true);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (value.src_cgroup, value.connections, value.packets),
        (own, 2, 4),
        "classified again at the SYN, and counted once"
    );
}

/// A flow classified again (the classification maps changed) from a
/// packet whose socket tells less than the sockets that classified it
/// first keeps what they told. Here, over `lo`: the server's container,
/// told by its listener at the SYN, where the connection's later packets
/// find only the accepted socket (which has no storage of the hooks').
#[test]
fn a_flow_classified_again_keeps_the_container_its_listener_told() {
    let table = Table::load();
    let mut t = table_world(&table);
    let pod = &t.pods["shop/shop"];
    let server: SocketAddrV4 = "127.0.0.1:7070".parse().unwrap();
    let client: SocketAddrV4 = "127.0.0.1:40123".parse().unwrap();
    let app = t.container_cgroup("shop/shop", "app");
    let sidecar = t.container_cgroup("shop/shop", "sidecar");
    let listener = Held::start(
        &app,
        &pod.netns.path(),
        "import socket, sys\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', 7070))\n\
         s.listen(8)\n\
         print('listening', flush=True)\n\
         c = s.accept()[0]\n\
         sys.stdin.read()\n",
    );
    assert_eq!(listener.said, "listening");
    let key = flow_key(
        pod,
        client,
        server,
        protocol::TCP,
        direction::EGRESS,
        interface::LOOPBACK,
    );
    let send = |kernel: &Kernel, syn| {
        run(
            kernel,
            pod,
            EGRESS_PROGRAM,
            1,
            &frame(client, server, protocol::TCP, syn),
        )
    };
    // The SYN finds the listener.
    send(&t.kernel, true);
    let app_id = cgroup_id(&app).expect("app's cgroup");
    let first = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (first.dst_cgroup, first.server, first.server_port),
        (app_id, server::DESTINATION, 7070),
        "at the SYN"
    );
    // The connection made for real: the listener's socket accepts it, and
    // the tuple's lookups find the accepted socket from now on.
    let connection = Held::start(
        &sidecar,
        &pod.netns.path(),
        "import socket, sys\n\
         c = socket.socket()\n\
         c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         c.bind(('127.0.0.1', 40123))\n\
         c.connect(('127.0.0.1', 7070))\n\
         print('connected', flush=True)\n\
         sys.stdin.read()\n",
    );
    assert_eq!(connection.said, "connected");
    t.kernel.class_maps.reclassify().expect("a new generation");
    send(&t.kernel, false);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (
            value.dst_cgroup,
            value.server,
            value.server_port,
            value.class
        ),
        (app_id, server::DESTINATION, 7070, class::LOCALHOST),
        "classified again from a packet the accepted socket receives"
    );
    // The server's process ends: its accepted socket closes (to TIME_WAIT
    // or on its way, no full socket any more) and nothing listens.
    drop(listener);
    t.kernel.class_maps.reclassify().expect("a new generation");
    send(&t.kernel, false);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (
            value.dst_cgroup,
            value.server,
            value.server_port,
            value.class
        ),
        (app_id, server::DESTINATION, 7070, class::LOCALHOST),
        "classified again after the server closed"
    );
    drop(connection);
}

/// The same across `eth0`, for a flow decided at the socket: a socket
/// that sent to a Service (its hooks recorded the Service) receives an
/// answer from a pod (a socket load balancer's backend). When the socket
/// is gone (closed, its last packets still coming) and the maps change,
/// the flow stays the Service's, and the socket's container's.
#[test]
fn a_flow_decided_at_its_socket_stays_so_when_the_socket_is_gone() {
    let table = Table::load();
    let mut t = table_world(&table);
    let pod = &t.pods["default/client"];
    let client = t.container_cgroup("default/client", "client");
    // Sends to kube-dns (the pod namespace has no route: the send fails
    // after the hook has run) and prints the port it was given.
    let socket = Held::start(
        &client,
        &pod.netns.path(),
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n\
         \x20   s.sendto(b'x', ('10.96.0.53', 53))\n\
         except OSError:\n\
         \x20   pass\n\
         print(s.getsockname()[1], flush=True)\n\
         sys.stdin.read()\n",
    );
    let port: u16 = socket.said.parse().expect("the socket's port");
    let backend: SocketAddrV4 = "10.244.2.5:53".parse().unwrap();
    let local = SocketAddrV4::new([10, 244, 1, 11].into(), port);
    let key = flow_key(
        pod,
        backend,
        local,
        protocol::UDP,
        direction::INGRESS,
        interface::POD,
    );
    let answer = |kernel: &Kernel| {
        run(
            kernel,
            pod,
            INGRESS_PROGRAM,
            pod.eth0,
            &frame(backend, local, protocol::UDP, false),
        )
    };
    let client_id = cgroup_id(&client).expect("client's cgroup");
    let kube_dns = classify::Peer {
        class: class::SERVICE,
        id: t
            .world
            .ids()
            .services
            .get(&ObjectRef::new("kube-system", "kube-dns"))
            .expect("kube-dns's id"),
    };
    let told = |value: &FlowValue| {
        (
            value.class,
            value.peer_id,
            value.dst_cgroup,
            value.server,
            value.server_port,
        )
    };
    let expected = (kube_dns.class, kube_dns.id, client_id, server::SOURCE, 53);
    answer(&t.kernel);
    let first = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(told(&first), expected, "decided at the socket");
    drop(socket);
    t.kernel.class_maps.reclassify().expect("a new generation");
    answer(&t.kernel);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (told(&value), value.packets),
        (expected, 2),
        "classified again without its socket"
    );
}

/// What is kept is what sockets told, not what their absence suggested: a
/// connection refused before its server listened left the flow with the
/// remote end taken for the server; once a listener is there, the flow's
/// next classification (a new generation) names the pod's end.
#[test]
fn a_server_end_guessed_while_nobody_listened_is_corrected_once_one_does() {
    let table = Table::load();
    let mut t = table_world(&table);
    let pod = &t.pods["shop/shop"];
    let remote: SocketAddrV4 = "10.244.2.6:41000".parse().unwrap();
    let local: SocketAddrV4 = "10.244.1.10:7080".parse().unwrap();
    let key = flow_key(
        pod,
        remote,
        local,
        protocol::TCP,
        direction::INGRESS,
        interface::POD,
    );
    let receive = |kernel: &Kernel, syn| {
        run(
            kernel,
            pod,
            INGRESS_PROGRAM,
            pod.eth0,
            &frame(remote, local, protocol::TCP, syn),
        )
    };
    receive(&t.kernel, true);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(value.server, server::SOURCE, "nobody listens yet");
    let app = t.container_cgroup("shop/shop", "app");
    let mut listener = tcp_listener(&app, &pod.netns.path(), 7080, 30);
    t.kernel.class_maps.reclassify().expect("a new generation");
    receive(&t.kernel, false);
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (value.server, value.dst_cgroup),
        (server::DESTINATION, cgroup_id(&app).expect("app's cgroup")),
        "classified again with a listener there"
    );
    let _ = listener.kill();
    let _ = listener.wait();
}

/// A new connection on a 4-tuple whose last one is still in TIME_WAIT
/// at the server: the SYN finds no full socket for its tuple (the
/// TIME_WAIT one is not), and the listener takes it. Its receiver is the
/// listener's container, as for any other SYN.
#[test]
fn a_syn_on_a_tuple_in_time_wait_is_received_by_the_listeners_container() {
    let table = Table::load();
    let t = table_world(&table);
    let pod = &t.pods["shop/shop"];
    let server: SocketAddrV4 = "127.0.0.1:7071".parse().unwrap();
    let client: SocketAddrV4 = "127.0.0.1:40125".parse().unwrap();
    let app = t.container_cgroup("shop/shop", "app");
    let sidecar = t.container_cgroup("shop/shop", "sidecar");
    // Accepts and closes at once: the server closes first, and its end of
    // the connection waits in TIME_WAIT once the client has closed too.
    let mut listener = tcp_listener(&app, &pod.netns.path(), server.port(), 30);
    let connection = Held::start(
        &sidecar,
        &pod.netns.path(),
        "import socket, sys, time\n\
         c = socket.socket()\n\
         c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         c.bind(('127.0.0.1', 40125))\n\
         c.connect(('127.0.0.1', 7071))\n\
         while c.recv(1):\n\
         \x20   pass\n\
         c.close()\n\
         # The server's end, 127.0.0.1:7071 to :40125, in state 06.\n\
         end = time.time() + 2\n\
         found = False\n\
         while not found and time.time() < end:\n\
         \x20   found = any(l.split()[1:4] == ['0100007F:1B9F', '0100007F:9CBD', '06']\n\
         \x20               for l in open('/proc/net/tcp'))\n\
         \x20   time.sleep(0.01)\n\
         print('time-wait' if found else 'no time-wait', flush=True)\n\
         sys.stdin.read()\n",
    );
    assert_eq!(connection.said, "time-wait");
    let key = flow_key(
        pod,
        client,
        server,
        protocol::TCP,
        direction::EGRESS,
        interface::LOOPBACK,
    );
    run(
        &t.kernel,
        pod,
        EGRESS_PROGRAM,
        1,
        &frame(client, server, protocol::TCP, true),
    );
    let value = t.kernel.maps.flows.get(&key, 0).expect("the flow");
    assert_eq!(
        (value.dst_cgroup, value.server, value.server_port),
        (
            cgroup_id(&app).expect("app's cgroup"),
            server::DESTINATION,
            7071
        ),
        "the SYN's receiver"
    );
    let _ = listener.kill();
    let _ = listener.wait();
}

/// Keeps this thread on one CPU.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a CPU set of our own, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}
