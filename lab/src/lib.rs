//! The node lab: a Kubernetes node, as the network sees it, built from real
//! kernel objects in network namespaces of its own. It backs the observer's
//! end-to-end tests, its demo (`cargo xtask lab up`) and its benchmarks.
//!
//! - [`spec`]: the lab file (YAML) and its validation into a [`Plan`].
//! - `network`: nodes, bridge, pods, Services (iptables DNAT), external hosts.
//! - `runtime`: a pod's containers, started as processes in kubelet-style
//!   cgroups; `container`: a process in a cgroup and a namespace.
//! - [`Lab`]: up, and the inventory the observer reads; `state`: down,
//!   list, status, and cleaning up after killed runs.
//! - [`Netns`], [`veth`], [`Cgroup`]: the building blocks, also for small
//!   test topologies.
//!
//! Nothing here touches the machine's own interfaces, routes or firewall.
//! Names carry the lab (or, for test labs, the creating process's PID), so
//! leftovers of a killed run are found and removed ([`cleanup_stale`]).

mod container;
mod containerd;
mod cri;
mod dns;
mod kubelet;
mod lab;
mod netns;
mod network;
mod runtime;
mod socket_lb;
pub mod spec;
mod state;

pub use container::{Cgroup, cgroup_id};
pub use containerd::{LAB_IMAGE, LAB_IMAGE_ENV};
pub use kubelet::manifest::ApiServer;
pub use lab::{Lab, ManifestPod, STATE_DIR};
pub use netns::{Netns, veth};
pub use spec::{Plan, Runtime, SpecError};
pub use state::{cleanup_stale, down, is_healthy, list, runtime_of, status};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        name: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted")]
    NoCgroup2,
    #[error("`{0}` is not installed (Debian: apt-get install iproute2 iptables)")]
    MissingTool(&'static str),
    #[error("containerd of node {node}: {problem}")]
    Containerd { node: String, problem: String },
    #[error(
        "the containerd runtime runs the lab's image: run through `cargo xtask` (which \
         builds it), or set OBSERVER_LAB_IMAGE to its OCI archive"
    )]
    NoLabImage,
    #[error("kubelet of node {node}: pod {pod}: {problem}")]
    Kubelet {
        node: String,
        pod: String,
        problem: String,
    },
    #[error("the lab has no pod {0}")]
    NoSuchPod(String),
    #[error("only the containerd runtime makes, restarts and deletes pods one by one")]
    NotContainerd,
    #[error("the socket load balancer: {0}")]
    SocketLb(String),
    #[error("{pod}: container {container} does not listen on port {port}; its log:\n{log}")]
    NotListening {
        pod: String,
        container: String,
        port: u16,
        log: String,
    },
}
