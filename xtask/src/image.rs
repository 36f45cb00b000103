//! `cargo xtask image`: the observer's container image, built without a
//! Docker engine: buildah from Debian's packages, `FROM scratch` plus the
//! release binary and the shared libraries it links (glibc's). Written as an
//! OCI archive; then checked: its entrypoint, user and size (skopeo), and
//! the binary inside it, run in the image's own root, prints its version.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cargo,
    cmd::{output, run},
    packages,
};

const NAME: &str = "observer";

/// Builds and checks the image; returns the archive's path.
pub fn build(workspace: &Path) -> Result<PathBuf> {
    packages::ensure(&[("buildah", "buildah"), ("skopeo", "skopeo")])?;
    crate::setup(workspace)?;
    run(cargo(workspace).args(["build", "--release", "--package", "observer"]))?;
    let binary = workspace.join("target/release/observer");
    let version = env!("CARGO_PKG_VERSION");
    let dir = workspace.join("target/image");
    fs::create_dir_all(&dir)?;
    let archive = dir.join(format!("{NAME}-{version}.tar"));
    let _ = fs::remove_file(&archive);

    let buildah = Buildah::new(&dir);
    let container = buildah.output(&["from", "scratch"])?.trim().to_owned();
    let built = (|| -> Result<()> {
        buildah.run(&["copy", &container, path(&binary), "/observer"])?;
        for library in libraries(&binary)? {
            // The file itself, at the path the binary asks for (the loader's
            // is a symlink on the host).
            let source = fs::canonicalize(&library)?;
            buildah.run(&["copy", &container, path(&source), path(&library)])?;
        }
        buildah.run(&[
            "config",
            "--entrypoint",
            r#"["/observer"]"#,
            "--cmd",
            r#"["run"]"#,
            // Root, with the capabilities the DaemonSet grants.
            "--user",
            "0:0",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "--label",
            "org.opencontainers.image.title=observer",
            &container,
        ])?;
        // The binary in the image's root, with the image's libraries only.
        let root = buildah.output(&["mount", &container])?.trim().to_owned();
        let said = output(Command::new("chroot").args([&root, "/observer", "--version"]))
            .context("running the image's binary in the image's root")?;
        println!("image: the binary inside says: {}", said.trim());
        if !said.contains(version) {
            bail!("the image's binary says {said:?}, not version {version}");
        }
        buildah.run(&["umount", &container])?;
        buildah.run(&[
            "commit",
            "--quiet",
            &container,
            &format!("oci-archive:{}:{NAME}:{version}", archive.display()),
        ])
    })();
    let _ = buildah.run(&["rm", &container]);
    built?;

    let inspect = output(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci-archive:{}", archive.display()),
    ]))?;
    let config = inspect_field(&inspect, "config")?;
    let size = fs::metadata(&archive)?.len();
    println!(
        "image: {} ({:.1} MiB): entrypoint {}, cmd {}, user {}",
        archive.display(),
        size as f64 / (1024.0 * 1024.0),
        config["Entrypoint"],
        config["Cmd"],
        config["User"]
    );
    Ok(archive)
}

/// The shared libraries `ldd` says the binary loads (the loader included).
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listing = output(Command::new("ldd").arg(binary))?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; not linux-vdso.
            let path = line.split_whitespace().find(|w| w.starts_with('/'))?;
            Some(PathBuf::from(path))
        })
        .collect())
}

fn inspect_field(json: &str, field: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(json).context("skopeo's output")?;
    Ok(value[field].clone())
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 paths")
}

/// buildah with its own storage under target/image (vfs: no overlay or fuse
/// needed), so the machine's containers are not touched.
struct Buildah {
    args: Vec<String>,
}

impl Buildah {
    fn new(dir: &Path) -> Self {
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

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("buildah");
        command.args(&self.args).args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        run(&mut self.command(args))
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        output(&mut self.command(args))
    }
}
