//! Builds the lab's socket load balancer (lab-ebpf) and leaves the object
//! in OUT_DIR, where src/socket_lb.rs embeds it.
//!
//! Unlike the observer's, this build does not fail without the eBPF
//! toolchain: `cargo xtask` (which sets the toolchain up) is built with
//! the lab. The object is then empty, and only a lab with the socket-lb
//! dataplane refuses to come up, saying to run `cargo xtask setup`.

use std::{env, path::PathBuf, process::Command};

use aya_build::{Package, Toolchain};

/// The rustup toolchain `cargo xtask setup` provides (xtask/src/toolchain.rs).
const EBPF_TOOLCHAIN: &str = "observer-ebpf";
const OBJECT: &str = "lab-socket-lb";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo::rerun-if-changed=../lab-ebpf/src");
    if !toolchain_ready() {
        println!(
            "cargo::warning=the eBPF toolchain is not set up (`cargo xtask setup`): the lab's socket-lb dataplane is left out"
        );
        std::fs::write(out.join(OBJECT), []).expect("writing OUT_DIR");
        return;
    }
    // SAFETY: build scripts are single-threaded at this point; see
    // observer/build.rs for why these are set.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let package = Package {
        name: "lab-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lab-ebpf"),
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN)) {
        println!("cargo::error=building the lab's socket load balancer failed: {err:#}");
    }
}

fn toolchain_ready() -> bool {
    let rustc = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--version"])
        .output();
    rustc.is_ok_and(|out| out.status.success())
        && env::var_os("PATH").is_some_and(|paths| {
            env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file())
        })
}
