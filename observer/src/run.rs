//! `observer run`: load the programs, attach to the pods, keep the kernel's
//! maps in step, serve metrics until SIGINT or SIGTERM, then detach all.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use observer_common::inventory::Inventory;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};

use crate::{
    attach::{AttachError, AttachWorker},
    cli::RunArgs,
    collector::Collector,
    datapath::{Datapath, DatapathError},
    flow_metrics::{FLOW_LABELS, FlowMetrics, SeriesConfig},
    identities::ObjectRef,
    inventory::{self, InventoryError},
    kernel_maps::{KernelMaps, KernelMapsError},
    metrics::Metrics,
    netns::{self, NetNs, NetnsError},
    server::{self, CollectRequest, Endpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("cannot list network namespaces in {dir}: {source}")]
    ListNetns { dir: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    KernelMaps(#[from] KernelMapsError),
    #[error("cannot watch for signals: {0}")]
    Signals(io::Error),
    #[error("metrics server: {0}")]
    Serve(io::Error),
}

/// A namespace to attach to, and whether failing to is fatal.
struct Target {
    path: PathBuf,
    pod: ObjectRef,
    /// Named on the command line: an error there is the user's to fix now.
    explicit: bool,
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let inventory = match &args.inventory {
        Some(path) => Some(load_inventory(path, args.node.as_deref())?),
        None => None,
    };
    let targets = match &inventory {
        Some(inventory) => inventory
            .pods
            .iter()
            .map(|pod| Target {
                path: pod.netns.clone(),
                pod: ObjectRef::new(&pod.namespace, &pod.name),
                explicit: false,
            })
            .collect(),
        None => netns_targets(&args)?,
    };
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;

    let (datapath, maps, class_maps) = Datapath::open(args.flow_capacity, &args.runtime_dir)?;
    let mut kernel_maps = KernelMaps::new(class_maps);
    let metrics = Arc::new(Metrics::new());
    let flows = Arc::new(FlowMetrics::new(series_config(&args)));
    metrics.register_flows(Arc::clone(&flows));
    let mut collector = Collector::new(maps, Arc::clone(&metrics), flows);
    if let Some(inventory) = &inventory {
        collector.set_identities(Arc::new(kernel_maps.sync(inventory)?));
    }
    let worker = AttachWorker::start(datapath, args.attach_noop)?;

    for target in targets {
        match worker.attach(&target.path, target.pod).await {
            Ok(attached) => collector.attached(attached),
            Err(err) if !target.explicit => {
                metrics.error("attach");
                tracing::warn!(%err, "skipping namespace");
            }
            Err(err) => return Err(err.into()),
        }
    }

    let ready = Arc::new(AtomicBool::new(true));
    let (collect, requests) = mpsc::channel(16);
    let collecting = tokio::spawn(collect_loop(collector, requests, args.collect_interval));
    let endpoint = Endpoint {
        metrics,
        ready,
        collect,
    };
    tracing::info!(addr = %args.metrics_addr, "serving metrics");
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let served = server::serve(listener, endpoint, shutdown).await;

    // The server is gone, so is the last collect sender: the loop ends.
    let _ = collecting.await;
    tokio::task::spawn_blocking(move || worker.shutdown())
        .await
        .expect("detaching does not panic");
    drop(kernel_maps);
    served.map_err(RunError::Serve)
}

fn load_inventory(path: &Path, node: Option<&str>) -> Result<Inventory, RunError> {
    let mut inventory = inventory::load(path)?;
    if let Some(node) = node {
        if !inventory.nodes.iter().any(|n| n.name == node) {
            return Err(InventoryError::UnknownNode {
                path: path.into(),
                node: node.into(),
            }
            .into());
        }
        // Other nodes' pods stay known as peers (in the kernel's maps) but
        // are not attached to: their node's observer does that.
        let mine: Vec<_> = inventory
            .pods
            .iter()
            .filter(|p| p.node == node)
            .cloned()
            .collect();
        let peers = std::mem::replace(&mut inventory.pods, mine);
        tracing::info!(
            node,
            pods = inventory.pods.len(),
            of = peers.len(),
            "pods of this node"
        );
        inventory
            .pods
            .extend(peers.into_iter().filter(|p| p.node != node));
        inventory.pods.sort_by_key(|p| p.node != node);
    }
    Ok(inventory)
}

fn series_config(args: &RunArgs) -> SeriesConfig {
    SeriesConfig {
        max_series_per_pod: args.max_series_per_pod as usize,
        grace: args.series_grace,
        dropped: args
            .drop_labels
            .iter()
            .filter_map(|label| FLOW_LABELS.iter().position(|l| l == label))
            .collect(),
    }
}

/// Collects every `every`, and whenever a scrape asks for it.
async fn collect_loop(
    mut collector: Collector,
    mut requests: mpsc::Receiver<CollectRequest>,
    every: Duration,
) {
    let mut tick = interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let waiter = tokio::select! {
            _ = tick.tick() => None,
            request = requests.recv() => match request {
                Some(done) => Some(done),
                None => break,
            },
        };
        // Walking a large map is blocking work: keep it off the async workers.
        collector = tokio::task::spawn_blocking(move || {
            if let Err(err) = collector.collect() {
                tracing::warn!(%err, "collection failed");
                collector.metrics().error("map_read");
            }
            collector
        })
        .await
        .expect("collecting does not panic");
        if let Some(done) = waiter {
            let _ = done.send(collector.rows().to_vec());
        }
    }
}

fn netns_targets(args: &RunArgs) -> Result<Vec<Target>, RunError> {
    if !args.netns.is_empty() {
        return args
            .netns
            .iter()
            .map(|path| {
                // Fail now, with the path in the message, not mid-attach.
                NetNs::open(path)?;
                Ok(Target {
                    path: path.clone(),
                    pod: ObjectRef::new("", &netns::display_name(path)),
                    explicit: true,
                })
            })
            .collect();
    }
    let mut targets = list_netns_dir(&args.netns_dir)?;
    targets.sort_by(|a, b| a.pod.cmp(&b.pod));
    if targets.is_empty() {
        tracing::warn!(dir = %args.netns_dir.display(), "no network namespaces to attach to");
    }
    Ok(targets)
}

fn list_netns_dir(dir: &Path) -> Result<Vec<Target>, RunError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RunError::ListNetns {
                dir: dir.into(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .map(|entry| entry.path())
        .map(|path| Target {
            pod: ObjectRef::new("", &netns::display_name(&path)),
            path,
            explicit: false,
        })
        .collect())
}
