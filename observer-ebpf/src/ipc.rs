//! Unix-socket and named-pipe traffic between a pod's containers: nothing
//! on the network sees it. Counted at raw tracepoints, which every kernel
//! since 6.4 has and which need neither kprobes nor function tracing
//! (`fentry`), both of which kernels may lack or forbid:
//!
//! - `sock_send_length` (after a socket's `sendmsg()`, with the bytes
//!   sent): a message on a unix connection, or of a datagram socket
//!   connected to a bound one, counted per connection (`UNIX_CONNS`), in
//!   the direction of its sender;
//! - `sock_recv_length` (after a `recvmsg()`): the server's process reading
//!   its end of a connection names the server's container;
//! - `sys_exit` (after every system call; attached only if asked for, as
//!   it costs every system call of the node): a read or write of a named
//!   pipe, by container (`FIFO_FLOWS`).
//!
//! They run for every socket message, or system call, of the node: each
//! first tells in a few loads whether the call is one of an attached pod
//! (the socket's family, then the caller's cgroup, then `IPC_PODS` by
//! network namespace), and does nothing else otherwise. Their cost on the
//! pods' TCP and UDP is in `cargo xtask bench`'s per-program table.
//! Kernel structures are read with `bpf_probe_read_kernel` at the offsets
//! the daemon found in the running kernel's BTF ([`KernelOffsets`]): Rust
//! eBPF has no CO-RE relocations.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes,
        generated::bpf_probe_read_kernel as probe_read,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::RawTracePointContext,
};
use observer_common::NodeInfo;
use observer_common::ipc::{
    AF_UNIX, Addressed, FIFO_FLOWS_CAPACITY, FifoId, FifoKey, FifoName, IPC_PODS_CAPACITY,
    IpcCounts, KernelOffsets, PIPEFS_MAGIC, RetiredKey, S_IFIFO, S_IFMT, Sent,
    UNIX_ADDRESSED_CAPACITY, UNIX_CONNS_CAPACITY, UNIX_PATH_MAX, UNIX_PATHS_CAPACITY,
    UNIX_RETIRED_CAPACITY, UnixConn, UnixConnKey, UnixPath, UnixPathKey, follow, path_hash,
    server_check, syscall, unix_kind,
};

use crate::handoff::bump_stats;

const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// Network namespace cookies of attached pods, to what of their IPC is
/// followed ([`follow`] bits), written by the daemon.
#[map]
static IPC_PODS: HashMap<u64, u8> = HashMap::with_max_entries(IPC_PODS_CAPACITY, NO_PREALLOC);

#[map]
static UNIX_CONNS: HashMap<UnixConnKey, UnixConn> =
    HashMap::with_max_entries(UNIX_CONNS_CAPACITY, NO_PREALLOC);

/// Connections whose ends a new connection took before the daemon counted
/// all of theirs (see [`take_counts`]).
#[map]
static UNIX_RETIRED: HashMap<RetiredKey, UnixConn> =
    HashMap::with_max_entries(UNIX_RETIRED_CAPACITY, NO_PREALLOC);

#[map]
static UNIX_PATHS: HashMap<UnixPathKey, UnixPath> =
    HashMap::with_max_entries(UNIX_PATHS_CAPACITY, NO_PREALLOC);

/// The pods' cgroup, written by the daemon once it knows it.
#[map]
static IPC_NODE: Array<NodeInfo> = Array::with_max_entries(1, 0);

#[map]
static UNIX_ADDRESSED: LruHashMap<u64, Addressed> =
    LruHashMap::with_max_entries(UNIX_ADDRESSED_CAPACITY, 0);

#[map]
static UNIX_RECEIVERS: HashMap<UnixPathKey, u64> =
    HashMap::with_max_entries(UNIX_PATHS_CAPACITY, NO_PREALLOC);

/// Bound datagram sockets whose receiver is in [`UNIX_RECEIVERS`] already:
/// a lookup instead of hashing the path at every datagram.
#[map]
static RECEIVING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(UNIX_PATHS_CAPACITY, 0);

#[map]
static FIFO_FLOWS: HashMap<FifoKey, IpcCounts> =
    HashMap::with_max_entries(FIFO_FLOWS_CAPACITY, NO_PREALLOC);

