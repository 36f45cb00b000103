//! Keeps what is attached in step with where the pods come from: the
//! namespaces in a directory, the pods of an inventory, or this node's pods
//! in the Kubernetes API. Wakes on events (a namespace appears, an inventory
//! is rewritten, the API reports a pod), never on a slow poll; the only
//! timer is a short retry for a pod whose namespace is not there yet.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use observer_common::inventory::Inventory;
use tokio::sync::{mpsc, watch};

use crate::{
    attach::{AttachError, AttachWorker, AttachedNetns},
    cluster::{ClusterView, view},
    discovery::{self, FoundPod},
    identities::{ObjectRef, SharedIdentities},
    kernel_maps::KernelMaps,
    metrics::Metrics,
    netns::{self, NetnsError},
    policy::{
        self, Policies,
        compile::{Compiled, Compiler, RuleName},
        kernel::PolicyMaps,
    },
    watch::DirWatch,
};

/// After an event, pods whose namespace is not ready are looked for again
/// after 10 ms, then at doubling intervals up to 200 ms, for 3 s (`ip netns
/// add` bind-mounts the namespace on its file a moment after creating it,
/// without an event of its own).
const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_millis(200);
const RETRY_FOR: Duration = Duration::from_secs(3);
/// Changes elsewhere in the cluster (peers, Services, nodes) are gathered
/// for this long before the kernel maps are updated.
const PEERS_SETTLE: Duration = Duration::from_millis(250);

/// Where pods come from.
pub enum Source {
    /// Every network namespace in this directory (named after itself).
    Dir(PathBuf),
    /// The pods of this inventory (only those of `node`, if given).
    Inventory { path: PathBuf, node: Option<String> },
    /// The Kubernetes API: this node's pods, found on the node through
    /// `proc_root` and `cgroup_root`.
    Cluster {
        view: watch::Receiver<ClusterView>,
        node: String,
        service_cidr: Option<Ipv4Net>,
        proc_root: PathBuf,
        cgroup_root: PathBuf,
    },
}

/// What the collector learns while it runs.
pub enum CollectorEvent {
    Attached(AttachedNetns),
    Detached(u64),
    Identities(SharedIdentities),
    /// Names of the policy rules in the kernel's verdict counts, by id.
    PolicyNames(Arc<HashMap<u32, RuleName>>),
}

/// A pod (or bare namespace) to be attached.
struct Target {
    /// Its namespace; `None` while no process of the pod runs (between
    /// restarts, with a runtime that keeps no sandbox process): an attached
    /// pod then stays attached.
    path: Option<PathBuf>,
    pod: ObjectRef,
    /// The pod's cgroup (the parent of its containers'), for the policy hooks.
    cgroup: Option<PathBuf>,
    /// It has an IP, so CNI has given it its `eth0`.
    has_ip: bool,
}

/// A namespace attached to.
struct Attached {
    cookie: u64,
    pod: ObjectRef,
    /// Which namespace: a pod whose namespace is replaced (its sandbox
    /// recreated) is attached again.
    netns: (u64, u64),
    /// Attached to `lo` only, before the pod had an IP: attached again once
    /// it has one (and so an `eth0`).
    lo_only_without_ip: bool,
}

/// What the source says now.
#[derive(Default)]
struct Wanted {
    /// By a key stable over the pod's life (its UID, or the namespace's path).
    targets: HashMap<String, Target>,
    /// Pods sharing the node's namespace: not attached.
    host_network: usize,
    /// The source is complete (in Kubernetes mode: every watch has listed).
    complete: bool,
}

/// Why a reconciliation runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Something about this node's pods: look at the node's processes again.
    Local,
    /// Only the rest of the cluster changed.
    Peers,
}

/// The policy file, and what was compiled from it into the kernel.
pub struct PolicyState {
    pub path: PathBuf,
    pub policies: Policies,
    pub maps: PolicyMaps,
    compiler: Compiler,
    compiled: Compiled,
    /// The Services it names were checked to exist (in Kubernetes mode they
    /// are known only once the API has been listed).
    services_checked: bool,
}

