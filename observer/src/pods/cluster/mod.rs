//! Kubernetes mode: the pods of this node, and the cluster's pods, Services
//! and nodes, from the Kubernetes API, kept in a [`ClusterView`] that the
//! reconciler turns into attachments and kernel maps.
//!
//! Four watches (list, then watch; relist after `410 Gone`; reconnect with
//! backoff when the API server is away), each mirrored into trimmed objects:
//!
//! | watch | scope | kept |
//! |---|---|---|
//! | pods | `spec.nodeName=<node>` | names, IP, labels, host network, container ids |
//! | pods | cluster, not finished, with an IP, on other nodes | names, IP, node, the labels policies' peer selectors use |
//! | services | cluster | ClusterIP, ports |
//! | nodes | cluster | InternalIP, pod CIDRs |

pub mod trim;
pub mod view;

use std::{path::Path, sync::Arc};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::watch, task::JoinSet};

pub use view::ClusterView;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration: not in a pod (no service account) and no kubeconfig ($KUBECONFIG, ~/.kube/config or --kubeconfig): {0}"
    )]
    Infer(kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(kube::Error),
}

/// A client from `kubeconfig`, or else as kubectl would find one (in a pod:
/// its service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClusterError> {
    let config = match kubeconfig {
        Some(path) => {
            let error = |source| ClusterError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
        None => Config::infer().await.map_err(ClusterError::Infer)?,
    };
    Client::try_from(config).map_err(ClusterError::Client)
}

/// The running watches; dropping it stops them.
pub struct ClusterWatch {
    view: watch::Receiver<ClusterView>,
    _tasks: JoinSet<()>,
}

/// The label keys of other nodes' pods that are kept (those policies' peer
/// selectors use): when they change, the cluster's pods are listed again.
pub type LabelKeys = Arc<std::collections::BTreeSet<String>>;

impl ClusterWatch {
    /// Starts watching for the observer of `node`.
    pub fn start(
        client: Client,
        node: &str,
        metrics: Arc<Metrics>,
        label_keys: watch::Receiver<LabelKeys>,
    ) -> Self {
        let (sender, view) = watch::channel(ClusterView::default());
        let sender = Arc::new(sender);
        let mut tasks = JoinSet::new();

        let local = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        // Finished pods have given their IP back: not peers any more.
        let running =
            watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let all = watcher::Config::default();

        let pods: Api<Pod> = Api::all(client.clone());
        tasks.spawn(mirror(
            watcher(pods.clone(), local),
            Arc::clone(&sender),
            Arc::clone(&metrics),
            |view, event| {
                let changed = view.local_pods.apply(event, |p| trim::trim_pod(p, true));
                view.local_changes += u64::from(changed);
                changed
            },
        ));
        tasks.spawn(peers(
            pods,
            running,
            node.to_owned(),
            label_keys,
            Arc::clone(&sender),
            Arc::clone(&metrics),
        ));
        tasks.spawn(mirror(
            watcher(Api::<Service>::all(client.clone()), all.clone()),
            Arc::clone(&sender),
            Arc::clone(&metrics),
            |view, event| view.services.apply(event, trim::trim_service),
        ));
        tasks.spawn(mirror(
            watcher(Api::<Node>::all(client), all),
            sender,
            metrics,
            |view, event| view.nodes.apply(event, trim::trim_node),
        ));
        Self {
            view,
            _tasks: tasks,
        }
    }

    /// The view, updated as events arrive.
    pub fn view(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }
}

/// The cluster's pods, trimmed to what peers need ([`trim::trim_peer`]);
/// listed again whenever the label keys to keep change.
async fn peers(
    pods: Api<Pod>,
    config: watcher::Config,
    node: String,
    mut keys: watch::Receiver<LabelKeys>,
    view: Arc<watch::Sender<ClusterView>>,
    metrics: Arc<Metrics>,
) {
    loop {
        let kept = Arc::clone(&keys.borrow_and_update());
        let node = node.clone();
        let events = watcher(pods.clone(), config.clone());
        let apply = move |view: &mut ClusterView, event| {
            view.pods.apply(event, |p| trim::trim_peer(p, &node, &kept))
        };
        // Nobody to change them any more: the watch goes on as it is.
        let changed = async {
            if keys.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = mirror(events, Arc::clone(&view), Arc::clone(&metrics), apply) => return,
            () = changed => {
                tracing::info!("policies match peers by other labels: listing the cluster's pods again");
            }
        }
    }
}

/// Applies one watch's events to the view; errors (an unreachable API
/// server, a watch refused) are logged and counted, and the watch retries
/// with exponential backoff (800 ms up to 30 s).
async fn mirror<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    view: Arc<watch::Sender<ClusterView>>,
    metrics: Arc<Metrics>,
    apply: impl Fn(&mut ClusterView, watcher::Event<K>) -> bool + Send,
) {
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("object");
    let mut events = std::pin::pin!(events.default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                view.send_if_modified(|view| apply(view, event));
            }
            // The watch was away too long: a relist follows. Routine.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::debug!(kind, "watch expired: listing again");
            }
            Err(err) => {
                tracing::warn!(%err, kind, "watching the Kubernetes API");
                metrics.error("kubernetes_api");
            }
        }
    }
}

#[cfg(test)]
mod tests;
