//! The command line: its arguments ([`Cli`]), the configuration file that
//! can stand in for them ([`config`]), and `observer flows`' view
//! ([`flows`]).

pub mod config;
pub mod flows;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use observer_common::DEFAULT_FLOW_CAPACITY;

use crate::{flows::schema, kernel::tc::TcAttach, policy::FailureMode};

#[derive(Parser)]
#[command(
    version,
    about = "Observe the traffic inside Kubernetes pods with eBPF"
)]
pub struct Cli {
    /// A configuration file (YAML, long flag names as keys). Flags and
    /// environment variables win over it.
    #[arg(long, value_name = "FILE", env = "OBSERVER_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Log filter: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, env = "OBSERVER_LOG", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format: text (for people), or json (one object per line, for
    /// log collectors; what the DaemonSet uses).
    #[arg(long, env = "OBSERVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Attach to pod network namespaces and serve Prometheus metrics.
    Run(Box<RunArgs>),
    /// Show the live traffic of a running observer as a table.
    Flows(FlowsArgs),
    /// Find containers on this node by runtime id (as in a pod's status:
    /// `containerd://<id>`, or the bare id): process, network namespace and
    /// cgroup, one line each.
    FindContainer(FindContainerArgs),
    /// Policy files: check one, or explain what applies to a pod.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Remove everything observers pinned on this node (`--pin-dir`): the
    /// links of pods that fail closed detach, the maps go. For an
    /// uninstall: an observer cannot tell a restart from a removal.
    Cleanup(CleanupArgs),
}

#[derive(Args, Clone, Debug)]
pub struct CleanupArgs {
    /// The observers' pin directory.
    #[arg(long, value_name = "DIR", env = "OBSERVER_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Then wait until SIGTERM or SIGINT (deploy/cleanup's DaemonSet, which
    /// an uninstall applies, waits for and deletes).
    #[arg(long)]
    pub hold: bool,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file offline; exits 1 with the file, line and problem.
    Check {
        /// The policy file (YAML, one or more TrafficPolicy documents).
        file: PathBuf,
        /// Also check that the Services it names exist in this inventory.
        #[arg(long, value_name = "FILE")]
        inventory: Option<PathBuf>,
    },
    /// Print the rules that apply to a pod, in the order they are tried.
    #[command(group(clap::ArgGroup::new("probe").args(["connect", "connect_unix"])))]
    Explain {
        /// The policy file.
        file: PathBuf,
        /// Where the pod's labels come from.
        #[arg(long, value_name = "FILE")]
        inventory: PathBuf,
        /// The pod: NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
        /// Also decide a connection of the pod to ADDRESS:PORT (127.0.0.1
        /// for localhost, a ClusterIP, a pod's or any other address), as the
        /// observer would.
        #[arg(long, value_name = "ADDRESS:PORT")]
        connect: Option<std::net::SocketAddrV4>,
        /// Also decide a connection of the pod to the unix socket at PATH
        /// (`@name` for an abstract name), as the observer would.
        #[arg(long, value_name = "PATH", conflicts_with = "connect")]
        connect_unix: Option<String>,
        /// With --connect to localhost, or --connect-unix: the client
        /// container.
        #[arg(long, value_name = "CONTAINER", requires = "probe")]
        client: Option<String>,
        /// With --connect: UDP instead of TCP.
        #[arg(long, requires = "connect")]
        udp: bool,
    },
}

