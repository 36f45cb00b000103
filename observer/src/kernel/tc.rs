//! tc attachments: TCX links on kernels 6.6 and newer, clsact filters
//! (netlink) before, each in the namespace the calling thread is in.

use aya::programs::{
    ProgramError, TcAttachType,
    tc::{self, SchedClassifierLink, TcError},
};

use super::datapath::{EGRESS_PROGRAM, INGRESS_PROGRAM, Programs};

/// Attaches the observer's program for `direction` to `interface`.
pub fn attach_one(
    programs: &mut Programs,
    tcx: bool,
    interface: &str,
    direction: TcAttachType,
) -> Result<SchedClassifierLink, ProgramError> {
    let name = match direction {
        TcAttachType::Ingress => INGRESS_PROGRAM,
        _ => EGRESS_PROGRAM,
    };
    attach_program(programs, name, tcx, interface, direction)
}

/// Attaches program `name` to `interface`, replacing a filter an earlier
/// observer left (clsact).
pub fn attach_program(
    programs: &mut Programs,
    name: &'static str,
    tcx: bool,
    interface: &str,
    direction: TcAttachType,
) -> Result<SchedClassifierLink, ProgramError> {
    let program = programs.get(name)?;
    if !tcx {
        // Already there (ours from an earlier attach, or someone else's) is fine.
        match tc::qdisc_add_clsact(interface) {
            Ok(()) | Err(TcError::AlreadyAttached) => {}
            Err(err) => tracing::debug!(%err, interface, "adding clsact"),
        }
        // Unlike TCX links, clsact filters outlive their process: those of
        // an observer that was killed are still there. One observer runs
        // per node, so a filter of ours on this hook is such a leftover.
        match tc::qdisc_detach_program(interface, direction, name) {
            Ok(()) => tracing::info!(
                interface,
                program = name,
                "removed a filter left by an earlier observer"
            ),
            Err(TcError::IoError(err)) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::debug!(%err, interface, "looking for leftover filters"),
        }
    }
    let id = if tcx {
        program.attach(interface, direction)?
    } else {
        let options = tc::TcAttachOptions::Netlink(tc::NlOptions::default());
        program.attach_with_options(interface, direction, options)?
    };
    program.take_link(id)
}

/// Whether interface `name` exists in the current thread's namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: reads a NUL-terminated string we own.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}
