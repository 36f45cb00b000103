//! `observer run`: load the programs, attach to the pods (and, watching a
//! directory or an inventory, to the pods that come and go), serve metrics
//! until SIGINT or SIGTERM, then detach all.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use kube::Client;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
};

use crate::{
    cli::RunArgs,
    endpoint::{
        self, Endpoint,
        auth::Authorizer,
        server::Limits,
        tls::{self, TlsError},
    },
    flows::{
        collector::Collector,
        metrics::{FlowMetrics, Registered, SeriesConfig},
        saved::{self, Saved},
        schema,
        task::{self, CollectorEvent},
    },
    kernel::{
        attach::{AttachError, AttachWorker},
        class_maps::ClassMapsWriter,
        datapath::{Datapath, DatapathConfig, DatapathError, Opened},
        log,
        netns::{self, NetNs, NetnsError},
        tc::{self, TcAttach},
    },
    metrics::Metrics,
    names::ObjectRef,
    pods::{
        bundles::Bundles,
        cluster::{self, ClusterError, ClusterWatch, LabelKeys},
        discovery,
        inventory::{self, InventoryError},
        reconcile::{Reconciler, Takeover},
        source::{ClusterSource, Source},
        watch::{DirWatch, WatchError},
    },
    policy::{self, FailureMode, Policies, PolicyError, lifecycle::Enforcer},
};
use observer_common::{CIDRS_MAP, POLICIES_MAP, SERVICES_MAP};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("--kubernetes needs this node's name: --node or NODE_NAME (spec.nodeName)")]
    NoNode,
    #[error("cgroup v2 is not mounted: pods are found through their cgroups")]
    NoCgroup2,
    #[error("cannot join the node's cgroup namespace (needs hostPID and CAP_SYS_ADMIN): {0}")]
    CgroupNamespace(io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("--policy needs --inventory or --kubernetes: policies select pods by name and labels")]
    PolicyWithoutNames,
    #[error(
        "--failure-mode closed needs --pin-dir (a directory on the node's bpffs, where the programs stay while no observer runs)"
    )]
    ClosedWithoutPins,
    #[error("cannot watch for signals: {0}")]
    Signals(io::Error),
    #[error("metrics server: {0}")]
    Serve(io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "--tc-attach tcx: this kernel ({0}) has no TCX links (Linux 6.6 and newer); use clsact or auto"
    )]
    NoTcx(aya::util::KernelVersion),
}

/// Kubernetes mode reads other pods' cgroup paths: in a cgroup namespace of
/// its own (the default for containers on cgroup v2) those would be relative
/// to the observer's own cgroup. Runs before any thread exists.
pub fn enter_host_cgroup_namespace(args: &RunArgs) -> Result<(), RunError> {
    if args.kubernetes
        && discovery::join_host_cgroup_namespace(&args.proc_root)
            .map_err(RunError::CgroupNamespace)?
    {
        tracing::info!("joined the node's cgroup namespace");
    }
    Ok(())
}

/// A namespace named on the command line: failing to attach is fatal.
struct Target {
    path: PathBuf,
    pod: ObjectRef,
}

