//! A pod from a Kubernetes manifest (a DaemonSet's template), turned into
//! what the kubelet asks of the runtime: the containers' images, commands,
//! environment (values, `fieldRef`s, `envFrom` ConfigMaps), mounts
//! (`hostPath`, `emptyDir`, `configMap` volumes), security context and
//! resources, the pod's `hostPID`, and the service account's token, as a
//! kubelet gives them. What the lab's kubelet cannot do is refused by name,
//! never ignored: a test must run what the manifest says.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec};

use super::{ContainerDef, PodDef, Resources, Security, Volume, VolumeMount, VolumeSource};
use crate::cri::api::ProfileType;

/// Where the kubelet mounts a pod's service account token.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const SERVICE_ACCOUNT_VOLUME: &str = "kube-api-access";

/// The API server pods reach, as the kubelet tells them: its address
/// (`KUBERNETES_SERVICE_HOST`, `_PORT`), the CA that signed its certificate
/// and a token.
#[derive(Clone, Debug)]
pub struct ApiServer {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    pub token: String,
}

/// A pod to run from a manifest.
pub struct Manifest<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub labels: BTreeMap<String, String>,
    pub spec: &'a PodSpec,
    /// The ConfigMaps its volumes and `envFrom` name.
    pub config_maps: &'a [ConfigMap],
    pub api: Option<&'a ApiServer>,
}

#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ManifestError {
    pub field: String,
    pub problem: String,
}

fn refuse<T>(field: impl Into<String>, problem: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError {
        field: field.into(),
        problem: problem.into(),
    })
}

