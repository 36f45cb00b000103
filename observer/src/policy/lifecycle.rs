//! The policy file in force: reloaded when it changes (a refused file keeps
//! the last good one), compiled for the attached pods, and written to the
//! kernel's maps as changes.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use observer_common::inventory::Inventory;

use super::{
    FailureMode, Policies,
    compile::{Capacity, Compiled, Compiler, Inputs, RuleName, Unenforced},
};
use crate::{
    kernel::policy_maps::{KernelPolicyMaps, PolicyEntries},
    metrics::Metrics,
    names::{CgroupIds, Ids, ObjectRef},
};

/// The policy file, and what was compiled from it into the kernel.
pub struct Enforcer {
    path: PathBuf,
    policies: Policies,
    maps: KernelPolicyMaps,
    /// `--failure-mode`: for policies that do not say.
    failure_mode: FailureMode,
    compiler: Compiler,
    compiled: Compiled,
    /// What the gauge says: pods not (fully) held to their policy, and why.
    unenforced: BTreeSet<(ObjectRef, Unenforced)>,
    /// Told the label keys peer selectors use, as they change (Kubernetes
    /// mode keeps only those of other nodes' pods).
    label_keys: Option<tokio::sync::watch::Sender<Arc<BTreeSet<String>>>>,
    /// Whether the kernel has the unix-socket hooks.
    unix_hooks: bool,
}

/// What the policies are compiled against.
pub struct World<'a> {
    pub inventory: &'a Inventory,
    pub ids: &'a Ids,
    pub cgroups: &'a CgroupIds,
    /// The pods attached, by namespace cookie.
    pub attached: &'a HashMap<ObjectRef, u64>,
    /// Attached pods without socket hooks, and why.
    pub without_hooks: &'a HashMap<u64, Unenforced>,
    /// The observer's own network namespace.
    pub own_netns: Option<u64>,
    /// The cgroup all pods' cgroups are under, and its level.
    pub pods_cgroup: Option<(u64, u32)>,
    /// Pods of this node not attached (yet).
    pub not_attached: &'a std::collections::HashSet<ObjectRef>,
    /// Pods an earlier observer left pinned, not taken over yet: their
    /// entries stay as they are.
    pub kept: &'a std::collections::HashSet<u64>,
    /// Attached pods whose programs could not be pinned.
    pub fails_open: &'a std::collections::HashSet<u64>,
}

impl Enforcer {
    /// `inherited`: the maps hold an earlier observer's entries, which are
    /// the starting point (changed to this observer's as a diff; the same
    /// rules have the same ids).
    pub fn new(
        path: PathBuf,
        policies: Policies,
        maps: KernelPolicyMaps,
        failure_mode: FailureMode,
        inherited: bool,
        unix_hooks: bool,
    ) -> Self {
        let mut compiled = Compiled::default();
        if inherited {
            compiled.entries = maps.read();
        }
        Self {
            path,
            policies,
            failure_mode,
            compiler: Compiler::default(),
            compiled,
            maps,
            unenforced: BTreeSet::new(),
            label_keys: None,
            unix_hooks,
        }
    }

    /// Tells `keys` the label keys the policies' peer selectors use, now
    /// and whenever a reload changes them.
    pub fn announce_label_keys(&mut self, keys: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>) {
        self.label_keys = Some(keys);
        self.tell_label_keys();
    }

    fn tell_label_keys(&self) {
        let Some(keys) = &self.label_keys else {
            return;
        };
        let now = self.policies.peer_label_keys();
        keys.send_if_modified(|kept| {
            let changed = **kept != now;
            if changed {
                *kept = Arc::new(now);
            }
            changed
        });
    }

    /// The pods that fail closed, as last compiled.
    pub fn closed(&self) -> &std::collections::HashSet<u64> {
        &self.compiled.closed
    }

