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
//!
//! Unix-socket rules (`class: unix`) are decided here, for every client
//! container of the pod and every path its rules name (and for "any other"
//! of each), with the same rule semantics (`decide_rule`); the kernel looks
//! the answer up at the unix socket's `connect()` or `sendmsg()`
//! ([`UnixPolicyKey`]). Only `class: unix` rules decide them: a policy's
//! `defaultAction` and rules of any class are about network traffic (a
//! deny-all would otherwise cut every process from its own unix sockets).

use std::collections::{BTreeSet, HashMap, HashSet};

use observer_common::{
    MAX_POD_RULES, MemberKey, POLICIES_CAPACITY, POLICY_CIDRS_CAPACITY, POLICY_MEMBERS_CAPACITY,
    PodPolicy, PolicyRule, UNIX_POLICY_CAPACITY, UnixPathName, UnixPolicyKey, UnixVerdict, class,
    inventory::Inventory,
    ipc::UnixPathKey,
    ipv4_mapped,
    policy::{self, Connection, KNOWN_CONTAINERS, rule_direction},
    policy_cidr_key, set_kind, verdict,
};

use super::{FailureMode, Mode, Policies, Target, TrafficPolicy, rule_name};
use crate::{
    kernel::policy_maps::PolicyEntries,
    names::{CgroupIds, Ids, ObjectRef},
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
    /// The pods (by namespace cookie) a policy that fails closed selects:
    /// their programs are pinned, and stay while no observer runs.
    pub closed: HashSet<u64>,
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
    /// The pod's network namespace is not attached (not found yet, or the
    /// attach failed): no policy applies.
    NotAttached,
    /// A policy selecting the pod fails closed, and its programs could not
    /// be kept for the next observer (no `--pin-dir`, or a pin failed):
    /// while no observer runs, no policy applies to it.
    FailsOpen,
    /// A policy selecting the pod has unix-socket rules, and the
    /// unix-socket hooks are not loaded (a kernel before 6.7 has none; a
    /// newer one may refuse them: the log says why): they are not enforced.
    NoUnixHooks,
}

impl Unenforced {
    pub const ALL: [Self; 8] = [
        Self::TooManyRules,
        Self::MapFull,
        Self::NoHooks,
        Self::NoCgroup,
        Self::UnknownService,
        Self::NotAttached,
        Self::FailsOpen,
        Self::NoUnixHooks,
    ];

    /// What the reason means, for the metric's help.
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::TooManyRules => "no policy applies",
            Self::MapFull => "no room for its new entries: its last ones, if any, still apply",
            Self::NoHooks => "egress, localhost and unix-socket rules do not apply",
            Self::NoCgroup => "waiting for the pod's or a named container's cgroup",
            Self::UnknownService => "a rule waits for its Service",
            Self::NotAttached => "its namespace is not attached: no policy applies",
            Self::FailsOpen => {
                "a policy fails closed but its programs cannot be kept for the next observer (no --pin-dir, or a pin failed): no policy applies while no observer runs"
            }
            Self::NoUnixHooks => {
                "the unix-socket hooks are not loaded (Linux before 6.7, or refused: see the log): unix-socket rules do not apply"
            }
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TooManyRules => "too_many_rules",
            Self::MapFull => "map_full",
            Self::NoHooks => "no_hooks",
            Self::NoCgroup => "no_cgroup",
            Self::UnknownService => "unknown_service",
            Self::NotAttached => "not_attached",
            Self::FailsOpen => "fails_open",
            Self::NoUnixHooks => "no_unix_hooks",
        }
    }

    /// Whether it can go away without a change of the policy or the
    /// cluster (retried on a timer; the maps may have room once the last
    /// change is written).
    pub const fn retried(self) -> bool {
        !matches!(
            self,
            Self::TooManyRules | Self::UnknownService | Self::NoUnixHooks
        )
    }
}

/// How many entries each policy map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub pods: usize,
    pub members: usize,
    pub cidrs: usize,
    pub unix: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            pods: POLICIES_CAPACITY as usize,
            members: POLICY_MEMBERS_CAPACITY as usize,
            cidrs: POLICY_CIDRS_CAPACITY as usize,
            unix: UNIX_POLICY_CAPACITY as usize,
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
    /// Pods of this node that are not attached (not found yet, or failed).
    pub not_attached: &'a HashSet<ObjectRef>,
    /// What the maps hold now: while they are brought to the new entries,
    /// they hold both, and both must fit.
    pub previous: &'a PolicyEntries,
    pub capacity: Capacity,
    /// What a policy that does not say does while no observer runs.
    pub failure_mode: FailureMode,
    /// Pods an earlier observer left pinned that this one has not taken
    /// over yet (by namespace cookie): their entries in `previous` are kept
    /// as they are, sets and all.
    pub kept: &'a HashSet<u64>,
    /// Attached pods whose programs could not be pinned.
    pub fails_open: &'a HashSet<u64>,
    /// Whether this kernel has the unix-socket hooks.
    pub unix_hooks: bool,
}

