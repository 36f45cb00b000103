//! Keeps what is attached in step with where the pods come from: the
//! namespaces in a directory, or the pods of an inventory. Wakes on inotify
//! events (a namespace appears, an inventory is rewritten), never on a timer;
//! the only timer is a short retry for a namespace whose bind mount is not in
//! place yet.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use observer_common::inventory::Inventory;
use tokio::sync::{mpsc, watch};

use crate::{
    attach::{AttachError, AttachWorker, AttachedNetns},
    identities::{ObjectRef, SharedIdentities},
    kernel_maps::KernelMaps,
    metrics::Metrics,
    netns::{self, NetnsError},
    watch::DirWatch,
};

/// How often, and how many times, a namespace that is not ready is retried.
const RETRY_EVERY: Duration = Duration::from_millis(100);
const RETRIES: u32 = 20;

/// Where pods come from.
pub enum Source {
    /// Every network namespace in this directory (named after itself).
    Dir(PathBuf),
    /// The pods of this inventory (only those of `node`, if given).
    Inventory { path: PathBuf, node: Option<String> },
}

/// What the collector learns while it runs.
pub enum CollectorEvent {
    Attached(AttachedNetns),
    Detached(u64),
    Identities(SharedIdentities),
}

pub struct Reconciler {
    source: Source,
    worker: AttachWorker,
    kernel_maps: KernelMaps,
    events: mpsc::UnboundedSender<CollectorEvent>,
    metrics: Arc<Metrics>,
    /// Attached namespaces: path to cookie.
    attached: HashMap<PathBuf, u64>,
    /// Namespaces not ready yet (a bind mount in progress), with retries left.
    pending: HashMap<PathBuf, u32>,
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
            pending: HashMap::new(),
            inventory: None,
        }
    }

    /// The directory whose changes matter.
    pub fn watched_dir(&self) -> PathBuf {
        match &self.source {
            Source::Dir(dir) => dir.clone(),
            Source::Inventory { path, .. } => path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        }
    }

    /// Reacts to changes until `stop` fires; returns the worker for shutdown.
    pub async fn run(mut self, dir: DirWatch, mut stop: watch::Receiver<bool>) -> AttachWorker {
        loop {
            let retry = !self.pending.is_empty();
            tokio::select! {
                _ = stop.changed() => break,
                changed = dir.changed() => {
                    if let Err(err) = changed {
                        tracing::warn!(%err, "watching for pods");
                        self.metrics.error("watch");
                    }
                    // A new event: namespaces still pending get fresh retries.
                    self.pending.values_mut().for_each(|left| *left = RETRIES);
                    self.reconcile().await;
                }
                _ = tokio::time::sleep(RETRY_EVERY), if retry => self.reconcile().await,
            }
        }
        self.worker
    }

    /// Attaches what is new, detaches what is gone.
    pub async fn reconcile(&mut self) {
        let Some(targets) = self.targets() else {
            return;
        };
        let gone: Vec<(PathBuf, u64)> = self
            .attached
            .iter()
            .filter(|(path, _)| !targets.contains_key(*path) || !path.exists())
            .map(|(path, cookie)| (path.clone(), *cookie))
            .collect();
        for (path, cookie) in gone {
            self.attached.remove(&path);
            match self.worker.detach(cookie).await {
                Ok(()) => {}
                Err(err) => {
                    tracing::warn!(%err, "detach");
                    self.metrics.error("detach");
                }
            }
            let _ = self.events.send(CollectorEvent::Detached(cookie));
        }
        self.pending.retain(|path, _| targets.contains_key(path));
        for (path, pod) in targets {
            if self.attached.contains_key(&path) {
                continue;
            }
            match self.worker.attach(&path, pod).await {
                Ok(attached) => {
                    self.pending.remove(&path);
                    self.attached.insert(path, attached.cookie);
                    let _ = self.events.send(CollectorEvent::Attached(attached));
                }
                // Not a namespace yet: `ip netns add` creates the file, then
                // bind-mounts the namespace on it.
                Err(AttachError::Netns(
                    NetnsError::NotNetns { .. } | NetnsError::NotFound { .. },
                )) => {
                    let left = self.pending.entry(path).or_insert(RETRIES);
                    *left = left.saturating_sub(1);
                }
                Err(err) => {
                    tracing::warn!(%err, "skipping namespace");
                    self.metrics.error("attach");
                    self.pending.remove(&path);
                }
            }
        }
        // Out of retries: wait for the next event about it.
        self.pending.retain(|_, left| *left > 0);
    }

    /// The namespaces there should be, by path; `None` if the source cannot
    /// be read now (the current state then stays).
    fn targets(&mut self) -> Option<HashMap<PathBuf, ObjectRef>> {
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
                Some(
                    entries
                        .flatten()
                        .map(|e| e.path())
                        .map(|path| {
                            let pod = ObjectRef::new("", &netns::display_name(&path));
                            (path, pod)
                        })
                        .collect(),
                )
            }
            Source::Inventory { path, node } => {
                let inventory = match crate::inventory::load_for_node(path, node.as_deref()) {
                    Ok(inventory) => inventory,
                    Err(err) => {
                        // A half-written file, say: keep what we have.
                        tracing::warn!(%err, "reading the inventory");
                        self.metrics.error("inventory");
                        return None;
                    }
                };
                if self.inventory.as_ref() != Some(&inventory) {
                    match self.kernel_maps.sync(&inventory) {
                        Ok(identities) => {
                            let identities = Arc::new(identities);
                            let _ = self.events.send(CollectorEvent::Identities(identities));
                        }
                        Err(err) => {
                            tracing::warn!(%err, "updating the kernel's maps");
                            self.metrics.error("kernel_maps");
                        }
                    }
                }
                let mine = inventory
                    .pods
                    .iter()
                    .filter(|p| node.as_deref().is_none_or(|n| p.node == n))
                    .map(|p| (p.netns.clone(), ObjectRef::new(&p.namespace, &p.name)))
                    .collect();
                self.inventory = Some(inventory);
                Some(mine)
            }
        }
    }
}