#[map]
static FIFO_NAMES: HashMap<FifoId, FifoName> =
    HashMap::with_max_entries(FIFO_FLOWS_CAPACITY, NO_PREALLOC);

/// A path or name being read: 128 bytes are too many for the stack next to
/// the rest.
#[map]
static SCRATCH: PerCpuArray<UnixPath> = PerCpuArray::with_max_entries(1, 0);

/// Set at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    sock_family: 0,
    sock_type: 0,
    sock_net: 0,
    sock_cgroup: 0,
    net_cookie: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    sock_socket: 0,
    socket_inode: 0,
    unix_sock_peer: 0,
    unix_sock_addr: 0,
    unix_address_len: 0,
    unix_address_name: 0,
    regs_syscall: 0,
    regs_arg0: 0,
    task_nsproxy: 0,
    task_files: 0,
    nsproxy_net_ns: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    file_inode: 0,
    file_dentry: 0,
    dentry_name: 0,
    inode_mode: 0,
    inode_ino: 0,
    inode_sb: 0,
    super_block_dev: 0,
    super_block_magic: 0,
    sock_addr_sk: 0,
    sock_addr_uaddr: 0,
    sock_addr_uaddrlen: 0,
};

/// A socket sent (`sock_send_length(struct sock *sk, int ret, int flags)`).
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn unix_sent(ctx: RawTracePointContext) -> i32 {
    let _ = sent(&ctx);
    0
}

/// A socket received (`sock_recv_length(struct sock *sk, int ret, int flags)`).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn unix_received(ctx: RawTracePointContext) -> i32 {
    let _ = received(&ctx);
    0
}

/// A system call returns (`sys_exit(struct pt_regs *regs, long ret)`).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn fifo_called(ctx: RawTracePointContext) -> i32 {
    let _ = fifo(&ctx);
    0
}

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: a plain read; volatile so that the value set at load time is read.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// A `T` of kernel memory at `address + offset`.
#[inline(always)]
pub(crate) fn read<T>(address: u64, offset: u32) -> Option<T> {
    if address == 0 {
        return None;
    }
    // SAFETY: the helper checks the address and fails rather than fault.
    unsafe { bpf_probe_read_kernel((address + u64::from(offset)) as *const T) }.ok()
}

/// Whether the calling process is outside the pods' cgroup (where it is
/// known): no pod's, before any memory is read.
#[inline(always)]
fn outside_pods() -> bool {
    let Some(node) = IPC_NODE.get(0) else {
        return false;
    };
    // SAFETY: a plain helper.
    node.pods_cgroup != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(node.pods_level as i32) } != node.pods_cgroup
}

/// Whether `netns` is an attached pod's whose IPC of this kind
/// ([`follow`]) is followed.
#[inline(always)]
fn pod(netns: u64, kind: u8) -> Option<()> {
    // SAFETY: a plain lookup.
    unsafe { IPC_PODS.get(&netns) }
        .filter(|followed| **followed & kind != 0)
        .map(|_| ())
}

/// The network namespace (cookie) of a `struct sock`.
#[inline(always)]
fn sock_netns(sk: u64, o: &KernelOffsets) -> Option<u64> {
    read(read::<u64>(sk, o.sock_net)?, o.net_cookie)
}

/// The cgroup (id) of the process that made a `struct sock`.
#[inline(always)]
fn sock_cgroup(sk: u64, o: &KernelOffsets) -> Option<u64> {
    let cgroup: u64 = read(sk, o.sock_cgroup)?;
    read(read::<u64>(cgroup, o.cgroup_kn)?, o.kernfs_node_id)
}

