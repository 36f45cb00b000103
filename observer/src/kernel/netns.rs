//! Network namespaces: open one by path, check it is one, run code inside it.
//!
//! `setns(2)` moves only the calling thread. So code runs inside a namespace on
//! the caller's thread (a dedicated one, never a tokio worker), and the thread
//! returns to where it was through a handle saved from
//! `/proc/thread-self/ns/net` (not `/proc/self`, which is the main thread's).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: no such file")]
    NotFound { path: PathBuf },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot return to the original network namespace: {0}")]
    Return(io::Error),
}

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    fd: OwnedFd,
}

impl NetNs {
    /// Which namespace this is: the device and inode of its file.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(self.fd.try_clone()?);
        let meta = file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }

    /// Opens `path` (for example `/var/run/netns/NAME` or `/proc/PID/ns/net`)
    /// and checks that it is a network namespace.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NetnsError::NotFound { path: path.into() },
            _ => NetnsError::Open {
                path: path.into(),
                source,
            },
        })?;
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let ns_type = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if ns_type != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns { path: path.into() });
        }
        Ok(Self {
            path: path.into(),
            fd: file.into(),
        })
    }

    /// The namespace this thread is in now.
    pub fn current_thread() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Runs `f` inside this namespace on the current thread, then returns the
    /// thread to `home`, the namespace it must be in between calls.
    pub fn run<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(&self.fd).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let result = f();
        setns(&home.fd).map_err(NetnsError::Return)?;
        Ok(result)
    }
}

/// The network namespaces of the processes under `proc_root` (normally
/// `/proc`), each opened once, but PID 1's (the node's own) and the calling
/// thread's, which hold no pod's hooks; and how many processes' namespaces
/// could not be opened (without `CAP_SYS_PTRACE`, those of other users). A
/// process that ends meanwhile is passed over.
pub fn of_processes(proc_root: &Path) -> io::Result<(Vec<NetNs>, usize)> {
    let own = NetNs::current_thread().map_err(io::Error::other)?.id()?;
    let mut seen = std::collections::HashSet::from([own]);
    // PID 1's may be closed to us (a sandbox's init): then it is not
    // counted as refused, and its namespace is walked like any other.
    if let Ok(node) = NetNs::open(&proc_root.join("1/ns/net")) {
        seen.insert(node.id()?);
    }
    let (mut found, mut unopened) = (Vec::new(), 0);
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        match entry.file_name().to_str().map(str::parse::<u32>) {
            Some(Ok(pid)) if pid != 1 => {}
            _ => continue,
        }
        let netns = match NetNs::open(&entry.path().join("ns/net")) {
            Ok(netns) => netns,
            Err(NetnsError::NotFound { .. }) => continue,
            Err(_) => {
                unopened += 1;
                continue;
            }
        };
        let Ok(id) = netns.id() else { continue };
        if seen.insert(id) {
            found.push(netns);
        }
    }
    Ok((found, unopened))
}

fn setns(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd.
    match unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The kernel's cookie for the namespace the current thread is in: the value
/// `bpf_get_netns_cookie` returns for its packets.
pub fn cookie_of_current() -> io::Result<u64> {
    /// SO_NETNS_COOKIE from asm-generic/socket.h (Linux 5.14).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a plain socket we own and close below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call and match the option's size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(cookie)
}

/// A label for a namespace path: NAME for `/var/run/netns/NAME` (and any other
/// `.../netns/NAME`), the path itself otherwise.
pub fn display_name(path: &Path) -> String {
    let in_netns_dir = path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|dir| dir == "netns");
    match path.file_name() {
        Some(name) if in_netns_dir => name.to_string_lossy().into_owned(),
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bind_mounts_by_their_file_name() {
        assert_eq!(display_name(Path::new("/var/run/netns/pod-a")), "pod-a");
        assert_eq!(display_name(Path::new("/run/netns/b")), "b");
        assert_eq!(
            display_name(Path::new("/proc/42/ns/net")),
            "/proc/42/ns/net"
        );
    }

    #[test]
    fn refuses_what_is_not_a_network_namespace() {
        let err = NetNs::open(Path::new("/proc/self/ns/mnt")).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        let err = NetNs::open(Path::new("/etc/hostname")).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        let err = NetNs::open(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(matches!(err, NetnsError::NotFound { .. }), "{err}");
    }

    #[test]
    fn opens_its_own_namespace_and_reads_its_cookie() {
        NetNs::current_thread().expect("own namespace");
        assert_ne!(cookie_of_current().expect("cookie"), 0);
    }
}
