//! Turns the kernel's flow map into the traffic metrics. The one data path:
//! FLOWS (kernel) -> deltas -> series -> [`FlowMetrics`] -> /metrics.
//!
//! The kernel keeps cumulative counters per flow. Each collection walks the
//! map, takes the difference to what it saw last time (a flow the LRU evicted
//! and that came back starts from zero, which the difference detects), and
//! adds it to the flow's series. A series is what the labels can tell apart:
//! pod, class, direction, protocol, server port, peer, and on `lo` the client
//! and server containers (the kernel pairs each localhost flow with its
//! reverse, so a flow knows both). Entries of namespaces that are not
//! attached (any more) are removed from the map.
//!
//! Memory: a 16-byte record per flow, keyed by the flow's 64-bit hash, in a
//! table sized for the flow map's capacity up front (so it never grows, and
//! never holds two tables at once while growing): about 50 bytes a flow of
//! capacity. Series are aggregated during the walk.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    sync::Arc,
    time::Instant,
};

use aya::maps::MapError;
use observer_common::{FlowKey, FlowValue, class, direction, family, server};
use serde::{Deserialize, Serialize};

use crate::{
    attach::AttachedNetns,
    datapath::Maps,
    flow_metrics::{Counts, FlowLabels, FlowMetrics},
    identities::{Identities, ObjectRef, SharedIdentities},
    metrics::Metrics,
    policy::compile::RuleName,
    verdicts::Verdicts,
};

/// Linux's default `ip_local_port_range`: where client ports come from.
const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 32768..=60999;
/// A sender without a socket: a packet the kernel made (an RST, an ICMP error).
pub const KERNEL: &str = "kernel";
/// A side that cannot be attributed.
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("reading the flow map: {0}")]
    Flows(#[source] MapError),
    #[error("reading the datapath statistics: {0}")]
    Stats(#[source] MapError),
    #[error("reading the policy verdicts: {0}")]
    Verdicts(#[source] MapError),
}

/// A series of the last collection, for `observer flows`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRow {
    pub labels: Vec<(String, String)>,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds the counts were gathered over.
    pub seconds: f64,
}

pub struct Collector {
    maps: Maps,
    metrics: Arc<Metrics>,
    flows: Arc<FlowMetrics>,
    identities: SharedIdentities,
    attached: HashMap<u64, AttachedNetns>,
    /// What each flow (by key hash) had at the last collection.
    last: HashMap<u64, Seen, BuildHasherDefault<PassThrough>>,
    hasher: RandomState,
    pass: u8,
    /// Namespaces whose flows were seen without being attached at the last
    /// collection: their flows go at this one. (Not at once: a pod attached a
    /// moment ago may have flows before the collector hears of it.)
    unknown: std::collections::HashSet<u64>,
    /// Map entries this collector removed (they are not evictions).
    removed: u64,
    evictions_reported: u64,
    insert_failures_reported: u64,
    last_collection: Instant,
    /// The last collection's series (names resolved only if `rows` asks),
    /// and the seconds it covered.
    last_series: Vec<(Series, Counts)>,
    last_seconds: f64,
    verdicts: Verdicts,
}

/// A flow's counters at the last collection. Small on purpose: one per flow.
/// Packets and connections are kept modulo 2^32 (no flow sends 4 G packets
/// between two collections); bytes in full, which also tells a flow that was
/// evicted and came back (its bytes went down).
#[derive(Clone, Copy, Default)]
struct Seen {
    bytes: u64,
    packets: u32,
    connections: u16,
    /// Collection pass that last saw the flow (only "this one or not" matters).
    pass: u8,
}
const _: () = assert!(size_of::<Seen>() == 16);

/// The keys of `last` are hashes already.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What a flow is counted under, before names are looked up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Series {
    cookie: u64,
    class: u8,
    direction: Direction,
    family: u8,
    protocol: u8,
    port: Option<u16>,
    peer_id: u32,
    /// cgroup ids on `lo`: `None` where not attributable.
    client: Option<u64>,
    server: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Direction {
    Egress,
    Ingress,
    Request,
    Response,
    Unknown,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
            Self::Request => "request",
            Self::Response => "response",
            Self::Unknown => UNKNOWN,
        }
    }
}

