//! How a pod's compiled rules decide a connection. One description, run by
//! the socket hooks (`connect()`, UDP `sendmsg()`), by the flow classifier
//! (the first packet of an inbound connection) and by `observer policy
//! explain`; each reads the rule sets through [`RuleSets`].

use crate::{
    MAX_POD_RULES, PodPolicy, PolicyRule, UnixPolicyKey, UnixVerdict, class,
    direction::{EGRESS, INGRESS},
    verdict,
};

/// What a rule's set holds, and how it matches (see [`matches`]).
pub mod set_kind {
    pub const NONE: u8 = 0;
    /// The client container's cgroup is in the set.
    pub const CLIENTS: u8 = 1;
    /// The client container's cgroup is not in the set.
    pub const NOT_CLIENTS: u8 = 2;
    /// The peer pod's id is in the set.
    pub const PEERS: u8 = 3;
    /// The remote address is in one of the set's CIDRs.
    pub const CIDRS: u8 = 4;
    /// The Service whose id is the set id.
    pub const SERVICE: u8 = 5;
}

/// The set of every container cgroup the observer has named, in the pods
/// whose rules name client containers. A rule that names containers
/// (`clientContainers`, `notClientContainers`) cannot tell whether a cgroup
/// outside it is one of those containers: a container the runtime has just
/// restarted has a new cgroup, and the observer learns its name a moment
/// later. Such a client is denied by the first rule that would ask (fails
/// closed), never let through by a rule that would not have matched it.
pub const KNOWN_CONTAINERS: u32 = 0;

/// The rule sets, as each side reads them: [`crate::POLICY_MEMBERS_MAP`] and
/// [`crate::POLICY_CIDRS_MAP`] in the kernel, their contents in the daemon.
pub trait RuleSets {
    /// Whether `member` (a cgroup id, or a pod id) is in set `set`.
    fn member(&self, set: u32, member: u64) -> bool;
    /// Whether `addr` (16 bytes, IPv4-mapped for IPv4) is in a CIDR of set
    /// `set`.
    fn cidr(&self, set: u32, addr: &[u8; 16]) -> bool;
}

/// A connection as a policy sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// [`EGRESS`]: the pod opens it (localhost too); [`INGRESS`]: the pod
    /// accepts it on `eth0`.
    pub direction: u8,
    /// The remote end's class ([`crate::classify::remote`]).
    pub class: u8,
    pub protocol: u8,
    /// The server's port.
    pub port: u16,
    /// The remote end's id ([`crate::classify::Peer::id`]).
    pub peer: u32,
    /// The client container's cgroup (egress; 0 when not known).
    pub cgroup: u64,
    /// The remote address, 16 bytes (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Inbound: sent by a process of the node itself (a socket of the
    /// node's, in no pod's cgroup), as the kernel tells by the packet's
    /// socket. A packet forwarded through the node has no socket there.
    pub from_node_process: bool,
}

/// What decided a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// [`PolicyRule::id`], or the default's id.
    pub rule: u32,
    /// [`verdict::ALLOW`], [`verdict::DENY`] or [`verdict::AUDIT_DENY`].
    pub verdict: u8,
}

impl Decision {
    /// What happens to the connection: only a denial in `enforce` mode
    /// refuses it.
    #[inline(always)]
    pub const fn enforced(&self) -> u8 {
        if self.verdict == verdict::DENY {
            verdict::DENY
        } else {
            verdict::ALLOW
        }
    }
}

/// The pod's rules for this direction, in order: the first that matches
/// decides; else the default for the direction, if it denies. `None`: no
/// policy has a say, and the connection is allowed.
///
/// The kernel walks the same steps with `bpf_loop` (one rule a step, so
/// that the verifier checks a step once, not once per rule): [`exempt`],
/// then [`decide_rule`] on each rule in order, then [`fallback`].
pub fn decide(policy: &PodPolicy, c: &Connection, sets: &impl RuleSets) -> Option<Decision> {
    if exempt(c) {
        return None;
    }
    let rules = (policy.rules as usize).min(MAX_POD_RULES);
    policy.rule[..rules]
        .iter()
        .find_map(|rule| decide_rule(rule, c, sets))
        .or_else(|| fallback(policy, c))
}

/// Whether the connection is beyond any policy: the node's own processes
/// (the kubelet's probes) are never subject to ingress rules. That is a
/// connection from an address of the node's (a node address, or the node's
/// end of the pod network: an address in a pod CIDR that is no pod's) sent
/// by one of them. Anything else from a node's address (NodePort traffic
/// SNAT-ed to it, host-network pods) is decided like any other traffic, as
/// class [`class::NODE`].
#[inline(always)]
pub fn exempt(c: &Connection) -> bool {
    let node_address = c.class == class::NODE || (c.class == class::POD && c.peer == 0);
    c.direction == INGRESS && c.from_node_process && node_address
}

