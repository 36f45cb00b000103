//! Changes in a directory, from inotify: the observer reacts to a namespace
//! or an inventory appearing within milliseconds, and polls nothing.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use tokio::io::{Interest, unix::AsyncFd};

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    source: io::Error,
}

/// Something in the directory changed: a file was created, removed, renamed,
/// written or had its attributes changed (a bind mount lands as one).
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> Result<Self, WatchError> {
        let error = |source| WatchError {
            path: dir.into(),
            source,
        };
        // SAFETY: plain syscall; the fd is owned right below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| error(io::ErrorKind::InvalidInput.into()))?;
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CLOSE_WRITE
            | libc::IN_ATTRIB;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        // SAFETY: an OwnedFd owned by the AsyncFd from here on: it stays open
        // and the same until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| error(io::Error::other(e.to_string())))?;
        Ok(Self { fd })
    }

    /// Waits for the next change (all events that arrived together count as
    /// one).
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut any = false;
            loop {
                // SAFETY: reads into a buffer we own.
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    any = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() != io::ErrorKind::WouldBlock {
                    return Err(err);
                }
                guard.clear_ready();
                break;
            }
            if any {
                return Ok(());
            }
        }
    }
}
