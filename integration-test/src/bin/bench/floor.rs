//! The floors: a program that does nothing (`return TC_ACT_UNSPEC`), and
//! one that only counts (each packet and its bytes into one per-CPU slot:
//! the least any counting program does), attached by TCX links on the
//! hooks the observer uses, so that the throughput benchmark can say what
//! any program there costs, and what any program that counts costs, next
//! to what the observer costs. A few instructions loaded with `bpf(2)`
//! directly: no object file, nothing of the observer's.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use lab::Netns;
use observer::kernel::attach::{LOOPBACK, POD_INTERFACE};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The no-op: `r0 = -1 (TC_ACT_UNSPEC: on to the next program or the stack); exit`.
const PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm -1 (little-endian fields).
    0xffff_ffff_0000_00b7,
    // BPF_JMP | BPF_EXIT.
    0x0000_0000_0000_0095,
];

/// One instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((src << 4) | dst) as u64) << 8
        | ((off as u16) as u64) << 16
        | ((imm as u32) as u64) << 32
}

/// The counter, `map` standing for its map's descriptor:
/// `slot = lookup(map, 0); if slot { slot.packets += 1; slot.bytes +=
/// skb->len }; return TC_ACT_UNSPEC`.
fn counter(map: i32) -> [u64; 16] {
    [
        insn(0x61, 6, 1, 0, 0),   // r6 = skb->len (u32 at 0)
        insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0: the key
        insn(0xbf, 2, 10, 0, 0),  // r2 = r10
        insn(0x07, 2, 0, 0, -4),  // r2 += -4
        insn(0x18, 1, 1, 0, map), // r1 = the map (BPF_PSEUDO_MAP_FD)
        insn(0x00, 0, 0, 0, 0),   //   (its upper half)
        insn(0x85, 0, 0, 0, 1),   // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 6, 0),   // if r0 == 0 goto out
        insn(0x79, 1, 0, 0, 0),   // r1 = slot.packets
        insn(0x07, 1, 0, 0, 1),   // r1 += 1
        insn(0x7b, 0, 1, 0, 0),   // slot.packets = r1
        insn(0x79, 1, 0, 8, 0),   // r1 = slot.bytes
        insn(0x0f, 1, 6, 0, 0),   // r1 += r6
        insn(0x7b, 0, 1, 8, 0),   // slot.bytes = r1
        insn(0xb7, 0, 0, 0, -1),  // out: r0 = TC_ACT_UNSPEC
        insn(0x95, 0, 0, 0, 0),   // exit
    ]
}

/// A floor program, loaded; its links go when they are dropped.
pub struct Floor {
    program: OwnedFd,
    /// The counter's map (a per-CPU slot of packets and bytes).
    _map: Option<OwnedFd>,
}

impl Floor {
    /// The program that does nothing.
    pub fn noop() -> io::Result<Self> {
        Ok(Self {
            program: load(&PROGRAM, b"noop\0")?,
            _map: None,
        })
    }

    /// The program that only counts.
    pub fn counter() -> io::Result<Self> {
        // union bpf_attr, BPF_MAP_CREATE: map_type, key_size, value_size,
        // max_entries.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_MAP_TYPE_PERCPU_ARRAY.to_ne_bytes());
        attr[4..8].copy_from_slice(&4u32.to_ne_bytes());
        attr[8..12].copy_from_slice(&16u32.to_ne_bytes());
        attr[12..16].copy_from_slice(&1u32.to_ne_bytes());
        let map = bpf(BPF_MAP_CREATE, &attr)?;
        use std::os::fd::AsRawFd;
        let program = load(&counter(map.as_raw_fd()), b"count\0")?;
        Ok(Self {
            program,
            _map: Some(map),
        })
    }

    /// Links the program to `lo` egress, and `eth0` egress and ingress, in
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

/// Loads `insns` as a tc program named `name` (NUL-terminated).
fn load(insns: &[u64], name: &[u8]) -> io::Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    // union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    // and at 48 the name.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..48 + name.len()].copy_from_slice(name);
    bpf(BPF_PROG_LOAD, &attr)
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
