//! `cargo xtask test`: unit tests, then the end-to-end tests against the
//! kernel, with one closing `N passed, N failed` line for both.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{cargo, is_root};

/// The images the end-to-end tests run: the lab's workload image, and the
/// observer's around the binary under test.
pub struct Images {
    pub lab: PathBuf,
    pub observer: PathBuf,
}

pub fn run_all(
    workspace: &Path,
    observer: &Path,
    images: &Images,
    filter: Option<&str>,
) -> Result<()> {
    let mut tally = Tally::default();
    // Unit tests: everything but the end-to-end crate and the eBPF crate.
    let unit = tally.run(cargo(workspace).args(["test", "--workspace"]).args([
        "--exclude",
        "integration-test",
        "--exclude",
        "observer-ebpf",
        "--exclude",
        "lab-ebpf",
    ]));
    // Namespaces of an earlier run that was killed.
    for stale in lab::cleanup_stale() {
        eprintln!("test: removed {stale} of a killed run");
    }
    // End to end, as root and one at a time: the tests share the kernel.
    let mut command = cargo(workspace);
    command
        .args(["test", "--package", "integration-test"])
        .env("OBSERVER_BIN", observer)
        .env(lab::LAB_IMAGE_ENV, &images.lab)
        .env("OBSERVER_IMAGE", &images.observer);
    if !is_root() {
        command.args(["--config", "target.'cfg(all())'.runner='sudo -E'"]);
    }
    command.args(["--", "--test-threads=1"]);
    if let Some(filter) = filter {
        command.arg(filter);
    }
    let end_to_end = tally.run(&mut command);
    // The manifests: each valid resource counts as a test passed.
    let deploy = crate::deploy::check(workspace);
    match &deploy {
        Ok((passed, problems)) => {
            tally.passed += passed;
            tally.failed += problems;
        }
        Err(_) => tally.failed += 1,
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    unit.context("unit tests failed")?;
    end_to_end.context("end-to-end tests failed")?;
    match deploy? {
        (_, 0) => Ok(()),
        (_, problems) => anyhow::bail!("deploy/: {problems} manifest problems"),
    }
}

/// Adds up cargo test's `test result:` lines, passing the output through.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn run(&mut self, command: &mut Command) -> Result<()> {
        use std::io::{BufRead as _, BufReader};
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {command:?}"))?;
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some((passed, failed)) = parse_test_result(&line) {
                self.passed += passed;
                self.failed += failed;
            }
        }
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "{command:?} failed: {status}");
        Ok(())
    }
}

/// `test result: ok. 8 passed; 1 failed; ...` -> (8, 1).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .split_whitespace()
                .last()?
                .parse()
                .ok()
        })
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn reads_cargo_test_summaries() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 8 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s"
            ),
            Some((8, 0))
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 1 passed; 2 failed; 0 ignored"),
            Some((1, 2))
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
