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
/// `BPF_EXIST`: update only what is there.
const BPF_EXIST: u64 = 2;

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
        let bound = if bound_udp_server(&socket) {
            socket_flags::BOUND
        } else {
            0
        };
        let info = SocketInfo {
            cgroup,
            flags: socket_flags::SEEDED | bound,
            ..SocketInfo::default()
        };
        if storage.insert(&socket, info, BPF_NOEXIST).is_ok() {
            seeded.sockets += 1;
        } else if bound != 0
            && let Ok(mut existing) = storage.get(&socket, 0)
            && existing.flags & socket_flags::BOUND == 0
        {
            // The hooks got there first (a send since they were attached),
            // but could not know of a bind before: say it.
            existing.flags |= socket_flags::BOUND;
            if storage.insert(&socket, existing, BPF_EXIST).is_ok() {
                seeded.sockets += 1;
            }
        }
    }
}

/// Whether a socket is a UDP server's, bound by its process: unconnected,
/// on a port the kernel never picks by itself (outside the ephemeral
/// range, where a UDP socket that sends first is bound automatically). A
/// server bound to an ephemeral port is not told apart: its socket is
/// classified as one of unknown origin.
fn bound_udp_server(socket: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let int_option = |level, name| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an int-sized option into an int.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        (rc == 0).then_some(value)
    };
    if int_option(libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_UDP) {
        return false;
    }
    // SAFETY: sockaddr_storage fits any address.
    let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes.
    let connected = unsafe { libc::getpeername(fd, (&raw mut address).cast(), &raw mut len) } == 0;
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    if connected || unsafe { libc::getsockname(fd, (&raw mut address).cast(), &raw mut len) } != 0 {
        return false;
    }
    // The port is at the same offset in sockaddr_in and sockaddr_in6.
    let port = match i32::from(address.ss_family) {
        libc::AF_INET | libc::AF_INET6 => {
            // SAFETY: an inet address, as the family says.
            let inet: &libc::sockaddr_in = unsafe { &*(&raw const address).cast() };
            u16::from_be(inet.sin_port)
        }
        _ => return false,
    };
    port != 0 && !observer_common::ports::is_ephemeral(port)
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
    fn tells_a_udp_servers_socket() {
        use std::net::{TcpListener, UdpSocket};
        let fd = |s: &dyn std::os::fd::AsFd| s.as_fd().try_clone_to_owned().unwrap();
        // A port of the server's choosing, outside the ephemeral range.
        let server = (20_000..20_200)
            .find_map(|port| UdpSocket::bind(("127.0.0.1", port)).ok())
            .expect("a free port");
        assert!(bound_udp_server(&fd(&server)));
        // A client's, bound by the kernel in the ephemeral range.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", server.local_addr().unwrap()).unwrap();
        assert!(!bound_udp_server(&fd(&client)));
        // Connected: a client's, whatever its port.
        let connected = (20_200..20_400)
            .find_map(|port| UdpSocket::bind(("127.0.0.1", port)).ok())
            .unwrap();
        connected.connect(server.local_addr().unwrap()).unwrap();
        assert!(!bound_udp_server(&fd(&connected)));
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!bound_udp_server(&fd(&tcp)));
    }

    #[test]
    fn reads_socket_links() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }
}
