//! `cargo xtask check-deploy` (also part of `cargo xtask test`): every
//! manifest in deploy/, the kustomization rendered with and without the
//! ServiceMonitor component, and the uninstall's `deploy/cleanup`, validated against the Kubernetes JSON schemas
//! (the `kubernetes-validate` package from PyPI, which carries them offline).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{output, run},
    packages,
};

/// The schemas' Kubernetes release (the package's own version).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Kinds without a schema in that package: custom resources.
const CUSTOM_KINDS: &[&str] = &["kind ServiceMonitor with api version monitoring.coreos.com/v1"];

/// Validates; returns (resources passed, problems).
pub fn check(workspace: &Path) -> Result<(u64, u64)> {
    packages::ensure(&[("kubectl", "kubectl")])?;
    let validate = validator(workspace)?;
    let deploy = workspace.join("deploy");
    let out = workspace.join("target/deploy");
    fs::create_dir_all(&out)?;

    let mut files = manifests(&deploy)?;
    files.extend(manifests(&deploy.join("components/servicemonitor"))?);
    files.extend(manifests(&deploy.join("cleanup"))?);
    // The kustomization as users apply it, and with the component.
    let base = out.join("observer.yaml");
    fs::write(
        &base,
        output(Command::new("kubectl").arg("kustomize").arg(&deploy))?,
    )?;
    let overlay = out.join("with-servicemonitor");
    fs::create_dir_all(&overlay)?;
    fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources: [../../../deploy]\ncomponents: [../../../deploy/components/servicemonitor]\n",
    )?;
    let with_monitor = out.join("observer-with-servicemonitor.yaml");
    fs::write(
        &with_monitor,
        output(Command::new("kubectl").arg("kustomize").arg(&overlay))?,
    )?;
    // The uninstall's cleanup, as users apply it.
    let cleanup = out.join("cleanup.yaml");
    fs::write(
        &cleanup,
        output(
            Command::new("kubectl")
                .arg("kustomize")
                .arg(deploy.join("cleanup")),
        )?,
    )?;
    files.push(base);
    files.push(with_monitor.clone());
    files.push(cleanup);
    if !fs::read_to_string(&with_monitor)?.contains("kind: ServiceMonitor") {
        bail!("the ServiceMonitor component renders no ServiceMonitor");
    }

    let report = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .args(&files)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&report.stdout),
        String::from_utf8_lossy(&report.stderr)
    );
    let (mut passed, mut problems) = (0, 0);
    for line in text.lines() {
        println!("deploy: {line}");
        if line.contains(" passed for resource ") {
            passed += 1;
        } else if line.starts_with("WARN") && CUSTOM_KINDS.iter().any(|k| line.contains(k)) {
            // Custom resources: kubectl kustomize rendered them; no schema.
        } else if line.starts_with("WARN") || line.starts_with("ERROR") || line.contains("failed") {
            problems += 1;
        }
    }
    if !report.status.success() && problems == 0 {
        problems += 1;
    }
    println!("deploy: {passed} resources valid, {problems} problems");
    Ok((passed, problems))
}

/// The YAML files of a directory, but for kustomize's own.
fn manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// kubernetes-validate in a virtualenv of its own under target/.
fn validator(workspace: &Path) -> Result<PathBuf> {
    let venv = workspace.join("target/xtask/venv");
    let program = venv.join("bin/kubernetes-validate");
    if program.exists() {
        return Ok(program);
    }
    if run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).is_err() {
        // Debian's python3 keeps venv in a package of its own.
        packages::ensure(&[("python3", "python3")])?;
        run(Command::new("apt-get").args(["install", "-y", "-q", "python3-venv"]))?;
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))?;
    Ok(program)
}
