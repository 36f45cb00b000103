//! Which program a clsact filter runs, asked of the kernel by netlink
//! (`RTM_GETTFILTER`, as `tc filter get` does), in the namespace the calling
//! thread is in. A request that only reads needs no capability, where
//! adding or removing a filter needs `CAP_NET_ADMIN`: an observer without
//! it can still tell whether an earlier observer's filter is on a hook.
//!
//! aya can attach, replace and remove a filter, but cannot tell what a
//! filter runs now; its links know only the hook, priority and handle.

use std::{ffi::CString, io, mem::size_of};

use aya::programs::TcAttachType;

/// `struct tcmsg` (linux/rtnetlink.h).
#[repr(C)]
#[derive(Default)]
struct TcMsg {
    family: u8,
    _pad1: u8,
    _pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

/// The request: a netlink header and a tcmsg, no attributes.
#[repr(C)]
struct Request {
    header: libc::nlmsghdr,
    tc: TcMsg,
}

const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
/// `TCA_OPTIONS`: the classifier's own attributes (nested).
const TCA_OPTIONS: u16 = 2;
/// `TCA_BPF_ID` within them: the id of the program the filter runs.
const TCA_BPF_ID: u16 = 11;
/// The nested and byte-order flags of an attribute's type.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `TC_H_CLSACT` with `TC_H_MIN_INGRESS` / `TC_H_MIN_EGRESS`.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// What sits at a priority and handle of a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAt {
    /// No filter (nor clsact qdisc, nor interface).
    Nothing,
    /// A bpf filter running the program with this id.
    Program(u32),
    /// A filter that names no program (not a bpf one).
    Other,
}

/// What the clsact filter at `priority` and `handle` on `interface` runs
/// in `direction`.
pub fn filter_program(
    interface: &str,
    direction: TcAttachType,
    priority: u16,
    handle: u32,
) -> io::Result<FilterAt> {
    let name = CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Ok(FilterAt::Nothing);
    }
    let parent = match direction {
        TcAttachType::Ingress => CLSACT_INGRESS,
        _ => CLSACT_EGRESS,
    };
    let socket = Socket::open()?;
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: RTM_GETTFILTER,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        tc: TcMsg {
            ifindex: ifindex as i32,
            handle,
            parent,
            // The priority in the high half, the protocol (ETH_P_ALL, as
            // aya attaches, in network order) in the low one.
            info: u32::from(priority) << 16 | u32::from((libc::ETH_P_ALL as u16).to_be()),
            ..TcMsg::default()
        },
    };
    // SAFETY: plain data of the size given.
    let bytes = unsafe {
        std::slice::from_raw_parts((&raw const request).cast::<u8>(), size_of::<Request>())
    };
    socket.send(bytes)?;
    let mut buf = vec![0u8; 16 * 1024];
    let len = socket.recv(&mut buf)?;
    match reply(&buf[..len])? {
        Reply::Filter(Some(id)) => Ok(FilterAt::Program(id)),
        Reply::Filter(None) => Ok(FilterAt::Other),
        // No qdisc (EINVAL: "parent Qdisc doesn't exist"), no filter at
        // that priority or handle (ENOENT).
        Reply::Error(libc::ENOENT | libc::EINVAL) => Ok(FilterAt::Nothing),
        Reply::Error(errno) => Err(io::Error::from_raw_os_error(errno)),
    }
}

enum Reply {
    /// The filter, and its program's id (`None`: a filter without one).
    Filter(Option<u32>),
    Error(i32),
}

/// The first message of the kernel's answer.
fn reply(buf: &[u8]) -> io::Result<Reply> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
    let header_len = size_of::<libc::nlmsghdr>();
    let header = buf.get(..header_len).ok_or_else(malformed)?;
    let len = u32::from_ne_bytes(header[0..4].try_into().unwrap()) as usize;
    let kind = u16::from_ne_bytes(header[4..6].try_into().unwrap());
    let body = buf.get(header_len..len).ok_or_else(malformed)?;
    match kind {
        k if k == libc::NLMSG_ERROR as u16 => {
            let errno =
                i32::from_ne_bytes(body.get(..4).ok_or_else(malformed)?.try_into().unwrap());
            Ok(Reply::Error(-errno))
        }
        RTM_NEWTFILTER => {
            let attributes = body.get(size_of::<TcMsg>()..).ok_or_else(malformed)?;
            let id = attribute(attributes, TCA_OPTIONS)
                .and_then(|options| attribute(options, TCA_BPF_ID))
                .and_then(|id| id.get(..4))
                .map(|id| u32::from_ne_bytes(id.try_into().unwrap()));
            Ok(Reply::Filter(id))
        }
        _ => Err(malformed()),
    }
}

/// The payload of the attribute of type `wanted` in `attributes`.
fn attribute(mut attributes: &[u8], wanted: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        let payload = attributes.get(4..len)?;
        if kind == wanted {
            return Some(payload);
        }
        // Attributes are 4-byte aligned.
        attributes = attributes.get(len.next_multiple_of(4).min(attributes.len())..)?;
    }
    None
}

/// A route netlink socket of the calling thread's namespace.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: a plain socket call.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just opened, owned from here.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the kernel's address (pid 0), zeroed otherwise.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffers of the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const to).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid buffer of the length given.
        let len = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(len).map_err(|_| io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attribute: length, type, payload, padded to 4 bytes.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_program_id_is_read_from_the_nested_options() {
        let mut options = attr(7, b"observe_egress\0");
        options.extend(attr(TCA_BPF_ID, &4242u32.to_ne_bytes()));
        let mut body = vec![0u8; size_of::<TcMsg>()];
        body.extend(attr(1, b"bpf\0"));
        body.extend(attr(TCA_OPTIONS | 0x8000, &options));
        let Ok(Reply::Filter(id)) = reply(&message(RTM_NEWTFILTER, &body)) else {
            panic!("a filter");
        };
        assert_eq!(id, Some(4242));
    }

    #[test]
    fn errors_and_truncated_replies_are_told_apart() {
        let error = message(libc::NLMSG_ERROR as u16, &(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(reply(&error), Ok(Reply::Error(libc::ENOENT))));
        let truncated = &message(RTM_NEWTFILTER, &[0; 8])[..10];
        assert!(reply(truncated).is_err());
        // An attribute claiming more than there is ends the search.
        let mut body = vec![0u8; size_of::<TcMsg>()];
        body.extend_from_slice(&[200, 0, 2, 0, 1, 2, 3, 4]);
        assert!(matches!(
            reply(&message(RTM_NEWTFILTER, &body)),
            Ok(Reply::Filter(None))
        ));
    }
}
