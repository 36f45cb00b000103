//! The counters, kept across a restart (`--state-dir`): written at shutdown
//! (after a last collection) and every minute, read at start, so that a
//! restarted or upgraded observer goes on from where the last one stopped
//! and Prometheus sees no counter reset. A file that cannot be read is
//! reported and set aside: the observer then counts from zero.
//!
//! Two files, written as one snapshot (each carries the snapshot's id):
//!
//! - `series.json`: the traffic series' and the verdict series' totals, and
//!   the verdict counts the kernel had when the totals were taken;
//! - `flows.bin`: what each flow of the kernel's flow map had then (a flow
//!   key and three counters, 62 bytes a flow).
//!
//! Where the next observer takes the same kernel maps over (`--pin-dir`),
//! it counts each flow from where the totals left it, so that nothing the
//! programs counted in between is lost or counted twice, even after a
//! SIGKILL (the totals then are the last minute's, and so is the baseline).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use observer_common::FlowKey;
use serde::{Deserialize, Serialize};

use super::{metrics::Counts, schema::FlowLabels};
use crate::{kernel::datapath::MapIds, names::ObjectRef};

/// The file's name in the state directory.
pub const FILE: &str = "series.json";
/// The flows' baseline, beside it.
pub const FLOWS_FILE: &str = "flows.bin";
/// Bumped when the format changes: a file of another version is not read.
/// (Version 1 had the traffic series only; it is read as such.)
const VERSION: u32 = 2;
const FLOWS_MAGIC: &[u8; 8] = b"OBSFLW01";

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

/// A verdict series (`observer_policy_verdicts_total`'s labels, in order)
/// and its total.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVerdicts {
    pub labels: [String; 7],
    pub total: u64,
}

/// A kernel verdict count (a `VerdictKey`'s fields) as the collector last
/// read it, and the series it goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictBaseline {
    pub netns_cookie: u64,
    pub rule: u32,
    pub verdict: u8,
    pub class: u8,
    pub direction: u8,
    pub count: u64,
    pub labels: [String; 7],
}

/// What each flow had at the collection the totals come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBaseline {
    pub key: FlowKey,
    pub bytes: u64,
    pub packets: u32,
    pub connections: u16,
}

/// Everything saved, as one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub series: Vec<SavedSeries>,
    pub verdicts: Vec<SavedVerdicts>,
    /// What the kernel's counters had then; `None` if they cannot be told
    /// (an older file, or a flows file of another snapshot).
    pub baseline: Option<Baseline>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    /// The kernel maps the counts were read from: they hold only for these.
    pub maps: MapIds,
    pub verdicts: Vec<VerdictBaseline>,
    pub flows: Vec<FlowBaseline>,
    pub overflow: Vec<OverflowBaseline>,
}

/// What the overflow map held for a pod's hook (an `OverflowKey`'s fields
/// and its counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverflowBaseline {
    pub netns_cookie: u64,
    pub interface: u8,
    pub direction: u8,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    series: Vec<SavedSeries>,
    #[serde(default)]
    verdicts: Vec<SavedVerdicts>,
    #[serde(default)]
    baseline: Option<FileBaseline>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBaseline {
    /// Names the flows file written with it.
    snapshot: u64,
    maps: MapIds,
    verdicts: Vec<VerdictBaseline>,
    #[serde(default)]
    overflow: Vec<OverflowBaseline>,
}

/// What is saved in `dir`; nothing if there is no file yet.
pub fn load(dir: &Path) -> Result<Saved, SavedError> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Saved::default()),
        Err(source) => return Err(SavedError::Read { path, source }),
    };
    let file: File = serde_json::from_str(&text).map_err(|e| SavedError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if !(1..=VERSION).contains(&file.version) {
        return Err(SavedError::Invalid {
            path,
            reason: format!(
                "version {}, this observer reads 1 to {VERSION}",
                file.version
            ),
        });
    }
    // A flows file of another snapshot (a crash between the two writes):
    // no baseline, rather than a wrong one.
    let baseline = file.baseline.and_then(|b| {
        let flows = read_flows(&dir.join(FLOWS_FILE), b.snapshot)?;
        Some(Baseline {
            maps: b.maps,
            verdicts: b.verdicts,
            flows,
            overflow: b.overflow,
        })
    });
    Ok(Saved {
        series: file.series,
        verdicts: file.verdicts,
        baseline,
    })
}

/// Writes a snapshot to `dir`, each file whole or not at all (a new file
/// renamed over the old one), the flows first.
pub fn save(dir: &Path, saved: Saved) -> Result<(), SavedError> {
    let snapshot = random_id();
    let baseline = match saved.baseline {
        Some(baseline) => {
            write_atomically(dir, FLOWS_FILE, &flows_bytes(snapshot, &baseline.flows))?;
            Some(FileBaseline {
                snapshot,
                maps: baseline.maps,
                verdicts: baseline.verdicts,
                overflow: baseline.overflow,
            })
        }
        None => None,
    };
    let text = serde_json::to_string(&File {
        version: VERSION,
        series: saved.series,
        verdicts: saved.verdicts,
        baseline,
    })
    .expect("series serialize");
    write_atomically(dir, FILE, text.as_bytes())
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SavedError> {
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.new"));
    fs::write(&partial, bytes)
        .and_then(|()| fs::rename(&partial, &path))
        .map_err(|source| SavedError::Write { path, source })
}

/// A snapshot id: any number that two saves are unlikely to share.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    RandomState::new().hash_one(time)
}

const FLOW_RECORD: usize = size_of::<FlowKey>() + 8 + 4 + 2;

