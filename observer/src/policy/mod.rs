//! Policies: allow, deny and audit rules on a pod's localhost, pod-to-pod,
//! Service and external traffic.
//!
//! - `model`: the file format, checked as it is read;
//! - this module: reading a file (several YAML documents), and which rules
//!   apply to a pod, in which order, and what they decide.

pub mod compile;
pub mod explain;
pub mod kernel;
pub mod model;

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use observer_common::inventory::Inventory;
use serde::Deserialize;

pub use model::{Action, Class, Direction, Mode, Protocol, Rule, TrafficPolicy};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file, the line and the problem.
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Policies read from one file, in the file's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policies {
    pub policies: Vec<TrafficPolicy>,
}

/// Reads a policy file; with `services` (namespace, name of those that
/// exist), a rule naming another Service is refused too.
pub fn load(
    path: &Path,
    services: Option<&HashSet<(String, String)>>,
) -> Result<Policies, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.into(),
        source,
    })?;
    let invalid = |(line, message)| PolicyError::Invalid {
        path: path.into(),
        line,
        message,
    };
    let policies = parse(&text).map_err(invalid)?;
    if let Some(services) = services {
        check_services(&text, &policies, services).map_err(invalid)?;
    }
    Ok(policies)
}

/// The Services a policy may name: those with a ClusterIP, as
/// (namespace, name).
pub fn service_names(inventory: &Inventory) -> HashSet<(String, String)> {
    inventory
        .services
        .iter()
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect()
}

/// Why a rule naming a Service that is not in `services` is refused.
fn no_such_service(policy: &str, service: &model::ServiceRef) -> String {
    format!(
        "policy `{policy}`: there is no Service {}/{} with a ClusterIP (a headless Service has none to match)",
        service.namespace, service.name
    )
}

/// The first rule naming a Service not in `services`: the message, and
/// the Service's name.
pub fn unknown_service(
    policies: &Policies,
    services: &HashSet<(String, String)>,
) -> Option<(String, String)> {
    policies.policies.iter().find_map(|policy| {
        let service = policy
            .spec
            .rules
            .iter()
            .filter_map(|r| r.service.as_ref())
            .find(|s| !services.contains(&(s.namespace.clone(), s.name.clone())))?;
        Some((
            no_such_service(&policy.metadata.name, service),
            service.name.clone(),
        ))
    })
}

/// Refuses rules that name a Service that does not exist, with the line.
fn check_services(
    text: &str,
    policies: &Policies,
    services: &HashSet<(String, String)>,
) -> Result<(), (usize, String)> {
    match unknown_service(policies, services) {
        Some((message, name)) => Err((service_line(text, &name), message)),
        None => Ok(()),
    }
}

/// Parses the text of a policy file: one or more YAML documents, each a
/// `TrafficPolicy`. Errors are (line, message).
pub fn parse(text: &str) -> Result<Policies, (usize, String)> {
    let mut policies: Vec<TrafficPolicy> = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        // An empty document (an empty file, a trailing `---`) holds no policy.
        let policy = match Option::<TrafficPolicy>::deserialize(document) {
            Ok(None) => continue,
            Ok(Some(policy)) => policy,
            Err(err) => {
                let line = err.location().map_or(1, |l| l.line());
                // The message without serde_norway's own " at line N" tail.
                let message = err.to_string();
                let message = message
                    .split(" at line ")
                    .next()
                    .unwrap_or(&message)
                    .to_owned();
                return Err((line, message));
            }
        };
        policies.push(policy);
    }
    // Names must be unique: metrics and logs name policies and rules.
    let mut names = HashSet::new();
    for policy in &policies {
        let name = &policy.metadata.name;
        if !names.insert(name.clone()) {
            return Err((
                line_of(text, &format!("name: {name}")),
                format!("two policies are named `{name}`"),
            ));
        }
        let mut rules = HashSet::new();
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            if rule.name.as_deref() == Some("default") {
                let line = line_of(text, "name: default");
                return Err((
                    line,
                    format!(
                        "policy `{name}`: `default` names what no rule matches; give the rule another name"
                    ),
                ));
            }
            if !rules.insert(rule_name(rule, i)) {
                let line = line_of(text, &format!("name: {}", rule_name(rule, i)));
                return Err((
                    line,
                    format!(
                        "policy `{name}` has two rules named `{}`",
                        rule_name(rule, i)
                    ),
                ));
            }
        }
    }
    Ok(Policies { policies })
}

