//! Unix-socket and named-pipe traffic (observer-ebpf/src/ipc.rs): where the
//! fields its programs read lie in this kernel (from its BTF), attaching
//! them once for the node, and the maps they count in. They follow only
//! the attached pods' network namespaces (`IPC_PODS`, which the collector
//! keeps).
//!
//! They attach to raw tracepoints: `sock_send_length` and
//! `sock_recv_length` (Linux 6.4 and later) and, for named pipes if asked
//! (`--named-pipes`: it runs after every system call of the node),
//! `sys_exit`. A kernel
//! without one of them loses only what that program counts: the rest is
//! attached, and the log and `observer_ipc_hooks_attached` say what is
//! missing.

use std::os::fd::AsFd;

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError},
    programs::{ProgramError, RawTracePoint},
};
use observer_common::NodeInfo;
use observer_common::ipc::{
    FIFO_FLOWS_MAP, FIFO_NAMES_MAP, FifoId, FifoKey, FifoName, IPC_NODE_MAP, IPC_PODS_MAP,
    IpcCounts, KernelOffsets, RetiredKey, UNIX_CONNS_MAP, UNIX_PATHS_MAP, UNIX_RECEIVERS_MAP,
    UNIX_RETIRED_MAP, UnixConn, UnixConnKey, UnixPath, UnixPathKey, follow,
};

use super::btf::{BtfError, KernelBtf};

/// Each program and the raw tracepoint it attaches to: unix sockets...
const PROGRAMS: [(&str, &str); 2] = [
    ("unix_sent", "sock_send_length"),
    ("unix_received", "sock_recv_length"),
];
/// ... and named pipes.
const PIPE_PROGRAM: (&str, &str) = ("fifo_called", "sys_exit");

/// The offsets of the fields the programs read, in this kernel.
pub fn offsets(btf: &KernelBtf) -> Result<KernelOffsets, BtfError> {
    // The system call's number and first argument, as x86-64 saves them
    // (the named-pipe program knows x86-64's call numbers only).
    let (regs_syscall, regs_arg0) = if cfg!(target_arch = "x86_64") {
        (btf.offset("pt_regs.orig_ax")?, btf.offset("pt_regs.di")?)
    } else {
        return Err(BtfError::NoField(
            "pt_regs (named pipes are followed on x86-64 only)".into(),
        ));
    };
    Ok(KernelOffsets {
        sock_family: btf.offset("sock.__sk_common.skc_family")?,
        sock_type: btf.offset("sock.sk_type")?,
        sock_net: btf.offset("sock.__sk_common.skc_net.net")?,
        sock_cgroup: btf.offset("sock.sk_cgrp_data.cgroup")?,
        net_cookie: btf.offset("net.net_cookie")?,
        cgroup_kn: btf.offset("cgroup.kn")?,
        kernfs_node_id: btf.offset("kernfs_node.id")?,
        sock_socket: btf.offset("sock.sk_socket")?,
        socket_inode: btf.offset("socket_alloc.vfs_inode")? + btf.offset("inode.i_ino")?,
        unix_sock_peer: btf.offset("unix_sock.peer")?,
        unix_sock_addr: btf.offset("unix_sock.addr")?,
        unix_address_len: btf.offset("unix_address.len")?,
        unix_address_name: btf.offset("unix_address.name")?,
        regs_syscall,
        regs_arg0,
        task_nsproxy: btf.offset("task_struct.nsproxy")?,
        task_files: btf.offset("task_struct.files")?,
        nsproxy_net_ns: btf.offset("nsproxy.net_ns")?,
        files_fdt: btf.offset("files_struct.fdt")?,
        fdtable_fd: btf.offset("fdtable.fd")?,
        fdtable_max_fds: btf.offset("fdtable.max_fds")?,
        file_inode: btf.offset("file.f_inode")?,
        file_dentry: btf.offset("file.f_path.dentry")?,
        dentry_name: btf.offset("dentry.d_name.name")?,
        inode_mode: btf.offset("inode.i_mode")?,
        inode_ino: btf.offset("inode.i_ino")?,
        inode_sb: btf.offset("inode.i_sb")?,
        super_block_dev: btf.offset("super_block.s_dev")?,
        super_block_magic: btf.offset("super_block.s_magic")?,
        // 0 where the kernel has no unix-socket hooks (before 6.7): the
        // unix-socket policy is then not loaded (see `unix_hooks`).
        sock_addr_sk: btf.offset("bpf_sock_addr_kern.sk").unwrap_or(0),
        sock_addr_uaddr: btf.offset("bpf_sock_addr_kern.uaddr").unwrap_or(0),
        sock_addr_uaddrlen: btf.offset("bpf_sock_addr_kern.uaddrlen").unwrap_or(0),
    })
}

/// The programs asked for (`--unix-sockets`, `--named-pipes`), with their
/// tracepoints.
pub fn asked(
    unix_sockets: bool,
    named_pipes: bool,
) -> impl Iterator<Item = (&'static str, &'static str)> {
    PROGRAMS
        .into_iter()
        .filter(move |_| unix_sockets)
        .chain(named_pipes.then_some(PIPE_PROGRAM))
}

/// Loads and attaches the IPC programs of `ebpf` (their links live as long
/// as `ebpf` does) that are asked for. Returns, for each tracepoint asked
/// for, whether it is followed.
pub fn attach(ebpf: &mut Ebpf, unix_sockets: bool, named_pipes: bool) -> Vec<(&'static str, bool)> {
    asked(unix_sockets, named_pipes)
        .map(|(name, tracepoint)| {
            let attached = attach_one(ebpf, name, tracepoint)
                .inspect_err(|err| {
                    tracing::warn!(
                        %err,
                        tracepoint,
                        "cannot attach: the unix-socket or named-pipe traffic it sees is not counted"
                    );
                })
                .is_ok();
            (tracepoint, attached)
        })
        .collect()
}

