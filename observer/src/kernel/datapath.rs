//! Loads the embedded eBPF object: once for the shared maps, which the
//! collector reads, and once more for every namespace, whose instance of the
//! programs carries that namespace's cookie.
//!
//! With `--pin-dir` the shared maps are pinned on the node's bpffs and an
//! observer that starts takes over the maps an earlier one left (those
//! that still fit this object: same kind, sizes and capacity; see
//! [`observer_common::LAYOUT_VERSION`]); their contents are its starting
//! point ([`Opened::inherited`]).
//!
//! The programs' aya-log diagnostics are switched off at load time (the
//! verifier then removes them) unless a log level is given.

use std::{collections::BTreeSet, os::fd::BorrowedFd, path::Path};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        HashMap, IterableMap, MapData, MapError, MapInfo, PerCpuArray, ProgramArray, SkStorage,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, RawTracePoint, SchedClassifier,
        links::FdLink,
    },
};
use aya_log::Level;
use observer_common::{
    CIDRS_MAP, CLASSIFIER_MAP, DatapathStats, FLOW_CACHE_MAP, FLOWS_MAP, FLUSH_PROGRAM, FlowKey,
    FlowValue, GENERATION_MAP, NETNS_COOKIE_GLOBAL, NODE_MAP, OVERFLOW_MAP, OverflowKey,
    OverflowValue, POLICIES_MAP, POLICY_CIDRS_MAP, POLICY_MEMBERS_MAP, SERVICES_MAP, SOCKETS_MAP,
    STATS_MAP, SocketInfo, UNIX_POLICY_MAP, UNIX_POLICY_PATHS_MAP, UNSTORED_MAP, VERDICTS_MAP,
    VerdictKey, ipc::KERNEL_OFFSETS_GLOBAL,
};

use super::{
    bpffs::{BpffsError, NodePins, PinDir, Pins},
    btf::KernelBtf,
    class_maps::KernelClassMaps,
    flow_cache::FlowCacheFlush,
    ipc::{self, IpcMaps},
    log::KernelLog,
    policy_maps::KernelPolicyMaps,
    unix_hooks::UnixHooks,
};

/// The objects built from observer-ebpf by build.rs: the shared programs
/// and maps, loaded once, and a pod namespace's own programs (the
/// per-packet path), loaded for each, on the shared maps.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));
static POD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-pod"));

pub const EGRESS_PROGRAM: &str = "observe_egress";
pub const INGRESS_PROGRAM: &str = "observe_ingress";
/// Does nothing: the benchmark's baseline.
pub const NOOP_PROGRAM: &str = "noop";
/// Tail-called by the instances, in the order of their index in
/// [`CLASSIFIER_MAP`].
const SHARED_PROGRAMS: [&str; observer_common::tail::SLOTS as usize] =
    observer_common::tail::PROGRAMS;
/// The socket hooks on a pod's cgroup: `bind()` (a server's container),
/// `connect()` and UDP `sendmsg()` (the original destination, and the
/// policy decision), on IPv4 and on IPv6 sockets.
pub const SOCKET_PROGRAMS: [&str; 6] = [
    "socket_bind4",
    "socket_bind6",
    "policy_connect4",
    "policy_sendmsg4",
    "policy_connect6",
    "policy_sendmsg6",
];

