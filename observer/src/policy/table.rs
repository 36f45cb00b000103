//! The shared table of policy cases (`cases.yaml`): read here for both the
//! user-space run (the unit tests) and the kernel's (the end-to-end tests,
//! with the `test-support` feature).

use std::net::SocketAddrV4;

use observer_common::{direction, inventory::Inventory, protocol, verdict};
use serde::Deserialize;

use super::{Policies, explain::Connect, parse};

/// The table's text.
pub const CASES: &str = include_str!("cases.yaml");

/// The table, read.
pub struct Table {
    pub policies: Policies,
    /// Container cgroups are relative paths: the kernel's run makes them
    /// under a cgroup of its own.
    pub inventory: Inventory,
    pub cases: Vec<Case>,
}

/// One case: a connection of a pod, and what must decide it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// NAMESPACE/NAME.
    pub pod: String,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default = "egress", deserialize_with = "direction_word")]
    pub direction: u8,
    #[serde(default = "tcp", deserialize_with = "protocol_word")]
    pub protocol: u8,
    /// Egress: the destination; ingress: the client.
    pub remote: SocketAddrV4,
    /// Ingress: the pod's port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(deserialize_with = "verdict_word")]
    pub expect: Option<u8>,
    /// POLICY/RULE.
    #[serde(default)]
    pub rule: Option<String>,
    /// Ingress: sent by a process of the node itself (the kubelet's probes).
    #[serde(default)]
    pub from_node_process: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    policies: String,
    inventory: Inventory,
    cases: Vec<Case>,
}

impl Table {
    pub fn load() -> Self {
        let raw: Raw = serde_norway::from_str(CASES).expect("cases.yaml is valid");
        let policies = parse(&raw.policies)
            .unwrap_or_else(|(line, e)| panic!("cases.yaml's policies, line {line}: {e}"));
        Self {
            policies,
            inventory: raw.inventory,
            cases: raw.cases,
        }
    }
}

impl Case {
    /// (namespace, name) of the pod.
    pub fn pod(&self) -> (&str, &str) {
        self.pod.split_once('/').expect("NAMESPACE/NAME")
    }

    /// The connection, as `explain` takes it.
    pub fn connect(&self) -> Connect {
        Connect {
            direction: self.direction,
            protocol: self.protocol,
            remote: self.remote,
            port: self.port.unwrap_or(self.remote.port()),
            client: self.client.clone(),
            from_node_process: self.from_node_process,
        }
    }

    /// Checks a decision (the rule's names and verdict) against the case.
    pub fn check(&self, decided: Option<(&str, &str, u8)>) -> Result<(), String> {
        let got = decided.map(|(policy, rule, v)| (format!("{policy}/{rule}"), v));
        let want = self
            .expect
            .map(|v| (self.rule.clone().unwrap_or_default(), v));
        if got == want {
            return Ok(());
        }
        let show = |d: &Option<(String, u8)>| match d {
            Some((rule, v)) => format!("{} by {rule}", verdict::name(*v)),
            None => "none".to_owned(),
        };
        Err(format!(
            "{self:?}: expected {}, got {}",
            show(&want),
            show(&got)
        ))
    }
}

fn egress() -> u8 {
    direction::EGRESS
}

fn tcp() -> u8 {
    protocol::TCP
}

fn direction_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let word = String::deserialize(d)?;
    [direction::EGRESS, direction::INGRESS]
        .into_iter()
        .find(|&x| direction::name(x) == word)
        .ok_or_else(|| serde::de::Error::custom(format!("direction `{word}`")))
}

fn protocol_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let word = String::deserialize(d)?;
    protocol::from_name(&word).ok_or_else(|| serde::de::Error::custom(format!("protocol `{word}`")))
}

fn verdict_word<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let word = String::deserialize(d)?;
    if word == "none" {
        return Ok(None);
    }
    [verdict::ALLOW, verdict::DENY, verdict::AUDIT_DENY]
        .into_iter()
        .find(|&v| verdict::name(v) == word)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("verdict `{word}`")))
}