#[inline(always)]
fn current_cgroup() -> u64 {
    // SAFETY: a plain helper.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Whether `sk` is a unix socket of a process in the pods' cgroup: the
/// first test of every socket message of the node. The family first: one
/// read, and no more work for the pods' own TCP and UDP (the messages
/// that come by the million), where the cgroup's test would pass.
#[inline(always)]
fn pods_unix_socket(sk: u64) -> bool {
    // SAFETY: a plain read of one field; volatile, as in `offsets`.
    let family = unsafe { core::ptr::read_volatile(&raw const KERNEL_OFFSETS.sock_family) };
    read::<u16>(sk, family) == Some(AF_UNIX) && !outside_pods()
}

/// A unix socket ([`pods_unix_socket`]) of an attached pod: its network
/// namespace, its kind and its peer (0 for a datagram socket that is not
/// connected).
#[inline(always)]
fn pod_unix_socket(sk: u64, o: &KernelOffsets) -> Option<(u64, u8, u64)> {
    let netns = sock_netns(sk, o)?;
    pod(netns, follow::UNIX_SOCKETS)?;
    let peer: u64 = read(sk, o.unix_sock_peer)?;
    Some((netns, read::<u16>(sk, o.sock_type)? as u8, peer))
}

/// The connection `sk` is an end of, and whether it is the server's end.
/// The server's end of a stream connection has the listening socket's
/// address (the kernel copies it at `connect()`), the client's has none
/// (unless the client bound one: then the end a process of another
/// container than the one that connected uses is the server's). A
/// datagram socket's peer is the bound socket it sends to.
#[inline(always)]
fn ends(
    sk: u64,
    peer: u64,
    kind: u8,
    current: u64,
    o: &KernelOffsets,
) -> Option<(UnixConnKey, bool)> {
    let own: u64 = read(sk, o.unix_sock_addr)?;
    let theirs: u64 = read(peer, o.unix_sock_addr)?;
    let server_side = match (own != 0, theirs != 0) {
        // A socketpair: no path, no server.
        (false, false) => return None,
        _ if kind == unix_kind::DGRAM => false,
        (true, false) => true,
        (false, true) => false,
        // Both named: a client that sends credentials has a name the
        // kernel gave it (autobind); else the end a process of another
        // container than the one that connected uses is the server's.
        (true, true) => match (autobound(own, o)?, autobound(theirs, o)?) {
            (true, false) => false,
            (false, true) => true,
            _ => match sock_cgroup(sk, o) {
                Some(made_by) if made_by != current => true,
                // Not to be told apart: not counted, rather than wrong.
                _ => return None,
            },
        },
    };
    let key = if server_side {
        UnixConnKey {
            server_end: sk,
            client_end: peer,
        }
    } else {
        UnixConnKey {
            server_end: peer,
            client_end: sk,
        }
    };
    Some((key, server_side))
}

/// Whether a `struct unix_address` is a name the kernel gave a socket
/// (autobind: a NUL and five hex digits), not one a server bound.
#[inline(always)]
fn autobound(address: u64, o: &KernelOffsets) -> Option<bool> {
    let len: i32 = read(address, o.unix_address_len)?;
    let first: u8 = read(address, o.unix_address_name + 2)?;
    Some(len == 2 + 6 && first == 0)
}

/// The path a unix socket is bound to, in this CPU's scratch slot, and
/// its hash; `None` if it has none.
#[inline(always)]
fn sock_path(sk: u64, o: &KernelOffsets) -> Option<(&'static mut UnixPath, u64)> {
    let address: u64 = read(sk, o.unix_sock_addr)?;
    let len: i32 = read(address, o.unix_address_len)?;
    // After `sun_family`, two bytes.
    let len = (len - 2).clamp(0, UNIX_PATH_MAX as i32) as u32;
    let path = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, for this program's run.
    let path = unsafe { &mut *path };
    // SAFETY: the helper checks the source; `len` is at most the
    // destination's size.
    let failed = unsafe {
        probe_read(
            path.bytes.as_mut_ptr().cast(),
            len,
            (address + u64::from(o.unix_address_name) + 2) as *const _,
        )
    };
    if failed != 0 {
        return None;
    }
    path.len = len as u16;
    let hash = path_hash(&path.bytes, len as usize);
    Some((path, hash))
}

/// The connection's entry, made at its first message (or read). A new
/// connection on the same two sockets' memory (its client socket's inode
/// differs) takes the entry over, the one before retired ([`take_counts`],
/// [`keep_retired`]).
#[inline(always)]
fn connection(
    key: &UnixConnKey,
    netns: u64,
    kind: u8,
    server_side: bool,
    current: u64,
    o: &KernelOffsets,
) -> Option<*mut UnixConn> {
    let conn = match UNIX_CONNS.get_ptr_mut(key) {
        Some(conn) => conn,
        None => new_connection(key, netns, kind, server_side, current, o)?,
    };
    if kind != unix_kind::DGRAM {
        // The client's socket, while its process holds it (0 once closed).
        let inode = read::<u64>(key.client_end, o.sock_socket)
            .filter(|&socket| socket != 0)
            .and_then(|socket| read::<u64>(socket, o.socket_inode));
        // SAFETY: a live, 8-byte aligned map value. Exchanged, so that of
        // two CPUs seeing the connection's first messages at once (its
        // client's send, its server's read) only one counts it.
        unsafe {
            if let Some(inode) = inode
                && (*conn).client_inode != inode
            {
                // The server of the connection before, and its check:
                // read before the exchange, as no event of the new
                // connection can have set it yet (they all see the new
                // inode after it).
                let (server_before, check) = ((*conn).server, (*conn).server_check);
                // A new connection on the same two sockets' memory (the
                // kernel reuses it at once): its client and path are found
                // before the exchange, so that they are the entry's right
                // after it.
                let reused = (*conn).client_inode != 0;
                // (Its server is not: it stays unknown, see below.)
                let (client, _, path) = if reused {
                    identity(key, netns, kind, server_side, current, o)
                } else {
                    (0, 0, 0)
                };
                let before = atomic_xchg::<u64, { Relaxed }>(&raw mut (*conn).client_inode, inode);
                if reused && before != 0 && before != inode {
                    // The one before is retired with what it counted, for
                    // the daemon to count under its own path and
                    // containers, and the entry is this one's from zero.
                    // Its server stays, with the one before's check (so not
                    // this one's), until this one's server process uses its
                    // end. A message another CPU adds between the exchange
                    // and the takes is the one before's: closing that would
                    // take a `bpf_spin_lock`, which aya's maps cannot hold.
                    let retired = take_counts(conn, before, server_before, check);
                    (*conn).netns = netns;
                    (*conn).client = client;
                    (*conn).path = path;
                    (*conn).kind = kind;
                    keep_retired(key, &retired);
                }
                if before != inode {
                    atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*conn).connections, 1);
                }
            }
        }
    }
    Some(conn)
}

