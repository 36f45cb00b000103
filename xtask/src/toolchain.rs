//! `cargo xtask setup`: find or install what building the eBPF crate needs.
//!
//! The eBPF crate is built by `observer/build.rs` (aya-build) with
//! `rustup run observer-ebpf cargo build --target bpfel-unknown-none -Z build-std=core`.
//! That needs three things, and this module provides them idempotently:
//!
//! 1. a rustup toolchain named [`TOOLCHAIN`] whose sysroot carries the standard
//!    library source (`rust-src`), because `core` is rebuilt for the BPF target;
//!    preferably a rustup nightly that has it (a developer laptop), otherwise
//!    Debian's `rustc-web` + `rust-web-src`, linked into rustup;
//! 2. `bpf-linker`, linked against an LLVM of the same major version as that
//!    compiler: the linker reads the compiler's LLVM bitcode;
//! 3. nothing else: `RUSTC_BOOTSTRAP=1` (set by build.rs) unlocks `-Z` on a
//!    stable compiler.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// The rustup toolchain that `observer/build.rs` builds the eBPF crate with.
/// Keep in step with `EBPF_TOOLCHAIN` in observer/build.rs.
pub const TOOLCHAIN: &str = "observer-ebpf";
/// The bpf-linker release verified with aya-ebpf 0.2 on rustc 1.95/1.96.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's Rust that ships its own library source (rust-src).
const DEBIAN_PACKAGES: [&str; 3] = ["rustc-web", "cargo-web", "rust-web-src"];

/// What `setup` found or did, for the one-line summary.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    AlreadySetUp,
    Installed(Vec<String>),
}

pub fn setup(workspace: &Path) -> Result<Outcome> {
    let mut done = Vec::new();
    let sysroot = match toolchain_sysroot(TOOLCHAIN) {
        Some(sysroot) if has_rust_src(&sysroot) => sysroot,
        _ => {
            let (sysroot, how) = provide_compiler()?;
            done.push(how);
            sysroot
        }
    };
    let llvm_major = llvm_major_of(TOOLCHAIN)?;
    if !bpf_linker_matches(llvm_major)? {
        install_bpf_linker(workspace, &sysroot, llvm_major)?;
        done.push(format!(
            "installed bpf-linker {BPF_LINKER_VERSION} for LLVM {llvm_major}"
        ));
    }
    Ok(if done.is_empty() {
        Outcome::AlreadySetUp
    } else {
        Outcome::Installed(done)
    })
}

/// Links a compiler with rust-src as [`TOOLCHAIN`], installing Debian's if needed.
fn provide_compiler() -> Result<(PathBuf, String)> {
    if let Some((name, sysroot)) = nightly_with_rust_src()? {
        link_toolchain(&sysroot)?;
        return Ok((sysroot, format!("linked rustup's {name} as `{TOOLCHAIN}`")));
    }
    let debian = PathBuf::from("/usr");
    if !has_rust_src(&debian) || !debian.join("bin/cargo").exists() {
        if which("apt-get").is_none() {
            bail!(
                "no compiler with the standard library source (rust-src) for the eBPF build.\n\
                 Install one of:\n  \
                 rustup toolchain install nightly --component rust-src\n  \
                 or, on Debian/Ubuntu: apt-get install {}",
                DEBIAN_PACKAGES.join(" ")
            );
        }
        eprintln!("setup: installing Debian's Rust with its library source (about 30 s)");
        // Without a fresh package list apt may not know the packages at all.
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(DEBIAN_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("installing Debian's Rust failed: are you root?")?;
    }
    if !has_rust_src(&debian) {
        bail!(
            "{} are installed but /usr/lib/rustlib/src/rust/library is missing",
            DEBIAN_PACKAGES.join(", ")
        );
    }
    link_toolchain(&debian)?;
    Ok((
        debian,
        format!("linked Debian's Rust (/usr) as `{TOOLCHAIN}`"),
    ))
}

fn link_toolchain(sysroot: &Path) -> Result<()> {
    // Re-linking replaces a stale link (for example one to a removed nightly).
    let _ = Command::new("rustup")
        .args(["toolchain", "uninstall", TOOLCHAIN])
        .output();
    run(Command::new("rustup")
        .args(["toolchain", "link", TOOLCHAIN])
        .arg(sysroot))
}

/// The first rustup nightly whose sysroot has rust-src.
fn nightly_with_rust_src() -> Result<Option<(String, PathBuf)>> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if !name.starts_with("nightly") {
            continue;
        }
        if let Some(sysroot) = toolchain_sysroot(name)
            && has_rust_src(&sysroot)
        {
            return Ok(Some((name.to_owned(), sysroot)));
        }
    }
    Ok(None)
}

