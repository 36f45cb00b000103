//! Where the maps every program instance shares are pinned, and the links
//! of pods that fail closed.
//!
//! aya shares a map between loads of an object only through a pin. Two
//! homes for the pins:
//!
//! - [`Pins::Private`] (the default): a bpffs mounted for this process
//!   alone; unmounting it drops them all, so nothing of ours outlives the
//!   observer. A mount left behind by a killed observer is removed at the
//!   next start.
//! - [`Pins::Node`] (`--pin-dir`, on the node's bpffs, as bpfman and
//!   Cilium keep theirs): the maps outlive the process, and so do the links
//!   of pods whose policy fails closed, until the next observer takes them
//!   over. Layout:
//!
//!   ```text
//!   <pin-dir>/maps-v<N>/<MAP>       the shared maps (N: their layout version)
//!   <pin-dir>/pods/<cookie>/<hook>  the links of a pod that fails closed
//!   <pin-dir>/pods/<cookie>/filters/<hook>
//!                                   an empty directory: the clsact filter
//!                                   on that hook was left for the next
//!                                   observer (filters cannot be pinned)
//!   ```

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use observer_common::LAYOUT_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot mount a bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "--pin-dir {0} is not on a bpffs (mount one: `mount -t bpf bpf /sys/fs/bpf`; the DaemonSet mounts the node's /sys/fs/bpf)"
    )]
    NotBpffs(PathBuf),
}

/// The maps' directory in a node pin directory, with the layout version.
const MAPS_PREFIX: &str = "maps-v";

/// How often a lock held by another observer is tried again.
const LOCK_RETRY: Duration = Duration::from_millis(100);

/// Pin directories this process holds locked, until it exits: the last
/// collection and the saved counters come after the datapath is gone, and
/// the next observer must not take the maps over before them. The kernel
/// lets go at the exit, a SIGKILL included.
static HELD: Mutex<Vec<fs::File>> = Mutex::new(Vec::new());

/// Who waits for a pin directory's lock, for what it says meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    Observer,
    Cleanup,
}

/// Locks the pin directory `root` (made if need be) until this process
/// exits (see [`lock`]); at once if it holds it already.
fn hold_lock(root: &Path) -> io::Result<()> {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // By the directory itself, not its path's spelling: a second lock on
    // another descriptor of it would wait for this one forever.
    fs::create_dir_all(root)?;
    for dir in held.iter() {
        if same_directory(dir, root)? {
            return Ok(());
        }
    }
    let lock = lock(root, Waiter::Observer)?;
    held.push(lock);
    Ok(())
}

/// Locks the directory `root`, waiting (and saying so) while another
/// process holds it: an observer, or `observer cleanup`. The lock goes
/// with the file. An observer makes the directory again if it was
/// removed while it waited.
pub fn lock(root: &Path, waiter: Waiter) -> io::Result<fs::File> {
    let mut waited = false;
    loop {
        if waiter == Waiter::Observer {
            fs::create_dir_all(root)?;
        }
        let dir = fs::File::open(root)?;
        if !try_lock(&dir)? {
            if !waited {
                let pin_dir = root.display();
                match waiter {
                    Waiter::Observer => tracing::warn!(
                        %pin_dir,
                        "another observer, or observer cleanup, uses this pin directory: waiting for it to exit (one observer per node; a DaemonSet rollout with maxSurge above 0 stalls here: the old pod goes only once this one is ready)"
                    ),
                    Waiter::Cleanup => tracing::warn!(
                        %pin_dir,
                        "an observer uses this pin directory: waiting for it to exit before removing its pins"
                    ),
                }
                waited = true;
            }
            while !try_lock(&dir)? {
                std::thread::sleep(LOCK_RETRY);
            }
        }
        // The lock is on the directory opened before the wait: if it was
        // removed meanwhile, another process may lock the one at `root`
        // now. Locked only if they are the same.
        if same_directory(&dir, root)? {
            if waited {
                tracing::info!(pin_dir = %root.display(), "the other process has gone: going on");
            }
            return Ok(dir);
        }
    }
}

