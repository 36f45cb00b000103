//! Containers found by runtime id through /proc, as Kubernetes mode will
//! find the pods of a node: checked against the node lab's real containers.

use std::{fs, os::unix::fs::MetadataExt};

use integration_test::observer::run_to_exit;
use lab::{Lab, Plan};

#[test]
fn finds_every_container_of_the_lab_by_its_id() {
    let lab = Lab::up_for_test(&Plan::default_lab()).expect("lab up");
    let mut ids = Vec::new();
    for pod in &lab.inventory().pods {
        for container in &pod.containers {
            ids.push(format!("containerd://{}", container.id));
        }
    }
    let mut args = vec!["find-container"];
    args.extend(ids.iter().map(String::as_str));
    let out = std::process::Command::new(integration_test::observer::binary())
        .args(&args)
        .output()
        .expect("observer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for pod in &lab.inventory().pods {
        let pod_netns = fs::metadata(pod.netns.as_ref().unwrap()).unwrap().ino();
        for container in &pod.containers {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(&container.id))
                .unwrap_or_else(|| panic!("{} not found:\n{stdout}", container.name));
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(field("cgroup="), container.cgroup.display().to_string());
            let netns = fs::metadata(field("netns=")).unwrap().ino();
            assert_eq!(
                netns, pod_netns,
                "{}/{} {}",
                pod.namespace, pod.name, container.name
            );
        }
    }
}

#[test]
fn an_unknown_container_is_named() {
    let id = "0".repeat(64);
    let (status, stderr) = run_to_exit(&["find-container", &format!("cri-o://{id}")]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("no running container with id {id}")),
        "{stderr}"
    );
}