/// What one rule decides of the connection, if it matches.
#[inline(always)]
pub fn decide_rule(rule: &PolicyRule, c: &Connection, sets: &impl RuleSets) -> Option<Decision> {
    if !matches_but_clients(rule, c) {
        return None;
    }
    let names_clients =
        rule.set_kind == set_kind::CLIENTS || rule.set_kind == set_kind::NOT_CLIENTS;
    if names_clients && !sets.member(KNOWN_CONTAINERS, c.cgroup) {
        return Some(Decision {
            rule: rule.unknown_id,
            verdict: verdict_of(verdict::DENY, rule.audit),
        });
    }
    matches_set(rule, c, sets).then_some(Decision {
        rule: rule.id,
        verdict: verdict_of(rule.action, rule.audit),
    })
}

/// What no rule matched: the default for the direction, if it denies.
#[inline(always)]
pub fn fallback(policy: &PodPolicy, c: &Connection) -> Option<Decision> {
    let (action, audit, id) = if c.direction == INGRESS {
        (
            policy.default_ingress_action,
            policy.default_ingress_audit,
            policy.default_ingress_id,
        )
    } else {
        (
            policy.default_action,
            policy.default_audit,
            policy.default_id,
        )
    };
    (action == verdict::DENY).then_some(Decision {
        rule: id,
        verdict: verdict_of(action, audit),
    })
}

/// Whether a rule matches a connection.
#[inline(always)]
pub fn matches(rule: &PolicyRule, c: &Connection, sets: &impl RuleSets) -> bool {
    matches_but_clients(rule, c) && matches_set(rule, c, sets)
}

/// Whether a rule's direction, class, protocol and ports match.
#[inline(always)]
fn matches_but_clients(rule: &PolicyRule, c: &Connection) -> bool {
    if rule.direction != c.direction {
        return false;
    }
    if rule.class != class::UNKNOWN && rule.class != c.class {
        return false;
    }
    if rule.protocol != 0 && rule.protocol != c.protocol {
        return false;
    }
    c.port >= rule.port_first && c.port <= rule.port_last
}

/// Whether the connection is in the rule's set (or the rule has none).
#[inline(always)]
fn matches_set(rule: &PolicyRule, c: &Connection, sets: &impl RuleSets) -> bool {
    match rule.set_kind {
        set_kind::CLIENTS => sets.member(rule.set, c.cgroup),
        set_kind::NOT_CLIENTS => !sets.member(rule.set, c.cgroup),
        set_kind::PEERS => {
            c.class == class::POD && c.peer != 0 && sets.member(rule.set, u64::from(c.peer))
        }
        set_kind::CIDRS => sets.cidr(rule.set, &c.addr),
        set_kind::SERVICE => c.class == class::SERVICE && c.peer == rule.set,
        _ => true,
    }
}

#[inline(always)]
const fn verdict_of(action: u8, audit: u8) -> u8 {
    match (action, audit) {
        (verdict::DENY, 0) => verdict::DENY,
        (verdict::DENY, _) => verdict::AUDIT_DENY,
        _ => verdict::ALLOW,
    }
}

/// Localhost connections are decided at the client's `connect()`, as
/// egress: a rule with this direction and class never sees one.
pub const fn rule_direction(rule_class: u8, ingress: bool) -> u8 {
    if ingress && rule_class != class::LOCALHOST {
        INGRESS
    } else {
        EGRESS
    }
}

/// What a pod's unix-socket rules decide for a client container (its
/// cgroup) and a path ([`crate::ipc::path_hash`]), from the decisions the
/// daemon stored for the pod ([`UnixPolicyKey`]; `get` reads them): the
/// client's and the path's, else the client's for any other path, else an
/// unnamed client's for the path, else an unnamed client's for any other.
/// `client` gives the cgroup and the path, asked for only if the pod has
/// unix rules (most have none: one lookup, nothing read).
/// `None`: the pod has no unix rules; a verdict of 0: no rule decides.
#[inline(always)]
pub fn unix_decision(
    netns: u64,
    client: impl FnOnce() -> (u64, u64),
    get: impl Fn(&UnixPolicyKey) -> Option<UnixVerdict>,
) -> Option<UnixVerdict> {
    let key = |cgroup, path| UnixPolicyKey {
        netns,
        cgroup,
        path,
    };
    let any = get(&key(0, 0))?;
    let (cgroup, path) = client();
    get(&key(cgroup, path))
        .or_else(|| get(&key(cgroup, 0)))
        .or_else(|| get(&key(0, path)))
        .or(Some(any))
}
