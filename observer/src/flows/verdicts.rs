//! The kernel's policy verdict counts (VERDICTS) into
//! `observer_policy_verdicts_total`, and denials into the log, at most one
//! line per pod and rule every [`LOG_EVERY`].

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use std::os::fd::AsFd as _;

use aya::{
    maps::{HashMap as BpfHashMap, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};
use observer_common::{VerdictKey, class, direction, verdict};

use super::saved::{SavedVerdicts, VerdictBaseline};
use crate::{
    kernel::{self, attach::AttachedNetns},
    metrics::{Metrics, VERDICT_LABELS},
    names::ObjectRef,
    policy::compile::RuleName,
};

const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Verdicts {
    names: Arc<HashMap<u32, RuleName>>,
    /// Rules the policies no longer have (ids are never given again): their
    /// kernel entries are counted one last time and taken out.
    retired: HashMap<u32, RuleName>,
    /// The kernel's count at the last collection, and the labels exported.
    seen: HashMap<VerdictKey, (u64, [String; 7])>,
    logged: HashMap<(u64, u32), Instant>,
    /// Saved totals of series whose pods are not attached yet: exported
    /// once they are.
    restored: HashMap<[String; 7], u64>,
    /// The verdict map is an earlier observer's, with no baseline: the
    /// first collection only takes note of the counts.
    prime: bool,
    /// Counts noted then for keys not labelled yet (their pod was not
    /// attached): counted from there once they are.
    unlabelled: HashMap<VerdictKey, u64>,
}

impl Verdicts {
    /// The saved totals, exported as each pod is attached.
    pub fn restore(&mut self, saved: Vec<SavedVerdicts>) {
        for series in saved {
            *self.restored.entry(series.labels).or_default() += series.total;
        }
    }

    /// Takes over an earlier observer's verdict map: counted on from the
    /// baseline saved with the totals, or (`None`) from the first look.
    pub fn take_up(&mut self, baseline: Option<Vec<VerdictBaseline>>) {
        let Some(baseline) = baseline else {
            self.prime = true;
            return;
        };
        for b in baseline {
            let key = VerdictKey {
                netns_cookie: b.netns_cookie,
                rule: b.rule,
                verdict: b.verdict,
                class: b.class,
                direction: b.direction,
                _pad: 0,
            };
            self.seen.insert(key, (b.count, b.labels));
        }
    }

    /// A pod is attached: its saved series come back.
    pub fn attached(&mut self, pod: &ObjectRef, metrics: &Metrics) {
        self.restored.retain(|labels, total| {
            if labels[0] != pod.namespace || labels[1] != pod.name {
                return true;
            }
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            metrics
                .policy_verdicts
                .with_label_values(&values)
                .inc_by(*total);
            false
        });
    }

    /// The verdict series' totals, to save (those not exported yet too).
    pub fn totals(&self, metrics: &Metrics) -> Vec<SavedVerdicts> {
        use prometheus::core::Collector;
        let mut totals: Vec<SavedVerdicts> = self
            .restored
            .iter()
            .map(|(labels, total)| SavedVerdicts {
                labels: labels.clone(),
                total: *total,
            })
            .collect();
        for family in metrics.policy_verdicts.collect() {
            for metric in family.get_metric() {
                // The family gives its labels sorted by name.
                let labels = VERDICT_LABELS.map(|name| {
                    let pair = metric.get_label().iter().find(|p| p.name() == name);
                    pair.map(|p| p.value().to_owned()).unwrap_or_default()
                });
                let total = metric.get_counter().get_value() as u64;
                totals.push(SavedVerdicts { labels, total });
            }
        }
        totals
    }

    /// What each kernel count was at the last collection, to save with the
    /// totals.
    pub fn baseline(&self) -> Vec<VerdictBaseline> {
        self.seen
            .iter()
            .map(|(key, (count, labels))| VerdictBaseline {
                netns_cookie: key.netns_cookie,
                rule: key.rule,
                verdict: key.verdict,
                class: key.class,
                direction: key.direction,
                count: *count,
                labels: labels.clone(),
            })
            .collect()
    }

    pub fn set_names(&mut self, names: Arc<HashMap<u32, RuleName>>) {
        for (id, name) in self.names.iter() {
            if !names.contains_key(id) {
                self.retired.insert(*id, name.clone());
            }
        }
        self.retired.retain(|id, _| !names.contains_key(id));
        self.names = names;
    }

    /// Adds what the kernel counted since the last collection. `complete`:
    /// the source has been complete, so counts of namespaces that are not
    /// attached are no pod's, and go.
    pub fn collect<S: std::hash::BuildHasher>(
        &mut self,
        map: &mut BpfHashMap<MapData, VerdictKey, u64>,
        attached: &HashMap<u64, AttachedNetns, S>,
        complete: bool,
        metrics: &Metrics,
    ) -> Result<(), MapError> {
        let mut gone = Vec::new();
        let mut retired = Vec::new();
        let prime = std::mem::take(&mut self.prime);
        let entries = crate::kernel::bpf::entries::<VerdictKey, u64>(map.map().fd().as_fd())
            .map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error,
                })
            })?;
        for (key, count) in entries {
            if !prime && self.retired.contains_key(&key.rule) {
                retired.push(key);
            }
            if prime {
                if let Some(pod) = attached.get(&key.netns_cookie)
                    && let Some(labels) = self.labels(&key, pod)
                {
                    self.seen.insert(key, (count, labels));
                } else {
                    self.unlabelled.insert(key, count);
                }
                continue;
            }
            let Some(pod) = attached.get(&key.netns_cookie) else {
                // A pod detached since: its counts are exported no more.
                if complete {
                    gone.push(key);
                }
                continue;
            };
            let before = match self.seen.get_mut(&key) {
                // Nothing new: the common case, with no work.
                Some((seen, _)) if *seen == count => continue,
                Some((seen, _)) => std::mem::replace(seen, count),
                None => {
                    // A rule id always names the same rule: labels once.
                    let Some(labels) = self.labels(&key, pod) else {
                        continue;
                    };
                    self.seen.insert(key, (count, labels));
                    self.unlabelled.remove(&key).unwrap_or(0)
                }
            };
            let labels = &self.seen[&key].1;
            // Fewer than before: the entry was taken out and made anew
            // since (by an earlier observer); all of it is new.
            let added = if count >= before {
                count - before
            } else {
                count
            };
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            metrics
                .policy_verdicts
                .with_label_values(&values)
                .inc_by(added);
            if key.verdict != verdict::ALLOW {
                self.log(&key, added);
            }
        }
        for key in gone {
            let _ = map.remove(&key);
        }
        // Counted to their last decision, each in the same step as it goes
        // (a decision in between would be lost). Their series stay (a
        // counter does not go back); the kernel's entries and the
        // baselines go.
        for key in retired {
            let last = kernel::bpf::take::<VerdictKey, u64>(map.map().fd().as_fd(), &key).map_err(
                |io_error| {
                    MapError::SyscallError(SyscallError {
                        call: "bpf_map_lookup_and_delete_elem",
                        io_error,
                    })
                },
            )?;
            if let (Some(last), Some((seen, labels))) = (last, self.seen.remove(&key)) {
                let values: Vec<&str> = labels.iter().map(String::as_str).collect();
                metrics
                    .policy_verdicts
                    .with_label_values(&values)
                    .inc_by(last.saturating_sub(seen));
            }
        }
        Ok(())
    }

    /// The series' labels: pod, policy, rule, class, direction, verdict.
    fn labels(&self, key: &VerdictKey, pod: &AttachedNetns) -> Option<[String; 7]> {
        let names = self
            .names
            .get(&key.rule)
            .or_else(|| self.retired.get(&key.rule))?;
        Some([
            pod.pod.namespace.clone(),
            pod.pod.name.clone(),
            names.policy.clone(),
            names.rule.clone(),
            class::name(key.class).to_owned(),
            direction::name(key.direction).to_owned(),
            verdict::name(key.verdict).to_owned(),
        ])
    }

    /// Logs a denial, unless one of this pod and rule was logged lately.
    fn log(&mut self, key: &VerdictKey, added: u64) {
        let now = Instant::now();
        let last = self
            .logged
            .entry((key.netns_cookie, key.rule))
            .or_insert(now - LOG_EVERY);
        if now.duration_since(*last) < LOG_EVERY {
            return;
        }
        *last = now;
        let Some((_, [namespace, pod, policy, rule, class, _, verdict])) = self.seen.get(key)
        else {
            return;
        };
        tracing::warn!(pod = %format!("{namespace}/{pod}"), %policy, %rule, %class, %verdict, connections = added, "policy denial");
    }

    /// Forgets a pod that is detached (its series go with it).
    pub fn detached(&mut self, cookie: u64, metrics: &Metrics) {
        self.seen.retain(|key, (_, labels)| {
            if key.netns_cookie != cookie {
                return true;
            }
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            let _ = metrics.policy_verdicts.remove_label_values(&values);
            false
        });
        self.logged.retain(|(c, _), _| *c != cookie);
    }
}
