//! The policy file in force: reloaded when it changes (a refused file keeps
//! the last good one), compiled for the attached pods, and written to the
//! kernel's maps as changes.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use observer_common::inventory::Inventory;

use super::{
    Policies,
    compile::{Compiled, Compiler, Inputs, RuleName},
};
use crate::{
    kernel::policy_maps::KernelPolicyMaps,
    metrics::Metrics,
    names::{CgroupIds, Ids, ObjectRef},
};

/// The policy file, and what was compiled from it into the kernel.
pub struct Enforcer {
    path: PathBuf,
    policies: Policies,
    maps: KernelPolicyMaps,
    compiler: Compiler,
    compiled: Compiled,
    /// The Services it names were checked to exist (in Kubernetes mode they
    /// are known only once the API has been listed).
    services_checked: bool,
}

/// What the policies are compiled against.
pub struct World<'a> {
    pub inventory: &'a Inventory,
    pub ids: &'a Ids,
    pub cgroups: &'a CgroupIds,
    /// The pods attached, by namespace cookie.
    pub attached: &'a HashMap<ObjectRef, u64>,
    /// Every Service is known (the source is complete).
    pub complete: bool,
}

impl Enforcer {
    /// `services_checked`: whether `policies` was loaded with the Services
    /// known.
    pub fn new(
        path: PathBuf,
        policies: Policies,
        maps: KernelPolicyMaps,
        services_checked: bool,
    ) -> Self {
        Self {
            path,
            policies,
            maps,
            compiler: Compiler::default(),
            compiled: Compiled::default(),
            services_checked,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the policy file again after a change in its directory; with
    /// `services` (all that exist), rules naming another are refused. An
    /// invalid file changes nothing: the last good policy stays in force.
    /// Returns whether the policies changed.
    pub fn reload(
        &mut self,
        services: Option<&HashSet<(String, String)>>,
        metrics: &Metrics,
    ) -> bool {
        self.services_checked = services.is_some();
        match super::load(&self.path, services) {
            Ok(policies) if policies == self.policies => false,
            Ok(policies) => {
                let rules: usize = policies.policies.iter().map(|p| p.spec.rules.len()).sum();
                tracing::info!(path = %self.path.display(), policies = policies.policies.len(), rules, "policy reloaded");
                self.policies = policies;
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
        if world.complete && !self.services_checked {
            // The policy in force was read before the Services were known:
            // if it names one that does not exist, it is refused now (and
            // with no earlier good policy, none is in force).
            self.services_checked = true;
            let services = super::service_names(world.inventory);
            if let Some((problem, _)) = super::unknown_service(&self.policies, &services) {
                tracing::error!(path = %self.path.display(), "policy refused: {problem}");
                metrics.policy_reloads.with_label_values(&["refused"]).inc();
                metrics.error("policy");
                self.policies = Policies::default();
            }
        }
        let compiled = self.compiler.compile(&Inputs {
            policies: &self.policies,
            inventory: world.inventory,
            attached: world.attached,
            ids: world.ids,
            cgroups: world.cgroups,
        });
        if compiled == self.compiled {
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
                self.compiled = compiled;
                Some(names)
            }
            Err(err) => {
                tracing::warn!(%err, "writing the policy maps");
                metrics.error("kernel_maps");
                None
            }
        }
    }
}
