//! containerd as the lab's nodes run it: one per node, in the node's
//! network namespace (so the CNI bridge and the pods' veths are the node's)
//! and in a filesystem of the node's own ([`filesystem`]), with its CRI
//! plugin for the lab's kubelet to call.
//!
//! Its configuration differs from Debian's default in four settings only:
//! the sandbox (`pause`) image is the lab's own image, the CNI plugins are
//! where Debian installs them, the cgroup driver is cgroupfs (no systemd
//! here), and `restrict_oom_score_adj` (runc cannot lower a score without
//! CAP_SYS_RESOURCE, which these machines lack).

pub mod filesystem;

use std::{
    fs::{self, File, OpenOptions},
    io,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;

use crate::{LabError, cri::Cri, lab::io_error};
use filesystem::NodeFs;

/// The lab's workload image: busybox, Python, curl and dnsmasq from the
/// machine's packages (`cargo xtask` builds it). Also the sandbox image.
pub const LAB_IMAGE: &str = "localhost/observer-lab:1";
/// Where `cargo xtask` says the image archive (OCI) is.
pub const LAB_IMAGE_ENV: &str = "OBSERVER_LAB_IMAGE";
/// The namespace of containerd's that its CRI plugin works in.
const CRI_NAMESPACE: &str = "k8s.io";
/// Paths in the node's filesystem.
const SOCKET: &str = "/run/containerd/containerd.sock";
const CONFIG: &str = "/etc/containerd/config.toml";
const CNI_CONFIG: &str = "/etc/cni/net.d/10-lab.conflist";
/// The name of the node's pod network (CNI's state is kept under it).
pub const NETWORK: &str = "pods";
/// Where distributions install the CNI plugins.
const CNI_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A node's containerd, running.
pub struct Containerd {
    fs: NodeFs,
    cri: Cri,
    pid: u32,
}

/// What starting a node's containerd needs.
pub struct Start<'a> {
    pub node: &'a str,
    /// The node's directory in the lab's state.
    pub dir: &'a Path,
    pub netns: &'a Path,
    /// The cgroup containerd (and its shims) run in.
    pub cgroup: &'a Path,
    pub pod_cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// The lab's image (an OCI archive).
    pub image: &'a Path,
}

impl Containerd {
    /// Starts containerd and loads the lab's image into it; `children`
    /// gets the process.
    pub fn start(start: &Start, children: &mut Vec<Child>) -> Result<Self, LabError> {
        for program in ["containerd", "containerd-shim-runc-v2", "runc", "ctr"] {
            if crate::lab::which(program).is_none() {
                return Err(LabError::MissingTool(program));
            }
        }
        let cni_bin = CNI_BIN_DIRS
            .iter()
            .find(|dir| Path::new(dir).join("bridge").is_file())
            .ok_or(LabError::MissingTool(
                "the CNI plugins (containernetworking-plugins)",
            ))?;
        let fs = NodeFs::prepare(&start.dir.join("root"))?;
        write(&fs.host_path(CONFIG), &config(cni_bin))?;
        write(
            &fs.host_path(CNI_CONFIG),
            &cni_config(start.pod_cidr, start.gateway),
        )?;
        let log_path = start.dir.join("containerd.log");
        children.push(spawn(&fs, start, &log_path)?);
        let child = children.last_mut().expect("just pushed");
        let pid = child.id();
        let socket = fs.host_path(SOCKET);
        let deadline = Instant::now() + START_TIMEOUT;
        let cri = loop {
            if let Some(status) = child.try_wait().map_err(io_error("containerd".into()))? {
                return Err(LabError::Containerd {
                    node: start.node.into(),
                    problem: format!("it exited ({status}); its log:\n{}", tail(&log_path)),
                });
            }
            if socket.exists()
                && let Ok(cri) = Cri::connect(&socket)
                && cri.version().is_ok()
            {
                break cri;
            }
            if Instant::now() > deadline {
                return Err(LabError::Containerd {
                    node: start.node.into(),
                    problem: format!(
                        "no answer within {START_TIMEOUT:?}; its log:\n{}",
                        tail(&log_path)
                    ),
                });
            }
            thread::sleep(Duration::from_millis(50));
        };
        let containerd = Self { fs, cri, pid };
        containerd.import(start.image)?;
        Ok(containerd)
    }

    pub fn cri(&self) -> &Cri {
        &self.cri
    }

    pub fn fs(&self) -> &NodeFs {
        &self.fs
    }

    /// containerd's process (its mount namespace is the node's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Loads an image archive, as a registry pull would have: under the
    /// image's full name (`observer:0.1.0` is `docker.io/library/observer:0.1.0`,
    /// the name the CRI plugin looks for).
    pub fn import(&self, archive: &Path) -> Result<(), LabError> {
        let out = self.ctr(&["images".as_ref(), "import".as_ref(), archive.as_os_str()])?;
        // `unpacking observer:0.1.0 (sha256:...)...done`
        for name in out
            .lines()
            .filter_map(|line| line.strip_prefix("unpacking ")?.split(' ').next())
        {
            let full = full_name(name);
            if full != name {
                self.ctr(&[
                    "images".as_ref(),
                    "tag".as_ref(),
                    name.as_ref(),
                    full.as_ref(),
                ])?;
            }
        }
        Ok(())
    }

