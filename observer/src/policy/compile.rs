//! Policies to kernel maps: for every attached pod, the rules that select
//! it, in the order they are tried, as fixed-size entries the socket hooks
//! walk; client containers, peer pods and CIDRs as set members.
//!
//! The kernel decides egress and localhost rules at `connect()` and UDP
//! `sendmsg()`, ingress rules at the first packet of an inbound TCP
//! connection on `eth0`.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
};

use observer_common::{
    MAX_POD_RULES, MemberKey, PodPolicy, PolicyRule, class, direction, inventory::Inventory,
    set_kind, verdict,
};

use super::{
    Action, Class, Direction, Mode, Policies, Protocol,
    model::{Containers, class_name},
    rule_name,
};
use crate::identities::{IdTable, ObjectRef};

/// A rule's names, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleName {
    pub policy: String,
    /// The rule, or `default`.
    pub rule: String,
}

/// What the kernel maps should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// By network namespace cookie.
    pub pods: HashMap<u64, PodPolicy>,
    pub members: HashSet<MemberKey>,
    /// (prefix length, set id and address) of the LPM trie.
    pub cidrs: HashSet<(u32, [u8; 8])>,
    pub names: HashMap<u32, RuleName>,
    /// What could not be compiled, for the log.
    pub problems: Vec<String>,
}

