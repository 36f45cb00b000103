//! The attach worker: one dedicated thread that enters pod network namespaces
//! and attaches (and detaches) the tc programs there.
//!
//! It is a thread of its own because `setns` moves only the calling thread: a
//! tokio worker must never change namespace. Async callers send it requests.
//! It owns the loaded programs and every link; when it stops, it detaches all.
//! (Longer than most files: the worker and its requests are one unit.)

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use aya::{
    programs::{
        ProgramError, TcAttachType, cgroup_sock_addr::CgroupSockAddrLink, tc::SchedClassifierLink,
    },
    util::KernelVersion,
};
use tokio::sync::oneshot;

use super::{
    datapath::{Datapath, DatapathError, NOOP_PROGRAM},
    netns::{self, NetNs, NetnsError},
    tc::{attach_one, attach_program, interface_exists},
};
use crate::names::ObjectRef;

/// The pod's loopback: container-to-container traffic. Always ifindex 1.
pub const LOOPBACK: &str = "lo";
/// The pod's end of its veth: traffic to and from everything else.
pub const POD_INTERFACE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the programs for {path}: {source}")]
    Load {
        path: PathBuf,
        source: DatapathError,
    },
    #[error("network namespace {path} is already attached as {existing}")]
    AlreadyAttached { path: PathBuf, existing: String },
    #[error("cannot attach to {interface} {direction:?} in {path}: {source}")]
    Attach {
        path: PathBuf,
        interface: &'static str,
        direction: TcAttachType,
        source: Box<ProgramError>,
    },
    #[error("no namespace with cookie {0} is attached")]
    NotAttached(u64),
    #[error("the attach worker has stopped")]
    WorkerGone,
}

/// A namespace the programs are attached to.
#[derive(Clone, Debug)]
pub struct AttachedNetns {
    /// For logs: `namespace/pod`, or the namespace's name.
    pub name: String,
    /// The pod (in `--netns` mode: no namespace, the netns name as the pod).
    pub pod: ObjectRef,
    pub path: PathBuf,
    /// `bpf_get_netns_cookie` value of its packets.
    pub cookie: u64,
    /// Device and inode of the namespace (which one a path led to).
    pub netns_id: (u64, u64),
    /// Number of tc attachments (lo egress; eth0 egress and ingress).
    pub programs: usize,
    /// The policy hooks are on the pod's cgroup.
    pub policy_hooks: bool,
}

enum Request {
    Attach {
        path: PathBuf,
        pod: ObjectRef,
        cgroup: Option<PathBuf>,
        reply: oneshot::Sender<Result<AttachedNetns, AttachError>>,
    },
    Detach {
        cookie: u64,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    Hooks {
        cookie: u64,
        cgroup: PathBuf,
        reply: oneshot::Sender<Result<bool, AttachError>>,
    },
}

/// Handle to the worker thread.
pub struct AttachWorker {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AttachWorker {
    /// Starts the worker; `noop` also attaches the no-op baseline everywhere;
    /// `netlink` uses clsact filters even where TCX links exist (to test the
    /// path older kernels take).
    pub fn start(datapath: Datapath, noop: bool, netlink: bool) -> Result<Self, AttachError> {
        let (requests, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("netns-attach".into())
            .spawn(move || {
                // Saved on this very thread: it is where setns must return to.
                let state =
                    NetNs::current_thread().map(|home| Worker::new(home, datapath, noop, netlink));
                match state {
                    Ok(mut worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.serve(inbox);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            })
            .expect("spawning a thread");
        ready_rx
            .recv()
            .map_err(|_| AttachError::WorkerGone)?
            .map_err(AttachError::Netns)?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Attaches to the network namespace of `pod` at `path`, and to the
    /// pod's `cgroup` (the policy hooks) if it is known.
    pub async fn attach(
        &self,
        path: &Path,
        pod: ObjectRef,
        cgroup: Option<&Path>,
    ) -> Result<AttachedNetns, AttachError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Attach {
            path: path.into(),
            pod,
            cgroup: cgroup.map(Path::to_path_buf),
            reply,
        })?;
        answer.await.map_err(|_| AttachError::WorkerGone)?
    }

    /// Attaches the socket hooks of an attached namespace's pod to its
    /// `cgroup`, if they are not (the cgroup was not known at attach, or
    /// attaching failed). Returns whether they are attached now.
    pub async fn attach_hooks(&self, cookie: u64, cgroup: &Path) -> Result<bool, AttachError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Hooks {
            cookie,
            cgroup: cgroup.into(),
            reply,
        })?;
        answer.await.map_err(|_| AttachError::WorkerGone)?
    }

