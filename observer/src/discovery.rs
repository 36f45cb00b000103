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
    for (pid, path) in processes(proc_root) {
        let Some(id) = id_in_cgroup(&path).filter(|id| wanted.contains(id)) else {
            continue;
        };
        found.entry(id.to_owned()).or_insert_with(|| Found {
            pid,
            netns: netns_of(proc_root, pid),
            cgroup: cgroup_root.join(path.trim_start_matches('/')),
        });
    }
    found
}

/// A pod found on this node by its UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoundPod {
    /// The network namespace of one of its processes (all share it).
    pub netns: PathBuf,
    /// Its containers' cgroup v2 directories, by container id (the pod's
    /// sandbox, the `pause` container, among them).
    pub containers: HashMap<String, PathBuf>,
}

/// Finds the pods with these UIDs by their processes: the kubelet puts every
/// container of a pod under the pod's cgroup, which is named after its UID
/// (`pod<uid>`, or `kubepods-<qos>-pod<uid_with_underscores>.slice` with the
/// systemd driver). The sandbox's process is there as soon as the pod's
/// network namespace exists, before the pod's status names any container.
pub fn find_pods(
    proc_root: &Path,
    cgroup_root: &Path,
    uids: &HashSet<&str>,
) -> HashMap<String, FoundPod> {
    let mut found: HashMap<String, FoundPod> = HashMap::new();
    if uids.is_empty() {
        return found;
    }
    for (pid, path) in processes(proc_root) {
        let Some(uid) = pod_uid_in_cgroup(&path).filter(|uid| uids.contains(uid.as_str())) else {
            continue;
        };
        let pod = found.entry(uid).or_insert_with(|| FoundPod {
            netns: netns_of(proc_root, pid),
            containers: HashMap::new(),
        });
        if let Some(id) = id_in_cgroup(&path) {
            pod.containers
                .entry(id.to_owned())
                .or_insert_with(|| cgroup_root.join(path.trim_start_matches('/')));
        }
    }
    found
}

/// The pod UID in a cgroup path of the kubelet's, if any, with dashes.
pub fn pod_uid_in_cgroup(path: &str) -> Option<String> {
    path.split('/').find_map(|component| {
        let uid = match component.strip_suffix(".slice") {
            // systemd: kubepods-besteffort-pod<uid_>.slice, kubepods-pod<uid_>.slice
            Some(slice) => slice
                .rsplit_once('-')?
                .1
                .strip_prefix("pod")?
                .replace('_', "-"),
            // cgroupfs: kubepods/besteffort/pod<uid>
            None => component.strip_prefix("pod")?.to_owned(),
        };
        is_uid(&uid).then_some(uid)
    })
}

/// Kubernetes UIDs are RFC 4122 UUIDs: 8-4-4-4-12 hex digits.
fn is_uid(uid: &str) -> bool {
    let groups: Vec<&str> = uid.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn netns_of(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

/// Every process under `proc_root` with its cgroup v2 path (the `0::` line
/// of `/proc/<pid>/cgroup`). Processes that exit meanwhile are skipped.
fn processes(proc_root: &Path) -> impl Iterator<Item = (u32, String)> {
    fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cgroups = fs::read_to_string(entry.path().join("cgroup")).ok()?;
            let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
            Some((pid, path.to_owned()))
        })
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
    fn finds_pod_uids_in_every_cgroup_driver() {
        let uid = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
        let underscored = uid.replace('-', "_");
        for path in [
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{underscored}.slice/crio-{ID}.scope"),
            format!("/kubepods/burstable/pod{uid}/{ID}"),
            format!("/obslab-x/kubepods/besteffort/pod{uid}/{ID}"),
            format!("/kubepods/pod{uid}"),
        ] {
            assert_eq!(pod_uid_in_cgroup(&path).as_deref(), Some(uid), "{path}");
        }
        for path in [
            "/kubepods.slice/kubepods-besteffort.slice",
            "/system.slice/containerd.service",
            "/kubepods/burstable/podnot-a-uid",
            "/",
        ] {
            assert_eq!(pod_uid_in_cgroup(path), None, "{path}");
        }
    }

    #[test]
    fn finds_nothing_for_unknown_ids() {
        let found = find(Path::new("/proc"), Path::new("/sys/fs/cgroup"), &[ID]);
        assert!(found.is_empty());
    }
}
