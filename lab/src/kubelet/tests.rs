use super::{config::*, *};
use crate::cri::api::NamespaceMode;

fn pod() -> PodDef {
    PodDef {
        namespace: "observer".into(),
        name: "observer-x".into(),
        uid: "u-1".into(),
        host_pid: true,
        volumes: vec![
            Volume {
                name: "cgroup".into(),
                source: VolumeSource::HostPath("/sys/fs/cgroup".into()),
            },
            Volume {
                name: "policy".into(),
                source: VolumeSource::Files(BTreeMap::new()),
            },
        ],
        containers: vec![ContainerDef {
            name: "observer".into(),
            image: "observer:0.1.0".into(),
            mounts: vec![
                VolumeMount {
                    volume: "cgroup".into(),
                    path: "/sys/fs/cgroup".into(),
                    read_only: true,
                    host_to_container: false,
                },
                VolumeMount {
                    volume: "policy".into(),
                    path: "/etc/observer/policy".into(),
                    read_only: true,
                    host_to_container: false,
                },
            ],
            security: Security {
                read_only_root: true,
                no_new_privileges: true,
                add_capabilities: vec!["BPF".into()],
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            },
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn host_pid_shares_the_nodes_pid_namespace_only() {
    let pod = pod();
    let config = sandbox_config(&pod, "/lab/kubepods/besteffort/podu-1");
    let linux = config.linux.unwrap();
    assert_eq!(linux.cgroup_parent, "/lab/kubepods/besteffort/podu-1");
    let ns = linux.security_context.unwrap().namespace_options.unwrap();
    assert_eq!(ns.pid, NamespaceMode::Node as i32);
    assert_eq!(ns.network, NamespaceMode::Pod as i32);
    assert_eq!(
        config.log_directory,
        "/var/log/pods/observer_observer-x_u-1"
    );
}

#[test]
fn containers_get_their_volumes_and_security_context() {
    let pod = pod();
    let config = container_config(&pod, &pod.containers[0], 2, "/v");
    assert_eq!(config.mounts[0].host_path, "/sys/fs/cgroup");
    assert_eq!(
        config.mounts[1].host_path,
        "/v/kubernetes.io~configmap/policy"
    );
    assert!(config.mounts.iter().all(|m| m.readonly));
    let security = config.linux.unwrap().security_context.unwrap();
    assert!(security.readonly_rootfs && security.no_new_privs);
    assert_eq!(security.capabilities.unwrap().drop_capabilities, ["ALL"]);
    assert_eq!(config.log_path, "observer/2.log");
    assert_eq!(config.labels["io.kubernetes.container.name"], "observer");
}
