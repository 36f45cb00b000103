//! The floor: a program that does nothing (`return TC_ACT_UNSPEC`),
//! attached by TCX links on the hooks the observer uses, so that the
//! throughput benchmark can say what any program there costs, next to what
//! the observer costs. Two instructions loaded with `bpf(2)` directly: no
//! object file, nothing of the observer's.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use lab::Netns;
use observer::kernel::attach::{LOOPBACK, POD_INTERFACE};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `r0 = -1 (TC_ACT_UNSPEC: on to the next program or the stack); exit`.
const PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1 (little-endian fields).
    0xffff_ffff_0000_00b7,
    // BPF_JMP | BPF_EXIT.
    0x0000_0000_0000_0095,
];

/// The no-op, loaded; its links go when they are dropped.
pub struct Noop {
    program: OwnedFd,
}

impl Noop {
    pub fn load() -> io::Result<Self> {
        let license = CString::new("GPL").expect("no NUL");
        // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        attr[4..8].copy_from_slice(&(PROGRAM.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(PROGRAM.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..53].copy_from_slice(b"noop\0");
        Ok(Self {
            program: bpf(BPF_PROG_LOAD, &attr)?,
        })
    }

    /// Links the no-op to `lo` egress, and `eth0` egress and ingress, in
    /// `netns`: where the observer attaches (lo ingress sees the same
    /// packets as lo egress, and it leaves it alone).
    pub fn attach(&self, netns: &Netns) -> io::Result<Vec<OwnedFd>> {
        use std::os::fd::AsRawFd;
        let program = self.program.as_raw_fd();
        netns
            .run(|| {
                [
                    (LOOPBACK, BPF_TCX_EGRESS),
                    (POD_INTERFACE, BPF_TCX_EGRESS),
                    (POD_INTERFACE, BPF_TCX_INGRESS),
                ]
                .into_iter()
                .map(|(interface, attach_type)| link(program, interface, attach_type))
                .collect()
            })
            .map_err(io::Error::other)?
    }
}

/// A TCX link of `program` on `interface` of the calling thread's namespace.
fn link(program: RawFd, interface: &str, attach_type: u32) -> io::Result<OwnedFd> {
    let name = CString::new(interface).expect("no NUL");
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // union bpf_attr, BPF_LINK_CREATE: prog_fd, target_ifindex, attach_type.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&index.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &attr)
}

fn bpf(command: libc::c_long, attr: &[u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed union bpf_attr of the command's layout, and
    // the pointers in it live across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
