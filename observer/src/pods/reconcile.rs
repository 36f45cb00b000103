//! Keeps what is attached in step with the source: wakes on events (a
//! namespace appears, an inventory is rewritten, the API reports a pod, the
//! policy file changes), never on a slow poll; the only timer is a short
//! retry for a pod whose namespace is not there yet. Each round takes a
//! snapshot, plans, attaches and detaches, then brings the kernel's maps,
//! the policies and the collector up to date.
//! (Longer than most files: the one loop that applies every change; its
//! pure parts are in `plan.rs` and `source.rs`.)

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use observer_common::inventory::Inventory;
use tokio::sync::watch;

use super::{
    Snapshot,
    cluster::ClusterView,
    discovery,
    plan::{self, Attached},
    source::{Source, Trigger},
    watch::{CgroupWatch, DirWatch},
};
use crate::{
    flows::task::{CollectorEvent, CollectorHandle},
    kernel::{
        attach::{AttachError, AttachWorker},
        class_maps::{ClassEntries, ClassMapsWriter},
        netns::NetnsError,
    },
    metrics::Metrics,
    names::{CgroupIds, Ids, ObjectRef},
    policy::{self, compile::Unenforced, lifecycle::Enforcer},
};

/// After an event, pods whose namespace is not ready are looked for again
/// after 2 ms, then at doubling intervals up to 200 ms, for 3 s (`ip netns
/// add` bind-mounts the namespace on its file a moment after creating it,
/// without an event of its own).
const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(200);
const RETRY_FOR: Duration = Duration::from_secs(3);
/// Changes elsewhere in the cluster (peers, Services, nodes) are gathered
/// for this long before the kernel maps are updated.
const PEERS_SETTLE: Duration = Duration::from_millis(250);
/// A pod a policy cannot hold yet for a reason that may go away by itself
/// (its socket hooks, a cgroup) is tried again after 1 s, then at doubling
/// intervals up to 30 s.
const FIRST_POLICY_RETRY: Duration = Duration::from_secs(1);
const MAX_POLICY_RETRY: Duration = Duration::from_secs(30);

/// What an earlier observer left that this one takes over.
#[derive(Clone, Copy, Debug, Default)]
pub struct Takeover {
    /// Its maps, or links of pods it pinned.
    pub maps_or_links: bool,
    /// Its classification maps: the ids in them stay the same pods',
    /// Services' and nodes'.
    pub class_maps: bool,
}

pub struct Reconciler {
    source: Source,
    worker: AttachWorker,
    class_maps: ClassMapsWriter,
    enforcer: Option<Enforcer>,
    collector: CollectorHandle,
    metrics: Arc<Metrics>,
    attached: HashMap<String, Attached>,
    /// Targets whose namespace could not be entered or found yet.
    waiting: HashSet<String>,
    /// Targets whose attach failed for another reason (retried on events).
    failed: HashSet<String>,
    /// Attached namespaces (by cookie) whose pod has no socket hooks, and
    /// why: tried again at every round.
    without_hooks: HashMap<u64, Unenforced>,
    /// The observer's own namespace: no policy holds it.
    own_netns: Option<u64>,
    /// The last write of the classification maps failed: tried again.
    class_maps_failed: bool,
    /// The cgroup all pods' cgroups are under, once a pod's is known.
    pods_cgroup: Option<(u64, u32)>,
    pods_cgroup_told: bool,
    policy_retry_in: Duration,
    /// The next retry's delay, and until when retries go on.
    retry_in: Duration,
    retry_until: Instant,
    /// The names the kernel's maps were last written for.
    ids: Ids,
    names: Option<(Inventory, CgroupIds)>,
    /// An earlier observer's maps or pinned links are taken over: nothing is
    /// written, attached or detached until the source is complete (its
    /// programs go on counting and enforcing meanwhile), and then all of it
    /// in one round, the maps before the programs.
    taking_over: bool,
    /// The classification maps hold an earlier observer's ids: the same
    /// pods, Services and nodes keep them.
    adopt_ids: bool,
    /// Pods an earlier observer pinned that are not attached (yet), whose
    /// links are live: their policy entries stay as they are.
    kept: HashSet<u64>,
    /// Attached pods whose programs could not be pinned.
    fails_open: HashSet<u64>,
    /// Containers appearing in the attached pods' cgroups.
    cgroups: Option<CgroupWatch>,
}

