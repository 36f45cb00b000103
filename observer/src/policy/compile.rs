//! Policies to kernel entries: for every attached pod, the rules that
//! select it, in the order they are tried, as fixed-size entries the
//! kernel walks; client containers, peer pods and CIDRs as set members.
//! A pure function of its inputs: everything it needs comes in [`Inputs`].
//!
//! How rules combine (what `observer_common::policy::decide` then does with
//! the entries): the policies selecting a pod are tried by name, the rules
//! of each in order; the first rule that matches decides. Without a match,
//! the first policy (by name) whose `defaultAction` is `deny` decides (for
//! inbound connections: the first such policy that has ingress rules); else
//! the traffic is allowed and no policy has a say.
//!
//! The kernel decides egress and localhost rules at `connect()` and UDP
//! `sendmsg()`, ingress rules at the first packet of an inbound connection
//! on `eth0`.

use std::collections::{BTreeSet, HashMap, HashSet};

use observer_common::{
    MAX_POD_RULES, MemberKey, POLICIES_CAPACITY, POLICY_CIDRS_CAPACITY, POLICY_MEMBERS_CAPACITY,
    PodPolicy, PolicyRule, inventory::Inventory, ipv4_mapped, policy::rule_direction,
    policy_cidr_key, set_kind, verdict,
};

use super::{Mode, Policies, Target, TrafficPolicy, rule_name};
use crate::{
    kernel::policy_maps::PolicyEntries,
    names::{CgroupIds, IdTable, Ids, ObjectRef},
};

/// A rule's names, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleName {
    pub policy: String,
    /// The rule, or `default`.
    pub rule: String,
}

/// What the kernel maps should hold, and what it means.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub entries: PolicyEntries,
    /// The names of the rule ids in the entries.
    pub names: HashMap<u32, RuleName>,
    /// What could not be compiled, for the log.
    pub problems: Vec<String>,
    /// Pods a policy selects that it does not (fully) hold, and why.
    pub unenforced: BTreeSet<(ObjectRef, Unenforced)>,
}

/// Why a pod that a policy selects is not (fully) held to it: the values
/// of `observer_policy_unenforced_pods{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unenforced {
    /// More rules (one per port range) than the kernel holds for a pod: no
    /// policy applies to it.
    TooManyRules,
    /// A policy map has no room for the pod's entries: no policy applies.
    MapFull,
    /// The socket hooks could not be attached to the pod's cgroup: its
    /// egress and localhost rules do not apply (ingress rules do).
    NoHooks,
    /// The pod's cgroup, or that of a container a rule names, is not known
    /// yet: its hooks, or that rule for that container, wait for it.
    NoCgroup,
    /// A rule names a Service that does not exist (yet): that rule waits.
    UnknownService,
}

impl Unenforced {
    pub const ALL: [Self; 5] = [
        Self::TooManyRules,
        Self::MapFull,
        Self::NoHooks,
        Self::NoCgroup,
        Self::UnknownService,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TooManyRules => "too_many_rules",
            Self::MapFull => "map_full",
            Self::NoHooks => "no_hooks",
            Self::NoCgroup => "no_cgroup",
            Self::UnknownService => "unknown_service",
        }
    }

    /// Whether it can go away without a change of the policy or the
    /// cluster (retried on a timer).
    pub const fn retried(self) -> bool {
        matches!(self, Self::NoHooks | Self::NoCgroup)
    }
}

/// How many entries each policy map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub pods: usize,
    pub members: usize,
    pub cidrs: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            pods: POLICIES_CAPACITY as usize,
            members: POLICY_MEMBERS_CAPACITY as usize,
            cidrs: POLICY_CIDRS_CAPACITY as usize,
        }
    }
}

