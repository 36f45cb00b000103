//! buildah, the image builder that needs no daemon (Debian's package).

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::cmd::{output, run};

/// buildah with its own storage in a directory of ours (vfs: no overlay or
/// fuse needed), so the machine's images and containers are not touched.
pub struct Buildah {
    args: Vec<String>,
}

impl Buildah {
    pub fn new(dir: &Path) -> Self {
        let args = vec![
            "--storage-driver".into(),
            "vfs".into(),
            "--root".into(),
            dir.join("storage").display().to_string(),
            "--runroot".into(),
            dir.join("run").display().to_string(),
        ];
        Self { args }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("buildah");
        command.args(&self.args).args(args);
        command
    }

    pub fn run(&self, args: &[&str]) -> Result<()> {
        run(&mut self.command(args))
    }

    pub fn output(&self, args: &[&str]) -> Result<String> {
        output(&mut self.command(args))
    }
}
