use observer_common::interface;

use super::*;
use crate::names::ContainerRef;

fn labels(key: &FlowKey, value: &FlowValue, pod: &ObjectRef, ids: &Identities) -> FlowLabels {
    Series::of(key, value).labels(pod, ids, &CgroupNames::default())
}

#[test]
fn the_server_port_is_never_the_client_port() {
    // The kernel knows who listens.
    assert_eq!(
        destination_is_server(server::DESTINATION, 80, 40000),
        Some(true)
    );
    assert_eq!(
        destination_is_server(server::SOURCE, 40000, 80),
        Some(false)
    );
    // Otherwise: the port outside the ephemeral range, else the lower one.
    assert_eq!(
        destination_is_server(server::UNKNOWN, 45000, 53),
        Some(true)
    );
    assert_eq!(
        destination_is_server(server::UNKNOWN, 53, 45000),
        Some(false)
    );
    assert_eq!(
        destination_is_server(server::UNKNOWN, 40001, 40000),
        Some(true)
    );
    assert_eq!(destination_is_server(server::UNKNOWN, 0, 0), None);
}

fn localhost_key(src_port: u16, dst_port: u16) -> FlowKey {
    FlowKey {
        netns_cookie: 7,
        src_port,
        dst_port,
        interface: interface::LOOPBACK,
        protocol: protocol::TCP,
        family: family::IPV4,
        ..FlowKey::default()
    }
}

/// (class, direction, protocol, port)
fn kind(l: &FlowLabels) -> [&str; 4] {
    [&l.class, &l.direction, &l.protocol, &l.port]
}

fn containers(l: &FlowLabels) -> [&str; 2] {
    [&l.client_container, &l.server_container]
}

fn peer(l: &FlowLabels) -> [&str; 2] {
    [&l.peer_namespace, &l.peer]
}

#[test]
fn names_client_and_server_containers_of_localhost_flows() {
    let pod = ObjectRef::new("shop", "shop");
    let mut identities = Identities::default();
    for (cgroup, name) in [(100, "sidecar"), (200, "app")] {
        identities.containers.insert(
            cgroup,
            ContainerRef {
                pod: pod.clone(),
                name: name.into(),
            },
        );
    }
    let request = FlowValue {
        class: class::LOCALHOST,
        server: server::DESTINATION,
        src_cgroup: 100,
        dst_cgroup: 200,
        ..FlowValue::default()
    };
    let l = Series::of(&localhost_key(41000, 8080), &request).labels(
        &pod,
        &identities,
        &CgroupNames::default(),
    );
    assert_eq!(kind(&l), ["localhost", "request", "tcp", "8080"]);
    assert_eq!(containers(&l), ["sidecar", "app"]);

    let response = FlowValue {
        server: server::SOURCE,
        src_cgroup: 200,
        dst_cgroup: 100,
        ..request
    };
    let l = Series::of(&localhost_key(8080, 41000), &response).labels(
        &pod,
        &identities,
        &CgroupNames::default(),
    );
    assert_eq!(kind(&l)[1..], ["response", "tcp", "8080"]);
    assert_eq!(containers(&l), ["sidecar", "app"]);

    // No reverse flow yet, and a packet the kernel sent: said explicitly.
    let rst = FlowValue {
        src_cgroup: 0,
        dst_cgroup: 0,
        ..response
    };
    let l = Series::of(&localhost_key(8080, 41000), &rst).labels(
        &pod,
        &identities,
        &CgroupNames::default(),
    );
    assert_eq!(containers(&l), [UNKNOWN, KERNEL]);
    // A cgroup of another pod is not this pod's container.
    let series = Series::of(&localhost_key(41000, 8080), &request);
    let other = ObjectRef::new("default", "web");
    assert_eq!(
        containers(&series.labels(&other, &identities, &CgroupNames::default())),
        [UNKNOWN, UNKNOWN]
    );
}

