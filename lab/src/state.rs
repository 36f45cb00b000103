//! Labs on this machine, found by name: taking one down, listing them,
//! removing those of killed runs, and their status.

use std::{fs, io, path::Path};

use observer_common::inventory::Inventory;

use crate::{
    LabError, container,
    lab::{STATE_DIR, state_dir},
    netns,
    network::Names,
    spec::Runtime,
};

/// Takes down the lab called `name`: its processes (containerd and its
/// pods among them, whose mounts go with the node's mount namespace),
/// cgroups, namespaces (with their interfaces, routes and iptables rules)
/// and files. Idempotent.
pub fn down(name: &str) -> Result<(), LabError> {
    // First: the socket load balancer's links go with the lab's bpffs.
    crate::socket_lb::uninstall(&state_dir(name));
    let cgroup = format!("{}-{name}", netns::PREFIX);
    if let Ok(root) = container::cgroup2_root() {
        container::remove_cgroup_tree(&root.join(&cgroup))?;
    }
    // runc's cgroups in the v1 hierarchies of a hybrid machine: empty now.
    for root in container::cgroup1_roots() {
        container::remove_cgroup_tree(&root.join(&cgroup))?;
    }
    for netns in netns::named_with_prefix(Names::new(name).prefix()) {
        netns::delete(&netns)?;
    }
    remove_etc_netns(Names::new(name).prefix())?;
    unmount_below(&state_dir(name))?;
    match fs::remove_dir_all(state_dir(name)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(LabError::Io {
            what: format!("removing {}", state_dir(name).display()),
            source: err,
        }),
        _ => Ok(()),
    }
}

/// Removes the pods' `/etc/netns/<name>` directories (their resolv.conf),
/// and `/etc/netns` itself once empty.
fn remove_etc_netns(prefix: &str) -> Result<(), LabError> {
    let dir = Path::new(crate::runtime::ETC_NETNS);
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            fs::remove_dir_all(entry.path()).map_err(|source| LabError::Io {
                what: format!("removing {}", entry.path().display()),
                source,
            })?;
        }
    }
    // Fails while another lab has files there: that is fine.
    let _ = fs::remove_dir(dir);
    Ok(())
}

/// Unmounts whatever is mounted below `dir` in this mount namespace (the
/// lab's bpffs, or mounts of a node whose namespace is gone but for them),
/// so that removing `dir` never reaches into another filesystem.
fn unmount_below(dir: &Path) -> Result<(), LabError> {
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4).map(unescape))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    // Deepest first.
    mounts.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in mounts {
        let c = std::ffi::CString::new(point.as_str()).map_err(|_| LabError::Io {
            what: format!("{point}: a path with a NUL byte"),
            source: io::ErrorKind::InvalidInput.into(),
        })?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(LabError::Io {
                what: format!("unmounting {point}"),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// mountinfo's escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or(""), 8) {
            Ok(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out + rest
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

/// How the lab called `name` makes its pods, if it is up.
pub fn runtime_of(name: &str) -> Option<Runtime> {
    fs::read_to_string(state_dir(name).join("runtime"))
        .ok()?
        .trim()
        .parse()
        .ok()
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
    let runtime = runtime_of(name).map_or("?", Runtime::name);
    let mut out = format!(
        "lab {name} (runtime {runtime}, inventory: {})\n",
        path.display()
    );
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

#[cfg(test)]
mod tests {
    #[test]
    fn reads_mountinfo_escapes() {
        assert_eq!(super::unescape("/run/a\\040b"), "/run/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
        assert_eq!(super::unescape("/odd\\x"), "/odd\\x");
    }
}
