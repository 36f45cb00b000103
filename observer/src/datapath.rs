//! Loads the embedded eBPF object and splits it into what the attach worker
//! needs (the programs) and what the collector needs (the maps).

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier},
};
use observer_common::{DatapathStats, FLOWS_MAP, FlowCounters, FlowKey, STATS_MAP};

/// The object built from observer-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

pub const EGRESS_PROGRAM: &str = "observe_egress";
pub const INGRESS_PROGRAM: &str = "observe_ingress";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "cannot load the eBPF programs: {0} \
         (the observer needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, \
         and a kernel with BTF)"
    )]
    Load(#[source] EbpfError),
    #[error("the kernel refused program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {0}: it does not match this daemon")]
    Missing(&'static str),
}

/// The loaded tc programs; the attach worker owns them.
pub struct Programs {
    /// Keeps the programs (and the maps they reference) loaded.
    pub ebpf: Ebpf,
}

/// The maps the collector reads.
pub struct Maps {
    pub flows: HashMap<MapData, FlowKey, FlowCounters>,
    pub stats: PerCpuArray<MapData, DatapathStats>,
    pub flow_capacity: u32,
}

/// Loads the object with a flow map of `flow_capacity` entries.
pub fn load(flow_capacity: u32) -> Result<(Programs, Maps), DatapathError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(FLOWS_MAP, flow_capacity)
        .load(OBJECT)
        .map_err(DatapathError::Load)?;
    for name in [EGRESS_PROGRAM, INGRESS_PROGRAM] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        program
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    let flows = take_map(&mut ebpf, FLOWS_MAP)?;
    let stats = take_map(&mut ebpf, STATS_MAP)?;
    let maps = Maps {
        flows: HashMap::try_from(flows).map_err(|source| DatapathError::Map {
            name: FLOWS_MAP,
            source,
        })?,
        stats: PerCpuArray::try_from(stats).map_err(|source| DatapathError::Map {
            name: STATS_MAP,
            source,
        })?,
        flow_capacity,
    };
    Ok((Programs { ebpf }, maps))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::Missing(name))
}