fn flows_bytes(snapshot: u64, flows: &[FlowBaseline]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + flows.len() * FLOW_RECORD);
    out.extend_from_slice(FLOWS_MAGIC);
    out.extend_from_slice(&snapshot.to_le_bytes());
    out.extend_from_slice(&(flows.len() as u64).to_le_bytes());
    for flow in flows {
        out.extend_from_slice(&key_bytes(&flow.key));
        out.extend_from_slice(&flow.bytes.to_le_bytes());
        out.extend_from_slice(&flow.packets.to_le_bytes());
        out.extend_from_slice(&flow.connections.to_le_bytes());
    }
    out
}

/// The flows file of `snapshot`; `None` if it is missing, damaged or of
/// another snapshot.
fn read_flows(path: &Path, snapshot: u64) -> Option<Vec<FlowBaseline>> {
    let bytes = fs::read(path).ok()?;
    let (head, records) = bytes.split_at_checked(24)?;
    let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    if &head[..8] != FLOWS_MAGIC || word(8) != snapshot {
        return None;
    }
    let count = usize::try_from(word(16)).ok()?;
    if records.len() != count.checked_mul(FLOW_RECORD)? {
        return None;
    }
    let flows = records
        .chunks_exact(FLOW_RECORD)
        .map(|r| {
            let k = size_of::<FlowKey>();
            FlowBaseline {
                key: key_from(&r[..k]),
                bytes: u64::from_le_bytes(r[k..k + 8].try_into().expect("8")),
                packets: u32::from_le_bytes(r[k + 8..k + 12].try_into().expect("4")),
                connections: u16::from_le_bytes(r[k + 12..k + 14].try_into().expect("2")),
            }
        })
        .collect();
    Some(flows)
}

/// A flow key's bytes as the kernel has them (it is plain data).
fn key_bytes(key: &FlowKey) -> [u8; size_of::<FlowKey>()] {
    // SAFETY: FlowKey is `repr(C)` integers and byte arrays without
    // implicit padding (checked by its size assertion).
    unsafe { std::mem::transmute_copy(key) }
}

fn key_from(bytes: &[u8]) -> FlowKey {
    let bytes: [u8; size_of::<FlowKey>()] = bytes.try_into().expect("a key's size");
    // SAFETY: every bit pattern is a valid FlowKey (integers and bytes).
    unsafe { std::mem::transmute(bytes) }
}

/// Sets a file that cannot be read aside (so that the next save does not
/// fail on it and it stays for a look), returning where it went.
pub fn set_aside(dir: &Path) -> PathBuf {
    let to = dir.join(format!("{FILE}.unreadable"));
    let _ = fs::rename(dir.join(FILE), &to);
    let _ = fs::remove_file(dir.join(FLOWS_FILE));
    to
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("observer-saved-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn snapshot() -> Saved {
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
        let names = ["default", "web", "p", "r", "pod", "egress", "deny"].map(String::from);
        Saved {
            series: vec![SavedSeries::new(
                &ObjectRef::new("default", "web"),
                labels,
                counts,
            )],
            verdicts: vec![SavedVerdicts {
                labels: names.clone(),
                total: 7,
            }],
            baseline: Some(Baseline {
                maps: MapIds {
                    flows: 11,
                    verdicts: 12,
                    overflow: 13,
                },
                overflow: vec![OverflowBaseline {
                    netns_cookie: 5,
                    interface: 2,
                    direction: 1,
                    packets: 3,
                    bytes: 300,
                    connections: 0,
                }],
                verdicts: vec![VerdictBaseline {
                    netns_cookie: 5,
                    rule: 2,
                    verdict: 2,
                    class: 2,
                    direction: 1,
                    count: 7,
                    labels: names,
                }],
                flows: vec![FlowBaseline {
                    key: FlowKey {
                        netns_cookie: 5,
                        src_port: 40000,
                        dst_port: 80,
                        protocol: 6,
                        ..FlowKey::default()
                    },
                    bytes: u64::MAX - 1,
                    packets: 9,
                    connections: 1,
                }],
            }),
        }
    }

    #[test]
    fn a_snapshot_comes_back_as_it_was_saved() {
        let dir = dir("back");
        assert_eq!(load(&dir).unwrap(), Saved::default(), "no file yet");
        save(&dir, snapshot()).unwrap();
        assert_eq!(load(&dir).unwrap(), snapshot());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flows_file_of_another_snapshot_gives_no_baseline() {
        let dir = dir("other");
        save(&dir, snapshot()).unwrap();
        let other = fs::read(dir.join(FLOWS_FILE)).unwrap();
        save(&dir, snapshot()).unwrap();
        fs::write(dir.join(FLOWS_FILE), other).unwrap();
        let loaded = load(&dir).unwrap();
        assert_eq!(loaded.series, snapshot().series, "the totals hold");
        assert_eq!(loaded.baseline, None, "a crash between the writes");
        fs::write(dir.join(FLOWS_FILE), b"OBSFLW01 short").unwrap();
        assert_eq!(load(&dir).unwrap().baseline, None, "damaged");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_version_1_file_is_read_and_others_are_not() {
        let dir = dir("versions");
        fs::write(dir.join(FILE), "{\"version\": 1, \"series\": []}").unwrap();
        assert_eq!(load(&dir).unwrap(), Saved::default());
        fs::write(dir.join(FILE), "{\"version\": 9, \"series\": []}").unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
        fs::write(dir.join(FILE), "not json").unwrap();
        assert!(load(&dir).is_err());
        set_aside(&dir);
        assert_eq!(load(&dir).unwrap(), Saved::default());
        let _ = fs::remove_dir_all(&dir);
    }
}
