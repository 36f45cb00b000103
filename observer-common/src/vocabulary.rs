//! The numbers kernel and daemon exchange, and the words users see for
//! them: each class, direction, protocol and verdict is defined here once,
//! with its label value.

/// Traffic classes, decided in the kernel (see [`crate::classify`]).
pub mod class {
    pub const UNKNOWN: u8 = 0;
    /// On the pod's `lo`, or to a loopback address: container to container.
    pub const LOCALHOST: u8 = 1;
    /// To or from another pod's IP (any node).
    pub const POD: u8 = 2;
    /// To a Service ClusterIP and port (seen before any DNAT), and replies.
    pub const SERVICE: u8 = 3;
    /// To or from a node's own address.
    pub const NODE: u8 = 4;
    /// Everything else.
    pub const EXTERNAL: u8 = 5;
    /// A unix socket between processes of a pod (no network involved).
    pub const UNIX: u8 = 6;
    /// A named pipe in a volume the pod's containers share (observed only:
    /// a pipe has no hook a policy could decide at).
    pub const FIFO: u8 = 7;

    /// Label values, indexed by class number.
    pub const NAMES: [&str; 8] = [
        "unknown",
        "localhost",
        "pod",
        "service",
        "node",
        "external",
        "unix",
        "fifo",
    ];

    /// The label value of a class.
    pub const fn name(class: u8) -> &'static str {
        if (class as usize) < NAMES.len() {
            NAMES[class as usize]
        } else {
            NAMES[UNKNOWN as usize]
        }
    }

    /// The class a label value names (not `unknown`).
    pub fn from_name(name: &str) -> Option<u8> {
        (LOCALHOST..NAMES.len() as u8).find(|&c| NAMES[c as usize] == name)
    }
}

/// The hook a packet was counted at, and the direction of a connection
/// from the pod's side.
pub mod direction {
    /// Sent by the pod: `eth0` egress and all loopback traffic (counted at
    /// `lo` egress only, so each loopback packet is counted once); a
    /// connection the pod opens.
    pub const EGRESS: u8 = 0;
    /// Received by the pod on `eth0`; a connection to the pod.
    pub const INGRESS: u8 = 1;

    pub const fn name(direction: u8) -> &'static str {
        if direction == INGRESS {
            "ingress"
        } else {
            "egress"
        }
    }

    /// On `lo` both ends are the pod: series say which end sent.
    pub const REQUEST: &str = "request";
    pub const RESPONSE: &str = "response";
    /// On `lo`, traffic without ports.
    pub const UNKNOWN: &str = "unknown";
}

/// Network-layer family of a flow.
pub mod family {
    /// Not IP (ARP, ...): addresses, ports and protocol are zero.
    pub const OTHER: u8 = 0;
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// IP protocol numbers, and their label values.
pub mod protocol {
    pub const HOPOPT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;

    /// Label values of the protocols with a name.
    pub const NAMES: [(u8, &str); 6] = [
        (HOPOPT, "hopopt"),
        (ICMP, "icmp"),
        (TCP, "tcp"),
        (UDP, "udp"),
        (ICMPV6, "icmpv6"),
        (SCTP, "sctp"),
    ];
    /// The label of frames that are not IP (ARP, ...).
    pub const NON_IP: &str = "non_ip";

    /// The name of a protocol, if it has one (the label is the number
    /// otherwise).
    pub fn name(protocol: u8) -> Option<&'static str> {
        NAMES.iter().find(|(n, _)| *n == protocol).map(|(_, s)| *s)
    }

    /// The number of a named protocol (case-insensitive: policies write
    /// `TCP`, as Kubernetes does).
    pub fn from_name(name: &str) -> Option<u8> {
        NAMES
            .iter()
            .find(|(_, s)| s.eq_ignore_ascii_case(name))
            .map(|(n, _)| *n)
    }

    /// Whether the transport header starts with source and destination ports.
    pub const fn has_ports(protocol: u8) -> bool {
        matches!(protocol, TCP | UDP | SCTP | UDPLITE)
    }
}

/// Ports.
pub mod ports {
    /// Linux's default `ip_local_port_range`: where client ports come from.
    pub const EPHEMERAL_FIRST: u16 = 32768;
    pub const EPHEMERAL_LAST: u16 = 60999;

    pub const fn is_ephemeral(port: u16) -> bool {
        port >= EPHEMERAL_FIRST && port <= EPHEMERAL_LAST
    }
}

/// The interface a flow was seen on.
pub mod interface {
    /// The pod's `lo` (ifindex 1 in every namespace).
    pub const LOOPBACK: u8 = 0;
    /// The pod's `eth0`.
    pub const POD: u8 = 1;
}

/// Which end of a flow is the server (owns the listening socket).
pub mod server {
    /// Not decidable in the kernel (both ends have bound UDP sockets, say).
    pub const UNKNOWN: u8 = 0;
    /// The packet's source is the server: a response.
    pub const SOURCE: u8 = 1;
    /// The packet's destination is the server: a request.
    pub const DESTINATION: u8 = 2;
}

/// A policy verdict.
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Denied by an `audit` policy: counted, let through.
    pub const AUDIT_DENY: u8 = 3;

    pub const fn name(verdict: u8) -> &'static str {
        match verdict {
            ALLOW => "allow",
            DENY => "deny",
            _ => "audit_deny",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in class::LOCALHOST..=class::EXTERNAL {
            assert_eq!(class::from_name(class::name(c)), Some(c));
        }
        assert_eq!(class::from_name("unknown"), None);
        assert_eq!(class::name(200), "unknown");
        assert_eq!(protocol::from_name("TCP"), Some(protocol::TCP));
        assert_eq!(protocol::name(47), None);
        assert!(ports::is_ephemeral(32768) && !ports::is_ephemeral(61000));
    }
}
