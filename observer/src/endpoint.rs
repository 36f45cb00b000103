//! The HTTP endpoint: `/metrics` for Prometheus, `/flows` for `observer
//! flows`, `/healthz` and `/readyz` for Kubernetes probes.

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
use tokio::net::TcpListener;

use crate::{flows::task::CollectorHandle, metrics::Metrics};

#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    /// Set once the first attach round is done.
    pub ready: Arc<AtomicBool>,
    pub collector: CollectorHandle,
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

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    // Serve what the kernel counted up to now, not up to the last tick.
    endpoint.collector.collect(false).await;
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        endpoint.metrics.render(),
    )
}

/// The traffic since the previous collection, as JSON (for `observer flows`).
async fn flows(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let rows = endpoint.collector.collect(true).await;
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
