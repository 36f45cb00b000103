//! In-pod IPC without the network: unix sockets and named pipes (FIFOs)
//! between containers. The maps the kernel counts them in, their keys and
//! values, and the words users see for them.
//!
//! Everything is kept per pod (its network namespace's cookie, as the
//! packet flows are): a unix socket belongs to the namespace of the process
//! that made it, a pipe's read or write to the caller's.
//!
//! A unix connection is counted per connection (both ends' `struct sock`
//! addresses): its client's container is known from its first message (the
//! process that connected made both ends), its server's once the server's
//! process uses its end; the daemon adds the connections up into series.

/// The network namespaces (cookies) of attached pods, each to what of its
/// IPC is followed ([`follow`] bits): only theirs. Written by the daemon.
pub const IPC_PODS_MAP: &str = "IPC_PODS";
pub const IPC_PODS_CAPACITY: u32 = 16_384;

/// What of a pod's IPC is followed: the bits of its [`IPC_PODS_MAP`] value.
/// A program that runs for one kind does nothing for a pod whose bit is
/// clear (`--unix-sockets false` leaves the `sendto()` hook loaded, for the
/// policy, but it then keeps no datagram's address for a count).
pub mod follow {
    pub const UNIX_SOCKETS: u8 = 1 << 0;
    pub const NAMED_PIPES: u8 = 1 << 1;
}
/// Each unix connection (or connected datagram sender) of a pod's
/// ([`UnixConnKey`] to [`UnixConn`]).
pub const UNIX_CONNS_MAP: &str = "UNIX_CONNS";
pub const UNIX_CONNS_CAPACITY: u32 = 65_536;
/// Connections whose entry a new connection took (the kernel gave the new
/// one the same two sockets' memory) before the daemon had collected all
/// of theirs: their identity and totals, by [`RetiredKey`], until the
/// daemon counts them and takes them out.
pub const UNIX_RETIRED_MAP: &str = "UNIX_RETIRED";
pub const UNIX_RETIRED_CAPACITY: u32 = 16_384;
/// A path a server's socket is bound to ([`UnixPath`]), by pod and
/// [`path_hash`] ([`UnixPathKey`]): one pod cannot name another's paths.
pub const UNIX_PATHS_MAP: &str = "UNIX_PATHS";
pub const UNIX_PATHS_CAPACITY: u32 = 16_384;
/// Reads and writes of one container on one named pipe ([`FifoKey`] to
/// [`IpcCounts`]).
pub const FIFO_FLOWS_MAP: &str = "FIFO_FLOWS";
/// The cgroup every pod's cgroup is under, and its level
/// ([`crate::NodeInfo`], one entry): the IPC programs' first filter, a
/// process outside it is no pod's (0 while not known: no such filter).
pub const IPC_NODE_MAP: &str = "IPC_NODE";
/// The sending socket to the [`Addressed`] datagram it is sending (an LRU:
/// a send that fails leaves its entry to be evicted).
pub const UNIX_ADDRESSED_MAP: &str = "UNIX_ADDRESSED";
pub const UNIX_ADDRESSED_CAPACITY: u32 = 4_096;
/// A path ([`UnixPathKey`]) to the container (cgroup) whose bound datagram
/// socket receives on it: the server of datagrams sent there with an
/// address.
pub const UNIX_RECEIVERS_MAP: &str = "UNIX_RECEIVERS";
pub const FIFO_FLOWS_CAPACITY: u32 = 16_384;
/// A named pipe's file name ([`FifoName`]), by device and inode
/// ([`FifoId`]).
pub const FIFO_NAMES_MAP: &str = "FIFO_NAMES";
/// Where the fields the IPC programs read lie in this kernel's structures
/// ([`KernelOffsets`]), set at load time.
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";

/// The `class` label of unix-socket traffic.
pub const UNIX_CLASS: &str = crate::vocabulary::class::name(crate::vocabulary::class::UNIX);
/// The `class` label of named-pipe traffic.
pub const FIFO_CLASS: &str = crate::vocabulary::class::name(crate::vocabulary::class::FIFO);
/// The `path` label of a unix socket that has no name (one of a
/// `socketpair()`, or a datagram socket never bound).
pub const UNNAMED_PATH: &str = "(unnamed)";

/// Socket types, as `SOCK_STREAM` and the rest number them.
pub mod unix_kind {
    pub const STREAM: u8 = 1;
    pub const DGRAM: u8 = 2;
    pub const SEQPACKET: u8 = 5;

    /// The `protocol` label of a unix flow.
    pub const fn name(kind: u8) -> &'static str {
        match kind {
            STREAM => "stream",
            DGRAM => "dgram",
            SEQPACKET => "seqpacket",
            _ => "unknown",
        }
    }
}