/// Ids for everything the daemon names in the kernel.
pub trait Ids {
    fn service(&self, service: &ObjectRef) -> Option<u32>;
    fn pod(&self, pod: &ObjectRef) -> Option<u32>;
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
    /// Compiles `policies` for the `attached` pods (by namespace cookie).
    pub fn compile(
        &mut self,
        policies: &Policies,
        inventory: &Inventory,
        attached: &HashMap<ObjectRef, u64>,
        ids: &impl Ids,
    ) -> Compiled {
        let mut out = Compiled::default();
        // Forget what is gone (ids are never reused).
        let names: HashSet<(&str, String)> = policies
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
        for pod in &inventory.pods {
            let pod_ref = ObjectRef::new(&pod.namespace, &pod.name);
            let Some(&cookie) = attached.get(&pod_ref) else {
                continue;
            };
            let selected = policies.for_pod(&pod.namespace, &pod.labels);
            if selected.is_empty() {
                continue;
            }
            let mut entry = PodPolicy {
                default_action: verdict::ALLOW,
                default_ingress_action: verdict::ALLOW,
                ..PodPolicy::default()
            };
            let mut rules = Vec::new();
            for policy in &selected {
                let audit = u8::from(policy.spec.mode == Mode::Audit);
                for (i, rule) in policy.spec.rules.iter().enumerate() {
                    let names = RuleName {
                        policy: policy.metadata.name.clone(),
                        rule: rule_name(rule, i),
                    };
                    let id = self.rules.id(&names);
                    out.names.insert(id, names);
                    let mut base = PolicyRule {
                        class: kernel_class(rule.class),
                        protocol: match rule.protocol {
                            Protocol::Any => 0,
                            Protocol::Tcp => 6,
                            Protocol::Udp => 17,
                            Protocol::Sctp => 132,
                        },
                        action: match rule.action {
                            Action::Allow => verdict::ALLOW,
                            Action::Deny => verdict::DENY,
                        },
                        audit,
                        direction: if rule.class != Class::Localhost
                            && rule.direction == Direction::Ingress
                        {
                            direction::INGRESS
                        } else {
                            direction::EGRESS
                        },
                        port_first: 0,
                        port_last: u16::MAX,
                        id,
                        ..PolicyRule::default()
                    };
                    if let Some(service) = &rule.service {
                        let service = ObjectRef::new(&service.namespace, &service.name);
                        // A Service that is gone matches nothing.
                        let Some(service_id) = ids.service(&service) else {
                            continue;
                        };
                        base.service = service_id;
                    }
                    if let Some(clients) = &rule.clients {
                        let (kind, names) = match clients {
                            Containers::Only(names) => (set_kind::CLIENTS, names),
                            Containers::Not(names) => (set_kind::NOT_CLIENTS, names),
                        };
                        base.set_kind = kind;
                        base.set = id;
                        for container in pod.containers.iter().filter(|c| names.contains(&c.name)) {
                            if let Ok(meta) = std::fs::metadata(&container.cgroup) {
                                out.members.insert(MemberKey {
                                    set: base.set,
                                    _pad: 0,
                                    member: meta.ino(),
                                });
                            }
                        }
                    }
                    if let Some(peer) = &rule.peer {
                        base.set_kind = set_kind::PEERS;
                        base.set = id;
                        for other in inventory
                            .pods
                            .iter()
                            .filter(|p| peer.matches(&p.namespace, &p.labels))
                        {
                            if let Some(peer_id) =
                                ids.pod(&ObjectRef::new(&other.namespace, &other.name))
                            {
                                out.members.insert(MemberKey {
                                    set: base.set,
                                    _pad: 0,
                                    member: u64::from(peer_id),
                                });
                            }
                        }
                    }
                    if !rule.cidrs.is_empty() {
                        base.set_kind = set_kind::CIDRS;
                        base.set = id;
                        for net in &rule.cidrs {
                            let mut key = [0u8; 8];
                            key[..4].copy_from_slice(&base.set.to_be_bytes());
                            key[4..].copy_from_slice(&net.network().octets());
                            out.cidrs.insert((32 + u32::from(net.prefix_len()), key));
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
                continue;
            }
            for ingress in [false, true] {
                let Some(policy) = selected.iter().find(|p| {
                    p.spec.default_action == Action::Deny && (!ingress || has_ingress(p))
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
            out.pods.insert(cookie, entry);
        }
        out
    }
}

/// A policy's default covers ingress only if it has ingress rules: a policy
/// about what a pod sends leaves what it receives alone.
pub fn has_ingress(policy: &super::TrafficPolicy) -> bool {
    policy
        .spec
        .rules
        .iter()
        .any(|r| r.class != Class::Localhost && r.direction == Direction::Ingress)
}

fn kernel_class(class: Class) -> u8 {
    match class {
        Class::Any => class::UNKNOWN,
        Class::Localhost => class::LOCALHOST,
        Class::Pod => class::POD,
        Class::Service => class::SERVICE,
        Class::Node => class::NODE,
        Class::External => class::EXTERNAL,
    }
}

/// The class label of a kernel class number.
pub fn class_label(class: u8) -> &'static str {
    match class {
        class::LOCALHOST => class_name(Class::Localhost),
        class::POD => class_name(Class::Pod),
        class::SERVICE => class_name(Class::Service),
        class::EXTERNAL => class_name(Class::External),
        class::NODE => class_name(Class::Node),
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use observer_common::inventory::{INVENTORY_VERSION, Pod};

    use super::*;
    use crate::policy::parse;

    struct NoIds;
    impl Ids for NoIds {
        fn service(&self, _: &ObjectRef) -> Option<u32> {
            None
        }
        fn pod(&self, _: &ObjectRef) -> Option<u32> {
            None
        }
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
        let first = compiler.compile(&policies, &inventory(vec![pod("b")]), &b, &NoIds);
        let entry = first.pods[&2];
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
        let second = compiler.compile(
            &policies,
            &inventory(vec![pod("a"), pod("b")]),
            &both,
            &NoIds,
        );
        assert_eq!(second.pods[&2], entry);
        assert_eq!(
            second.pods[&1].rule[0].set, entry.rule[0].set,
            "one set per rule"
        );
    }

    #[test]
    fn an_egress_only_policy_leaves_ingress_alone_and_too_many_rules_are_reported() {
        let egress_only = POLICY.replace("direction: ingress", "direction: egress");
        let policies = parse(&egress_only).unwrap();
        let pods = HashMap::from([(ObjectRef::new("default", "b"), 2u64)]);
        let compiled =
            Compiler::default().compile(&policies, &inventory(vec![pod("b")]), &pods, &NoIds);
        assert_eq!(compiled.pods[&2].default_ingress_action, verdict::ALLOW);

        let ports: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        let many = POLICY.replace("[80, \"8000-8100\"]", &format!("[{}]", ports.join(", ")));
        let policies = parse(&many).unwrap();
        let compiled =
            Compiler::default().compile(&policies, &inventory(vec![pod("b")]), &pods, &NoIds);
        assert!(compiled.pods.is_empty());
        assert!(
            compiled.problems[0].contains("at most 16"),
            "{:?}",
            compiled.problems
        );
    }
}
