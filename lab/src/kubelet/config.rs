//! What the kubelet asks CRI for: the pod sandbox's config (cgroup
//! parent, namespaces, DNS, labels) and each container's (image, command,
//! mounts, security context, log path), and where volumes and logs live.

use std::collections::BTreeMap;

use super::{ContainerDef, PodDef, Volume, VolumeSource};
use crate::cri::api::{self, NamespaceMode};

pub(super) fn pod_name(def: &PodDef) -> String {
    format!("{}/{}", def.namespace, def.name)
}

/// Where a volume lives in the node, as the kubelet lays it out.
pub(super) fn volume_path(volume_dir: &str, volume: &Volume) -> Option<String> {
    let kind = match &volume.source {
        VolumeSource::EmptyDir { .. } => "kubernetes.io~empty-dir",
        VolumeSource::Files(_) => "kubernetes.io~configmap",
        VolumeSource::HostPath(_) => return None,
    };
    Some(format!("{volume_dir}/{kind}/{}", volume.name))
}

/// `<container>/<restarts>.log`, below the pod's log directory.
pub(super) fn log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

/// The namespaces of the pod's sandbox and containers.
pub(super) fn namespaces(def: &PodDef) -> api::NamespaceOption {
    api::NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: if def.host_pid {
            NamespaceMode::Node
        } else {
            NamespaceMode::Container
        } as i32,
        ipc: NamespaceMode::Pod as i32,
    }
}

/// The sandbox as the kubelet asks for it.
pub(super) fn sandbox_config(def: &PodDef, cgroup_parent: &str) -> api::PodSandboxConfig {
    let mut labels = def.labels.clone();
    labels.extend(kubernetes_labels(def));
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: def.name.clone(),
            uid: def.uid.clone(),
            namespace: def.namespace.clone(),
            attempt: 0,
        }),
        hostname: def.name.clone(),
        log_directory: format!("/var/log/pods/{}_{}_{}", def.namespace, def.name, def.uid),
        dns_config: def.dns.clone(),
        labels,
        annotations: BTreeMap::new(),
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces(def)),
                ..Default::default()
            }),
            sysctls: BTreeMap::new(),
        }),
    }
}

/// The labels the kubelet puts on every sandbox and container.
pub(super) fn kubernetes_labels(def: &PodDef) -> [(String, String); 3] {
    [
        ("io.kubernetes.pod.name".into(), def.name.clone()),
        ("io.kubernetes.pod.namespace".into(), def.namespace.clone()),
        ("io.kubernetes.pod.uid".into(), def.uid.clone()),
    ]
}

/// A container as the kubelet asks for it.
pub(super) fn container_config(
    pod: &PodDef,
    def: &ContainerDef,
    attempt: u32,
    volume_dir: &str,
) -> api::ContainerConfig {
    let mut labels: BTreeMap<String, String> = kubernetes_labels(pod).into_iter().collect();
    labels.insert("io.kubernetes.container.name".into(), def.name.clone());
    let mounts = def
        .mounts
        .iter()
        .filter_map(|m| {
            let volume = pod.volumes.iter().find(|v| v.name == m.volume)?;
            let host_path = match &volume.source {
                VolumeSource::HostPath(path) => path.clone(),
                _ => volume_path(volume_dir, volume)?,
            };
            Some(api::Mount {
                container_path: m.path.clone(),
                host_path,
                readonly: m.read_only,
                propagation: if m.host_to_container {
                    api::MountPropagation::HostToContainer
                } else {
                    api::MountPropagation::Private
                } as i32,
            })
        })
        .collect();
    let security = &def.security;
    let profile = |kind: Option<api::ProfileType>| {
        kind.map(|kind| api::SecurityProfile {
            profile_type: kind as i32,
            localhost_ref: String::new(),
        })
    };
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: def.name.clone(),
            attempt,
        }),
        image: Some(api::ImageSpec {
            image: def.image.clone(),
        }),
        command: def.command.clone(),
        args: def.args.clone(),
        working_dir: String::new(),
        envs: def
            .env
            .iter()
            .map(|(key, value)| api::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts,
        labels,
        annotations: [(
            "io.kubernetes.container.restartCount".to_owned(),
            attempt.to_string(),
        )]
        .into(),
        log_path: log_path(&def.name, attempt),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                capabilities: Some(api::Capability {
                    add_capabilities: security.add_capabilities.clone(),
                    drop_capabilities: security.drop_capabilities.clone(),
                }),
                privileged: false,
                namespace_options: Some(namespaces(pod)),
                run_as_user: security.run_as_user.map(|value| api::Int64Value { value }),
                readonly_rootfs: security.read_only_root,
                no_new_privs: security.no_new_privileges,
                run_as_group: security.run_as_user.map(|value| api::Int64Value { value }),
                seccomp: profile(security.seccomp),
                apparmor: profile(security.apparmor),
            }),
        }),
    }
}