/// The longest unix socket path (`sizeof(sun_path)`).
pub const UNIX_PATH_MAX: usize = 108;

/// Key of [`UNIX_PATHS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixPathKey {
    /// The pod's network namespace (cookie).
    pub netns: u64,
    /// [`path_hash`] of the path.
    pub hash: u64,
}

/// Value of [`UNIX_PATHS_MAP`]: a path as the server bound it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    /// The pod (network namespace cookie) whose flows use it.
    pub netns: u64,
    /// Bytes of `bytes` in use. An abstract name starts with a 0 byte.
    pub len: u16,
    pub _pad: [u8; 6],
    pub bytes: [u8; UNIX_PATH_MAX],
    pub _tail: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<UnixPath>() == 128);

impl Default for UnixPath {
    fn default() -> Self {
        Self {
            netns: 0,
            len: 0,
            _pad: [0; 6],
            bytes: [0; UNIX_PATH_MAX],
            _tail: [0; 4],
        }
    }
}

impl UnixPath {
    /// The path's bytes: a file path up to its first NUL, an abstract name
    /// (first byte 0) all of its length.
    pub fn name(&self) -> &[u8] {
        let bytes = &self.bytes[..(self.len as usize).min(UNIX_PATH_MAX)];
        match bytes.first() {
            Some(0) => bytes,
            _ => bytes.split(|&b| b == 0).next().unwrap_or(bytes),
        }
    }
}

/// Key of [`UNIX_CONNS_MAP`]: a connection by its two ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixConnKey {
    /// The server's end (`struct sock *`): what `accept()` returned, or
    /// the bound socket a datagram sender is connected to.
    pub server_end: u64,
    /// The client's end: the socket that connected.
    pub client_end: u64,
}

/// Key of [`UNIX_RETIRED_MAP`]: a connection's ends and its client
/// socket's inode (which tells it from the connection that took its ends).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RetiredKey {
    pub conn: UnixConnKey,
    pub client_inode: u64,
}
const _: () = assert!(core::mem::size_of::<RetiredKey>() == 24);

/// Messages and bytes one way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub messages: u64,
    pub bytes: u64,
}

/// Value of [`UNIX_CONNS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixConn {
    /// The pod's network namespace (cookie).
    pub netns: u64,
    /// The client's container (cgroup id): the one that connected.
    pub client: u64,
    /// The server's container: whose process uses the server's end (0
    /// until it does). Only if `server_check` says it is this
    /// connection's: [`UnixConn::own_server`].
    pub server: u64,
    /// [`path_hash`] of the path the server's socket is bound to.
    pub path: u64,
    pub to_server: Sent,
    pub to_client: Sent,
    /// Connections opened: 1 once the connection's client is seen (a new
    /// connection on the same two sockets' memory retires this one to
    /// [`UNIX_RETIRED_MAP`] and starts the entry again).
    pub connections: u64,
    /// The inode number of the client's socket, the connection's identity.
    pub client_inode: u64,
    /// One of [`unix_kind`].
    pub kind: u8,
    /// 1: datagrams sent with an address (`sendto()` on an unconnected
    /// socket) to `path`: the key's `server_end` is the path's hash, not a
    /// socket, and the server is the container that receives on that path
    /// ([`UNIX_RECEIVERS_MAP`]).
    pub addressed: u8,
    pub _pad: [u8; 6],
    /// [`server_check`] of `server` and the `client_inode` of the
    /// connection whose server's process set it. A new connection on the
    /// entry leaves the server of the one before in place, until its own
    /// server's process uses its end: no program clears a server, so none
    /// can clear one another CPU has just set. And a copy of the entry
    /// made while a program writes the two (the daemon's reads are not
    /// atomic) pairs them wrongly only with a matching check, which an
    /// old server with a new check never has.
    pub server_check: u64,
}
const _: () = assert!(core::mem::size_of::<UnixConn>() == 96);

/// What [`UnixConn::server_check`] holds for `server` set for the
/// connection whose client's socket has the inode `client_inode` (0 for
/// datagrams, whose server is known from the start).
pub fn server_check(server: u64, client_inode: u64) -> u64 {
    // The multiply is a bijection: two servers never check alike for one
    // inode.
    server.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ client_inode.rotate_left(32)
}

impl UnixConn {
    /// The server's container if it is this connection's, else 0 (not
    /// known yet).
    pub fn own_server(&self) -> u64 {
        if self.server_check == server_check(self.server, self.client_inode) {
            self.server
        } else {
            0
        }
    }
}

