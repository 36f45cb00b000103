//! Turns the kernel's flow map into Prometheus counters.
//!
//! The kernel keeps cumulative counters per flow. Each collection walks the
//! map, takes the difference to what it saw last time, and adds it to the
//! series the flow belongs to. A flow the LRU evicted and that came back starts
//! from zero again, which the difference detects. Entries of namespaces that
//! are not attached (any more) are removed.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use aya::maps::MapError;
use observer_common::{FlowKey, FlowValue as FlowCounters, direction, family};

use crate::{attach::AttachedNetns, datapath::Maps, metrics::Metrics};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("reading the flow map: {0}")]
    Flows(#[source] MapError),
    #[error("reading the datapath statistics: {0}")]
    Stats(#[source] MapError),
}

pub struct Collector {
    maps: Maps,
    metrics: Arc<Metrics>,
    attached: HashMap<u64, AttachedNetns>,
    /// Counters of every flow at the last collection.
    last: HashMap<FlowKey, FlowCounters>,
    /// Map entries this collector removed (they are not evictions).
    removed: u64,
    evictions_reported: u64,
    insert_failures_reported: u64,
}

/// What a flow is counted under.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Series {
    cookie: u64,
    if_index: u32,
    direction: u8,
    family: u8,
    protocol: u8,
}

impl Collector {
    pub fn new(maps: Maps, metrics: Arc<Metrics>) -> Self {
        metrics.flow_map_capacity.set(i64::from(maps.flow_capacity));
        Self {
            maps,
            metrics,
            attached: HashMap::new(),
            last: HashMap::new(),
            removed: 0,
            evictions_reported: 0,
            insert_failures_reported: 0,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn attached(&mut self, netns: AttachedNetns) {
        self.metrics
            .programs_attached
            .with_label_values(&[&netns.name])
            .set(netns.programs as i64);
        self.attached.insert(netns.cookie, netns);
    }

    /// One pass over the maps.
    pub fn collect(&mut self) -> Result<(), CollectError> {
        // Statistics first: flows inserted after this read are then at worst
        // missing from the eviction estimate, never counted as evicted.
        let (created, insert_failures) = self.read_stats()?;

        let mut deltas: HashMap<Series, FlowCounters> = HashMap::new();
        let mut seen = HashSet::with_capacity(self.last.len());
        let mut stale = Vec::new();
        for entry in self.maps.flows.iter() {
            let (key, now) = entry.map_err(CollectError::Flows)?;
            if !seen.insert(key) {
                continue; // the walk restarted after a concurrent deletion
            }
            let before = self.last.insert(key, now).unwrap_or_default();
            let delta = difference(now, before);
            if delta.packets > 0 {
                let sum = deltas.entry(series_of(&key)).or_default();
                sum.packets += delta.packets;
                sum.bytes += delta.bytes;
            }
            if !self.attached.contains_key(&key.netns_cookie) {
                stale.push(key);
            }
        }
        self.last.retain(|key, _| seen.contains(key));

        for (series, delta) in deltas {
            let Some(labels) = self.labels(&series) else {
                continue;
            };
            let labels = labels.each_ref().map(String::as_str);
            self.metrics
                .packets
                .with_label_values(&labels)
                .inc_by(delta.packets);
            self.metrics
                .bytes
                .with_label_values(&labels)
                .inc_by(delta.bytes);
        }

        for key in &stale {
            if self.maps.flows.remove(key).is_ok() {
                self.removed += 1;
            }
            self.last.remove(key);
        }

        let live = seen.len() as u64 - stale.len() as u64;
        self.metrics.flow_map_entries.set(live as i64);
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
        Ok(())
    }

    /// Flows created and insert failures, summed over CPUs.
    fn read_stats(&self) -> Result<(u64, u64), CollectError> {
        let per_cpu = self.maps.stats.get(&0, 0).map_err(CollectError::Stats)?;
        Ok(per_cpu.iter().fold((0, 0), |(created, failed), s| {
            (created + s.flows_created, failed + s.flow_insert_failed)
        }))
    }

    fn labels(&self, series: &Series) -> Option<[String; 4]> {
        let netns = self.attached.get(&series.cookie)?;
        let interface = netns
            .interfaces
            .iter()
            .find(|(index, _)| *index == series.if_index)
            .map_or_else(|| series.if_index.to_string(), |(_, name)| name.to_string());
        let direction = match series.direction {
            direction::INGRESS => "ingress",
            _ => "egress",
        };
        Some([
            netns.name.clone(),
            interface,
            direction.to_owned(),
            protocol_name(series.family, series.protocol),
        ])
    }
}

fn series_of(key: &FlowKey) -> Series {
    Series {
        cookie: key.netns_cookie,
        if_index: key.if_index,
        direction: key.direction,
        family: key.family,
        protocol: key.protocol,
    }
}

/// What a flow gained since `before`. A flow whose counters went down was
/// evicted and created anew in between: all of `now` is new.
fn difference(now: FlowCounters, before: FlowCounters) -> FlowCounters {
    if now.packets < before.packets || now.bytes < before.bytes {
        now
    } else {
        FlowCounters {
            packets: now.packets - before.packets,
            bytes: now.bytes - before.bytes,
            ..now
        }
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

    fn counters(packets: u64, bytes: u64) -> FlowCounters {
        FlowCounters { packets, bytes }
    }

    #[test]
    fn difference_is_what_was_added() {
        assert_eq!(
            difference(counters(5, 500), counters(2, 200)),
            counters(3, 300)
        );
        assert_eq!(
            difference(counters(5, 500), counters(5, 500)),
            counters(0, 0)
        );
    }

    #[test]
    fn a_flow_that_restarted_counts_from_zero() {
        assert_eq!(
            difference(counters(2, 100), counters(9, 900)),
            counters(2, 100)
        );
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
