//! Names of cgroups by id (the inode of a cgroup v2 directory): the
//! directory's own name, for the containers no inventory or API names (bare
//! `--netns` mode, a container the API does not list yet); and how long the
//! flows of a container the API does not list yet wait for its name.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::{Duration, Instant},
};

/// An id that a walk did not find is looked for again after this long at
/// the earliest: an id that no cgroup has (any more) must not cost a walk
/// at every collection.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// A name no series asked for in this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// How deep, and how many directories, a walk goes at most.
const MAX_DEPTH: usize = 12;
const MAX_DIRS: usize = 200_000;

/// How long the flows of a container that no source names yet wait to be
/// counted (a container the runtime just started or restarted, before the
/// API reports its id): then under its directory's name.
const HOLD: Duration = Duration::from_secs(10);

/// Containers not named yet, and when their flows were first held.
#[derive(Debug, Default)]
pub struct Unnamed {
    first_held: HashMap<u64, Instant>,
}

impl Unnamed {
    /// Whether a flow of the container with cgroup `id` waits for its name.
    pub fn holds(&mut self, id: u64, now: Instant) -> bool {
        let first = *self.first_held.entry(id).or_insert(now);
        now.duration_since(first) < HOLD
    }

    /// Forgets the containers named since, and those held long ago.
    pub fn forget(&mut self, named: impl Fn(u64) -> bool, now: Instant) {
        self.first_held
            .retain(|&id, first| !named(id) && now.duration_since(*first) < FORGET_AFTER);
    }
}

#[derive(Debug, Default)]
pub struct CgroupNames {
    /// Where cgroup v2 is mounted; `None`: nothing is named.
    root: Option<PathBuf>,
    /// Names, and when a series last asked for each.
    names: HashMap<u64, Named>,
    /// Ids the walks since the last full one did not find, and when the
    /// last walk ran.
    not_found: HashSet<u64>,
    walked: Option<Instant>,
}

#[derive(Debug)]
struct Named {
    name: String,
    /// The id of the directory it is in.
    parent: u64,
    used: Instant,
}

impl CgroupNames {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            ..Self::default()
        }
    }

    pub fn name(&self, id: u64) -> Option<String> {
        self.names.get(&id).map(|n| n.name.clone())
    }

    /// Whether a walk has looked for `id` (found it or not).
    pub fn looked_for(&self, id: u64) -> bool {
        self.names.contains_key(&id) || self.not_found.contains(&id)
    }

    /// The id of the cgroup that `id` is in, if a walk found `id`.
    pub fn parent(&self, id: u64) -> Option<u64> {
        self.names.get(&id).map(|n| n.parent)
    }

    /// Makes the names of `ids` known: walks the hierarchy if one is not
    /// (an id a walk did not find waits [`RETRY_AFTER`]); forgets the
    /// names no series asked for in [`FORGET_AFTER`].
    pub fn learn<S: std::hash::BuildHasher>(&mut self, ids: &HashSet<u64, S>) {
        let now = Instant::now();
        for id in ids {
            if let Some(named) = self.names.get_mut(id) {
                named.used = now;
            }
        }
        self.names
            .retain(|_, n| now.duration_since(n.used) < FORGET_AFTER);
        let retry = self.walked.is_none_or(|t| t.elapsed() >= RETRY_AFTER);
        let missing: HashSet<u64> = ids
            .iter()
            .copied()
            .filter(|id| !self.names.contains_key(id))
            .filter(|id| retry || !self.not_found.contains(id))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.walked = Some(now);
        if retry {
            self.not_found.clear();
        }
        self.not_found.extend(&missing);
        let Some(root) = &self.root else {
            return;
        };
        let Ok(top) = std::fs::metadata(root) else {
            return;
        };
        let mut dirs = vec![(root.clone(), top.ino(), 0)];
        let mut seen = 0;
        while let Some((dir, parent, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                seen += 1;
                if seen > MAX_DIRS {
                    return;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let id = meta.ino();
                if missing.contains(&id) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let used = now;
                    self.names.insert(id, Named { name, parent, used });
                    self.not_found.remove(&id);
                }
                if depth + 1 < MAX_DEPTH {
                    dirs.push((entry.path(), id, depth + 1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_an_unnamed_containers_flows_a_while() {
        let mut unnamed = Unnamed::default();
        let start = Instant::now();
        assert!(unnamed.holds(7, start));
        assert!(unnamed.holds(7, start + HOLD / 2));
        assert!(!unnamed.holds(7, start + HOLD));
        unnamed.forget(|id| id == 7, start + HOLD);
        assert!(unnamed.first_held.is_empty());
    }

    #[test]
    fn names_a_directory_by_its_inode() {
        let root = std::env::temp_dir().join(format!("observer-cgroups-{}", std::process::id()));
        let dir = root.join("kubepods/pod1/cri-containerd-abc.scope");
        std::fs::create_dir_all(&dir).unwrap();
        let id = std::fs::metadata(&dir).unwrap().ino();
        let mut names = CgroupNames::new(Some(root.clone()));
        names.learn(&HashSet::from([id, 1]));
        assert_eq!(names.name(id).as_deref(), Some("cri-containerd-abc.scope"));
        let pod = std::fs::metadata(dir.parent().unwrap()).unwrap().ino();
        assert_eq!(names.parent(id), Some(pod));
        assert_eq!(names.name(1), None);
        assert!(names.looked_for(id) && names.looked_for(1));
        assert!(!names.looked_for(2), "never asked for");
        names.learn(&HashSet::new());
        assert!(names.name(id).is_some(), "kept a while without series");
        let _ = std::fs::remove_dir_all(&root);
    }
}
