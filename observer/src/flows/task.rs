//! The collector's own task: it collects every `--collect-interval` and
//! whenever a scrape asks, and learns of pods attached and detached (and of
//! new names) in between. Others talk to it through a [`CollectorHandle`].

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::{MissedTickBehavior, interval},
};

use super::{collector::Collector, saved, schema::FlowRow};
use crate::{kernel::attach::AttachedNetns, names::SharedIdentities, policy::compile::RuleName};

/// What the collector learns while it runs.
pub enum CollectorEvent {
    Attached(AttachedNetns),
    /// The namespace with this cookie is detached.
    Detached(u64),
    Identities(SharedIdentities),
    /// Names of the policy rules in the kernel's verdict counts, by id.
    PolicyNames(Arc<HashMap<u32, RuleName>>),
    /// The source has been complete once: every pod it has is attached (or
    /// waits), so flows of namespaces that are not attached may go.
    /// `watched`: the source detaches pods that go (not `--netns`).
    Complete {
        watched: bool,
    },
    /// The cgroup all pods' cgroups are under, and its level.
    PodsCgroup(u64, u32),
}

/// Asks for a fresh collection, and for its series if `rows` (only
/// `/flows` needs them).
pub struct CollectRequest {
    rows: bool,
    done: oneshot::Sender<Vec<FlowRow>>,
}

/// Talks to the collector's task; the task ends when every handle is gone.
#[derive(Clone)]
pub struct CollectorHandle {
    events: mpsc::UnboundedSender<CollectorEvent>,
    requests: mpsc::Sender<CollectRequest>,
}

impl CollectorHandle {
    /// Tells the collector (it applies events in order, before collecting).
    pub fn send(&self, event: CollectorEvent) {
        // The task is gone only at shutdown: nothing is left to tell.
        let _ = self.events.send(event);
    }

    /// Runs a collection now; returns its series if `rows`.
    pub async fn collect(&self, rows: bool) -> Vec<FlowRow> {
        let (done, collected) = oneshot::channel();
        if self
            .requests
            .send(CollectRequest { rows, done })
            .await
            .is_err()
        {
            return Vec::new();
        }
        collected.await.unwrap_or_default()
    }
}

/// How often the series are saved to the state directory (and at the end).
const SAVE_EVERY: Duration = Duration::from_secs(60);

/// Starts the collector's task; with a `state_dir`, the series are saved
/// there every minute and at the end, after a last collection.
pub fn spawn(
    collector: Collector,
    every: Duration,
    state_dir: Option<PathBuf>,
) -> (CollectorHandle, JoinHandle<()>) {
    let (events, inbox) = mpsc::unbounded_channel();
    let (requests, asks) = mpsc::channel(16);
    let task = tokio::spawn(run(collector, asks, inbox, every, state_dir));
    (CollectorHandle { events, requests }, task)
}

async fn run(
    mut collector: Collector,
    mut requests: mpsc::Receiver<CollectRequest>,
    mut events: mpsc::UnboundedReceiver<CollectorEvent>,
    every: Duration,
    state_dir: Option<PathBuf>,
) {
    let mut saved_at = Instant::now();
    let mut tick = interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        let mut ticked = false;
        tokio::select! {
            _ = tick.tick() => ticked = true,
            request = requests.recv() => match request {
                Some(request) => waiting.push(request),
                None => {
                    // The end: what came since the last collection counts too.
                    while let Ok(event) = events.try_recv() {
                        apply(&mut collector, event);
                    }
                    collector = collect(collector, false, None).await;
                    save(&collector, state_dir.as_deref());
                    break;
                }
            },
            Some(event) = events.recv() => {
                apply(&mut collector, event);
                continue;
            }
        };
        // Scrapes that came together share one collection.
        while let Ok(request) = requests.try_recv() {
            waiting.push(request);
        }
        // Everything attached so far must be known before its flows are read.
        while let Ok(event) = events.try_recv() {
            apply(&mut collector, event);
        }
        // Scrapes that come while it runs are answered by it too: none
        // waits for more than one collection.
        collector = collect(collector, ticked, Some((&mut requests, &mut waiting))).await;
        if saved_at.elapsed() >= SAVE_EVERY {
            saved_at = Instant::now();
            save(&collector, state_dir.as_deref());
        }
        let rows = if waiting.iter().any(|r| r.rows) {
            collector.rows()
        } else {
            Vec::new()
        };
        for request in waiting {
            let answer = if request.rows {
                rows.clone()
            } else {
                Vec::new()
            };
            let _ = request.done.send(answer);
        }
    }
}

/// One collection. Walking a large map is blocking work: it is kept off the
/// async workers. Requests that arrive meanwhile join `waiting`.
async fn collect(
    mut collector: Collector,
    tick: bool,
    joining: Option<(
        &mut mpsc::Receiver<CollectRequest>,
        &mut Vec<CollectRequest>,
    )>,
) -> Collector {
    let walk = tokio::task::spawn_blocking(move || {
        if let Err(err) = collector.collect(tick) {
            tracing::warn!(%err, "collection failed");
            collector.metrics().error("map_read");
        }
        collector
    });
    tokio::pin!(walk);
    let Some((requests, waiting)) = joining else {
        return walk.await.expect("collecting does not panic");
    };
    loop {
        tokio::select! {
            done = &mut walk => return done.expect("collecting does not panic"),
            Some(request) = requests.recv() => waiting.push(request),
        }
    }
}

/// Saves the series to the state directory, if there is one.
fn save(collector: &Collector, state_dir: Option<&std::path::Path>) {
    let Some(dir) = state_dir else {
        return;
    };
    if let Err(err) = saved::save(dir, collector.snapshot()) {
        tracing::warn!(%err, "saving the traffic counters");
        collector.metrics().error("state");
    }
}

fn apply(collector: &mut Collector, event: CollectorEvent) {
    match event {
        CollectorEvent::Attached(netns) => collector.attached(netns),
        CollectorEvent::Detached(cookie) => collector.detached(cookie),
        CollectorEvent::Identities(identities) => collector.set_identities(identities),
        CollectorEvent::PolicyNames(names) => collector.set_policy_names(names),
        CollectorEvent::Complete { watched } => collector.complete(watched),
        CollectorEvent::PodsCgroup(cgroup, level) => collector.pods_cgroup(cgroup, level),
    }
}
