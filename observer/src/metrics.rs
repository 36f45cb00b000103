//! The Prometheus metric families the observer exports. Every name starts with
//! `observer_`; counters end in `_total`; bytes are bytes.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Labels of the traffic counters.
pub const TRAFFIC_LABELS: [&str; 4] = ["netns", "interface", "direction", "protocol"];

pub struct Metrics {
    registry: Registry,
    /// Packets by pod namespace, interface, direction and protocol.
    pub packets: IntCounterVec,
    /// Bytes (link-layer header included) by the same labels.
    pub bytes: IntCounterVec,
    /// tc programs attached per namespace.
    pub programs_attached: IntGaugeVec,
    /// Flows in the kernel's flow map, and its capacity.
    pub flow_map_entries: IntGauge,
    pub flow_map_capacity: IntGauge,
    /// Flows the kernel's LRU pushed out to make room: their packets since
    /// the last collection are lost to the counters.
    pub flow_map_evictions: IntCounter,
    /// Packets not counted because their flow could not be inserted.
    pub flow_insert_failures: IntCounter,
    /// Errors by kind (attach, detach, map_read, ...).
    pub errors: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            packets: IntCounterVec::new(
                Opts::new(
                    "observer_packets_total",
                    "Packets seen in pod network namespaces.",
                ),
                &TRAFFIC_LABELS,
            )
            .expect("valid metric"),
            bytes: IntCounterVec::new(
                Opts::new(
                    "observer_bytes_total",
                    "Bytes seen in pod network namespaces, link-layer header included.",
                ),
                &TRAFFIC_LABELS,
            )
            .expect("valid metric"),
            programs_attached: IntGaugeVec::new(
                Opts::new(
                    "observer_programs_attached",
                    "tc programs attached in a network namespace.",
                ),
                &["netns"],
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
            flow_map_evictions: IntCounter::new(
                "observer_flow_map_evictions_total",
                "Flows the kernel flow map evicted to make room for new ones.",
            )
            .expect("valid metric"),
            flow_insert_failures: IntCounter::new(
                "observer_flow_insert_failures_total",
                "Packets not counted because their flow could not be inserted.",
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
        metrics.register(metrics.packets.clone());
        metrics.register(metrics.bytes.clone());
        metrics.register(metrics.programs_attached.clone());
        metrics.register(metrics.flow_map_entries.clone());
        metrics.register(metrics.flow_map_capacity.clone());
        metrics.register(metrics.flow_map_evictions.clone());
        metrics.register(metrics.flow_insert_failures.clone());
        metrics.register(metrics.errors.clone());
        metrics
    }

    fn register(&self, collector: impl prometheus::core::Collector + 'static) {
        self.registry
            .register(Box::new(collector))
            .expect("metric names are unique");
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
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
