//! Local mode's source of pods, containers and Services: the inventory file
//! the node lab writes (format: observer-common's `inventory` module).

use std::{
    fs,
    path::{Path, PathBuf},
};

use observer_common::inventory::{INVENTORY_VERSION, Inventory};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read the inventory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the inventory {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the inventory {path} has format version {found}; this observer reads version {INVENTORY_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("the inventory {path} has no node named {node}")]
    UnknownNode { path: PathBuf, node: String },
}

/// Reads and checks an inventory.
pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let text = fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.into(),
        source,
    })?;
    // The version first: a newer format may not parse as this one.
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version = serde_json::from_str(&text).map_err(|source| InventoryError::Parse {
        path: path.into(),
        source,
    })?;
    if version.version != INVENTORY_VERSION {
        return Err(InventoryError::Version {
            path: path.into(),
            found: version.version,
        });
    }
    serde_json::from_str(&text).map_err(|source| InventoryError::Parse {
        path: path.into(),
        source,
    })
}

/// Reads an inventory that must describe `node`, if one is given (a node's
/// observer attaches to that node's pods; the others stay known as peers).
pub fn load_for_node(path: &Path, node: Option<&str>) -> Result<Inventory, InventoryError> {
    let inventory = load(path)?;
    if let Some(node) = node
        && !inventory.nodes.iter().any(|n| n.name == node)
    {
        return Err(InventoryError::UnknownNode {
            path: path.into(),
            node: node.into(),
        });
    }
    Ok(inventory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("observer-inv-{}-{name}", std::process::id()));
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn refuses_other_versions_and_bad_files() {
        let path = write("v2", r#"{"version": 2, "anything": true}"#);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("format version 2"), "{err}");
        let path = write("bad", r#"{"version": 1, "cluster": 3}"#);
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("is not valid"), "{err}");
        let err = load(Path::new("/nonexistent/inventory.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn reads_a_minimal_inventory() {
        let path = write(
            "ok",
            r#"{"version":1,"cluster":"c","podCidrs":["10.244.1.0/24"],"serviceCidr":"10.96.0.0/16",
                "nodes":[],"pods":[],"services":[]}"#,
        );
        let inventory = load(&path).unwrap();
        assert_eq!(inventory.cluster, "c");
        assert!(inventory.external_hosts.is_empty());
    }
}
