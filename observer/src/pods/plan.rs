//! The attach diff: from what is attached and what a snapshot wants, what to
//! detach, what to attach, and what waits for its namespace. A pure
//! function: which namespace a path leads to now is asked through a
//! closure.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use super::Target;
use crate::names::ObjectRef;

/// A namespace attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub cookie: u64,
    pub pod: ObjectRef,
    /// Which namespace: a pod whose namespace is replaced (its sandbox
    /// recreated) is attached again.
    pub netns: (u64, u64),
    /// Attached to `lo` only, before the pod had an IP: attached again once
    /// it has one (and so an `eth0`).
    pub lo_only_without_ip: bool,
}

/// What to do, by target key; each list sorted, for a stable order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Attached, and not wanted as they are any more.
    pub detach: Vec<String>,
    /// Wanted with a namespace, and not attached (or detached above).
    pub attach: Vec<String>,
    /// Wanted, and no namespace is known for them yet.
    pub waiting: Vec<String>,
}

/// The plan. `netns_of` tells which namespace a path leads to now (`None`:
/// it leads nowhere, its process has ended: what is attached stays).
pub fn plan(
    attached: &HashMap<String, Attached>,
    wanted: &HashMap<String, Target>,
    netns_of: impl Fn(&Path) -> Option<(u64, u64)>,
) -> Plan {
    let mut detach = BTreeSet::new();
    for (key, attached) in attached {
        let Some(target) = wanted.get(key) else {
            detach.insert(key.clone());
            continue;
        };
        let Some(now) = target.path.as_deref().and_then(&netns_of) else {
            continue;
        };
        if now != attached.netns || (attached.lo_only_without_ip && target.has_ip) {
            detach.insert(key.clone());
        }
    }
    let mut attach = BTreeSet::new();
    let mut waiting = BTreeSet::new();
    for (key, target) in wanted {
        if attached.contains_key(key) && !detach.contains(key) {
            continue;
        }
        if target.path.is_some() {
            attach.insert(key.clone());
        } else if !attached.contains_key(key) {
            waiting.insert(key.clone());
        }
    }
    Plan {
        detach: detach.into_iter().collect(),
        attach: attach.into_iter().collect(),
        waiting: waiting.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_A: (u64, u64) = (4, 100);
    const NS_B: (u64, u64) = (4, 200);

    fn target(path: Option<&str>, has_ip: bool) -> Target {
        Target {
            check: None,
            path: path.map(Into::into),
            pod: ObjectRef::new("default", "p"),
            cgroup: None,
            has_ip,
        }
    }

    fn attached(netns: (u64, u64), lo_only_without_ip: bool) -> Attached {
        Attached {
            cookie: 1,
            pod: ObjectRef::new("default", "p"),
            netns,
            lo_only_without_ip,
        }
    }

    /// `/a` leads to namespace A, `/b` to B, anything else nowhere.
    fn netns_of(path: &Path) -> Option<(u64, u64)> {
        match path.to_str() {
            Some("/a") => Some(NS_A),
            Some("/b") => Some(NS_B),
            _ => None,
        }
    }

    fn keys(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn attaches_what_is_new_and_detaches_what_is_gone() {
        let now = HashMap::from([("old".into(), attached(NS_A, false))]);
        let wanted = HashMap::from([
            ("new".into(), target(Some("/b"), true)),
            ("starting".into(), target(None, false)),
        ]);
        let plan = plan(&now, &wanted, netns_of);
        assert_eq!(plan.detach, keys(&["old"]));
        assert_eq!(plan.attach, keys(&["new"]));
        assert_eq!(plan.waiting, keys(&["starting"]));
    }

    #[test]
    fn a_replaced_namespace_is_attached_again() {
        let now = HashMap::from([("p".into(), attached(NS_A, false))]);
        let wanted = HashMap::from([("p".into(), target(Some("/b"), true))]);
        let plan = plan(&now, &wanted, netns_of);
        assert_eq!((plan.detach, plan.attach), (keys(&["p"]), keys(&["p"])));
    }

    #[test]
    fn a_pod_attached_before_its_ip_is_attached_again_with_it() {
        let now = HashMap::from([("p".into(), attached(NS_A, true))]);
        let without = HashMap::from([("p".into(), target(Some("/a"), false))]);
        assert_eq!(plan(&now, &without, netns_of), Plan::default());
        let with = HashMap::from([("p".into(), target(Some("/a"), true))]);
        let plan = plan(&now, &with, netns_of);
        assert_eq!((plan.detach, plan.attach), (keys(&["p"]), keys(&["p"])));
    }

    #[test]
    fn an_attached_pod_whose_process_ended_stays_attached() {
        let now = HashMap::from([("p".into(), attached(NS_A, false))]);
        for path in [None, Some("/gone")] {
            let wanted = HashMap::from([("p".into(), target(path, true))]);
            assert_eq!(plan(&now, &wanted, netns_of), Plan::default(), "{path:?}");
        }
    }
}
