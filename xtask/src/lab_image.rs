//! The lab's workload image, `localhost/observer-lab:1`: what the lab's
//! containers run with the containerd runtime, and its pods' sandbox. Built
//! with buildah from this machine's Debian packages, so that the lab's
//! commands are the same on both runtimes: busybox (the shell and its
//! tools), Python 3 with its standard library, curl and dnsmasq, each with
//! the shared libraries it loads. Its default command sleeps (the sandbox's
//! `pause`). Built again only when what goes into it changed.

use std::{
    collections::BTreeSet,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    os::unix::fs::{MetadataExt, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{buildah::Buildah, cmd::output, image::libraries, packages};

/// Bumped when the recipe below changes.
const RECIPE: u32 = 1;
/// Parts of Python's standard library no lab workload imports.
const PYTHON_SKIP: &[&str] = &[
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "__pycache__",
    "site-packages",
    "dist-packages",
];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the image if its inputs changed; returns the archive's path.
pub fn build(workspace: &Path) -> Result<PathBuf> {
    packages::ensure_installed(&[
        "buildah",
        "busybox-static",
        "curl",
        "dnsmasq-base",
        "python3",
    ])?;
    let dir = workspace.join("target/lab-image");
    fs::create_dir_all(&dir)?;
    let archive = dir.join("observer-lab.tar");
    let files = contents()?;
    let key = fingerprint(&files)?;
    let key_file = dir.join("observer-lab.key");
    if archive.is_file() && fs::read_to_string(&key_file).is_ok_and(|k| k == key) {
        return Ok(archive);
    }
    eprintln!(
        "lab image: building {} from this machine's packages",
        lab::LAB_IMAGE
    );
    let _ = fs::remove_file(&archive);
    let buildah = Buildah::new(&dir);
    let container = buildah.output(&["from", "scratch"])?.trim().to_owned();
    let built = (|| -> Result<()> {
        let root = PathBuf::from(buildah.output(&["mount", &container])?.trim());
        fill(&root, &files)?;
        buildah.run(&["umount", &container])?;
        buildah.run(&[
            "config",
            "--env",
            &format!("PATH={PATH}"),
            "--cmd",
            r#"["sleep", "infinity"]"#,
            "--label",
            "org.opencontainers.image.title=observer-lab",
            &container,
        ])?;
        buildah.run(&[
            "commit",
            "--quiet",
            &container,
            &format!("oci-archive:{}:{}", archive.display(), lab::LAB_IMAGE),
        ])
    })();
    let _ = buildah.run(&["rm", &container]);
    built?;
    fs::write(&key_file, key)?;
    let size = fs::metadata(&archive)?.len();
    eprintln!(
        "lab image: {} ({:.1} MiB)",
        archive.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(archive)
}

/// What goes into the image: files of this machine, at the same paths.
struct Contents {
    files: BTreeSet<PathBuf>,
    /// The Python interpreter's file name (`python3.11`).
    python: String,
}

fn contents() -> Result<Contents> {
    let busybox = Path::new("/bin/busybox");
    let linked = output(Command::new("ldd").arg(busybox)).unwrap_or_default();
    if linked.contains("=>") {
        bail!(
            "{} is not the static busybox (busybox-static)",
            busybox.display()
        );
    }
    let python = fs::canonicalize("/usr/bin/python3").context("Debian's /usr/bin/python3")?;
    let python_name = python
        .file_name()
        .and_then(|n| n.to_str())
        .context("python3's name")?
        .to_owned();
    let mut files = BTreeSet::new();
    let mut programs = vec![
        busybox.to_path_buf(),
        python.clone(),
        fs::canonicalize("/usr/bin/curl")?,
        fs::canonicalize("/usr/sbin/dnsmasq")?,
    ];
    let stdlib = Path::new("/usr/lib").join(&python_name);
    walk(&stdlib, &mut |path| {
        if path.extension().is_some_and(|e| e == "so") {
            programs.push(path.to_path_buf());
        }
        files.insert(path.to_path_buf());
    })?;
    for program in &programs {
        if program != busybox {
            for library in libraries(program)? {
                files.insert(fs::canonicalize(&library)?);
                // The name the loader asks for, if a link.
                files.insert(library);
            }
        }
        files.insert(program.clone());
    }
    Ok(Contents {
        files,
        python: python_name,
    })
}

/// Every file below `dir`, but Python's parts in [`PYTHON_SKIP`].
fn walk(dir: &Path, found: &mut impl FnMut(&Path)) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            let skipped = name
                .to_str()
                .is_some_and(|n| PYTHON_SKIP.contains(&n) || n.starts_with("config-"));
            if !skipped {
                walk(&path, found)?;
            }
        } else if kind.is_file() {
            found(&path);
        }
    }
    Ok(())
}

/// Which files, their sizes and times, and the recipe's version.
fn fingerprint(contents: &Contents) -> Result<String> {
    let mut hasher = DefaultHasher::new();
    RECIPE.hash(&mut hasher);
    lab::LAB_IMAGE.hash(&mut hasher);
    for file in &contents.files {
        let meta = fs::symlink_metadata(file)?;
        (file, meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// Writes the image's root.
fn fill(root: &Path, contents: &Contents) -> Result<()> {
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    // Merged /usr, as on the machine, if it has it.
    for dir in ["bin", "sbin", "lib", "lib64"] {
        let host = Path::new("/").join(dir);
        if fs::symlink_metadata(&host).is_ok_and(|m| m.file_type().is_symlink()) {
            let link = fs::read_link(&host)?;
            // The link's target first (`usr/bin`), then the link.
            fs::create_dir_all(root.join(&link))?;
            symlink(link, inside(&host))?;
        }
    }
    for file in &contents.files {
        let target = inside(file);
        fs::create_dir_all(target.parent().expect("a file has a parent"))?;
        let meta = fs::symlink_metadata(file)?;
        if meta.file_type().is_symlink() {
            let link = fs::read_link(file)?;
            let _ = fs::remove_file(&target);
            symlink(link, &target)?;
        } else {
            fs::copy(file, &target).with_context(|| format!("copying {}", file.display()))?;
        }
    }
    // busybox's tools, where nothing else has the name.
    let bin = inside(Path::new("/usr/bin"));
    fs::create_dir_all(&bin)?;
    let applets = output(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets.lines().filter(|a| *a != "busybox") {
        let target = bin.join(applet);
        if !target.exists() {
            symlink("/bin/busybox", target)?;
        }
    }
    symlink(&contents.python, bin.join("python3"))?;
    let etc = inside(Path::new("/etc"));
    fs::create_dir_all(&etc)?;
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::write(etc.join("nsswitch.conf"), "hosts: files dns\n")?;
    for dir in ["tmp", "root"] {
        fs::create_dir_all(inside(Path::new("/").join(dir).as_path()))?;
    }
    fs::set_permissions(
        inside(Path::new("/tmp")),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    Ok(())
}
