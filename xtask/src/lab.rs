//! `cargo xtask lab up|down|status`: the node lab on this machine.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use lab::{Lab, Plan};

use crate::packages;

#[derive(Subcommand)]
pub enum LabTask {
    /// Build a lab (the default one, or FILE) and leave it running.
    Up {
        /// A lab file (YAML); see lab/default-lab.yaml.
        file: Option<std::path::PathBuf>,
        /// How pods are made (overrides the file's `runtime`): process, or
        /// containerd for real pods through CRI.
        #[arg(long)]
        runtime: Option<lab::Runtime>,
    },
    /// Remove labs: everything they made, also after a killed `up`.
    Down {
        /// Only this lab (default: every lab on this machine).
        name: Option<String>,
    },
    /// Show the labs on this machine: pods, containers, Services.
    Status,
}

pub fn run(workspace: &Path, task: LabTask) -> Result<()> {
    match task {
        LabTask::Up { file, runtime } => up(workspace, file.as_deref(), runtime).map(drop),
        LabTask::Down { name } => down(name),
        LabTask::Status => status(),
    }
}

/// Builds the lab; returns its inventory path. Idempotent: a lab that is up
/// with the same file and runtime is left as it is.
pub fn up(
    workspace: &Path,
    file: Option<&Path>,
    runtime: impl Into<Option<lab::Runtime>>,
) -> Result<std::path::PathBuf> {
    packages::ensure(packages::LAB)?;
    let mut plan = match file {
        Some(path) => {
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Plan::from_yaml(&text, &path.display().to_string())?
        }
        None => Plan::default_lab(),
    };
    if let Some(runtime) = runtime.into() {
        plan = plan.with_runtime(runtime);
    }
    if plan.spec.runtime == lab::Runtime::Containerd {
        packages::ensure_installed(packages::CONTAINERD)?;
        let image = crate::lab_image::build(workspace)?;
        // SAFETY: xtask is single-threaded here; the lab reads it below.
        unsafe { std::env::set_var(lab::LAB_IMAGE_ENV, image) };
    }
    let name = &plan.spec.name;
    let state = Path::new(lab::STATE_DIR).join(name);
    let inventory = state.join("inventory.json");
    let same_file = fs::read_to_string(state.join("lab.yaml")).is_ok_and(|t| t == plan.source)
        && lab::runtime_of(name) == Some(plan.spec.runtime);
    if same_file && lab::is_healthy(name) {
        eprintln!("lab {name} is already up with this file; nothing to do");
        return Ok(inventory);
    }
    let started = std::time::Instant::now();
    let lab = Lab::up(&plan)?;
    eprintln!(
        "lab {name} is up ({} pods, {} services) in {:.1} s; inventory: {}",
        lab.inventory().pods.len(),
        lab.inventory().services.len(),
        started.elapsed().as_secs_f64(),
        inventory.display()
    );
    lab.keep();
    Ok(inventory)
}

fn down(name: Option<String>) -> Result<()> {
    let names = match name {
        Some(name) => vec![name],
        None => lab::list(),
    };
    if names.is_empty() {
        eprintln!("no lab is up");
    }
    for name in names {
        lab::down(&name)?;
        eprintln!("lab {name} is down");
    }
    Ok(())
}

fn status() -> Result<()> {
    let names = lab::list();
    if names.is_empty() {
        println!("no lab is up");
    }
    for name in names {
        print!("{}", lab::status(&name)?);
    }
    Ok(())
}