impl PolicyState {
    /// `services_checked`: whether `policies` was loaded with the Services
    /// known.
    pub fn new(
        path: PathBuf,
        policies: Policies,
        maps: PolicyMaps,
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
}

pub struct Reconciler {
    source: Source,
    policy: Option<PolicyState>,
    worker: AttachWorker,
    kernel_maps: KernelMaps,
    events: mpsc::UnboundedSender<CollectorEvent>,
    metrics: Arc<Metrics>,
    attached: HashMap<String, Attached>,
    /// Targets whose namespace could not be entered or found yet.
    waiting: HashSet<String>,
    /// Targets whose attach failed for another reason (retried on events).
    failed: HashSet<String>,
    /// The next retry's delay, and until when retries go on.
    retry_in: Duration,
    retry_until: Instant,
    inventory: Option<Inventory>,
    /// Kubernetes mode: the pods found on the node at the last look, and
    /// the `local_changes` of the view then.
    found: HashMap<String, FoundPod>,
    found_at: Option<u64>,
    /// The last reconciliation had a complete source: its Services are all.
    complete: bool,
}

impl Reconciler {
    pub fn new(
        source: Source,
        worker: AttachWorker,
        kernel_maps: KernelMaps,
        events: mpsc::UnboundedSender<CollectorEvent>,
        metrics: Arc<Metrics>,
        policy: Option<PolicyState>,
    ) -> Self {
        Self {
            source,
            policy,
            worker,
            kernel_maps,
            events,
            metrics,
            attached: HashMap::new(),
            waiting: HashSet::new(),
            failed: HashSet::new(),
            retry_in: FIRST_RETRY,
            retry_until: Instant::now() + RETRY_FOR,
            inventory: None,
            found: HashMap::new(),
            found_at: None,
            complete: false,
        }
    }

    /// The directory whose changes matter (for the Kubernetes API: where the
    /// runtime makes pod namespaces, a hint that a pod is coming up).
    pub fn watched_dir(&self, netns_dir: &Path) -> PathBuf {
        match &self.source {
            Source::Dir(dir) => dir.clone(),
            Source::Inventory { path, .. } => path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            Source::Cluster { .. } => netns_dir.to_path_buf(),
        }
    }

    /// Reacts to changes until `stop` fires; sets `ready` after the first
    /// reconciliation with a complete source. Returns the worker for shutdown.
    pub async fn run(
        mut self,
        dir: Option<DirWatch>,
        policy_dir: Option<DirWatch>,
        ready: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) -> AttachWorker {
        let mut view = match &self.source {
            Source::Cluster { view, .. } => Some(view.clone()),
            _ => None,
        };
        let mut local_changes = 0;
        let mut peers_due: Option<tokio::time::Instant> = None;
        self.reconcile_and_mark(Trigger::Local, &ready).await;
        loop {
            let retry = !self.waiting.is_empty() && Instant::now() < self.retry_until;
            let trigger = tokio::select! {
                _ = stop.changed() => break,
                changed = changed(dir.as_ref()) => {
                    if let Err(err) = changed {
                        tracing::warn!(%err, "watching for pods");
                        self.metrics.error("watch");
                    }
                    Trigger::Local
                }
                changed = view_changed(view.as_mut()) => {
                    let Some(view) = view.as_ref().filter(|_| changed.is_ok()) else {
                        // The watches stopped: only at shutdown.
                        view = None;
                        continue;
                    };
                    let now = view.borrow().local_changes;
                    if now == local_changes {
                        // Elsewhere in the cluster: gather a few.
                        peers_due.get_or_insert_with(|| tokio::time::Instant::now() + PEERS_SETTLE);
                        continue;
                    }
                    local_changes = now;
                    Trigger::Local
                }
                _ = sleep_until(peers_due) => Trigger::Peers,
                changed = changed(policy_dir.as_ref()) => {
                    if let Err(err) = changed {
                        tracing::warn!(%err, "watching the policy file");
                        self.metrics.error("watch");
                    }
                    if !self.reload_policy() {
                        continue;
                    }
                    Trigger::Peers
                }
                _ = tokio::time::sleep(self.retry_in), if retry => {
                    self.retry_in = (self.retry_in * 2).min(MAX_RETRY);
                    self.reconcile_and_mark(Trigger::Local, &ready).await;
                    continue;
                }
            };
            peers_due = None;
            if trigger == Trigger::Local {
                // A new event here: pods still missing get fresh retries.
                self.retry_in = FIRST_RETRY;
                self.retry_until = Instant::now() + RETRY_FOR;
            }
            self.reconcile_and_mark(trigger, &ready).await;
        }
        self.worker
    }