    /// Detaches everything attached in the namespace with this cookie.
    pub async fn detach(&self, cookie: u64) -> Result<(), AttachError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Detach { cookie, reply })?;
        answer.await.map_err(|_| AttachError::WorkerGone)?
    }

    fn send(&self, request: Request) -> Result<(), AttachError> {
        self.requests
            .as_ref()
            .ok_or(AttachError::WorkerGone)?
            .send(request)
            .map_err(|_| AttachError::WorkerGone)
    }

    /// Detaches everything and stops the worker. Blocks until it is done.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Closing the channel ends `serve`, which detaches everything.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for AttachWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    home: NetNs,
    datapath: Datapath,
    /// Before 6.6 tc programs attach through the clsact qdisc, not TCX links.
    tcx: bool,
    noop: bool,
    attached: HashMap<u64, Attachment>,
}

struct Attachment {
    info: AttachedNetns,
    /// The links keep the namespace's programs loaded; the parsed object
    /// they came from is dropped after attaching (it is the bulk of the
    /// memory a pod would otherwise cost).
    links: Vec<SchedClassifierLink>,
    /// The policy hooks on the pod's cgroup (bpf links: they go with the
    /// process, and the pod is then unaffected).
    sock_links: Vec<CgroupSockAddrLink>,
    /// clsact filters are removed inside their namespace, which the path may
    /// not lead to any more (`/proc/<pid>/ns/net` of a process that ended):
    /// the namespace is held open. TCX links need no namespace.
    netns: Option<NetNs>,
}

impl Worker {
    fn new(home: NetNs, datapath: Datapath, noop: bool, netlink: bool) -> Self {
        let tcx =
            !netlink && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        Self {
            home,
            datapath,
            tcx,
            noop,
            attached: HashMap::new(),
        }
    }

    fn serve(&mut self, inbox: mpsc::Receiver<Request>) {
        for request in inbox {
            match request {
                Request::Attach {
                    path,
                    pod,
                    cgroup,
                    reply,
                } => {
                    let _ = reply.send(self.attach(&path, pod, cgroup.as_deref()));
                }
                Request::Detach { cookie, reply } => {
                    let _ = reply.send(self.detach(cookie));
                }
                Request::Hooks {
                    cookie,
                    cgroup,
                    reply,
                } => {
                    let _ = reply.send(self.attach_hooks(cookie, &cgroup));
                }
            }
        }
        let cookies: Vec<u64> = self.attached.keys().copied().collect();
        for cookie in cookies {
            if let Err(err) = self.detach(cookie) {
                tracing::warn!(%err, "detach at shutdown");
            }
        }
    }