#[derive(Args, Clone, Debug)]
pub struct FindContainerArgs {
    /// Container ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct FlowsArgs {
    /// The running observer's metrics address.
    #[arg(long, env = "OBSERVER_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    pub addr: SocketAddr,
    /// Only this pod: NAMESPACE/NAME.
    #[arg(long)]
    pub pod: Option<String>,
    /// How often the table refreshes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print one table (the traffic over one interval) and exit.
    #[arg(long)]
    pub once: bool,
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Local mode: pods, containers and Services from this inventory (as
    /// the node lab writes it) instead of --netns; watched for changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "OBSERVER_INVENTORY",
        conflicts_with = "netns"
    )]
    pub inventory: Option<PathBuf>,
    /// Kubernetes mode: this node's pods, and the cluster's pods, Services
    /// and nodes, from the Kubernetes API (in a pod: its service account;
    /// else --kubeconfig, $KUBECONFIG or ~/.kube/config). Needs --node.
    #[arg(
        long,
        env = "OBSERVER_KUBERNETES",
        conflicts_with_all = ["netns", "inventory"],
        requires = "node"
    )]
    pub kubernetes: bool,
    /// With --kubernetes: the kubeconfig to use (for development).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// The Service ClusterIP range: a ClusterIP of a Service not seen yet
    /// still counts as Service traffic. The API does not always tell it.
    #[arg(long, value_name = "CIDR", env = "OBSERVER_SERVICE_CIDR")]
    pub service_cidr: Option<ipnet::Ipv4Net>,
    /// This node's name (in a DaemonSet: NODE_NAME from the downward API's
    /// spec.nodeName). With --inventory: only this node's pods (default: all).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node: Option<String>,
    /// Where the node's processes are (with hostPID, /proc): pods are found
    /// through their processes' cgroups.
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_PROC_ROOT",
        default_value = "/proc"
    )]
    pub proc_root: PathBuf,
    /// With --kubernetes: where the container runtime keeps its containers'
    /// OCI bundles (containerd's CRI plugin: `<dir>/<id>/config.json`;
    /// CRI-O: `<dir>/<id>/userdata/config.json`), seen through the node's
    /// PID 1 (hostPID). A container the runtime has just (re)started is
    /// named from its bundle before the pod's status names it.
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_CONTAINER_BUNDLES",
        value_delimiter = ',',
        default_value = "/proc/1/root/run/containerd/io.containerd.runtime.v2.task/k8s.io,/proc/1/root/run/containers/storage/overlay-containers"
    )]
    pub container_bundles: Vec<PathBuf>,
    /// A pod network namespace: a bind mount such as /var/run/netns/NAME, or
    /// /proc/PID/ns/net. Repeat for several. Without any, every namespace in
    /// --netns-dir.
    #[arg(
        long = "netns",
        value_name = "PATH",
        env = "OBSERVER_NETNS",
        value_delimiter = ','
    )]
    pub netns: Vec<PathBuf>,
    /// Where named network namespaces live (used when neither --netns nor
    /// --inventory nor --kubernetes is given); watched for namespaces that
    /// come and go. With --kubernetes, watched as a hint that a pod starts.
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_NETNS_DIR",
        default_value = "/var/run/netns"
    )]
    pub netns_dir: PathBuf,
    /// A policy file (TrafficPolicy objects, see `observer policy check`),
    /// enforced on the pods it selects; watched, and reloaded on change.
    /// Needs --inventory or --kubernetes (policies name pods and Services).
    #[arg(long, value_name = "FILE", env = "OBSERVER_POLICY")]
    pub policy: Option<PathBuf>,
    /// Address of the metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "OBSERVER_METRICS_ADDR", default_value = "127.0.0.1:9465")]
    pub metrics_addr: SocketAddr,
    /// Serve HTTPS (a self-signed certificate unless --tls-cert and
    /// --tls-key give one), and /metrics and /flows only to bearers of a
    /// token the Kubernetes API authenticates (TokenReview) and allows to
    /// `get` the path (SubjectAccessReview: a ClusterRole with
    /// `nonResourceURLs`). Needs --kubernetes. The probes stay open.
    #[arg(long, env = "OBSERVER_SECURE_SERVING", requires = "kubernetes")]
    pub secure_serving: bool,
    /// With --secure-serving: the certificate (PEM; a kubernetes.io/tls
    /// Secret's tls.crt).
    #[arg(long, value_name = "FILE", env = "OBSERVER_TLS_CERT", requires_all = ["secure_serving", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// With --secure-serving: the certificate's key (PEM; tls.key).
    #[arg(long, value_name = "FILE", env = "OBSERVER_TLS_KEY", requires_all = ["secure_serving", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Connections the endpoint holds at once; one more closes the oldest
    /// idle one (so idle connections cannot keep Prometheus out).
    #[arg(long, env = "OBSERVER_MAX_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_connections: u32,
    /// How long a client may take to send a request's headers (and a TLS
    /// handshake) before its connection is closed.
    #[arg(long, env = "OBSERVER_HEADER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// How long an answer may take (a collection included) before it is
    /// given up with 503.
    #[arg(long, env = "OBSERVER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Flows the kernel flow map holds; packets of flows beyond it are
    /// counted in their pod's overflow series, unclassified. Each flow of
    /// capacity costs kernel memory (measured: see BENCHMARKS.md).
    #[arg(long, env = "OBSERVER_FLOW_CAPACITY", default_value_t = DEFAULT_FLOW_CAPACITY,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_capacity: u32,
    /// Traffic series per pod beyond which new series are counted under an
    /// `overflow` series (per class and direction).
    #[arg(long, env = "OBSERVER_MAX_SERIES_PER_POD", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series_per_pod: u32,
    /// How long the series of a pod that is gone are still exported.
    #[arg(long, env = "OBSERVER_SERIES_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub series_grace: Duration,
    /// Labels to export empty, for fewer series: any of protocol, port,
    /// peer_namespace, peer, client_container, server_container.
    #[arg(long, env = "OBSERVER_DROP_LABELS", value_delimiter = ',', value_parser = parse_droppable)]
    pub drop_labels: Vec<String>,
    /// For `cargo xtask bench`: also attach the no-op classifier on every
    /// hook, the baseline of the kernel's run-time statistics.
    #[arg(long, hide = true)]
    pub attach_noop: bool,
    /// How tc programs attach: `tcx` links (Linux 6.6 and newer), `clsact`
    /// filters (netlink, needs NET_ADMIN; the only way before 6.6), or
    /// `auto`, TCX where the kernel has it. clsact filters attach without
    /// waiting (TCX links wait for an RCU grace period each, 3 a pod:
    /// BENCHMARKS.md), but outlive the observer, even killed, and other tc
    /// users can remove them. Pods that fail closed keep their filters
    /// either way.
    #[arg(long, env = "OBSERVER_TC_ATTACH", value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// The same as `--tc-attach clsact` (for older scripts and `cargo
    /// xtask bench --compare` with older builds). Refused beside
    /// `--tc-attach`, which it would otherwise silently override.
    #[arg(long, hide = true, conflicts_with = "tc_attach")]
    pub tc_netlink: bool,
    /// Where the observer keeps its runtime state (a private bpffs for its
    /// maps, removed at exit).
    #[arg(
        long,
        value_name = "DIR",
        env = "OBSERVER_RUNTIME_DIR",
        default_value = "/run/observer"
    )]
    pub runtime_dir: PathBuf,
    /// A directory on the node's bpffs (the DaemonSet's: /sys/fs/bpf/observer)
    /// where the shared maps, and the links of pods whose policy fails
    /// closed, are pinned: they outlive the observer, and the next one takes
    /// them over. Without it, everything goes with the observer.
    #[arg(long, value_name = "DIR", env = "OBSERVER_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// What a policy does while no observer runs (a restart, an upgrade),
    /// for policies that do not say (`spec.failureMode`): `open`, nothing
    /// is enforced meanwhile; `closed`, the pod's programs and policy stay
    /// in the kernel until the next observer takes them over (needs
    /// --pin-dir and Linux 6.6 or newer).
    #[arg(long, env = "OBSERVER_FAILURE_MODE", value_enum, default_value_t = FailureMode::Open)]
    pub failure_mode: FailureMode,
    /// Where the traffic counters are kept across restarts (written at
    /// shutdown and every minute, read at start); none: a restarted
    /// observer counts from zero.
    #[arg(long, value_name = "DIR", env = "OBSERVER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Follow unix-socket traffic between a pod's containers (on by
    /// default). It takes a program at every socket message of the node,
    /// whichever process sends or reads it (it leaves at its first test
    /// for any socket but a unix one: 1.3 % of the CPU on a flood of
    /// 64-byte datagrams on the benchmark's VM, BENCHMARKS.md): `false`
    /// saves that, and counts no unix-socket traffic. Unix-socket policy
    /// rules are enforced either way (they are decided at `connect()`).
    #[arg(
        long,
        env = "OBSERVER_UNIX_SOCKETS",
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub unix_sockets: bool,
    /// Also follow named pipes (FIFOs) between a pod's containers. It takes
    /// a program after every system call of the node, whichever process
    /// makes it (about 0.2 µs a call on the benchmark's VM: see
    /// BENCHMARKS.md), which is why it is off unless asked for.
    #[arg(long, env = "OBSERVER_NAMED_PIPES")]
    pub named_pipes: bool,
    /// How often the flow map is read into the metrics (besides every scrape).
    #[arg(long, env = "OBSERVER_COLLECT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub collect_interval: Duration,
}

