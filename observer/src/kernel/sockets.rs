//! The sockets a pod had before its hooks were attached (a pod that ran
//! before the observer started, or restarted): their storage is seeded with
//! their container, so that a server that bound long ago is named as the
//! receiver of what it receives, like one that binds now.
//!
//! Each socket of each process of the pod's cgroups is borrowed for a
//! moment (`pidfd_getfd`, which needs `CAP_SYS_PTRACE`), and its storage
//! written through the socket's descriptor. Connections opened before have
//! no original destination to record: they are classified by their packets.

use std::{
    collections::HashSet,
    fs,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

use aya::maps::{MapData, SkStorage};
use observer_common::{SocketInfo, socket_flags};

/// How many sockets a pod's cgroups may hold for a seeding to go through
/// them all (the rest are left: they get storage at their next call).
const MAX_SOCKETS: usize = 65_536;
/// `BPF_NOEXIST`: insert only where there is nothing.
const BPF_NOEXIST: u64 = 1;

/// What a seeding did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    pub sockets: usize,
    /// Sockets that could not be borrowed or written (a process that ended
    /// meanwhile, a lacking privilege).
    pub failed: usize,
}

/// Gives every socket of the processes under `pod_cgroup` (a pod's cgroup,
/// its containers' below it) a storage naming its container, unless it has
/// one.
pub fn seed(storage: &mut SkStorage<MapData, SocketInfo>, pod_cgroup: &Path) -> Seeded {
    let mut seeded = Seeded::default();
    let mut seen = HashSet::new();
    let mut dirs = vec![pod_cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        let cgroup = meta.ino();
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            seed_process(storage, pid, cgroup, &mut seen, &mut seeded);
            if seen.len() >= MAX_SOCKETS {
                return seeded;
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    seeded
}

fn seed_process(
    storage: &mut SkStorage<MapData, SocketInfo>,
    pid: i32,
    cgroup: u64,
    seen: &mut HashSet<u64>,
    seeded: &mut Seeded,
) {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    let mut pidfd = None;
    for entry in fds.flatten() {
        let Some(inode) = fs::read_link(entry.path())
            .ok()
            .and_then(|l| socket_inode(&l.to_string_lossy()))
        else {
            continue;
        };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !seen.insert(inode) {
            continue;
        }
        let pidfd = match &pidfd {
            Some(pidfd) => pidfd,
            None => match pidfd_open(pid) {
                Some(opened) => pidfd.insert(opened),
                None => {
                    seeded.failed += 1;
                    return;
                }
            },
        };
        let Some(socket) = pidfd_getfd(pidfd, fd) else {
            seeded.failed += 1;
            continue;
        };
        let info = SocketInfo {
            cgroup,
            flags: socket_flags::SEEDED,
            ..SocketInfo::default()
        };
        // An existing storage (the hooks got there first) stays.
        if storage.insert(&socket, info, BPF_NOEXIST).is_ok() {
            seeded.sockets += 1;
        }
    }
}

/// The inode in a descriptor's link `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> Option<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor we own; the result is owned
    // right below.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    // SAFETY: a fresh descriptor nobody else owns.
    (got >= 0).then(|| unsafe { OwnedFd::from_raw_fd(got as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_socket_links() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