/// A datagram a pod's process sends with an address, between the
/// unix-socket `sendmsg()` hook, which sees the address, and the tracepoint
/// after the send, which sees the bytes ([`UNIX_ADDRESSED_MAP`], by the
/// sending socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Addressed {
    pub netns: u64,
    /// The sender's container.
    pub cgroup: u64,
    /// [`path_hash`] of the address.
    pub path: u64,
}
const _: () = assert!(core::mem::size_of::<Addressed>() == 24);

/// A named pipe: its device (`s_dev`) and inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FifoId {
    pub dev: u64,
    pub ino: u64,
}

/// Key of [`FIFO_FLOWS_MAP`]: one container's reads or writes on one pipe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FifoKey {
    /// The pod's network namespace (cookie): the caller's.
    pub netns: u64,
    pub pipe: FifoId,
    /// The reading or writing container.
    pub cgroup: u64,
    /// 1: writes; 0: reads.
    pub writes: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<FifoKey>() == 40);

/// The longest pipe file name kept (longer ones are cut).
pub const FIFO_NAME_MAX: usize = 64;

/// Value of [`FIFO_NAMES_MAP`]: the pipe's file name (its last path
/// component, as the kernel's directory entry has it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FifoName {
    pub netns: u64,
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; FIFO_NAME_MAX],
}
const _: () = assert!(core::mem::size_of::<FifoName>() == 80);

impl Default for FifoName {
    fn default() -> Self {
        Self {
            netns: 0,
            len: 0,
            _pad: 0,
            bytes: [0; FIFO_NAME_MAX],
        }
    }
}

impl FifoName {
    pub fn name(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(FIFO_NAME_MAX)]
    }
}

/// Value of [`UNIX_FLOWS_MAP`] and [`FIFO_FLOWS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcCounts {
    /// Messages sent (unix), read or write calls (pipes).
    pub messages: u64,
    pub bytes: u64,
    /// Connections opened (unix stream and seqpacket).
    pub connections: u64,
}
const _: () = assert!(core::mem::size_of::<IpcCounts>() == 24);

/// Where the fields the IPC programs read lie in the running kernel's
/// structures, in bytes: read from its BTF by the daemon
/// (`observer::kernel::btf`) and set as a global at load time, as CO-RE
/// relocations would for a C program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock`: `__sk_common.skc_family` (a u16), `sk_type` (a
    /// u16), `__sk_common.skc_net.net`, `sk_cgrp_data.cgroup`.
    pub sock_family: u32,
    pub sock_type: u32,
    pub sock_net: u32,
    pub sock_cgroup: u32,
    /// `struct net`: `net_cookie`.
    pub net_cookie: u32,
    /// `struct cgroup`: `kn`; `struct kernfs_node`: `id` (the cgroup id).
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    /// `struct sock`: `sk_socket`; `struct socket_alloc`: `vfs_inode` (the
    /// socket's inode); `struct unix_sock`: `peer`, `addr`;
    /// `struct unix_address`: `len`, `name`.
    pub sock_socket: u32,
    pub socket_inode: u32,
    pub unix_sock_peer: u32,
    pub unix_sock_addr: u32,
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// `struct pt_regs`: the system call's number and first argument.
    pub regs_syscall: u32,
    pub regs_arg0: u32,
    /// `struct task_struct`: `nsproxy`, `files`; `struct nsproxy`:
    /// `net_ns`; `struct files_struct`: `fdt`; `struct fdtable`: `fd`,
    /// `max_fds`.
    pub task_nsproxy: u32,
    pub task_files: u32,
    pub nsproxy_net_ns: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    /// `struct file`: `f_inode`, `f_path.dentry`.
    pub file_inode: u32,
    pub file_dentry: u32,
    /// `struct dentry`: `d_name.name`.
    pub dentry_name: u32,
    /// `struct inode`: `i_mode` (a u16), `i_ino`, `i_sb`;
    /// `struct super_block`: `s_dev` (a u32), `s_magic` (an unsigned long).
    pub inode_mode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub super_block_dev: u32,
    pub super_block_magic: u32,
    /// `struct bpf_sock_addr_kern` (a socket hook's context): `sk`, the
    /// socket; `uaddr`, the address a unix socket connects or sends to;
    /// and `uaddrlen` (a u32, since 6.7, where the unix-socket hooks came).
    pub sock_addr_sk: u32,
    pub sock_addr_uaddr: u32,
    pub sock_addr_uaddrlen: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 128);

/// System call numbers (x86-64) of the reads and writes a named pipe's
/// traffic goes through.
pub mod syscall {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const PREAD64: u64 = 17;
    pub const PWRITE64: u64 = 18;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const PREADV: u64 = 295;
    pub const PWRITEV: u64 = 296;
    pub const PREADV2: u64 = 327;
    pub const PWRITEV2: u64 = 328;

