//! The node lab: a Kubernetes node, as the network sees it, built from real
//! kernel objects in network namespaces of its own. It backs the observer's
//! end-to-end tests, its demo (`cargo xtask lab up`) and its benchmarks.
//!
//! - [`spec`]: the lab file (YAML) and its validation into a [`Plan`].
//! - [`network`]: nodes, bridge, pods, Services (iptables DNAT), external hosts.
//! - [`container`]: container processes in cgroups of their own.
//! - [`Lab`]: up, down, status, and the inventory the observer reads.
//! - [`Netns`], [`veth`]: the building blocks, also for small test topologies.
//!
//! Nothing here touches the machine's own interfaces, routes or firewall.
//! Names carry the lab (or, for test labs, the creating process's PID), so
//! leftovers of a killed run are found and removed ([`cleanup_stale`]).

mod container;
mod lab;
mod netns;
mod network;
pub mod spec;

pub use container::{Cgroup, cgroup_id};
pub use lab::{Lab, STATE_DIR, cleanup_stale, down, is_healthy, list, status};
pub use netns::{Netns, veth};
pub use spec::{Plan, SpecError};

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
    #[error("{pod}: container {container} does not listen on port {port}; its log:\n{log}")]
    NotListening {
        pod: String,
        container: String,
        port: u16,
        log: String,
    },
}
