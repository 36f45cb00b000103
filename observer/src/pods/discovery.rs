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
    for process in processes(proc_root) {
        let Some(path) = process.cgroups.lines().find_map(|l| l.strip_prefix("0::")) else {
            continue;
        };
        let Some(id) = id_in_cgroup(path).filter(|id| wanted.contains(id)) else {
            continue;
        };
        found.entry(id.to_owned()).or_insert_with(|| Found {
            pid: process.pid,
            netns: netns_of(proc_root, process.pid),
            cgroup: cgroup_root.join(path.trim_start_matches('/')),
        });
    }
    found
}

/// A pod found on this node by its UID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoundPod {
    /// The UID the node runs it under (its cgroup's `pod<uid>`).
    pub node_uid: String,
    /// The network namespace of one of its container processes.
    pub netns: PathBuf,
    /// Its containers' cgroup v2 directories, by container id (the pod's
    /// sandbox, the `pause` container, among them).
    pub containers: HashMap<String, PathBuf>,
    /// Names of containers the runtime's bundles give (by container id):
    /// for those the pod's status does not name yet.
    pub names: HashMap<String, String>,
}

/// Finds the pods with these UIDs by their processes: the kubelet puts every
/// container of a pod under the pod's cgroup, which is named after its UID
/// (`pod<uid>`, or `kubepods-<qos>-pod<uid_with_underscores>.slice` with the
/// systemd driver). A sandbox's process, where the runtime has one, is there
/// as soon as the pod's network namespace exists, before the pod's status
/// names any container.
///
/// Only container processes count (their cgroup's last component is a
/// container id): CRI-O's `conmon` may share the pod's cgroup while it runs
/// in the node's network namespace. For the same reason a process in the
/// node's own namespace (`host_netns`, as [`netns_id`] gives it) never names
/// the pod's namespace.
pub fn find_pods(
    proc_root: &Path,
    cgroup_root: &Path,
    uids: &HashSet<&str>,
    host_netns: Option<(u64, u64)>,
) -> HashMap<String, FoundPod> {
    let mut found: HashMap<String, FoundPod> = HashMap::new();
    // When the process each pod's namespace is named by started.
    let mut started_at: HashMap<PathBuf, u64> = HashMap::new();
    if uids.is_empty() {
        return found;
    }
    for process in processes(proc_root) {
        // Any hierarchy names the pod (with cgroup v1 controllers the v2
        // line may be `/`); the container's v2 directory is on the `0::` line.
        let Some(uid) = process
            .cgroups
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .find_map(pod_uid_in_cgroup)
            .filter(|uid| uids.contains(uid.as_str()))
        else {
            continue;
        };
        let in_container = process
            .cgroups
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .any(|path| id_in_cgroup(path).is_some());
        if !in_container {
            continue;
        }
        let netns = netns_of(proc_root, process.pid);
        if host_netns.is_some() && netns_id(&netns) == host_netns {
            continue;
        }
        // The namespace is named by the pod's oldest process (the sandbox's,
        // or a container's main process): a short-lived one (a probe, a
        // `sleep` of a shell loop) takes its `/proc` path with it when it
        // exits. `/proc` lists recycled PIDs in no order of age.
        let started = start_time(proc_root, process.pid).unwrap_or(u64::MAX);
        let pod = found.entry(uid.clone()).or_insert_with(|| FoundPod {
            node_uid: uid,
            netns: netns.clone(),
            ..FoundPod::default()
        });
        let oldest = started_at.entry(pod.netns.clone()).or_insert(started);
        if started < *oldest {
            started_at.remove(&pod.netns);
            started_at.insert(netns.clone(), started);
            pod.netns = netns;
        }
        if let Some(path) = process.cgroups.lines().find_map(|l| l.strip_prefix("0::"))
            && let Some(v2_id) = id_in_cgroup(path)
        {
            pod.containers
                .entry(v2_id.to_owned())
                .or_insert_with(|| cgroup_root.join(path.trim_start_matches('/')));
        }
    }
    found
}