    /// 1 for a write, 0 for a read, `None` for other calls.
    #[inline(always)]
    pub const fn writes(number: u64) -> Option<u8> {
        match number {
            WRITE | PWRITE64 | WRITEV | PWRITEV | PWRITEV2 => Some(1),
            READ | PREAD64 | READV | PREADV | PREADV2 => Some(0),
            _ => None,
        }
    }
}

/// `AF_UNIX`.
pub const AF_UNIX: u16 = 1;
/// `S_IFMT` and `S_IFIFO` of an inode's mode.
pub const S_IFMT: u16 = 0o170_000;
pub const S_IFIFO: u16 = 0o010_000;
/// The superblock magic of pipefs, where anonymous pipes live.
pub const PIPEFS_MAGIC: u64 = 0x5049_5045;

/// A path's identity in the maps: FNV-1a of its bytes (64-bit), never 0
/// (0 is "no path"). A file path ends at its first NUL (processes pass its
/// length with or without the NUL); an abstract name (first byte 0) is all
/// of its `len` bytes.
#[inline(always)]
pub fn path_hash(bytes: &[u8; UNIX_PATH_MAX], len: usize) -> u64 {
    path_hash_end(bytes, len).0
}

/// [`path_hash`] of a path, and where its name ends: a file path at its
/// first NUL, an abstract name at `len`.
#[inline(always)]
pub fn path_hash_end(bytes: &[u8; UNIX_PATH_MAX], len: usize) -> (u64, usize) {
    let abstract_name = bytes[0] == 0;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut end = 0;
    // An iterator: no index to check (the eBPF side has no panics).
    for &byte in bytes.iter().take(len) {
        if !abstract_name && byte == 0 {
            break;
        }
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        end += 1;
    }
    (hash | 1, end)
}

/// A path's name as policies compare it, in place: `words` hold its
/// `sun_path` bytes (in memory order); what follows the name's `end` is
/// zeroed. A word at a time, few branches (the eBPF side runs it).
#[inline(always)]
pub fn name_words(words: &mut [u64; 14], end: usize) {
    for (w, word) in words.iter_mut().enumerate() {
        let start = w * 8;
        if start >= end {
            *word = 0;
        } else if start + 8 > end {
            // The bytes before `end`, in memory order.
            let keep = (end - start) * 8;
            let mask = if cfg!(target_endian = "little") {
                (1u64 << keep) - 1
            } else {
                !(u64::MAX >> keep)
            };
            *word &= mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_name_keeps_only_the_name() {
        for (text, len) in [
            (&b"/run/a.sock\0garbage"[..], 19),
            (&b"/run/a.sock"[..], 11),
            (&b"\0statsd\0x"[..], 7),
            (&b"\0statsd\0x"[..], 9),
            (&b"/0123456789abcdef"[..], 17),
        ] {
            let mut words = [0u64; 14];
            // SAFETY: 112 bytes, the words' own.
            let bytes = unsafe { &mut *words.as_mut_ptr().cast::<[u8; 112]>() };
            bytes.fill(0xff);
            bytes[..text.len()].copy_from_slice(text);
            let (hash, end) = path_hash_end(bytes[..UNIX_PATH_MAX].try_into().unwrap(), len);
            name_words(&mut words, end);
            // SAFETY: as above.
            let bytes = unsafe { &*words.as_ptr().cast::<[u8; 112]>() };
            let name = if text[0] == 0 {
                &text[..len]
            } else {
                text.split(|&b| b == 0).next().unwrap()
            };
            assert_eq!(end, name.len(), "{text:?}");
            assert_eq!(&bytes[..end], name);
            assert!(bytes[end..].iter().all(|&b| b == 0), "{text:?}");
            let mut padded = [0u8; UNIX_PATH_MAX];
            padded[..name.len()].copy_from_slice(name);
            assert_eq!(hash, path_hash(&padded, name.len()));
        }
    }

    fn path(text: &[u8]) -> UnixPath {
        let mut p = UnixPath::default();
        p.bytes[..text.len()].copy_from_slice(text);
        p.len = text.len() as u16;
        p
    }

    #[test]
    fn a_file_path_ends_at_its_nul_an_abstract_name_does_not() {
        let with_nul = path(b"/run/php.sock\0");
        let without = path(b"/run/php.sock");
        assert_eq!(with_nul.name(), b"/run/php.sock");
        assert_eq!(
            path_hash(&with_nul.bytes, 14),
            path_hash(&without.bytes, 13)
        );
        let abstract_name = path(b"\0envoy\0admin");
        assert_eq!(abstract_name.name(), b"\0envoy\0admin");
        assert_ne!(
            path_hash(&abstract_name.bytes, 12),
            path_hash(&path(b"\0envoy").bytes, 6)
        );
        assert_ne!(path_hash(&UnixPath::default().bytes, 0), 0);
    }
}