impl Reconciler {
    pub fn new(
        source: Source,
        worker: AttachWorker,
        class_maps: ClassMapsWriter,
        enforcer: Option<Enforcer>,
        collector: CollectorHandle,
        metrics: Arc<Metrics>,
        takeover: Takeover,
    ) -> Self {
        Self {
            source,
            worker,
            class_maps,
            enforcer,
            collector,
            metrics,
            attached: HashMap::new(),
            waiting: HashSet::new(),
            failed: HashSet::new(),
            without_hooks: HashMap::new(),
            own_netns: crate::kernel::netns::cookie_of_current().ok(),
            class_maps_failed: false,
            pods_cgroup: None,
            pods_cgroup_told: false,
            policy_retry_in: FIRST_POLICY_RETRY,
            retry_in: FIRST_RETRY,
            retry_until: Instant::now() + RETRY_FOR,
            ids: Ids::default(),
            names: None,
            taking_over: takeover.maps_or_links,
            adopt_ids: takeover.class_maps,
            kept: HashSet::new(),
            fails_open: HashSet::new(),
            cgroups: CgroupWatch::new()
                .map_err(|err| tracing::warn!(%err, "cannot watch pods' cgroups: a restarted container is named once the source names it"))
                .ok(),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Reacts to changes until `stop` fires; sets `ready` after the first
    /// reconciliation with a complete source. Returns the worker for shutdown.
    pub async fn run(
        mut self,
        mut dir: Option<DirWatch>,
        mut policy_dir: Option<DirWatch>,
        ready: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) -> AttachWorker {
        let mut view = match &self.source {
            Source::Cluster(cluster) => Some(cluster.view.clone()),
            _ => None,
        };
        let mut local_changes = 0;
        let mut peers_due: Option<tokio::time::Instant> = None;
        // Retries are deadlines, not sleeps: events in between (a peer
        // elsewhere in the cluster) must not put them off.
        let mut retry_due: Option<tokio::time::Instant> = None;
        let mut policy_retry_due: Option<tokio::time::Instant> = None;
        self.reconcile_and_mark(Trigger::Local, &ready).await;
        loop {
            let retry = !self.waiting.is_empty() && Instant::now() < self.retry_until;
            if !retry {
                retry_due = None;
            } else if retry_due.is_none() {
                retry_due = Some(tokio::time::Instant::now() + self.retry_in);
            }
            let policy_retry =
                self.class_maps_failed || self.enforcer.as_ref().is_some_and(Enforcer::wants_retry);
            if !policy_retry {
                self.policy_retry_in = FIRST_POLICY_RETRY;
                policy_retry_due = None;
            } else if policy_retry_due.is_none() {
                policy_retry_due = Some(tokio::time::Instant::now() + self.policy_retry_in);
            }
            let trigger = tokio::select! {
                _ = stop.changed() => break,
                changed = changed(dir.as_mut()) => {
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
                created = created(self.cgroups.as_mut()) => {
                    if let Err(err) = created {
                        tracing::warn!(%err, "watching pods' cgroups");
                        self.metrics.error("watch");
                    }
                    Trigger::Containers
                }
                changed = changed(policy_dir.as_mut()) => {
                    if let Err(err) = changed {
                        tracing::warn!(%err, "watching the policy file");
                        self.metrics.error("watch");
                    }
                    if !self.reload_policy() {
                        continue;
                    }
                    Trigger::Peers
                }
                _ = sleep_until(policy_retry_due) => {
                    policy_retry_due = None;
                    self.policy_retry_in = (self.policy_retry_in * 2).min(MAX_POLICY_RETRY);
                    self.reconcile_and_mark(Trigger::Local, &ready).await;
                    continue;
                }
                _ = sleep_until(retry_due) => {
                    retry_due = None;
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
                retry_due = None;
            }
            self.reconcile_and_mark(trigger, &ready).await;
        }
        self.worker
    }

    async fn reconcile_and_mark(&mut self, trigger: Trigger, ready: &AtomicBool) {
        let started = Instant::now();
        let complete = self.reconcile(trigger).await;
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if complete && !ready.swap(true, Ordering::AcqRel) {
            // From now on every pod is known: flows of others may go.
            self.collector
                .send(CollectorEvent::Complete { watched: true });
        }
    }

    /// One round. Returns whether the source was complete (false also when
    /// it could not be read: the current state then stays).
    async fn reconcile(&mut self, trigger: Trigger) -> bool {
        let Some(mut snapshot) = self.source.snapshot(trigger, &self.metrics) else {
            return false;
        };
        if self.taking_over && !snapshot.complete {
            // Half a view would unwrite what the earlier observer wrote.
            return false;
        }
        // Names first: a pod's first packets are classified with them.
        if let Some(inventory) = snapshot.inventory.take() {
            if std::mem::take(&mut self.adopt_ids) {
                self.class_maps
                    .written()
                    .adopt_ids(&mut self.ids, &inventory);
            }
            self.sync_names(inventory, std::mem::take(&mut snapshot.cgroups));
        }
        self.attach(&snapshot).await;
        self.attach_missing_hooks(&snapshot).await;
        if let Some(watch) = self.cgroups.as_mut() {
            let cgroups: HashSet<std::path::PathBuf> = self
                .attached
                .keys()
                .filter_map(|key| snapshot.targets.get(key)?.cgroup.clone())
                .collect();
            watch.set(&cgroups);
        }
        if self.pods_cgroup.is_none() {
            let mut cgroups = snapshot
                .targets
                .values()
                .filter_map(|t| t.cgroup.as_deref());
            let first = cgroups.next();
            self.pods_cgroup = first.and_then(discovery::pods_cgroup);
            if let Some((cgroup, level)) = self.pods_cgroup {
                self.collector
                    .send(CollectorEvent::PodsCgroup(cgroup, level));
            }
            if let (Some(cgroup), None, false) = (first, self.pods_cgroup, self.pods_cgroup_told) {
                self.pods_cgroup_told = true;
                tracing::warn!(cgroup = %cgroup.display(), "no kubepods cgroup above the pods' cgroups: the node's own processes (the kubelet's probes) are judged by ingress rules as class node");
            }
        }
        let not_attached: HashSet<ObjectRef> = self
            .waiting
            .iter()
            .chain(&self.failed)
            .filter_map(|key| snapshot.targets.get(key))
            .map(|t| t.pod.clone())
            .collect();
        if self.taking_over || !self.kept.is_empty() {
            self.sort_out_pins().await;
        }
        self.apply_policy(&not_attached);
        // Programs of links taken over are swapped once the maps they read
        // hold this observer's entries.
        if self.taking_over {
            let committed = self.worker.commit().await;
            self.metrics.errors_of("detach", committed.filters_left);
            tracing::info!(pods = committed.pods, "took over from the earlier observer");
            self.taking_over = false;
        }
        let closed = self
            .enforcer
            .as_ref()
            .map(|e| e.closed().clone())
            .unwrap_or_default();
        let fails_open = self.worker.fail_closed(closed).await;
        if fails_open != self.fails_open {
            // The gauge says so at the next round (a retry is due).
            self.fails_open = fails_open;
            self.apply_policy(&not_attached);
        }
        let Snapshot {
            host_network,
            complete,
            ..
        } = snapshot;
        let pods = &self.metrics.pods;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (state, n) in [
            ("attached", self.attached.len()),
            ("waiting", self.waiting.len()),
            ("failed", self.failed.len()),
            ("host_network", host_network),
        ] {
            pods.with_label_values(&[state]).set(count(n));
        }
        complete
    }

    /// Attaches what is new, detaches what is gone.
    async fn attach(&mut self, snapshot: &Snapshot) {
        let plan = plan::plan(&self.attached, &snapshot.targets, discovery::netns_id);
        for key in plan.detach {
            let Some(attached) = self.attached.remove(&key) else {
                continue;
            };
            self.without_hooks.remove(&attached.cookie);
            if let Err(err) = self.worker.detach(attached.cookie).await {
                tracing::warn!(%err, "detach");
                self.metrics.error("detach");
            }
            self.collector
                .send(CollectorEvent::Detached(attached.cookie));
        }
        self.waiting
            .retain(|key| snapshot.targets.contains_key(key));
        self.failed.retain(|key| snapshot.targets.contains_key(key));
        self.waiting.extend(plan.waiting);
        // Asked all at once: the worker makes their links in parallel.
        let worker = &self.worker;
        let asked = plan.attach.into_iter().filter_map(|key| {
            let target = &snapshot.targets[&key];
            let path = target.path.as_ref()?;
            let check = target.check.clone().map(|check| {
                let path = path.clone();
                Box::new(move |opened| {
                    discovery::still_the_pods(&path, opened, &check.pod_uid, check.host_netns)
                }) as crate::kernel::attach::Check
            });
            let cgroup = target.cgroup.as_deref();
            Some(async move {
                let result = worker.attach(path, target.pod.clone(), cgroup, check).await;
                (key, result)
            })
        });
        let results = futures::future::join_all(asked).await;
        for (key, result) in results {
            let target = &snapshot.targets[&key];
            let cgroup = target.cgroup.as_deref();
            match result {
                Ok(attached) => {
                    self.waiting.remove(&key);
                    self.failed.remove(&key);
                    if !attached.policy_hooks {
                        let reason = match cgroup {
                            Some(_) => Unenforced::NoHooks,
                            None => Unenforced::NoCgroup,
                        };
                        self.without_hooks.insert(attached.cookie, reason);
                    }
                    // Said in the log where it happened; counted here.
                    self.metrics.errors_of("detach", attached.filters_left);
                    let entry = Attached {
                        cookie: attached.cookie,
                        pod: attached.pod.clone(),
                        netns: attached.netns_id,
                        lo_only_without_ip: attached.programs == 1 && !target.has_ip,
                    };
                    self.collector.send(CollectorEvent::Attached(attached));
                    self.attached.insert(key, entry);
                }
                // Not a namespace yet: `ip netns add` creates the file, then
                // bind-mounts the namespace on it. Or gone meanwhile (or
                // its PID given to another process): looked for again.
                Err(
                    AttachError::Netns(NetnsError::NotNetns { .. } | NetnsError::NotFound { .. })
                    | AttachError::NotTheOne { .. },
                ) => {
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
    }

    /// Pods an earlier observer pinned and this one has not attached: while
    /// some pods of the source wait for their namespace, those pins may be
    /// theirs and stay (with their policy); once none waits, they belong to
    /// no pod this observer knows, and go. Pins whose hooks are gone go at
    /// once.
    async fn sort_out_pins(&mut self) {
        let unclaimed = self.worker.unclaimed().await;
        if self.waiting.is_empty() && self.failed.is_empty() {
            self.worker.forget(unclaimed).await;
            self.kept.clear();
        } else {
            self.kept = unclaimed.into_iter().collect();
        }
    }

    /// Tries again to attach the socket hooks of pods that have none: their
    /// cgroup is known now, or attaching failed before.
    async fn attach_missing_hooks(&mut self, snapshot: &Snapshot) {
        for (key, attached) in &self.attached {
            if !self.without_hooks.contains_key(&attached.cookie) {
                continue;
            }
            let Some(cgroup) = snapshot.targets.get(key).and_then(|t| t.cgroup.as_deref()) else {
                continue;
            };
            match self.worker.attach_hooks(attached.cookie, cgroup).await {
                Ok(true) => {
                    self.without_hooks.remove(&attached.cookie);
                }
                Ok(false) => {
                    self.without_hooks
                        .insert(attached.cookie, Unenforced::NoHooks);
                }
                Err(err) => tracing::debug!(%err, "socket hooks"),
            }
        }
    }

    /// Gives a changed inventory's objects ids, writes them to the kernel's
    /// classification maps and tells the collector the new names.
    fn sync_names(&mut self, inventory: Inventory, cgroups: CgroupIds) {
        if !self.class_maps_failed
            && self
                .names
                .as_ref()
                .is_some_and(|(i, c)| *i == inventory && *c == cgroups)
        {
            return;
        }
        let identities = self.ids.update(&inventory, &cgroups);
        let entries = ClassEntries::new(&inventory, &self.ids);
        // A failed write is tried again on a timer (the maps converge: each
        // write is of what differs from the last complete one).
        self.class_maps_failed = match self.class_maps.sync(entries) {
            Ok(()) => false,
            Err(err) => {
                tracing::warn!(%err, "updating the kernel's maps");
                self.metrics.error("kernel_maps");
                true
            }
        };
        self.collector
            .send(CollectorEvent::Identities(Arc::new(identities)));
        self.names = Some((inventory, cgroups));
    }

    /// Reads the policy file again; returns whether the policies changed.
    fn reload_policy(&mut self) -> bool {
        let Some(enforcer) = self.enforcer.as_mut() else {
            return false;
        };
        enforcer.reload(&self.metrics)
    }

    /// Compiles the policies for the pods attached now and writes what
    /// changed to the kernel.
    fn apply_policy(&mut self, not_attached: &HashSet<ObjectRef>) {
        let (Some(enforcer), Some((inventory, cgroups))) =
            (self.enforcer.as_mut(), self.names.as_ref())
        else {
            return;
        };
        let attached: HashMap<ObjectRef, u64> = self
            .attached
            .values()
            .map(|a| (a.pod.clone(), a.cookie))
            .collect();
        let world = policy::lifecycle::World {
            inventory,
            ids: &self.ids,
            cgroups,
            attached: &attached,
            without_hooks: &self.without_hooks,
            own_netns: self.own_netns,
            pods_cgroup: self.pods_cgroup,
            not_attached,
            kept: &self.kept,
            fails_open: &self.fails_open,
        };
        let Some(names) = enforcer.apply(&world, &self.metrics) else {
            return;
        };
        self.collector.send(CollectorEvent::PolicyNames(names));
        // Live inbound flows take the new ingress verdicts.
        if let Err(err) = self.class_maps.reclassify() {
            tracing::warn!(%err, "classifying live flows again");
            self.metrics.error("kernel_maps");
        }
    }
}

async fn changed(dir: Option<&mut DirWatch>) -> std::io::Result<()> {
    match dir {
        Some(dir) => dir.changed().await,
        None => std::future::pending().await,
    }
}

async fn created(watch: Option<&mut CgroupWatch>) -> std::io::Result<()> {
    match watch {
        Some(watch) => watch.created().await,
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