/// Takes what a connection counted out of its entry `conn` (exchanged:
/// what the next connection adds from then on stays), as the record of the
/// connection whose client's inode is `inode`, with its `server` (and
/// its check: `server_check`).
///
/// # Safety
/// `conn` is a live map value.
#[inline(always)]
unsafe fn take_counts(conn: *mut UnixConn, inode: u64, server: u64, check: u64) -> UnixConn {
    // SAFETY: as the caller says; other CPUs add to it meanwhile.
    unsafe {
        let take = |at: *mut u64| atomic_xchg::<u64, { Relaxed }>(at, 0);
        UnixConn {
            to_server: Sent {
                messages: take(&raw mut (*conn).to_server.messages),
                bytes: take(&raw mut (*conn).to_server.bytes),
            },
            to_client: Sent {
                messages: take(&raw mut (*conn).to_client.messages),
                bytes: take(&raw mut (*conn).to_client.bytes),
            },
            connections: take(&raw mut (*conn).connections),
            client_inode: inode,
            server,
            server_check: check,
            ..*conn
        }
    }
}

/// Keeps a retired connection's record in [`UNIX_RETIRED`] for the
/// daemon. No room: counted as lost.
#[inline(always)]
fn keep_retired(key: &UnixConnKey, retired: &UnixConn) {
    let at = RetiredKey {
        conn: *key,
        client_inode: retired.client_inode,
    };
    if UNIX_RETIRED.insert(&at, retired, 0).is_err() {
        bump_stats(|s| s.ipc_lost += 1);
    }
}

/// A connection's client and server containers (the server 0 while not
/// known) and its path's hash (kept for the daemon).
#[inline(always)]
fn identity(
    key: &UnixConnKey,
    netns: u64,
    kind: u8,
    server_side: bool,
    current: u64,
    o: &KernelOffsets,
) -> (u64, u64, u64) {
    let path = match sock_path(key.server_end, o) {
        Some((path, hash)) => {
            path.netns = netns;
            keep_path(netns, hash, path);
            hash
        }
        None => 0,
    };
    // The process that connected made the client's end (and, for a
    // stream, the server's end too).
    let client = sock_cgroup(key.client_end, o).unwrap_or(current);
    let server = if kind == unix_kind::DGRAM {
        // A datagram's receiver made its own socket.
        sock_cgroup(key.server_end, o).unwrap_or(0)
    } else if server_side {
        current
    } else {
        0
    };
    (client, server, path)
}