    fn attach(
        &mut self,
        path: &Path,
        pod: ObjectRef,
        cgroup: Option<&Path>,
    ) -> Result<AttachedNetns, AttachError> {
        let name = pod.to_string();
        let netns = NetNs::open(path)?;
        let cookie = netns
            .run(&self.home, netns::cookie_of_current)?
            .map_err(|source| AttachError::Cookie {
                path: path.into(),
                source,
            })?;
        if let Some(existing) = self.attached.get(&cookie) {
            return Err(AttachError::AlreadyAttached {
                path: path.into(),
                existing: existing.info.name.clone(),
            });
        }
        let mut programs = self
            .datapath
            .instance(cookie, self.noop)
            .map_err(|source| AttachError::Load {
                path: path.into(),
                source,
            })?;
        // The socket hooks first, and the storage of the sockets the pod
        // already has: the first packet a tc program classifies then finds
        // its sockets' containers. Without the hooks the pod is observed,
        // and no policy applies to it.
        let sock_links = match cgroup.map(|c| self.datapath.attach_socket_hooks(c)) {
            Some(Ok(links)) => links,
            Some(Err(err)) => {
                tracing::warn!(%err, netns = %name, "no socket hooks: no policy, fewer container names");
                Vec::new()
            }
            None => Vec::new(),
        };
        let (tcx, noop) = (self.tcx, self.noop);
        let links = netns.run(&self.home, || {
            let mut links = Vec::new();
            // Loopback packets pass lo egress and then lo ingress: attach
            // one hook only, so each is counted once.
            let mut hooks = vec![(LOOPBACK, TcAttachType::Egress)];
            if interface_exists(POD_INTERFACE) {
                hooks.push((POD_INTERFACE, TcAttachType::Egress));
                hooks.push((POD_INTERFACE, TcAttachType::Ingress));
            }
            for (interface, direction) in hooks {
                let error = |source| AttachError::Attach {
                    path: path.into(),
                    interface,
                    direction,
                    source: Box::new(source),
                };
                // On error, `links` drops here, inside the namespace, which
                // detaches what was attached so far.
                if noop {
                    let baseline = NOOP_PROGRAM;
                    links.push(
                        attach_program(&mut programs, baseline, tcx, interface, direction)
                            .map_err(error)?,
                    );
                }
                links.push(attach_one(&mut programs, tcx, interface, direction).map_err(error)?);
            }
            Ok::<_, AttachError>(links)
        })??;
        let info = AttachedNetns {
            policy_hooks: !sock_links.is_empty(),
            name,
            pod,
            path: path.into(),
            cookie,
            netns_id: netns.id().map_err(|source| AttachError::Cookie {
                path: path.into(),
                source,
            })?,
            programs: links.len(),
        };
        tracing::info!(netns = %info.name, path = %path.display(), cookie, programs = info.programs, policy_hooks = info.policy_hooks, "attached");
        self.attached.insert(
            cookie,
            Attachment {
                info: info.clone(),
                links,
                sock_links,
                netns: (!tcx).then_some(netns),
            },
        );
        Ok(info)
    }

    fn attach_hooks(&mut self, cookie: u64, cgroup: &Path) -> Result<bool, AttachError> {
        let attachment = self
            .attached
            .get_mut(&cookie)
            .ok_or(AttachError::NotAttached(cookie))?;
        if attachment.sock_links.is_empty() {
            match self.datapath.attach_socket_hooks(cgroup) {
                Ok(links) => {
                    tracing::info!(netns = %attachment.info.name, "socket hooks attached");
                    attachment.sock_links = links;
                    attachment.info.policy_hooks = true;
                }
                Err(err) => {
                    tracing::debug!(%err, netns = %attachment.info.name, "still no socket hooks");
                }
            }
        }
        Ok(!attachment.sock_links.is_empty())
    }

    fn detach(&mut self, cookie: u64) -> Result<(), AttachError> {
        let attachment = self
            .attached
            .remove(&cookie)
            .ok_or(AttachError::NotAttached(cookie))?;
        let Attachment {
            info,
            links,
            sock_links,
            netns,
        } = attachment;
        drop(sock_links);
        match netns {
            // clsact filters are removed by netlink, inside their namespace.
            Some(netns) => netns.run(&self.home, || drop(links))?,
            // TCX links are file descriptors: closing one detaches it, from
            // any namespace, and they go away with the interface anyway.
            None => drop(links),
        }
        tracing::info!(netns = %info.name, cookie, "detached");
        Ok(())
    }
}
