//! The unix-socket policy hooks: `connect()` and `sendmsg()` of the unix
//! sockets of a pod's processes (cgroup hooks since Linux 6.7), where a
//! denied client gets EPERM at once (observer-ebpf/src/policy.rs,
//! `unix_connect` and `unix_sendmsg`).
//!
//! aya 0.14 knows no unix attach type, so they are loaded here: the
//! programs' instructions from the embedded object (parsed by aya-obj, as
//! aya does), their map references relocated to the maps the observer has
//! already loaded from the same object, and `BPF_PROG_LOAD` with the unix
//! attach type. They attach to each pod's cgroup with `BPF_LINK_CREATE`,
//! beside the other socket hooks. A kernel without them (before 6.7) runs
//! everything else: pods whose policies have unix rules are then in
//! `observer_policy_unenforced_pods{reason="no_unix_hooks"}`.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use aya::{Ebpf, maps::Map, maps::MapData};

use super::bpf;

/// `BPF_CGROUP_UNIX_CONNECT` and `BPF_CGROUP_UNIX_SENDMSG`.
const UNIX_CONNECT: u32 = 49;
const UNIX_SENDMSG: u32 = 50;

/// Each hook's program, and its attach type.
pub const PROGRAMS: [(&str, u32); 2] = [
    ("unix_connect", UNIX_CONNECT),
    ("unix_sendmsg", UNIX_SENDMSG),
];

#[derive(Debug, thiserror::Error)]
pub enum UnixHooksError {
    #[error("the embedded eBPF object does not parse: {0}")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("the object's map {0} is not loaded")]
    Map(String),
    #[error("relocating the unix-socket hooks: {0}")]
    Relocation(#[source] Box<aya_obj::relocation::EbpfRelocationError>),
    #[error("the eBPF object has no program {0}")]
    Missing(&'static str),
    #[error("this kernel has no unix-socket hooks (Linux 6.7 and later have)")]
    NoKernelSupport,
    #[error("the kernel refused program {name}: {source}")]
    Load {
        name: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The loaded hooks, attached to pods' cgroups on demand.
pub struct UnixHooks {
    programs: Vec<(&'static str, u32, OwnedFd)>,
}

impl UnixHooks {
    /// Loads the hooks of `object` on the maps `ebpf` loaded from it (all
    /// of them still in `ebpf`: call before any is taken out).
    /// `sock_addr_uaddrlen`: where the hooks read the address's length; 0
    /// where the kernel has no unix-socket hooks.
    pub fn load(
        ebpf: &Ebpf,
        object: &[u8],
        sock_addr_uaddrlen: u32,
    ) -> Result<Self, UnixHooksError> {
        if sock_addr_uaddrlen == 0 {
            return Err(UnixHooksError::NoKernelSupport);
        }
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| UnixHooksError::Object(Box::new(e)))?;
        let maps = std::mem::take(&mut obj.maps);
        let mut fds = Vec::with_capacity(maps.len());
        for (name, map) in &maps {
            let data = ebpf
                .map(name)
                .map(map_data)
                .ok_or_else(|| UnixHooksError::Map(name.clone()))?;
            fds.push((name.as_str(), data.fd().as_fd().as_raw_fd(), map));
        }
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(fds.into_iter(), &text_sections)
            .map_err(|e| UnixHooksError::Relocation(Box::new(e)))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| UnixHooksError::Relocation(Box::new(e)))?;
        let mut programs = Vec::new();
        for (name, attach_type) in PROGRAMS {
            let program = obj
                .programs
                .get(name)
                .ok_or(UnixHooksError::Missing(name))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or(UnixHooksError::Missing(name))?;
            let fd = bpf::load_sock_addr(name, &function.instructions, &obj.license, attach_type)
                .map_err(|source| UnixHooksError::Load { name, source })?;
            programs.push((name, attach_type, fd));
        }
        Ok(Self { programs })
    }

    /// Attaches every hook but those in `held` to `cgroup`: its links, by
    /// program name.
    pub fn attach(
        &self,
        cgroup: BorrowedFd<'_>,
        held: &[&str],
    ) -> io::Result<Vec<(&'static str, OwnedFd)>> {
        self.programs
            .iter()
            .filter(|(name, _, _)| !held.contains(name))
            .map(|(name, attach_type, program)| {
                bpf::link_cgroup(program.as_fd(), cgroup, *attach_type).map(|link| (*name, link))
            })
            .collect()
    }

    /// The program of hook `name`, to swap into a link taken over.
    pub fn program(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.programs
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, fd)| fd.as_fd())
    }

    /// The hooks' program names.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.programs.iter().map(|(name, _, _)| *name)
    }
}

/// The map's data, whatever its kind.
fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    }
}
