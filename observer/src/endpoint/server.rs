//! The HTTP server under the endpoint, with the limits a node agent needs:
//! any pod of the cluster can reach it, and none may keep Prometheus, the
//! kubelet's probes or the observer's own work from getting through.
//!
//! - At most `max_connections` at once. One more evicts the oldest that has
//!   no request in progress (it has not sent a whole request yet, or waits
//!   between keep-alive requests): a flood of idle connections cannot keep
//!   a scrape or a probe out, nor eat the observer's file descriptors. If
//!   every connection is busy, the new one is closed.
//! - A TLS handshake and a request's headers within `header_timeout`; the
//!   answer within `request_timeout`.
//! - At shutdown, requests in progress get `drain` to finish; then every
//!   connection is dropped: a client that stops reading holds nothing up.
//!
//! Every connection closed early is counted in
//! `observer_http_connections_closed_total{reason}`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::Router;
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// The server's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// How long requests in progress may take to finish at shutdown.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            drain: Duration::from_secs(2),
        }
    }
}

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Connection>,
}

struct Connection {
    /// Requests in progress.
    busy: Arc<AtomicUsize>,
    evict: Option<oneshot::Sender<()>>,
}

impl Connections {
    /// Room for one more: the oldest idle connection is told to go if all
    /// the room is taken. `None`: every connection is busy.
    fn admit(
        &mut self,
        max: usize,
    ) -> Option<(u64, Arc<AtomicUsize>, oneshot::Receiver<()>, bool)> {
        let mut evicted = false;
        if self.open.len() >= max {
            let idle = self
                .open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                .map(|(id, _)| *id)?;
            if let Some(mut connection) = self.open.remove(&idle)
                && let Some(evict) = connection.evict.take()
            {
                let _ = evict.send(());
            }
            evicted = true;
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let (evict, evicted_rx) = oneshot::channel();
        self.open.insert(
            id,
            Connection {
                busy: Arc::clone(&busy),
                evict: Some(evict),
            },
        );
        Some((id, busy, evicted_rx, evicted))
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of descriptors, say: not a reason to stop serving.
                Err(err) => {
                    tracing::warn!(%err, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Finished connections' tasks, reaped as we go.
        while tasks.try_join_next().is_some() {}
        let admitted = connections
            .lock()
            .expect("not poisoned")
            .admit(limits.max_connections);
        let Some((id, busy, evicted, evicted_other)) = admitted else {
            closed(&metrics, "refused");
            drop(stream);
            continue;
        };
        if evicted_other {
            closed(&metrics, "evicted");
        }
        metrics.http_connections.inc();
        let connection = Served {
            router: router.clone(),
            limits,
            busy,
            evicted,
            stopping: stopping.clone(),
            metrics: Arc::clone(&metrics),
        };
        let tls = tls.clone();
        let connections = Arc::clone(&connections);
        let metrics = Arc::clone(&metrics);
        tasks.spawn(async move {
            let _ = stream.set_nodelay(true);
            match tls {
                Some(tls) => {
                    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => connection.run(stream).await,
                        Ok(Err(_)) | Err(_) => closed(&metrics, "handshake"),
                    }
                }
                None => connection.run(stream).await,
            }
            connection_done(&connections, id);
            metrics.http_connections.dec();
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Requests in progress finish (within the drain time); the rest go.
    let deadline = tokio::time::Instant::now() + limits.drain + Duration::from_millis(100);
    while tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .is_ok_and(|next| next.is_some())
    {}
    tasks.abort_all();
    Ok(())
}

fn connection_done(connections: &Mutex<Connections>, id: u64) {
    connections.lock().expect("not poisoned").open.remove(&id);
}

fn closed(metrics: &Metrics, reason: &'static str) {
    debug_assert!(crate::metrics::HTTP_CLOSE_REASONS.contains(&reason));
    metrics
        .http_connections_closed
        .with_label_values(&[reason])
        .inc();
}

/// One connection being served.
struct Served {
    router: Router,
    limits: Limits,
    busy: Arc<AtomicUsize>,
    evicted: oneshot::Receiver<()>,
    stopping: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl Served {
    async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            router,
            limits,
            busy,
            mut evicted,
            mut stopping,
            metrics,
        } = self;
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let busy = Arc::clone(&busy);
            async move {
                busy.fetch_add(1, Ordering::AcqRel);
                let answer = tokio::time::timeout(limits.request_timeout, router.oneshot(request));
                let response = match answer.await {
                    Ok(response) => response.unwrap_or_else(|never| match never {}),
                    Err(_) => {
                        let mut late = axum::response::Response::new(axum::body::Body::from(
                            "the answer took too long\n",
                        ));
                        *late.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        late
                    }
                };
                busy.fetch_sub(1, Ordering::AcqRel);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        tokio::select! {
            served = connection.as_mut() => {
                if served.is_err_and(|e| e.is_timeout()) {
                    closed(&metrics, "timeout");
                }
            }
            // Its room went to a newer connection.
            _ = &mut evicted => {}
            () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.drain, connection).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_evicts_the_oldest_idle_one_or_is_refused() {
        let mut connections = Connections::default();
        let (first, first_busy, mut first_evicted, _) = connections.admit(2).unwrap();
        let (_, _, mut second_evicted, _) = connections.admit(2).unwrap();
        first_busy.store(1, Ordering::Release);
        // Full: the oldest idle one (the second; the first is busy) goes.
        let (_, third_busy, _, evicted) = connections.admit(2).unwrap();
        assert!(evicted);
        assert!(second_evicted.try_recv().is_ok(), "the idle one is told");
        assert!(first_evicted.try_recv().is_err(), "not the busy one");
        assert!(connections.open.contains_key(&first));
        // Both busy: no room.
        third_busy.store(1, Ordering::Release);
        assert!(connections.admit(2).is_none());
        first_busy.store(0, Ordering::Release);
        assert!(connections.admit(2).is_some(), "room again");
    }
}
