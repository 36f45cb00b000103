//! `observer policy check` and `observer policy explain`: a policy file
//! checked offline, and the rules that apply to one pod, in words.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddrV4, path::Path};

use observer_common::inventory::Inventory;

use super::{
    Action, Class, Connection, Direction, Mode, PolicyError, Protocol, Rule,
    model::{Containers, class_name},
    rule_name,
};
use crate::inventory::{self, InventoryError};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("the inventory has no pod {0} (give NAMESPACE/NAME)")]
    NoPod(String),
}

/// Checks a file; with an inventory, also that the Services it names exist.
/// Returns a one-line summary.
pub fn check(path: &Path, inventory: Option<&Path>) -> Result<String, ExplainError> {
    let services = inventory
        .map(inventory::load)
        .transpose()?
        .map(|i| super::service_names(&i));
    let policies = super::load(path, services.as_ref())?;
    let rules: usize = policies.policies.iter().map(|p| p.spec.rules.len()).sum();
    Ok(format!(
        "{}: valid: {} policies, {rules} rules",
        path.display(),
        policies.policies.len()
    ))
}

/// A connection to decide, for `explain`.
pub struct Probe {
    pub to: SocketAddrV4,
    pub client: Option<String>,
    pub udp: bool,
}

/// The rules that apply to `pod` (NAMESPACE/NAME in the inventory), in the
/// order they are tried; with a probe, what they decide for it.
pub fn explain(
    path: &Path,
    inventory: &Path,
    pod: &str,
    probe: Option<&Probe>,
) -> Result<String, ExplainError> {
    let inventory = inventory::load(inventory)?;
    let policies = super::load(path, Some(&super::service_names(&inventory)))?;
    let (namespace, name) = pod
        .split_once('/')
        .ok_or_else(|| ExplainError::NoPod(pod.into()))?;
    let found = inventory
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name)
        .ok_or_else(|| ExplainError::NoPod(pod.into()))?;
    let mut out = describe(&policies, namespace, name, &found.labels);
    if let Some(probe) = probe {
        let connection = connection_to(&inventory, probe);
        let what = format!(
            "{} {} to {}",
            if probe.udp { "UDP" } else { "TCP" },
            class_name(connection.class),
            probe.to
        );
        let _ = match policies.decide(namespace, &found.labels, &connection) {
            None => writeln!(out, "{what}: allowed (no policy decides it)"),
            Some(d) => {
                let action = match (d.action, d.mode) {
                    (Action::Allow, _) => "allowed",
                    (Action::Deny, Mode::Enforce) => "denied",
                    (Action::Deny, Mode::Audit) => "allowed, counted as a would-be denial (audit)",
                };
                writeln!(out, "{what}: {action} by {}/{}", d.policy, d.rule)
            }
        };
    }
    Ok(out)
}

/// Classifies a probe's destination the way the kernel does: loopback,
/// a Service's ClusterIP and port, a pod's IP, or elsewhere.
fn connection_to<'a>(inventory: &'a Inventory, probe: &'a Probe) -> Connection<'a> {
    let address = *probe.to.ip();
    let port = probe.to.port();
    let protocol = if probe.udp {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let mut connection = Connection {
        class: Class::External,
        direction: Direction::Egress,
        protocol,
        port,
        client: None,
        peer: None,
        service: None,
        address: Some(address),
    };
    if address.is_loopback() {
        connection.class = Class::Localhost;
        connection.client = probe.client.as_deref();
    } else if let Some(s) = inventory
        .services
        .iter()
        .find(|s| s.cluster_ip == address && s.ports.iter().any(|p| p.port == port))
    {
        connection.class = Class::Service;
        connection.service = Some((&s.namespace, &s.name));
    } else if inventory.nodes.iter().any(|n| n.address == address) {
        connection.class = Class::Node;
    } else if let Some(p) = inventory.pods.iter().find(|p| p.ip == address) {
        connection.class = Class::Pod;
        connection.peer = Some((&p.namespace, &p.labels));
    }
    connection
}

/// The explanation of what applies to a pod with these labels.
pub fn describe(
    policies: &super::Policies,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> String {
    let mut out = String::new();
    let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(out, "pod {namespace}/{name} ({})", shown.join(", "));
    let selected = policies.for_pod(namespace, labels);
    if selected.is_empty() {
        let _ = writeln!(out, "no policy selects it: all its traffic is allowed");
        return out;
    }
    let _ = writeln!(
        out,
        "policies, tried in this order; the first rule that matches decides:"
    );
    for policy in &selected {
        let mode = match policy.spec.mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit: counted, not enforced",
        };
        let _ = writeln!(out, "  {} ({mode})", policy.metadata.name);
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            let _ = writeln!(
                out,
                "    {}. {}: {}",
                i + 1,
                rule_name(rule, i),
                rule_words(rule)
            );
        }
    }
    let default = selected
        .iter()
        .find(|p| p.spec.default_action == Action::Deny);
    let _ = match default {
        Some(p) => writeln!(
            out,
            "traffic no rule matches: denied (defaultAction of {})",
            p.metadata.name
        ),
        None => writeln!(out, "traffic no rule matches: allowed"),
    };
    out
}

/// A rule in words: `deny localhost TCP to port 9090 from containers other than sidecar`.
pub fn rule_words(rule: &Rule) -> String {
    let mut words = vec![
        match rule.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
        .to_owned(),
    ];
    match rule.class {
        super::Class::Any => words.push("any traffic".into()),
        super::Class::Localhost => words.push("localhost".into()),
        class => words.push(format!(
            "{} {}",
            class_name(class),
            match rule.direction {
                super::Direction::Egress => "egress",
                super::Direction::Ingress => "ingress",
            }
        )),
    }
    match rule.protocol {
        Protocol::Any => {}
        Protocol::Tcp => words.push("TCP".into()),
        Protocol::Udp => words.push("UDP".into()),
        Protocol::Sctp => words.push("SCTP".into()),
    }
    if let Some(service) = &rule.service {
        words.push(format!("to Service {}/{}", service.namespace, service.name));
    }
    if let Some(peer) = &rule.peer {
        let mut what = vec![format!(
            "namespace {}",
            peer.namespace.as_deref().unwrap_or("any")
        )];
        what.extend(peer.match_labels.iter().map(|(k, v)| format!("{k}={v}")));
        words.push(format!("with pods of {}", what.join(", ")));
    }
    if !rule.cidrs.is_empty() {
        let cidrs: Vec<String> = rule.cidrs.iter().map(ToString::to_string).collect();
        words.push(format!("to {}", cidrs.join(", ")));
    }
    if !rule.ports.is_empty() {
        let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        words.push(format!("port {}", ports.join(", ")));
    }
    match &rule.clients {
        Some(Containers::Only(names)) => words.push(format!("from {}", names.join(", "))),
        Some(Containers::Not(names)) => {
            words.push(format!("from containers other than {}", names.join(", ")))
        }
        None => {}
    }
    words.join(" ")
}
