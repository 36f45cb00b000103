//! A node's own filesystem, for its containerd: a directory of the lab's
//! that becomes `/` for containerd and everything it starts (shims, runc,
//! the CNI plugins, the containers' mounts), in a mount namespace of their
//! own. The machine's programs and libraries are there read-only, with
//! `/proc`, `/sys` and `/dev`; `/etc`, `/run`, `/var` and `/tmp` are the
//! node's, and so is the bpffs at `/sys/fs/bpf` (as systemd mounts one on a
//! node: the observer's DaemonSet pins there). So the node's state sits
//! where a node keeps it
//! (`/var/lib/containerd`, `/run/containerd`, `/var/run/netns`,
//! `/var/lib/cni`, `/var/log/pods`), nothing it writes reaches the
//! machine's own directories, a second containerd on the machine is not
//! disturbed, and every mount it makes goes with its last process.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::symlink},
    path::{Path, PathBuf},
};

use crate::{LabError, lab::io_error};

/// The machine's directories the node sees read-only (or, where the machine
/// has a merged `/usr`, the same symlinks).
const SYSTEM: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Kernel interfaces, read-write: runc makes cgroups under `/sys/fs/cgroup`.
const KERNEL: &[&str] = &["proc", "sys", "dev"];
/// Files of the machine's `/etc` the node's programs read: the loader's
/// cache (runc links libseccomp), users and name service configuration.
const ETC_FILES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "passwd",
    "group",
    "nsswitch.conf",
];
/// The node's own directories.
const OWN: &[&str] = &[
    "etc/containerd",
    "etc/cni/net.d",
    "run",
    "tmp",
    "var/lib",
    "var/log/pods",
];

/// A node's filesystem, prepared on the machine's side.
#[derive(Clone, Debug)]
pub struct NodeFs {
    root: PathBuf,
    binds: Vec<Bind>,
}

#[derive(Clone, Debug)]
struct Bind {
    source: PathBuf,
    target: PathBuf,
    readonly: bool,
}

impl NodeFs {
    /// Lays out the node's root at `root` (created).
    pub fn prepare(root: &Path) -> Result<Self, LabError> {
        let mkdir = |dir: &Path| {
            fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))
        };
        mkdir(root)?;
        let mut binds = Vec::new();
        for name in SYSTEM.iter().chain(KERNEL) {
            let source = Path::new("/").join(name);
            let target = root.join(name);
            match fs::symlink_metadata(&source) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let link = fs::read_link(&source)
                        .map_err(io_error(format!("reading {}", source.display())))?;
                    symlink(&link, &target)
                        .map_err(io_error(format!("linking {}", target.display())))?;
                }
                Ok(meta) if meta.is_dir() => {
                    mkdir(&target)?;
                    binds.push(Bind {
                        source,
                        target,
                        readonly: SYSTEM.contains(name),
                    });
                }
                _ => {}
            }
        }
        for dir in OWN {
            mkdir(&root.join(dir))?;
        }
        fs::set_permissions(
            root.join("tmp"),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .map_err(io_error("making the node's /tmp".into()))?;
        // As on Debian: /var/run is /run.
        symlink("../run", root.join("var/run"))
            .map_err(io_error("linking the node's /var/run".into()))?;
        // What containerd gives each sandbox as its /etc/hosts.
        fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )
        .map_err(io_error("writing the node's /etc/hosts".into()))?;
        // The node resolves nothing: pods get the cluster's DNS through CRI.
        fs::write(root.join("etc/resolv.conf"), "# no DNS outside the lab\n")
            .map_err(io_error("writing the node's /etc/resolv.conf".into()))?;
        for file in ETC_FILES {
            let source = Path::new("/etc").join(file);
            if source.is_file() {
                fs::copy(&source, root.join("etc").join(file))
                    .map_err(io_error(format!("copying {}", source.display())))?;
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            binds,
        })
    }

    /// The machine's path of a path in the node.
    pub fn host_path(&self, in_node: &str) -> PathBuf {
        self.root.join(in_node.trim_start_matches('/'))
    }

    /// What the child runs between fork and exec to enter the node's
    /// filesystem: the mount calls, prepared here (no allocation is allowed
    /// after the fork).
    pub fn entry(&self) -> Result<Entry, LabError> {
        let c = |path: &Path| {
            CString::new(path.as_os_str().as_bytes()).map_err(|_| LabError::Io {
                what: format!("{}: a path with a NUL byte", path.display()),
                source: io::ErrorKind::InvalidInput.into(),
            })
        };
        Ok(Entry {
            root: c(&self.root)?,
            bpffs: c(&self.root.join("sys/fs/bpf"))?,
            binds: self
                .binds
                .iter()
                .map(|b| Ok((c(&b.source)?, c(&b.target)?, b.readonly)))
                .collect::<Result<_, LabError>>()?,
            dot: c(Path::new("."))?,
            slash: c(Path::new("/"))?,
        })
    }
}

/// The node's filesystem, ready to enter after a fork.
pub struct Entry {
    root: CString,
    bpffs: CString,
    binds: Vec<(CString, CString, bool)>,
    dot: CString,
    slash: CString,
}

impl Entry {
    /// In the child, before exec: a mount namespace of its own whose `/`
    /// is the node's root. Only async-signal-safe system calls.
    pub fn enter(&self) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: system calls on NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing of what follows propagates back to the machine.
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            ))?;
            // pivot_root wants the new root to be a mount point.
            check(libc::mount(
                self.root.as_ptr(),
                self.root.as_ptr(),
                null,
                libc::MS_BIND,
                null.cast(),
            ))?;
            for (source, target, readonly) in &self.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null.cast(),
                ))?;
                if *readonly {
                    check(libc::mount(
                        null,
                        target.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        null.cast(),
                    ))?;
                }
            }
            // The node's own bpffs, gone with its mount namespace.
            check(libc::mount(
                c"bpf".as_ptr(),
                self.bpffs.as_ptr(),
                c"bpf".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null.cast(),
            ))?;
            check(libc::chdir(self.root.as_ptr()))?;
            // The old root goes on top of the new one, then away.
            check(libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr()) as _)?;
            check(libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(self.slash.as_ptr()))?;
            // Shared, as systemd makes a node's `/`: a pod's mount with
            // HostToContainer propagation sees the node's new mounts (the
            // namespaces in /var/run/netns). A peer group of the node's
            // own: nothing propagates to the machine.
            check(libc::mount(
                null,
                self.slash.as_ptr(),
                null,
                libc::MS_REC | libc::MS_SHARED,
                null.cast(),
            ))
        }
    }
}