fn parse_droppable(label: &str) -> Result<String, String> {
    if schema::droppable().any(|l| l == label) {
        Ok(label.to_owned())
    } else {
        let droppable: Vec<&str> = schema::droppable().collect();
        Err(format!(
            "`{label}` cannot be dropped; droppable labels: {}",
            droppable.join(", ")
        ))
    }
}

/// Parses `500ms`, `10s`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit: use ms, s or m"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number (or it is too large)"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(
            number
                .checked_mul(60)
                .ok_or_else(|| format!("`{text}` is too long"))?,
        ),
        _ => return Err(format!("`{text}`: unknown unit `{unit}`, use ms, s or m")),
    };
    if duration.is_zero() {
        return Err("the interval must be greater than zero".into());
    }
    // Added to clocks: a longer one would overflow them.
    if duration > MAX_DURATION {
        return Err(format!("`{text}` is too long: at most 365 days"));
    }
    Ok(duration)
}

/// The longest duration a setting takes.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(
            parse_duration("18446744073709551615m").is_err(),
            "overflows"
        );
        assert!(
            parse_duration("99999999999999999999s").is_err(),
            "not a u64"
        );
        assert!(
            parse_duration("18446744073709551615s")
                .unwrap_err()
                .contains("too long"),
            "a u64, but past any clock"
        );
    }

    #[test]
    fn only_droppable_labels_can_be_dropped() {
        assert_eq!(parse_droppable("port"), Ok("port".into()));
        assert!(
            parse_droppable("pod")
                .unwrap_err()
                .contains("cannot be dropped")
        );
    }

    #[test]
    fn the_old_clsact_flag_is_refused_beside_tc_attach() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["observer", "run"], args].concat());
        assert!(parse(&["--tc-netlink"]).is_ok());
        let refused = parse(&["--tc-netlink", "--tc-attach", "tcx"])
            .err()
            .expect("refused");
        assert_eq!(refused.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