/// Compiles with rule ids that every observer derives alike from the
/// rules' names ([`RuleIds`]): an observer that takes over from another
/// writes the same ids for the same rules, and names the other's verdict
/// counts. A rule's set is named by the rule's id and shared by every pod
/// the rule applies to (cgroup and pod ids are unique node- and
/// cluster-wide), so that no entry ever points at a set meant for another
/// rule while the maps are being updated, and a set is stored once.
#[derive(Debug, Default)]
pub struct Compiler {
    rules: RuleIds,
}

/// Rule ids from rule names: a hash of the policy's and the rule's name in
/// the upper half of the id space, the same in every observer for the same
/// file. Two names that hash alike are told apart by probing in the order
/// of their names, so that the ids are a function of the file's names.
#[derive(Debug, Default)]
pub struct RuleIds {
    ids: HashMap<RuleName, u32>,
}

impl RuleIds {
    /// Ids for these names (every rule of a file, and each policy's
    /// `default`).
    fn assign<'a>(&mut self, names: impl Iterator<Item = (&'a str, String)>) {
        let mut names: Vec<RuleName> = names
            .map(|(policy, rule)| RuleName {
                policy: policy.to_owned(),
                rule,
            })
            .collect();
        names.sort_by(|a, b| (&a.policy, &a.rule).cmp(&(&b.policy, &b.rule)));
        names.dedup();
        let mut taken = HashSet::new();
        self.ids = names
            .into_iter()
            .map(|name| {
                let mut id = rule_hash(&name);
                while !taken.insert(id) {
                    id = RULE_IDS | id.wrapping_add(1);
                }
                (name, id)
            })
            .collect();
    }

    fn id(&self, name: &RuleName) -> u32 {
        self.ids
            .get(name)
            .copied()
            .unwrap_or_else(|| rule_hash(name))
    }
}

/// The rule name of what no rule matches.
pub const DEFAULT_RULE: &str = "default";
/// The rule name of a client container that is not known by name (yet),
/// which a rule naming containers denies
/// ([`observer_common::policy::KNOWN_CONTAINERS`]).
pub const UNKNOWN_CONTAINER_RULE: &str = "unknown-container";

/// Rule ids have the top bit set; peer and Service ids (a Service rule's
/// set) count up from 1.
const RULE_IDS: u32 = 1 << 31;

/// FNV-1a over `policy NUL rule`: stable across builds and versions.
fn rule_hash(name: &RuleName) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let bytes = name.policy.bytes().chain([0]).chain(name.rule.bytes());
    for byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    RULE_IDS | hash
}

