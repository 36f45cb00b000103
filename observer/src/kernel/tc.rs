//! tc attachments: TCX links on kernels 6.6 and newer, clsact filters
//! (netlink) before, each in the namespace the calling thread is in.

mod query;

use query::FilterAt;

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::Link as _,
    tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcError, TcHandle},
};

use super::attach::{LOOPBACK, POD_INTERFACE};
use super::datapath::{EGRESS_PROGRAM, INGRESS_PROGRAM, NOOP_PROGRAM, Programs};
use super::netns::{NetNs, NetnsError};

/// How the tc programs attach (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6 and newer), clsact
    /// filters before.
    #[default]
    Auto,
    /// TCX links: owned by the observer's process (gone with it unless
    /// pinned), and no other tc user can take them away; each attach waits
    /// for an RCU grace period in the kernel.
    Tcx,
    /// clsact filters (netlink; needs NET_ADMIN): attach without waiting,
    /// and outlive the observer's process.
    Clsact,
}

impl TcAttach {
    /// Whether to attach TCX links on this kernel; `Err` if asked for
    /// where the kernel has none.
    pub fn tcx(self) -> Result<bool, aya::util::KernelVersion> {
        use aya::util::KernelVersion;
        let kernel = KernelVersion::current().unwrap_or(KernelVersion::new(0, 0, 0));
        let has = kernel >= KernelVersion::new(6, 6, 0);
        match self {
            Self::Auto => Ok(has),
            Self::Tcx if !has => Err(kernel),
            Self::Tcx => Ok(true),
            Self::Clsact => Ok(false),
        }
    }
}

/// Whether the kernel runs its RCU grace periods expedited (each TCX
/// attach and detach waits for one, under the RTNL lock): asked
/// (`rcu_expedited`), and not overridden (`rcu_normal`). `None` if it
/// cannot be told.
pub fn grace_periods_expedited() -> Option<bool> {
    let set = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/{name}"))
            .ok()
            .map(|value| value.trim() != "0")
    };
    Some(set("rcu_expedited")? && !set("rcu_normal").unwrap_or(false))
}

/// A pod's tc hooks: pin name, interface, direction. Loopback packets pass
/// lo egress and then lo ingress: one hook only, so each is counted once.
pub const POD_HOOKS: [(&str, &str, TcAttachType); 3] = [
    ("lo-egress", LOOPBACK, TcAttachType::Egress),
    ("eth0-egress", POD_INTERFACE, TcAttachType::Egress),
    ("eth0-ingress", POD_INTERFACE, TcAttachType::Ingress),
];

/// The observer's program for a tc direction.
pub fn program_for(direction: TcAttachType) -> &'static str {
    match direction {
        TcAttachType::Ingress => INGRESS_PROGRAM,
        _ => EGRESS_PROGRAM,
    }
}

/// A program attached to a tc hook.
pub struct TcLink {
    pub link: SchedClassifierLink,
    /// A clsact filter an earlier observer left on the hook could not be
    /// removed (a TCX link attached there): it runs beside this one, and
    /// counts each packet again until `observer cleanup` removes it.
    pub filter_left: bool,
    /// The id of the program a clsact filter was made to run: when this
    /// observer goes, the filter goes only if it still runs it
    /// ([`runs_another_program`]).
    pub program: Option<u32>,
}

/// Attaches the observer's program for `direction` to `interface`.
pub fn attach_one(
    programs: &mut Programs,
    tcx: bool,
    interface: &str,
    direction: TcAttachType,
) -> Result<TcLink, ProgramError> {
    attach_program(programs, program_for(direction), tcx, interface, direction)
}

/// Where the observer's clsact filters sit on a hook, as `tc filter show`
/// lists them (`pref 20290 bpf chain 0 handle 0x4f425356`): a fixed
/// priority and handle, so that a restarted observer finds the filter its
/// predecessor left and replaces its program in place. The priority runs
/// them before filters whose priority the kernel chose (49152 and down).
pub const FILTER_PRIORITY: u16 = 0x4f42;
const FILTER_HANDLE: TcHandle = TcHandle::new(0x4f42, 0x5356);
/// The no-op baseline of `cargo xtask bench`, beside the observer's.
const NOOP_HANDLE: TcHandle = TcHandle::new(0x4f42, 0x4e4f);