/// Everything a compilation reads.
pub struct Inputs<'a> {
    pub policies: &'a Policies,
    /// Pods (with labels and containers), Services.
    pub inventory: &'a Inventory,
    /// The pods attached, by namespace cookie: those get entries.
    pub attached: &'a HashMap<ObjectRef, u64>,
    /// The ids the classification maps give pods and Services.
    pub ids: &'a Ids,
    /// The containers' cgroup ids.
    pub cgroups: &'a CgroupIds,
    /// Attached pods (by namespace cookie) without socket hooks, and why:
    /// [`Unenforced::NoHooks`] or [`Unenforced::NoCgroup`].
    pub without_hooks: &'a HashMap<u64, Unenforced>,
    /// The observer's own namespace: never held to a policy, so that no
    /// selector can cut the observer off from the API server.
    pub own_netns: Option<u64>,
    pub capacity: Capacity,
}

/// Compiles with ids that stay the same across compilations, and are never
/// reused. A rule's set is named by the rule's id and shared by every pod
/// the rule applies to (cgroup and pod ids are unique node- and
/// cluster-wide), so that no entry ever points at a set meant for another
/// rule while the maps are being updated, and a set is stored once.
#[derive(Debug, Default)]
pub struct Compiler {
    rules: IdTable<RuleName>,
}

