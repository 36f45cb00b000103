//! What a user writes: `TrafficPolicy` objects, shaped like Kubernetes
//! objects so that they live in a ConfigMap (and, later, a CRD).
//!
//! Every check that can be made on the file alone is made while it is read,
//! so that the error carries the line (`try_from` raises it inside the rule
//! being read).

use std::{collections::BTreeMap, fmt, str::FromStr};

use ipnet::Ipv4Net;
use observer_common::{class, direction, verdict};
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
    /// What happens to traffic no rule matches: [`verdict::ALLOW`] or
    /// [`verdict::DENY`].
    #[serde(default = "allow", deserialize_with = "action_word")]
    pub default_action: u8,
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

/// What a rule's fields mean in the kernel's vocabulary: each word a user
/// writes stands for the number the kernel's rules hold.
pub mod words {
    use observer_common::{class, direction, inventory::Protocol, verdict};

    /// `class:` any, or a traffic class.
    pub fn classes() -> Vec<(&'static str, u8)> {
        let mut words = vec![("any", class::UNKNOWN)];
        words.extend((class::LOCALHOST..=class::EXTERNAL).map(|c| (class::name(c), c)));
        words
    }

    /// `direction:`.
    pub fn directions() -> Vec<(&'static str, u8)> {
        [direction::EGRESS, direction::INGRESS]
            .map(|d| (direction::name(d), d))
            .into()
    }

    /// `protocol:` any, or a protocol as Kubernetes spells it.
    pub fn protocols() -> Vec<(&'static str, u8)> {
        let mut words = vec![("any", 0)];
        words
            .extend([Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|p| (p.name(), p.number())));
        words
    }

    /// `action:` and `defaultAction:`.
    pub fn actions() -> Vec<(&'static str, u8)> {
        [verdict::ALLOW, verdict::DENY]
            .map(|v| (verdict::name(v), v))
            .into()
    }

    /// The word for `number` among `words`.
    pub fn word(words: &[(&'static str, u8)], number: u8) -> &'static str {
        words
            .iter()
            .find(|(_, n)| *n == number)
            .map_or("?", |(w, _)| w)
    }
}

/// Reads a word of `words` as its number.
fn word<'de, D: Deserializer<'de>>(
    deserializer: D,
    what: &str,
    words: Vec<(&'static str, u8)>,
) -> Result<u8, D::Error> {
    let text = String::deserialize(deserializer)?;
    words
        .iter()
        .find(|(w, _)| *w == text)
        .map(|(_, n)| *n)
        .ok_or_else(|| {
            let known: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
            de::Error::custom(format!(
                "unknown variant `{text}` for `{what}`, expected one of {}",
                known.join(", ")
            ))
        })
}

fn class_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "class", words::classes())
}

fn direction_word<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    word(d, "direction", words::directions()).map(Some)
}

fn protocol_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "protocol", words::protocols())
}

fn action_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "action", words::actions())
}

const fn allow() -> u8 {
    verdict::ALLOW
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

/// One rule, checked when read. Its fields hold the kernel's numbers
/// ([`observer_common`]'s vocabulary), as the compiled rule will.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRule")]
pub struct Rule {
    pub name: Option<String>,
    /// A traffic class; [`class::UNKNOWN`]: any.
    pub class: u8,
    /// [`direction::EGRESS`] or [`direction::INGRESS`].
    pub direction: u8,
    /// An IP protocol number; 0: any.
    pub protocol: u8,
    /// Server ports; empty: any.
    pub ports: Vec<PortRange>,
    /// Who or what else the rule is about.
    pub target: Target,
    /// [`verdict::ALLOW`] or [`verdict::DENY`].
    pub action: u8,
}

/// What a rule is about beyond class, direction, protocol and ports: the
/// kernel's set kinds ([`observer_common::set_kind`]), one to one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Any,
    /// Localhost: only these client containers.
    Clients(Vec<String>),
    /// Localhost: any client container but these.
    NotClients(Vec<String>),
    /// Pod traffic: the peer pods.
    Peers(Selector),
    /// Service traffic: this Service.
    Service(ServiceRef),
    /// External traffic: these destinations.
    Cidrs(Vec<Ipv4Net>),
}

impl Target {
    /// The field a user writes it with, and the only class it can match.
    pub fn field_and_class(&self) -> Option<(&'static str, u8)> {
        match self {
            Self::Any => None,
            Self::Clients(_) => Some(("clientContainers", class::LOCALHOST)),
            Self::NotClients(_) => Some(("notClientContainers", class::LOCALHOST)),
            Self::Peers(_) => Some(("peer", class::POD)),
            Self::Service(_) => Some(("service", class::SERVICE)),
            Self::Cidrs(_) => Some(("cidrs", class::EXTERNAL)),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawRule {
    #[serde(default, deserialize_with = "optional_dns_label")]
    name: Option<String>,
    #[serde(default, deserialize_with = "class_word")]
    class: u8,
    #[serde(default, deserialize_with = "direction_word")]
    direction: Option<u8>,
    #[serde(default, deserialize_with = "protocol_word")]
    protocol: u8,
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
    #[serde(deserialize_with = "action_word")]
    action: u8,
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    /// Refuses rules that could never match anything.
    fn try_from(raw: RawRule) -> Result<Self, String> {
        if raw.ports.as_ref().is_some_and(Vec::is_empty) {
            return Err("`ports: []` matches no port: leave `ports` out for any port".into());
        }
        if raw.cidrs.as_ref().is_some_and(Vec::is_empty) {
            return Err("`cidrs: []` matches no address: leave `cidrs` out for any".into());
        }
        if raw.client_containers.as_ref().is_some_and(Vec::is_empty) {
            return Err(
                "`clientContainers: []` matches no client: this rule could never match".into(),
            );
        }
        let targets = [
            raw.client_containers.map(Target::Clients),
            raw.not_client_containers.map(Target::NotClients),
            raw.peer.map(Target::Peers),
            raw.service.map(Target::Service),
            raw.cidrs.map(Target::Cidrs),
        ];
        let mut given = targets.into_iter().flatten();
        let target = given.next().unwrap_or(Target::Any);
        if let Some(other) = given.next() {
            let (first, _) = target.field_and_class().expect("given");
            let (second, _) = other.field_and_class().expect("given");
            return Err(format!("give `{first}` or `{second}`, not both"));
        }
        let class = raw.class;
        if let Some((field, only)) = target.field_and_class()
            && class != only
        {
            return Err(format!(
                "`{field}` is for `class: {}` rules only: this rule could never match",
                class::name(only)
            ));
        }
        let direction = match (class, raw.direction) {
            (class::LOCALHOST, Some(_)) => {
                return Err(
                    "`direction` does not apply to localhost traffic (it never leaves the pod): leave it out"
                        .into(),
                );
            }
            // The pod's side sees a Service's ClusterIP only on the way out;
            // what comes in through a Service arrives as pod traffic.
            (class::SERVICE, Some(direction::INGRESS)) => {
                return Err("`class: service` with `direction: ingress` could never match: traffic into a pod through a Service is `class: pod` on arrival".into());
            }
            (_, direction) => direction.unwrap_or(direction::EGRESS),
        };
        Ok(Self {
            name: raw.name,
            class,
            direction,
            protocol: raw.protocol,
            ports: raw.ports.unwrap_or_default(),
            target,
            action: raw.action,
        })
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
