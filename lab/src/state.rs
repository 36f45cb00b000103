//! Labs on this machine, found by name: taking one down, listing them,
//! removing those of killed runs, and their status.

use std::{fs, io, path::Path};

use observer_common::inventory::Inventory;

use crate::{
    LabError, container,
    lab::{STATE_DIR, state_dir},
    netns,
    network::Names,
};

/// Takes down the lab called `name`: its processes, cgroups, namespaces
/// (with their interfaces, routes and iptables rules) and files. Idempotent.
pub fn down(name: &str) -> Result<(), LabError> {
    // First: the socket load balancer's links go with the lab's bpffs.
    crate::socket_lb::uninstall(&state_dir(name));
    if let Ok(root) = container::cgroup2_root() {
        container::remove_cgroup_tree(&root.join(format!("{}-{name}", netns::PREFIX)))?;
    }
    for netns in netns::named_with_prefix(Names::new(name).prefix()) {
        netns::delete(&netns)?;
    }
    match fs::remove_dir_all(state_dir(name)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(LabError::Io {
            what: format!("removing {}", state_dir(name).display()),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Labs with anything left on this machine: state, namespaces or cgroups.
pub fn list() -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    if let Ok(entries) = fs::read_dir(STATE_DIR) {
        names.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    if let Ok(root) = container::cgroup2_root()
        && let Ok(entries) = fs::read_dir(root)
    {
        let prefix = format!("{}-", netns::PREFIX);
        names.extend(entries.flatten().filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(&prefix)
                .map(str::to_owned)
        }));
    }
    names.into_iter().collect()
}

/// Takes down test labs (named `<pid>-<n>`) whose process is gone, and
/// deletes test namespaces likewise. Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list() {
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && down(&name).is_ok() {
            removed.push(format!("lab {name}"));
        }
    }
    removed.extend(
        netns::cleanup_stale()
            .into_iter()
            .map(|n| format!("namespace {n}")),
    );
    removed
}

/// Whether the lab is fully up: every namespace there, every container
/// running.
pub fn is_healthy(name: &str) -> bool {
    let Ok(text) = fs::read_to_string(state_dir(name).join("inventory.json")) else {
        return false;
    };
    let Ok(inv) = serde_json::from_str::<Inventory>(&text) else {
        return false;
    };
    inv.pods.iter().all(|pod| {
        pod.netns.as_ref().is_some_and(|n| n.exists())
            && pod
                .containers
                .iter()
                .all(|c| container::has_processes(&c.cgroup))
    }) && inv
        .nodes
        .iter()
        .all(|n| n.netns.as_ref().is_some_and(|n| n.exists()))
}

/// What `cargo xtask lab status` shows about a lab.
pub fn status(name: &str) -> Result<String, LabError> {
    let path = state_dir(name).join("inventory.json");
    let Ok(text) = fs::read_to_string(&path) else {
        let leftovers = netns::named_with_prefix(Names::new(name).prefix());
        return Ok(format!(
            "lab {name}: no inventory (a partial lab: {} namespaces); `cargo xtask lab down` removes it\n",
            leftovers.len()
        ));
    };
    let inv: Inventory = serde_json::from_str(&text).map_err(|e| LabError::Io {
        what: format!("reading {}", path.display()),
        source: e.into(),
    })?;
    let mut out = format!("lab {name} (inventory: {})\n", path.display());
    for node in &inv.nodes {
        out += &format!(
            "  node {:<12} {:<15} pods {}\n",
            node.name,
            node.address,
            node.pod_cidr.map(|c| c.to_string()).unwrap_or_default()
        );
    }
    for pod in &inv.pods {
        let alive = pod.netns.as_ref().is_some_and(|n| n.exists());
        out += &format!(
            "  pod  {:<24} {:<15} on {:<8} {}\n",
            format!("{}/{}", pod.namespace, pod.name),
            pod.ip,
            pod.node,
            if alive { "" } else { "(namespace gone)" }
        );
        for c in &pod.containers {
            let state = if container::has_processes(&c.cgroup) {
                "running"
            } else {
                "stopped"
            };
            let ports: Vec<String> = c
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.container_port, p.protocol.name()))
                .collect();
            out += &format!(
                "       container {:<12} {:<8} {}\n",
                c.name,
                state,
                ports.join(" ")
            );
        }
    }
    for s in &inv.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}->{}", p.port, p.target_port))
            .collect();
        let endpoints: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        out += &format!(
            "  svc  {:<24} {:<15} {} -> {}\n",
            format!("{}/{}", s.namespace, s.name),
            s.cluster_ip,
            ports.join(","),
            endpoints.join(",")
        );
    }
    for host in &inv.external_hosts {
        out += &format!("  ext  {:<24} {}\n", host.name, host.address);
    }
    Ok(out)
}