    async fn reconcile_and_mark(&mut self, trigger: Trigger, ready: &AtomicBool) {
        if self.reconcile(trigger).await {
            ready.store(true, Ordering::Release);
        }
    }

    /// Attaches what is new, detaches what is gone. Returns whether the
    /// source was complete (false also when it could not be read: the
    /// current state then stays).
    async fn reconcile(&mut self, trigger: Trigger) -> bool {
        let Some(wanted) = self.wanted(trigger) else {
            return false;
        };
        let mut detach = Vec::new();
        for (key, attached) in &self.attached {
            let Some(target) = wanted.targets.get(key) else {
                detach.push(key.clone());
                continue;
            };
            // No process, or it ended since the look: keep what is attached.
            let Some(now) = target.path.as_deref().and_then(discovery::netns_id) else {
                continue;
            };
            if now != attached.netns || (attached.lo_only_without_ip && target.has_ip) {
                detach.push(key.clone());
            }
        }
        for key in detach {
            let Some(attached) = self.attached.remove(&key) else {
                continue;
            };
            if let Err(err) = self.worker.detach(attached.cookie).await {
                tracing::warn!(%err, "detach");
                self.metrics.error("detach");
            }
            let _ = self.events.send(CollectorEvent::Detached(attached.cookie));
        }
        self.waiting.retain(|key| wanted.targets.contains_key(key));
        self.failed.retain(|key| wanted.targets.contains_key(key));
        for (key, target) in wanted.targets {
            if self.attached.contains_key(&key) {
                continue;
            }
            let Some(path) = target.path else {
                self.waiting.insert(key);
                continue;
            };
            let cgroup = target.cgroup.as_deref();
            match self.worker.attach(&path, target.pod, cgroup).await {
                Ok(attached) => {
                    self.waiting.remove(&key);
                    self.failed.remove(&key);
                    let entry = Attached {
                        cookie: attached.cookie,
                        pod: attached.pod.clone(),
                        netns: attached.netns_id,
                        lo_only_without_ip: attached.programs == 1 && !target.has_ip,
                    };
                    let _ = self.events.send(CollectorEvent::Attached(attached));
                    self.attached.insert(key, entry);
                }
                // Not a namespace yet: `ip netns add` creates the file, then
                // bind-mounts the namespace on it. Or gone meanwhile.
                Err(AttachError::Netns(
                    NetnsError::NotNetns { .. } | NetnsError::NotFound { .. },
                )) => {
                    self.waiting.insert(key);
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot attach");
                    self.metrics.error("attach");
                    self.waiting.remove(&key);
                    self.failed.insert(key);
                }
            }
        }
        self.complete = wanted.complete;
        self.apply_policy();
        let pods = &self.metrics.pods;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        pods.with_label_values(&["attached"])
            .set(count(self.attached.len()));
        pods.with_label_values(&["waiting"])
            .set(count(self.waiting.len()));
        pods.with_label_values(&["failed"])
            .set(count(self.failed.len()));
        pods.with_label_values(&["host_network"])
            .set(count(wanted.host_network));
        wanted.complete
    }