fn attach_one(ebpf: &mut Ebpf, name: &str, tracepoint: &str) -> Result<(), ProgramError> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    program.load()?;
    program.attach(tracepoint)?;
    Ok(())
}

/// The maps the daemon reads and writes.
pub struct IpcMaps {
    /// Each followed pod to what of its IPC is followed ([`follow`] bits).
    pub pods: HashMap<MapData, u64, u8>,
    /// What is followed of every pod's IPC.
    following: u8,
    pub unix_conns: HashMap<MapData, UnixConnKey, UnixConn>,
    /// Connections whose ends a new connection took before they were
    /// counted to their last message.
    pub unix_retired: HashMap<MapData, RetiredKey, UnixConn>,
    pub unix_paths: HashMap<MapData, UnixPathKey, UnixPath>,
    pub fifo_flows: HashMap<MapData, FifoKey, IpcCounts>,
    pub fifo_names: HashMap<MapData, FifoId, FifoName>,
    /// Who receives on a path: the server of datagrams sent there with an
    /// address.
    pub unix_receivers: HashMap<MapData, UnixPathKey, u64>,
    /// The pods' cgroup: the programs' first filter.
    pub node: Array<MapData, NodeInfo>,
}

impl IpcMaps {
    /// The maps of `ebpf`, for pods whose unix sockets and named pipes are
    /// followed where `hooks` ([`attach`]'s) say their tracepoints are
    /// attached: a cgroup hook of the unix-socket policy runs either way,
    /// and keeps nothing for a count no tracepoint makes.
    pub fn take(ebpf: &mut Ebpf, hooks: &[(&str, bool)]) -> Result<Self, MapError> {
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, MapError> {
            ebpf.take_map(name)
                .ok_or(MapError::InvalidName {
                    name: name.to_owned(),
                })?
                .try_into()
        }
        let attached = |tracepoint: &str| {
            hooks
                .iter()
                .any(|(attached, ok)| *attached == tracepoint && *ok)
        };
        let unix_sockets = PROGRAMS.iter().all(|(_, tracepoint)| attached(tracepoint));
        let named_pipes = attached(PIPE_PROGRAM.1);
        let following = [
            (unix_sockets, follow::UNIX_SOCKETS),
            (named_pipes, follow::NAMED_PIPES),
        ]
        .into_iter()
        .filter(|(followed, _)| *followed)
        .fold(0, |bits, (_, bit)| bits | bit);
        Ok(Self {
            pods: typed(ebpf, IPC_PODS_MAP)?,
            following,
            unix_conns: typed(ebpf, UNIX_CONNS_MAP)?,
            unix_retired: typed(ebpf, UNIX_RETIRED_MAP)?,
            unix_paths: typed(ebpf, UNIX_PATHS_MAP)?,
            fifo_flows: typed(ebpf, FIFO_FLOWS_MAP)?,
            fifo_names: typed(ebpf, FIFO_NAMES_MAP)?,
            unix_receivers: typed(ebpf, UNIX_RECEIVERS_MAP)?,
            node: typed(ebpf, IPC_NODE_MAP)?,
        })
    }

    /// Tells the programs the cgroup all pods' cgroups are under (and its
    /// level): a process outside it stops at their first test.
    pub fn set_pods_cgroup(&mut self, cgroup: u64, level: u32) -> Result<(), MapError> {
        let node = NodeInfo {
            pods_cgroup: cgroup,
            pods_level: level,
            _pad: 0,
        };
        self.node.set(0, node, 0)
    }

    /// Follows the IPC of the pod with this network namespace cookie (what
    /// of it is asked for).
    pub fn follow(&mut self, netns: u64) -> Result<(), MapError> {
        self.pods.insert(netns, self.following, 0)
    }

    /// Stops following a pod, and removes what the maps hold of it.
    ///
    /// Every map is gone through, even after one that cannot be read: the
    /// error of the last such map is returned (the pod's entries in it
    /// stay there).
    pub fn forget(&mut self, netns: u64) -> std::io::Result<()> {
        let _ = self.pods.remove(&netns);
        [
            remove_where(&mut self.unix_conns, |_, c| c.netns == netns),
            remove_where(&mut self.unix_retired, |_, c| c.netns == netns),
            remove_where(&mut self.fifo_flows, |k, _| k.netns == netns),
            remove_where(&mut self.unix_paths, |k, _| k.netns == netns),
            remove_where(&mut self.unix_receivers, |k, _| k.netns == netns),
            remove_where(&mut self.fifo_names, |_, n| n.netns == netns),
        ]
        .into_iter()
        .filter_map(Result::err)
        .last()
        .map_or(Ok(()), Err)
    }
}

/// Removes the entries of `map` that `gone` says are gone (read in
/// batches; one removal per entry).
fn remove_where<K, V>(
    map: &mut HashMap<MapData, K, V>,
    gone: impl Fn(&K, &V) -> bool,
) -> std::io::Result<()>
where
    K: aya::Pod + Default + Send,
    V: aya::Pod + Default + Send,
{
    for (key, value) in super::bpf::entries::<K, V>(map.map().fd().as_fd())? {
        if gone(&key, &value) {
            let _ = map.remove(&key);
        }
    }
    Ok(())
}