/// Whether the process behind `netns_path` (`<proc>/<pid>/ns/net`) is still
/// one of pod `uid`'s, as its cgroup says, and not in the node's namespace
/// (`host_netns`). Asked once the namespace is open: a PID found at scan
/// time may have been given to another process since (the node's own),
/// and the namespace held must be the pod's.
pub fn still_the_pods(
    netns_path: &Path,
    opened: Option<(u64, u64)>,
    uid: &str,
    host_netns: Option<(u64, u64)>,
) -> bool {
    if opened.is_none() || opened == host_netns {
        return false;
    }
    let Some(cgroup) = netns_path
        .parent()
        .and_then(Path::parent)
        .map(|pid| pid.join("cgroup"))
    else {
        return false;
    };
    let Ok(text) = fs::read_to_string(cgroup) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .filter_map(pod_uid_in_cgroup)
        .any(|found| found == uid)
}

/// The device and inode of a namespace file: which namespace it is.
pub fn netns_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The pod UID in a cgroup path of the kubelet's, if any, with dashes (or,
/// for a static pod, the 32 hex digits of its config hash).
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

/// Kubernetes UIDs are RFC 4122 UUIDs: 8-4-4-4-12 hex digits. Static pods
/// run under the hash of their manifest instead: 32 hex digits.
fn is_uid(uid: &str) -> bool {
    let hex = |g: &str| g.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    (groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g)))
        || (uid.len() == 32 && hex(uid))
}

/// When a process started (clock ticks after boot: `/proc/<pid>/stat`,
/// field 22).
fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // After the command, which may hold spaces and parentheses: field 3 on.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn netns_of(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

/// A process and its `/proc/<pid>/cgroup`.
struct Process {
    pid: u32,
    cgroups: String,
}

/// Every process under `proc_root`. Processes that exit meanwhile are skipped.
fn processes(proc_root: &Path) -> impl Iterator<Item = Process> {
    fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cgroups = fs::read_to_string(entry.path().join("cgroup")).ok()?;
            Some(Process { pid, cgroups })
        })
}

/// Where cgroup v2 is mounted: a mount of the whole hierarchy (mountinfo's
/// root field `/`) if there is one. In a container with a cgroup namespace
/// of its own, `/sys/fs/cgroup` shows only the container's subtree; the
/// DaemonSet mounts the node's hierarchy besides.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mut fields = before.split_whitespace();
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            (after.split_whitespace().next()? == "cgroup2").then_some((root, mount_point))
        })
        .collect();
    mounts
        .iter()
        .find(|(root, _)| *root == "/")
        .or(mounts.first())
        .map(|(_, mount_point)| PathBuf::from(mount_point))
}

/// Joins the node's cgroup namespace (PID 1's, with `hostPID`) if this
/// process has one of its own, so that `/proc/<pid>/cgroup` shows paths
/// from the hierarchy's root rather than relative to the container's. Call
/// before any thread starts: it moves the calling thread only, and threads
/// inherit it. Returns whether it moved.
pub fn join_host_cgroup_namespace(proc_root: &Path) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let host = proc_root.join("1/ns/cgroup");
    let own = proc_root.join("self/ns/cgroup");
    // PID 1's namespace unreadable (a sandbox of another user namespace):
    // nothing to join that could be told apart.
    let (Some(host_id), Some(own_id)) = (netns_id(&host), netns_id(&own)) else {
        return Ok(false);
    };
    if host_id == own_id {
        return Ok(false);
    }
    let file = fs::File::open(&host)?;
    // SAFETY: a valid namespace fd; setns does not keep it.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// The cgroup every pod's cgroup is under (`kubepods` with the cgroupfs
/// driver, `kubepods.slice` with systemd, `kubelet-kubepods.slice` under a
/// `--cgroup-root`), from one pod's cgroup: the highest directory above it
/// whose name says `kubepods`; its id and its level in the hierarchy (the
/// root is level 0: the directories above it that are cgroups).
pub fn pods_cgroup(pod_cgroup: &Path) -> Option<(u64, u32)> {
    use std::os::unix::fs::MetadataExt;
    let pods = pod_cgroup
        .ancestors()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("kubepods"))
        })
        .last()?;
    let id = fs::metadata(pods).ok()?.ino();
    let above = pods.ancestors().skip(1);
    let level = above.filter(|p| p.join("cgroup.procs").exists()).count();
    Some((id, u32::try_from(level).ok()?))
}

#[cfg(test)]
mod tests;
