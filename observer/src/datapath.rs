//! Loads the embedded eBPF object: once for the shared maps, which the
//! collector reads, and once more for every namespace, whose instance of the
//! programs carries that namespace's cookie.

use std::path::Path;

use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier},
};
use observer_common::{
    CIDRS_MAP, DatapathStats, FLOWS_MAP, FlowKey, FlowValue, GENERATION_MAP, NETNS_COOKIE_GLOBAL,
    SERVICES_MAP, STATS_MAP,
};

use crate::{
    bpffs::{BpffsError, PinDir},
    kernel_maps::ClassMaps,
};

/// The object built from observer-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

pub const EGRESS_PROGRAM: &str = "observe_egress";
pub const INGRESS_PROGRAM: &str = "observe_ingress";

const PRIVILEGES: &str = "the observer needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and \
                          CAP_SYS_ADMIN, and a kernel with BTF";

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
}

/// Loads program instances that share one set of maps.
pub struct Datapath {
    pins: PinDir,
    flow_capacity: u32,
    /// The kernel's BTF, parsed once rather than at every load.
    btf: Option<Btf>,
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
    pub stats: PerCpuArray<MapData, DatapathStats>,
    pub flow_capacity: u32,
}

impl Datapath {
    /// Creates the shared maps (a flow map of `flow_capacity` entries), pinned
    /// in a private bpffs under `runtime_dir`.
    pub fn open(
        flow_capacity: u32,
        runtime_dir: &Path,
    ) -> Result<(Self, Maps, ClassMaps), DatapathError> {
        let datapath = Self {
            pins: PinDir::mount(runtime_dir)?,
            flow_capacity,
            btf: Btf::from_sys_fs().ok(),
        };
        // The programs of this first load are never loaded into the kernel.
        let mut ebpf = datapath
            .loader()
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let maps = Maps {
            flows: typed(&mut ebpf, FLOWS_MAP)?,
            stats: typed(&mut ebpf, STATS_MAP)?,
            flow_capacity,
        };
        let class_maps = ClassMaps {
            services: typed(&mut ebpf, SERVICES_MAP)?,
            cidrs: typed(&mut ebpf, CIDRS_MAP)?,
            generation: typed(&mut ebpf, GENERATION_MAP)?,
        };
        Ok((datapath, maps, class_maps))
    }

    /// Loads an instance of the programs for the namespace with this cookie.
    pub fn instance(&self, netns_cookie: u64) -> Result<Programs, DatapathError> {
        let mut ebpf = self
            .loader()
            .override_global(NETNS_COOKIE_GLOBAL, &netns_cookie, true)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [EGRESS_PROGRAM, INGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing(name))?
                .try_into()
                .map_err(|source| DatapathError::Program {
                    name,
                    source: Box::new(source),
                })?;
            program.load().map_err(|source| DatapathError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        Ok(Programs { ebpf })
    }

    fn loader(&self) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        loader
            .btf(self.btf.as_ref())
            .map_max_entries(FLOWS_MAP, self.flow_capacity);
        // Every map but the per-instance globals is shared through its pin.
        for name in [
            FLOWS_MAP,
            STATS_MAP,
            SERVICES_MAP,
            CIDRS_MAP,
            GENERATION_MAP,
        ] {
            loader.map_pin_path(name, self.pins.pin_path(name));
        }
        loader
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
