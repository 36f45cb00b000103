//! Changing the pods of a running lab, as a kubelet is asked to: a
//! container restarted, a pod deleted or made again (its sandbox alone at
//! first), an image loaded and a pod run from a manifest (the DaemonSet's).
//! The inventory follows each change.

use super::*;

/// A pod from a manifest, for [`Lab::run_manifest_pod`].
#[derive(Clone, Debug)]
pub struct ManifestPod {
    pub namespace: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub spec: k8s_openapi::api::core::v1::PodSpec,
    /// The ConfigMaps its volumes and environment name.
    pub config_maps: Vec<k8s_openapi::api::core::v1::ConfigMap>,
    /// The API server the kubelet tells the pod of, with a token.
    pub api: Option<ApiServer>,
}

impl Lab {
    /// containerd runtime: what the kubelet does when a container exited: a
    /// new container in the pod (new id, new cgroup). Returns the pod as it
    /// is now.
    pub fn restart_container(
        &mut self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Pod, LabError> {
        let spec = self.known_pod(namespace, pod)?;
        let described = self.cri()?.restart_container(&spec, container)?;
        self.wait_listening(std::slice::from_ref(&described))?;
        Ok(self.record(described))
    }

    /// containerd runtime: deletes a pod (its containers, its sandbox).
    pub fn delete_pod(&mut self, namespace: &str, pod: &str) -> Result<(), LabError> {
        let spec = self.known_pod(namespace, pod)?;
        self.cri()?.delete_pod(&spec)?;
        self.inventory
            .pods
            .retain(|p| !(p.namespace == namespace && p.name == pod));
        Ok(())
    }

    /// containerd runtime: makes a pod of the lab file again (a new UID),
    /// after [`Lab::delete_pod`]; with `sandbox_only`, only its sandbox (the
    /// pod's state between RunPodSandbox and its first container), until
    /// [`Lab::start_containers`].
    pub fn create_pod(
        &mut self,
        namespace: &str,
        pod: &str,
        sandbox_only: bool,
    ) -> Result<Pod, LabError> {
        let spec = self.known_pod(namespace, pod)?;
        let index = self
            .plan
            .spec
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == pod)
            .expect("known");
        let ip = self.plan.pod_ips[index];
        let services = self.inventory.services.clone();
        let described = self.cri()?.start_pod(&spec, ip, &services, sandbox_only)?;
        self.wait_listening(std::slice::from_ref(&described))?;
        Ok(self.record(described))
    }

    /// containerd runtime: starts the containers of a pod made with
    /// `sandbox_only`.
    pub fn start_containers(&mut self, namespace: &str, pod: &str) -> Result<Pod, LabError> {
        let spec = self.known_pod(namespace, pod)?;
        let described = self.cri()?.start_containers(&spec)?;
        self.wait_listening(std::slice::from_ref(&described))?;
        Ok(self.record(described))
    }

    /// containerd runtime: loads an image (an OCI archive) into every
    /// node, as pulling it would.
    pub fn load_image(&self, archive: &Path) -> Result<(), LabError> {
        self.nodes
            .as_ref()
            .ok_or(LabError::NotContainerd)?
            .load_image(archive)
    }

    /// containerd runtime: runs a pod from a manifest (a DaemonSet's pod)
    /// on `node`, as its kubelet would, at a free address of the node's.
    /// It is not one of the lab's pods: not in the inventory.
    pub fn run_manifest_pod(&mut self, node: &str, pod: &ManifestPod) -> Result<Pod, LabError> {
        let n = self
            .plan
            .spec
            .nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| LabError::NoSuchPod(format!("node {node}")))?;
        // The node's last free address: away from the lab file's pods.
        let cidr = self.plan.spec.nodes[n].pod_cidr.trunc();
        let taken: Vec<_> = self.plan.pod_ips.clone();
        let ip = cidr
            .hosts()
            .rev()
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| LabError::NoSuchPod(format!("a free address on {node}")))?;
        let uid = runtime::uid(&self.name, &pod.namespace, &pod.name, 0);
        let manifest = Manifest {
            namespace: &pod.namespace,
            name: &pod.name,
            uid: &uid,
            node,
            labels: pod.labels.clone(),
            spec: &pod.spec,
            config_maps: &pod.config_maps,
            api: pod.api.as_ref(),
        };
        self.cri()?.run_manifest(node, &manifest, ip)
    }

    /// containerd runtime: deletes a pod run from a manifest.
    pub fn delete_manifest_pod(&mut self, namespace: &str, name: &str) -> Result<(), LabError> {
        self.cri()?.delete_manifest(namespace, name)
    }

    /// containerd runtime: how many times each container of the pod was
    /// restarted.
    pub fn restarts(&self, namespace: &str, pod: &str) -> std::collections::BTreeMap<String, u32> {
        match (&self.nodes, self.pod_spec(namespace, pod)) {
            (Some(nodes), Some(spec)) => nodes.restarts(spec),
            _ => Default::default(),
        }
    }

    pub(super) fn pod_spec(&self, namespace: &str, pod: &str) -> Option<&PodSpec> {
        self.plan
            .spec
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == pod)
    }

    fn known_pod(&self, namespace: &str, pod: &str) -> Result<PodSpec, LabError> {
        self.pod_spec(namespace, pod)
            .cloned()
            .ok_or_else(|| LabError::NoSuchPod(format!("{namespace}/{pod}")))
    }

    fn cri(&mut self) -> Result<&mut runtime::cri::Nodes, LabError> {
        self.nodes.as_mut().ok_or(LabError::NotContainerd)
    }

    /// Puts the pod, as it is now, in the inventory (and its file).
    fn record(&mut self, pod: Pod) -> Pod {
        let pods = &mut self.inventory.pods;
        match pods
            .iter_mut()
            .find(|p| p.namespace == pod.namespace && p.name == pod.name)
        {
            Some(entry) => *entry = pod.clone(),
            None => pods.push(pod.clone()),
        }
        let json = serde_json::to_string_pretty(&self.inventory).expect("serializable");
        if let Err(err) = fs::write(self.inventory_path(), json) {
            eprintln!("lab {}: writing the inventory: {err}", self.name);
        }
        pod
    }
}