/// Attaches program `name` to `interface`. A clsact filter an earlier
/// observer left there has its program replaced in place.
pub fn attach_program(
    programs: &mut Programs,
    name: &'static str,
    tcx: bool,
    interface: &str,
    direction: TcAttachType,
) -> Result<TcLink, ProgramError> {
    let program = programs.get(name)?;
    let (id, filter_left) = if tcx {
        let id = program.attach(interface, direction)?;
        (id, !remove_filter(name, interface, direction))
    } else {
        (attach_filter(program, name, interface, direction)?, false)
    };
    Ok(TcLink {
        program: if tcx { None } else { program_id(program) },
        link: program.take_link(id)?,
        filter_left,
    })
}

/// Whether the observer's clsact filter for `direction` on `interface`
/// runs a program other than `ours`: another observer, started before
/// this one went (two on a node without `--pin-dir`), swapped its own into
/// it in place, and the filter is now that observer's to remove. False
/// if the filter runs `ours`, is gone, or cannot be asked about.
pub fn runs_another_program(interface: &str, direction: TcAttachType, ours: u32) -> bool {
    match query::filter_program(interface, direction, FILTER_PRIORITY, FILTER_HANDLE.into()) {
        Ok(FilterAt::Program(now)) => now != ours,
        Ok(FilterAt::Nothing | FilterAt::Other) => false,
        Err(err) => {
            tracing::debug!(%err, interface, "asking which program a filter runs");
            false
        }
    }
}

/// Removes the clsact filter an earlier observer with `--tc-attach clsact`
/// left on the hook, if any: it would count every packet a second time.
/// After the TCX link is attached, so that the hook is never without one.
/// False if a filter is there and stays.
fn remove_filter(name: &'static str, interface: &str, direction: TcAttachType) -> bool {
    let Ok(left) =
        SchedClassifierLink::attached(interface, direction, FILTER_PRIORITY, handle_of(name), None)
    else {
        return true;
    };
    match left.detach() {
        Ok(()) => {
            tracing::info!(
                interface,
                program = name,
                "removed the clsact filter an earlier observer left: attached as a TCX link"
            );
            true
        }
        // No qdisc, or no filter there: nothing to remove.
        Err(ProgramError::NetlinkError(err))
            if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            true
        }
        // Without CAP_NET_ADMIN (a TCX link needs only CAP_SYS_ADMIN) the
        // kernel refuses to remove a filter before it looks; asking whether
        // one is there needs no capability.
        Err(ProgramError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EPERM) => {
            let handle = handle_of(name).into();
            match query::filter_program(interface, direction, FILTER_PRIORITY, handle) {
                Ok(FilterAt::Nothing) => true,
                Ok(FilterAt::Program(_) | FilterAt::Other) => {
                    tracing::warn!(
                        interface,
                        program = name,
                        "without CAP_NET_ADMIN, the clsact filter an earlier observer left cannot be removed: its packets are counted twice until it goes (observer cleanup removes it)"
                    );
                    false
                }
                Err(err) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(
                            %err,
                            "without CAP_NET_ADMIN, clsact filters an earlier observer (--tc-attach clsact) left can neither be removed nor found: if one ran on this node, run observer cleanup, or packets are counted twice"
                        );
                    });
                    true
                }
            }
        }
        // Both run on the hook, and count each packet twice until
        // `observer cleanup` removes the filter: said, and counted
        // (`observer_errors_total{kind="detach"}`).
        Err(err) => {
            tracing::warn!(
                %err,
                interface,
                program = name,
                "cannot remove the clsact filter an earlier observer left: its packets are counted twice until it goes (observer cleanup removes it)"
            );
            false
        }
    }
}

/// The handle of program `name`'s filters.
fn handle_of(name: &str) -> TcHandle {
    if name == NOOP_PROGRAM {
        NOOP_HANDLE
    } else {
        FILTER_HANDLE
    }
}

