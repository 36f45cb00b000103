//! Bad input gets one clear line and a non-zero exit.

use std::net::TcpListener;

use integration_test::TempDir;
use integration_test::observer::{run_to_exit, run_to_exit_as};
use lab::Netns;

/// Exactly one `error:` line, which contains `expected`.
fn assert_one_error_line(stderr: &str, expected: &str) {
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0].contains(expected),
        "expected `{expected}` in: {}",
        errors[0]
    );
}

#[test]
fn a_missing_namespace_is_named() {
    let (status, stderr) = run_to_exit(&["run", "--netns", "/var/run/netns/no-such-pod"]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(
        &stderr,
        "network namespace /var/run/netns/no-such-pod: no such file",
    );
}

#[test]
fn a_file_that_is_not_a_network_namespace_is_refused() {
    let (status, stderr) = run_to_exit(&["run", "--netns", "/proc/self/ns/mnt"]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(&stderr, "/proc/self/ns/mnt is not a network namespace");
    let (status, stderr) = run_to_exit(&["run", "--netns", "/etc/hostname"]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(&stderr, "/etc/hostname is not a network namespace");
}

#[test]
fn an_address_in_use_is_named() {
    let pod = Netns::create("addr").expect("namespace");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let path = pod.path().display().to_string();
    let (status, stderr) = run_to_exit(&["run", "--netns", &path, "--metrics-addr", &addr]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(&stderr, &format!("cannot listen on {addr}"));
}

#[test]
fn no_permission_to_load_ebpf_is_explained() {
    let empty = std::env::temp_dir().join(format!("observer-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let dir = empty.display().to_string();
    // As `nobody`: no capabilities, so the kernel refuses to load programs.
    let (status, stderr) = run_to_exit_as(
        &["run", "--netns-dir", &dir, "--metrics-addr", "127.0.0.1:0"],
        Some(65534),
    );
    let _ = std::fs::remove_dir(&empty);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.lines().filter(|l| l.starts_with("error:")).count() == 1,
        "{stderr}"
    );
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let (status, stderr) = run_to_exit(&["run", "--no-such-flag"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

#[test]
fn kubernetes_mode_without_a_kubeconfig_or_node_is_explained() {
    let (status, stderr) = run_to_exit(&[
        "run",
        "--kubernetes",
        "--node",
        "node-1",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(
        &stderr,
        "cannot read the kubeconfig /nonexistent/kubeconfig",
    );
    assert!(
        !stderr.contains("serving metrics"),
        "refused before starting: {stderr}"
    );

    let (status, stderr) = run_to_exit(&["run", "--kubernetes", "--node", ""]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(&stderr, "--kubernetes needs this node's name");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let pod = Netns::create("json").expect("namespace");
    let path = pod.path().display().to_string();
    let observer = integration_test::Observer::start(&["--log-format", "json", "--netns", &path]);
    let log = observer.log();
    assert!(observer.terminate().success());
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn a_configuration_file_sets_flags_and_flags_win() {
    let pod = Netns::create("config").expect("namespace");
    let path = pod.path().display().to_string();
    let dir = TempDir::new("config");
    let config = dir.write(
        "observer.yaml",
        &format!("netns: [{path}]\nflow-capacity: 1234\nlog-format: json\n"),
    );
    let config = config.as_str();
    let observer = integration_test::Observer::start(&["--config", config]);
    let m = observer.scrape();
    assert_eq!(m.sum("observer_flow_map_capacity", &[]), 1234.0);
    assert_eq!(
        m.sum("observer_programs_attached", &[("pod", pod.name())]),
        1.0
    );
    assert!(
        observer.log().starts_with('{'),
        "json logs: {}",
        observer.log()
    );
    assert!(observer.terminate().success());

    let observer =
        integration_test::Observer::start(&["--config", config, "--flow-capacity", "4321"]);
    assert_eq!(
        observer.scrape().sum("observer_flow_map_capacity", &[]),
        4321.0
    );
    assert!(observer.terminate().success());

    let bad = dir.write("bad.yaml", "flow-capacity: 1\ncolour: red\n");
    let (status, stderr) = run_to_exit(&["run", "--config", &bad]);
    assert_eq!(status.code(), Some(1));
    assert_one_error_line(&stderr, &format!("{bad}: `colour` is not a setting"));
}
