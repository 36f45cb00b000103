use super::*;

const ID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904d1a1b7c0a4f6a8ecb1234567";

#[test]
fn reads_ids_from_pod_status() {
    assert_eq!(status_id(&format!("containerd://{ID}")), Some(ID));
    assert_eq!(status_id(&format!("cri-o://{ID}")), Some(ID));
    assert_eq!(status_id(&format!("docker://{ID}")), Some(ID));
    assert_eq!(status_id(ID), None, "no runtime");
    assert_eq!(status_id("containerd://short"), None);
}

#[test]
fn finds_ids_in_every_runtime_layout() {
    let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice";
    for path in [
        format!("/{pod}/cri-containerd-{ID}.scope"),
        format!("/{pod}/crio-{ID}.scope"),
        format!("/{pod}/docker-{ID}.scope"),
        format!("/{pod}/libpod-{ID}.scope"),
        format!("/kubepods/burstable/pod1234/{ID}"),
    ] {
        assert_eq!(id_in_cgroup(&path), Some(ID), "{path}");
    }
    assert_eq!(id_in_cgroup(&format!("/{pod}")), None);
    assert_eq!(id_in_cgroup("/user.slice/session-1.scope"), None);
    assert_eq!(id_in_cgroup("/"), None);
}

#[test]
fn finds_pod_uids_in_every_cgroup_driver() {
    let uid = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
    let underscored = uid.replace('-', "_");
    for path in [
        format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-{ID}.scope"
        ),
        format!("/kubepods.slice/kubepods-pod{underscored}.slice/crio-{ID}.scope"),
        format!("/kubepods/burstable/pod{uid}/{ID}"),
        format!("/obslab-x/kubepods/besteffort/pod{uid}/{ID}"),
        format!("/kubepods/pod{uid}"),
        // In a cgroup namespace of its own, relative to its root.
        format!("/../../kubepods/besteffort/pod{uid}/{ID}"),
    ] {
        assert_eq!(pod_uid_in_cgroup(&path).as_deref(), Some(uid), "{path}");
    }
    for path in [
        "/kubepods.slice/kubepods-besteffort.slice",
        "/system.slice/containerd.service",
        "/kubepods/burstable/podnot-a-uid",
        "/kubepods/burstable/pod1234",
        "/",
    ] {
        assert_eq!(pod_uid_in_cgroup(path), None, "{path}");
    }
}

#[test]
fn static_pods_go_by_their_config_hash() {
    let hash = "6e9a1d2c3b4a5f60718293a4b5c6d7e8";
    assert_eq!(
        pod_uid_in_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice"
        ))
        .as_deref(),
        Some(hash)
    );
    assert_eq!(
        pod_uid_in_cgroup(&format!("/kubepods/burstable/pod{hash}/{ID}")).as_deref(),
        Some(hash)
    );
}

#[test]
fn conmon_is_not_a_container() {
    // CRI-O's monitor may live in the pod's cgroup, in the node's netns.
    let path = format!("/kubepods.slice/kubepods-pod1234.slice/crio-conmon-{ID}.scope");
    assert_eq!(id_in_cgroup(&path), None);
}