    /// What there should be; `None` if the source cannot be read now.
    fn wanted(&mut self, trigger: Trigger) -> Option<Wanted> {
        match &self.source {
            Source::Dir(dir) => {
                let entries = match std::fs::read_dir(dir) {
                    Ok(entries) => entries,
                    Err(err) => {
                        tracing::warn!(%err, dir = %dir.display(), "listing namespaces");
                        self.metrics.error("list_netns");
                        return None;
                    }
                };
                let targets = entries
                    .flatten()
                    .map(|e| e.path())
                    .map(|path| {
                        let target = Target {
                            pod: ObjectRef::new("", &netns::display_name(&path)),
                            path: Some(path.clone()),
                            cgroup: None,
                            has_ip: false,
                        };
                        (path.display().to_string(), target)
                    })
                    .collect();
                Some(Wanted {
                    targets,
                    complete: true,
                    ..Wanted::default()
                })
            }
            Source::Inventory { path, node } => {
                let node = node.clone();
                let inventory = match crate::inventory::load_for_node(path, node.as_deref()) {
                    Ok(inventory) => inventory,
                    Err(err) => {
                        // A half-written file, say: keep what we have.
                        tracing::warn!(%err, "reading the inventory");
                        self.metrics.error("inventory");
                        return None;
                    }
                };
                let targets = inventory
                    .pods
                    .iter()
                    .filter(|p| node.as_deref().is_none_or(|n| p.node == n))
                    .filter_map(|p| {
                        let target = Target {
                            path: Some(p.netns.clone()?),
                            pod: ObjectRef::new(&p.namespace, &p.name),
                            cgroup: pod_cgroup(p.containers.iter().map(|c| c.cgroup.as_path())),
                            has_ip: true,
                        };
                        Some((p.uid.clone(), target))
                    })
                    .collect();
                self.sync_kernel_maps(inventory);
                Some(Wanted {
                    targets,
                    complete: true,
                    ..Wanted::default()
                })
            }
            Source::Cluster {
                view,
                node,
                service_cidr,
                proc_root,
                cgroup_root,
            } => {
                let view = view.borrow().clone();
                // This node's pods are enough to attach; the rest of the
                // cluster only names peers.
                if !view.local_pods.synced {
                    return None;
                }
                if trigger == Trigger::Local || self.found_at != Some(view.local_changes) {
                    // Reading every process' cgroup is blocking work.
                    self.found = tokio::task::block_in_place(|| {
                        view::find_on_node(&view, proc_root, cgroup_root)
                    });
                    self.found_at = Some(view.local_changes);
                }
                let inventory = view.inventory(node, *service_cidr, &self.found);
                // Found is enough: a pod is attached before it has an IP.
                // Terminating pods stay attached while their processes run.
                let targets = view
                    .pods_to_attach()
                    .filter_map(|p| {
                        let found = self.found.get(&p.node_uid);
                        let path = found.map(|f| f.netns.clone());
                        if path.is_none() && p.terminating {
                            return None;
                        }
                        let target = Target {
                            path,
                            pod: ObjectRef::new(&p.namespace, &p.name),
                            cgroup: found.and_then(|f| {
                                pod_cgroup(f.containers.values().map(PathBuf::as_path))
                            }),
                            has_ip: p.ip.is_some(),
                        };
                        Some((p.uid.clone(), target))
                    })
                    .collect();
                let host_network = view
                    .local_pods
                    .items
                    .values()
                    .filter(|p| p.host_network && !p.finished)
                    .count();
                let complete = view.synced();
                self.sync_kernel_maps(inventory);
                Some(Wanted {
                    targets,
                    host_network,
                    complete,
                })
            }
        }
    }

