//! Policies: allow, deny and audit rules on a pod's localhost, pod-to-pod,
//! Service and external traffic.
//!
//! - [`model`]: the file format, checked as it is read;
//! - this module: reading a file (several YAML documents), and which
//!   policies select a pod, in which order;
//! - [`compile`]: the rules of every attached pod as the kernel's entries (a
//!   pure function); what they decide is `observer_common::policy::decide`,
//!   the same in the kernel and in [`explain`];
//! - [`lifecycle`]: the policy file in force, reloaded on change, compiled
//!   and written to the kernel.

pub mod compile;
pub mod explain;
mod fields;
pub mod lifecycle;
pub mod model;
#[cfg(any(test, feature = "test-support"))]
pub mod table;

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
};

use observer_common::inventory::Inventory;
use serde::Deserialize;

pub use model::{FailureMode, Mode, Rule, Target, TrafficPolicy};

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
            .filter_map(|r| match &r.target {
                Target::Service(service) => Some(service),
                _ => None,
            })
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
            let reserved = [
                (compile::DEFAULT_RULE, "what no rule matches"),
                (
                    compile::UNKNOWN_CONTAINER_RULE,
                    "a client container not known by name yet",
                ),
            ];
            if let Some((word, meaning)) = reserved
                .iter()
                .find(|(word, _)| rule.name.as_deref() == Some(*word))
            {
                let line = line_of(text, &format!("name: {word}"));
                return Err((
                    line,
                    format!(
                        "policy `{name}`: `{word}` names {meaning}; give the rule another name"
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

    /// The label keys rules match other pods by (`peer.matchLabels`): all
    /// an observer needs to keep of the labels of other nodes' pods.
    pub fn peer_label_keys(&self) -> std::collections::BTreeSet<String> {
        self.policies
            .iter()
            .flat_map(|p| &p.spec.rules)
            .filter_map(|r| match &r.target {
                Target::Peers(peer) => Some(peer.match_labels.keys().cloned()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests;