/// The pod as the kubelet runs it.
pub fn pod_def(manifest: &Manifest) -> Result<PodDef, ManifestError> {
    let spec = manifest.spec;
    if spec.host_network == Some(true) {
        return refuse(
            "spec.hostNetwork",
            "the lab's pods have their own network namespace",
        );
    }
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return refuse("spec.initContainers", "not run by the lab's kubelet");
    }
    let mut volumes = Vec::new();
    for (v, volume) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{v}]");
        let source = if let Some(host) = &volume.host_path {
            VolumeSource::HostPath(host.path.clone())
        } else if let Some(empty) = &volume.empty_dir {
            VolumeSource::EmptyDir {
                memory: empty.medium.as_deref() == Some("Memory"),
                size_limit: empty.size_limit.as_ref().map(|q| q.0.clone()),
            }
        } else if let Some(config_map) = &volume.config_map {
            let data = config_map_data(manifest, &config_map.name, &field)?;
            let files = match &config_map.items {
                Some(items) => items
                    .iter()
                    .filter_map(|item| Some((item.path.clone(), data.get(&item.key)?.clone())))
                    .collect(),
                None => data,
            };
            VolumeSource::Files(files)
        } else {
            return refuse(field, "only hostPath, emptyDir and configMap volumes");
        };
        volumes.push(Volume {
            name: volume.name.clone(),
            source,
        });
    }
    let automount = spec.automount_service_account_token != Some(false);
    let service_account = manifest.api.filter(|_| automount);
    if let Some(api) = service_account {
        volumes.push(Volume {
            name: SERVICE_ACCOUNT_VOLUME.into(),
            source: VolumeSource::Files(BTreeMap::from([
                ("token".to_owned(), api.token.clone()),
                ("ca.crt".to_owned(), api.ca_pem.clone()),
                ("namespace".to_owned(), manifest.namespace.to_owned()),
            ])),
        });
    }
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(c, container)| {
            container_def(
                manifest,
                container,
                &format!("spec.containers[{c}]"),
                service_account,
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(PodDef {
        namespace: manifest.namespace.into(),
        name: manifest.name.into(),
        uid: manifest.uid.into(),
        labels: manifest.labels.clone(),
        host_pid: spec.host_pid == Some(true),
        dns: None,
        volumes,
        containers,
    })
}

fn container_def(
    manifest: &Manifest,
    container: &Container,
    field: &str,
    api: Option<&ApiServer>,
) -> Result<ContainerDef, ManifestError> {
    let Some(image) = &container.image else {
        return refuse(format!("{field}.image"), "a container needs an image");
    };
    let mut env = Vec::new();
    if let Some(api) = api {
        env.push(("KUBERNETES_SERVICE_HOST".to_owned(), api.host.clone()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), api.port.to_string()));
    }
    for (s, source) in container.env_from.iter().flatten().enumerate() {
        let Some(config_map) = &source.config_map_ref else {
            return refuse(format!("{field}.envFrom[{s}]"), "only configMapRef");
        };
        let data = config_map_data(manifest, &config_map.name, &format!("{field}.envFrom[{s}]"))?;
        let prefix = source.prefix.clone().unwrap_or_default();
        env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
    }
    for (e, var) in container.env.iter().flatten().enumerate() {
        env.push((
            var.name.clone(),
            env_value(manifest, var, &format!("{field}.env[{e}]"))?,
        ));
    }
    let mut mounts = Vec::new();
    for (m, mount) in container.volume_mounts.iter().flatten().enumerate() {
        let host_to_container = match mount.mount_propagation.as_deref() {
            None | Some("None") => false,
            Some("HostToContainer") => true,
            Some(other) => {
                return refuse(
                    format!("{field}.volumeMounts[{m}].mountPropagation"),
                    format!("{other} is not supported"),
                );
            }
        };
        mounts.push(VolumeMount {
            volume: mount.name.clone(),
            path: mount.mount_path.clone(),
            read_only: mount.read_only == Some(true),
            host_to_container,
        });
    }
    if api.is_some() {
        mounts.push(VolumeMount {
            volume: SERVICE_ACCOUNT_VOLUME.into(),
            path: SERVICE_ACCOUNT_DIR.into(),
            read_only: true,
            host_to_container: false,
        });
    }
    let context = container.security_context.clone().unwrap_or_default();
    if context.privileged == Some(true) {
        return refuse(
            format!("{field}.securityContext.privileged"),
            "not run by the lab",
        );
    }
    let capabilities = context.capabilities.unwrap_or_default();
    let profile = |kind: Option<&str>, what: &str| match kind {
        None => Ok(None),
        Some("RuntimeDefault") => Ok(Some(ProfileType::RuntimeDefault)),
        Some("Unconfined") => Ok(Some(ProfileType::Unconfined)),
        Some(other) => refuse(
            format!("{field}.securityContext.{what}"),
            format!("{other} profiles are not supported"),
        ),
    };
    let resources = container.resources.clone().unwrap_or_default();
    let quantities =
        |map: Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            map.unwrap_or_default()
                .into_iter()
                .map(|(k, q)| (k, q.0))
                .collect()
        };
    Ok(ContainerDef {
        name: container.name.clone(),
        image: image.clone(),
        command: container.command.clone().unwrap_or_default(),
        args: container.args.clone().unwrap_or_default(),
        env,
        mounts,
        security: Security {
            run_as_user: context.run_as_user,
            read_only_root: context.read_only_root_filesystem == Some(true),
            no_new_privileges: context.allow_privilege_escalation == Some(false),
            add_capabilities: capabilities.add.unwrap_or_default(),
            drop_capabilities: capabilities.drop.unwrap_or_default(),
            seccomp: profile(
                context.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
                "seccompProfile",
            )?,
            apparmor: profile(
                context.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
                "appArmorProfile",
            )?,
        },
        resources: Resources {
            requests: quantities(resources.requests),
            limits: quantities(resources.limits),
        },
    })
}

/// A variable's value: literal, or one of the pod's fields.
fn env_value(manifest: &Manifest, var: &EnvVar, field: &str) -> Result<String, ManifestError> {
    if let Some(value) = &var.value {
        return Ok(value.clone());
    }
    let Some(path) = var
        .value_from
        .as_ref()
        .and_then(|from| from.field_ref.as_ref())
        .map(|r| r.field_path.as_str())
    else {
        return refuse(field, "only values and fieldRefs");
    };
    Ok(match path {
        "spec.nodeName" => manifest.node.into(),
        "metadata.name" => manifest.name.into(),
        "metadata.namespace" => manifest.namespace.into(),
        "metadata.uid" => manifest.uid.into(),
        other => return refuse(field, format!("the field {other} is not supported")),
    })
}

