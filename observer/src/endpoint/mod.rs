//! The HTTP endpoint: `/metrics` for Prometheus, `/flows` for `observer
//! flows`, `/healthz` and `/readyz` for Kubernetes probes.
//!
//! - [`server`]: connections, with limits against clients that hold them
//!   open or stop reading;
//! - [`tls`] and [`auth`]: `--secure-serving`, HTTPS and only bearers of a
//!   token the Kubernetes API allows to `get` the path (`/metrics`,
//!   `/flows`; the probes stay open: they tell nothing).

pub mod auth;
pub mod server;
pub mod tls;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{flows::task::CollectorHandle, metrics::Metrics};

#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    /// Set once the first attach round is done.
    pub ready: Arc<AtomicBool>,
    pub collector: CollectorHandle,
    /// `--secure-serving`: who may read `/metrics` and `/flows`.
    pub auth: Option<Arc<auth::Authorizer>>,
}

/// The paths requests are counted by; any other is `other`.
pub const PATHS: [&str; 5] = ["/metrics", "/flows", "/healthz", "/readyz", "other"];

pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    tls: Option<TlsAcceptor>,
    limits: server::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::clone(&endpoint.metrics);
    let protected = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/flows", get(flows))
        .route_layer(middleware::from_fn_with_state(endpoint.clone(), authorize));
    let router = Router::new()
        .merge(protected)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(middleware::from_fn_with_state(endpoint.clone(), count))
        .with_state(endpoint);
    server::serve(listener, router, tls, limits, metrics, shutdown).await
}

/// Counts every request by path and status.
async fn count(State(endpoint): State<Endpoint>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let path = PATHS.iter().find(|p| **p == path).unwrap_or(&"other");
    let response = next.run(request).await;
    endpoint
        .metrics
        .http_requests
        .with_label_values(&[path, response.status().as_str()])
        .inc();
    response
}

/// With `--secure-serving`, only bearers of a token the API allows to `get`
/// the path get through.
async fn authorize(State(endpoint): State<Endpoint>, request: Request, next: Next) -> Response {
    let Some(auth) = &endpoint.auth else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match auth.check(token, request.uri().path()).await {
        auth::Verdict::Allowed => next.run(request).await,
        auth::Verdict::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token the Kubernetes API authenticates is needed\n",
        )
            .into_response(),
        auth::Verdict::Forbidden => (
            StatusCode::FORBIDDEN,
            "this user may not get this path (a ClusterRole with nonResourceURLs grants it)\n",
        )
            .into_response(),
        auth::Verdict::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the Kubernetes API cannot tell who this is now\n",
        )
            .into_response(),
    }
}

async fn metrics_page(State(endpoint): State<Endpoint>) -> impl IntoResponse {
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
