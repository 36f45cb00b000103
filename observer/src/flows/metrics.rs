//! The traffic counters, as a Prometheus collector that bounds its own
//! cardinality:
//!
//! - at most `max_series_per_pod` series per pod; traffic of further series
//!   is counted under one overflow series per class and direction, whose
//!   other labels say `overflow`;
//! - the series of a pod that is gone are dropped after a grace period;
//! - labels the user dropped (`--drop-labels`) are exported empty, which
//!   folds their series together.
//!
//! Worst case: pods × (max_series_per_pod + 5 classes × 4 directions)
//! series per family.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus::{
    core::{Collector, Desc},
    proto::{Counter, LabelPair, Metric, MetricFamily, MetricType},
};

use super::{
    saved::SavedSeries,
    schema::{FlowLabels, LABELS, OVERFLOW, Role},
};
use crate::names::ObjectRef;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

impl Counts {
    /// Nothing counted. (Not only "no packet": the kernel adds a packet's
    /// counters one by one, and a reading between two of them has the
    /// packet without its bytes or its connection; the rest is new at the
    /// next reading.)
    pub fn is_zero(&self) -> bool {
        self.packets == 0 && self.bytes == 0 && self.connections == 0
    }

    pub fn add(&mut self, other: Counts) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.connections += other.connections;
    }
}

#[derive(Clone, Debug)]
pub struct SeriesConfig {
    pub max_series_per_pod: usize,
    /// How long the series of a pod that is gone stay.
    pub grace: Duration,
    /// Indices into [`LABELS`] of the labels exported empty.
    pub dropped: Vec<usize>,
}

pub struct FlowMetrics {
    config: SeriesConfig,
    descs: [Desc; 3],
    state: Mutex<HashMap<ObjectRef, PodSeries>>,
}

#[derive(Default)]
struct PodSeries {
    series: HashMap<FlowLabels, Counts>,
    gone_since: Option<Instant>,
}

const FAMILIES: [(&str, &str); 3] = [
    (
        "observer_flow_packets_total",
        "Packets of pod traffic, by class, peer and server port; for class unix, messages sent; for class fifo, write calls.",
    ),
    (
        "observer_flow_bytes_total",
        "Bytes of pod traffic (link-layer header included), by class, peer and server port; for classes unix and fifo, the bytes sent or written.",
    ),
    (
        "observer_connections_opened_total",
        "TCP connections opened (SYN from the client), by class, peer and server port; for class unix, stream and seqpacket connections.",
    ),
];

impl FlowMetrics {
    pub fn new(config: SeriesConfig) -> Self {
        let labels: Vec<String> = LABELS.iter().map(|l| l.name.to_owned()).collect();
        let descs = FAMILIES.map(|(name, help)| {
            Desc::new(name.into(), help.into(), labels.clone(), HashMap::new())
                .expect("valid metric description")
        });
        Self {
            config,
            descs,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Adds traffic to a series of `pod`.
    pub fn add(&self, pod: &ObjectRef, mut labels: FlowLabels, delta: Counts) {
        for &index in &self.config.dropped {
            labels.value_mut(index).clear();
        }
        let mut state = self.state.lock().expect("not poisoned");
        let series = &mut state.entry(pod.clone()).or_default().series;
        if let Some(counts) = series.get_mut(&labels) {
            counts.add(delta);
            return;
        }
        let regular = series.keys().filter(|l| !is_overflow(l)).count();
        if regular >= self.config.max_series_per_pod {
            for (i, label) in LABELS.iter().enumerate() {
                if label.role == Role::Detail {
                    *labels.value_mut(i) = OVERFLOW.into();
                }
            }
        }
        series.entry(labels).or_default().add(delta);
    }

    /// The pod exists (again): its series stay.
    pub fn pod_present(&self, pod: &ObjectRef) {
        if let Some(series) = self.state.lock().expect("not poisoned").get_mut(pod) {
            series.gone_since = None;
        }
    }

    /// The pod is gone: its series go after the grace period.
    pub fn pod_gone(&self, pod: &ObjectRef, now: Instant) {
        if let Some(series) = self.state.lock().expect("not poisoned").get_mut(pod) {
            series.gone_since.get_or_insert(now);
        }
    }

    /// Drops the series of pods gone for longer than the grace period.
    pub fn expire(&self, now: Instant) {
        let grace = self.config.grace;
        self.state
            .lock()
            .expect("not poisoned")
            .retain(|_, pod| pod.gone_since.is_none_or(|since| now - since < grace));
    }

    /// Every series and its totals, to be saved.
    pub fn saved(&self) -> Vec<SavedSeries> {
        let state = self.state.lock().expect("not poisoned");
        state
            .iter()
            .flat_map(|(pod, series)| {
                series
                    .series
                    .iter()
                    .map(move |(labels, counts)| SavedSeries::new(pod, labels.clone(), *counts))
            })
            .collect()
    }

    /// Takes up saved series where they were. Their pods count as gone
    /// until attached again: the series of one that is not go after the
    /// grace period.
    pub fn restore(&self, saved: Vec<SavedSeries>, now: Instant) {
        for series in saved {
            let pod = series.pod();
            let counts = series.counts();
            self.add(&pod, series.labels, counts);
            self.pod_gone(&pod, now);
        }
    }

    /// Series (of each family) currently exported.
    pub fn series(&self) -> usize {
        let state = self.state.lock().expect("not poisoned");
        state.values().map(|p| p.series.len()).sum()
    }
}

impl Collector for FlowMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let state = self.state.lock().expect("not poisoned");
        let mut families: Vec<MetricFamily> = FAMILIES
            .iter()
            .map(|(name, help)| {
                let mut family = MetricFamily::default();
                family.set_name(name.to_string());
                family.set_help(help.to_string());
                family.set_field_type(MetricType::COUNTER);
                family
            })
            .collect();
        for pod in state.values() {
            for (labels, counts) in &pod.series {
                let values = [counts.packets, counts.bytes, counts.connections];
                for (family, value) in families.iter_mut().zip(values) {
                    if family.name() == FAMILIES[2].0 && !has_connections(labels) {
                        continue;
                    }
                    family.mut_metric().push(metric(labels, value));
                }
            }
        }
        families
    }
}