/// The line of a `service:` reference to `name` (written in one line, or
/// its fields in the next two).
fn service_line(text: &str, name: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let named = format!("name: {name}");
    (0..lines.len())
        .find(|&i| {
            lines[i].contains("service:")
                && lines[i..(i + 3).min(lines.len())]
                    .iter()
                    .any(|l| l.contains(&named))
        })
        .map_or_else(|| line_of(text, &named), |i| i + 1)
}

/// The line where `needle` last appears (for errors found after parsing).
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .last()
        .unwrap_or(1)
}

/// A rule's name: its own, or `rule-<n>` (from 1) by position.
pub fn rule_name(rule: &Rule, index: usize) -> String {
    rule.name
        .clone()
        .unwrap_or_else(|| format!("rule-{}", index + 1))
}

/// A connection to decide on, as the observer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    pub class: Class,
    pub direction: Direction,
    pub protocol: Protocol,
    /// The server's port.
    pub port: u16,
    /// Localhost: the client container's name, if known.
    pub client: Option<&'a str>,
    /// Pod traffic: the peer pod's namespace and labels.
    pub peer: Option<(&'a str, &'a BTreeMap<String, String>)>,
    /// Service traffic: the Service's namespace and name.
    pub service: Option<(&'a str, &'a str)>,
    /// External traffic: the remote address.
    pub address: Option<std::net::Ipv4Addr>,
}

/// What decides a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub policy: String,
    /// The rule, or `default` when none matched.
    pub rule: String,
    pub action: Action,
    pub mode: Mode,
}

impl Policies {
    /// The policies that select a pod, in the order they are tried: by name.
    pub fn for_pod(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<&TrafficPolicy> {
        let mut selected: Vec<&TrafficPolicy> = self
            .policies
            .iter()
            .filter(|p| p.spec.pod_selector.matches(namespace, labels))
            .collect();
        selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        selected
    }

    /// How rules combine: the policies selecting the pod are tried by name,
    /// the rules of each in order; the first rule that matches decides.
    /// Without a match, the first policy (by name) whose `defaultAction` is
    /// `deny` decides (for inbound connections: the first such policy that
    /// has ingress rules); else the traffic is allowed (`None`: no policy
    /// has a say).
    pub fn decide(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        connection: &Connection,
    ) -> Option<Decision> {
        // The kubelet's probes come from the node: never denied on the way in.
        if connection.class == Class::Node && connection.direction == Direction::Ingress {
            return None;
        }
        let selected = self.for_pod(namespace, labels);
        for policy in &selected {
            for (i, rule) in policy.spec.rules.iter().enumerate() {
                if matches(rule, connection) {
                    return Some(Decision {
                        policy: policy.metadata.name.clone(),
                        rule: rule_name(rule, i),
                        action: rule.action,
                        mode: policy.spec.mode,
                    });
                }
            }
        }
        let inbound =
            connection.class != Class::Localhost && connection.direction == Direction::Ingress;
        selected
            .iter()
            .find(|p| {
                p.spec.default_action == Action::Deny && (!inbound || compile::has_ingress(p))
            })
            .map(|p| Decision {
                policy: p.metadata.name.clone(),
                rule: "default".into(),
                action: Action::Deny,
                mode: p.spec.mode,
            })
    }
}

/// Whether a rule matches a connection.
pub fn matches(rule: &Rule, c: &Connection) -> bool {
    let class = rule.class == Class::Any || rule.class == c.class;
    // Localhost traffic is decided at the client's `connect()`: ingress
    // rules never see it (as in the kernel).
    let direction = if c.class == Class::Localhost {
        rule.class == Class::Localhost || rule.direction == Direction::Egress
    } else {
        rule.direction == c.direction
    };
    let protocol = rule.protocol == Protocol::Any || rule.protocol == c.protocol;
    let port = rule.ports.is_empty() || rule.ports.iter().any(|r| r.contains(c.port));
    let clients = match &rule.clients {
        None => true,
        Some(model::Containers::Only(names)) => {
            c.client.is_some_and(|n| names.iter().any(|x| x == n))
        }
        Some(model::Containers::Not(names)) => {
            c.client.is_none_or(|n| names.iter().all(|x| x != n))
        }
    };
    let peer = rule.peer.as_ref().is_none_or(|selector| {
        c.peer
            .is_some_and(|(namespace, labels)| selector.matches(namespace, labels))
    });
    let service = rule.service.as_ref().is_none_or(|s| {
        c.service
            .is_some_and(|(namespace, name)| s.namespace == namespace && s.name == name)
    });
    let cidrs = rule.cidrs.is_empty()
        || c.address
            .is_some_and(|a| rule.cidrs.iter().any(|net| net.contains(&a)));
    class && direction && protocol && port && clients && peer && service && cidrs
}

#[cfg(test)]
mod tests;
