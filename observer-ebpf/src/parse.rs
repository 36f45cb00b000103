//! Reads the few header fields a flow key needs, and nothing else.
//!
//! tc hands us the frame from its link-layer header on `lo` and on veth alike.
//! Headers are read straight from the packet when they are in its linear part
//! (the common case) and through `bpf_skb_load_bytes` otherwise, so a
//! non-linear skb is still counted under the right flow.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use observer_common::{FlowKey, family};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_TCP: u8 = 6;
/// Data offset and flags in the TCP header (flags are the second byte).
const TCP_OFFSET_FLAGS: usize = 12;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The flow key of the packet (but for `netns_cookie` and `direction`), and
/// whether it opens a TCP connection (SYN without ACK).
#[inline(always)]
pub fn flow_key(ctx: &TcContext) -> (FlowKey, bool) {
    let mut key = FlowKey::default();
    // SAFETY: reads of the context the kernel passed in.
    let (if_index, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    key.if_index = if_index;
    // `protocol` holds the big-endian ethertype in its low 16 bits.
    let l4_offset = match u16::from_be(protocol as u16) {
        ETH_P_IP => ipv4(ctx, &mut key),
        ETH_P_IPV6 => ipv6(ctx, &mut key),
        _ => None,
    };
    let mut syn = false;
    if let Some(offset) = l4_offset {
        if let Some(ports) = read::<[u16; 2]>(ctx, offset) {
            key.src_port = u16::from_be(ports[0]);
            key.dst_port = u16::from_be(ports[1]);
        }
        if key.protocol == IPPROTO_TCP {
            // The 16-bit word of data offset and flags: a 1-byte read would let
            // LLVM turn the bounds check into a form the verifier cannot use.
            let word = read::<[u8; 2]>(ctx, offset + TCP_OFFSET_FLAGS).unwrap_or([0; 2]);
            syn = word[1] & (TCP_SYN | TCP_ACK) == TCP_SYN;
        }
    }
    (key, syn)
}

/// Fills the IPv4 fields; returns the transport header's offset if it has ports.
#[inline(always)]
fn ipv4(ctx: &TcContext, key: &mut FlowKey) -> Option<usize> {
    let ip = read::<Ipv4Header>(ctx, ETH_HLEN)?;
    key.family = family::IPV4;
    key.protocol = ip.protocol;
    // IPv4-mapped IPv6: ::ffff:a.b.c.d
    key.src_addr[10] = 0xff;
    key.src_addr[11] = 0xff;
    key.src_addr[12..].copy_from_slice(&ip.src);
    key.dst_addr[10] = 0xff;
    key.dst_addr[11] = 0xff;
    key.dst_addr[12..].copy_from_slice(&ip.dst);
    // Only the first fragment carries the ports.
    let first_fragment = u16::from_be(ip.frag_off) & 0x1fff == 0;
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    (first_fragment && has_ports(ip.protocol)).then_some(ETH_HLEN + header_len)
}

/// Fills the IPv6 fields. Extension headers are not followed: such packets are
/// counted under their first next-header value, without ports.
#[inline(always)]
fn ipv6(ctx: &TcContext, key: &mut FlowKey) -> Option<usize> {
    let ip = read::<Ipv6Header>(ctx, ETH_HLEN)?;
    key.family = family::IPV6;
    key.protocol = ip.next_header;
    key.src_addr = ip.src;
    key.dst_addr = ip.dst;
    has_ports(ip.next_header).then_some(ETH_HLEN + size_of::<Ipv6Header>())
}

#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// Reads a `T` at `offset` from the start of the frame.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() <= end {
        // SAFETY: the whole `T` lies before data_end, as checked just above.
        return Some(unsafe { ((start + offset) as *const T).read_unaligned() });
    }
    // Not `ctx.load`: its error path leaves the value undefined, and LLVM may
    // then compute with it before branching, which the verifier refuses.
    // A zeroed buffer is defined on every path.
    let mut buf = MaybeUninit::<T>::zeroed();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `buf`.
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            buf.as_mut_ptr().cast(),
            size_of::<T>() as u32,
        )
    };
    // SAFETY: zero bytes are a valid T for the plain integers we read.
    (copied == 0).then(|| unsafe { buf.assume_init() })
}
