//! Named network namespaces (`ip netns`), as a guard that deletes its own.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::LabError;

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace this crate creates: `<prefix>-<pid>-<n>`.
pub(crate) const PREFIX: &str = "obslab";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number for a name of this process' own, never given twice.
pub(crate) fn next() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A named network namespace with `lo` up. One made by [`Netns::create`] is
/// deleted on drop, with everything in it: its interfaces, addresses, routes,
/// firewall rules, qdiscs and tc programs.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Deleted on drop (otherwise its owner deletes it, as a lab does).
    owned: bool,
}

impl Netns {
    /// Creates `obslab-<pid>-<n>-<role>`, deleted on drop.
    pub fn create(role: &str) -> Result<Self, LabError> {
        let n = next();
        let mut netns = Self::create_named(&format!("{PREFIX}-{}-{n}-{role}", std::process::id()))?;
        netns.owned = true;
        Ok(netns)
    }

    /// Creates a namespace called `name` that outlives this handle.
    pub(crate) fn create_named(name: &str) -> Result<Self, LabError> {
        ip(&["netns", "add", name])?;
        let netns = Self::existing(name);
        netns.ip(&["link", "set", "lo", "up"])?;
        // No IPv6 router solicitations or DAD: tests count exact packets.
        netns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        netns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(netns)
    }

    /// A handle to an existing namespace; dropping it deletes nothing.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.into(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that names the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, LabError> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        ip(&all)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns
    /// its result. Only that thread moves: `setns` acts on one thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        let file = File::open(self.path()).map_err(|source| self.enter_error(source))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: plain syscall on a namespace fd we hold.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(self.enter_error(std::io::Error::last_os_error()));
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn enter_error(&self, source: std::io::Error) -> LabError {
        LabError::Enter {
            name: self.name.clone(),
            source,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

/// Names of the namespaces under [`NETNS_DIR`] that start with `prefix`.
pub(crate) fn named_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Deletes a namespace by name; a missing one is fine.
pub(crate) fn delete(name: &str) -> Result<(), LabError> {
    if Path::new(NETNS_DIR).join(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Joins `a` and `b` with a veth pair, named `a_if` in `a` and `b_if` in `b`,
/// with the given addresses (CIDR notation), both up.
pub fn veth(
    (a, a_if, a_addr): (&Netns, &str, &str),
    (b, b_if, b_addr): (&Netns, &str, &str),
) -> Result<(), LabError> {
    // Created inside `a` from the start: never an interface in the root namespace.
    let peer = format!("p{}", NEXT.fetch_add(1, Ordering::Relaxed));
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
        "netns",
        b.name(),
    ])?;
    b.ip(&["link", "set", &peer, "name", b_if])?;
    for (netns, interface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        netns.ip(&["addr", "add", addr, "dev", interface])?;
        netns.ip(&["link", "set", interface, "up"])?;
    }
    Ok(())
}

/// Deletes namespaces left behind by runs whose process is gone (killed
/// tests). Returns the names it deleted.
pub fn cleanup_stale() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() && ip(&["netns", "del", &name]).is_ok() {
            deleted.push(name);
        }
    }
    deleted
}

/// The PID in `obslab-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?
        .strip_prefix('-')?
        .split('-')
        .next()?
        .parse()
        .ok()
}

pub(crate) fn ip(args: &[&str]) -> Result<String, LabError> {
    output(Command::new("ip").args(args))
}

/// Runs a command to its end: its standard output, or an error with its
/// standard error.
pub(crate) fn output(command: &mut Command) -> Result<String, LabError> {
    let out = command.output().map_err(|source| LabError::Spawn {
        command: format!("{command:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: format!("{command:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_owner_pid_from_a_name() {
        assert_eq!(owner_pid("obslab-1234-0-pod"), Some(1234));
        assert_eq!(owner_pid("obslab-x-0"), None);
        assert_eq!(owner_pid("other-1234"), None);
    }
}
