//! Container names from the runtime's own records. containerd's CRI plugin
//! and CRI-O write each container's OCI bundle before they make its cgroup,
//! and its annotations say which container of which pod it is. A container
//! the runtime has just (re)started is named from there within
//! milliseconds of its cgroup appearing, before its first process runs and
//! long before the pod's status says (the kubelet updates it later): the
//! rules naming it hold it from its first `connect()`.
//!
//! The bundles are written by the runtime (root), not by pod authors: what
//! they say is the runtime's word.

use std::{collections::HashMap, io::Read, path::PathBuf};

use serde::Deserialize;

/// Bundles are small (an OCI spec: tens of KB); a bigger file is no bundle.
const MAX_BUNDLE: u64 = 1 << 20;

/// What a bundle says of its container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The container's name in its pod.
    pub container: String,
    /// The UID of its pod, as the node knows it (the cgroup's `pod<uid>`).
    pub pod_uid: String,
}

/// The runtimes' bundle directories, and what was read from them.
#[derive(Debug, Default)]
pub struct Bundles {
    dirs: Vec<PathBuf>,
    /// By container id; a container's bundle does not change.
    known: HashMap<String, Bundle>,
}

#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    annotations: HashMap<String, String>,
}

impl Bundles {
    /// Bundles are looked for in each of `dirs`, as `<dir>/<id>/config.json`
    /// (containerd) or `<dir>/<id>/userdata/config.json` (CRI-O).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self {
            dirs,
            known: HashMap::new(),
        }
    }

    /// The container with runtime id `id` (64 hex digits), if a bundle names
    /// one (a pod's sandbox is no container).
    pub fn get(&mut self, id: &str) -> Option<&Bundle> {
        if !self.known.contains_key(id) {
            let bundle = self.dirs.iter().find_map(|dir| {
                let files = [
                    dir.join(id).join("config.json"),
                    dir.join(id).join("userdata/config.json"),
                ];
                files.iter().find_map(|file| read(file))
            })?;
            self.known.insert(id.to_owned(), bundle);
        }
        self.known.get(id)
    }

    /// Forgets the containers that are gone.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.known.retain(|id, _| keep(id));
    }
}

fn read(file: &std::path::Path) -> Option<Bundle> {
    let mut text = String::new();
    std::fs::File::open(file)
        .ok()?
        .take(MAX_BUNDLE)
        .read_to_string(&mut text)
        .ok()?;
    let spec: Spec = serde_json::from_str(&text).ok()?;
    of(&spec.annotations)
}

/// A container's names in its bundle's annotations: containerd's CRI
/// plugin's, or CRI-O's.
fn of(annotations: &HashMap<String, String>) -> Option<Bundle> {
    let get = |key: &str| annotations.get(key).cloned();
    if let Some(kind) = annotations.get("io.kubernetes.cri.container-type") {
        if kind != "container" {
            return None;
        }
        return Some(Bundle {
            container: get("io.kubernetes.cri.container-name")?,
            pod_uid: get("io.kubernetes.cri.sandbox-uid")?,
        });
    }
    let container = get("io.kubernetes.container.name")?;
    // CRI-O's sandbox calls itself POD.
    (container != "POD").then_some(Bundle {
        container,
        pod_uid: get("io.kubernetes.pod.uid")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn containerd_and_cri_o_bundles_name_their_containers_not_sandboxes() {
        let containerd = annotations(&[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.container-name", "sidecar"),
            ("io.kubernetes.cri.sandbox-uid", "u-1"),
        ]);
        let expected = Bundle {
            container: "sidecar".into(),
            pod_uid: "u-1".into(),
        };
        assert_eq!(of(&containerd), Some(expected.clone()));
        let sandbox = annotations(&[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("io.kubernetes.cri.sandbox-uid", "u-1"),
        ]);
        assert_eq!(of(&sandbox), None);
        let cri_o = annotations(&[
            ("io.kubernetes.container.name", "sidecar"),
            ("io.kubernetes.pod.uid", "u-1"),
        ]);
        assert_eq!(of(&cri_o), Some(expected));
        let cri_o_sandbox = annotations(&[
            ("io.kubernetes.container.name", "POD"),
            ("io.kubernetes.pod.uid", "u-1"),
        ]);
        assert_eq!(of(&cri_o_sandbox), None);
        assert_eq!(of(&HashMap::new()), None);
    }

    #[test]
    fn bundles_are_read_from_the_runtime_directories() {
        let dir = std::env::temp_dir().join(format!("observer-bundles-{}", std::process::id()));
        let id = "a".repeat(64);
        std::fs::create_dir_all(dir.join(&id)).unwrap();
        std::fs::write(
            dir.join(&id).join("config.json"),
            r#"{"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.sandbox-uid": "u-2"}}"#,
        )
        .unwrap();
        let mut bundles = Bundles::new(vec![PathBuf::from("/nonexistent"), dir.clone()]);
        assert_eq!(bundles.get(&id).map(|b| b.container.as_str()), Some("app"));
        assert_eq!(bundles.get(&"b".repeat(64)), None);
        std::fs::write(dir.join(&id).join("config.json"), "not json").unwrap();
        assert!(
            bundles.get(&id).is_some(),
            "a container's bundle is read once"
        );
        bundles.retain(|_| false);
        assert_eq!(bundles.get(&id), None, "damaged");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
