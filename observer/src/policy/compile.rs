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

/// Compiles with rule ids that stay the same across compilations.
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
        let mut next_set = 1u32;
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
                        base.set = next_set;
                        next_set += 1;
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
                        base.set = next_set;
                        next_set += 1;
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
                        base.set = next_set;
                        next_set += 1;
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
        class::NODE => "node",
        _ => "unknown",
    }
}