/// Whether `dir` is the directory at `root` now (false if none is there).
fn same_directory(dir: &fs::File, root: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = dir.metadata()?;
    match fs::metadata(root) {
        Ok(now) => Ok((open.dev(), open.ino()) == (now.dev(), now.ino())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// Takes the lock on `dir` if no one holds it.
fn try_lock(dir: &fs::File) -> io::Result<bool> {
    // SAFETY: a descriptor we own.
    match unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(true),
        _ => match io::Error::last_os_error() {
            err if err.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            err => Err(err),
        },
    }
}

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the pins are.
#[derive(Debug)]
pub enum Pins {
    /// A bpffs of this process alone, unmounted at exit.
    Private(PinDir),
    /// A directory on the node's bpffs, which outlives the observer.
    Node(NodePins),
}

impl Pins {
    /// Where the pin of map `name` goes.
    pub fn map(&self, name: &str) -> PathBuf {
        match self {
            Self::Private(dir) => dir.path.join(name),
            Self::Node(node) => node.maps().join(name),
        }
    }

    /// The node's pin directory, if the pins outlive the observer.
    pub fn node(&self) -> Option<&NodePins> {
        match self {
            Self::Private(_) => None,
            Self::Node(node) => Some(node),
        }
    }
}

/// A mounted private bpffs, unmounted on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

const PREFIX: &str = "bpffs-";

impl PinDir {
    /// Mounts `<runtime_dir>/bpffs-<pid>`.
    pub fn mount(runtime_dir: &Path) -> Result<Self, BpffsError> {
        remove_stale(runtime_dir);
        let path = runtime_dir.join(format!("{PREFIX}{}", std::process::id()));
        fs::create_dir_all(&path).map_err(|source| BpffsError::Create {
            path: path.clone(),
            source,
        })?;
        let target = c_path(&path);
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=0700".as_ptr().cast(),
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            let _ = fs::remove_dir(&path);
            return Err(BpffsError::Mount { path, source });
        }
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        unmount(&self.path);
    }
}

/// The node's pin directory (`--pin-dir`).
#[derive(Clone, Debug)]
pub struct NodePins {
    root: PathBuf,
}

impl NodePins {
    /// Opens (creating it if need be) a pin directory, which must be on a
    /// bpffs: pins elsewhere are refused by the kernel. Waits while another
    /// observer holds it (one started on the node before the last has
    /// gone): the maps, the pins of pods that fail
    /// closed and the filters left for the next observer are taken over
    /// once that one has left them, never while it still uses them.
    pub fn open(root: &Path) -> Result<Self, BpffsError> {
        // Checked before anything is made: nothing is left behind on a
        // file system that is not one.
        let existing = root.ancestors().find(|dir| dir.exists()).unwrap_or(root);
        if !on_bpffs(existing) {
            return Err(BpffsError::NotBpffs(root.into()));
        }
        hold_lock(root).map_err(|source| BpffsError::Lock {
            path: root.into(),
            source,
        })?;
        let pins = Self { root: root.into() };
        for dir in [pins.maps(), pins.pods()] {
            fs::create_dir_all(&dir).map_err(|source| BpffsError::Create { path: dir, source })?;
        }
        pins.remove_other_layouts();
        Ok(pins)
    }

    /// A pin directory as it is, created or checked by nobody (to remove
    /// what is in it).
    pub fn at(root: &Path) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps(&self) -> PathBuf {
        self.root.join(format!("{MAPS_PREFIX}{LAYOUT_VERSION}"))
    }

    /// Unpins the maps of other layout versions: not taken over (the
    /// programs that still use them hold them until they are replaced).
    fn remove_other_layouts(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        let current = self.maps();
        for entry in entries.flatten() {
            let other = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(MAPS_PREFIX));
            if other && entry.path() != current {
                tracing::info!(path = %entry.path().display(), "unpinning the maps of another layout version");
                remove_tree(&entry.path());
            }
        }
    }

    fn pods(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// The directory of the links of the pod whose namespace has `cookie`.
    pub fn pod(&self, cookie: u64) -> PathBuf {
        self.pods().join(cookie.to_string())
    }

    /// The namespace cookies of the pods that have pinned links.
    pub fn pinned_pods(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(self.pods()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// The pinned links of a pod, by hook name; none if it has none.
    pub fn pod_links(&self, cookie: u64) -> Vec<(String, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.pod(cookie)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
            .collect()
    }

    fn filters(&self, cookie: u64) -> PathBuf {
        self.pod(cookie).join("filters")
    }

    /// The hooks whose clsact filter an earlier observer left for a pod
    /// that fails closed.
    pub fn pod_filters(&self, cookie: u64) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.filters(cookie)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect()
    }

    /// Records that the clsact filter on `hook` stays for the next
    /// observer.
    pub fn keep_filter(&self, cookie: u64, hook: &str) -> io::Result<()> {
        fs::create_dir_all(self.filters(cookie).join(hook))
    }

    /// Forgets that record (the hook has a link now, or is gone).
    pub fn forget_filter(&self, cookie: u64, hook: &str) {
        let _ = fs::remove_dir(self.filters(cookie).join(hook));
    }

    /// Removes the pins of a pod: its links detach (if their hook is still
    /// there).
    pub fn remove_pod(&self, cookie: u64) {
        remove_tree(&self.pod(cookie));
    }

    /// Removes the maps' pins: they are freed once no program uses them.
    pub fn remove_maps(&self) {
        remove_tree(&self.maps());
        let _ = fs::create_dir(self.maps());
    }

    /// Removes everything in it (every layout version): every pinned link
    /// detaches, every map goes. The directory itself stays: its lock
    /// (held by `observer cleanup` meanwhile) keeps an observer from
    /// starting until the cleanup is done. Returns how many pins there
    /// were.
    pub fn remove_all(&self) -> usize {
        let removed = count_files(&self.root);
        if let Ok(entries) = fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => remove_tree(&entry.path()),
                    _ => {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        removed
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

/// Removes a directory of pins and what is in it (bpffs has no
/// `remove_dir_all` semantics of its own: files first, then directories).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => remove_tree(&entry.path()),
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Whether `path` is on a bpffs.
pub fn on_bpffs(path: &Path) -> bool {
    let target = c_path(path);
    // SAFETY: a zeroed statfs filled by the kernel; a NUL-terminated path.
    unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        libc::statfs(target.as_ptr(), &mut fs) == 0 && fs.f_type as i64 == BPF_FS_MAGIC
    }
}

fn unmount(path: &Path) {
    let target = c_path(path);
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let _ = fs::remove_dir(path);
}

/// Unmounts the bpffs of observers that are no longer running.
fn remove_stale(runtime_dir: &Path) {
    let Ok(entries) = fs::read_dir(runtime_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(path = %entry.path().display(), "removing the bpffs of a stopped observer");
            unmount(&entry.path());
        }
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths we build have no NUL")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lock won on a directory that was removed while it was waited for
    /// (`observer cleanup` empties the pin directory, but an older one, or
    /// a person, may remove it) is taken again on the directory at the
    /// path: otherwise the next process would lock that one at once, and
    /// two observers would share the node's pins.
    #[test]
    fn a_lock_won_on_a_removed_directory_is_taken_on_the_one_there_now() {
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let base = Gone(std::env::temp_dir().join(format!("pin-lock-{}", std::process::id())));
        let root = base.0.join("observer");
        let first = lock(&root, Waiter::Observer).expect("the first lock");
        let waiting = {
            let root = root.clone();
            std::thread::spawn(move || lock(&root, Waiter::Observer))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiting.is_finished(), "the second waits");
        fs::remove_dir(&root).expect("removed while it waits");
        drop(first);
        let second = waiting.join().unwrap().expect("the second lock");
        let id = |m: fs::Metadata| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        assert_eq!(
            id(second.metadata().unwrap()),
            id(fs::metadata(&root).unwrap()),
            "on the new one"
        );
        let third = fs::File::open(&root).unwrap();
        assert!(!try_lock(&third).unwrap(), "held: nobody else gets it");
        drop(second);
        assert!(try_lock(&third).unwrap(), "free once the holder goes");
    }
}
