//! A CRI client: the calls a kubelet makes to its container runtime, over
//! gRPC on the runtime's unix socket. Blocking (the lab is synchronous):
//! each call runs on a small runtime of the client's own.

pub mod api;

use std::{path::Path, time::Duration};

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tonic::{
    Request,
    client::Grpc,
    transport::{Channel, Endpoint},
};

use api::*;

/// Long enough for a sandbox with its network, short enough that a stuck
/// runtime fails a test instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot reach the runtime at {socket}: {source}")]
    Connect {
        socket: String,
        source: tonic::transport::Error,
    },
    #[error("{method}: {status}")]
    Call {
        method: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("starting the CRI client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{method}: the runtime's answer lacks {what}")]
    Answer {
        method: &'static str,
        what: &'static str,
    },
}

/// A connection to a runtime's CRI socket.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    channel: Channel,
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Self, CriError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CriError::Runtime)?;
        let path = socket.to_path_buf();
        // The URI is a placeholder: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://cri.invalid").timeout(CALL_TIMEOUT);
        let channel = runtime
            .block_on(endpoint.connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            })))
            .map_err(|source| CriError::Connect {
                socket: socket.display().to_string(),
                source,
            })?;
        Ok(Self { runtime, channel })
    }

    fn call<Q, A>(&self, method: &'static str, request: Q) -> Result<A, CriError>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        let path = PathAndQuery::from_static(method);
        let mut grpc = Grpc::new(self.channel.clone());
        self.runtime
            .block_on(async {
                grpc.ready()
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                grpc.unary(
                    Request::new(request),
                    path,
                    tonic_prost::ProstCodec::default(),
                )
                .await
            })
            .map(tonic::Response::into_inner)
            .map_err(|status| CriError::Call {
                method: method_name(method),
                status: Box::new(status),
            })
    }

    pub fn version(&self) -> Result<VersionResponse, CriError> {
        self.call(
            "/runtime.v1.RuntimeService/Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
    }

    /// Makes the pod's sandbox (its namespaces, its network through CNI);
    /// returns its id.
    pub fn run_pod_sandbox(&self, config: &PodSandboxConfig) -> Result<String, CriError> {
        let answer: RunPodSandboxResponse = self.call(
            "/runtime.v1.RuntimeService/RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            },
        )?;
        Ok(answer.pod_sandbox_id)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/StopPodSandbox",
            sandbox_request(id),
        )?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/RemovePodSandbox",
            sandbox_request(id),
        )?;
        Ok(())
    }

    /// The sandbox's IP and the PID of its process (the `pause`).
    pub fn pod_sandbox_status(&self, id: &str) -> Result<SandboxState, CriError> {
        const METHOD: &str = "/runtime.v1.RuntimeService/PodSandboxStatus";
        let answer: PodSandboxStatusResponse = self.call(
            METHOD,
            PodSandboxRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            },
        )?;
        let ip = answer
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty());
        Ok(SandboxState {
            ip,
            pid: info_pid(&answer.info).ok_or(CriError::Answer {
                method: method_name(METHOD),
                what: "the sandbox's pid",
            })?,
        })
    }

    /// Creates a container in a sandbox; returns its id.
    pub fn create_container(
        &self,
        sandbox: &str,
        config: &ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String, CriError> {
        let answer: CreateContainerResponse = self.call(
            "/runtime.v1.RuntimeService/CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config.clone()),
                sandbox_config: Some(sandbox_config.clone()),
            },
        )?;
        Ok(answer.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/StartContainer",
            container_request(id),
        )?;
        Ok(())
    }

    /// Stops a container: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/StopContainer",
            StopContainerRequest {
                container_id: id.into(),
                timeout: grace.as_secs() as i64,
            },
        )?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/RemoveContainer",
            container_request(id),
        )?;
        Ok(())
    }

    /// The container's state, and the PID of its process while it runs.
    pub fn container_status(&self, id: &str) -> Result<(ContainerStatus, Option<u32>), CriError> {
        const METHOD: &str = "/runtime.v1.RuntimeService/ContainerStatus";
        let answer: ContainerStatusResponse = self.call(
            METHOD,
            ContainerRequest {
                container_id: id.into(),
                verbose: true,
            },
        )?;
        let status = answer.status.ok_or(CriError::Answer {
            method: method_name(METHOD),
            what: "a status",
        })?;
        let pid = info_pid(&answer.info).filter(|&pid| pid != 0);
        Ok((status, pid))
    }
}

/// What [`Cri::pod_sandbox_status`] tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxState {
    pub ip: Option<String>,
    pub pid: u32,
}

fn sandbox_request(id: &str) -> PodSandboxRequest {
    PodSandboxRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    }
}

fn container_request(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        verbose: false,
    }
}

/// `RunPodSandbox` from `/runtime.v1.RuntimeService/RunPodSandbox`.
fn method_name(path: &'static str) -> &'static str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The `pid` in containerd's verbose `info` (a JSON document under the key
/// `info`).
fn info_pid(info: &std::collections::BTreeMap<String, String>) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    value.get("pid")?.as_u64()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pid_from_containerds_verbose_info() {
        let info = [(
            "info".to_owned(),
            r#"{"pid": 4242, "sandboxID": "x"}"#.to_owned(),
        )]
        .into();
        assert_eq!(info_pid(&info), Some(4242));
        assert_eq!(info_pid(&Default::default()), None);
        let broken = [("info".to_owned(), "{".to_owned())].into();
        assert_eq!(info_pid(&broken), None);
    }

    #[test]
    fn names_methods_by_their_last_component() {
        assert_eq!(
            method_name("/runtime.v1.RuntimeService/RunPodSandbox"),
            "RunPodSandbox"
        );
    }
}
