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

use crate::{collector::FlowRow, metrics::Metrics};

/// Asks the collector for a fresh collection, and for its series if
/// `rows` (only `/flows` needs them).
pub struct CollectRequest {
    pub rows: bool,
    pub done: oneshot::Sender<Vec<FlowRow>>,
}

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
        .route("/flows", get(flows))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoint);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Runs a collection now; returns its series if `rows`.
async fn collect(endpoint: &Endpoint, rows: bool) -> Vec<FlowRow> {
    let (done, collected) = oneshot::channel();
    if endpoint
        .collect
        .send(CollectRequest { rows, done })
        .await
        .is_err()
    {
        return Vec::new();
    }
    collected.await.unwrap_or_default()
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    // Serve what the kernel counted up to now, not up to the last tick.
    collect(&endpoint, false).await;
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        endpoint.metrics.render(),
    )
}

/// The traffic since the previous collection, as JSON (for `observer flows`).
async fn flows(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let rows = collect(&endpoint, true).await;
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&rows).expect("rows serialize"),
    )
}

async fn ready(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    if endpoint.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "attaching\n")
    }
}
