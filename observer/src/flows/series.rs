//! What a flow is counted under: its [`Series`] (numbers, as the kernel
//! gives them), and that series' [`FlowLabels`] (names, from the
//! identities). A series is what the labels can tell apart: pod, class,
//! direction, protocol, server port, peer, the pod's containers at either
//! end (the sender's and the receiver's, from their sockets), and where a
//! redirected connection was originally going.

use observer_common::{
    FlowKey, FlowValue, class, direction, family, interface, ports, protocol, server,
};

use super::{
    cgroups::CgroupNames,
    schema::{self, FlowLabels},
};
use crate::names::{Identities, ObjectRef};

/// A sender without a socket: a packet the kernel made (an RST, an ICMP error).
pub const KERNEL: &str = "kernel";
/// A side that cannot be attributed.
pub const UNKNOWN: &str = "unknown";

/// The series of packets counted while the flow map had no room, per
/// interface and direction: not classified (on `lo` they are the pod's
/// own, `localhost`), their details `overflow`.
pub fn overflow_labels(pod: &ObjectRef, iface: u8, hook: u8) -> FlowLabels {
    if iface == interface::LOOPBACK {
        schema::overflow(
            &pod.namespace,
            &pod.name,
            class::name(class::LOCALHOST),
            direction::UNKNOWN,
        )
    } else {
        schema::overflow(
            &pod.namespace,
            &pod.name,
            class::name(class::UNKNOWN),
            direction::name(hook),
        )
    }
}

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
    /// The pod's ends of the flow: the client's and the server's; `None`
    /// for an end that is not the pod's (or not attributable).
    client: Option<End>,
    server: Option<End>,
    /// Where a redirected connection was going: class, peer id, port.
    original: Option<(u8, u32, u16)>,
}

/// An end of a flow in the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End {
    /// A socket of the container with this cgroup id.
    Container(u64),
    /// A packet without a socket (an RST, an ICMP error).
    Kernel,
    /// A receiver whose socket is not known.
    Unknown,
}

impl End {
    fn sender(cgroup: u64) -> Self {
        if cgroup == 0 {
            Self::Kernel
        } else {
            Self::Container(cgroup)
        }
    }

    fn receiver(cgroup: u64) -> Self {
        if cgroup == 0 {
            Self::Unknown
        } else {
            Self::Container(cgroup)
        }
    }
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
        let port = match (value.server_port, to_server) {
            (0, to_server) => to_server.map(|d| if d { key.dst_port } else { key.src_port }),
            // As the server's socket has it (behind a redirect the packet's
            // ports are the translated ones).
            (port, _) => Some(port),
        };
        let localhost = value.class == class::LOCALHOST;
        let direction = match (localhost, to_server) {
            (true, Some(true)) => Direction::Request,
            (true, Some(false)) => Direction::Response,
            (true, None) => Direction::Unknown,
            (false, _) => Direction::Hook(key.direction),
        };
        let egress = key.direction == direction::EGRESS;
        let sender = Some(End::sender(value.src_cgroup));
        let receiver = Some(End::receiver(value.dst_cgroup));
        let (client, server) = match (localhost, to_server, egress) {
            (true, Some(true), _) => (sender, receiver),
            (true, Some(false), _) => (receiver, sender),
            (true, None, _) => (None, None),
            // On eth0 one end is the pod's: the sender on egress, the
            // receiver on ingress. Is it the server?
            (false, Some(true), true) => (sender, None),
            (false, Some(false), true) => (None, sender),
            (false, Some(true), false) => (None, receiver),
            (false, Some(false), false) => (receiver, None),
            (false, None, true) => (sender, None),
            (false, None, false) => (None, None),
        };
        let original = (value.orig_class != class::UNKNOWN).then_some((
            value.orig_class,
            value.orig_peer_id,
            value.orig_port,
        ));
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
            original,
        }
    }

    /// The cgroup ids of the pod's ends.
    pub fn cgroups(&self) -> impl Iterator<Item = u64> {
        [self.client, self.server]
            .into_iter()
            .filter_map(|end| match end {
                Some(End::Container(id)) => Some(id),
                _ => None,
            })
    }

    /// The series' labels, for `pod`.
    pub fn labels(
        &self,
        pod: &ObjectRef,
        identities: &Identities,
        cgroups: &CgroupNames,
    ) -> FlowLabels {
        let (peer_namespace, peer) = peer_names(self.class, self.peer_id, identities);
        // `kernel` for a packet without a socket.
        let container = |end: Option<End>| -> String {
            match end {
                None => String::new(),
                Some(End::Kernel) => KERNEL.to_owned(),
                Some(End::Unknown) => UNKNOWN.to_owned(),
                Some(End::Container(id)) => container_label(id, pod, identities, cgroups),
            }
        };
        let (original_class, original_namespace, original_peer, original_port) = match self.original
        {
            Some((class, id, port)) => {
                let (namespace, peer) = peer_names(class, id, identities);
                (
                    class::name(class).to_owned(),
                    namespace,
                    peer,
                    port.to_string(),
                )
            }
            None => Default::default(),
        };
        FlowLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            class: class::name(self.class).to_owned(),
            direction: self.direction.label().to_owned(),
            protocol: protocol_label(self.family, self.protocol),
            port: self.port.map(|p| p.to_string()).unwrap_or_default(),
            path: String::new(),
            peer_namespace,
            peer,
            client_container: container(self.client),
            server_container: container(self.server),
            original_class,
            original_namespace,
            original_peer,
            original_port,
        }
    }
}

/// The `client_container` or `server_container` label of the container
/// with cgroup `id`: a container of the pod by its name; another cgroup by
/// its directory's; `unknown` for none.
pub fn container_label(
    id: u64,
    pod: &ObjectRef,
    identities: &Identities,
    cgroups: &CgroupNames,
) -> String {
    match identities.containers.get(&id) {
        Some(c) if &c.pod == pod => c.name.clone(),
        Some(_) => UNKNOWN.to_owned(),
        None if id == 0 => UNKNOWN.to_owned(),
        None => cgroups.name(id).unwrap_or_else(|| UNKNOWN.to_owned()),
    }
}

/// The namespace and name of a peer of `class` with this id.
fn peer_names(class: u8, id: u32, identities: &Identities) -> (String, String) {
    let unknown = || (String::new(), UNKNOWN.to_owned());
    match class {
        class::LOCALHOST => (String::new(), String::new()),
        class::POD => identities
            .pods
            .get(&id)
            .map_or_else(unknown, |p| (p.namespace.clone(), p.name.clone())),
        class::SERVICE => identities
            .services
            .get(&id)
            .map_or_else(unknown, |s| (s.namespace.clone(), s.name.clone())),
        class::NODE => identities
            .nodes
            .get(&id)
            .map_or_else(unknown, |n| (String::new(), n.clone())),
        _ => (String::new(), class::name(class::EXTERNAL).to_owned()),
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
mod tests;