/// Whether a series' traffic has connections: TCP, unix streams and
/// seqpackets (and overflow series, which may hold TCP).
fn has_connections(labels: &FlowLabels) -> bool {
    use observer_common::{
        ipc::{UNIX_CLASS, unix_kind},
        protocol,
    };
    let protocol = labels.protocol.as_str();
    Some(protocol) == protocol::name(protocol::TCP)
        || protocol == OVERFLOW
        || (labels.class == UNIX_CLASS
            && (protocol == unix_kind::name(unix_kind::STREAM)
                || protocol == unix_kind::name(unix_kind::SEQPACKET)))
}

/// The families, for the registry (which owns what it is given, while the
/// collector's task updates the same series).
pub struct Registered(pub Arc<FlowMetrics>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

/// An `overflow` series (its details say so).
fn is_overflow(labels: &FlowLabels) -> bool {
    labels.protocol == OVERFLOW
}

fn metric(labels: &FlowLabels, value: u64) -> Metric {
    let pairs = LABELS
        .iter()
        .zip(labels.values())
        .map(|(label, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(label.name.to_owned());
            pair.set_value(value.to_owned());
            pair
        })
        .collect();
    let mut metric = Metric::from_label(pairs);
    let mut counter = Counter::default();
    counter.set_value(value as f64);
    metric.set_counter(counter);
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(port: &str) -> FlowLabels {
        FlowLabels {
            namespace: "default".into(),
            pod: "web".into(),
            class: "localhost".into(),
            direction: "request".into(),
            protocol: "tcp".into(),
            port: port.into(),
            client_container: "fetcher".into(),
            server_container: "web".into(),
            ..FlowLabels::default()
        }
    }

    fn one() -> Counts {
        Counts {
            packets: 1,
            bytes: 100,
            connections: 1,
        }
    }

    fn metrics(max: usize, dropped: Vec<usize>) -> FlowMetrics {
        FlowMetrics::new(SeriesConfig {
            max_series_per_pod: max,
            grace: Duration::from_secs(60),
            dropped,
        })
    }

    #[test]
    fn caps_series_per_pod_with_an_overflow_series() {
        let m = metrics(2, vec![]);
        let pod = ObjectRef::new("default", "web");
        for port in ["1", "2", "3", "4", "1"] {
            m.add(&pod, labels(port), one());
        }
        assert_eq!(m.series(), 3, "two series and one overflow");
        let families = m.collect();
        let overflow: Vec<_> = families[0]
            .get_metric()
            .iter()
            .filter(|m| m.get_label()[5].value() == OVERFLOW)
            .collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].get_counter().get_value(), 2.0, "ports 3 and 4");
        assert_eq!(
            overflow[0].get_label()[2].value(),
            "localhost",
            "class is kept"
        );
    }

    #[test]
    fn dropped_labels_fold_series_together() {
        let m = metrics(10, vec![crate::flows::schema::index("port").unwrap()]);
        let pod = ObjectRef::new("default", "web");
        m.add(&pod, labels("1"), one());
        m.add(&pod, labels("2"), one());
        assert_eq!(m.series(), 1);
        assert_eq!(
            m.collect()[1].get_metric()[0].get_counter().get_value(),
            200.0
        );
    }

    #[test]
    fn series_of_a_gone_pod_expire_after_the_grace_period() {
        let m = metrics(10, vec![]);
        let pod = ObjectRef::new("default", "web");
        m.add(&pod, labels("80"), one());
        let now = Instant::now();
        m.pod_gone(&pod, now);
        m.expire(now + Duration::from_secs(30));
        assert_eq!(m.series(), 1, "still within the grace period");
        m.expire(now + Duration::from_secs(61));
        assert_eq!(m.series(), 0);
    }

    #[test]
    fn connections_only_for_tcp() {
        let m = metrics(10, vec![]);
        let pod = ObjectRef::new("default", "web");
        let mut udp = labels("53");
        udp.protocol = "udp".into();
        m.add(&pod, udp, one());
        m.add(&pod, labels("80"), one());
        let families = m.collect();
        assert_eq!(families[0].get_metric().len(), 2);
        assert_eq!(families[2].get_metric().len(), 1);
    }
}
