//! Developer tasks: `cargo xtask <setup|run|test>`.

mod cmd;
mod toolchain;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test the observer")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Find or install the eBPF toolchain (idempotent).
    Setup,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let workspace = workspace_root();
    match cli.task {
        Task::Setup => setup(&workspace),
    }
}

fn setup(workspace: &Path) -> Result<()> {
    match toolchain::setup(workspace)? {
        toolchain::Outcome::AlreadySetUp => {
            eprintln!("setup: the eBPF toolchain is already set up; nothing to do")
        }
        toolchain::Outcome::Installed(steps) => {
            for step in steps {
                eprintln!("setup: {step}");
            }
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