/// Opens the datapath on a thread of its own: with `--pin-dir` it waits
/// while another observer holds the node's pins (bpffs.rs), and a SIGTERM
/// meanwhile must still end this one. `None` if it did (the thread is
/// left to the process' exit).
async fn open_datapath(
    config: DatapathConfig,
    mut stopped: watch::Receiver<bool>,
) -> Option<Result<Opened, DatapathError>> {
    let (opened, opening) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = opened.send(Datapath::open(&config));
    });
    tokio::select! {
        opened = opening => match opened {
            Ok(opened) => Some(opened),
            // The thread panicked: its message is on stderr.
            Err(_) => panic!("opening the datapath panicked"),
        },
        _ = stopped.wait_for(|stop| *stop) => None,
    }
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    // Bad input fails here, before anything is loaded.
    let inventory = match &args.inventory {
        Some(path) => Some(inventory::load_for_node(path, args.node.as_deref())?),
        None => None,
    };
    let explicit = explicit_targets(&args)?;
    if args.failure_mode == FailureMode::Closed && args.pin_dir.is_none() {
        return Err(RunError::ClosedWithoutPins);
    }
    let policies = match &args.policy {
        Some(path) => Some((path.clone(), load_policy(&args, inventory.as_ref(), path)?)),
        None => None,
    };
    let kubernetes = match args.kubernetes {
        true => Some(kubernetes_client(&args).await?),
        false => None,
    };
    let serving_tls = match args.secure_serving {
        true => Some(tls::acceptor(
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
            &tls_names(&args),
        )?),
        false => None,
    };
    let authorizer = match (&kubernetes, args.secure_serving) {
        (Some((_, client, _)), true) => Some(Arc::new(Authorizer::new(client.clone()))),
        _ => None,
    };
    raise_file_limit();
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let (stop, stopped) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = stop.send(true);
    });

    let Opened {
        datapath,
        maps,
        class_maps,
        mut policy_maps,
        logger,
        inherited,
        ipc,
        ipc_hooks,
        unix_policy,
    } = match open_datapath(
        DatapathConfig {
            flow_capacity: args.flow_capacity,
            runtime_dir: args.runtime_dir.clone(),
            pin_dir: args.pin_dir.clone(),
            log_level: log::level_for(tracing::level_filters::LevelFilter::current()),
            unix_sockets: args.unix_sockets,
            named_pipes: args.named_pipes,
        },
        stopped.clone(),
    )
    .await
    {
        Some(opened) => opened?,
        None => return Ok(()),
    };
    if let Some(logger) = logger {
        tokio::spawn(logger.run());
    }
    // An earlier observer's maps, or pods it left pinned: taken over once
    // the source is complete.
    let taking_over = !inherited.is_empty()
        || datapath
            .node_pins()
            .is_some_and(|pins| !pins.pinned_pods().is_empty());
    let policy_inherited = inherited.contains(POLICIES_MAP);
    if policies.is_none() && policy_inherited {
        // No policy now: what an earlier observer enforced goes.
        if let Err(err) = policy_maps.clear() {
            tracing::warn!(%err, "clearing the policies an earlier observer left");
        }
    }
    // In Kubernetes mode the Services are known only once the API is listed.
    let mut enforcer = policies.map(|(path, policies)| {
        Enforcer::new(
            path,
            policies,
            policy_maps,
            args.failure_mode,
            policy_inherited,
            unix_policy,
        )
    });
    // Kubernetes mode keeps of other nodes' pods the labels peer rules use.
    let (label_keys, kept_labels) = watch::channel(LabelKeys::default());
    if let Some(enforcer) = enforcer.as_mut() {
        enforcer.announce_label_keys(label_keys);
    }
    let metrics = Arc::new(Metrics::new());
    let flows = Arc::new(FlowMetrics::new(series_config(&args)));
    let saved = match &args.state_dir {
        Some(dir) => restore(dir, &flows, &metrics),
        None => Saved::default(),
    };
    metrics.register(Registered(Arc::clone(&flows)));
    let mut collector =
        Collector::new(maps, Arc::clone(&metrics), flows, discovery::cgroup2_root());
    collector.take_up(&inherited, saved.baseline, saved.verdicts);
    for (function, attached) in ipc_hooks {
        metrics
            .ipc_hooks
            .with_label_values(&[function])
            .set(i64::from(attached));
    }
    if let Some(ipc) = ipc {
        collector.count_ipc(ipc);
    }
    // Quiet flows go after a minute's worth of collection ticks.
    let ticks = (60_000 / args.collect_interval.as_millis().max(1)).clamp(1, 255);
    collector.reclaim_after(ticks as u8);
    let tc_attach = if args.tc_netlink {
        TcAttach::Clsact
    } else {
        args.tc_attach
    };
    let tcx = tc_attach.tcx().map_err(RunError::NoTcx)?;
    tracing::info!(
        tc = if tcx { "TCX links" } else { "clsact filters" },
        "tc programs attach as"
    );
    if tcx && tc::grace_periods_expedited() == Some(false) {
        tracing::info!(
            "each TCX attach and detach waits for an RCU grace period (10 to 30 ms, three a pod): where many pods start at once, expedited grace periods (/sys/kernel/rcu_expedited) or --tc-attach clsact attach them several times faster (README, TCX links or clsact filters)"
        );
    }
    let worker = AttachWorker::start(datapath, args.attach_noop, tcx)?;

    // Serve from now on: /healthz answers while the pods are attached (that
    // takes a while on a busy node), /readyz once they are.
    let ready = Arc::new(AtomicBool::new(false));
    let (collector, collecting) =
        task::spawn(collector, args.collect_interval, args.state_dir.clone());
    let endpoint = Endpoint {
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
        collector: collector.clone(),
        auth: authorizer,
    };
    let limits = Limits {
        max_connections: args.max_connections as usize,
        header_timeout: args.header_timeout,
        request_timeout: args.request_timeout,
        ..Limits::default()
    };
    let mut server_stop = stopped.clone();
    let secure = serving_tls.is_some();
    let serving = tokio::spawn(endpoint::serve(
        listener,
        endpoint,
        serving_tls,
        limits,
        async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        },
    ));
    tracing::info!(addr = %args.metrics_addr, secure, "serving metrics");

    let pods = match explicit {
        Some(targets) => {
            for target in targets {
                let attached = worker.attach(&target.path, target.pod, None, None).await?;
                metrics.errors_of("detach", attached.filters_left);
                collector.send(CollectorEvent::Attached(attached));
            }
            metrics.errors_of("detach", worker.commit().await.filters_left);
            collector.send(CollectorEvent::Complete { watched: false });
            ready.store(true, Ordering::Release);
            Pods::Fixed(worker)
        }
        None => {
            let (source, cluster) = source(&args, kubernetes, &metrics, kept_labels);
            let policy_watch = match &enforcer {
                Some(enforcer) => Some(DirWatch::new(&parent_dir(enforcer.path()))?),
                None => None,
            };
            let adopt_ids = inherited.contains(SERVICES_MAP) && inherited.contains(CIDRS_MAP);
            let reconciler = Reconciler::new(
                source,
                worker,
                ClassMapsWriter::new(class_maps, adopt_ids),
                enforcer,
                collector.clone(),
                Arc::clone(&metrics),
                Takeover {
                    maps_or_links: taking_over,
                    class_maps: adopt_ids,
                },
            );
            let dir = reconciler.source().watched_dir(&args.netns_dir);
            let watch = if cluster.is_some() {
                // A hint only: not every runtime keeps namespaces there.
                DirWatch::new(&dir).ok()
            } else {
                if !dir.exists() {
                    // `ip netns add` makes it too; watching needs it now.
                    let _ = std::fs::create_dir_all(&dir);
                }
                Some(DirWatch::new(&dir)?)
            };
            let ready = Arc::clone(&ready);
            Pods::Watched(
                tokio::spawn(reconciler.run(watch, policy_watch, ready, stopped)),
                cluster,
            )
        }
    };
    let served = serving.await.expect("the server does not panic");
    let worker = match pods {
        Pods::Fixed(worker) => worker,
        Pods::Watched(task, cluster) => {
            drop(cluster);
            task.await.expect("the reconciler does not panic")
        }
    };
    // Detached first, collected last: what the programs counted until they
    // went is in the last collection (and saved).
    tokio::task::spawn_blocking(move || worker.shutdown())
        .await
        .expect("detaching does not panic");
    // The collector's task ends, after a last collection, once its last
    // handle is gone.
    drop(collector);
    let _ = collecting.await;
    served.map_err(RunError::Serve)
}