impl Compiler {
    /// Compiles the policies for the attached pods.
    pub fn compile(&mut self, inputs: &Inputs) -> Compiled {
        let mut out = Compiled::default();
        // Forget what is gone (ids are never reused).
        let names: HashSet<(&str, String)> = inputs
            .policies
            .policies
            .iter()
            .flat_map(|p| {
                let rules = p.spec.rules.iter().enumerate();
                rules
                    .map(|(i, r)| (p.metadata.name.as_str(), rule_name(r, i)))
                    .chain([(p.metadata.name.as_str(), "default".to_owned())])
            })
            .collect();
        self.rules
            .retain(|n| names.contains(&(n.policy.as_str(), n.rule.clone())));
        for pod in &inputs.inventory.pods {
            let pod_ref = ObjectRef::new(&pod.namespace, &pod.name);
            let Some(&cookie) = inputs.attached.get(&pod_ref) else {
                continue;
            };
            if inputs.own_netns == Some(cookie) {
                continue;
            }
            let selected = inputs.policies.for_pod(&pod.namespace, &pod.labels);
            if selected.is_empty() {
                continue;
            }
            let mut unenforced = |reason| {
                out.unenforced.insert((pod_ref.clone(), reason));
            };
            if let Some(&reason) = inputs.without_hooks.get(&cookie) {
                unenforced(reason);
            }
            // This pod's set members and CIDRs, added once they fit.
            let mut entries = PolicyEntries::default();
            let mut rules = Vec::new();
            for policy in &selected {
                for (i, rule) in policy.spec.rules.iter().enumerate() {
                    let names = RuleName {
                        policy: policy.metadata.name.clone(),
                        rule: rule_name(rule, i),
                    };
                    let id = self.rules.id(&names);
                    out.names.insert(id, names);
                    let mut base = PolicyRule {
                        id,
                        class: rule.class,
                        protocol: rule.protocol,
                        action: rule.action,
                        audit: u8::from(policy.spec.mode == Mode::Audit),
                        direction: rule_direction(
                            rule.class,
                            rule.direction == observer_common::direction::INGRESS,
                        ),
                        port_first: 0,
                        port_last: u16::MAX,
                        ..PolicyRule::default()
                    };
                    // A set is named by its rule: `set` is the rule's id.
                    let set = id;
                    match &rule.target {
                        Target::Any => {}
                        Target::Clients(names) | Target::NotClients(names) => {
                            base.set_kind = match rule.target {
                                Target::Clients(_) => set_kind::CLIENTS,
                                _ => set_kind::NOT_CLIENTS,
                            };
                            base.set = set;
                            let containers =
                                pod.containers.iter().filter(|c| names.contains(&c.name));
                            for container in containers {
                                match inputs.cgroups.get(&container.cgroup) {
                                    Some(cgroup) => {
                                        entries.members.insert(MemberKey::new(set, *cgroup));
                                    }
                                    None => unenforced(Unenforced::NoCgroup),
                                }
                            }
                        }
                        Target::Peers(peer) => {
                            base.set_kind = set_kind::PEERS;
                            base.set = set;
                            let peers = inputs
                                .inventory
                                .pods
                                .iter()
                                .filter(|p| peer.matches(&p.namespace, &p.labels));
                            for other in peers {
                                let other = ObjectRef::new(&other.namespace, &other.name);
                                if let Some(peer_id) = inputs.ids.pods.get(&other) {
                                    entries
                                        .members
                                        .insert(MemberKey::new(set, u64::from(peer_id)));
                                }
                            }
                        }
                        Target::Service(service) => {
                            let service = ObjectRef::new(&service.namespace, &service.name);
                            // A Service that does not exist (yet) matches
                            // nothing: the rule waits for it.
                            let Some(service_id) = inputs.ids.services.get(&service) else {
                                unenforced(Unenforced::UnknownService);
                                continue;
                            };
                            base.set_kind = set_kind::SERVICE;
                            base.set = service_id;
                        }
                        Target::Cidrs(cidrs) => {
                            base.set_kind = set_kind::CIDRS;
                            base.set = set;
                            for net in cidrs {
                                let addr = ipv4_mapped(net.network().octets());
                                let prefix = 32 + 96 + u32::from(net.prefix_len());
                                entries.cidrs.insert((prefix, policy_cidr_key(set, addr)));
                            }
                        }
                    }
                    if rule.ports.is_empty() {
                        rules.push(base);
                    }
                    for range in &rule.ports {
                        rules.push(PolicyRule {
                            port_first: range.first,
                            port_last: range.last,
                            ..base
                        });
                    }
                }
            }
            if rules.len() > MAX_POD_RULES {
                out.problems.push(format!(
                    "pod {}/{}: {} rules (one per port range), at most {MAX_POD_RULES}: no policy applies to it",
                    pod.namespace,
                    pod.name,
                    rules.len()
                ));
                unenforced(Unenforced::TooManyRules);
                continue;
            }
            let new_members = entries.members.difference(&out.entries.members).count();
            let new_cidrs = entries.cidrs.difference(&out.entries.cidrs).count();
            if out.entries.pods.len() + 1 > inputs.capacity.pods
                || out.entries.members.len() + new_members > inputs.capacity.members
                || out.entries.cidrs.len() + new_cidrs > inputs.capacity.cidrs
            {
                out.problems.push(format!(
                    "pod {}/{}: the policy maps are full (at most {} pods, {} set members, {} CIDRs): no policy applies to it",
                    pod.namespace,
                    pod.name,
                    inputs.capacity.pods,
                    inputs.capacity.members,
                    inputs.capacity.cidrs,
                ));
                unenforced(Unenforced::MapFull);
                continue;
            }
            out.entries.members.extend(entries.members);
            out.entries.cidrs.extend(entries.cidrs);
            let mut entry = PodPolicy {
                default_action: verdict::ALLOW,
                default_ingress_action: verdict::ALLOW,
                addr: ipv4_mapped(pod.ip.octets()),
                ..PodPolicy::default()
            };
            for ingress in [false, true] {
                let Some(policy) = selected.iter().find(|p| {
                    p.spec.default_action == verdict::DENY && (!ingress || has_ingress(p))
                }) else {
                    continue;
                };
                let names = RuleName {
                    policy: policy.metadata.name.clone(),
                    rule: "default".into(),
                };
                let id = self.rules.id(&names);
                out.names.insert(id, names);
                let audit = u8::from(policy.spec.mode == Mode::Audit);
                if ingress {
                    entry.default_ingress_id = id;
                    entry.default_ingress_action = verdict::DENY;
                    entry.default_ingress_audit = audit;
                } else {
                    entry.default_id = id;
                    entry.default_action = verdict::DENY;
                    entry.default_audit = audit;
                }
            }
            entry.rules = rules.len() as u32;
            entry.rule[..rules.len()].copy_from_slice(&rules);
            out.entries.pods.insert(cookie, entry);
        }
        out
    }
}

