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
        not_attached: &HashSet::new(),
        previous: &PolicyEntries::default(),
        capacity: Capacity::default(),
        failure_mode: Default::default(),
        kept: &Default::default(),
        fails_open: &Default::default(),
        unix_hooks: true,
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

    let ports: Vec<String> = (1..=MAX_POD_RULES + 1).map(|p| p.to_string()).collect();
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
        compiled.problems[0].contains(&format!("at most {MAX_POD_RULES}")),
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
    let inventory = inventory(vec![
        pod("a"),
        with_container,
        pod("own"),
        pod("hooks"),
        pod("waiting"),
    ]);
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
        not_attached: &HashSet::from([ObjectRef::new("default", "waiting")]),
        previous: &PolicyEntries::default(),
        capacity: Capacity::default(),
        failure_mode: Default::default(),
        kept: &Default::default(),
        fails_open: &Default::default(),
        unix_hooks: true,
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
            ("waiting", "not_attached"),
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

#[test]
fn rule_ids_come_from_names_alike_in_every_observer() {
    let policies = parse(POLICY).unwrap();
    let b = HashMap::from([(ObjectRef::new("default", "b"), 2u64)]);
    let pods = inventory(vec![pod("b")]);
    // Two observers (a restart): the same entries, id for id.
    let first = compile(&mut Compiler::default(), &policies, &pods, &b);
    let second = compile(&mut Compiler::default(), &policies, &pods, &b);
    assert_eq!(first.entries, second.entries);
    assert_eq!(first.names, second.names);
    for id in first.names.keys() {
        assert!(id & RULE_IDS != 0, "rule ids are apart from peer ids");
    }

    // Names that hash alike (found by trying) get distinct ids, by the
    // names' order, whichever order they come in.
    let name = |rule: String| RuleName {
        policy: "p".into(),
        rule,
    };
    let mut seen = HashMap::new();
    let (a, b) = (0..1_000_000)
        .find_map(|i| {
            let rule = format!("r{i}");
            let hash = rule_hash(&name(rule.clone()));
            seen.insert(hash, rule.clone()).map(|other| (other, rule))
        })
        .expect("two names that hash alike");
    let names = [("p", a.clone()), ("p", b.clone())];
    let mut ids = RuleIds::default();
    ids.assign(names.iter().cloned());
    let (x, y) = (ids.id(&name(a.clone())), ids.id(&name(b.clone())));
    assert_ne!(x, y, "{a} and {b}");
    ids.assign(names.iter().rev().cloned());
    assert_eq!((ids.id(&name(a)), ids.id(&name(b))), (x, y));
}

const UNIX: &str = "
apiVersion: observer.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabels: {app: x}}
  mode: enforce
  defaultAction: deny
  rules:
  - {name: fpm, class: unix, clientContainers: [web], paths: [/run/php/fpm.sock], action: allow}
  - {name: statsd, class: unix, paths: ['@statsd'], action: allow}
  - {name: rest, class: unix, action: deny}
";

#[test]
fn unix_rules_are_decided_per_client_and_path_and_the_kernel_looks_them_up() {
    let policies = parse(UNIX).unwrap();
    let mut with_containers = pod("a");
    let container = |name: &str| observer_common::inventory::Container {
        name: name.into(),
        id: name.into(),
        cgroup: format!("/cg/a/{name}").into(),
        ports: Vec::new(),
    };
    with_containers.containers = vec![container("web"), container("fpm")];
    let inventory = inventory(vec![with_containers]);
    let attached = HashMap::from([(ObjectRef::new("default", "a"), 7u64)]);
    let cgroups: CgroupIds = [("/cg/a/web".into(), 100u64), ("/cg/a/fpm".into(), 200)]
        .into_iter()
        .collect();
    let mut inputs = Inputs {
        policies: &policies,
        inventory: &inventory,
        attached: &attached,
        ids: &Ids::default(),
        cgroups: &cgroups,
        without_hooks: &HashMap::new(),
        own_netns: None,
        not_attached: &HashSet::new(),
        previous: &PolicyEntries::default(),
        capacity: Capacity::default(),
        failure_mode: Default::default(),
        kept: &Default::default(),
        fails_open: &Default::default(),
        unix_hooks: true,
    };
    let compiled = Compiler::default().compile(&inputs);
    assert!(compiled.unenforced.is_empty(), "{:?}", compiled.unenforced);
    // Three clients (web, fpm, one not named) by three paths (two named,
    // any other).
    assert_eq!(compiled.entries.unix.len(), 9);
    // Unix rules are not in the kernel's rule walk, and the default is
    // about network traffic.
    assert_eq!(compiled.entries.pods[&7].rules, 0);
    let unix = &compiled.entries.unix;
    let decide = |cgroup, path: &str| {
        let hash = unix_path_name(path).unwrap().0;
        let found = policy::unix_decision(7, || (cgroup, hash), |k| unix.get(k).copied()).unwrap();
        let name = compiled.names.get(&found.rule).map(|n| n.rule.as_str());
        (name, observer_common::verdict::name(found.verdict))
    };
    assert_eq!(decide(100, "/run/php/fpm.sock"), (Some("fpm"), "allow"));
    // fpm is not web: the fpm rule does not match, nor statsd's path.
    assert_eq!(decide(200, "/run/php/fpm.sock"), (Some("rest"), "deny"));
    assert_eq!(decide(200, "@statsd"), (Some("statsd"), "allow"));
    assert_eq!(decide(100, "/tmp/other.sock"), (Some("rest"), "deny"));
    // A client the observer has not named (a restarted container): the
    // rule naming containers denies it, under its own name.
    assert_eq!(
        decide(999, "/run/php/fpm.sock"),
        (Some("unknown-container"), "deny")
    );
    assert_eq!(decide(999, "@statsd"), (Some("statsd"), "allow"));
    // A pod without unix rules has no entry at all.
    assert_eq!(
        policy::unix_decision(8, || (100, 1), |k| unix.get(k).copied()),
        None
    );

    // Without the kernel's unix hooks, the gauge says so.
    inputs.unix_hooks = false;
    let compiled = Compiler::default().compile(&inputs);
    assert_eq!(reasons(&compiled), [("a", "no_unix_hooks")]);
    // And the decisions count against their map's room.
    inputs.unix_hooks = true;
    inputs.capacity = Capacity {
        unix: 8,
        ..Capacity::default()
    };
    let compiled = Compiler::default().compile(&inputs);
    assert_eq!(reasons(&compiled), [("a", "map_full")]);
    assert!(compiled.entries.unix.is_empty());
}
