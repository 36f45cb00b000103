//! Where pods come from, and keeping what is attached in step with them.
//!
//! A [`source::Source`] (a directory of namespaces, an inventory file, or
//! the Kubernetes API with [`discovery`] on the node) produces a
//! [`Snapshot`]: the pods wanted, and the inventory that names them. It
//! writes nothing. The [`reconcile::Reconciler`] turns the difference
//! between snapshot and what is attached ([`plan`], a pure function) into
//! attaches and detaches, updates the kernel's maps and the policies, and
//! tells the collector.

pub mod bundles;
pub mod cluster;
pub mod discovery;
pub mod inventory;
pub mod plan;
pub mod reconcile;
pub mod source;
pub mod watch;

use std::{collections::HashMap, path::PathBuf};

use observer_common::inventory::Inventory;

use crate::names::{CgroupIds, ObjectRef};

/// A pod (or bare namespace) to be attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its namespace; `None` while no process of the pod runs (between
    /// restarts, with a runtime that keeps no sandbox process): an attached
    /// pod then stays attached.
    pub path: Option<PathBuf>,
    pub pod: ObjectRef,
    /// The pod's cgroup (the parent of its containers'), for the policy hooks.
    pub cgroup: Option<PathBuf>,
    /// It has an IP, so CNI has given it its `eth0`.
    pub has_ip: bool,
    /// For a `/proc/<pid>/ns/net` path: whose process it must still be
    /// when it is opened.
    pub check: Option<ProcCheck>,
}

/// The pod a `/proc/<pid>/ns/net` path was found for: checked again once
/// the namespace is open (the PID may have been given to another process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcCheck {
    /// The pod's UID as the node has it (its cgroup's `pod<uid>`).
    pub pod_uid: String,
    /// The node's own network namespace, which is never a pod's.
    pub host_netns: Option<(u64, u64)>,
}

/// What a source says now.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// By a key stable over the pod's life (its UID, or the namespace's path).
    pub targets: HashMap<String, Target>,
    /// Pods sharing the node's namespace: not attached.
    pub host_network: usize,
    /// The source is complete (in Kubernetes mode: every watch has listed).
    pub complete: bool,
    /// Names for the kernel's maps and for the metrics (not in bare
    /// namespace mode).
    pub inventory: Option<Inventory>,
    /// The inventory's containers' cgroup ids, as found on the node.
    pub cgroups: CgroupIds,
}
