//! What a flow is counted under: its [`Series`] (numbers, as the kernel
//! gives them), and that series' [`FlowLabels`] (names, from the
//! identities). A series is what the labels can tell apart: pod, class,
//! direction, protocol, server port, peer, and on `lo` the client and
//! server containers (the kernel pairs each localhost flow with its
//! reverse, so a flow knows both).

use observer_common::{FlowKey, FlowValue, class, direction, family, ports, protocol, server};

use super::schema::FlowLabels;
use crate::names::{Identities, ObjectRef};

/// A sender without a socket: a packet the kernel made (an RST, an ICMP error).
pub const KERNEL: &str = "kernel";
/// A side that cannot be attributed.
pub const UNKNOWN: &str = "unknown";

/// What a flow is counted under, before names are looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Series {
    pub cookie: u64,
    class: u8,
    direction: Direction,
    family: u8,
    protocol: u8,
    port: Option<u16>,
    peer_id: u32,
    /// cgroup ids on `lo`: `None` where not attributable.
    client: Option<u64>,
    server: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Direction {
    /// A hook's, on `eth0`.
    Hook(u8),
    Request,
    Response,
    Unknown,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::Hook(hook) => direction::name(hook),
            Self::Request => direction::REQUEST,
            Self::Response => direction::RESPONSE,
            Self::Unknown => direction::UNKNOWN,
        }
    }
}

/// Whether the destination is the server: the kernel's answer (who listens),
/// else the port that is not a client port, else the lower one. `None` for
/// traffic without ports.
fn destination_is_server(server_side: u8, src_port: u16, dst_port: u16) -> Option<bool> {
    match server_side {
        server::DESTINATION => return Some(true),
        server::SOURCE => return Some(false),
        _ => {}
    }
    if src_port == 0 && dst_port == 0 {
        return None;
    }
    Some(
        match (ports::is_ephemeral(src_port), ports::is_ephemeral(dst_port)) {
            (true, false) => true,
            (false, true) => false,
            _ => dst_port <= src_port,
        },
    )
}

impl Series {
    /// The series of a flow.
    pub fn of(key: &FlowKey, value: &FlowValue) -> Self {
        let to_server = destination_is_server(value.server, key.src_port, key.dst_port);
        let port = to_server.map(|d| if d { key.dst_port } else { key.src_port });
        let localhost = value.class == class::LOCALHOST;
        let direction = match (localhost, to_server) {
            (true, Some(true)) => Direction::Request,
            (true, Some(false)) => Direction::Response,
            (true, None) => Direction::Unknown,
            (false, _) => Direction::Hook(key.direction),
        };
        // The receiver is known once the reverse flow exists (0 before).
        let receiver = (value.peer_cgroup != 0).then_some(value.peer_cgroup);
        let (client, server) = match (localhost, to_server) {
            (true, Some(true)) => (Some(value.src_cgroup), receiver),
            (true, Some(false)) => (receiver, Some(value.src_cgroup)),
            _ => (None, None),
        };
        Self {
            cookie: key.netns_cookie,
            class: value.class,
            direction,
            family: key.family,
            protocol: key.protocol,
            port,
            peer_id: value.peer_id,
            client,
            server,
        }
    }

    /// The series' labels, for `pod`.
    pub fn labels(&self, pod: &ObjectRef, identities: &Identities) -> FlowLabels {
        let unknown = || (String::new(), UNKNOWN.to_owned());
        let (peer_namespace, peer) = match self.class {
            class::LOCALHOST => (String::new(), String::new()),
            class::POD => identities
                .pods
                .get(&self.peer_id)
                .map_or_else(unknown, |p| (p.namespace.clone(), p.name.clone())),
            class::SERVICE => identities
                .services
                .get(&self.peer_id)
                .map_or_else(unknown, |s| (s.namespace.clone(), s.name.clone())),
            class::NODE => identities
                .nodes
                .get(&self.peer_id)
                .map_or_else(unknown, |n| (String::new(), n.clone())),
            _ => (String::new(), class::name(class::EXTERNAL).to_owned()),
        };
        let container = |cgroup: Option<u64>| -> String {
            if self.class != class::LOCALHOST {
                return String::new();
            }
            match cgroup {
                Some(0) => KERNEL.to_owned(),
                Some(id) => identities
                    .containers
                    .get(&id)
                    .filter(|c| &c.pod == pod)
                    .map_or_else(|| UNKNOWN.to_owned(), |c| c.name.clone()),
                None => UNKNOWN.to_owned(),
            }
        };
        FlowLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            class: class::name(self.class).to_owned(),
            direction: self.direction.label().to_owned(),
            protocol: protocol_label(self.family, self.protocol),
            port: self.port.map(|p| p.to_string()).unwrap_or_default(),
            peer_namespace,
            peer,
            client_container: container(self.client),
            server_container: container(self.server),
        }
    }
}

/// The `protocol` label: a name for the common IP protocols, the number for
/// the rest, `non_ip` for frames that are not IP (ARP, ...).
pub fn protocol_label(family: u8, number: u8) -> String {
    if family == family::OTHER {
        return protocol::NON_IP.into();
    }
    protocol::name(number).map_or_else(|| number.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use observer_common::interface;

    use super::*;
    use crate::names::ContainerRef;

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
            peer_cgroup: 200,
            ..FlowValue::default()
        };
        let l = Series::of(&localhost_key(41000, 8080), &request).labels(&pod, &identities);
        assert_eq!(kind(&l), ["localhost", "request", "tcp", "8080"]);
        assert_eq!(containers(&l), ["sidecar", "app"]);

        let response = FlowValue {
            server: server::SOURCE,
            src_cgroup: 200,
            peer_cgroup: 100,
            ..request
        };
        let l = Series::of(&localhost_key(8080, 41000), &response).labels(&pod, &identities);
        assert_eq!(kind(&l)[1..], ["response", "tcp", "8080"]);
        assert_eq!(containers(&l), ["sidecar", "app"]);

        // No reverse flow yet, and a packet the kernel sent: said explicitly.
        let rst = FlowValue {
            src_cgroup: 0,
            peer_cgroup: 0,
            ..response
        };
        let l = Series::of(&localhost_key(8080, 41000), &rst).labels(&pod, &identities);
        assert_eq!(containers(&l), [UNKNOWN, KERNEL]);
        // A cgroup of another pod is not this pod's container.
        let series = Series::of(&localhost_key(41000, 8080), &request);
        let other = ObjectRef::new("default", "web");
        assert_eq!(
            containers(&series.labels(&other, &identities)),
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
        let value = FlowValue {
            class: class::SERVICE,
            server: server::DESTINATION,
            peer_id: 3,
            ..FlowValue::default()
        };
        let mut key = localhost_key(40000, 80);
        key.interface = interface::POD;
        let l = Series::of(&key, &value).labels(&pod, &identities);
        assert_eq!(kind(&l), ["service", "egress", "tcp", "80"]);
        assert_eq!(peer(&l), ["default", "web"]);
        assert_eq!(containers(&l), ["", ""]);
        let external = FlowValue {
            class: class::EXTERNAL,
            ..value
        };
        let l = Series::of(&key, &external).labels(&pod, &identities);
        assert_eq!(peer(&l), ["", "external"]);
        let unknown_pod = FlowValue {
            class: class::POD,
            peer_id: 0,
            ..value
        };
        let l = Series::of(&key, &unknown_pod).labels(&pod, &identities);
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
}
