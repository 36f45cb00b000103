//! `observer policy check` and `observer policy explain`: a policy file
//! checked offline, the rules that apply to one pod in words, and what they
//! decide for a connection. The decision is the kernel's own: the policies
//! are compiled for the pod and the kernel's entries are walked by
//! `observer_common::policy::decide`, with the connection classified by
//! `observer_common::classify` on the entries the kernel's maps
//! would hold ([`World`]).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::SocketAddrV4,
    path::Path,
};

use observer_common::{
    MAX_POD_RULES, POLICY_CIDRS_CAPACITY, classify, direction,
    inventory::{Inventory, Pod},
    ipv4_mapped,
    policy::{self, Connection},
    protocol, verdict,
};

use super::{
    Mode, Policies, PolicyError, Rule, Target,
    compile::{Capacity, Compiled, Compiler, Inputs, RuleName},
    model::words,
    rule_name,
};
use crate::{
    kernel::class_maps::ClassEntries,
    names::{CgroupIds, Ids, ObjectRef},
    pods::inventory::{self, InventoryError},
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("the inventory has no pod {0} (give NAMESPACE/NAME)")]
    NoPod(String),
    #[error("the pod has no container {0}")]
    NoContainer(String),
    #[error("{0}")]
    Path(String),
    #[error("{}: valid, but the kernel cannot hold it everywhere:\n  {}", path.display(), limits.join("\n  "))]
    Limits {
        path: std::path::PathBuf,
        limits: Vec<String>,
    },
}

/// Checks a file, and the limits it would hit in the kernel: a policy with
/// more rules than a pod holds; with an inventory, also that the Services
/// it names exist, and every pod's rules and the maps' room as the
/// observer would compile them. Returns a one-line summary.
pub fn check(path: &Path, inventory: Option<&Path>) -> Result<String, ExplainError> {
    let inventory = inventory.map(inventory::load).transpose()?;
    let services = inventory.as_ref().map(super::service_names);
    let policies = super::load(path, services.as_ref())?;
    let mut limits: Vec<String> = policies
        .policies
        .iter()
        .filter_map(|p| {
            // Unix rules are decided ahead, not walked by the kernel.
            let rules: usize = p
                .spec
                .rules
                .iter()
                .filter(|r| r.class != observer_common::class::UNIX)
                .map(|r| r.ports.len().max(1))
                .sum();
            (rules > MAX_POD_RULES).then(|| {
                format!(
                    "policy `{}`: {rules} rules in the kernel (one per port range), a pod holds at most {MAX_POD_RULES}: no pod it selects would be held to it",
                    p.metadata.name
                )
            })
        })
        .collect();
    // Each rule's CIDRs are one set, shared by the pods it applies to: the
    // file's sets together must fit the kernel's trie, whatever the pods.
    let cidrs: usize = policies
        .policies
        .iter()
        .flat_map(|p| &p.spec.rules)
        .map(|rule| match &rule.target {
            Target::Cidrs(cidrs) => cidrs.len(),
            _ => 0,
        })
        .sum();
    if cidrs > POLICY_CIDRS_CAPACITY as usize {
        limits.push(format!(
            "{cidrs} CIDRs in rules, the kernel holds at most {POLICY_CIDRS_CAPACITY}: pods whose rules do not fit would be held to none"
        ));
    }
    if let Some(inventory) = inventory {
        let attached = inventory
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| (ObjectRef::new(&p.namespace, &p.name), i as u64 + 1))
            .collect();
        let compiled = World::new(inventory).compile(&policies, &attached);
        limits.extend(compiled.problems);
    }
    if !limits.is_empty() {
        return Err(ExplainError::Limits {
            path: path.into(),
            limits,
        });
    }
    let rules: usize = policies.policies.iter().map(|p| p.spec.rules.len()).sum();
    Ok(format!(
        "{}: valid: {} policies, {rules} rules",
        path.display(),
        policies.policies.len()
    ))
}

/// A connection to decide, for `explain`.
pub struct Probe {
    pub to: ProbeTo,
    /// The client container.
    pub client: Option<String>,
}

