//! Keeps what is attached in step with where the pods come from: the
//! namespaces in a directory, the pods of an inventory, or this node's pods
//! in the Kubernetes API. Wakes on events (a namespace appears, an inventory
//! is rewritten, the API reports a pod), never on a slow poll; the only
//! timer is a short retry for a pod whose namespace is not there yet.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
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
    identities::{ObjectRef, SharedIdentities},
    kernel_maps::KernelMaps,
    metrics::Metrics,
    netns::{self, NetnsError},
    watch::DirWatch,
};

/// After an event, pods whose namespace is not ready are looked for again
/// after 10 ms, then at doubling intervals up to 200 ms, for 3 s (`ip netns
/// add` bind-mounts the namespace on its file a moment after creating it,
/// without an event of its own).
const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_millis(200);
const RETRY_FOR: Duration = Duration::from_secs(3);

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
}

/// A namespace to attach to.
struct Target {
    path: PathBuf,
    pod: ObjectRef,
}

/// A namespace attached to.
struct Attached {
    cookie: u64,
    /// Device and inode of the namespace: a pod whose namespace is replaced
    /// (its sandbox recreated) is attached again.
    netns: (u64, u64),
}

/// What the source says now.
#[derive(Default)]
struct Wanted {
    /// By a key stable over the pod's life (its UID, or the namespace's path).
    targets: HashMap<String, Target>,
    /// Pods known but not found on the node yet.
    waiting: usize,
    /// Pods sharing the node's namespace: not attached.
    host_network: usize,
}

pub struct Reconciler {
    source: Source,
    worker: AttachWorker,
    kernel_maps: KernelMaps,
    events: mpsc::UnboundedSender<CollectorEvent>,
    metrics: Arc<Metrics>,
    attached: HashMap<String, Attached>,
    /// Targets whose namespace could not be entered yet (a bind mount in
    /// progress).
    pending: HashSet<String>,
    waiting: usize,
    /// The next retry's delay, and until when retries go on.
    retry_in: Duration,
    retry_until: Instant,
    inventory: Option<Inventory>,
}

