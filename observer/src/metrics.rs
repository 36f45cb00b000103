//! The Prometheus metric families the observer exports. Every name starts with
//! `observer_`; counters end in `_total`; bytes are bytes.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::policy::compile::Unenforced;

/// The kinds of `observer_errors_total`.
pub const ERROR_KINDS: [&str; 10] = [
    "attach",
    "detach",
    "map_read",
    "kernel_maps",
    "inventory",
    "list_netns",
    "watch",
    "kubernetes_api",
    "policy",
    "state",
];

/// Why the endpoint closed a connection before its client did
/// (`observer_http_connections_closed_total{reason}`).
pub const HTTP_CLOSE_REASONS: [&str; 4] = ["evicted", "refused", "handshake", "timeout"];

/// The observer's registry, with its own health families; the traffic
/// families (`flows::metrics`) are registered in it too.
/// The labels of `observer_policy_verdicts_total`, in the order their
/// values are given.
pub const VERDICT_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "policy",
    "rule",
    "class",
    "direction",
    "verdict",
];

pub struct Metrics {
    registry: Registry,
    /// Raw tracepoints the unix-socket and named-pipe programs are attached
    /// to (1) or could not be (0).
    pub ipc_hooks: IntGaugeVec,
    /// Unix-socket messages, connections and pipe calls not counted: their
    /// map had no room.
    pub ipc_lost: IntCounter,
    /// tc programs attached per pod.
    pub programs_attached: IntGaugeVec,
    /// Pods of this node by state: attached, waiting (known, namespace not
    /// found yet), failed (attach error), host_network (the node's
    /// namespace: not attached).
    pub pods: IntGaugeVec,
    /// Flows in the kernel's flow map, and its capacity.
    pub flow_map_entries: IntGauge,
    pub flow_map_capacity: IntGauge,
    /// Flows taken out of the flow map once counted to their last packet
    /// (quiet for a minute, or quiet while the map is nearly full).
    pub flow_map_reclaimed: IntCounter,
    /// Packets counted while the flow map had no room for their flow.
    pub flow_overflow_packets: IntCounter,
    /// Packets not counted because their flow could not be inserted.
    pub flow_insert_failures: IntCounter,
    pub policy_verdicts_lost: IntCounter,
    /// Traffic series exported (per family).
    pub flow_series: IntGauge,
    /// How long a collection (map walk) takes; one runs for every scrape.
    pub collection_duration: Histogram,
    /// How long a reconciliation round takes (the source read, attaches,
    /// the kernel's maps and the policies written).
    pub reconcile_duration: Histogram,
    /// Errors by kind (attach, map_read, ...).
    pub errors: IntCounterVec,
    /// Policy file reloads: ok, or refused (the last good policy stays).
    pub policy_reloads: IntCounterVec,
    /// Connections to the endpoint open now.
    pub http_connections: IntGauge,
    /// Connections the endpoint closed before their client did, and why
    /// ([`HTTP_CLOSE_REASONS`]).
    pub http_connections_closed: IntCounterVec,
    /// Requests by path (`endpoint::PATHS`) and status code.
    pub http_requests: IntCounterVec,
    /// Connections decided by a policy, from the kernel's counts.
    pub policy_verdicts: IntCounterVec,
    /// Pods a policy selects and does not (fully) hold, by reason.
    pub policy_unenforced: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            programs_attached: IntGaugeVec::new(
                Opts::new(
                    "observer_programs_attached",
                    "tc programs attached in a pod's network namespace.",
                ),
                &["namespace", "pod"],
            )
            .expect("valid metric"),
            pods: IntGaugeVec::new(
                Opts::new(
                    "observer_pods",
                    "Pods of this node: attached, waiting for their network namespace, failed (attach error), or host_network (not attached: they share the node's).",
                ),
                &["state"],
            )
            .expect("valid metric"),
            flow_series: IntGauge::new(
                "observer_flow_series",
                "Traffic series exported per family (bounded by --max-series-per-pod).",
            )
            .expect("valid metric"),
            collection_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "observer_collection_duration_seconds",
                    "Time to read the kernel's flow map into the metrics (each scrape does).",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "observer_reconcile_duration_seconds",
                    "Time of a reconciliation round: reading the pods' source, attaching and detaching, writing the kernel's maps and the policies.",
                )
                .buckets(vec![0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]),
            )
            .expect("valid metric"),
            flow_map_entries: IntGauge::new(
                "observer_flow_map_entries",
                "Flows in the kernel flow map at the last collection.",
            )
            .expect("valid metric"),
            flow_map_capacity: IntGauge::new(
                "observer_flow_map_capacity",
                "Capacity of the kernel flow map.",
            )
            .expect("valid metric"),
            flow_map_reclaimed: IntCounter::new(
                "observer_flow_map_reclaimed_total",
                "Flows taken out of the kernel flow map once counted to their last packet: quiet for a minute, or quiet while the map is nine tenths full (the longest quiet first, down to eight tenths).",
            )
            .expect("valid metric"),
            flow_overflow_packets: IntCounter::new(
                "observer_flow_map_overflow_packets_total",
                "Packets whose flow had no room in the kernel flow map: counted in their pod's overflow series (class unknown, details overflow), not classified. Raise --flow-capacity.",
            )
            .expect("valid metric"),
            ipc_hooks: IntGaugeVec::new(
                Opts::new(
                    "observer_ipc_hooks_attached",
                    "Raw tracepoints of the unix-socket and named-pipe programs: 1 if attached, 0 if this kernel does not have or let them be (what they see is not counted).",
                ),
                &["tracepoint"],
            )
            .expect("valid metric"),
            ipc_lost: IntCounter::new(
                "observer_ipc_lost_total",
                "Unix-socket messages and connections, and named-pipe reads and writes, not counted: their kernel map had no room.",
            )
            .expect("valid metric"),
            flow_insert_failures: IntCounter::new(
                "observer_flow_insert_failures_total",
                "Packets not counted because their flow could not be inserted.",
            )
            .expect("valid metric"),
            policy_verdicts_lost: IntCounter::new(
                "observer_policy_verdicts_lost_total",
                "Policy decisions enforced but not counted in observer_policy_verdicts_total: the kernel's verdict map had no room.",
            )
            .expect("valid metric"),
            policy_reloads: IntCounterVec::new(
                Opts::new(
                    "observer_policy_reloads_total",
                    "Reloads of the policy file: ok, or refused (invalid; the last good policy stays in force).",
                ),
                &["result"],
            )
            .expect("valid metric"),
            http_connections: IntGauge::new(
                "observer_http_connections",
                "Connections to the endpoint open now.",
            )
            .expect("valid metric"),
            http_connections_closed: IntCounterVec::new(
                Opts::new(
                    "observer_http_connections_closed_total",
                    "Connections the endpoint closed before their client did: evicted (idle, to make room for a new one: --max-connections), refused (every connection busy), handshake (TLS failed or too slow), timeout (a request's headers too slow).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            http_requests: IntCounterVec::new(
                Opts::new(
                    "observer_http_requests_total",
                    "Requests to the endpoint, by path and status code (401, 403: --secure-serving refused them).",
                ),
                &["path", "code"],
            )
            .expect("valid metric"),
            policy_verdicts: IntCounterVec::new(
                Opts::new(
                    "observer_policy_verdicts_total",
                    "Connections a policy decided: allow, deny, or audit_deny (would be denied; let through).",
                ),
                &VERDICT_LABELS,
            )
            .expect("valid metric"),
            policy_unenforced: IntGaugeVec::new(
                Opts::new(
                    "observer_policy_unenforced_pods",
                    format!(
                        "1 for each pod a policy selects and does not (fully) hold, by reason: {}.",
                        Unenforced::ALL
                            .map(|r| format!("{} ({})", r.as_str(), r.meaning()))
                            .join(", ")
                    ),
                ),
                &["namespace", "pod", "reason"],
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new("observer_errors_total", "Errors of the observer, by kind."),
                &["kind"],
            )
            .expect("valid metric"),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "observer_build_info",
                "Always 1; the observer's version is a label.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics.register(build_info);
        metrics.register(metrics.programs_attached.clone());
        metrics.register(metrics.pods.clone());
        metrics.register(metrics.flow_series.clone());
        metrics.register(metrics.collection_duration.clone());
        metrics.register(metrics.reconcile_duration.clone());
        metrics.register(metrics.flow_map_entries.clone());
        metrics.register(metrics.flow_map_capacity.clone());
        metrics.register(metrics.flow_map_reclaimed.clone());
        metrics.register(metrics.flow_overflow_packets.clone());
        metrics.register(metrics.flow_insert_failures.clone());
        metrics.register(metrics.policy_verdicts_lost.clone());
        metrics.register(metrics.ipc_hooks.clone());
        metrics.register(metrics.ipc_lost.clone());
        metrics.register(metrics.errors.clone());
        metrics.register(metrics.policy_reloads.clone());
        metrics.register(metrics.policy_verdicts.clone());
        metrics.register(metrics.policy_unenforced.clone());
        metrics.register(metrics.http_connections.clone());
        metrics.register(metrics.http_connections_closed.clone());
        metrics.register(metrics.http_requests.clone());
        for reason in HTTP_CLOSE_REASONS {
            metrics.http_connections_closed.with_label_values(&[reason]);
        }
        // Every known series from the start, at 0: `rate()` and alerts see
        // the first error, not only the second.
        for kind in ERROR_KINDS {
            metrics.errors.with_label_values(&[kind]);
        }
        for result in ["ok", "refused"] {
            metrics.policy_reloads.with_label_values(&[result]);
        }
        metrics
    }

    /// Adds families of another part of the observer.
    pub fn register(&self, collector: impl prometheus::core::Collector + 'static) {
        self.registry
            .register(Box::new(collector))
            .expect("metric names are unique");
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &'static str) {
        self.errors_of(kind, 1);
    }

    /// Counts `count` errors of `kind` (none: nothing).
    pub fn errors_of(&self, kind: &'static str, count: usize) {
        debug_assert!(ERROR_KINDS.contains(&kind), "unknown error kind {kind}");
        self.errors.with_label_values(&[kind]).inc_by(count as u64);
    }

    /// The text exposition format, as served on /metrics.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