/// Who owns the attach worker while the observer runs.
enum Pods {
    /// `--netns`: attached once at start.
    Fixed(AttachWorker),
    /// A directory, an inventory or the Kubernetes API, watched.
    Watched(tokio::task::JoinHandle<AttachWorker>, Option<ClusterWatch>),
}

/// The policy file, checked at start: a bad one is refused before anything
/// is loaded (later, a bad one leaves the last good one in force). A rule
/// naming a Service that does not exist is not bad: it waits for it.
fn load_policy(
    args: &RunArgs,
    inventory: Option<&observer_common::inventory::Inventory>,
    path: &Path,
) -> Result<Policies, RunError> {
    if inventory.is_none() && !args.kubernetes {
        return Err(RunError::PolicyWithoutNames);
    }
    Ok(policy::load(path, None)?)
}

/// Takes up the counters saved in `dir` by the last observer: the traffic
/// series here, the rest (verdicts, the kernel counters' baseline) for the
/// collector. A file that cannot be read is set aside, and counting starts
/// from zero.
fn restore(dir: &Path, flows: &FlowMetrics, metrics: &Metrics) -> Saved {
    if let Err(source) = std::fs::create_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %source, "cannot create the state directory");
        metrics.error("state");
        return Saved::default();
    }
    match saved::load(dir) {
        Ok(mut saved) => {
            tracing::info!(
                series = saved.series.len(),
                verdicts = saved.verdicts.len(),
                baseline = saved.baseline.is_some(),
                "counters taken up from the last run"
            );
            flows.restore(std::mem::take(&mut saved.series), std::time::Instant::now());
            saved
        }
        Err(err) => {
            let aside = saved::set_aside(dir);
            tracing::warn!(%err, aside = %aside.display(), "counters not taken up: counting from zero");
            metrics.error("state");
            Saved::default()
        }
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The names a self-signed certificate is made for: what Prometheus and
/// people reach the observer by (its addresses, its node, localhost).
fn tls_names(args: &RunArgs) -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    let ip = args.metrics_addr.ip();
    if ip.is_unspecified() {
        names.extend(own_addresses().iter().map(ToString::to_string));
    } else {
        names.push(ip.to_string());
    }
    names.extend(args.node.clone().filter(|n| !n.is_empty()));
    names.sort();
    names.dedup();
    names
}