fn config_map_data(
    manifest: &Manifest,
    name: &str,
    field: &str,
) -> Result<BTreeMap<String, String>, ManifestError> {
    manifest
        .config_maps
        .iter()
        .find(|c| {
            c.metadata.name.as_deref() == Some(name)
                && c.metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(manifest.namespace)
                    == manifest.namespace
        })
        .map(|c| c.data.clone().unwrap_or_default())
        .map_or_else(
            || refuse(field, format!("no ConfigMap {}/{name}", manifest.namespace)),
            Ok,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_norway::from_str(yaml).unwrap()
    }

    fn manifest<'a>(spec: &'a PodSpec, config_maps: &'a [ConfigMap]) -> Manifest<'a> {
        Manifest {
            namespace: "observer",
            name: "observer-node-1",
            uid: "u",
            node: "node-1",
            labels: BTreeMap::new(),
            spec,
            config_maps,
            api: None,
        }
    }

    #[test]
    fn reads_what_the_kubelet_reads() {
        let spec = spec(
            "hostPID: true\n\
             containers:\n\
             - name: observer\n  image: observer:0.1.0\n  args: [run]\n\
             \x20 envFrom: [{configMapRef: {name: config}}]\n\
             \x20 env: [{name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]\n\
             \x20 resources: {requests: {cpu: 100m}}\n\
             \x20 securityContext:\n\
             \x20   readOnlyRootFilesystem: true\n\
             \x20   allowPrivilegeEscalation: false\n\
             \x20   capabilities: {drop: [ALL], add: [BPF]}\n\
             \x20   seccompProfile: {type: RuntimeDefault}\n\
             \x20 volumeMounts:\n\
             \x20 - {name: netns, mountPath: /var/run/netns, readOnly: true, mountPropagation: HostToContainer}\n\
             volumes:\n\
             - {name: netns, hostPath: {path: /var/run/netns}}\n\
             - {name: runtime, emptyDir: {medium: Memory, sizeLimit: 1Mi}}\n",
        );
        let config: ConfigMap = serde_norway::from_str(
            "metadata: {name: config, namespace: observer}\ndata: {OBSERVER_LOG: info}",
        )
        .unwrap();
        let def = pod_def(&manifest(&spec, &[config])).unwrap();
        assert!(def.host_pid);
        let c = &def.containers[0];
        assert_eq!(c.args, ["run"]);
        assert!(c.env.contains(&("OBSERVER_LOG".into(), "info".into())));
        assert!(c.env.contains(&("NODE_NAME".into(), "node-1".into())));
        assert!(c.security.read_only_root && c.security.no_new_privileges);
        assert_eq!(c.security.add_capabilities, ["BPF"]);
        assert_eq!(c.security.seccomp, Some(ProfileType::RuntimeDefault));
        assert!(c.mounts[0].host_to_container && c.mounts[0].read_only);
        assert!(matches!(
            &def.volumes[1].source,
            VolumeSource::EmptyDir { memory: true, size_limit: Some(s) } if s == "1Mi"
        ));
        assert_eq!(
            Qos::of(def.containers.iter().map(|c| &c.resources)),
            Qos::Burstable
        );
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let host_network = spec("hostNetwork: true\ncontainers: [{name: c, image: i}]");
        let err = pod_def(&manifest(&host_network, &[])).unwrap_err();
        assert_eq!(err.field, "spec.hostNetwork");
        let missing =
            spec("containers: [{name: c, image: i, envFrom: [{configMapRef: {name: nope}}]}]");
        let err = pod_def(&manifest(&missing, &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.containers[0].envFrom[0]: no ConfigMap observer/nope"
        );
        let field = spec(
            "containers: [{name: c, image: i, env: [{name: X, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}]}]",
        );
        assert!(
            pod_def(&manifest(&field, &[]))
                .unwrap_err()
                .problem
                .contains("status.hostIP")
        );
    }

    use super::super::Qos;
}
