//! Turns the kernel's flow map into the traffic metrics. The one data path:
//! FLOWS (kernel) -> deltas -> series -> [`FlowMetrics`] -> /metrics.
//!
//! The kernel keeps cumulative counters per flow. Each collection walks the
//! map, takes the difference to what it saw last time, and adds it to the
//! flow's series ([`super::series`]). Nothing is lost: the map evicts
//! nothing; the collector takes a flow out once it has been quiet a while
//! (or the map is nearly full), in one step with what it held; packets of
//! flows that find no room are counted per pod and hook in the overflow
//! map, into the pod's overflow series. Entries of namespaces that are not
//! attached (any more) are removed from the map.
//!
//! Memory: a 16-byte record per flow, keyed by the flow's 64-bit hash, in a
//! table sized for the flow map's capacity up front (so it never grows, and
//! never holds two tables at once while growing): 24 to 48 bytes a flow of
//! capacity ([`baselines`]). Series are aggregated during the walk.

use std::{
    collections::{HashMap, HashSet},
    hash::BuildHasher,
    sync::Arc,
    time::Instant,
};

use std::os::fd::AsFd;

use aya::maps::{IterableMap, MapError};
use observer_common::{FlowKey, FlowValue, OverflowKey, OverflowValue};

use self::baselines::{Baselines, Seen};
use super::{
    cgroups::{CgroupNames, Unnamed},
    metrics::{Counts, FlowMetrics},
    saved::{Baseline, FlowBaseline, OverflowBaseline, Saved, SavedVerdicts},
    schema::FlowRow,
    series,
    series::Series,
    verdicts::Verdicts,
};
use crate::{
    kernel::{self, attach::AttachedNetns, datapath::Maps},
    metrics::Metrics,
    names::{Identities, SharedIdentities},
    policy::compile::RuleName,
};

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("reading the flow map: {0}")]
    Flows(#[source] std::io::Error),
    #[error("flushing the CPUs' flow caches: {0}")]
    FlushCache(#[source] std::io::Error),
    #[error("reading the datapath statistics: {0}")]
    Stats(#[source] MapError),
    #[error("reading the policy verdicts: {0}")]
    Verdicts(#[source] MapError),
}

pub struct Collector {
    maps: Maps,
    metrics: Arc<Metrics>,
    flows: Arc<FlowMetrics>,
    identities: SharedIdentities,
    /// Names of the cgroups the identities do not name.
    cgroups: CgroupNames,
    unnamed: Unnamed,
    attached: HashMap<u64, AttachedNetns, Fast>,
    /// Flows in the map at the last collection.
    live: u64,
    /// The buffers the flow map is read through.
    batch: kernel::bpf::BatchReader<FlowKey, FlowValue>,
    /// What each flow (by key hash) had at the last collection.
    last: Baselines,
    /// Hashes flow keys into the keys of `last`.
    hasher: foldhash::quality::RandomState,
    /// The hashes of the batch at hand (kept from one collection to the
    /// next).
    hashes: Vec<u64>,
    pass: u8,
    /// Namespaces whose flows were seen without being attached at the last
    /// collection: their flows go at this one. (Not at once: a pod attached a
    /// moment ago may have flows before the collector hears of it.)
    unknown: HashSet<u64, Fast>,
    /// What the kernel's statistics said it could not count, as far as
    /// it is exported.
    uncounted_reported: Uncounted,
    /// Quiet ticks after which a flow is taken out of the map, counted to
    /// its last packet.
    idle_ticks: u8,
    /// What the overflow map held at the last collection, by pod, interface
    /// and direction.
    overflow_seen: HashMap<OverflowKey, OverflowValue>,
    last_collection: Instant,
    /// The last collection's series (names resolved only if `rows` asks),
    /// and the seconds it covered.
    last_series: Vec<(Series, Counts)>,
    last_seconds: f64,
    verdicts: Verdicts,
    /// The source has been complete once: flows of namespaces that are not
    /// attached are no pod's, and go (before, they may be a pod's that is
    /// about to be attached, or one an earlier observer left).
    complete: bool,
    /// The flow map is an earlier observer's, with no baseline of what it
    /// counted: the first collection only takes note of where each flow is.
    prime: bool,
    /// Pods detached since the last collection: counted one last time.
    leaving: std::collections::HashSet<u64>,
    /// A watched source says which pods are gone (not their paths).
    complete_by_source: bool,
    /// The same for the datapath statistics (evictions, insert failures).
    prime_stats: bool,
    /// Unix-socket and named-pipe traffic, if this kernel lets it be
    /// followed; and its series of the last collection.
    ipc: Option<ipc::Ipc>,
    last_ipc: Vec<ipc::IpcRow>,
}

/// What the kernel could not count ([`observer_common::DatapathStats`], summed over CPUs).
#[derive(Clone, Copy, Debug, Default)]
struct Uncounted {
    packets: u64,
    verdicts: u64,
    ipc: u64,
}

/// The hash tables the walk looks up per flow: seeded per process (keys
/// come from traffic), and several times faster than the standard SipHash.
type Fast = foldhash::fast::RandomState;

/// Series whose containers wait for a walk of the cgroups: their counts, and
/// each flow's baseline to go back to if they wait for their names.
type Pending = HashMap<Series, (Counts, Vec<(u64, Seen)>), Fast>;

impl Collector {
    /// `cgroup_root`: where cgroup v2 is mounted, to name the cgroups of
    /// containers that no inventory or API names.
    pub fn new(
        maps: Maps,
        metrics: Arc<Metrics>,
        flows: Arc<FlowMetrics>,
        cgroup_root: Option<std::path::PathBuf>,
    ) -> Self {
        metrics.flow_map_capacity.set(i64::from(maps.flow_capacity));
        let capacity = maps.flow_capacity as usize;
        Self {
            maps,
            metrics,
            flows,
            identities: SharedIdentities::default(),
            cgroups: CgroupNames::new(cgroup_root),
            unnamed: Unnamed::default(),
            attached: HashMap::default(),
            live: 0,
            batch: kernel::bpf::BatchReader::new(BATCH),
            last: Baselines::with_capacity(capacity),
            unknown: Default::default(),
            hasher: foldhash::quality::RandomState::default(),
            hashes: Vec::with_capacity(BATCH),
            pass: 0,
            uncounted_reported: Uncounted::default(),
            idle_ticks: IDLE_TICKS,
            overflow_seen: HashMap::new(),
            last_collection: Instant::now(),
            last_series: Vec::new(),
            last_seconds: 0.0,
            verdicts: Verdicts::default(),
            complete: false,
            prime: false,
            leaving: Default::default(),
            complete_by_source: false,
            prime_stats: false,
            ipc: None,
            last_ipc: Vec::new(),
        }
    }

    /// Counts unix-socket and named-pipe traffic from these maps.
    pub fn count_ipc(&mut self, maps: kernel::ipc::IpcMaps) {
        self.ipc = Some(ipc::Ipc::new(maps));
    }

    /// Takes up where an earlier observer left the kernel's maps
    /// (`inherited`, by name): each flow and verdict count is counted from
    /// the saved `baseline` if it was taken from these very maps, and
    /// otherwise from where the first collection finds it. `verdicts`: the
    /// saved totals of the verdict series.
    pub fn take_up(
        &mut self,
        inherited: &std::collections::BTreeSet<&'static str>,
        baseline: Option<Baseline>,
        verdicts: Vec<SavedVerdicts>,
    ) {
        use observer_common::{FLOWS_MAP, OVERFLOW_MAP, STATS_MAP, VERDICTS_MAP};
        self.verdicts.restore(verdicts);
        let ids = self.maps.ids;
        let (flows, kernel_verdicts, overflow) = match baseline {
            Some(b) => (
                (b.maps.flows == ids.flows).then_some(b.flows),
                (b.maps.verdicts == ids.verdicts).then_some(b.verdicts),
                (b.maps.overflow == ids.overflow).then_some(b.overflow),
            ),
            None => (None, None, None),
        };
        if inherited.contains(OVERFLOW_MAP) {
            match overflow {
                Some(saved) => {
                    for b in saved {
                        let key = OverflowKey {
                            netns_cookie: b.netns_cookie,
                            interface: b.interface,
                            direction: b.direction,
                            _pad: [0; 6],
                        };
                        let counts = OverflowValue {
                            packets: b.packets,
                            bytes: b.bytes,
                            connections: b.connections,
                        };
                        self.overflow_seen.insert(key, counts);
                    }
                }
                // What it holds was counted by the earlier observer, or is
                // lost with its totals.
                None => {
                    let fd = self.maps.overflow.map().fd().as_fd();
                    let entries = kernel::bpf::entries::<OverflowKey, OverflowValue>(fd);
                    for (key, now) in entries.into_iter().flatten() {
                        self.overflow_seen.insert(key, now);
                    }
                }
            }
        }
        if inherited.contains(FLOWS_MAP) {
            match flows {
                Some(flows) => {
                    tracing::info!(
                        flows = flows.len(),
                        "counting the flows on from the saved baseline"
                    );
                    for flow in flows {
                        let seen = Seen {
                            bytes: flow.bytes,
                            packets: flow.packets,
                            connections: flow.connections,
                            pass: self.pass,
                            quiet: 0,
                        };
                        self.last.insert(self.hasher.hash_one(flow.key), seen);
                    }
                }
                None => self.prime = true,
            }
        }
        if inherited.contains(VERDICTS_MAP) {
            self.verdicts.take_up(kernel_verdicts);
        }
        self.prime_stats = inherited.contains(STATS_MAP);
    }

    /// The source has been complete: flows of namespaces not attached go.
    /// `watched`: a source detaches the pods that go (not `--netns`).
    pub fn complete(&mut self, watched: bool) {
        self.complete = true;
        self.complete_by_source = watched;
    }

    /// Everything to save, as one snapshot: the series' totals and, taken
    /// at the same collection, what each kernel counter had then.
    pub fn snapshot(&self) -> Saved {
        Saved {
            series: self.flows.saved(),
            verdicts: self.verdicts.totals(&self.metrics),
            baseline: self.baseline(),
        }
    }

    /// What each kernel counter had at the last collection. `None` if the
    /// flow map cannot be read: the next observer then counts the flows on
    /// from where it finds them (a partial baseline would count the
    /// missing flows again from zero). A flow the map's two walks both read
    /// is listed twice, with the same baseline.
    fn baseline(&self) -> Option<Baseline> {
        let mut flows = Vec::new();
        let mut batch = kernel::bpf::BatchReader::<FlowKey, FlowValue>::new(BATCH);
        let read = batch.read(self.maps.flows.map().fd().as_fd(), |&key, _| {
            if let Some(seen) = self.last.get(self.hasher.hash_one(key)) {
                flows.push(FlowBaseline {
                    key,
                    bytes: seen.bytes,
                    packets: seen.packets,
                    connections: seen.connections,
                });
            }
        });
        if let Err(err) = read {
            tracing::warn!(%err, "cannot read the flow map for the baseline");
            return None;
        }
        let overflow = self
            .overflow_seen
            .iter()
            .map(|(k, v)| OverflowBaseline {
                netns_cookie: k.netns_cookie,
                interface: k.interface,
                direction: k.direction,
                packets: v.packets,
                bytes: v.bytes,
                connections: v.connections,
            })
            .collect();
        Some(Baseline {
            maps: self.maps.ids,
            verdicts: self.verdicts.baseline(),
            flows,
            overflow,
        })
    }

    /// Flows are taken out of the map after `ticks` collection intervals
    /// without a packet.
    pub fn reclaim_after(&mut self, ticks: u8) {
        self.idle_ticks = ticks.max(1);
    }

    /// The traffic series.
    pub fn flows(&self) -> &FlowMetrics {
        &self.flows
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
        self.verdicts.attached(&netns.pod, &self.metrics);
        // Detached and attached again before a collection: it stays.
        self.leaving.remove(&netns.cookie);
        self.follow_ipc(netns.cookie);
        self.attached.insert(netns.cookie, netns);
    }

    /// The pod is detached: what its programs counted since the last
    /// collection is counted at the next one (a short-lived pod's last
    /// seconds too); then its series expire after the grace period, and
    /// its flows leave the map.
    pub fn detached(&mut self, cookie: u64) {
        if self.attached.contains_key(&cookie) {
            self.leaving.insert(cookie);
        }
    }

    /// After its last collection: a detached pod goes.
    fn gone(&mut self, cookie: u64) {
        if let Some(netns) = self.attached.remove(&cookie) {
            let _ = self
                .metrics
                .programs_attached
                .remove_label_values(&[&netns.pod.namespace, &netns.pod.name]);
            self.flows.pod_gone(&netns.pod, Instant::now());
            self.verdicts.detached(cookie, &self.metrics);
            self.forget_ipc(cookie);
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
                Some(FlowRow {
                    labels: series.labels(&netns.pod, &self.identities, &self.cgroups),
                    packets: counts.packets,
                    bytes: counts.bytes,
                    seconds: self.last_seconds,
                })
            })
            .chain(self.last_ipc.iter().map(|(_, labels, counts)| FlowRow {
                labels: labels.clone(),
                packets: counts.packets,
                bytes: counts.bytes,
                seconds: self.last_seconds,
            }))
            .collect()
    }

    /// One pass over the maps. `tick`: a `--collect-interval` collection
    /// (not a scrape's), which measures how long a flow has been quiet.
    pub fn collect(&mut self, tick: bool) -> Result<(), CollectError> {
        let started = Instant::now();
        // What the CPUs counted in their caches goes into the flow map
        // first: the walk then reads every packet so far.
        self.maps
            .flow_cache
            .flush()
            .map_err(CollectError::FlushCache)?;
        let uncounted = self.read_stats()?;
        self.verdicts
            .collect(
                &mut self.maps.verdicts,
                &self.attached,
                self.complete,
                &self.metrics,
            )
            .map_err(CollectError::Verdicts)?;
        self.pass = self.pass.wrapping_add(1);

        let mut stale = Vec::new();
        let mut unknown: HashSet<u64, Fast> = HashSet::default();
        let mut live = 0u64;
        let mut series: HashMap<Series, Counts, Fast> = HashMap::default();
        // Series of containers whose cgroups no walk has looked for yet.
        let mut pending: Pending = HashMap::default();
        // What each container seen at this pass means for counting its
        // flows now (decided once per container, not per flow).
        let mut namings: HashMap<u64, Naming, Fast> = HashMap::default();
        let mut quiet = Vec::new();
        // Quiet flows are kept as candidates only if they may go: idle
        // long enough, or the map was nearly full at the last collection.
        let capacity = u64::from(self.maps.flow_capacity);
        let pressed = self.live * 10 >= capacity * 9;
        let prime = std::mem::take(&mut self.prime);
        let pass = self.pass;
        let fd = self.maps.flows.map().fd().as_fd();
        // The hashes of a batch first, then each flow, its baseline's slot
        // asked for a few flows ahead (see `baselines`).
        let hashes = &mut self.hashes;
        // A walk that fails part way has counted what it read (those flows'
        // baselines moved on): exported all the same. What needs the whole
        // map (the baselines of flows not seen, reclaiming, the map's
        // fill) waits for a walk that reads it all.
        let walked = self
            .batch
            .read_batches(fd, |keys, values| {
                hashes.clear();
                hashes.extend(keys.iter().map(|key| self.hasher.hash_one(key)));
                for &hash in hashes.iter().take(AHEAD) {
                    self.last.prefetch(hash);
                }
                for (i, (&key, now)) in keys.iter().zip(values).enumerate() {
                    if let Some(&ahead) = hashes.get(i + AHEAD) {
                        self.last.prefetch(ahead);
                    }
                    let hash = hashes[i];
                    let seen = Seen {
                        bytes: now.bytes,
                        packets: now.packets as u32,
                        connections: now.connections as u16,
                        pass,
                        quiet: 0,
                    };
                    let before = self.last.get(hash);
                    if before.is_some_and(|b| b.pass == pass) {
                        // Read twice, where the two walks meet: counted at
                        // its first reading; what came after, at the next
                        // collection.
                        continue;
                    }
                    live += 1;
                    // (A flow with a baseline already was read by a walk
                    // that failed part way, and counts on from it.)
                    if prime && before.is_none() {
                        self.last.insert(hash, seen);
                        continue;
                    }
                    if !self.attached.contains_key(&key.netns_cookie) {
                        // Not (yet) a pod's of ours: its baseline stays where
                        // it is (none: zero), so that it is counted from there
                        // once it is; gone at a later collection if it is no
                        // pod's. Marked as seen at this pass all the same.
                        self.last.insert(
                            hash,
                            Seen {
                                pass,
                                ..before.unwrap_or_default()
                            },
                        );
                        if self.complete && self.unknown.contains(&key.netns_cookie) {
                            stale.push(key);
                        }
                        unknown.insert(key.netns_cookie);
                        continue;
                    }
                    let delta = difference(now, &before.unwrap_or_default());
                    if delta.is_zero() {
                        let idle = before.map_or(0, |b| b.quiet.saturating_add(u8::from(tick)));
                        self.last.insert(
                            hash,
                            Seen {
                                quiet: idle,
                                ..seen
                            },
                        );
                        if idle >= self.idle_ticks || pressed {
                            quiet.push((key, idle));
                        }
                        continue;
                    }
                    // Where the flow's counts stay uncounted for now (its
                    // container waits for its name): what it had before.
                    let kept = Seen {
                        pass,
                        ..before.unwrap_or_default()
                    };
                    let of = Series::of(&key, now);
                    let mut waits = false;
                    let mut looked_for = true;
                    for id in of.cgroups() {
                        let naming = *namings.entry(id).or_insert_with(|| {
                            naming(
                                &self.identities,
                                &self.cgroups,
                                &mut self.unnamed,
                                id,
                                started,
                            )
                        });
                        waits |= naming == Naming::Held;
                        looked_for &= naming != Naming::NotLookedFor;
                    }
                    if !looked_for {
                        // Decided below, once a walk has looked for them.
                        self.last.insert(hash, seen);
                        let (counts, flows) = pending.entry(of).or_default();
                        counts.add(delta);
                        flows.push((hash, kept));
                    } else if waits {
                        // Counted at a later pass, under its container's name.
                        self.last.insert(hash, kept);
                    } else {
                        self.last.insert(hash, seen);
                        series.entry(of).or_default().add(delta);
                    }
                }
            })
            .map_err(CollectError::Flows);

        let unnamed: HashSet<u64, Fast> = namings
            .iter()
            .filter(|&(_, &n)| n != Naming::Named)
            .map(|(&id, _)| id)
            .collect();
        self.cgroups.learn(&unnamed);
        for (of, (counts, flows)) in pending {
            if awaits_name(
                &self.identities,
                &self.cgroups,
                &mut self.unnamed,
                &of,
                started,
            ) {
                for (hash, kept) in flows {
                    self.last.insert(hash, kept);
                }
            } else {
                series.entry(of).or_default().add(counts);
            }
        }
        match &walked {
            Ok(()) => {
                self.live = live;
                self.reclaim(&mut quiet, live, &mut series);
                self.last.retain(|seen| seen.pass == pass);
            }
            // The earlier observer's flows it did not reach: primed next time.
            Err(_) => self.prime |= prime,
        }
        self.collect_overflow();
        let containers = &self.identities.containers;
        self.unnamed
            .forget(|id| containers.contains_key(&id), started);

        self.last_seconds = self.last_collection.elapsed().as_secs_f64();
        self.last_collection = Instant::now();
        self.last_series.clear();
        for (series, counts) in series {
            let Some(netns) = self.attached.get(&series.cookie) else {
                continue;
            };
            let labels = series.labels(&netns.pod, &self.identities, &self.cgroups);
            self.flows.add(&netns.pod, labels, counts);
            self.last_series.push((series, counts));
        }
        self.last_ipc = self.collect_ipc(started, tick);
        for (cookie, labels, counts) in &self.last_ipc {
            if let Some(netns) = self.attached.get(cookie) {
                self.flows.add(&netns.pod, labels.clone(), *counts);
            }
        }

        for key in &stale {
            let _ = self.maps.flows.remove(key);
            self.last.remove(self.hasher.hash_one(key));
        }
        self.unknown = unknown;
        for cookie in std::mem::take(&mut self.leaving) {
            self.gone(cookie);
        }
        self.notice_gone_pods();
        self.flows.expire(Instant::now());
        self.report(uncounted, self.live);
        self.metrics
            .collection_duration
            .observe(started.elapsed().as_secs_f64());
        walked
    }

    /// A pod whose namespace is gone stops being attached: its series expire
    /// after the grace period, its map entries are removed next time. Only
    /// for namespaces named on the command line (`--netns`), where nothing
    /// else detaches them; a source that is watched detaches its pods
    /// itself, and a `/proc/<pid>/ns/net` path that went with its process
    /// says nothing of the pod (another process of it holds the namespace).
    fn notice_gone_pods(&mut self) {
        if self.complete_by_source {
            return;
        }
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

    fn report(&mut self, uncounted: Uncounted, live: u64) {
        self.metrics.flow_map_entries.set(live as i64);
        if std::mem::take(&mut self.prime_stats) {
            // An earlier observer's statistics: what they say so far is
            // theirs (and counted by them).
            self.uncounted_reported = uncounted;
        }
        self.metrics.flow_series.set(self.flows.series() as i64);
        let reported = &mut self.uncounted_reported;
        if uncounted.packets > reported.packets {
            self.metrics
                .flow_insert_failures
                .inc_by(uncounted.packets - reported.packets);
            reported.packets = uncounted.packets;
        }
        if uncounted.verdicts > reported.verdicts {
            self.metrics
                .policy_verdicts_lost
                .inc_by(uncounted.verdicts - reported.verdicts);
            reported.verdicts = uncounted.verdicts;
        }
        if uncounted.ipc > reported.ipc {
            self.metrics.ipc_lost.inc_by(uncounted.ipc - reported.ipc);
            reported.ipc = uncounted.ipc;
        }
    }

    /// What the kernel could not count, summed over CPUs: packets (no room
    /// anywhere, or no classifier), and policy decisions.
    fn read_stats(&self) -> Result<Uncounted, CollectError> {
        let per_cpu = self.maps.stats.get(&0, 0).map_err(CollectError::Stats)?;
        Ok(per_cpu
            .iter()
            .fold(Uncounted::default(), |sum, s| Uncounted {
                packets: sum.packets + s.flow_insert_failed + s.classify_failed,
                verdicts: sum.verdicts + s.verdicts_lost,
                ipc: sum.ipc + s.ipc_lost,
            }))
    }

    /// Takes quiet flows out of the map, each with what it held (one step:
    /// a packet between a read and a delete would be lost), and counts what
    /// came since the walk: flows quiet for the idle time, and while the
    /// map is nine tenths full, as many more of the quiet ones (the longest
    /// quiet first) as bring it down to eight tenths. A flow that talks
    /// again is simply a new flow (classified anew). One system call per
    /// flow taken: the kernel has no batch that takes only given keys.
    fn reclaim(
        &mut self,
        quiet: &mut [(FlowKey, u8)],
        live: u64,
        series: &mut HashMap<Series, Counts, Fast>,
    ) {
        let capacity = u64::from(self.maps.flow_capacity);
        let mut room_wanted = if live * 10 >= capacity * 9 {
            quiet.sort_unstable_by_key(|&(_, idle)| std::cmp::Reverse(idle));
            live - capacity * 8 / 10
        } else {
            0
        };
        let fd = self.maps.flows.map().fd().as_fd();
        let mut reclaimed = 0;
        for (key, idle) in quiet.iter() {
            if *idle < self.idle_ticks && room_wanted == 0 {
                continue;
            }
            let hash = self.hasher.hash_one(key);
            let Ok(Some(last)) = kernel::bpf::take::<FlowKey, FlowValue>(fd, key) else {
                continue;
            };
            reclaimed += 1;
            room_wanted = room_wanted.saturating_sub(1);
            let before = self.last.remove(hash).unwrap_or_default();
            let delta = difference(&last, &before);
            if !delta.is_zero() {
                series.entry(Series::of(key, &last)).or_default().add(delta);
            }
        }
        self.metrics.flow_map_reclaimed.inc_by(reclaimed);
    }

    /// The packets that had no room in the flow map, per pod, interface
    /// and direction, into the pods' overflow series.
    fn collect_overflow(&mut self) {
        let mut gone = Vec::new();
        let entries = kernel::bpf::entries::<OverflowKey, OverflowValue>(
            self.maps.overflow.map().fd().as_fd(),
        );
        let entries = entries.unwrap_or_else(|err| {
            // Counted at the next collection: nothing is taken from the map.
            tracing::warn!(%err, "cannot read the overflow map");
            self.metrics.error("map_read");
            Vec::new()
        });
        for (key, now) in entries {
            let Some(netns) = self.attached.get(&key.netns_cookie) else {
                if self.complete {
                    gone.push(key);
                }
                continue;
            };
            let before = self.overflow_seen.insert(key, now).unwrap_or_default();
            let delta = Counts {
                packets: now.packets.saturating_sub(before.packets),
                bytes: now.bytes.saturating_sub(before.bytes),
                connections: now.connections.saturating_sub(before.connections),
            };
            if !delta.is_zero() {
                let labels = series::overflow_labels(&netns.pod, key.interface, key.direction);
                self.flows.add(&netns.pod, labels, delta);
                self.metrics.flow_overflow_packets.inc_by(delta.packets);
            }
        }
        for key in gone {
            let _ = self.maps.overflow.remove(&key);
            self.overflow_seen.remove(&key);
        }
    }
}

/// Whether the series' flows wait for a container's name: a cgroup that
/// the pods' source (an inventory, the API) does not name yet, in the cgroup
/// of a pod it knows, is a container that has just started; its name is on
/// its way. Cgroups outside pods (a process entered from the node) are not
/// waited for.
fn awaits_name(
    identities: &Identities,
    cgroups: &CgroupNames,
    unnamed: &mut Unnamed,
    series: &Series,
    now: Instant,
) -> bool {
    series
        .cgroups()
        .any(|id| naming(identities, cgroups, unnamed, id, now) == Naming::Held)
}

/// What a flow's container (its cgroup id) means for counting the flow now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Naming {
    /// An inventory or the API names it.
    Named,
    /// No walk of the cgroup hierarchy has looked for it yet.
    NotLookedFor,
    /// A cgroup in a pod's that no source names yet (a container just
    /// started): its flows wait a while for the name.
    Held,
    /// Counted now, under its directory's name (if it has one).
    ByDirectory,
}

fn naming(
    identities: &Identities,
    cgroups: &CgroupNames,
    unnamed: &mut Unnamed,
    id: u64,
    now: Instant,
) -> Naming {
    if identities.containers.contains_key(&id) {
        Naming::Named
    } else if !cgroups.looked_for(id) {
        Naming::NotLookedFor
    } else if cgroups
        .parent(id)
        .is_some_and(|p| identities.pod_cgroups.contains(&p))
        && unnamed.holds(id, now)
    {
        Naming::Held
    } else {
        Naming::ByDirectory
    }
}

/// Quiet ticks after which a flow is taken out of the map (with the
/// default `--collect-interval` of 10 s, a minute).
const IDLE_TICKS: u8 = 6;

/// Flows read from the kernel per system call: 4,096 take 448 KiB of
/// buffers, and a million flows 245 calls.
const BATCH: usize = 4096;

/// How many flows ahead of the one at hand the walk asks for a baseline's
/// slot: enough for the misses to overlap, few enough for the slots to
/// still be in the cache when their flows come.
const AHEAD: usize = 16;

/// What a flow gained since `before`. A flow the kernel evicted and made
/// anew in between (it came back) counts from zero: all of `now` is new.
/// That is told by its bytes going down, or its packets: they wrap
/// `before`'s 32 bits of them, a jump of 2 G packets or more, which no flow
/// sends between two collections. Not by comparing packets with bytes: the
/// kernel adds a packet's counters one by one (and the cache moves many
/// packets' at once), so a reading may hold packets without their bytes.
fn difference(now: &FlowValue, before: &Seen) -> Counts {
    let packets = (now.packets as u32).wrapping_sub(before.packets);
    match now.bytes.checked_sub(before.bytes) {
        Some(bytes) if packets < 1 << 31 => Counts {
            packets: u64::from(packets),
            bytes,
            connections: u64::from((now.connections as u16).wrapping_sub(before.connections)),
        },
        _ => Counts {
            packets: now.packets,
            bytes: now.bytes,
            connections: u64::from(now.connections),
        },
    }
}

mod baselines;
mod ipc;
#[cfg(test)]
mod tests;