#[test]
fn names_peers_by_class() {
    let pod = ObjectRef::new("default", "client");
    let mut identities = Identities::default();
    identities
        .services
        .insert(3, ObjectRef::new("default", "web"));
    identities.containers.insert(
        100,
        ContainerRef {
            pod: pod.clone(),
            name: "to-service".into(),
        },
    );
    let value = FlowValue {
        class: class::SERVICE,
        server: server::DESTINATION,
        peer_id: 3,
        src_cgroup: 100,
        ..FlowValue::default()
    };
    let mut key = localhost_key(40000, 80);
    key.interface = interface::POD;
    let l = Series::of(&key, &value).labels(&pod, &identities, &CgroupNames::default());
    assert_eq!(kind(&l), ["service", "egress", "tcp", "80"]);
    assert_eq!(peer(&l), ["default", "web"]);
    assert_eq!(
        containers(&l),
        ["to-service", ""],
        "the sender is the client"
    );
    let external = FlowValue {
        class: class::EXTERNAL,
        ..value
    };
    let l = Series::of(&key, &external).labels(&pod, &identities, &CgroupNames::default());
    assert_eq!(peer(&l), ["", "external"]);
    let unknown_pod = FlowValue {
        class: class::POD,
        peer_id: 0,
        ..value
    };
    let l = Series::of(&key, &unknown_pod).labels(&pod, &identities, &CgroupNames::default());
    assert_eq!(peer(&l), ["", UNKNOWN]);
}

#[test]
fn names_protocols() {
    assert_eq!(protocol_label(family::IPV4, 6), "tcp");
    assert_eq!(protocol_label(family::IPV6, 17), "udp");
    assert_eq!(protocol_label(family::IPV6, 58), "icmpv6");
    assert_eq!(protocol_label(family::IPV4, 47), "47");
    assert_eq!(protocol_label(family::OTHER, 0), "non_ip");
}

#[test]
fn names_the_pods_end_on_eth0_and_the_original_destination_behind_a_redirect() {
    let pod = ObjectRef::new("default", "web");
    let mut identities = Identities::default();
    for (cgroup, name) in [(200, "web"), (300, "app"), (400, "proxy")] {
        identities.containers.insert(
            cgroup,
            ContainerRef {
                pod: pod.clone(),
                name: name.into(),
            },
        );
    }
    identities
        .services
        .insert(7, ObjectRef::new("shop", "shop"));
    // Inbound to the pod's server: the receiver is the server.
    let mut key = localhost_key(41000, 80);
    key.interface = interface::POD;
    key.direction = direction::INGRESS;
    let inbound = FlowValue {
        class: class::POD,
        server: server::DESTINATION,
        dst_cgroup: 200,
        ..FlowValue::default()
    };
    assert_eq!(
        containers(&labels(&key, &inbound, &pod, &identities)),
        ["", "web"]
    );
    // No socket received it (a closed port): said so.
    let closed = FlowValue {
        dst_cgroup: 0,
        ..inbound
    };
    assert_eq!(
        containers(&labels(&key, &closed, &pod, &identities)),
        ["", UNKNOWN]
    );
    // The app called shop:8080; a sidecar redirected it to its proxy on
    // 15001. The proxy's answer comes back from the translated address:
    // the socket's port says what the series is.
    let request = FlowValue {
        class: class::LOCALHOST,
        server: server::DESTINATION,
        server_port: 15001,
        src_cgroup: 300,
        dst_cgroup: 400,
        orig_class: class::SERVICE,
        orig_peer_id: 7,
        orig_port: 8080,
        ..FlowValue::default()
    };
    let l = labels(&localhost_key(41000, 15001), &request, &pod, &identities);
    assert_eq!(kind(&l), ["localhost", "request", "tcp", "15001"]);
    assert_eq!(containers(&l), ["app", "proxy"]);
    assert_eq!(
        [
            &l.original_class,
            &l.original_namespace,
            &l.original_peer,
            &l.original_port
        ],
        ["service", "shop", "shop", "8080"]
    );
    let response = FlowValue {
        server: server::SOURCE,
        src_cgroup: 400,
        dst_cgroup: 300,
        ..request
    };
    let mut back = localhost_key(8080, 41000);
    back.src_addr = observer_common::ipv4_mapped([10, 96, 0, 20]);
    let answer = labels(&back, &response, &pod, &identities);
    assert_eq!(kind(&answer)[1..], ["response", "tcp", "15001"]);
    assert_eq!(containers(&answer), ["app", "proxy"], "one conversation");
    assert_eq!(answer.original_peer, "shop");
}
