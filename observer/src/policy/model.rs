//! What a user writes: `TrafficPolicy` objects, shaped like Kubernetes
//! objects so that they live in a ConfigMap (and, later, a CRD).
//!
//! Every check that can be made on the file alone is made while it is read,
//! so that the error carries the line (`try_from` raises it inside the rule
//! being read).

use std::{collections::BTreeMap, fmt, str::FromStr};

use ipnet::Ipv4Net;
use observer_common::{class, direction};
use serde::{Deserialize, Deserializer, de};

pub use super::fields::words;
use super::fields::{
    action_word, allow, api_version, class_word, direction_word, dns_label, kind, labels,
    optional_dns_label, protocol_word,
};

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
    /// While no observer runs (a restart, an upgrade): `open` (nothing is
    /// enforced) or `closed` (the programs and the policy stay in the
    /// kernel). Unset: the observer's `--failure-mode`.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// Tried in order; the first that matches decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// What a policy does while no observer runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Nothing is enforced until an observer is back: traffic is never held
    /// up by a policy nobody maintains.
    #[default]
    Open,
    /// The pod's programs and its compiled policy stay in the kernel (pinned
    /// on the node) until the next observer takes them over.
    Closed,
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
    /// `class: unix`: the socket paths (`/run/app.sock`, or `@name` for an
    /// abstract name) as clients name them; empty: any path.
    pub paths: Vec<String>,
    /// [`verdict::ALLOW`] or [`verdict::DENY`].
    pub action: u8,
}

/// What a rule is about beyond class, direction, protocol and ports: the
/// kernel's set kinds ([`observer_common::set_kind`]), one to one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Any,
    /// Localhost and unix sockets: only these client containers.
    Clients(Vec<String>),
    /// Localhost and unix sockets: any client container but these.
    NotClients(Vec<String>),
    /// Pod traffic: the peer pods.
    Peers(Selector),
    /// Service traffic: this Service.
    Service(ServiceRef),
    /// External traffic: these destinations.
    Cidrs(Vec<Ipv4Net>),
}

impl Target {
    /// The target in words, for `observer policy explain`: what comes
    /// after the class and protocol, and what comes after the ports.
    pub fn words(&self) -> (Option<String>, Option<String>) {
        match self {
            Self::Any => (None, None),
            Self::Service(service) => (
                Some(format!("to Service {}/{}", service.namespace, service.name)),
                None,
            ),
            Self::Peers(peer) => {
                let mut what = vec![format!(
                    "namespace {}",
                    peer.namespace.as_deref().unwrap_or("any")
                )];
                what.extend(peer.match_labels.iter().map(|(k, v)| format!("{k}={v}")));
                (Some(format!("with pods of {}", what.join(", "))), None)
            }
            Self::Cidrs(cidrs) => {
                let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                (Some(format!("to {}", cidrs.join(", "))), None)
            }
            Self::Clients(names) => (None, Some(format!("from {}", names.join(", ")))),
            Self::NotClients(names) => (
                None,
                Some(format!("from containers other than {}", names.join(", "))),
            ),
        }
    }

    /// The field a user writes it with, and the only classes it can match.
    pub fn field_and_classes(&self) -> Option<(&'static str, &'static [u8])> {
        const CONTAINERS: &[u8] = &[class::LOCALHOST, class::UNIX];
        match self {
            Self::Any => None,
            Self::Clients(_) => Some(("clientContainers", CONTAINERS)),
            Self::NotClients(_) => Some(("notClientContainers", CONTAINERS)),
            Self::Peers(_) => Some(("peer", &[class::POD])),
            Self::Service(_) => Some(("service", &[class::SERVICE])),
            Self::Cidrs(_) => Some(("cidrs", &[class::EXTERNAL])),
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
    #[serde(default)]
    paths: Option<Vec<String>>,
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
            let (first, _) = target.field_and_classes().expect("given");
            let (second, _) = other.field_and_classes().expect("given");
            return Err(format!("give `{first}` or `{second}`, not both"));
        }
        let class = raw.class;
        if let Some((field, only)) = target.field_and_classes()
            && !only.contains(&class)
        {
            let only: Vec<String> = only
                .iter()
                .map(|c| format!("`class: {}`", class::name(*c)))
                .collect();
            return Err(format!(
                "`{field}` is for {} rules only: this rule could never match",
                only.join(" and ")
            ));
        }
        let paths = match (class, raw.paths) {
            (_, Some(paths)) if paths.is_empty() => {
                return Err("`paths: []` matches no path: leave `paths` out for any".into());
            }
            (class::UNIX, Some(paths)) => {
                for path in &paths {
                    unix_path(path)?;
                }
                paths
            }
            (_, Some(_)) => {
                return Err(
                    "`paths` is for `class: unix` rules only: this rule could never match".into(),
                );
            }
            (_, None) => Vec::new(),
        };
        if class == class::UNIX {
            // A unix socket has no port, protocol or way out of the pod.
            let refused = [
                ("ports", raw.ports.is_some()),
                ("protocol", raw.protocol != 0),
                ("direction", raw.direction.is_some()),
            ];
            if let Some((field, _)) = refused.iter().find(|(_, given)| *given) {
                return Err(format!(
                    "`{field}` does not apply to unix sockets (`paths` and the client containers do): leave it out"
                ));
            }
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
            paths,
            action: raw.action,
        })
    }
}

/// A unix socket path as a rule names it: absolute (`/run/app.sock`), or an
/// abstract name (`@name`, the kernel's leading NUL byte written as `@`),
/// in at most the 108 bytes of `sun_path`. Returns its bytes as the kernel
/// sees them (an abstract name with its leading 0).
pub fn unix_path(path: &str) -> Result<Vec<u8>, String> {
    use observer_common::ipc::UNIX_PATH_MAX;
    let bytes: Vec<u8> = match path.strip_prefix('@') {
        Some(name) => [0].into_iter().chain(name.bytes()).collect(),
        None if path.starts_with('/') => path.bytes().collect(),
        None => {
            return Err(format!(
                "path `{path}`: give an absolute path, or `@name` for an abstract socket (a relative path depends on the client's working directory)"
            ));
        }
    };
    if path.contains('\0') {
        return Err(format!("path `{}` has a NUL byte", path.escape_debug()));
    }
    // A file path needs room for its NUL.
    let room = if bytes.first() == Some(&0) {
        UNIX_PATH_MAX
    } else {
        UNIX_PATH_MAX - 1
    };
    if bytes.len() > room || bytes.len() < 2 {
        return Err(format!(
            "path `{path}`: a unix socket path has 2 to {} bytes (`/` alone is a directory)",
            UNIX_PATH_MAX - 1
        ));
    }
    Ok(bytes)
}