#[inline(always)]
fn new_connection(
    key: &UnixConnKey,
    netns: u64,
    kind: u8,
    server_side: bool,
    current: u64,
    o: &KernelOffsets,
) -> Option<*mut UnixConn> {
    let (client, server, path) = identity(key, netns, kind, server_side, current, o);
    let conn = UnixConn {
        netns,
        client,
        server,
        path,
        to_server: Sent::default(),
        to_client: Sent::default(),
        connections: 0,
        client_inode: 0,
        kind,
        addressed: 0,
        _pad: [0; 6],
        // Known from the start for datagrams (no client inode); a stream's
        // server is set again once the entry has its client's inode.
        server_check: server_check(server, 0),
    };
    insert_connection(key, &conn)
}

/// Makes a connection's entry: another CPU may have made it first (then
/// that one is counted in); one that finds no room is counted as lost.
#[inline(always)]
fn insert_connection(key: &UnixConnKey, conn: &UnixConn) -> Option<*mut UnixConn> {
    let _ = UNIX_CONNS.insert(key, conn, u64::from(BPF_NOEXIST));
    let found = UNIX_CONNS.get_ptr_mut(key);
    if found.is_none() {
        bump_stats(|s| s.ipc_lost += 1);
    }
    found
}

/// Keeps a path's name once, for the daemon's label.
#[inline(always)]
fn keep_path(netns: u64, hash: u64, path: &UnixPath) {
    let at = UnixPathKey { netns, hash };
    if UNIX_PATHS.insert(&at, path, u64::from(BPF_NOEXIST)).is_err()
        // SAFETY: a plain lookup.
        && unsafe { UNIX_PATHS.get(&at) }.is_none()
    {
        bump_stats(|s| s.ipc_lost += 1);
    }
}

#[inline(always)]
fn sent(ctx: &RawTracePointContext) -> Option<()> {
    let sk: u64 = ctx.arg(0);
    let bytes = ctx.arg::<u64>(1) as i32;
    if bytes <= 0 || !pods_unix_socket(sk) {
        return None;
    }
    let o = offsets();
    let (netns, kind, peer) = pod_unix_socket(sk, &o)?;
    if peer == 0 {
        return addressed_sent(sk, netns, kind, bytes as u64);
    }
    let current = current_cgroup();
    let (key, server_side) = ends(sk, peer, kind, current, &o)?;
    let conn = connection(&key, netns, kind, server_side, current, &o)?;
    // SAFETY: a live, 8-byte aligned map value; other CPUs add too.
    unsafe {
        let way = if server_side {
            // The server's process: the server (also after a reuse).
            set_server(conn, current);
            &raw mut (*conn).to_client
        } else {
            &raw mut (*conn).to_server
        };
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*way).messages, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*way).bytes, bytes as u64);
    }
    Some(())
}

#[inline(always)]
fn received(ctx: &RawTracePointContext) -> Option<()> {
    let sk: u64 = ctx.arg(0);
    if (ctx.arg::<u64>(1) as i32) <= 0 || !pods_unix_socket(sk) {
        return None;
    }
    let o = offsets();
    let (netns, kind, peer) = pod_unix_socket(sk, &o)?;
    if kind == unix_kind::DGRAM {
        if peer == 0 {
            receiving(sk, netns, &o);
        }
        return None;
    }
    let current = current_cgroup();
    let (key, server_side) = ends(sk, peer, kind, current, &o)?;
    if !server_side {
        return None;
    }
    let conn = connection(&key, netns, kind, server_side, current, &o)?;
    // SAFETY: a live map value.
    unsafe { set_server(conn, current) };
    Some(())
}

