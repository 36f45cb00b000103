//! Finds containers on this node from their runtime ids, through `/proc`: a
//! process of the container, its network namespace, its cgroup v2 directory.
//!
//! Every runtime puts the container id in the last component of the
//! container's cgroup path, which `/proc/<pid>/cgroup` shows (the `0::` line
//! of cgroup v2):
//!
//! | runtime, cgroup driver | last component |
//! |---|---|
//! | containerd, systemd | `cri-containerd-<id>.scope` |
//! | CRI-O, systemd | `crio-<id>.scope` |
//! | Docker, systemd | `docker-<id>.scope` |
//! | Podman, systemd | `libpod-<id>.scope` |
//! | any, cgroupfs | `<id>` |
//!
//! A pod's status names its containers as `<runtime>://<id>`. In a
//! DaemonSet this needs the host's PID namespace (`hostPID: true`).

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

/// A container found on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// A process of the container.
    pub pid: u32,
    /// Its network namespace (the pod's).
    pub netns: PathBuf,
    /// Its cgroup v2 directory.
    pub cgroup: PathBuf,
}

/// The id in a pod status' `containerID` (`containerd://<id>`, ...), if it
/// is one.
pub fn status_id(container_id: &str) -> Option<&str> {
    let (_, id) = container_id.split_once("://")?;
    is_id(id).then_some(id)
}

/// The container id in the last component of a cgroup path, if any.
pub fn id_in_cgroup(path: &str) -> Option<&str> {
    let last = path.rsplit('/').next()?;
    let inner = last.strip_suffix(".scope").unwrap_or(last);
    let id = ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|prefix| inner.strip_prefix(prefix))
        .unwrap_or(inner);
    is_id(id).then_some(id)
}

/// Runtime ids are 64 lowercase hex digits.
fn is_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Finds the containers with these ids among the processes under
/// `proc_root` (normally `/proc`); `cgroup_root` is where cgroup v2 is
/// mounted. Containers without a process (exited) are not found.
pub fn find(proc_root: &Path, cgroup_root: &Path, ids: &[&str]) -> HashMap<String, Found> {
    let wanted: HashSet<&str> = ids.iter().copied().collect();
    let mut found = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit while we look: skip it.
        let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        let Some(id) = id_in_cgroup(path).filter(|id| wanted.contains(id)) else {
            continue;
        };
        if found.contains_key(id) {
            continue;
        }
        found.insert(
            id.to_owned(),
            Found {
                pid,
                netns: entry.path().join("ns/net"),
                cgroup: cgroup_root.join(path.trim_start_matches('/')),
            },
        );
    }
    found
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| mount_point.into())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904d1a1b7c0a4f6a8ecb1234567";

    #[test]
    fn reads_ids_from_pod_status() {
        assert_eq!(status_id(&format!("containerd://{ID}")), Some(ID));
        assert_eq!(status_id(&format!("cri-o://{ID}")), Some(ID));
        assert_eq!(status_id(&format!("docker://{ID}")), Some(ID));
        assert_eq!(status_id(ID), None, "no runtime");
        assert_eq!(status_id("containerd://short"), None);
    }

    #[test]
    fn finds_ids_in_every_runtime_layout() {
        let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice";
        for path in [
            format!("/{pod}/cri-containerd-{ID}.scope"),
            format!("/{pod}/crio-{ID}.scope"),
            format!("/{pod}/docker-{ID}.scope"),
            format!("/{pod}/libpod-{ID}.scope"),
            format!("/kubepods/burstable/pod1234/{ID}"),
        ] {
            assert_eq!(id_in_cgroup(&path), Some(ID), "{path}");
        }
        assert_eq!(id_in_cgroup(&format!("/{pod}")), None);
        assert_eq!(id_in_cgroup("/user.slice/session-1.scope"), None);
        assert_eq!(id_in_cgroup("/"), None);
    }

    #[test]
    fn finds_nothing_for_unknown_ids() {
        let found = find(Path::new("/proc"), Path::new("/sys/fs/cgroup"), &[ID]);
        assert!(found.is_empty());
    }
}