impl Compiler {
    /// Compiles the policies for the attached pods.
    pub fn compile(&mut self, inputs: &Inputs) -> Compiled {
        let mut out = Compiled::default();
        keep(inputs, &mut out.entries);
        let names = inputs.policies.policies.iter().flat_map(|p| {
            let rules = p.spec.rules.iter().enumerate();
            rules
                .map(|(i, r)| (p.metadata.name.as_str(), rule_name(r, i)))
                .chain([
                    (p.metadata.name.as_str(), DEFAULT_RULE.to_owned()),
                    (p.metadata.name.as_str(), UNKNOWN_CONTAINER_RULE.to_owned()),
                ])
        });
        self.rules.assign(names);
        // Room taken in each map while it holds both the previous entries
        // and the ones compiled so far.
        let previous = inputs.previous;
        let mut peer_sets: HashMap<u32, Vec<MemberKey>> = HashMap::new();
        let mut pods_room = previous.pods.len();
        let mut members_room = previous.members.len();
        let mut cidrs_room = previous.cidrs.len();
        let mut unix_room = previous.unix.len();
        for pod in &inputs.inventory.pods {
            let pod_ref = ObjectRef::new(&pod.namespace, &pod.name);
            let Some(&cookie) = inputs.attached.get(&pod_ref) else {
                let selected = !inputs
                    .policies
                    .for_pod(&pod.namespace, &pod.labels)
                    .is_empty();
                if selected && inputs.not_attached.contains(&pod_ref) {
                    out.unenforced.insert((pod_ref, Unenforced::NotAttached));
                }
                continue;
            };
            if inputs.own_netns == Some(cookie) {
                continue;
            }
            let selected = inputs.policies.for_pod(&pod.namespace, &pod.labels);
            if selected.is_empty() {
                continue;
            }
            let closes = |p: &&TrafficPolicy| {
                p.spec.failure_mode.unwrap_or(inputs.failure_mode) == FailureMode::Closed
            };
            if selected.iter().any(closes) {
                out.closed.insert(cookie);
            }
            let mut unenforced = |reason| {
                out.unenforced.insert((pod_ref.clone(), reason));
            };
            if let Some(&reason) = inputs.without_hooks.get(&cookie) {
                unenforced(reason);
            }
            if inputs.fails_open.contains(&cookie) && selected.iter().any(closes) {
                unenforced(Unenforced::FailsOpen);
            }
            // This pod's set members and CIDRs, added once they fit.
            let mut entries = PolicyEntries::default();
            let mut rules = Vec::new();
            // Its unix rules and their sets (decided here, never walked by
            // the kernel), with the paths each names.
            let mut unix_rules: Vec<(PolicyRule, Vec<u64>)> = Vec::new();
            let mut unix_sets = PolicyEntries::default();
            let mut unix_names: HashMap<UnixPathKey, UnixPathName> = HashMap::new();
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
                    let unix = rule.class == class::UNIX;
                    let sets = if unix { &mut unix_sets } else { &mut entries };
                    match &rule.target {
                        Target::Any => {}
                        Target::Clients(names) | Target::NotClients(names) => {
                            base.set_kind = match rule.target {
                                Target::Clients(_) => set_kind::CLIENTS,
                                _ => set_kind::NOT_CLIENTS,
                            };
                            base.set = set;
                            // A client no name is known for is denied,
                            // under this name.
                            let unknown = RuleName {
                                policy: policy.metadata.name.clone(),
                                rule: UNKNOWN_CONTAINER_RULE.into(),
                            };
                            base.unknown_id = self.rules.id(&unknown);
                            out.names.insert(base.unknown_id, unknown);
                            for container in &pod.containers {
                                if let Some(cgroup) = inputs.cgroups.get(&container.cgroup) {
                                    sets.members
                                        .insert(MemberKey::new(KNOWN_CONTAINERS, *cgroup));
                                }
                            }
                            let containers =
                                pod.containers.iter().filter(|c| names.contains(&c.name));
                            for container in containers {
                                match inputs.cgroups.get(&container.cgroup) {
                                    Some(cgroup) => {
                                        sets.members.insert(MemberKey::new(set, *cgroup));
                                    }
                                    None => unenforced(Unenforced::NoCgroup),
                                }
                            }
                        }
                        Target::Peers(peer) => {
                            base.set_kind = set_kind::PEERS;
                            base.set = set;
                            // The same for every pod the rule applies to:
                            // the cluster's pods are looked through once per
                            // rule and compilation, not once per pod.
                            let members = peer_sets.entry(set).or_insert_with(|| {
                                inputs
                                    .inventory
                                    .pods
                                    .iter()
                                    .filter(|p| peer.matches(&p.namespace, &p.labels))
                                    .filter_map(|p| {
                                        let other = ObjectRef::new(&p.namespace, &p.name);
                                        inputs.ids.pods.get(&other)
                                    })
                                    .map(|id| MemberKey::new(set, u64::from(id)))
                                    .collect()
                            });
                            entries.members.extend(members.iter().copied());
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
                    if unix {
                        let mut paths = Vec::new();
                        for (hash, name) in rule.paths.iter().filter_map(|p| unix_path_name(p)) {
                            paths.push(hash);
                            let key = UnixPathKey {
                                netns: cookie,
                                hash,
                            };
                            unix_names.insert(key, name);
                        }
                        unix_rules.push((base, paths));
                        continue;
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
            let unix = if unix_rules.is_empty() {
                HashMap::new()
            } else {
                if !inputs.unix_hooks {
                    unenforced(Unenforced::NoUnixHooks);
                }
                let cgroups = pod
                    .containers
                    .iter()
                    .filter_map(|c| inputs.cgroups.get(&c.cgroup).copied());
                unix_decisions(cookie, &unix_rules, &unix_sets, cgroups)
            };
            let new_pod = usize::from(!previous.pods.contains_key(&cookie));
            let new_members = entries
                .members
                .iter()
                .filter(|m| !out.entries.members.contains(m) && !previous.members.contains(m))
                .count();
            let new_cidrs = entries
                .cidrs
                .iter()
                .filter(|c| !out.entries.cidrs.contains(c) && !previous.cidrs.contains(c))
                .count();
            let new_unix = unix
                .keys()
                .filter(|k| !previous.unix.contains_key(k))
                .count();
            if pods_room + new_pod > inputs.capacity.pods
                || members_room + new_members > inputs.capacity.members
                || cidrs_room + new_cidrs > inputs.capacity.cidrs
                || unix_room + new_unix > inputs.capacity.unix
            {
                out.problems.push(format!(
                    "pod {}/{}: the policy maps are full (at most {} pods, {} set members, {} CIDRs, {} unix-socket decisions): no policy applies to it",
                    pod.namespace,
                    pod.name,
                    inputs.capacity.pods,
                    inputs.capacity.members,
                    inputs.capacity.cidrs,
                    inputs.capacity.unix,
                ));
                unenforced(Unenforced::MapFull);
                continue;
            }
            pods_room += new_pod;
            members_room += new_members;
            cidrs_room += new_cidrs;
            unix_room += new_unix;
            out.entries.members.extend(entries.members);
            out.entries.cidrs.extend(entries.cidrs);
            out.entries.unix.extend(unix);
            out.entries.unix_paths.extend(unix_names);
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
                    rule: DEFAULT_RULE.into(),
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

/// What a pod's unix rules decide (see [`UnixPolicyKey`]): for each known
/// client container (by cgroup) and an unnamed one (0), and for each path
/// the rules name and any other (0), the first rule that matches. The
/// path is matched first: a rule about another path says nothing, not
/// even about a client it cannot name.
fn unix_decisions(
    netns: u64,
    rules: &[(PolicyRule, Vec<u64>)],
    sets: &PolicyEntries,
    cgroups: impl Iterator<Item = u64>,
) -> HashMap<UnixPolicyKey, UnixVerdict> {
    let mut paths: Vec<u64> = rules.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    paths.push(0);
    paths.sort_unstable();
    paths.dedup();
    let clients: BTreeSet<u64> = cgroups.chain([0]).collect();
    let mut out = HashMap::new();
    for &cgroup in &clients {
        let connection = Connection {
            direction: observer_common::direction::EGRESS,
            class: class::UNIX,
            cgroup,
            ..Connection::default()
        };
        for &path in &paths {
            let decision = rules
                .iter()
                .filter(|(_, named)| named.is_empty() || named.contains(&path))
                .find_map(|(rule, _)| policy::decide_rule(rule, &connection, sets));
            let verdict = decision.map_or(UnixVerdict::default(), |d| UnixVerdict {
                rule: d.rule,
                verdict: d.verdict,
                _pad: [0; 3],
            });
            out.insert(
                UnixPolicyKey {
                    netns,
                    cgroup,
                    path,
                },
                verdict,
            );
        }
    }
    out
}

/// A rule's path as the kernel sees the path a client names: its hash and
/// its name.
pub fn unix_path_name(path: &str) -> Option<(u64, UnixPathName)> {
    let bytes = super::model::unix_path(path).ok()?;
    Some(UnixPathName::of(&bytes, bytes.len()))
}

/// The entries of pods an earlier observer left that this one has not taken
/// over yet: as they are, with the sets their rules name.
fn keep(inputs: &Inputs, out: &mut PolicyEntries) {
    let mut sets = HashSet::new();
    for cookie in inputs.kept {
        let Some(policy) = inputs.previous.pods.get(cookie) else {
            continue;
        };
        out.pods.insert(*cookie, *policy);
        let rules = &policy.rule[..(policy.rules as usize).min(MAX_POD_RULES)];
        sets.extend(
            rules
                .iter()
                .filter(|r| r.set_kind != set_kind::SERVICE)
                .map(|r| r.set),
        );
    }
    let previous = inputs.previous;
    out.unix.extend(
        previous
            .unix
            .iter()
            .filter(|(key, _)| inputs.kept.contains(&key.netns)),
    );
    out.unix_paths.extend(
        previous
            .unix_paths
            .iter()
            .filter(|(key, _)| inputs.kept.contains(&key.netns)),
    );
    out.members
        .extend(previous.members.iter().filter(|m| sets.contains(&m.set)));
    out.cidrs.extend(
        previous
            .cidrs
            .iter()
            .filter(|(_, key)| sets.contains(&cidr_set(key))),
    );
}

/// The set a [`policy_cidr_key`] belongs to.
fn cidr_set(key: &[u8; 20]) -> u32 {
    u32::from_be_bytes([key[0], key[1], key[2], key[3]])
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
mod tests;