/// The connection's server is the container `server`, with its check
/// ([`UnixConn::server_check`]).
///
/// # Safety
/// `conn` is a live map value.
#[inline(always)]
unsafe fn set_server(conn: *mut UnixConn, server: u64) {
    // SAFETY: as the caller says. Racing writers (the server's processes of
    // two containers) may leave one's server with the other's check: no
    // server then, until the next server-side message writes them again.
    unsafe {
        let check = server_check(server, (*conn).client_inode);
        // Set already (every message but a connection's first): no store,
        // so that the entry's cache lines stay shared between the CPUs of
        // its two ends (a version that wrote at every message measured
        // `unix_received` 121 ns a run more in `cargo xtask bench
        // --ipc-only`, a bench whose two builds differ by up to 73 ns
        // by themselves: BENCHMARKS.md).
        if (*conn).server == server && (*conn).server_check == check {
            return;
        }
        core::ptr::write_volatile(&raw mut (*conn).server, server);
        core::ptr::write_volatile(&raw mut (*conn).server_check, check);
    }
}

/// A pod's process is about to send a datagram with an address
/// (`sendto()`): `address` is the kernel's copy of the `sockaddr_un`, of
/// `len` bytes, `hash` its path's [`path_hash`]. Remembered for
/// [`addressed_sent`], with the path's name for the daemon. Called by the
/// unix-socket `sendmsg()` hook, which sees the address (the tracepoint
/// after the send does not).
#[inline(always)]
pub(crate) fn addressed(sk: u64, netns: u64, address: u64, len: u32, hash: u64) -> Option<()> {
    pod(netns, follow::UNIX_SOCKETS)?;
    // On the stack, not in SCRATCH: the cgroup hook that calls this may be
    // preempted, and another task's program then write this CPU's slot.
    let mut path = UnixPath::default();
    // All of `sun_path` (the kernel's copy is a whole `sockaddr_storage`);
    // `len` says how much of it is the name.
    // SAFETY: the helper checks the source; the size is the destination's.
    let failed = unsafe {
        probe_read(
            path.bytes.as_mut_ptr().cast(),
            UNIX_PATH_MAX as u32,
            (address + 2) as *const _,
        )
    };
    if failed != 0 {
        return None;
    }
    path.len = len.saturating_sub(2).min(UNIX_PATH_MAX as u32) as u16;
    path.netns = netns;
    keep_path(netns, hash, &path);
    let sending = Addressed {
        netns,
        cgroup: current_cgroup(),
        path: hash,
    };
    UNIX_ADDRESSED.insert(&sk, &sending, 0).ok()
}

/// A datagram sent with an address: counted on the connection from the
/// sending socket to the path (see [`UnixConn::addressed`]).
#[inline(always)]
fn addressed_sent(sk: u64, netns: u64, kind: u8, bytes: u64) -> Option<()> {
    if kind != unix_kind::DGRAM {
        return None;
    }
    // SAFETY: a plain lookup; the value is copied at once.
    let sending = unsafe { UNIX_ADDRESSED.get(&sk) }.copied()?;
    let _ = UNIX_ADDRESSED.remove(&sk);
    if sending.netns != netns {
        return None;
    }
    let key = UnixConnKey {
        server_end: sending.path,
        client_end: sk,
    };
    let receiver = UnixPathKey {
        netns,
        hash: sending.path,
    };
    // SAFETY: a plain lookup.
    let server = unsafe { UNIX_RECEIVERS.get(&receiver) }
        .copied()
        .unwrap_or(0);
    let conn = match UNIX_CONNS.get_ptr_mut(&key) {
        Some(conn) => conn,
        None => {
            let conn = UnixConn {
                netns,
                client: sending.cgroup,
                server,
                path: sending.path,
                to_server: Sent::default(),
                to_client: Sent::default(),
                connections: 0,
                client_inode: 0,
                kind,
                addressed: 1,
                _pad: [0; 6],
                server_check: server_check(server, 0),
            };
            insert_connection(&key, &conn)?
        }
    };
    // SAFETY: a live, 8-byte aligned map value; other CPUs add too.
    unsafe {
        if server != 0 {
            set_server(conn, server);
        }
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*conn).to_server.messages, 1);
        atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*conn).to_server.bytes, bytes);
    }
    Some(())
}

/// A bound datagram socket of a pod received: its container is the server
/// of what is sent to its path with an address.
#[inline(always)]
fn receiving(sk: u64, netns: u64, o: &KernelOffsets) -> Option<()> {
    let current = current_cgroup();
    // SAFETY: a plain lookup.
    if unsafe { RECEIVING.get(&sk) } == Some(&current) {
        return None;
    }
    let (_, hash) = sock_path(sk, o)?;
    let _ = UNIX_RECEIVERS.insert(&UnixPathKey { netns, hash }, &current, 0);
    let _ = RECEIVING.insert(&sk, &current, 0);
    Some(())
}