const PRIVILEGES: &str = "the observer needs root, or CAP_SYS_ADMIN, CAP_SYS_PTRACE and (before \
                          Linux 6.6) CAP_NET_ADMIN, and a kernel with BTF";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{0} ({PRIVILEGES})")]
    Pins(#[from] BpffsError),
    #[error("cannot load the eBPF programs: {0} ({PRIVILEGES})")]
    Load(#[source] Box<EbpfError>),
    #[error("the kernel refused program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("the eBPF object has no {0}: it does not match this daemon")]
    Missing(&'static str),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the programs' diagnostics: {0}")]
    Log(#[from] aya_log::Error),
    #[error("link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("the embedded eBPF object does not parse: {0}")]
    Object(#[source] Box<aya_obj::ParseError>),
    #[error("attaching the unix-socket hooks: {0}")]
    UnixHooks(#[source] std::io::Error),
}

/// The map the programs' diagnostics go to (aya-log's).
const LOG_MAP: &str = "AYA_LOGS";

/// How to load the programs.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Capacity of the flow map.
    pub flow_capacity: u32,
    /// Where the private bpffs for the shared maps' pins is mounted.
    pub runtime_dir: std::path::PathBuf,
    /// A directory on the node's bpffs: the maps (and the links of pods
    /// that fail closed) are pinned there and outlive the observer. `None`:
    /// the private bpffs, and nothing outlives it.
    pub pin_dir: Option<std::path::PathBuf>,
    /// The level of the programs' diagnostics; `None`: off (they are then
    /// removed by the verifier and cost nothing).
    pub log_level: Option<Level>,
    /// Follow unix-socket traffic (`--unix-sockets`): a program at every
    /// socket message.
    pub unix_sockets: bool,
    /// Follow named pipes too: a program after every system call.
    pub named_pipes: bool,
}

/// What opening the datapath gives: the loader of per-namespace instances,
/// and the shared maps, each to the part of the daemon that uses it.
pub struct Opened {
    pub datapath: Datapath,
    /// Read by the collector.
    pub maps: Maps,
    /// Written from the inventory.
    pub class_maps: KernelClassMaps,
    /// Written from the policies.
    pub policy_maps: KernelPolicyMaps,
    /// Reads the programs' diagnostics, if they are on: keep it for as long
    /// as the programs run (dropping it closes the map).
    pub logger: Option<KernelLog>,
    /// The shared maps taken over from an earlier observer (by name): what
    /// they hold is where this one starts.
    pub inherited: BTreeSet<&'static str>,
    /// The unix-socket and named-pipe counts, if this kernel lets them be
    /// followed ([`super::ipc`]).
    pub ipc: Option<IpcMaps>,
    /// Each kernel function the IPC programs follow, and whether they do.
    pub ipc_hooks: Vec<(&'static str, bool)>,
    /// Whether unix-socket rules are enforced on this kernel.
    pub unix_policy: bool,
}

/// Loads program instances that share one set of maps.
pub struct Datapath {
    /// The first load: owns the shared classifier (and keeps the program
    /// array's entry alive: the kernel clears it when no fd is left) and the
    /// policy hooks, loaded once and attached to every pod's cgroup.
    base: Ebpf,
    _classifiers: ProgramArray<MapData>,
    pins: Pins,
    /// The sockets' storage: seeded for the sockets a pod had before its
    /// hooks were attached.
    sockets: SkStorage<MapData, SocketInfo>,
    /// Only the attach worker loads instances; the lock is never contended.
    pods: std::sync::Mutex<Pods>,
    /// The unix-socket policy hooks, where the kernel has them.
    unix_hooks: Option<UnixHooks>,
}

/// A bpf link (TCX, cgroup): aya's, or one of the unix-socket hooks',
/// which aya cannot make ([`super::unix_hooks`]). Detached when the last
/// descriptor closes and no pin holds it.
pub enum BpfLink {
    Aya(FdLink),
    Own(std::os::fd::OwnedFd),
}

impl BpfLink {
    /// The kernel's id of the link, to pin it by.
    pub fn id(&self) -> std::io::Result<u32> {
        match self {
            Self::Aya(link) => link
                .info()
                .map(|info| info.id())
                .map_err(|e| std::io::Error::other(e.to_string())),
            Self::Own(link) => super::bpf::link_id(std::os::fd::AsFd::as_fd(link)),
        }
    }
}

/// One namespace's instance of the programs, loaded into the kernel.
pub struct Programs {
    ebpf: Ebpf,
}

impl Programs {
    pub fn get(&mut self, name: &'static str) -> Result<&mut SchedClassifier, ProgramError> {
        self.ebpf
            .program_mut(name)
            .expect("every instance has both programs")
            .try_into()
    }
}

/// The maps the collector reads.
pub struct Maps {
    pub flows: HashMap<MapData, FlowKey, FlowValue>,
    pub overflow: HashMap<MapData, OverflowKey, OverflowValue>,
    pub stats: PerCpuArray<MapData, DatapathStats>,
    pub verdicts: HashMap<MapData, VerdictKey, u64>,
    pub flow_capacity: u32,
    /// The kernel's ids of the flow and verdict maps: a saved baseline of
    /// their counters holds only for these very maps.
    pub ids: MapIds,
    /// Moves the per-CPU cache's counts into the flow map.
    pub flow_cache: FlowCacheFlush,
}

/// Kernel ids of the maps whose counters the collector reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapIds {
    pub flows: u32,
    pub verdicts: u32,
    #[serde(default)]
    pub overflow: u32,
}

/// The maps every instance shares, pinned by name.
const SHARED_MAPS: [&str; 18] = [
    FLOWS_MAP,
    FLOW_CACHE_MAP,
    OVERFLOW_MAP,
    STATS_MAP,
    UNSTORED_MAP,
    SERVICES_MAP,
    CIDRS_MAP,
    GENERATION_MAP,
    CLASSIFIER_MAP,
    POLICIES_MAP,
    POLICY_MEMBERS_MAP,
    POLICY_CIDRS_MAP,
    UNIX_POLICY_MAP,
    UNIX_POLICY_PATHS_MAP,
    NODE_MAP,
    VERDICTS_MAP,
    SOCKETS_MAP,
    LOG_MAP,
];

impl Datapath {
    /// Creates the shared maps, pinned in a private bpffs, and loads the
    /// programs every instance shares.
    pub fn open(config: &DatapathConfig) -> Result<Opened, DatapathError> {
        let pins = match &config.pin_dir {
            Some(dir) => Pins::Node(NodePins::open(dir)?),
            None => Pins::Private(PinDir::mount(&config.runtime_dir)?),
        };
        let flow_capacity = config.flow_capacity;
        let inherited = take_over(&pins, flow_capacity)?;
        // aya-log's levels: 0 is off, Error is 1, ..., Trace is 5.
        let log_level = config.log_level.map_or(0, |level| level as u8);
        // Where the IPC programs read kernel structures; without them, IPC
        // is not followed (and the rest works).
        let offsets = KernelBtf::load().and_then(|btf| ipc::offsets(&btf));
        let kernel_offsets = offsets.as_ref().copied().unwrap_or_default();
        let mut ebpf = loader(&pins, flow_capacity, &log_level)
            .override_global(KERNEL_OFFSETS_GLOBAL, &kernel_offsets, true)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        // Before any map is taken out of `ebpf`: the hooks are loaded on
        // all of them.
        let unix_hooks = match &offsets {
            Ok(offsets) => UnixHooks::load(&ebpf, OBJECT, offsets.sock_addr_uaddrlen)
                .inspect_err(|err| {
                    tracing::warn!(%err, "unix-socket rules are not enforced on this node (observed only)");
                })
                .ok(),
            Err(_) => None,
        };
        let flows: HashMap<MapData, FlowKey, FlowValue> = typed(&mut ebpf, FLOWS_MAP)?;
        let verdicts: HashMap<MapData, VerdictKey, u64> = typed(&mut ebpf, VERDICTS_MAP)?;
        let overflow: HashMap<MapData, OverflowKey, OverflowValue> =
            typed(&mut ebpf, OVERFLOW_MAP)?;
        let ids = MapIds {
            flows: map_id(flows.map(), FLOWS_MAP)?,
            verdicts: map_id(verdicts.map(), VERDICTS_MAP)?,
            overflow: map_id(overflow.map(), OVERFLOW_MAP)?,
        };
        let flush: &mut RawTracePoint = program(&mut ebpf, FLUSH_PROGRAM)?;
        flush.load().map_err(program_error(FLUSH_PROGRAM))?;
        let flush = std::os::fd::AsFd::as_fd(flush.fd().map_err(program_error(FLUSH_PROGRAM))?)
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Program {
                name: FLUSH_PROGRAM,
                source: Box::new(ProgramError::IOError(source)),
            })?;
        let maps = Maps {
            flows,
            overflow,
            stats: typed(&mut ebpf, STATS_MAP)?,
            verdicts,
            flow_capacity,
            ids,
            flow_cache: FlowCacheFlush::new(flush),
        };
        let policy_maps = KernelPolicyMaps {
            policies: typed(&mut ebpf, POLICIES_MAP)?,
            members: typed(&mut ebpf, POLICY_MEMBERS_MAP)?,
            cidrs: typed(&mut ebpf, POLICY_CIDRS_MAP)?,
            unix: typed(&mut ebpf, UNIX_POLICY_MAP)?,
            unix_paths: typed(&mut ebpf, UNIX_POLICY_PATHS_MAP)?,
            node: typed(&mut ebpf, NODE_MAP)?,
            node_written: None,
        };
        let class_maps = KernelClassMaps {
            services: typed(&mut ebpf, SERVICES_MAP)?,
            cidrs: typed(&mut ebpf, CIDRS_MAP)?,
            generation: typed(&mut ebpf, GENERATION_MAP)?,
        };
        // The shared programs: loaded and verified once, for all instances.
        let mut classifiers: ProgramArray<MapData> = typed(&mut ebpf, CLASSIFIER_MAP)?;
        for (index, name) in SHARED_PROGRAMS.into_iter().enumerate() {
            let classifier: &mut SchedClassifier = program(&mut ebpf, name)?;
            classifier.load().map_err(program_error(name))?;
            let fd = classifier.fd().map_err(program_error(name))?;
            classifiers
                .set(index as u32, fd, 0)
                .map_err(|source| DatapathError::Map {
                    name: CLASSIFIER_MAP,
                    source: Box::new(source),
                })?;
        }
        for name in SOCKET_PROGRAMS {
            let hook: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            hook.load().map_err(program_error(name))?;
        }
        let sockets = typed(&mut ebpf, SOCKETS_MAP)?;
        let logger = match config.log_level {
            Some(_) => Some(KernelLog::start(&mut ebpf)?),
            None => None,
        };
        let (ipc, ipc_hooks) = match offsets {
            Ok(_) => {
                let hooks = ipc::attach(&mut ebpf, config.unix_sockets, config.named_pipes);
                let maps =
                    IpcMaps::take(&mut ebpf, &hooks).map_err(|source| DatapathError::Map {
                        name: "IPC",
                        source: Box::new(source),
                    })?;
                (Some(maps), hooks)
            }
            Err(err) => {
                tracing::warn!(%err, "unix-socket and named-pipe traffic is not followed on this kernel");
                let hooks = ipc::asked(config.unix_sockets, config.named_pipes)
                    .map(|(_, tracepoint)| (tracepoint, false))
                    .collect();
                (None, hooks)
            }
        };
        let pods = Pods::new(&pins, flow_capacity)?;
        let unix_policy = unix_hooks.is_some();
        let datapath = Self {
            base: ebpf,
            _classifiers: classifiers,
            pins,
            sockets,
            pods: std::sync::Mutex::new(pods),
            unix_hooks,
        };
        Ok(Opened {
            datapath,
            maps,
            class_maps,
            policy_maps,
            logger,
            inherited,
            ipc,
            ipc_hooks,
            unix_policy,
        })
    }

    /// The socket hooks attached to every pod's cgroup, by program name
    /// (their pins are named so).
    pub fn socket_hooks(&self) -> Vec<&'static str> {
        let unix = self.unix_hooks.iter().flat_map(UnixHooks::names);
        SOCKET_PROGRAMS.into_iter().chain(unix).collect()
    }

    /// The node's pin directory, if the pins outlive the observer.
    pub fn node_pins(&self) -> Option<&NodePins> {
        self.pins.node()
    }

    /// The loaded socket hook `name`, to swap into a pinned link.
    pub fn hook_fd(&mut self, name: &'static str) -> Result<BorrowedFd<'_>, DatapathError> {
        use std::os::fd::AsFd;
        if let Some(program) = self.unix_hooks.as_ref().and_then(|h| h.program(name)) {
            return Ok(program);
        }
        let hook: &mut CgroupSockAddr = program(&mut self.base, name)?;
        Ok(hook.fd().map_err(program_error(name))?.as_fd())
    }

    /// At exit: where no pod fails closed any more, the maps' pins go too
    /// (the maps are freed with the observer's last descriptor), and
    /// nothing of ours stays on the node.
    pub fn release(&self, pods_pinned: bool) {
        if let (Some(node), false) = (self.pins.node(), pods_pinned) {
            node.remove_maps();
        }
    }

    /// Attaches the socket hooks to a pod's cgroup (all but those `held`
    /// already, taken over from an earlier observer), and seeds the storage
    /// of the sockets its processes already have. The hooks allow
    /// everything until the pod has a compiled policy. Returns each hook's
    /// link by program name.
    pub fn attach_socket_hooks(
        &mut self,
        cgroup: &Path,
        held: &[&str],
    ) -> Result<Vec<(&'static str, BpfLink)>, DatapathError> {
        let dir = std::fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let mut links = Vec::new();
        for name in SOCKET_PROGRAMS.into_iter().filter(|n| !held.contains(n)) {
            let hook: &mut CgroupSockAddr = program(&mut self.base, name)?;
            // A bpf link (kernels 5.7+): it runs beside other programs on
            // the cgroup whatever the mode, and the kernel refuses any mode
            // flag with it, so the default (no flag) it is.
            let id = hook
                .attach(&dir, CgroupAttachMode::default())
                .map_err(program_error(name))?;
            let link = hook.take_link(id).map_err(program_error(name))?;
            let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
                name,
                source: Box::new(source),
            })?;
            links.push((name, BpfLink::Aya(link)));
        }
        if let Some(unix) = &self.unix_hooks {
            use std::os::fd::AsFd;
            let own = unix
                .attach(dir.as_fd(), held)
                .map_err(DatapathError::UnixHooks)?;
            links.extend(
                own.into_iter()
                    .map(|(name, link)| (name, BpfLink::Own(link))),
            );
        }
        self.seed_sockets(cgroup);
        Ok(links)
    }

    /// Seeds the storage of the sockets the pod's processes already have
    /// (those with storage keep theirs).
    pub fn seed_sockets(&mut self, cgroup: &Path) {
        let seeded = super::sockets::seed(&mut self.sockets, cgroup);
        tracing::debug!(cgroup = %cgroup.display(), sockets = seeded.sockets, failed = seeded.failed, "seeded the sockets' storage");
    }

    /// Loads the programs of the namespace with this cookie (and the no-op
    /// baseline if `noop`): the pod object, with the cookie as a constant
    /// (see [`Pods`]).
    pub fn instance(&self, netns_cookie: u64, noop: bool) -> Result<Programs, DatapathError> {
        let mut ebpf = self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .load(netns_cookie)?;
        let names: &[&'static str] = if noop {
            &[EGRESS_PROGRAM, INGRESS_PROGRAM, NOOP_PROGRAM]
        } else {
            &[EGRESS_PROGRAM, INGRESS_PROGRAM]
        };
        let mut wanted = Vec::with_capacity(names.len());
        for (name, program) in ebpf.programs_mut() {
            if let Some(&name) = names.iter().find(|&&n| n == name) {
                let classifier: &mut SchedClassifier =
                    program.try_into().map_err(program_error(name))?;
                wanted.push((name, classifier));
            }
        }
        if let Some(&name) = names
            .iter()
            .find(|&&n| !wanted.iter().any(|(w, _)| *w == n))
        {
            return Err(DatapathError::Missing(name));
        }
        // The verifier's time is most of a pod's attach (about 4 ms a
        // program here): each program is loaded on a thread of its own,
        // and they are verified side by side on as many CPUs.
        std::thread::scope(|scope| {
            let loads: Vec<_> = wanted
                .into_iter()
                .map(|(name, classifier)| {
                    scope.spawn(move || classifier.load().map_err(program_error(name)))
                })
                .collect();
            loads
                .into_iter()
                .try_for_each(|load| load.join().expect("loading a program does not panic"))
        })?;
        Ok(Programs { ebpf })
    }
}

/// Loads the pod object for each namespace with one loader: aya's loader
/// parses the kernel's BTF (megabytes) when it is made, which was most of
/// the 56 ms a pod took. The cookie is a constant in the object's
/// `.rodata`, written into a copy of the object before each load.
struct Pods {
    loader: EbpfLoader<'static>,
    /// The object, in words (the ELF reader wants it aligned).
    image: Vec<u64>,
    /// Where the cookie's eight bytes lie in it.
    cookie_at: usize,
}

impl Pods {
    fn new(pins: &Pins, flow_capacity: u32) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(FLOWS_MAP, flow_capacity);
        // Every map of the object is a shared one: one left out would be
        // made anew for each pod, silently apart from the rest.
        for name in map_names(POD_OBJECT) {
            let name = SHARED_MAPS
                .into_iter()
                .find(|shared| *shared == name)
                .ok_or(DatapathError::Missing("a pod map among the shared maps"))?;
            loader.map_pin_path(name, pins.map(name));
        }
        let cookie_at = global_offset(POD_OBJECT, NETNS_COOKIE_GLOBAL)
            .ok_or(DatapathError::Missing(NETNS_COOKIE_GLOBAL))?;
        let mut image = vec![0u64; POD_OBJECT.len().div_ceil(8)];
        bytes_mut(&mut image)[..POD_OBJECT.len()].copy_from_slice(POD_OBJECT);
        Ok(Self {
            loader,
            image,
            cookie_at,
        })
    }

    fn load(&mut self, cookie: u64) -> Result<Ebpf, DatapathError> {
        let len = POD_OBJECT.len();
        bytes_mut(&mut self.image)[self.cookie_at..self.cookie_at + 8]
            .copy_from_slice(&cookie.to_ne_bytes());
        self.loader
            .load(&bytes_mut(&mut self.image)[..len])
            .map_err(|e| DatapathError::Load(Box::new(e)))
    }
}