fn toolchain_sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

/// The LLVM major version of the toolchain's rustc, from `rustc -vV`.
fn llvm_major_of(toolchain: &str) -> Result<u32> {
    let verbose = output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))?;
    parse_llvm_major(&verbose)
        .with_context(|| format!("no `LLVM version` line in `rustc -vV` of {toolchain}"))
}

pub fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// Whether the installed bpf-linker was built (by cargo install) for `llvm_major`.
///
/// cargo records the features of every `cargo install` in `.crates2.json`; a
/// bpf-linker built for another LLVM would reject the compiler's bitcode.
fn bpf_linker_matches(llvm_major: u32) -> Result<bool> {
    let Some(path) = which("bpf-linker") else {
        return Ok(false);
    };
    let crates2 = cargo_home().join(".crates2.json");
    let Ok(text) = fs::read_to_string(&crates2) else {
        eprintln!(
            "setup: {} was not installed by cargo; assuming it fits LLVM {llvm_major}",
            path.display()
        );
        return Ok(true);
    };
    Ok(installed_for_llvm(&text, llvm_major))
}

pub fn installed_for_llvm(crates2_json: &str, llvm_major: u32) -> bool {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(crates2_json) else {
        return false;
    };
    let wanted = format!("llvm-{llvm_major}");
    let want_version = format!("bpf-linker {BPF_LINKER_VERSION} ");
    json["installs"].as_object().is_some_and(|installs| {
        installs.iter().any(|(id, install)| {
            id.starts_with(&want_version)
                && install["features"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f.as_str() == Some(&wanted)))
        })
    })
}

fn install_bpf_linker(workspace: &Path, sysroot: &Path, llvm_major: u32) -> Result<()> {
    let lib = find_libllvm(sysroot, llvm_major).with_context(|| {
        format!(
            "bpf-linker must link against LLVM {llvm_major} (the compiler's), \
             but no libLLVM {llvm_major} was found.\n\
             Install it (Debian/Ubuntu: apt-get install libllvm{llvm_major}) and run again."
        )
    })?;
    // bpf-linker's build looks for `<LLVM_PREFIX>/lib/libLLVM.so`.
    let prefix = workspace.join(format!("target/xtask/llvm-{llvm_major}"));
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        lib.display()
    );
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--force"])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .env("LLVM_PREFIX", &prefix))
}

fn find_libllvm(sysroot: &Path, major: u32) -> Option<PathBuf> {
    let fixed = [
        format!("/usr/lib/x86_64-linux-gnu/libLLVM-{major}.so"),
        format!("/usr/lib/aarch64-linux-gnu/libLLVM-{major}.so"),
        format!("/usr/lib/llvm-{major}/lib/libLLVM.so"),
        format!("/usr/lib/llvm-{major}/lib/libLLVM-{major}.so"),
    ];
    fixed
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            // A rustup toolchain ships its LLVM as lib/libLLVM.so.<major>...
            let prefix = format!("libLLVM.so.{major}");
            fs::read_dir(sysroot.join("lib"))
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
        })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc_vv() {
        let vv = "rustc 1.96.0 (x 2026-05-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn knows_which_llvm_bpf_linker_was_installed_for() {
        let json = r#"{"installs":{"bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":
            {"features":["llvm-22"],"all_features":false,"no_default_features":true}}}"#;
        assert!(installed_for_llvm(json, 22));
        assert!(!installed_for_llvm(json, 21));
        assert!(!installed_for_llvm("{}", 22));
        assert!(!installed_for_llvm("not json", 22));
    }
}
