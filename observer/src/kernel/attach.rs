//! The attach worker: one dedicated thread that enters pod network namespaces
//! and attaches (and detaches) the tc programs there, and the socket hooks on
//! pods' cgroups.
//!
//! It is a thread of its own because `setns` moves only the calling thread: a
//! tokio worker must never change namespace. Async callers send it requests
//! through an [`AttachWorker`]; the worker itself is in [`worker`]. It owns
//! the loaded programs and every link; when it stops, it detaches all but the
//! links of pods that fail closed, which stay pinned on the node for the next
//! observer to take over.

mod worker;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use aya::programs::{ProgramError, TcAttachType};
use tokio::sync::oneshot;

use super::{
    datapath::{Datapath, DatapathError},
    netns::{NetNs, NetnsError},
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
    #[error("cannot hold a tc link in {path}: {source}")]
    Link {
        path: PathBuf,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error(
        "{path} is no longer the namespace it was found for (its process went, its PID was given to another)"
    )]
    NotTheOne { path: PathBuf },
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
    /// Its links were pinned by an earlier observer and are taken over:
    /// their programs are replaced at the next [`AttachWorker::commit`].
    pub taken_over: bool,
    /// Hooks where a clsact filter an earlier observer left could not be
    /// removed: it runs beside this observer's link (packets counted
    /// twice) until `observer cleanup` removes it.
    pub filters_left: usize,
}

/// What [`AttachWorker::commit`] did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Pods whose links were taken over.
    pub pods: usize,
    /// Hooks where a clsact filter taken over could not be removed once
    /// a TCX link replaced it (see [`AttachedNetns::filters_left`]).
    pub filters_left: usize,
}

/// Tells, once a namespace is open (by its device and inode), whether it
/// is the one its path was found for.
pub type Check = Box<dyn FnOnce(Option<(u64, u64)>) -> bool + Send>;

enum Request {
    Attach {
        path: PathBuf,
        pod: ObjectRef,
        cgroup: Option<PathBuf>,
        check: Option<Check>,
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
    Commit {
        reply: oneshot::Sender<Committed>,
    },
    FailClosed {
        cookies: HashSet<u64>,
        reply: oneshot::Sender<HashSet<u64>>,
    },
    Unclaimed {
        reply: oneshot::Sender<Vec<u64>>,
    },
    Forget {
        cookies: Vec<u64>,
        reply: oneshot::Sender<()>,
    },
}

/// Handle to the worker thread.
pub struct AttachWorker {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AttachWorker {
    /// Starts the worker; `noop` also attaches the no-op baseline everywhere;
    /// `tcx`: tc programs attach as TCX links, not clsact filters.
    pub fn start(datapath: Datapath, noop: bool, tcx: bool) -> Result<Self, AttachError> {
        let (requests, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("netns-attach".into())
            .spawn(move || {
                // Saved on this very thread: it is where setns must return to.
                let state = NetNs::current_thread()
                    .map(|home| worker::Worker::new(home, datapath, noop, tcx));
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
    /// pod's `cgroup` (the policy hooks) if it is known. Links an earlier
    /// observer pinned for this namespace are taken over instead (see
    /// [`AttachWorker::commit`]). `check`, if given, is asked once the
    /// namespace is open whether it is still the one meant.
    pub async fn attach(
        &self,
        path: &Path,
        pod: ObjectRef,
        cgroup: Option<&Path>,
        check: Option<Check>,
    ) -> Result<AttachedNetns, AttachError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Attach {
            path: path.into(),
            pod,
            cgroup: cgroup.map(Path::to_path_buf),
            check,
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

    /// Swaps this observer's programs into the links taken over since the
    /// last commit (one `BPF_LINK_UPDATE` each: the hook is never without a
    /// program). Call it once the maps the new programs read are written.
    pub async fn commit(&self) -> Committed {
        let (reply, answer) = oneshot::channel();
        if self.send(Request::Commit { reply }).is_err() {
            return Committed::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Keeps the hooks of the pods with these cookies for the next observer
    /// (they fail closed: their programs stay when the observer goes):
    /// links are pinned on the node, clsact filters recorded there. Lets
    /// every other pod's go. Returns the pods whose hooks could not be
    /// kept.
    pub async fn fail_closed(&self, cookies: HashSet<u64>) -> HashSet<u64> {
        let (reply, answer) = oneshot::channel();
        let failed = cookies.clone();
        if self.send(Request::FailClosed { cookies, reply }).is_err() {
            return failed;
        }
        answer.await.unwrap_or(failed)
    }

    /// The pods an earlier observer pinned that this one has not taken over,
    /// whose links still have their hooks. Pins whose hooks are gone (the
    /// pod's namespace or cgroup went) are removed.
    pub async fn unclaimed(&self) -> Vec<u64> {
        let (reply, answer) = oneshot::channel();
        if self.send(Request::Unclaimed { reply }).is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Removes the pins of pods this observer did not take over: their links
    /// detach.
    pub async fn forget(&self, cookies: Vec<u64>) {
        let (reply, answer) = oneshot::channel();
        if self.send(Request::Forget { cookies, reply }).is_ok() {
            let _ = answer.await;
        }
    }

    fn send(&self, request: Request) -> Result<(), AttachError> {
        self.requests
            .as_ref()
            .ok_or(AttachError::WorkerGone)?
            .send(request)
            .map_err(|_| AttachError::WorkerGone)
    }

    /// Detaches everything (but what fails closed) and stops the worker.
    /// Blocks until it is done.
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