/// The addresses of this network namespace's interfaces (the pod's).
fn own_addresses() -> Vec<std::net::IpAddr> {
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs frees; each entry's
    // address is read according to its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return addresses;
        }
        let mut entry = list;
        while let Some(ifa) = entry.as_ref() {
            if let Some(addr) = ifa.ifa_addr.as_ref() {
                match i32::from(addr.sa_family) {
                    libc::AF_INET => {
                        let v4 = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        addresses.push(
                            std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into(),
                        );
                    }
                    libc::AF_INET6 => {
                        let v6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                        addresses.push(std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
            entry = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addresses
}

/// Takes the hard limit of open files as the soft one: connections to the
/// endpoint are capped well below it (`--max-connections`), and pods'
/// namespaces, cgroups and maps need descriptors of their own.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct of our own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Kubernetes mode's node name, client and cgroup root, checked before
/// anything is loaded.
async fn kubernetes_client(args: &RunArgs) -> Result<(String, Client, PathBuf), RunError> {
    // clap makes sure of --node; an empty NODE_NAME is still possible.
    let node = args
        .node
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(RunError::NoNode)?;
    let client = cluster::client(args.kubeconfig.as_deref()).await?;
    let cgroup_root = discovery::cgroup2_root().ok_or(RunError::NoCgroup2)?;
    Ok((node, client, cgroup_root))
}

/// Where the pods come from, with the Kubernetes API's watches if that is it.
fn source(
    args: &RunArgs,
    kubernetes: Option<(String, Client, PathBuf)>,
    metrics: &Arc<Metrics>,
    label_keys: watch::Receiver<LabelKeys>,
) -> (Source, Option<ClusterWatch>) {
    if let Some((node, client, cgroup_root)) = kubernetes {
        let watch = ClusterWatch::start(client, &node, Arc::clone(metrics), label_keys);
        tracing::info!(%node, "watching the Kubernetes API");
        let mut source = ClusterSource::new(
            watch.view(),
            node,
            args.service_cidr,
            args.proc_root.clone(),
            cgroup_root,
        );
        source.bundles = Bundles::new(args.container_bundles.clone());
        return (Source::Cluster(Box::new(source)), Some(watch));
    }
    let source = match &args.inventory {
        Some(path) => Source::Inventory {
            path: path.clone(),
            node: args.node.clone(),
        },
        None => Source::Dir(args.netns_dir.clone()),
    };
    (source, None)
}

fn series_config(args: &RunArgs) -> SeriesConfig {
    SeriesConfig {
        max_series_per_pod: args.max_series_per_pod as usize,
        grace: args.series_grace,
        dropped: args
            .drop_labels
            .iter()
            .filter_map(|label| schema::index(label))
            .collect(),
    }
}

/// `--netns` paths, checked now so that a bad one fails with its path in
/// the message; `None` without any.
fn explicit_targets(args: &RunArgs) -> Result<Option<Vec<Target>>, RunError> {
    if args.netns.is_empty() {
        return Ok(None);
    }
    args.netns
        .iter()
        .map(|path| {
            NetNs::open(path)?;
            Ok(Target {
                path: path.clone(),
                pod: ObjectRef::new("", &netns::display_name(path)),
            })
        })
        .collect::<Result<Vec<_>, RunError>>()
        .map(Some)
}
