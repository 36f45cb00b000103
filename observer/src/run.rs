//! `observer run`: load the programs, attach to the namespaces, serve metrics
//! until SIGINT or SIGTERM, then detach everything.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

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
    metrics::Metrics,
    netns::{self, NetNs, NetnsError},
    server::{self, CollectRequest, Endpoint},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot list network namespaces in {dir}: {source}")]
    ListNetns { dir: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("cannot watch for signals: {0}")]
    Signals(io::Error),
    #[error("metrics server: {0}")]
    Serve(io::Error),
}

/// A namespace to attach to, and whether failing to is fatal.
struct Target {
    path: PathBuf,
    name: String,
    /// Named on the command line: an error there is the user's to fix now.
    explicit: bool,
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let targets = targets(&args)?;
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;

    let (datapath, maps) = Datapath::open(args.flow_capacity, &args.runtime_dir)?;
    let worker = AttachWorker::start(datapath)?;
    let metrics = Arc::new(Metrics::new());
    let mut collector = Collector::new(maps, Arc::clone(&metrics));

    for target in targets {
        match worker.attach(&target.path, target.name).await {
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
    let collecting = tokio::spawn(collect_loop(
        collector,
        Arc::clone(&metrics),
        requests,
        args.collect_interval,
    ));
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
    served.map_err(RunError::Serve)
}

/// Collects every `every`, and whenever a scrape asks for it.
async fn collect_loop(
    mut collector: Collector,
    metrics: Arc<Metrics>,
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
                metrics_error(&collector);
            }
            collector
        })
        .await
        .expect("collecting does not panic");
        if let Some(done) = waiter {
            let _ = done.send(());
        }
    }
    drop(metrics);
}

fn metrics_error(collector: &Collector) {
    collector.metrics().error("map_read");
}

fn targets(args: &RunArgs) -> Result<Vec<Target>, RunError> {
    if !args.netns.is_empty() {
        return args
            .netns
            .iter()
            .map(|path| {
                // Fail now, with the path in the message, not mid-attach.
                NetNs::open(path)?;
                Ok(Target {
                    path: path.clone(),
                    name: netns::display_name(path),
                    explicit: true,
                })
            })
            .collect();
    }
    let mut targets = list_netns_dir(&args.netns_dir)?;
    targets.sort_by(|a, b| a.name.cmp(&b.name));
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
            name: netns::display_name(&path),
            path,
            explicit: false,
        })
        .collect())
}
