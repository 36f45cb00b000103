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

use crate::{buildah::Buildah, cargo, cmd::output, packages};

const NAME: &str = "observer";

/// Builds the release binary, then the image around it, and checks it;
/// returns the archive's path.
pub fn build(workspace: &Path) -> Result<PathBuf> {
    crate::setup(workspace)?;
    crate::cmd::run(cargo(workspace).args(["build", "--release", "--package", "observer"]))?;
    package(
        &workspace.join("target/release/observer"),
        &workspace.join("target/image"),
    )
}

/// The image around `binary` (the tests use their debug build), as an OCI
/// archive in `dir`, checked.
pub fn package(binary: &Path, dir: &Path) -> Result<PathBuf> {
    packages::ensure(&[("buildah", "buildah"), ("skopeo", "skopeo")])?;
    let version = env!("CARGO_PKG_VERSION");
    fs::create_dir_all(dir)?;
    let archive = dir.join(format!("{NAME}-{version}.tar"));
    let _ = fs::remove_file(&archive);

    let buildah = Buildah::new(dir);
    let container = buildah.output(&["from", "scratch"])?.trim().to_owned();
    let built = (|| -> Result<()> {
        buildah.run(&["copy", &container, path(binary), "/observer"])?;
        for library in libraries(binary)? {
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
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
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