/// Where a probed connection goes.
pub enum ProbeTo {
    /// An address and port, over TCP or UDP.
    Address { to: SocketAddrV4, udp: bool },
    /// A unix socket's path (`@name`: an abstract name).
    Unix(String),
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
    let world = World::new(inventory);
    let found = world
        .pod(namespace, name)
        .ok_or_else(|| ExplainError::NoPod(pod.into()))?;
    let mut out = describe(&policies, namespace, name, &found.labels);
    let Some(Probe { to, client }) = probe else {
        return Ok(out);
    };
    // What the probe is, who decides it, and a note on where it is decided.
    let (what, decision, undecided, note) = match to {
        ProbeTo::Unix(path) => {
            let what = format!(
                "unix socket {path} from {}",
                client.as_deref().unwrap_or("a container not named")
            );
            let decision = world.decide_unix(&policies, found, client.as_deref(), path)?;
            let note = "(decided at connect() and sendto(), on the path the client names: only `class: unix` rules decide unix sockets)";
            (what, decision, "no unix-socket rule decides it", Some(note))
        }
        ProbeTo::Address { to, udp } => {
            let (to, udp) = (*to, *udp);
            let connection = Connect {
                direction: direction::EGRESS,
                protocol: if udp { protocol::UDP } else { protocol::TCP },
                remote: to,
                port: to.port(),
                client: client.clone(),
                from_node_process: false,
            };
            let outcome = world.decide(&policies, found, &connection);
            let what = format!(
                "{} {} to {}",
                if udp { "UDP" } else { "TCP" },
                observer_common::class::name(outcome.class),
                to
            );
            let note = (outcome.class == observer_common::class::SERVICE).then_some(
                "(decided at connect(), on the ClusterIP the process asked for: before any translation, by kube-proxy, a socket load balancer or a sidecar's redirect)",
            );
            (what, outcome.decision, "no policy decides it", note)
        }
    };
    let _ = match decision {
        None => writeln!(out, "{what}: allowed ({undecided})"),
        Some((names, decided)) => writeln!(
            out,
            "{what}: {} by {}/{}",
            verdict_words(decided),
            names.policy,
            names.rule
        ),
    };
    if let Some(note) = note {
        let _ = writeln!(out, "{note}");
    }
    Ok(out)
}

/// What a verdict does, in words.
fn verdict_words(decided: u8) -> &'static str {
    match decided {
        verdict::DENY => "denied",
        verdict::AUDIT_DENY => "allowed, counted as a would-be denial (audit)",
        _ => "allowed",
    }
}

/// A connection of a pod, as the kernel sees it.
#[derive(Clone, Debug)]
pub struct Connect {
    /// `observer_common::direction`.
    pub direction: u8,
    /// An IP protocol number.
    pub protocol: u8,
    /// The other end: the destination of an egress connection, the client
    /// of an ingress one.
    pub remote: SocketAddrV4,
    /// The server's port (for ingress: the pod's).
    pub port: u16,
    /// The pod's client container (egress).
    pub client: Option<String>,
    /// Ingress: sent by a process of the node itself (the kubelet's probes).
    pub from_node_process: bool,
}

/// What the kernel would decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The remote end's class and id.
    pub class: u8,
    pub peer: u32,
    /// The rule that decided, and its verdict; `None`: no policy has a say.
    pub decision: Option<(RuleName, u8)>,
}

/// An inventory, with the ids and classification entries the kernel's maps
/// would hold for it, and cgroup ids for its containers (offline they need
/// not exist: they are numbered here).
pub struct World {
    inventory: Inventory,
    ids: Ids,
    entries: ClassEntries,
    cgroups: CgroupIds,
}

impl World {
    /// Offline: the containers' cgroups are numbered here.
    pub fn new(inventory: Inventory) -> Self {
        let cgroups: CgroupIds = inventory
            .pods
            .iter()
            .flat_map(|p| &p.containers)
            .enumerate()
            .map(|(i, c)| (c.cgroup.clone(), i as u64 + 1))
            .collect();
        Self::with_cgroups(inventory, cgroups)
    }