/// A policy's default covers ingress only if it has ingress rules: a policy
/// about what a pod sends leaves what it receives alone.
pub fn has_ingress(policy: &TrafficPolicy) -> bool {
    policy.spec.rules.iter().any(|r| {
        rule_direction(r.class, r.direction == observer_common::direction::INGRESS)
            == observer_common::direction::INGRESS
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use observer_common::{
        direction,
        inventory::{INVENTORY_VERSION, Pod},
    };

    use super::*;
    use crate::policy::parse;

    fn compile(
        compiler: &mut Compiler,
        policies: &Policies,
        inventory: &Inventory,
        attached: &HashMap<ObjectRef, u64>,
    ) -> Compiled {
        compiler.compile(&Inputs {
            policies,
            inventory,
            attached,
            ids: &Ids::default(),
            cgroups: &CgroupIds::default(),
            without_hooks: &HashMap::new(),
            own_netns: None,
            capacity: Capacity::default(),
        })
    }

    fn reasons(compiled: &Compiled) -> Vec<(&str, &'static str)> {
        compiled
            .unenforced
            .iter()
            .map(|(pod, reason)| (pod.name.as_str(), reason.as_str()))
            .collect()
    }

    fn pod(name: &str) -> Pod {
        Pod {
            namespace: "default".into(),
            name: name.into(),
            uid: name.into(),
            node: "node-1".into(),
            labels: BTreeMap::from([("app".into(), "x".into())]),
            ip: "10.244.1.5".parse().unwrap(),
            netns: None,
            containers: Vec::new(),
        }
    }

    fn inventory(pods: Vec<Pod>) -> Inventory {
        Inventory {
            version: INVENTORY_VERSION,
            cluster: String::new(),
            pod_cidrs: Vec::new(),
            service_cidr: None,
            nodes: Vec::new(),
            pods,
            services: Vec::new(),
            external_hosts: Vec::new(),
        }
    }

    const POLICY: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabels: {app: x}}
  mode: enforce
  defaultAction: deny
  rules:
  - {name: a, class: localhost, ports: [80, \"8000-8100\"], clientContainers: [c], action: allow}
  - {name: b, class: pod, direction: ingress, peer: {namespace: y}, action: deny}
";

    #[test]
    fn rules_expand_per_port_range_in_order_with_stable_ids() {
        let policies = parse(POLICY).unwrap();
        let mut compiler = Compiler::default();
        let b = HashMap::from([(ObjectRef::new("default", "b"), 2u64)]);
        let first = compile(&mut compiler, &policies, &inventory(vec![pod("b")]), &b);
        let entry = first.entries.pods[&2];
        assert_eq!(entry.rules, 3, "two port ranges, then the ingress rule");
        assert_eq!(
            (entry.rule[0].port_first, entry.rule[0].port_last),
            (80, 80)
        );
        assert_eq!(
            (entry.rule[1].port_first, entry.rule[1].port_last),
            (8000, 8100)
        );
        assert_eq!(entry.rule[2].direction, direction::INGRESS);
        assert_eq!(entry.default_action, verdict::DENY);
        assert_eq!(
            entry.default_ingress_action,
            verdict::DENY,
            "the policy has ingress rules"
        );

        // Another pod comes first in the inventory: b keeps its sets.
        let both = HashMap::from([
            (ObjectRef::new("default", "a"), 1u64),
            (ObjectRef::new("default", "b"), 2u64),
        ]);
        let second = compile(
            &mut compiler,
            &policies,
            &inventory(vec![pod("a"), pod("b")]),
            &both,
        );
        assert_eq!(second.entries.pods[&2], entry);
        assert_eq!(
            second.entries.pods[&1].rule[0].set, entry.rule[0].set,
            "one set per rule"
        );
    }

    #[test]
    fn an_egress_only_policy_leaves_ingress_alone_and_too_many_rules_are_reported() {
        let egress_only = POLICY.replace("direction: ingress", "direction: egress");
        let policies = parse(&egress_only).unwrap();
        let pods = HashMap::from([(ObjectRef::new("default", "b"), 2u64)]);
        let compiled = compile(
            &mut Compiler::default(),
            &policies,
            &inventory(vec![pod("b")]),
            &pods,
        );
        assert_eq!(
            compiled.entries.pods[&2].default_ingress_action,
            verdict::ALLOW
        );

        let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let many = POLICY.replace("[80, \"8000-8100\"]", &format!("[{}]", ports.join(", ")));
        let policies = parse(&many).unwrap();
        let compiled = compile(
            &mut Compiler::default(),
            &policies,
            &inventory(vec![pod("b")]),
            &pods,
        );
        assert!(compiled.entries.pods.is_empty());
        assert!(
            compiled.problems[0].contains("at most 16"),
            "{:?}",
            compiled.problems
        );
        assert_eq!(reasons(&compiled), [("b", "too_many_rules")]);
    }

    const CLIENTS_AND_SERVICE: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabels: {app: x}}
  mode: enforce
  rules:
  - {name: a, class: localhost, clientContainers: [c], action: allow}
  - {name: s, class: service, service: {namespace: default, name: later}, action: deny}
  - {name: e, class: external, cidrs: [192.0.2.0/24, 198.51.100.0/24], action: deny}
";

    #[test]
    fn every_pod_a_policy_does_not_fully_hold_is_told_with_its_reason() {
        let policies = parse(CLIENTS_AND_SERVICE).unwrap();
        let mut with_container = pod("b");
        with_container.containers = vec![observer_common::inventory::Container {
            name: "c".into(),
            id: "1".into(),
            cgroup: "/cg/b/c".into(),
            ports: Vec::new(),
        }];
        let inventory = inventory(vec![pod("a"), with_container, pod("own"), pod("hooks")]);
        let attached = HashMap::from([
            (ObjectRef::new("default", "a"), 1u64),
            (ObjectRef::new("default", "b"), 2),
            (ObjectRef::new("default", "own"), 3),
            (ObjectRef::new("default", "hooks"), 4),
        ]);
        let without_hooks = HashMap::from([(4u64, Unenforced::NoHooks)]);
        let mut inputs = Inputs {
            policies: &policies,
            inventory: &inventory,
            attached: &attached,
            ids: &Ids::default(),
            cgroups: &CgroupIds::default(),
            without_hooks: &without_hooks,
            own_netns: Some(3),
            capacity: Capacity::default(),
        };
        let compiled = Compiler::default().compile(&inputs);
        // The Service rule waits, the rest holds; b's container has no
        // cgroup yet; the observer's own pod is never selected.
        assert_eq!(
            reasons(&compiled),
            [
                ("a", "unknown_service"),
                ("b", "no_cgroup"),
                ("b", "unknown_service"),
                ("hooks", "no_hooks"),
                ("hooks", "unknown_service"),
            ]
        );
        assert_eq!(compiled.entries.pods.len(), 3, "a, b and hooks");
        assert!(!compiled.entries.pods.contains_key(&3));
        assert_eq!(compiled.entries.pods[&1].rules, 2, "a and e; s waits");

        // Room for two CIDRs (one rule's): every pod shares the set.
        inputs.capacity.cidrs = 2;
        inputs.capacity.pods = 2;
        let compiled = Compiler::default().compile(&inputs);
        assert_eq!(compiled.entries.pods.len(), 2);
        assert!(
            compiled
                .unenforced
                .contains(&(ObjectRef::new("default", "hooks"), Unenforced::MapFull)),
            "{:?}",
            compiled.unenforced
        );
        inputs.capacity = Capacity {
            cidrs: 1,
            ..Capacity::default()
        };
        let compiled = Compiler::default().compile(&inputs);
        assert!(compiled.entries.pods.is_empty(), "no pod's CIDRs fit");
        assert_eq!(
            compiled
                .unenforced
                .iter()
                .filter(|(_, r)| *r == Unenforced::MapFull)
                .count(),
            3
        );
    }
}
