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
