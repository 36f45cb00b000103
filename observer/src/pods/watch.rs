//! Changes in a directory, from inotify: the observer reacts to a namespace
//! or an inventory appearing within milliseconds, and polls nothing.

use std::{
    io,
    path::{Path, PathBuf},
};

use futures::{FutureExt, StreamExt};
use inotify::{EventStream, Inotify, WatchMask};

#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    source: io::Error,
}

/// Something in the directory changed: a file was created, removed, renamed,
/// written or had its attributes changed (a bind mount lands as one).
pub struct DirWatch {
    events: EventStream<[u8; 4096]>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> Result<Self, WatchError> {
        let error = |source| WatchError {
            path: dir.into(),
            source,
        };
        let inotify = Inotify::init().map_err(error)?;
        let mask = WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CLOSE_WRITE
            | WatchMask::ATTRIB;
        inotify.watches().add(dir, mask).map_err(error)?;
        let events = inotify.into_event_stream([0; 4096]).map_err(error)?;
        Ok(Self { events })
    }

    /// Waits for the next change (all events that arrived together count as
    /// one).
    pub async fn changed(&mut self) -> io::Result<()> {
        match self.events.next().await {
            Some(event) => event?,
            // The stream never ends while the descriptor is open.
            None => return std::future::pending().await,
        };
        while let Some(Some(event)) = self.events.next().now_or_never() {
            event?;
        }
        Ok(())
    }
}

/// Containers appearing in the attached pods' cgroups: a directory made in
/// a pod's cgroup is a container the runtime is starting (its process runs
/// a moment later).
pub struct CgroupWatch {
    watches: inotify::Watches,
    events: EventStream<[u8; 4096]>,
    watched: std::collections::HashMap<PathBuf, inotify::WatchDescriptor>,
}

impl CgroupWatch {
    pub fn new() -> io::Result<Self> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let events = inotify.into_event_stream([0; 4096])?;
        Ok(Self {
            watches,
            events,
            watched: std::collections::HashMap::new(),
        })
    }

    /// Watches these pod cgroups (and no others). A cgroup that cannot be
    /// watched (gone meanwhile) is left out; the next call tries again.
    pub fn set(&mut self, cgroups: &std::collections::HashSet<PathBuf>) {
        self.watched.retain(|path, wd| {
            let keep = cgroups.contains(path);
            if !keep {
                let _ = self.watches.remove(wd.clone());
            }
            keep
        });
        for path in cgroups {
            if self.watched.contains_key(path) {
                continue;
            }
            let mask = WatchMask::CREATE | WatchMask::ONLYDIR;
            if let Ok(wd) = self.watches.add(path, mask) {
                self.watched.insert(path.clone(), wd);
            }
        }
    }

    /// Waits for a directory made in a watched cgroup (all that arrived
    /// together count as one).
    pub async fn created(&mut self) -> io::Result<()> {
        loop {
            let event = match self.events.next().await {
                Some(event) => event?,
                None => return std::future::pending().await,
            };
            let mut dirs = event.mask.contains(inotify::EventMask::ISDIR);
            while let Some(Some(event)) = self.events.next().now_or_never() {
                dirs |= event?.mask.contains(inotify::EventMask::ISDIR);
            }
            if dirs {
                return Ok(());
            }
        }
    }
}