impl Reconciler {
    pub fn new(
        source: Source,
        worker: AttachWorker,
        kernel_maps: KernelMaps,
        events: mpsc::UnboundedSender<CollectorEvent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            source,
            worker,
            kernel_maps,
            events,
            metrics,
            attached: HashMap::new(),
            pending: HashSet::new(),
            waiting: 0,
            retry_in: FIRST_RETRY,
            retry_until: Instant::now() + RETRY_FOR,
            inventory: None,
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
    /// complete reconciliation. Returns the worker for shutdown.
    pub async fn run(
        mut self,
        dir: Option<DirWatch>,
        ready: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) -> AttachWorker {
        let mut view = match &self.source {
            Source::Cluster { view, .. } => Some(view.clone()),
            _ => None,
        };
        if self.reconcile().await {
            ready.store(true, Ordering::Release);
        }
        loop {
            let retry =
                (!self.pending.is_empty() || self.waiting > 0) && Instant::now() < self.retry_until;
            tokio::select! {
                _ = stop.changed() => break,
                changed = changed(dir.as_ref()) => {
                    if let Err(err) = changed {
                        tracing::warn!(%err, "watching for pods");
                        self.metrics.error("watch");
                    }
                }
                changed = view_changed(view.as_mut()) => {
                    if changed.is_err() {
                        // The watches stopped: only at shutdown.
                        view = None;
                    }
                }
                _ = tokio::time::sleep(self.retry_in), if retry => {
                    self.retry_in = (self.retry_in * 2).min(MAX_RETRY);
                    self.reconcile_and_mark(&ready).await;
                    continue;
                }
            }
            // A new event: pods still missing get fresh retries.
            self.retry_in = FIRST_RETRY;
            self.retry_until = Instant::now() + RETRY_FOR;
            self.reconcile_and_mark(&ready).await;
        }
        self.worker
    }

    async fn reconcile_and_mark(&mut self, ready: &AtomicBool) {
        if self.reconcile().await {
            ready.store(true, Ordering::Release);
        }
    }

    /// Attaches what is new, detaches what is gone. Returns false when the
    /// source could not be read (the current state then stays).
    pub async fn reconcile(&mut self) -> bool {
        let Some(wanted) = self.wanted() else {
            return false;
        };
        let current: HashMap<String, Option<(u64, u64)>> = wanted
            .targets
            .iter()
            .map(|(key, target)| (key.clone(), netns_id(&target.path)))
            .collect();
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(key, attached)| current.get(*key) != Some(&Some(attached.netns)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let Some(attached) = self.attached.remove(&key) else {
                continue;
            };
            if let Err(err) = self.worker.detach(attached.cookie).await {
                tracing::warn!(%err, "detach");
                self.metrics.error("detach");
            }
            let _ = self.events.send(CollectorEvent::Detached(attached.cookie));
        }
        self.pending.retain(|key| wanted.targets.contains_key(key));
        for (key, target) in wanted.targets {
            if self.attached.contains_key(&key) {
                continue;
            }
            let Some(id) = current.get(&key).copied().flatten() else {
                self.pending.insert(key);
                continue;
            };
            match self.worker.attach(&target.path, target.pod).await {
                Ok(attached) => {
                    self.pending.remove(&key);
                    let cookie = attached.cookie;
                    let _ = self.events.send(CollectorEvent::Attached(attached));
                    self.attached.insert(key, Attached { cookie, netns: id });
                }
                // Not a namespace yet: `ip netns add` creates the file, then
                // bind-mounts the namespace on it. Or gone meanwhile.
                Err(AttachError::Netns(
                    NetnsError::NotNetns { .. } | NetnsError::NotFound { .. },
                )) => {
                    self.pending.insert(key);
                }
                Err(err) => {
                    tracing::warn!(%err, "skipping namespace");
                    self.metrics.error("attach");
                    self.pending.remove(&key);
                }
            }
        }
        self.waiting = wanted.waiting;
        let pods = &self.metrics.pods;
        pods.with_label_values(&["attached"])
            .set(self.attached.len() as i64);
        pods.with_label_values(&["waiting"])
            .set((self.pending.len() + self.waiting) as i64);
        pods.with_label_values(&["host_network"])
            .set(wanted.host_network as i64);
        true
    }

    /// What there should be; `None` if the source cannot be read now.
    fn wanted(&mut self) -> Option<Wanted> {
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
                        let pod = ObjectRef::new("", &netns::display_name(&path));
                        (path.display().to_string(), Target { path, pod })
                    })
                    .collect();
                Some(Wanted {
                    targets,
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
                let targets = pod_targets(&inventory, node.as_deref());
                self.sync_kernel_maps(inventory);
                Some(Wanted {
                    targets,
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
                if !view.synced() {
                    return None;
                }
                let found = view::find_on_node(&view, proc_root, cgroup_root);
                let inventory = view.inventory(node, *service_cidr, &found);
                // Found is enough: a pod is attached before it has an IP.
                let targets: HashMap<String, Target> = view
                    .pods_to_attach()
                    .filter_map(|p| {
                        let target = Target {
                            path: found.get(&p.uid)?.netns.clone(),
                            pod: ObjectRef::new(&p.namespace, &p.name),
                        };
                        Some((p.uid.clone(), target))
                    })
                    .collect();
                let attachable = view.pods_to_attach().count();
                let host_network = view
                    .local_pods
                    .items
                    .values()
                    .filter(|p| p.host_network && !p.finished)
                    .count();
                self.sync_kernel_maps(inventory);
                Some(Wanted {
                    waiting: attachable.saturating_sub(targets.len()),
                    targets,
                    host_network,
                })
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

/// The pods of `node` (or all) that have a network namespace, by UID.
fn pod_targets(inventory: &Inventory, node: Option<&str>) -> HashMap<String, Target> {
    inventory
        .pods
        .iter()
        .filter(|p| node.is_none_or(|n| p.node == n))
        .filter_map(|p| {
            let target = Target {
                path: p.netns.clone()?,
                pod: ObjectRef::new(&p.namespace, &p.name),
            };
            Some((p.uid.clone(), target))
        })
        .collect()
}

/// The namespace a path leads to, if it exists.
fn netns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
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
