//! The worker thread's side: attaching in a namespace, taking over the
//! links an earlier observer pinned, pinning and unpinning the links of
//! pods that fail closed, and detaching.
//!
//! A pod's links are pinned under `<pin-dir>/pods/<cookie>/<hook>`. A pod
//! that fails closed keeps them across a restart: the next observer opens
//! them when it attaches that namespace, and once the maps its programs
//! read are written ([`Worker::commit`]) replaces their programs in place
//! (`BPF_LINK_UPDATE`), so that no packet and no `connect()` meets a hook
//! without a program, and none meets two. clsact filters cannot be pinned,
//! but outlive the process anyway: such a pod's filters are left in place
//! at exit, recorded beside its pins, and the next observer swaps its
//! programs into them at the same moment (or, with TCX links, attaches its
//! links then and removes the filters).

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::mpsc,
};

use aya::programs::{
    TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};

use super::{AttachError, AttachedNetns, Committed, POD_INTERFACE, Request};
use crate::{
    kernel::{
        bpf,
        bpffs::NodePins,
        datapath::{BpfLink, Datapath, NOOP_PROGRAM, Programs},
        netns::{self, NetNs},
        tc::{
            POD_HOOKS, TcLink, attach_one, attach_program, interface_exists, left_filter,
            program_for, runs_another_program, swap_filter,
        },
    },
    names::ObjectRef,
};

pub(super) struct Worker {
    home: NetNs,
    datapath: Datapath,
    /// TCX links, or clsact filters (before 6.6, or `--tc-attach clsact`).
    tcx: bool,
    noop: bool,
    attached: HashMap<u64, Attachment>,
}

struct Attachment {
    info: AttachedNetns,
    tc: Vec<Hook>,
    /// The policy hooks on the pod's cgroup.
    sock: Vec<Hook>,
    /// clsact filters are removed inside their namespace, which the path may
    /// not lead to any more (`/proc/<pid>/ns/net` of a process that ended):
    /// the namespace is held open. So it is while links taken over wait for
    /// their programs (a failed swap attaches anew, in the namespace).
    netns: Option<NetNs>,
    /// The namespace's instance of the programs, kept until the links
    /// taken over run them; otherwise dropped after attaching (the links
    /// keep the programs loaded, and the parsed object is the bulk of the
    /// memory a pod would otherwise cost).
    programs: Option<Programs>,
}

/// One attachment point of a pod.
struct Hook {
    /// Its pin's file name: `lo-egress`, `eth0-ingress`, ..., or the socket
    /// hook's program name.
    name: &'static str,
    /// The program it runs.
    program: &'static str,
    link: Held,
    /// Stays when the observer goes (its pod fails closed): a link pinned
    /// on the node, or a clsact filter recorded there.
    kept: bool,
    /// Taken over from an earlier observer: it runs that observer's program
    /// until [`Worker::commit`] swaps this one's in.
    swap: bool,
}

enum Held {
    /// A bpf link (TCX, cgroup), which may be pinned.
    Link(BpfLink),
    /// A clsact filter: removed by netlink, in its namespace, when dropped;
    /// left in place (forgotten) when kept. With the id of the program this
    /// observer made it run (`None`: one taken over, not swapped yet).
    Filter(SchedClassifierLink, Option<u32>),
    /// The no-op baseline of `cargo xtask bench`: never pinned.
    Baseline { _link: SchedClassifierLink },
}

impl Hook {
    /// Keeps the hook for the next observer: pins its link in `dir` (the
    /// pod's, made already), or records its filter. The baseline is not
    /// kept.
    fn keep(&mut self, node: &NodePins, cookie: u64, dir: &Path) -> std::io::Result<()> {
        match &self.link {
            Held::Link(link) => link
                .id()
                .and_then(|id| bpf::pin(id, &dir.join(self.name)))?,
            Held::Filter(..) => node.keep_filter(cookie, self.name)?,
            Held::Baseline { .. } => return Ok(()),
        }
        self.kept = true;
        Ok(())
    }
}