    /// Reads the policy file again after a change in its directory. An
    /// invalid file changes nothing: the last good policy stays in force.
    /// Returns whether the policies changed.
    fn reload_policy(&mut self) -> bool {
        let Some(state) = self.policy.as_mut() else {
            return false;
        };
        // Services are checked once every one is known.
        let known = self.inventory.as_ref().filter(|_| self.complete);
        state.services_checked = known.is_some();
        let services = known.map(policy::service_names);
        match policy::load(&state.path, services.as_ref()) {
            Ok(policies) if policies == state.policies => false,
            Ok(policies) => {
                let rules: usize = policies.policies.iter().map(|p| p.spec.rules.len()).sum();
                tracing::info!(path = %state.path.display(), policies = policies.policies.len(), rules, "policy reloaded");
                state.policies = policies;
                self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
                true
            }
            Err(err) => {
                tracing::error!(%err, "policy file refused: the last good policy stays in force");
                self.metrics
                    .policy_reloads
                    .with_label_values(&["refused"])
                    .inc();
                self.metrics.error("policy");
                false
            }
        }
    }

    /// Compiles the policies for the pods attached now and writes what
    /// changed to the kernel.
    fn apply_policy(&mut self) {
        if self.complete
            && let (Some(state), Some(inventory)) = (self.policy.as_mut(), self.inventory.as_ref())
            && !state.services_checked
        {
            // The policy in force was read before the Services were known:
            // if it names one that does not exist, it is refused now (and
            // with no earlier good policy, none is in force).
            state.services_checked = true;
            let services = policy::service_names(inventory);
            if let Some((problem, _)) = policy::unknown_service(&state.policies, &services) {
                tracing::error!(path = %state.path.display(), "policy refused: {problem}");
                self.metrics
                    .policy_reloads
                    .with_label_values(&["refused"])
                    .inc();
                self.metrics.error("policy");
                state.policies = Policies::default();
            }
        }
        let (Some(state), Some(inventory)) = (self.policy.as_mut(), self.inventory.as_ref()) else {
            return;
        };
        let attached: HashMap<ObjectRef, u64> = self
            .attached
            .values()
            .map(|a| (a.pod.clone(), a.cookie))
            .collect();
        let compiled = state.compiler.compile(
            &state.policies,
            inventory,
            &attached,
            self.kernel_maps.ids(),
        );
        if compiled == state.compiled {
            return;
        }
        for problem in compiled
            .problems
            .iter()
            .filter(|p| !state.compiled.problems.contains(p))
        {
            tracing::warn!(problem = %problem, "policy");
        }
        match state.maps.sync(&state.compiled, &compiled) {
            Ok(()) => {
                let names = Arc::new(compiled.names.clone());
                let _ = self.events.send(CollectorEvent::PolicyNames(names));
                state.compiled = compiled;
                // Live inbound flows take the new ingress verdicts.
                if let Err(err) = self.kernel_maps.reclassify() {
                    tracing::warn!(%err, "classifying live flows again");
                    self.metrics.error("kernel_maps");
                }
            }
            Err(err) => {
                tracing::warn!(%err, "writing the policy maps");
                self.metrics.error("kernel_maps");
            }
        }
    }

    /// Writes a changed inventory to the kernel's maps and tells the
    /// collector the new names.
    fn sync_kernel_maps(&mut self, inventory: Inventory) {
        if self.inventory.as_ref() == Some(&inventory) {
            return;
        }
        match self.kernel_maps.sync(&inventory) {
            Ok(identities) => {
                let _ = self
                    .events
                    .send(CollectorEvent::Identities(Arc::new(identities)));
            }
            Err(err) => {
                tracing::warn!(%err, "updating the kernel's maps");
                self.metrics.error("kernel_maps");
            }
        }
        self.inventory = Some(inventory);
    }
}

/// A pod's cgroup: the directory its containers' cgroups are in.
fn pod_cgroup<'a>(mut containers: impl Iterator<Item = &'a Path>) -> Option<PathBuf> {
    containers
        .next()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

async fn changed(dir: Option<&DirWatch>) -> std::io::Result<()> {
    match dir {
        Some(dir) => dir.changed().await,
        None => std::future::pending().await,
    }
}

async fn view_changed(
    view: Option<&mut watch::Receiver<ClusterView>>,
) -> Result<(), watch::error::RecvError> {
    match view {
        Some(view) => view.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
