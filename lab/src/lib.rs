//! Building blocks of test topologies: network namespaces that delete
//! themselves, veth pairs between them, and code run inside them.
//!
//! Everything lives in namespaces this crate creates; nothing touches the
//! machine's own interfaces, routes or firewall. Namespace names carry the
//! creating process's PID, so a run that was killed can be cleaned up later
//! ([`cleanup_stale`]).

mod netns;

pub use netns::{Netns, cleanup_stale, veth};

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
}