/// A namespace's tc hooks, attached from inside it (the calling thread
/// enters it, and goes back `home`).
fn attach_tc(
    home: &NetNs,
    tcx: bool,
    noop: bool,
    prepared: &mut Prepared,
) -> Result<Vec<Hook>, AttachError> {
    let Prepared {
        path,
        netns,
        programs,
        pinned,
        filters,
        filters_left,
        ..
    } = prepared;
    let path: &Path = path;
    netns.run(home, || {
        let mut hooks = Vec::new();
        let eth0 = interface_exists(POD_INTERFACE);
        for (hook, interface, direction) in POD_HOOKS {
            if interface == POD_INTERFACE && !eth0 {
                continue;
            }
            let error = |source| AttachError::Attach {
                path: path.into(),
                interface,
                direction,
                source: Box::new(source),
            };
            // On error, `hooks` drops here, inside the namespace, which
            // detaches what was attached so far.
            if noop {
                let attached = attach_program(programs, NOOP_PROGRAM, tcx, interface, direction)
                    .map_err(error)?;
                *filters_left += usize::from(attached.filter_left);
                hooks.push(Hook {
                    name: "noop",
                    program: NOOP_PROGRAM,
                    link: Held::Baseline {
                        _link: attached.link,
                    },
                    kept: false,
                    swap: false,
                });
            }
            if let Some(pin) = pinned.remove(hook) {
                match PinnedLink::from_pin(&pin) {
                    Ok(link) => {
                        hooks.push(taken(hook, program_for(direction), link));
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(%err, pin = %pin.display(), "cannot open a pinned link: attaching anew");
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
            // A filter left for this pod runs the earlier observer's
            // program until the commit, as a pinned link would.
            if filters.remove(hook)
                && let Ok(left) = left_filter(interface, direction)
            {
                hooks.push(Hook {
                    name: hook,
                    program: program_for(direction),
                    link: Held::Filter(left, None),
                    kept: true,
                    swap: true,
                });
                continue;
            }
            let attached = attach_one(programs, tcx, interface, direction).map_err(error)?;
            *filters_left += usize::from(attached.filter_left);
            let link = held(attached, tcx).map_err(|source| AttachError::Link {
                path: path.into(),
                source: Box::new(source),
            })?;
            hooks.push(Hook {
                name: hook,
                program: program_for(direction),
                link,
                kept: false,
                swap: false,
            });
        }
        Ok::<_, AttachError>(hooks)
    })?
}

/// An attach request, as the worker takes it in.
type AttachRequest = (
    PathBuf,
    ObjectRef,
    Option<PathBuf>,
    Option<super::Check>,
    tokio::sync::oneshot::Sender<Result<AttachedNetns, AttachError>>,
);

/// Attaches taken in at once, at most.
const MAX_BATCH: usize = 256;
/// Namespaces whose tc links are made at once, a thread each.
const PARALLEL_ATTACHES: usize = 32;

/// A namespace on its way to being attached (see `Worker::attach_batch`).
struct Prepared {
    path: PathBuf,
    pod: ObjectRef,
    name: String,
    netns: NetNs,
    cookie: u64,
    programs: Programs,
    /// Hooks an earlier observer pinned for it, by pin name.
    pinned: HashMap<String, PathBuf>,
    /// Hooks whose clsact filter an earlier observer left for it.
    filters: HashSet<String>,
    taken_over: bool,
    sock: Vec<Hook>,
    /// Hooks where a filter an earlier observer left stays beside the
    /// link just attached (it could not be removed).
    filters_left: usize,
}

/// The interface and direction of the tc hook pinned as `name`.
fn tc_point(name: &str) -> (&'static str, TcAttachType) {
    POD_HOOKS
        .iter()
        .find(|(n, ..)| *n == name)
        .map_or((POD_INTERFACE, TcAttachType::Egress), |(_, i, d)| (*i, *d))
}

impl Worker {
    pub(super) fn new(home: NetNs, datapath: Datapath, noop: bool, tcx: bool) -> Self {
        Self {
            home,
            datapath,
            tcx,
            noop,
            attached: HashMap::new(),
        }
    }

    pub(super) fn serve(&mut self, inbox: mpsc::Receiver<Request>) {
        // A request that ended a batch of attaches, served next.
        let mut next = None;
        while let Some(request) = next.take().or_else(|| inbox.recv().ok()) {
            match request {
                Request::Attach {
                    path,
                    pod,
                    cgroup,
                    check,
                    reply,
                } => {
                    // The attaches queued meanwhile go together: their tc
                    // links are made in parallel (see `attach_batch`).
                    let mut batch = vec![(path, pod, cgroup, check, reply)];
                    while batch.len() < MAX_BATCH {
                        match inbox.try_recv() {
                            Ok(Request::Attach {
                                path,
                                pod,
                                cgroup,
                                check,
                                reply,
                            }) => batch.push((path, pod, cgroup, check, reply)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.attach_batch(batch);
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
                Request::Commit { reply } => {
                    let _ = reply.send(self.commit());
                }
                Request::FailClosed { cookies, reply } => {
                    let _ = reply.send(self.fail_closed(&cookies));
                }
                Request::Unclaimed { reply } => {
                    let _ = reply.send(self.unclaimed());
                }
                Request::Forget { cookies, reply } => {
                    if let Some(node) = self.datapath.node_pins() {
                        for cookie in cookies {
                            tracing::info!(
                                cookie,
                                "removing the pinned links of a pod no observer attaches"
                            );
                            node.remove_pod(cookie);
                        }
                    }
                    let _ = reply.send(());
                }
            }
        }
        self.stop();
    }

    /// At the end: every pod's links go, but those kept (pods that fail
    /// closed: their pins and filters stay, for the next observer). The maps' pins go
    /// too unless some pod's links still use them.
    fn stop(&mut self) {
        let mut kept = 0;
        for (cookie, attachment) in std::mem::take(&mut self.attached) {
            if attachment.tc.iter().chain(&attachment.sock).any(|h| h.kept) {
                kept += 1;
                tracing::info!(netns = %attachment.info.name, cookie, "left attached: its policy fails closed");
            }
            self.release(attachment, false);
        }
        let pinned = self
            .datapath
            .node_pins()
            .is_some_and(|node| !node.pinned_pods().is_empty());
        if kept > 0 {
            tracing::info!(
                pods = kept,
                "pods that fail closed stay attached until the next observer takes them over"
            );
        }
        self.datapath.release(pinned);
    }

    /// Attaches each namespace of the batch: opened, checked and loaded
    /// one after the other (a millisecond each), then their tc links made
    /// in parallel, a thread per namespace: each TCX link waits for an RCU
    /// grace period in the kernel (10 to 30 ms here), and waits that
    /// overlap end together.
    fn attach_batch(&mut self, batch: Vec<AttachRequest>) {
        let mut ready = Vec::new();
        let mut cookies = HashSet::new();
        for (path, pod, cgroup, check, reply) in batch {
            match self.prepare(&path, pod, cgroup.as_deref(), check) {
                Ok(prepared) if !cookies.insert(prepared.cookie) => {
                    let _ = reply.send(Err(AttachError::AlreadyAttached {
                        path,
                        existing: prepared.name,
                    }));
                }
                Ok(prepared) => ready.push((prepared, reply)),
                Err(err) => {
                    let _ = reply.send(Err(err));
                }
            }
        }
        let (home, tcx, noop) = (&self.home, self.tcx, self.noop);
        let mut done = Vec::with_capacity(ready.len());
        for chunk in ready.chunks_mut(PARALLEL_ATTACHES) {
            let hooks: Vec<_> = std::thread::scope(|scope| {
                let threads: Vec<_> = chunk
                    .iter_mut()
                    .map(|(prepared, _)| scope.spawn(move || attach_tc(home, tcx, noop, prepared)))
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap_or(Err(AttachError::WorkerGone)))
                    .collect()
            });
            done.extend(hooks);
        }
        for ((prepared, reply), hooks) in ready.into_iter().zip(done) {
            let result = hooks.and_then(|tc| self.finish(prepared, tc));
            let _ = reply.send(result);
        }
    }

    /// Opens and checks a namespace, loads its programs, takes over what
    /// an earlier observer pinned for it and attaches its socket hooks.
    fn prepare(
        &mut self,
        path: &Path,
        pod: ObjectRef,
        cgroup: Option<&Path>,
        check: Option<super::Check>,
    ) -> Result<Prepared, AttachError> {
        let name = pod.to_string();
        let netns = NetNs::open(path)?;
        // Open first, then ask: the namespace held is the one checked.
        if let Some(check) = check
            && !check(netns.id().ok())
        {
            return Err(AttachError::NotTheOne { path: path.into() });
        }
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
        let programs = self
            .datapath
            .instance(cookie, self.noop)
            .map_err(|source| AttachError::Load {
                path: path.into(),
                source,
            })?;
        // What an earlier observer left pinned for this namespace (a pod
        // that fails closed): taken over, not attached a second time. With
        // clsact filters too: that observer's TCX links (it ran with TCX)
        // would otherwise count beside them.
        let (mut pinned, filters): (HashMap<String, PathBuf>, HashSet<String>) =
            match self.datapath.node_pins() {
                Some(node) => (
                    node.pod_links(cookie).into_iter().collect(),
                    node.pod_filters(cookie).into_iter().collect(),
                ),
                None => Default::default(),
            };
        let taken_over = !pinned.is_empty() || !filters.is_empty();
        // The socket hooks first, and the storage of the sockets the pod
        // already has: the first packet a tc program classifies then finds
        // its sockets' containers. Without the hooks the pod is observed,
        // and no policy applies to it.
        let mut sock = Vec::new();
        for program in self.datapath.socket_hooks() {
            let Some(pin) = pinned.remove(program) else {
                continue;
            };
            match PinnedLink::from_pin(&pin) {
                Ok(link) => sock.push(taken(program, program, link)),
                Err(err) => {
                    tracing::warn!(%err, pin = %pin.display(), "cannot open a pinned link: attaching anew");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        if !sock.is_empty()
            && let Some(cgroup) = cgroup
        {
            self.datapath.seed_sockets(cgroup);
        }
        // Those not taken over (an earlier observer had fewer hooks, or a
        // pin could not be opened) are attached anew, beside those that
        // were: the pod is never without the ones it had.
        if let Some(cgroup) = cgroup
            && sock.len() != self.datapath.socket_hooks().len()
        {
            let held: Vec<&str> = sock.iter().map(|h| h.program).collect();
            match self.datapath.attach_socket_hooks(cgroup, &held) {
                Ok(links) => sock.extend(links.into_iter().map(|(n, l)| own(n, l))),
                Err(err) => {
                    tracing::warn!(%err, netns = %name, "no socket hooks: no policy, fewer container names");
                }
            }
        }
        Ok(Prepared {
            path: path.into(),
            pod,
            name,
            netns,
            cookie,
            programs,
            pinned,
            filters,
            taken_over,
            sock,
            filters_left: 0,
        })
    }

    /// Records a namespace whose hooks are attached.
    fn finish(&mut self, prepared: Prepared, tc: Vec<Hook>) -> Result<AttachedNetns, AttachError> {
        let Prepared {
            path,
            pod,
            name,
            netns,
            cookie,
            programs,
            pinned,
            filters,
            taken_over,
            sock,
            filters_left,
        } = prepared;
        // Pins and filters of hooks this pod no longer has (an interface
        // gone).
        for (_, pin) in pinned {
            let _ = std::fs::remove_file(pin);
        }
        if let Some(node) = self.datapath.node_pins() {
            for hook in filters {
                node.forget_filter(cookie, &hook);
            }
        }
        let info = AttachedNetns {
            policy_hooks: sock.len() == self.datapath.socket_hooks().len(),
            name,
            pod,
            path: path.clone(),
            cookie,
            netns_id: netns.id().map_err(|source| AttachError::Cookie {
                path: path.clone(),
                source,
            })?,
            programs: tc.len(),
            taken_over,
            filters_left,
        };
        tracing::info!(netns = %info.name, path = %path.display(), cookie, programs = info.programs, policy_hooks = info.policy_hooks, taken_over, "attached");
        let swaps = tc.iter().any(|h| h.swap);
        self.attached.insert(
            cookie,
            Attachment {
                info: info.clone(),
                tc,
                sock,
                netns: (!self.tcx || swaps).then_some(netns),
                programs: swaps.then_some(programs),
            },
        );
        Ok(info)
    }

    fn attach_hooks(&mut self, cookie: u64, cgroup: &Path) -> Result<bool, AttachError> {
        let attachment = self
            .attached
            .get_mut(&cookie)
            .ok_or(AttachError::NotAttached(cookie))?;
        let hooks = self.datapath.socket_hooks().len();
        if attachment.sock.len() != hooks {
            let held: Vec<&str> = attachment.sock.iter().map(|h| h.program).collect();
            match self.datapath.attach_socket_hooks(cgroup, &held) {
                Ok(links) => {
                    tracing::info!(netns = %attachment.info.name, "socket hooks attached");
                    attachment
                        .sock
                        .extend(links.into_iter().map(|(n, l)| own(n, l)));
                    attachment.info.policy_hooks = true;
                }
                Err(err) => {
                    tracing::debug!(%err, netns = %attachment.info.name, "still no socket hooks");
                }
            }
        }
        Ok(attachment.sock.len() == hooks)
    }

    /// Swaps this observer's programs into the links and filters taken
    /// over. A link whose program cannot be replaced (its hook went
    /// meanwhile) is attached anew.
    fn commit(&mut self) -> Committed {
        let Self {
            home,
            datapath,
            attached,
            tcx,
            ..
        } = self;
        let mut committed = Committed::default();
        let Some(node) = datapath.node_pins().cloned() else {
            return committed;
        };
        let tcx = *tcx;
        for (cookie, attachment) in attached.iter_mut() {
            let hooks = attachment.tc.iter().chain(&attachment.sock);
            if !hooks.clone().any(|h| h.swap) {
                continue;
            }
            committed.pods += 1;
            let dir = node.pod(*cookie);
            for hook in attachment.sock.iter_mut().filter(|h| h.swap) {
                let swapped = datapath
                    .hook_fd(hook.program)
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|fd| bpf::swap_program(&dir.join(hook.name), fd));
                match swapped {
                    Ok(()) => hook.swap = false,
                    Err(err) => {
                        tracing::warn!(%err, netns = %attachment.info.name, hook = hook.name, "cannot replace the program of a socket hook taken over");
                    }
                }
            }
            if let (Some(programs), Some(netns)) =
                (attachment.programs.as_mut(), attachment.netns.as_ref())
            {
                let name = &attachment.info.name;
                let mut left = Vec::new();
                for hook in std::mem::take(&mut attachment.tc) {
                    if !hook.swap {
                        attachment.tc.push(hook);
                        continue;
                    }
                    let Held::Link(_) = hook.link else {
                        // Filters are swapped by netlink, in the namespace.
                        left.push(hook);
                        continue;
                    };
                    let swapped = programs
                        .get(hook.program)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|p| {
                            p.fd()
                                .map_err(|e| std::io::Error::other(e.to_string()))
                                .and_then(|fd| bpf::swap_program(&dir.join(hook.name), fd.as_fd()))
                        });
                    match swapped {
                        Ok(()) => attachment.tc.push(Hook {
                            swap: false,
                            ..hook
                        }),
                        Err(err) => {
                            tracing::warn!(%err, netns = %name, hook = hook.name, "cannot replace the program of a link taken over: attaching anew");
                            let _ = std::fs::remove_file(dir.join(hook.name));
                            left.push(Hook {
                                kept: false,
                                ..hook
                            });
                        }
                    }
                }
                let filters_left = &mut committed.filters_left;
                let fresh = netns.run(home, || {
                    left.into_iter()
                        .filter_map(|hook| {
                            take_over_tc(programs, tcx, &node, *cookie, hook, name, filters_left)
                        })
                        .collect::<Vec<_>>()
                });
                match fresh {
                    Ok(fresh) => attachment.tc.extend(fresh),
                    Err(err) => tracing::warn!(%err, netns = %name, "taking over the tc hooks"),
                }
            }
            attachment.programs = None;
            if tcx {
                attachment.netns = None;
            }
            tracing::info!(netns = %attachment.info.name, cookie, "took over the links an earlier observer left: they run this observer's programs");
        }
        committed
    }

    /// Keeps the hooks of the pods in `closed` for the next observer (and
    /// lets everyone else's go). Returns the pods whose hooks could not all
    /// be kept: no `--pin-dir`, or a failed pin.
    fn fail_closed(&mut self, closed: &HashSet<u64>) -> HashSet<u64> {
        let mut failed = HashSet::new();
        let node = self.datapath.node_pins();
        for (cookie, attachment) in &mut self.attached {
            let want = closed.contains(cookie);
            let Some(node) = node else {
                if want {
                    failed.insert(*cookie);
                }
                continue;
            };
            let dir = node.pod(*cookie);
            let mut hooks = attachment.tc.iter_mut().chain(attachment.sock.iter_mut());
            if want {
                let mut hooks = hooks
                    .filter(|h| !h.kept && !matches!(h.link, Held::Baseline { .. }))
                    .peekable();
                if hooks.peek().is_none() {
                    continue;
                }
                if let Err(err) = std::fs::create_dir_all(&dir) {
                    tracing::warn!(%err, dir = %dir.display(), "cannot pin a pod's links");
                    failed.insert(*cookie);
                    continue;
                }
                for hook in hooks {
                    if let Err(err) = hook.keep(node, *cookie, &dir) {
                        tracing::warn!(%err, netns = %attachment.info.name, hook = hook.name, "cannot keep a hook for the next observer: the pod fails open");
                        failed.insert(*cookie);
                    }
                }
            } else if hooks.any(|h| h.kept) {
                // The observer's descriptors keep the links attached, and
                // its filters stay until it goes.
                for hook in attachment.tc.iter_mut().chain(attachment.sock.iter_mut()) {
                    hook.kept = false;
                }
                node.remove_pod(*cookie);
            }
        }
        failed
    }

    /// Pinned pods not attached by this observer, whose links still have
    /// their hooks; pins of the others (dead hooks) are removed.
    fn unclaimed(&mut self) -> Vec<u64> {
        let Some(node) = self.datapath.node_pins() else {
            return Vec::new();
        };
        let mut live = Vec::new();
        for cookie in node.pinned_pods() {
            if self.attached.contains_key(&cookie) {
                continue;
            }
            let alive = node
                .pod_links(cookie)
                .iter()
                .any(|(_, pin)| bpf::is_live(pin).unwrap_or(false));
            if alive {
                live.push(cookie);
            } else {
                tracing::info!(cookie, "removing the pinned links of a pod that is gone");
                node.remove_pod(cookie);
            }
        }
        live
    }

    fn detach(&mut self, cookie: u64) -> Result<(), AttachError> {
        let attachment = self
            .attached
            .remove(&cookie)
            .ok_or(AttachError::NotAttached(cookie))?;
        let name = attachment.info.name.clone();
        self.release(attachment, true);
        tracing::info!(netns = %name, cookie, "detached");
        Ok(())
    }

    /// Lets an attachment go. `unpin`: its pins go too (the pod is
    /// detached for good), so that every link detaches.
    fn release(&self, attachment: Attachment, unpin: bool) {
        let Attachment {
            info,
            tc,
            sock,
            netns,
            ..
        } = attachment;
        if unpin && let Some(node) = self.datapath.node_pins() {
            node.remove_pod(info.cookie);
        }
        drop(sock);
        // The filters of a pod that fails closed stay, for the next
        // observer (a pinned link stays by its pin).
        let (left, tc): (Vec<Hook>, Vec<Hook>) = tc
            .into_iter()
            .partition(|h| !unpin && h.kept && matches!(h.link, Held::Filter(..)));
        for hook in left {
            if let Held::Filter(link, _) = hook.link {
                std::mem::forget(link);
            }
        }
        match netns {
            // clsact filters are removed by netlink, inside their namespace.
            Some(netns) => {
                if let Err(err) = netns.run(&self.home, || release_tc(tc, &info.name)) {
                    tracing::warn!(%err, netns = %info.name, "detaching");
                }
            }
            // TCX links are file descriptors: closing one detaches it, from
            // any namespace, and they go away with the interface anyway.
            None => drop(tc),
        }
    }
}

/// Detaches a pod's tc hooks, inside its namespace (the calling thread is
/// in it). A clsact filter that runs another program than the one this
/// observer put there stays: the next observer, started before this one
/// went (two on a node without `--pin-dir`), swapped its own into it in
/// place, and removing it would leave the pod unobserved, its policy
/// unenforced, while that observer counts on it. (A swap between the
/// question and the removal, a netlink request apart, is not seen:
/// clsact has no removal on condition. One observer at a time holds a
/// node's pin directory, bpffs.rs, so with `--pin-dir` two never meet.)
/// A filter whose program this observer could not tell (its id could not
/// be read) is removed, as before the question was asked.
fn release_tc(tc: Vec<Hook>, netns: &str) {
    for hook in tc {
        match hook.link {
            Held::Filter(link, Some(ours)) => {
                let (interface, direction) = tc_point(hook.name);
                if runs_another_program(interface, direction, ours) {
                    tracing::info!(
                        netns,
                        hook = hook.name,
                        "left the filter in place: it runs another observer's program now"
                    );
                    std::mem::forget(link);
                } else {
                    drop(link);
                }
            }
            other => drop(other),
        }
    }
}

/// A socket hook's link of this observer's (its pin is named after its
/// program).
fn own(program: &'static str, link: BpfLink) -> Hook {
    Hook {
        name: program,
        program,
        link: Held::Link(link),
        kept: false,
        swap: false,
    }
}

/// A link an earlier observer pinned: it runs that observer's program
/// until [`Worker::commit`].
fn taken(name: &'static str, program: &'static str, link: PinnedLink) -> Hook {
    Hook {
        name,
        program,
        link: Held::Link(BpfLink::Aya(FdLink::from(link))),
        kept: true,
        swap: true,
    }
}

/// A tc hook taken over whose program [`Worker::commit`] did not swap by
/// its pin: a filter an earlier observer left, or a link whose swap failed
/// (its hook went meanwhile). Made to run this observer's program, in the
/// pod's namespace (the calling thread is in it): a filter by swapping the
/// program in place with clsact filters, or by attaching the TCX link and
/// then removing the filter; anything else is attached anew.
/// A filter that stays beside the new link adds to `filters_left`.
fn take_over_tc(
    programs: &mut Programs,
    tcx: bool,
    node: &NodePins,
    cookie: u64,
    hook: Hook,
    netns: &str,
    filters_left: &mut usize,
) -> Option<Hook> {
    let (interface, direction) = tc_point(hook.name);
    let Hook {
        name,
        program,
        link,
        kept,
        ..
    } = hook;
    let ours = |link, kept| Hook {
        name,
        program,
        link,
        kept,
        swap: false,
    };
    match link {
        Held::Filter(left, _) if !tcx => match swap_filter(programs, left, direction) {
            Ok((link, program)) => return Some(ours(Held::Filter(link, program), kept)),
            Err(err) => {
                tracing::warn!(%err, netns, hook = name, "cannot replace the program of a filter taken over: attaching anew");
                node.forget_filter(cookie, name);
            }
        },
        Held::Filter(left, program) => {
            // The link first: the filter goes once it is there (a packet
            // in between is counted twice; none meets no program).
            return match attach_held(programs, true, interface, direction) {
                Ok((link, filter_left)) => {
                    // Removed by netlink already, or it cannot be (said in
                    // the log, counted by the caller).
                    *filters_left += usize::from(filter_left);
                    std::mem::forget(left);
                    let mut hook = ours(link, false);
                    // Pinned at once: the filter it replaces was kept.
                    let dir = node.pod(cookie);
                    if kept && let Err(err) = hook.keep(node, cookie, &dir) {
                        tracing::warn!(%err, netns, hook = name, "cannot pin a link");
                    }
                    node.forget_filter(cookie, name);
                    Some(hook)
                }
                Err(err) => {
                    tracing::warn!(%err, netns, hook = name, "cannot attach a TCX link: the filter taken over keeps the earlier observer's program");
                    Some(ours(Held::Filter(left, program), kept))
                }
            };
        }
        other => drop(other),
    }
    match attach_held(programs, tcx, interface, direction) {
        Ok((link, filter_left)) => {
            *filters_left += usize::from(filter_left);
            Some(ours(link, false))
        }
        Err(err) => {
            tracing::warn!(%err, netns, interface, "attaching anew");
            None
        }
    }
}

/// Attaches the program for `direction` to `interface`, as held; and
/// whether a filter an earlier observer left stays beside it.
fn attach_held(
    programs: &mut Programs,
    tcx: bool,
    interface: &str,
    direction: TcAttachType,
) -> Result<(Held, bool), String> {
    let attached = attach_one(programs, tcx, interface, direction).map_err(|e| e.to_string())?;
    let filter_left = attached.filter_left;
    let link = held(attached, tcx).map_err(|e| e.to_string())?;
    Ok((link, filter_left))
}

/// A tc link as held: a TCX link is a bpf link; a clsact filter is not.
fn held(attached: TcLink, tcx: bool) -> Result<Held, LinkError> {
    if tcx {
        FdLink::try_from(attached.link).map(|link| Held::Link(BpfLink::Aya(link)))
    } else {
        Ok(Held::Filter(attached.link, attached.program))
    }
}
