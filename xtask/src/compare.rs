//! `cargo xtask bench --compare REF`: the observer of another commit, built
//! from a copy of its tree (`git archive`, no worktree to clean up) in
//! `target/compare/<commit>`, with a target directory of its own for each
//! commit, so that this tree's build stays warm. (Not one shared by the
//! commits: cargo names a path dependency's artifacts by its path in the
//! workspace, and would take one commit's `observer-common` for another's.)

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{
    cargo,
    cmd::{output, run},
};

/// Builds REF's observer (release); returns a name for the report and the
/// binary's path.
pub fn build(workspace: &Path, reference: &str) -> Result<(String, PathBuf)> {
    let commit = output(Command::new("git").current_dir(workspace).args([
        "rev-parse",
        "--verify",
        &format!("{reference}^{{commit}}"),
    ]))
    .with_context(|| format!("--compare {reference}: not a commit of this repository"))?;
    let commit = commit.trim().to_owned();
    let short = &commit[..12.min(commit.len())];
    let tree = workspace.join("target/compare").join(short);
    if !tree.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&tree)?;
        eprintln!(
            "bench: extracting {reference} ({short}) into {}",
            tree.display()
        );
        let archive = workspace
            .join("target/compare")
            .join(format!("{short}.tar"));
        run(Command::new("git").current_dir(workspace).args([
            "archive",
            "--format=tar",
            "-o",
            &archive.display().to_string(),
            &commit,
        ]))?;
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&tree))?;
        std::fs::remove_file(&archive)?;
    }
    eprintln!("bench: building the observer of {reference} ({short})");
    let target = workspace.join("target/compare-target").join(short);
    run(cargo(&tree)
        .args(["build", "--release", "--package", "observer"])
        .env("CARGO_TARGET_DIR", &target))?;
    Ok((
        format!("{reference} ({short})"),
        target.join("release/observer"),
    ))
}