#[inline(always)]
fn fifo(ctx: &RawTracePointContext) -> Option<()> {
    let ret = ctx.arg::<u64>(1) as i64;
    if ret <= 0 || outside_pods() {
        return None;
    }
    let o = offsets();
    let regs: u64 = ctx.arg(0);
    let writes = syscall::writes(read(regs, o.regs_syscall)?)?;
    let (netns, file) = pod_file(read(regs, o.regs_arg0)?, &o)?;
    let inode: u64 = read(file, o.file_inode)?;
    if read::<u16>(inode, o.inode_mode)? & S_IFMT != S_IFIFO {
        return None;
    }
    let sb: u64 = read(inode, o.inode_sb)?;
    // An anonymous pipe (`|`): not a named one.
    if read::<u64>(sb, o.super_block_magic)? == PIPEFS_MAGIC {
        return None;
    }
    let pipe = FifoId {
        dev: u64::from(read::<u32>(sb, o.super_block_dev)?),
        ino: read(inode, o.inode_ino)?,
    };
    // SAFETY: a plain lookup.
    if unsafe { FIFO_NAMES.get(&pipe) }.is_none() {
        let _ = fifo_name(file, &pipe, netns, &o);
    }
    let key = FifoKey {
        netns,
        pipe,
        cgroup: current_cgroup(),
        writes,
        _pad: [0; 7],
    };
    count(&key, ret as u64);
    Some(())
}

/// The file of descriptor `fd` of the calling process, if it is in an
/// attached pod; and the pod.
#[inline(always)]
fn pod_file(fd: u64, o: &KernelOffsets) -> Option<(u64, u64)> {
    // SAFETY: a plain helper.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read(task, o.task_nsproxy)?;
    let netns: u64 = read(read::<u64>(nsproxy, o.nsproxy_net_ns)?, o.net_cookie)?;
    pod(netns, follow::NAMED_PIPES)?;
    let fdt: u64 = read(read::<u64>(task, o.task_files)?, o.files_fdt)?;
    if fd >= u64::from(read::<u32>(fdt, o.fdtable_max_fds)?) {
        return None;
    }
    let file: u64 = read(read::<u64>(fdt, o.fdtable_fd)? + fd * 8, 0)?;
    Some((netns, file))
}

/// Keeps a pipe's file name (once).
#[inline(always)]
fn fifo_name(file: u64, pipe: &FifoId, netns: u64, o: &KernelOffsets) -> Option<()> {
    let dentry: u64 = read(file, o.file_dentry)?;
    let name: u64 = read(dentry, o.dentry_name)?;
    let slot = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, for this program's run; a `FifoName` is
    // smaller than a `UnixPath`, and as aligned.
    let value = unsafe { &mut *slot.cast::<FifoName>() };
    value.netns = netns;
    value._pad = 0;
    // Up to its NUL (read once: a rename between reading a length and the
    // bytes could pair a long length with a short name).
    // SAFETY: the helper checks the source and stops at the buffer's end.
    let read = unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut value.bytes) };
    value.len = read.ok()?.len() as u32;
    let _ = FIFO_NAMES.insert(pipe, value, u64::from(BPF_NOEXIST));
    Some(())
}

/// Adds a call to a pipe's counts, inserting the key if it is new; a count
/// that finds no room is counted as lost.
#[inline(always)]
fn count(key: &FifoKey, bytes: u64) {
    let add = |counts: *mut IpcCounts| {
        // SAFETY: a live, 8-byte aligned map value; other CPUs add too.
        unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*counts).messages, 1);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*counts).bytes, bytes);
        }
    };
    if let Some(counts) = FIFO_FLOWS.get_ptr_mut(key) {
        add(counts);
        return;
    }
    let first = IpcCounts {
        messages: 1,
        bytes,
        connections: 0,
    };
    if FIFO_FLOWS
        .insert(key, &first, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return;
    }
    match FIFO_FLOWS.get_ptr_mut(key) {
        // Another CPU inserted it first.
        Some(counts) => add(counts),
        None => bump_stats(|s| s.ipc_lost += 1),
    }
}
