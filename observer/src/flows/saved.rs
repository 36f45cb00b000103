//! The traffic counters, kept across a restart (`--state-dir`): written at
//! shutdown (after a last collection) and every minute, read at start, so
//! that a restarted or upgraded observer goes on from where the last one
//! stopped and Prometheus sees no counter reset. A file that cannot be
//! read is reported and set aside: the observer then counts from zero.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{metrics::Counts, schema::FlowLabels};
use crate::names::ObjectRef;

/// The file's name in the state directory.
pub const FILE: &str = "series.json";
/// Bumped when the format changes: a file of another version is not read.
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} is not a series file of this observer ({reason})")]
    Invalid { path: PathBuf, reason: String },
}

/// One series and its totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSeries {
    pub namespace: String,
    pub pod: String,
    pub labels: FlowLabels,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

impl SavedSeries {
    pub fn new(pod: &ObjectRef, labels: FlowLabels, counts: Counts) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            labels,
            packets: counts.packets,
            bytes: counts.bytes,
            connections: counts.connections,
        }
    }

    pub fn pod(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.pod)
    }

    pub fn counts(&self) -> Counts {
        Counts {
            packets: self.packets,
            bytes: self.bytes,
            connections: self.connections,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    series: Vec<SavedSeries>,
}

/// The series saved in `dir`; none if there is no file yet.
pub fn load(dir: &Path) -> Result<Vec<SavedSeries>, SavedError> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(SavedError::Read { path, source }),
    };
    let file: File = serde_json::from_str(&text).map_err(|e| SavedError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if file.version != VERSION {
        return Err(SavedError::Invalid {
            path,
            reason: format!("version {}, this observer reads {VERSION}", file.version),
        });
    }
    Ok(file.series)
}

/// Writes the series to `dir`, whole or not at all (a new file renamed over
/// the old one).
pub fn save(dir: &Path, series: Vec<SavedSeries>) -> Result<(), SavedError> {
    let path = dir.join(FILE);
    let partial = dir.join(format!("{FILE}.new"));
    let text = serde_json::to_string(&File {
        version: VERSION,
        series,
    })
    .expect("series serialize");
    let write = |to: &Path| fs::write(to, &text).and_then(|()| fs::rename(to, &path));
    write(&partial).map_err(|source| SavedError::Write { path, source })
}

/// Sets a file that cannot be read aside (so that the next save does not
/// fail on it and it stays for a look), returning where it went.
pub fn set_aside(dir: &Path) -> PathBuf {
    let to = dir.join(format!("{FILE}.unreadable"));
    let _ = fs::rename(dir.join(FILE), &to);
    to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_come_back_as_they_were_saved() {
        let dir = std::env::temp_dir().join(format!("observer-saved-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), Vec::new(), "no file yet");
        let labels = FlowLabels {
            pod: "web".into(),
            class: "localhost".into(),
            ..FlowLabels::default()
        };
        let counts = Counts {
            packets: 3,
            bytes: 300,
            connections: 1,
        };
        let series = vec![SavedSeries::new(
            &ObjectRef::new("default", "web"),
            labels,
            counts,
        )];
        save(&dir, series.clone()).unwrap();
        assert_eq!(load(&dir).unwrap(), series);

        fs::write(dir.join(FILE), "{\"version\": 9, \"series\": []}").unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
        fs::write(dir.join(FILE), "not json").unwrap();
        assert!(load(&dir).is_err());
        set_aside(&dir);
        assert_eq!(load(&dir).unwrap(), Vec::new());
        let _ = fs::remove_dir_all(&dir);
    }
}
