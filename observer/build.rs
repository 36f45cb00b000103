//! Builds the eBPF programs (observer-ebpf) and leaves the object in OUT_DIR,
//! where src/ebpf.rs embeds it.

use std::{env, process::Command};

use aya_build::{Package, Toolchain};

/// The rustup toolchain `cargo xtask setup` provides (xtask/src/toolchain.rs).
const EBPF_TOOLCHAIN: &str = "observer-ebpf";

fn main() {
    if let Err(missing) = check_toolchain() {
        println!("cargo::error={missing}: run `cargo xtask setup`");
        return;
    }
    // Unlocks `-Z build-std=core` on a stable compiler. Set only in this build
    // script's environment, so user-space crates stay on plain stable.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // aya-build passes the inner cargo's stderr on as cargo warnings: keep
    // its progress lines ("Compiling ...") out of them; errors still show.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let package = Package {
        name: "observer-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../observer-ebpf"),
        ..Default::default()
    };
    // aya-build watches the eBPF crate's directory; the programs also build
    // on the shared vocabulary, maps and decisions.
    println!(
        "cargo::rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../observer-common")
    );
    if let Err(err) = aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN)) {
        println!("cargo::error=building the eBPF programs failed: {err:#}");
    }
}

fn check_toolchain() -> Result<(), String> {
    let rustc = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--version"])
        .output();
    if !rustc.is_ok_and(|out| out.status.success()) {
        return Err(format!("the eBPF toolchain `{EBPF_TOOLCHAIN}` is missing"));
    }
    let on_path = env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file()));
    if !on_path {
        return Err("bpf-linker is not on PATH".into());
    }
    Ok(())
}