impl Collector {
    pub fn new(maps: Maps, metrics: Arc<Metrics>, flows: Arc<FlowMetrics>) -> Self {
        metrics.flow_map_capacity.set(i64::from(maps.flow_capacity));
        let capacity = maps.flow_capacity as usize;
        Self {
            maps,
            metrics,
            flows,
            identities: SharedIdentities::default(),
            attached: HashMap::new(),
            last: HashMap::with_capacity_and_hasher(capacity, BuildHasherDefault::default()),
            unknown: Default::default(),
            hasher: RandomState::new(),
            pass: 0,
            removed: 0,
            evictions_reported: 0,
            insert_failures_reported: 0,
            last_collection: Instant::now(),
            last_series: Vec::new(),
            last_seconds: 0.0,
            verdicts: Verdicts::default(),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn set_policy_names(&mut self, names: Arc<HashMap<u32, RuleName>>) {
        self.verdicts.set_names(names);
    }

    pub fn set_identities(&mut self, identities: SharedIdentities) {
        self.identities = identities;
    }

    pub fn attached(&mut self, netns: AttachedNetns) {
        self.metrics
            .programs_attached
            .with_label_values(&[&netns.pod.namespace, &netns.pod.name])
            .set(netns.programs as i64);
        self.flows.pod_present(&netns.pod);
        self.attached.insert(netns.cookie, netns);
    }

    /// The pod is detached: its series expire after the grace period, its
    /// flows leave the map at the next collection.
    pub fn detached(&mut self, cookie: u64) {
        if let Some(netns) = self.attached.remove(&cookie) {
            let _ = self
                .metrics
                .programs_attached
                .remove_label_values(&[&netns.pod.namespace, &netns.pod.name]);
            self.flows.pod_gone(&netns.pod, Instant::now());
            self.verdicts.detached(cookie, &self.metrics);
            // Its flows go at the next collection.
            self.unknown.insert(cookie);
        }
    }

    /// The series of the last collection.
    pub fn rows(&self) -> Vec<FlowRow> {
        self.last_series
            .iter()
            .filter_map(|(series, counts)| {
                let netns = self.attached.get(&series.cookie)?;
                let labels = labels(series, &netns.pod, &self.identities);
                Some(FlowRow {
                    labels: crate::flow_metrics::FLOW_LABELS
                        .iter()
                        .map(|l| l.to_string())
                        .zip(labels.0)
                        .collect(),
                    packets: counts.packets,
                    bytes: counts.bytes,
                    seconds: self.last_seconds,
                })
            })
            .collect()
    }

    /// One pass over the maps.
    pub fn collect(&mut self) -> Result<(), CollectError> {
        let started = Instant::now();
        // Statistics first: flows inserted after this read are then at worst
        // missing from the eviction estimate, never counted as evicted.
        let (created, insert_failures) = self.read_stats()?;
        self.verdicts
            .collect(&mut self.maps.verdicts, &self.attached, &self.metrics)
            .map_err(CollectError::Verdicts)?;
        self.pass = self.pass.wrapping_add(1);

        let mut stale = Vec::new();
        let mut unknown = std::collections::HashSet::new();
        let mut live = 0u64;
        let mut series: HashMap<Series, Counts> = HashMap::new();
        for entry in self.maps.flows.iter() {
            let (key, now) = entry.map_err(CollectError::Flows)?;
            let hash = self.hasher.hash_one(key);
            let seen = Seen {
                bytes: now.bytes,
                packets: now.packets as u32,
                connections: now.connections as u16,
                pass: self.pass,
            };
            let before = self.last.insert(hash, seen);
            if before.is_some_and(|b| b.pass == self.pass) {
                continue; // the walk restarted after a concurrent deletion
            }
            if !self.attached.contains_key(&key.netns_cookie) {
                if self.unknown.contains(&key.netns_cookie) {
                    stale.push(key);
                }
                unknown.insert(key.netns_cookie);
                continue;
            }
            live += 1;
            let delta = difference(&now, &before.unwrap_or_default());
            if delta.packets > 0 {
                series.entry(series_of(&key, &now)).or_default().add(delta);
            }
        }
        let pass = self.pass;
        self.last.retain(|_, seen| seen.pass == pass);

        self.last_seconds = self.last_collection.elapsed().as_secs_f64();
        self.last_collection = Instant::now();
        self.last_series.clear();
        for (series, counts) in series {
            let Some(netns) = self.attached.get(&series.cookie) else {
                continue;
            };
            let labels = labels(&series, &netns.pod, &self.identities);
            self.flows.add(&netns.pod, labels, counts);
            self.last_series.push((series, counts));
        }

        for key in &stale {
            if self.maps.flows.remove(key).is_ok() {
                self.removed += 1;
            }
            self.last.remove(&self.hasher.hash_one(key));
        }
        self.unknown = unknown;
        self.notice_gone_pods();
        self.flows.expire(Instant::now());
        self.report(created, insert_failures, live);
        self.metrics
            .collection_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// A pod whose namespace is gone stops being attached: its series expire
    /// after the grace period, its map entries are removed next time.
    fn notice_gone_pods(&mut self) {
        let now = Instant::now();
        self.attached.retain(|_, netns| {
            if netns.path.exists() {
                return true;
            }
            tracing::info!(pod = %netns.name, "network namespace gone");
            let _ = self
                .metrics
                .programs_attached
                .remove_label_values(&[&netns.pod.namespace, &netns.pod.name]);
            self.flows.pod_gone(&netns.pod, now);
            false
        });
    }

    fn report(&mut self, created: u64, insert_failures: u64, live: u64) {
        self.metrics.flow_map_entries.set(live as i64);
        self.metrics.flow_series.set(self.flows.series() as i64);
        let evictions = created.saturating_sub(live + self.removed);
        if evictions > self.evictions_reported {
            self.metrics
                .flow_map_evictions
                .inc_by(evictions - self.evictions_reported);
            self.evictions_reported = evictions;
        }
        if insert_failures > self.insert_failures_reported {
            self.metrics
                .flow_insert_failures
                .inc_by(insert_failures - self.insert_failures_reported);
            self.insert_failures_reported = insert_failures;
        }
    }

    /// Flows created and insert failures, summed over CPUs.
    fn read_stats(&self) -> Result<(u64, u64), CollectError> {
        let per_cpu = self.maps.stats.get(&0, 0).map_err(CollectError::Stats)?;
        Ok(per_cpu.iter().fold((0, 0), |(created, failed), s| {
            (
                created + s.flows_created,
                failed + s.flow_insert_failed + s.classify_failed,
            )
        }))
    }
}

/// What a flow gained since `before`. A flow whose counters went down was
/// evicted and created anew in between: all of `now` is new.
fn difference(now: &FlowValue, before: &Seen) -> Counts {
    if now.bytes < before.bytes {
        return Counts {
            packets: now.packets,
            bytes: now.bytes,
            connections: now.connections,
        };
    }
    Counts {
        packets: u64::from((now.packets as u32).wrapping_sub(before.packets)),
        bytes: now.bytes - before.bytes,
        connections: u64::from((now.connections as u16).wrapping_sub(before.connections)),
    }
}

/// Whether the destination is the server: the kernel's answer (who listens),
/// else the port that is not a client port, else the lower one. `None` for
/// traffic without ports.
fn destination_is_server(server_side: u8, src_port: u16, dst_port: u16) -> Option<bool> {
    match server_side {
        server::DESTINATION => return Some(true),
        server::SOURCE => return Some(false),
        _ => {}
    }
    if src_port == 0 && dst_port == 0 {
        return None;
    }
    let src_ephemeral = EPHEMERAL_PORTS.contains(&src_port);
    let dst_ephemeral = EPHEMERAL_PORTS.contains(&dst_port);
    Some(match (src_ephemeral, dst_ephemeral) {
        (true, false) => true,
        (false, true) => false,
        _ => dst_port <= src_port,
    })
}

/// The series of a flow.
fn series_of(key: &FlowKey, value: &FlowValue) -> Series {
    let to_server = destination_is_server(value.server, key.src_port, key.dst_port);
    let port = to_server.map(|d| if d { key.dst_port } else { key.src_port });
    let localhost = value.class == class::LOCALHOST;
    let direction = match (localhost, to_server, key.direction) {
        (true, Some(true), _) => Direction::Request,
        (true, Some(false), _) => Direction::Response,
        (true, None, _) => Direction::Unknown,
        (false, _, direction::INGRESS) => Direction::Ingress,
        (false, _, _) => Direction::Egress,
    };
    // The receiver is known once the reverse flow exists (0 before).
    let receiver = (value.peer_cgroup != 0).then_some(value.peer_cgroup);
    let (client, server) = match (localhost, to_server) {
        (true, Some(true)) => (Some(value.src_cgroup), receiver),
        (true, Some(false)) => (receiver, Some(value.src_cgroup)),
        _ => (None, None),
    };
    Series {
        cookie: key.netns_cookie,
        class: value.class,
        direction,
        family: key.family,
        protocol: key.protocol,
        port,
        peer_id: value.peer_id,
        client,
        server,
    }
}

/// Names for a series.
fn labels(series: &Series, pod: &ObjectRef, identities: &Identities) -> FlowLabels {
    let unknown = || (String::new(), UNKNOWN.to_owned());
    let (peer_namespace, peer) = match series.class {
        class::LOCALHOST => (String::new(), String::new()),
        class::POD => identities
            .pods
            .get(&series.peer_id)
            .map_or_else(unknown, |p| (p.namespace.clone(), p.name.clone())),
        class::SERVICE => identities
            .services
            .get(&series.peer_id)
            .map_or_else(unknown, |s| (s.namespace.clone(), s.name.clone())),
        class::NODE => identities
            .nodes
            .get(&series.peer_id)
            .map_or_else(unknown, |n| (String::new(), n.clone())),
        _ => (String::new(), "external".to_owned()),
    };
    let container = |cgroup: Option<u64>| -> String {
        if series.class != class::LOCALHOST {
            return String::new();
        }
        match cgroup {
            Some(0) => KERNEL.to_owned(),
            Some(id) => identities
                .containers
                .get(&id)
                .filter(|c| &c.pod == pod)
                .map_or_else(|| UNKNOWN.to_owned(), |c| c.name.clone()),
            None => UNKNOWN.to_owned(),
        }
    };
    FlowLabels([
        pod.namespace.clone(),
        pod.name.clone(),
        class_name(series.class).to_owned(),
        series.direction.label().to_owned(),
        protocol_name(series.family, series.protocol),
        series.port.map(|p| p.to_string()).unwrap_or_default(),
        peer_namespace,
        peer,
        container(series.client),
        container(series.server),
    ])
}

pub fn class_name(class: u8) -> &'static str {
    match class {
        class::LOCALHOST => "localhost",
        class::POD => "pod",
        class::SERVICE => "service",
        class::NODE => "node",
        class::EXTERNAL => "external",
        _ => UNKNOWN,
    }
}

/// The `protocol` label: a name for the common IP protocols, the number for
/// the rest, `non_ip` for frames that are not IP (ARP, ...).
pub fn protocol_name(family: u8, protocol: u8) -> String {
    if family == family::OTHER {
        return "non_ip".into();
    }
    match protocol {
        0 => "hopopt".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identities::ContainerRef;

    fn value(packets: u64, bytes: u64) -> FlowValue {
        FlowValue {
            packets,
            bytes,
            ..FlowValue::default()
        }
    }

    fn seen(packets: u32, bytes: u64) -> Seen {
        Seen {
            packets,
            bytes,
            ..Seen::default()
        }
    }

    #[test]
    fn difference_is_what_was_added() {
        let d = difference(&value(5, 500), &seen(2, 200));
        assert_eq!((d.packets, d.bytes), (3, 300));
    }

    #[test]
    fn a_flow_that_restarted_counts_from_zero() {
        let d = difference(&value(2, 100), &seen(9, 900));
        assert_eq!((d.packets, d.bytes), (2, 100));
    }

    #[test]
    fn the_server_port_is_never_the_client_port() {
        // The kernel knows who listens.
        assert_eq!(
            destination_is_server(server::DESTINATION, 80, 40000),
            Some(true)
        );
        assert_eq!(
            destination_is_server(server::SOURCE, 40000, 80),
            Some(false)
        );
        // Otherwise: the port outside the ephemeral range, else the lower one.
        assert_eq!(
            destination_is_server(server::UNKNOWN, 45000, 53),
            Some(true)
        );
        assert_eq!(
            destination_is_server(server::UNKNOWN, 53, 45000),
            Some(false)
        );
        assert_eq!(
            destination_is_server(server::UNKNOWN, 40001, 40000),
            Some(true)
        );
        assert_eq!(destination_is_server(server::UNKNOWN, 0, 0), None);
    }

    fn localhost_key(src_port: u16, dst_port: u16) -> FlowKey {
        FlowKey {
            netns_cookie: 7,
            src_port,
            dst_port,
            interface: observer_common::interface::LOOPBACK,
            protocol: 6,
            family: family::IPV4,
            ..FlowKey::default()
        }
    }

    #[test]
    fn names_client_and_server_containers_of_localhost_flows() {
        let pod = ObjectRef::new("shop", "shop");
        let mut identities = Identities::default();
        for (cgroup, name) in [(100, "sidecar"), (200, "app")] {
            identities.containers.insert(
                cgroup,
                ContainerRef {
                    pod: pod.clone(),
                    name: name.into(),
                },
            );
        }
        let request = FlowValue {
            class: class::LOCALHOST,
            server: server::DESTINATION,
            src_cgroup: 100,
            peer_cgroup: 200,
            ..FlowValue::default()
        };
        let series = series_of(&localhost_key(41000, 8080), &request);
        let l = labels(&series, &pod, &identities).0;
        assert_eq!(&l[2..6], ["localhost", "request", "tcp", "8080"]);
        assert_eq!(&l[8..], ["sidecar", "app"]);

        let response = FlowValue {
            server: server::SOURCE,
            src_cgroup: 200,
            peer_cgroup: 100,
            ..request
        };
        let series = series_of(&localhost_key(8080, 41000), &response);
        let l = labels(&series, &pod, &identities).0;
        assert_eq!(&l[3..6], ["response", "tcp", "8080"]);
        assert_eq!(&l[8..], ["sidecar", "app"]);

        // No reverse flow yet, and a packet the kernel sent: said explicitly.
        let rst = FlowValue {
            src_cgroup: 0,
            peer_cgroup: 0,
            ..response
        };
        let series = series_of(&localhost_key(8080, 41000), &rst);
        assert_eq!(
            &labels(&series, &pod, &identities).0[8..],
            [UNKNOWN, KERNEL]
        );
        // A cgroup of another pod is not this pod's container.
        let series = series_of(&localhost_key(41000, 8080), &request);
        let other = ObjectRef::new("default", "web");
        assert_eq!(
            &labels(&series, &other, &identities).0[8..],
            [UNKNOWN, UNKNOWN]
        );
    }

    #[test]
    fn names_peers_by_class() {
        let pod = ObjectRef::new("default", "client");
        let mut identities = Identities::default();
        identities
            .services
            .insert(3, ObjectRef::new("default", "web"));
        let value = FlowValue {
            class: class::SERVICE,
            server: server::DESTINATION,
            peer_id: 3,
            ..FlowValue::default()
        };
        let mut key = localhost_key(40000, 80);
        key.interface = observer_common::interface::POD;
        let l = labels(&series_of(&key, &value), &pod, &identities).0;
        assert_eq!(
            &l[2..],
            ["service", "egress", "tcp", "80", "default", "web", "", ""]
        );
        let external = FlowValue {
            class: class::EXTERNAL,
            ..value
        };
        let l = labels(&series_of(&key, &external), &pod, &identities).0;
        assert_eq!(&l[6..8], ["", "external"]);
        let unknown_pod = FlowValue {
            class: class::POD,
            peer_id: 0,
            ..value
        };
        let l = labels(&series_of(&key, &unknown_pod), &pod, &identities).0;
        assert_eq!(&l[6..8], ["", UNKNOWN]);
    }

    #[test]
    fn names_protocols() {
        assert_eq!(protocol_name(family::IPV4, 6), "tcp");
        assert_eq!(protocol_name(family::IPV6, 17), "udp");
        assert_eq!(protocol_name(family::IPV6, 58), "icmpv6");
        assert_eq!(protocol_name(family::IPV4, 47), "47");
        assert_eq!(protocol_name(family::OTHER, 0), "non_ip");
    }
}