    /// Whether something keeps a pod from its policy that may go away by
    /// itself (hooks, cgroups, a map write): worth another try soon.
    pub fn wants_retry(&self) -> bool {
        self.unenforced.iter().any(|(_, reason)| reason.retried())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the policy file again after a change in its directory. An
    /// invalid file changes nothing: the last good policy stays in force. A
    /// rule naming a Service that does not exist is not a reason to refuse
    /// the file: that rule waits for it (see [`Unenforced`]). Returns
    /// whether the policies changed.
    pub fn reload(&mut self, metrics: &Metrics) -> bool {
        match super::load(&self.path, None) {
            Ok(policies) if policies == self.policies => false,
            Ok(policies) => {
                let rules: usize = policies.policies.iter().map(|p| p.spec.rules.len()).sum();
                tracing::info!(path = %self.path.display(), policies = policies.policies.len(), rules, "policy reloaded");
                self.policies = policies;
                self.tell_label_keys();
                metrics.policy_reloads.with_label_values(&["ok"]).inc();
                true
            }
            Err(err) => {
                tracing::error!(%err, "policy file refused: the last good policy stays in force");
                metrics.policy_reloads.with_label_values(&["refused"]).inc();
                metrics.error("policy");
                false
            }
        }
    }

    /// Compiles the policies for the attached pods and writes what changed
    /// to the kernel. Returns the rules' names if the kernel's entries
    /// changed (live inbound flows must then be decided again).
    pub fn apply(
        &mut self,
        world: &World,
        metrics: &Metrics,
    ) -> Option<Arc<HashMap<u32, RuleName>>> {
        let compiled = self.compiler.compile(&Inputs {
            policies: &self.policies,
            inventory: world.inventory,
            attached: world.attached,
            ids: world.ids,
            cgroups: world.cgroups,
            without_hooks: world.without_hooks,
            own_netns: world.own_netns,
            not_attached: world.not_attached,
            previous: &self.compiled.entries,
            capacity: Capacity::default(),
            failure_mode: self.failure_mode,
            kept: world.kept,
            fails_open: world.fails_open,
            unix_hooks: self.unix_hooks,
        });
        let (pods_cgroup, pods_level) = world.pods_cgroup.unwrap_or_default();
        let node = observer_common::NodeInfo {
            pods_cgroup,
            pods_level,
            _pad: 0,
        };
        // A change of who is the node's own calls for deciding live inbound
        // flows again, as a change of the entries does.
        let node_changed = match self.maps.set_node(node) {
            Ok(changed) => changed,
            Err(err) => {
                tracing::warn!(%err, "writing the policy maps");
                metrics.error("kernel_maps");
                false
            }
        };
        if compiled == self.compiled && !node_changed {
            self.report(compiled.unenforced, metrics);
            return None;
        }
        for problem in compiled
            .problems
            .iter()
            .filter(|p| !self.compiled.problems.contains(p))
        {
            tracing::warn!(problem = %problem, "policy");
        }
        match self.maps.sync(&self.compiled.entries, &compiled.entries) {
            Ok(()) => {
                let names = Arc::new(compiled.names.clone());
                self.report(compiled.unenforced.clone(), metrics);
                self.compiled = compiled;
                Some(names)
            }
            Err(err) => {
                // The maps are as they were: the pods whose entries were to
                // change keep their last ones, and wait for the next try.
                tracing::warn!(%err, "writing the policy maps");
                metrics.error("kernel_maps");
                let mut unenforced = compiled.unenforced;
                unenforced.extend(
                    changed_pods(&self.compiled.entries, &compiled.entries, world.attached)
                        .map(|pod| (pod, Unenforced::MapFull)),
                );
                self.report(unenforced, metrics);
                None
            }
        }
    }

    /// Sets the unenforced-pods gauge; logs what is new.
    fn report(&mut self, now: BTreeSet<(ObjectRef, Unenforced)>, metrics: &Metrics) {
        if now == self.unenforced {
            return;
        }
        for (pod, reason) in now.difference(&self.unenforced) {
            tracing::warn!(pod = %pod, reason = reason.as_str(), "a policy selects this pod, and does not (fully) hold it");
        }
        for (pod, reason) in self.unenforced.difference(&now) {
            tracing::info!(pod = %pod, reason = reason.as_str(), "resolved: the pod is held to its policy");
            let _ = metrics.policy_unenforced.remove_label_values(&[
                &pod.namespace,
                &pod.name,
                reason.as_str(),
            ]);
        }
        for (pod, reason) in &now {
            metrics
                .policy_unenforced
                .with_label_values(&[&pod.namespace, &pod.name, reason.as_str()])
                .set(1);
        }
        self.unenforced = now;
    }
}

/// The attached pods that were to get new entries (they keep their last
/// ones, if any): their rules, or their unix-socket decisions.
fn changed_pods<'a>(
    before: &'a PolicyEntries,
    after: &'a PolicyEntries,
    attached: &'a HashMap<ObjectRef, u64>,
) -> impl Iterator<Item = ObjectRef> + 'a {
    let unix: HashSet<u64> = after
        .unix
        .iter()
        .filter(|(key, verdict)| before.unix.get(key) != Some(verdict))
        .map(|(key, _)| key.netns)
        .collect();
    attached
        .iter()
        .filter(move |(_, cookie)| {
            let rules = after
                .pods
                .get(cookie)
                .is_some_and(|p| before.pods.get(cookie) != Some(p));
            rules || unix.contains(cookie)
        })
        .map(|(pod, _)| pod.clone())
}