    /// With the containers' cgroup ids found on the node.
    pub fn with_cgroups(inventory: Inventory, cgroups: CgroupIds) -> Self {
        let mut ids = Ids::default();
        ids.update(&inventory, &cgroups);
        let entries = ClassEntries::new(&inventory, &ids);
        Self {
            inventory,
            ids,
            entries,
            cgroups,
        }
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.inventory
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// The ids the kernel's maps give pods, Services and nodes.
    pub fn ids(&self) -> &Ids {
        &self.ids
    }

    /// What the kernel's classification maps hold.
    pub fn class_entries(&self) -> &ClassEntries {
        &self.entries
    }

    /// The policies compiled for the `attached` pods (by namespace cookie).
    pub fn compile(&self, policies: &Policies, attached: &HashMap<ObjectRef, u64>) -> Compiled {
        Compiler::default().compile(&Inputs {
            policies,
            inventory: &self.inventory,
            attached,
            ids: &self.ids,
            cgroups: &self.cgroups,
            without_hooks: &HashMap::new(),
            own_netns: None,
            not_attached: &Default::default(),
            previous: &Default::default(),
            capacity: Capacity::default(),
            failure_mode: Default::default(),
            kept: &Default::default(),
            fails_open: &Default::default(),
            unix_hooks: true,
        })
    }

    /// A connection of `pod` as the kernel sees it.
    pub fn connection(&self, pod: &Pod, c: &Connect) -> Connection {
        let addr = ipv4_mapped(c.remote.ip().octets());
        let peer = if c.direction == direction::INGRESS {
            classify::remote(&self.entries, addr, c.remote.port(), c.protocol)
        } else {
            classify::destination(&self.entries, addr, c.remote.port(), c.protocol)
        };
        let cgroup = c
            .client
            .as_ref()
            .and_then(|name| pod.containers.iter().find(|x| &x.name == name))
            .and_then(|x| self.cgroups.get(&x.cgroup))
            .copied()
            .unwrap_or(0);
        Connection {
            direction: c.direction,
            class: peer.class,
            protocol: c.protocol,
            port: c.port,
            peer: peer.id,
            cgroup,
            addr,
            from_node_process: c.from_node_process,
        }
    }

    /// Decides a unix-socket connection of `pod`'s container `client` (or
    /// of a container not named) to `path`, as the kernel would: the
    /// decisions compiled for the pod, looked up in the kernel's order.
    pub fn decide_unix(
        &self,
        policies: &Policies,
        pod: &Pod,
        client: Option<&str>,
        path: &str,
    ) -> Result<Option<(RuleName, u8)>, ExplainError> {
        let (hash, name) = super::compile::unix_path_name(path)
            .ok_or_else(|| ExplainError::Path(super::model::unix_path(path).unwrap_err()))?;
        let cgroup = match client {
            Some(name) => {
                let container = pod
                    .containers
                    .iter()
                    .find(|c| c.name == name)
                    .ok_or_else(|| ExplainError::NoContainer(name.to_owned()))?;
                self.cgroups.get(&container.cgroup).copied().unwrap_or(0)
            }
            None => 0,
        };
        const COOKIE: u64 = 1;
        let attached = HashMap::from([(ObjectRef::new(&pod.namespace, &pod.name), COOKIE)]);
        let compiled = self.compile(policies, &attached);
        let unix = &compiled.entries.unix;
        // As the kernel: a path is a rule's only if its whole name is.
        let named = compiled
            .entries
            .unix_paths
            .get(&observer_common::ipc::UnixPathKey {
                netns: COOKIE,
                hash,
            });
        let path = if named == Some(&name) { hash } else { 0 };
        let found = policy::unix_decision(COOKIE, || (cgroup, path), |key| unix.get(key).copied());
        Ok(found
            .filter(|v| v.verdict != 0)
            .map(|v| (compiled.names[&v.rule].clone(), v.verdict)))
    }

    /// Decides a connection of `pod` as the kernel would.
    pub fn decide(&self, policies: &Policies, pod: &Pod, c: &Connect) -> Outcome {
        let connection = self.connection(pod, c);
        const COOKIE: u64 = 1;
        let attached = HashMap::from([(ObjectRef::new(&pod.namespace, &pod.name), COOKIE)]);
        let compiled = self.compile(policies, &attached);
        let decision = compiled
            .entries
            .pods
            .get(&COOKIE)
            .and_then(|entry| policy::decide(entry, &connection, &compiled.entries))
            .map(|d| (compiled.names[&d.rule].clone(), d.verdict));
        Outcome {
            class: connection.class,
            peer: connection.peer,
            decision,
        }
    }
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
        .find(|p| p.spec.default_action == verdict::DENY);
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
    let mut words = vec![words::word(&words::actions(), rule.action).to_owned()];
    match rule.class {
        observer_common::class::UNKNOWN => words.push("any traffic".into()),
        observer_common::class::LOCALHOST => words.push("localhost".into()),
        observer_common::class::UNIX => {
            words.push("unix socket".into());
            if !rule.paths.is_empty() {
                words.push(format!("to {}", rule.paths.join(", ")));
            }
        }
        class => words.push(format!(
            "{} {}",
            observer_common::class::name(class),
            direction::name(rule.direction)
        )),
    }
    if rule.protocol != 0 {
        words.push(words::word(&words::protocols(), rule.protocol).to_owned());
    }
    let (before_ports, after_ports) = rule.target.words();
    words.extend(before_ports);
    if !rule.ports.is_empty() {
        let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        words.push(format!("port {}", ports.join(", ")));
    }
    words.extend(after_ports);
    words.join(" ")
}
