//! The kernel's policy verdict counts (VERDICTS) into
//! `observer_policy_verdicts_total`, and denials into the log, at most one
//! line per pod and rule every [`LOG_EVERY`].

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use observer_common::{VerdictKey, class, direction, verdict};

use crate::{kernel::attach::AttachedNetns, metrics::Metrics, policy::compile::RuleName};

const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Verdicts {
    names: Arc<HashMap<u32, RuleName>>,
    /// The kernel's count at the last collection, and the labels exported.
    seen: HashMap<VerdictKey, (u64, [String; 7])>,
    logged: HashMap<(u64, u32), Instant>,
}

impl Verdicts {
    pub fn set_names(&mut self, names: Arc<HashMap<u32, RuleName>>) {
        self.names = names;
    }

    /// Adds what the kernel counted since the last collection.
    pub fn collect(
        &mut self,
        map: &mut BpfHashMap<MapData, VerdictKey, u64>,
        attached: &HashMap<u64, AttachedNetns>,
        metrics: &Metrics,
    ) -> Result<(), MapError> {
        let mut gone = Vec::new();
        for entry in map.iter() {
            let (key, count) = entry?;
            let Some(pod) = attached.get(&key.netns_cookie) else {
                // A pod detached since: its counts are exported no more.
                gone.push(key);
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
                    0
                }
            };
            let labels = &self.seen[&key].1;
            let added = count.saturating_sub(before);
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
        Ok(())
    }

    /// The series' labels: pod, policy, rule, class, direction, verdict.
    fn labels(&self, key: &VerdictKey, pod: &AttachedNetns) -> Option<[String; 7]> {
        let names = self.names.get(&key.rule)?;
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
