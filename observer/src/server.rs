//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for
//! Kubernetes probes.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

use crate::metrics::Metrics;

/// Asks the collector for a fresh collection and waits for it.
pub type CollectRequest = oneshot::Sender<()>;

#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    /// Set once the first attach round is done.
    pub ready: Arc<AtomicBool>,
    pub collect: mpsc::Sender<CollectRequest>,
}

pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    // Serve what the kernel counted up to now, not up to the last tick.
    let (done, collected) = oneshot::channel();
    if endpoint.collect.send(done).await.is_ok() {
        let _ = collected.await;
    }
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        endpoint.metrics.render(),
    )
}

async fn ready(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    if endpoint.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "attaching\n")
    }
}