    /// Runs `ctr` on the node's containerd, in the CRI plugin's namespace.
    fn ctr(&self, args: &[&std::ffi::OsStr]) -> Result<String, LabError> {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.fs.host_path(SOCKET))
            .args(["--namespace", CRI_NAMESPACE])
            .args(args);
        crate::netns::output(&mut command)
    }

    /// Steers host-local IPAM to `ip` for the next sandbox: it hands out
    /// the address after the last one it reserved. The lab's addresses are
    /// planned (Services and tests name them); a sandbox that got another
    /// is an error.
    pub fn next_address(&self, ip: Ipv4Addr) -> Result<(), LabError> {
        let dir = self
            .fs
            .host_path(&format!("/var/lib/cni/networks/{NETWORK}"));
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let previous = Ipv4Addr::from(u32::from(ip) - 1);
        write(&dir.join("last_reserved_ip.0"), &previous.to_string())
    }
}

/// The image archive `cargo xtask` built, from the environment.
pub fn image_archive() -> Result<PathBuf, LabError> {
    let path = std::env::var_os(LAB_IMAGE_ENV).map(PathBuf::from);
    match path {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(LabError::NoLabImage),
    }
}

/// An image name as Docker's rules complete it: `name:tag` is Docker
/// Hub's library, `user/name` Docker Hub's, `host/...` a registry's.
fn full_name(name: &str) -> String {
    match name.split_once('/') {
        None => format!("docker.io/library/{name}"),
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => name.into(),
        Some(_) => format!("docker.io/{name}"),
    }
}

/// containerd's configuration (version 2, containerd 1.6 and 1.7).
fn config(cni_bin: &str) -> String {
    format!(
        r#"# The lab's node: Debian's defaults but for what the lab needs.
version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{LAB_IMAGE}"
  # runc cannot lower an OOM score without CAP_SYS_RESOURCE.
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "/etc/cni/net.d"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    # cgroupfs: there is no systemd to ask.
    SystemdCgroup = false
"#
    )
}

/// The node's pod network: the bridge plugin with host-local IPAM on the
/// node's pod CIDR, the bridge the pods' gateway; no masquerade (nothing
/// leaves the lab).
fn cni_config(pod_cidr: Ipv4Net, gateway: Ipv4Addr) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "0.4.0",
        "name": NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isDefaultGateway": true,
            "ipMasq": false,
            // A pod reaching itself through its Service.
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": pod_cidr.trunc().to_string(), "gateway": gateway.to_string()}]],
            },
        }],
    }))
    .expect("serializable")
}

/// Starts containerd: in the node's cgroup, network namespace and
/// filesystem, in a session of its own.
fn spawn(fs: &NodeFs, start: &Start, log_path: &Path) -> Result<Child, LabError> {
    let procs = OpenOptions::new()
        .write(true)
        .open(start.cgroup.join("cgroup.procs"))
        .map_err(io_error(format!("opening {}", start.cgroup.display())))?;
    let netns =
        File::open(start.netns).map_err(io_error(format!("opening {}", start.netns.display())))?;
    let log =
        File::create(log_path).map_err(io_error(format!("creating {}", log_path.display())))?;
    let entry = fs.entry()?;
    let mut command = Command::new("containerd");
    command
        .args(["--config", CONFIG])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_error("log".into()))?)
        .stderr(log);
    let (procs_fd, netns_fd) = (procs.as_raw_fd(), netns.as_raw_fd());
    // SAFETY: only async-signal-safe calls between fork and exec, on fds and
    // strings that stay alive until `spawn` returns.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                || libc::setsid() < 0
            {
                return Err(io::Error::last_os_error());
            }
            entry.enter()
        });
    }
    command.spawn().map_err(|source| LabError::Spawn {
        command: "containerd".into(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    fs::write(path, text).map_err(io_error(format!("writing {}", path.display())))
}

/// The end of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_network_is_the_nodes_pod_cidr_without_masquerade() {
        let config: serde_json::Value = serde_json::from_str(&cni_config(
            "10.244.1.0/24".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
        ))
        .unwrap();
        let bridge = &config["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(
            bridge["ipam"]["ranges"][0][0]["subnet"],
            serde_json::json!("10.244.1.0/24")
        );
    }

    #[test]
    fn completes_image_names_as_docker_does() {
        assert_eq!(
            full_name("observer:0.1.0"),
            "docker.io/library/observer:0.1.0"
        );
        assert_eq!(full_name("acme/observer:1"), "docker.io/acme/observer:1");
        assert_eq!(full_name(LAB_IMAGE), LAB_IMAGE);
        assert_eq!(full_name("ghcr.io/acme/o:1"), "ghcr.io/acme/o:1");
        assert_eq!(full_name("registry:5000/o:1"), "registry:5000/o:1");
    }

    #[test]
    fn the_configuration_names_the_lab_image_and_cgroupfs() {
        let text = config("/usr/lib/cni");
        assert!(text.contains(&format!("sandbox_image = \"{LAB_IMAGE}\"")));
        assert!(text.contains("SystemdCgroup = false"));
        assert!(text.contains("restrict_oom_score_adj = true"));
    }
}
