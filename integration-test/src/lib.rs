//! Helpers for the end-to-end tests: the real observer binary as a child
//! process, and its metrics as the test sees them.
//!
//! The tests need root and a kernel that loads eBPF. Where either is missing
//! they fail with the observer's own error message: they never skip.

pub mod container;
pub mod kernel;
pub mod kube_api;
pub mod leftovers;
mod metrics;
pub mod observer;
pub mod prometheus;

pub use kube_api::FakeApi;
pub use metrics::Scrape;
pub use observer::Observer;
pub use prometheus::Prometheus;

/// A directory of a test's own under the system's temporary directory,
/// removed when dropped (also when the test fails).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `observer-<tag>-<pid>`, created empty.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("observer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a temporary directory");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Writes `name` in it; returns its path as a string, for arguments.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("writing a temporary file");
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs of a test's own, standing in for a node's `/sys/fs/bpf`:
/// unmounted (and every pin in it dropped) when the test ends, also when it
/// fails.
pub struct Bpffs {
    dir: TempDir,
}

impl Bpffs {
    pub fn mount(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "cannot mount a bpffs at {}",
            dir.path().display()
        );
        Self { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Every pin under it (files, not directories), relative to it; not
    /// the kernel's own files at its root (`maps.debug`, `progs.debug`).
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), root, out);
                } else if dir != root
                    && let Ok(rel) = entry.path().strip_prefix(root)
                {
                    out.push(rel.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.path(), self.path(), &mut out);
        out.sort();
        out
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Entries of the kernel's hash maps named `name` now (every observer's):
/// what a program keeps for a count that no program takes. None if no
/// such map is loaded, or one of them cannot be read.
pub fn map_entries<K: aya::Pod, V: aya::Pod>(name: &str) -> Option<usize> {
    let maps: Vec<aya::maps::MapInfo> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(name))
        .collect();
    if maps.is_empty() {
        return None;
    }
    maps.iter()
        .map(|m| {
            let data = aya::maps::MapData::from_id(m.id()).ok()?;
            let map = aya::maps::Map::from_map_data(data).ok()?;
            let map = aya::maps::HashMap::<_, K, V>::try_from(map).ok()?;
            Some(map.keys().count())
        })
        .sum()
}

/// Programs of the observer's loaded in the kernel now, by name (a program
/// stays loaded while a link or a pin holds it).
pub fn loaded_programs(name: &str) -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .count()
}
