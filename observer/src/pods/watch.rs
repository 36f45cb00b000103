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
