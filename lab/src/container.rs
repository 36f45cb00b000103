//! Containers as a kubelet lays them out: a process per container, in a
//! cgroup v2 directory of its own under its pod's, inside the pod's network
//! namespace. Containers of one pod thus share IP and ports and are told
//! apart by cgroup, as on a real node.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::LabError;

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on a hybrid layout).
pub fn cgroup2_root() -> Result<PathBuf, LabError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|source| LabError::Io {
        what: "reading /proc/self/mountinfo".into(),
        source,
    })?;
    mountinfo
        .lines()
        .find_map(|line| {
            // `<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> ...`
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or(LabError::NoCgroup2)
}

/// Where the cgroup v1 hierarchies are mounted (none on a pure cgroup v2
/// machine). runc, on a hybrid machine, makes a container's cgroup in each.
pub fn cgroup1_roots() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

/// A cgroup of a test's own, `<cgroup2>/obslab-<pid>-<n>-<role>`: removed
/// with its processes on drop, and by [`crate::cleanup_stale`] after a
/// killed run (the name reads as a test lab's).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(role: &str) -> Result<Self, LabError> {
        let n = crate::netns::next();
        let name = format!("{}-{}-{n}-{role}", crate::netns::PREFIX, std::process::id());
        let path = cgroup2_root()?.join(name);
        create_cgroup(&path)?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates `relative` (and its parents) below this cgroup.
    pub fn child(&self, relative: &Path) -> Result<PathBuf, LabError> {
        let path = self.path.join(relative);
        create_cgroup(&path)?;
        Ok(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = remove_cgroup_tree(&self.path);
    }
}

/// The cgroup v2 id of a cgroup directory (its inode number): what the
/// kernel reports for the sockets of its processes.
pub fn cgroup_id(path: &Path) -> Result<u64, LabError> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| LabError::Io {
            what: format!("reading cgroup {}", path.display()),
            source,
        })
}

/// Creates a cgroup directory and its parents.
pub fn create_cgroup(path: &Path) -> Result<(), LabError> {
    fs::create_dir_all(path).map_err(|source| LabError::Io {
        what: format!("creating cgroup {}", path.display()),
        source,
    })
}

/// What a container process is started with.
pub struct Launch<'a> {
    pub command: &'a [String],
    pub netns: &'a Path,
    pub cgroup: &'a Path,
    pub env: Vec<(String, String)>,
    pub log: &'a Path,
    /// The user and group to run as; `None`: as the lab runs (root).
    pub user: Option<u32>,
    /// A file to see as `/etc/resolv.conf` (in a mount namespace of the
    /// process's own, as `ip netns exec` does it).
    pub resolv_conf: Option<&'a Path>,
}

/// Starts a container process: in `cgroup` first, then in `netns`, in a
/// session of its own (so a terminal's Ctrl-C does not reach it).
pub fn spawn(launch: &Launch<'_>) -> Result<Child, LabError> {
    let io_error = |what: String| move |source| LabError::Io { what, source };
    let procs = OpenOptions::new()
        .write(true)
        .open(launch.cgroup.join("cgroup.procs"))
        .map_err(io_error(format!("opening {}", launch.cgroup.display())))?;
    let netns = File::open(launch.netns)
        .map_err(io_error(format!("opening {}", launch.netns.display())))?;
    let log =
        File::create(launch.log).map_err(io_error(format!("creating {}", launch.log.display())))?;
    let (program, args) = launch.command.split_first().expect("validated: not empty");
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_error("log".into()))?)
        .stderr(log);
    let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());
    let user = launch.user;
    let resolv_conf = launch
        .resolv_conf
        .map(|path| CString::new(path.as_os_str().as_bytes()))
        .transpose()
        .map_err(|_| LabError::Io {
            what: "a resolv.conf path with a NUL byte".into(),
            source: io::ErrorKind::InvalidInput.into(),
        })?;
    let (root, etc_resolv_conf) = (c"/", c"/etc/resolv.conf");
    // SAFETY: only async-signal-safe calls between fork and exec, on fds that
    // stay open until `spawn` returns.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process: the child, before it execs.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                || libc::setsid() < 0
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(resolv_conf) = &resolv_conf {
                let null = std::ptr::null::<libc::c_char>();
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        null,
                        root.as_ptr(),
                        null,
                        libc::MS_REC | libc::MS_PRIVATE,
                        null.cast(),
                    ) != 0
                    || libc::mount(
                        resolv_conf.as_ptr(),
                        etc_resolv_conf.as_ptr(),
                        null,
                        libc::MS_BIND,
                        null.cast(),
                    ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // Last: joining the cgroup and the namespace take root.
            if let Some(user) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(user) != 0
                    || libc::setuid(user) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().map_err(|source| LabError::Spawn {
        command: launch.command.join(" "),
        source,
    })
}

/// Kills every process in the cgroup tree at `root` and removes the tree.
/// A missing tree is fine.
pub fn remove_cgroup_tree(root: &Path) -> Result<(), LabError> {
    if !root.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14) kills the whole subtree at once.
    if fs::write(root.join("cgroup.kill"), "1").is_err() {
        kill_each(root);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match remove_dirs(root) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                // Killed processes take a moment to leave their cgroups.
                kill_each(root);
                thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(LabError::Io {
                    what: format!("removing cgroup {}", root.display()),
                    source,
                });
            }
        }
    }
}

/// SIGKILL to every process listed in the tree.
fn kill_each(dir: &Path) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for child in subdirs(dir) {
        kill_each(&child);
    }
}

/// Removes cgroup directories bottom-up (their control files go with them).
fn remove_dirs(dir: &Path) -> io::Result<()> {
    for child in subdirs(dir) {
        remove_dirs(&child)?;
    }
    fs::remove_dir(dir)
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether any process is in the cgroup (or below).
pub fn has_processes(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        || subdirs(dir).iter().any(|d| has_processes(d))
}