/// The words' bytes.
fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u64; the
    // slice covers exactly the words' memory.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), size_of_val(words)) }
}

/// The maps an ELF object declares (its `maps` section's symbols).
fn map_names(elf: &[u8]) -> Vec<String> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let Ok(file) = object::File::parse(elf) else {
        return Vec::new();
    };
    let Some(maps) = file.section_by_name("maps") else {
        return Vec::new();
    };
    file.symbols()
        .filter(|s| s.section_index() == Some(maps.index()))
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect()
}

/// Where the initial value of global `name` lies in an ELF object.
fn global_offset(elf: &[u8], name: &str) -> Option<usize> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let file = object::File::parse(elf).ok()?;
    let symbol = file.symbols().find(|s| s.name() == Ok(name))?;
    let section = file.section_by_index(symbol.section_index()?).ok()?;
    let (start, size) = section.file_range()?;
    let at = symbol.address();
    (at + 8 <= size).then(|| (start + at) as usize)
}

/// Which of the maps pinned in the node's pin directory this observer takes
/// over: those that fit the object (kind, key and value sizes, capacity).
/// One that does not (another layout, another `--flow-capacity`) is
/// unpinned and made anew; the programs of an earlier observer keep theirs
/// until they are replaced.
fn take_over(pins: &Pins, flow_capacity: u32) -> Result<BTreeSet<&'static str>, DatapathError> {
    let mut inherited = BTreeSet::new();
    if pins.node().is_none() {
        return Ok(inherited);
    }
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| DatapathError::Object(Box::new(e)))?;
    for name in SHARED_MAPS {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let wanted = object.maps.get(name).ok_or(DatapathError::Missing(name))?;
        let max_entries = match name {
            FLOWS_MAP => flow_capacity,
            _ => wanted.max_entries(),
        };
        let fits = MapInfo::from_pin(&path).is_ok_and(|pinned| {
            pinned
                .map_type()
                .is_ok_and(|t| t as u32 == wanted.map_type())
                && pinned.key_size() == wanted.key_size()
                && pinned.value_size() == wanted.value_size()
                && pinned.max_entries() == max_entries
        });
        if fits {
            inherited.insert(name);
        } else {
            tracing::warn!(map = name, path = %path.display(), "a pinned map does not fit this observer (another layout, or another --flow-capacity): made anew");
            let _ = std::fs::remove_file(&path);
        }
    }
    if !inherited.is_empty() {
        tracing::info!(maps = ?inherited, "taking over the maps of an earlier observer");
    }
    Ok(inherited)
}

fn map_id(map: &MapData, name: &'static str) -> Result<u32, DatapathError> {
    map.info()
        .map(|info| info.id())
        .map_err(|source| DatapathError::Map {
            name,
            source: Box::new(source),
        })
}

/// A loader whose maps are the shared, pinned ones (it reads the kernel's
/// BTF when it is made).
fn loader<'a>(pins: &Pins, flow_capacity: u32, log_level: &'a u8) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(FLOWS_MAP, flow_capacity)
        .override_global(aya_log::LEVEL, log_level, true);
    // Every map but the per-instance globals is shared through its pin.
    for name in SHARED_MAPS {
        loader.map_pin_path(name, pins.map(name));
    }
    loader
}

/// Program `name` of `ebpf`, as the type it must be.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(program_error(name))
}

/// The kernel (or aya) refused program `name`.
fn program_error(name: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |source| DatapathError::Program {
        name,
        source: Box::new(source),
    }
}

/// Takes map `name` out of `ebpf` as a `T`.
fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map {
        name,
        source: Box::new(source),
    })
}