/// A stand-in for /proc: `(pid, cgroup file, network namespace file)`.
fn fake_proc(name: &str, processes: &[(u32, String, &str)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!("observer-proc-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    for (pid, cgroup, netns) in processes {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("ns")).unwrap();
        fs::write(dir.join("cgroup"), cgroup).unwrap();
        let netns = root.join(netns);
        if !netns.exists() {
            fs::write(&netns, "").unwrap();
        }
        fs::hard_link(&netns, dir.join("ns/net")).unwrap();
    }
    root
}

#[test]
fn finds_pods_by_their_container_processes_only() {
    let uid = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
    let slice = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    );
    let other = "4b825dc642cb6eb9a060e54bf8d69288fbee4904d1a1b7c0a4f6a8ecb7654321";
    let root = fake_proc(
        "pods",
        &[
            // CRI-O's conmon, first, in the node's namespace.
            (
                5,
                format!("0::{slice}/crio-conmon-{ID}.scope\n"),
                "host-netns",
            ),
            // A container process that shares the node's namespace.
            (6, format!("0::{slice}/crio-{other}.scope\n"), "host-netns"),
            (7, format!("0::{slice}/crio-{ID}.scope\n"), "pod-netns"),
            (8, "0::/system.slice/sshd.service\n".into(), "host-netns"),
        ],
    );
    let host = netns_id(&root.join("host-netns"));
    let found = find_pods(&root, Path::new("/cg"), &HashSet::from([uid]), host);
    let pod = &found[uid];
    assert_eq!(pod.netns, root.join("7/ns/net"));
    assert_eq!(pod.containers.len(), 1, "{pod:?}");
    assert_eq!(
        pod.containers[ID],
        Path::new("/cg").join(format!("{}/crio-{ID}.scope", &slice[1..]))
    );
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn finds_pods_through_cgroup_v1_lines_too() {
    let uid = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
    let root = fake_proc(
        "v1",
        &[(
            9,
            format!("12:memory:/kubepods/besteffort/pod{uid}/{ID}\n0::/\n"),
            "pod-netns",
        )],
    );
    let found = find_pods(&root, Path::new("/cg"), &HashSet::from([uid]), None);
    assert_eq!(found[uid].netns, root.join("9/ns/net"));
    assert!(
        found[uid].containers.is_empty(),
        "no cgroup v2 directory to name"
    );
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn finds_nothing_for_unknown_ids() {
    let found = find(Path::new("/proc"), Path::new("/sys/fs/cgroup"), &[ID]);
    assert!(found.is_empty());
}

#[test]
fn a_pods_namespace_is_named_by_its_oldest_process() {
    let uid = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
    let line = format!("0::/kubepods/besteffort/pod{uid}/{ID}\n");
    // PIDs recycled: the lowest is the newest (a `sleep` of a shell loop).
    let root = fake_proc(
        "oldest",
        &[(3, line.clone(), "pod-netns"), (900, line, "pod-netns")],
    );
    let stat = |pid: u32, started: u64| {
        let fields: Vec<String> = (3..=21).map(|f| f.to_string()).collect();
        let text = format!("{pid} (sh (x)) {} {started} 23\n", fields[..19].join(" "));
        fs::write(root.join(pid.to_string()).join("stat"), text).unwrap();
    };
    stat(3, 5_000);
    stat(900, 100);
    let found = find_pods(&root, Path::new("/cg"), &HashSet::from([uid]), None);
    assert_eq!(found[uid].netns, root.join("900/ns/net"));
    assert_eq!(start_time(&root, 3), Some(5_000));
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn a_path_is_checked_again_once_its_namespace_is_open() {
    let dir = std::env::temp_dir().join(format!("observer-recheck-{}", std::process::id()));
    let pid = dir.join("4242");
    std::fs::create_dir_all(pid.join("ns")).unwrap();
    std::os::unix::fs::symlink("/proc/self/ns/net", pid.join("ns/net")).unwrap();
    let path = pid.join("ns/net");
    let uid = "0f3c9a7e-1111-2222-3333-444455556666";
    let opened = netns_id(&path);
    let other = Some((0, 1));
    std::fs::write(
        pid.join("cgroup"),
        format!("0::/kubepods/besteffort/pod{uid}/{}\n", "a".repeat(64)),
    )
    .unwrap();
    assert!(
        still_the_pods(&path, opened, uid, other),
        "the pod's process"
    );
    assert!(
        !still_the_pods(&path, opened, uid, opened),
        "the node's own namespace, never"
    );
    assert!(!still_the_pods(&path, None, uid, other), "nothing opened");
    // The PID went to a process of the node's, or of another pod.
    std::fs::write(pid.join("cgroup"), "0::/system.slice/sshd.service\n").unwrap();
    assert!(!still_the_pods(&path, opened, uid, other));
    std::fs::write(
        pid.join("cgroup"),
        "0::/kubepods/besteffort/pod99999999-1111-2222-3333-444455556666/x\n",
    )
    .unwrap();
    assert!(!still_the_pods(&path, opened, uid, other));
    std::fs::remove_file(pid.join("cgroup")).unwrap();
    assert!(!still_the_pods(&path, opened, uid, other), "gone");
    let _ = std::fs::remove_dir_all(&dir);
}
