//! A private bpffs instance holding the pins of the maps that every program
//! instance shares.
//!
//! aya shares a map between loads of an object only through a pin. The pins
//! live in a bpffs mounted for this process alone, and unmounting it drops
//! them all: nothing of ours stays in /sys/fs/bpf or anywhere else. A mount
//! left behind by a killed observer is removed at the next start.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot mount a bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
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

    /// Where the pin of map `name` goes.
    pub fn pin_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        unmount(&self.path);
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
