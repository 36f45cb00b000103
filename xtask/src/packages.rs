//! Debian packages the tasks need, installed when missing.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cmd::run, toolchain::which};

/// Installs the packages whose program is missing: `(program, package)`.
pub fn ensure(wanted: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    // Several programs may come from one package.
    missing.sort_unstable();
    missing.dedup();
    install(&missing)
}

/// Installs the Debian packages that are not installed (for those whose
/// files matter, not only a program in PATH).
pub fn ensure_installed(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    install(&missing)
}

fn install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if which("apt-get").is_none() {
        bail!("missing packages: install {}", missing.join(" "));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {} failed: are you root?", missing.join(" ")))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).ends_with("installed"))
}

/// What the node lab's containerd runtime runs: containerd (with its CRI
/// plugin), runc and the CNI plugins; the lab's image is built with buildah.
pub const CONTAINERD: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "buildah",
    "skopeo",
];

/// What the node lab runs: iproute2, iptables (kube-proxy's rules), curl and
/// Python (the default lab's clients and servers), dnsmasq (cluster DNS).
pub const LAB: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("dnsmasq", "dnsmasq-base"),
    ("iptables", "iptables"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("tc", "iproute2"),
];

/// What the end-to-end tests use besides the lab: a real Prometheus server
/// and promtool.
pub const TEST: &[(&str, &str)] = &[("prometheus", "prometheus"), ("promtool", "prometheus")];

/// What `cargo xtask bench` drives traffic with.
pub const BENCH: &[(&str, &str)] = &[("iperf3", "iperf3")];