/// A clsact filter. Unlike TCX links, clsact filters outlive their
/// process: the filter of an observer that was killed is still there, its
/// program still running. One observer runs per node, so a filter at our
/// priority and handle is such a leftover: one netlink request swaps this
/// observer's program into it (the kernel replaces the filter's program
/// atomically), and the hook is never without one, never with two.
fn attach_filter(
    program: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    direction: TcAttachType,
) -> Result<SchedClassifierLinkId, ProgramError> {
    let handle = handle_of(name);
    let options = tc::TcAttachOptions::Netlink(tc::NlOptions {
        priority: FILTER_PRIORITY,
        handle,
        ..tc::NlOptions::default()
    });
    // Already there (ours from an earlier attach, or someone else's) is
    // fine. A qdisc just added holds no filter: nothing to look for.
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => return program.attach_with_options(interface, direction, options),
        Err(TcError::AlreadyAttached) => {}
        Err(err) => tracing::debug!(%err, interface, "adding clsact"),
    }
    let left = SchedClassifierLink::attached(interface, direction, FILTER_PRIORITY, handle, None)
        .map_err(TcError::IoError)?;
    // Without NLM_F_CREATE: replaces, or fails with ENOENT.
    match program.attach_to_link(left) {
        Ok(id) => {
            tracing::info!(
                interface,
                program = name,
                "replaced in place the program of the filter an earlier observer left"
            );
            return Ok(id);
        }
        Err(ProgramError::TcError(TcError::NetlinkError(err)))
            if err.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => return Err(err),
    }
    // Filters of observers from before the fixed priority: found by name.
    match tc::qdisc_detach_program(interface, direction, name) {
        Ok(()) => tracing::info!(
            interface,
            program = name,
            "removed a filter left by an earlier observer"
        ),
        Err(TcError::IoError(err)) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::debug!(%err, interface, "looking for leftover filters"),
    }
    program.attach_with_options(interface, direction, options)
}

/// The clsact filter of the observer's program for `direction` that an
/// earlier observer left on `interface` (a pod that fails closed): held to
/// swap this observer's program in at [`swap_filter`], or to remove.
pub fn left_filter(
    interface: &str,
    direction: TcAttachType,
) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(interface, direction, FILTER_PRIORITY, FILTER_HANDLE, None)
}

/// Swaps the program for `direction` into a filter an earlier observer
/// left, in place (the kernel replaces it atomically). `ENOENT` if the
/// filter is not there any more. With the id of the program it runs now.
pub fn swap_filter(
    programs: &mut Programs,
    left: SchedClassifierLink,
    direction: TcAttachType,
) -> Result<(SchedClassifierLink, Option<u32>), ProgramError> {
    let program = programs.get(program_for(direction))?;
    let id = program.attach_to_link(left)?;
    let ours = program_id(program);
    Ok((program.take_link(id)?, ours))
}

/// The kernel's id of a loaded program (`None` if it cannot be read: a
/// filter running it is then removed without asking, see
/// [`runs_another_program`]).
fn program_id(program: &SchedClassifier) -> Option<u32> {
    program.info().ok().map(|info| info.id())
}

/// Removes every filter of an observer's (its own, and the benchmark's
/// no-op) from the pod hooks of the current thread's namespace: what
/// observers with clsact filters left when they were killed, or for pods
/// that fail closed. Returns how many there were; `EPERM` without
/// `CAP_NET_ADMIN`.
pub fn remove_left_filters() -> std::io::Result<usize> {
    let mut removed = 0;
    for (_, interface, direction) in POD_HOOKS {
        if !interface_exists(interface) {
            continue;
        }
        for handle in [FILTER_HANDLE, NOOP_HANDLE] {
            let Ok(link) =
                SchedClassifierLink::attached(interface, direction, FILTER_PRIORITY, handle, None)
            else {
                continue;
            };
            match link.detach() {
                Ok(()) => removed += 1,
                Err(ProgramError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EPERM) => {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
                // No qdisc, or no filter of ours there.
                Err(_) => {}
            }
        }
    }
    Ok(removed)
}

/// What [`remove_left_filters_on_node`] did.
#[derive(Debug, Default)]
pub struct LeftFilters {
    /// Network namespaces entered.
    pub namespaces: usize,
    /// Filters removed.
    pub removed: usize,
    /// Namespaces that could not be opened, entered or changed (a
    /// capability missing).
    pub refused: usize,
}

/// Removes the filters observers left in every network namespace of the
/// node's processes (`proc_root`: the node's `/proc`, which a pod sees with
/// `hostPID`).
pub fn remove_left_filters_on_node(proc_root: &std::path::Path) -> std::io::Result<LeftFilters> {
    let home = NetNs::current_thread().map_err(std::io::Error::other)?;
    let (found, unopened) = super::netns::of_processes(proc_root)?;
    let mut done = LeftFilters {
        refused: unopened,
        ..LeftFilters::default()
    };
    for netns in found {
        match netns.run(&home, remove_left_filters) {
            Ok(Ok(removed)) => {
                done.namespaces += 1;
                done.removed += removed;
            }
            Ok(Err(_)) => done.refused += 1,
            Err(NetnsError::Return(err)) => return Err(err),
            Err(_) => done.refused += 1,
        }
    }
    Ok(done)
}

/// Whether interface `name` exists in the current thread's namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: reads a NUL-terminated string we own.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}
