//! The `socket-lb` dataplane: Services translated at `connect()` and
//! `sendmsg()` by cgroup programs on the lab's top cgroup (lab-ebpf), as
//! Cilium's kube-proxy replacement does on a node, instead of iptables DNAT
//! in the node. The programs' links are pinned in a bpffs of the lab's own
//! (`<state>/bpffs`), so they outlive the process that brought the lab up;
//! `lab down` unmounts it, which detaches them.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use lab_ebpf::{Backends, MAX_BACKENDS, PROGRAMS, SERVICES_MAP, ServiceKey};

use crate::{LabError, spec::Plan};

/// The object lab/build.rs built; empty without the eBPF toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lab-socket-lb"));

/// Loads the programs, fills their Service map from the plan, attaches them
/// to `cgroup` (the lab's top cgroup) and pins the links under `state`.
pub fn install(plan: &Plan, cgroup: &Path, state: &Path) -> Result<(), LabError> {
    if OBJECT.is_empty() {
        return Err(LabError::SocketLb(
            "the lab was built without the eBPF toolchain: run `cargo xtask setup`".into(),
        ));
    }
    let error = |what: &str| {
        let what = what.to_owned();
        move |err: &dyn std::fmt::Display| LabError::SocketLb(format!("{what}: {err}"))
    };
    let pins = bpffs(state)?;
    let mut ebpf = Ebpf::load(OBJECT).map_err(|e| error("loading")(&e))?;
    let mut services: HashMap<_, ServiceKey, Backends> = ebpf
        .map_mut(SERVICES_MAP)
        .ok_or_else(|| LabError::SocketLb(format!("no map {SERVICES_MAP}")))?
        .try_into()
        .map_err(|e| error("the Service map")(&e))?;
    for (service, endpoints) in plan.spec.services.iter().zip(&plan.endpoints) {
        for port in &service.ports {
            let mut backends = Backends::default();
            for &pod in endpoints.iter().take(MAX_BACKENDS) {
                let i = backends.count as usize;
                backends.addrs[i] = u32::from_ne_bytes(plan.pod_ips[pod].octets());
                backends.ports[i] = port.target_port.unwrap_or(port.port);
                backends.count += 1;
            }
            let key = ServiceKey {
                addr: u32::from_ne_bytes(service.cluster_ip.octets()),
                port: port.port,
                protocol: port.protocol.number(),
                _pad: 0,
            };
            services
                .insert(key, backends, 0)
                .map_err(|e| error("filling the Service map")(&e))?;
        }
    }
    let dir = fs::File::open(cgroup).map_err(|source| LabError::Io {
        what: format!("opening cgroup {}", cgroup.display()),
        source,
    })?;
    for name in PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| LabError::SocketLb(format!("no program {name}")))?
            .try_into()
            .map_err(|e| error(name)(&e))?;
        program.load().map_err(|e| error(name)(&e))?;
        let id = program
            .attach(&dir, CgroupAttachMode::default())
            .map_err(|e| error(name)(&e))?;
        let link = FdLink::try_from(program.take_link(id).map_err(|e| error(name)(&e))?)
            .map_err(|e| error(name)(&e))?;
        link.pin(pins.join(name)).map_err(|e| error(name)(&e))?;
    }
    Ok(())
}

/// Removes the lab's bpffs, and with its pins the programs' links.
pub fn uninstall(state: &Path) {
    let path = state.join("bpffs");
    if let Ok(target) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a NUL-terminated path that outlives the call; an error
        // (nothing mounted) changes nothing.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = fs::remove_dir(&path);
}

/// Mounts a bpffs of the lab's own at `<state>/bpffs`.
fn bpffs(state: &Path) -> Result<PathBuf, LabError> {
    let path = state.join("bpffs");
    fs::create_dir_all(&path).map_err(|source| LabError::Io {
        what: format!("creating {}", path.display()),
        source,
    })?;
    let target = CString::new(path.as_os_str().as_bytes()).expect("our paths have no NUL");
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(LabError::Io {
            what: format!("mounting a bpffs at {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(path)
}
