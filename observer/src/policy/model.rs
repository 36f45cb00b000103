//! What a user writes: `TrafficPolicy` objects, shaped like Kubernetes
//! objects so that they live in a ConfigMap (and, later, a CRD).
//!
//! Every check that can be made on the file alone is made while it is read,
//! so that the error carries the line (`try_from` raises it inside the rule
//! being read).

use std::{collections::BTreeMap, fmt, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, de};

pub const API_VERSION: &str = "observer.dev/v1alpha1";
pub const KIND: &str = "TrafficPolicy";

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(deserialize_with = "api_version")]
    pub api_version: String,
    #[serde(deserialize_with = "kind")]
    pub kind: String,
    pub metadata: Metadata,
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    #[serde(deserialize_with = "dns_label")]
    pub name: String,
    /// Accepted for the Kubernetes shape; policies are cluster-wide.
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// The pods the policy applies to.
    pub pod_selector: Selector,
    /// `enforce` or `audit` (count what would be denied, deny nothing).
    pub mode: Mode,
    /// What happens to traffic no rule matches.
    #[serde(default)]
    pub default_action: Action,
    /// Tried in order; the first that matches decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Pods by namespace and labels; an empty selector selects every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, deserialize_with = "optional_dns_label")]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "labels")]
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    #[default]
    Any,
    Localhost,
    Pod,
    Service,
    /// A node's own address (host-network pods included).
    Node,
    External,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Egress,
    Ingress,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "any")]
    Any,
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A port or an inclusive range: `8080` or `"8000-8100"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |p: &str| match p.trim().parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(format!("`{p}` is not a port (1 to 65535)")),
        };
        let range = match text.split_once('-') {
            Some((first, last)) => Self {
                first: port(first)?,
                last: port(last)?,
            },
            None => {
                let p = port(text)?;
                Self { first: p, last: p }
            }
        };
        if range.first > range.last {
            return Err(format!("the port range {text} is empty"));
        }
        Ok(range)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(text) => text,
        };
        text.parse().map_err(de::Error::custom)
    }
}

/// A Service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    #[serde(deserialize_with = "dns_label")]
    pub namespace: String,
    #[serde(deserialize_with = "dns_label")]
    pub name: String,
}

/// One rule, checked when read.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct Rule {
    pub name: Option<String>,
    pub class: Class,
    pub direction: Direction,
    pub protocol: Protocol,
    /// Server ports; empty: any.
    pub ports: Vec<PortRange>,
    /// Localhost: who may (or may not) be the client.
    pub clients: Option<Containers>,
    /// Pod traffic: the peer pods.
    pub peer: Option<Selector>,
    /// Service traffic: the Service.
    pub service: Option<ServiceRef>,
    /// External traffic: the destinations.
    pub cidrs: Vec<Ipv4Net>,
    pub action: Action,
}

/// Client containers of a localhost rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Containers {
    /// Only these.
    Only(Vec<String>),
    /// Any but these.
    Not(Vec<String>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRule {
    #[serde(default, deserialize_with = "optional_dns_label")]
    name: Option<String>,
    #[serde(default)]
    class: Class,
    #[serde(default)]
    direction: Option<Direction>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    ports: Option<Vec<PortRange>>,
    #[serde(default)]
    client_containers: Option<Vec<String>>,
    #[serde(default)]
    not_client_containers: Option<Vec<String>>,
    #[serde(default)]
    peer: Option<Selector>,
    #[serde(default)]
    service: Option<ServiceRef>,
    #[serde(default)]
    cidrs: Option<Vec<Ipv4Net>>,
    action: Action,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    /// Refuses rules that could never match anything.
    fn try_from(raw: RawRule) -> Result<Self, String> {
        let only = |field: &str, class: Class| {
            format!(
                "`{field}` is for `class: {}` rules only: this rule could never match",
                class_name(class)
            )
        };
        let class = raw.class;
        if raw.ports.as_ref().is_some_and(Vec::is_empty) {
            return Err("`ports: []` matches no port: leave `ports` out for any port".into());
        }
        if (raw.client_containers.is_some() || raw.not_client_containers.is_some())
            && class != Class::Localhost
        {
            let field = if raw.client_containers.is_some() {
                "clientContainers"
            } else {
                "notClientContainers"
            };
            return Err(only(field, Class::Localhost));
        }
        if raw.peer.is_some() && class != Class::Pod {
            return Err(only("peer", Class::Pod));
        }
        if raw.service.is_some() && class != Class::Service {
            return Err(only("service", Class::Service));
        }
        if raw.cidrs.is_some() && class != Class::External {
            return Err(only("cidrs", Class::External));
        }
        if raw.cidrs.as_ref().is_some_and(Vec::is_empty) {
            return Err("`cidrs: []` matches no address: leave `cidrs` out for any".into());
        }
        let direction = match (class, raw.direction) {
            (Class::Localhost, Some(_)) => {
                return Err(
                    "`direction` does not apply to localhost traffic (it never leaves the pod): leave it out"
                        .into(),
                );
            }
            // The pod's side sees a Service's ClusterIP only on the way out;
            // what comes in through a Service arrives as pod traffic.
            (Class::Service, Some(Direction::Ingress)) => {
                return Err("`class: service` with `direction: ingress` could never match: traffic into a pod through a Service is `class: pod` on arrival".into());
            }
            (_, direction) => direction.unwrap_or_default(),
        };
        let clients = match (raw.client_containers, raw.not_client_containers) {
            (Some(_), Some(_)) => {
                return Err("give `clientContainers` or `notClientContainers`, not both".into());
            }
            (Some(names), None) if names.is_empty() => {
                return Err(
                    "`clientContainers: []` matches no client: this rule could never match".into(),
                );
            }
            (Some(names), None) => Some(Containers::Only(names)),
            (None, Some(names)) => Some(Containers::Not(names)),
            (None, None) => None,
        };
        Ok(Self {
            name: raw.name,
            class,
            direction,
            protocol: raw.protocol,
            ports: raw.ports.unwrap_or_default(),
            clients,
            peer: raw.peer,
            service: raw.service,
            cidrs: raw.cidrs.unwrap_or_default(),
            action: raw.action,
        })
    }
}

pub fn class_name(class: Class) -> &'static str {
    match class {
        Class::Any => "any",
        Class::Localhost => "localhost",
        Class::Pod => "pod",
        Class::Service => "service",
        Class::Node => "node",
        Class::External => "external",
    }
}

fn api_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if value != API_VERSION {
        return Err(de::Error::custom(format!(
            "apiVersion `{value}` is not known: this observer reads `{API_VERSION}`"
        )));
    }
    Ok(value)
}

fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if value != KIND {
        return Err(de::Error::custom(format!(
            "kind `{value}` is not a policy: expected `{KIND}`"
        )));
    }
    Ok(value)
}

/// A Kubernetes name (RFC 1123 label): what namespaces, Services and our
/// policies and rules are named with.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn dns_label<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let name = String::deserialize(deserializer)?;
    if !is_dns_label(&name) {
        return Err(de::Error::custom(format!(
            "`{name}` is not a valid name: lowercase letters, digits and `-`, at most 63"
        )));
    }
    Ok(name)
}

fn optional_dns_label<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    dns_label(deserializer).map(Some)
}

/// Label keys and values as Kubernetes accepts them.
fn labels<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(deserializer)?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    };
    for (key, value) in &labels {
        let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
        let prefix_ok =
            prefix.is_empty() || (prefix.len() <= 253 && prefix.split('.').all(is_dns_label));
        if !prefix_ok || !name_ok(name) {
            return Err(de::Error::custom(format!(
                "`{key}` is not a valid label key"
            )));
        }
        if !value.is_empty() && !name_ok(value) {
            return Err(de::Error::custom(format!(
                "`{value}` is not a valid label value (for `{key}`)"
            )));
        }
    }
    Ok(labels)
}
