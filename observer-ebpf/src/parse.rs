//! Reads the few header fields a flow key needs, and nothing else.
//!
//! tc hands us the frame from its link-layer header on `lo` and on veth
//! alike. Headers are read in place, word by word, where they lie in the
//! packet's linear part (the common case), and copied with
//! `bpf_skb_load_bytes` otherwise. In place, the words may be misaligned, so
//! they are read as such (LLVM reads them byte by byte on BPF: measured, that
//! is cheaper than a helper call per header).

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use observer_common::{
    FlowKey, family, interface,
    protocol::{self, has_ports},
};

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// `::ffff:0:0` as the first 12 bytes, in 32-bit words of memory order.
const IPV4_MAPPED: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The flow key of the packet (but for `netns_cookie` and `direction`),
/// whether it opens a TCP connection (SYN without ACK), and then its
/// sequence number (0 otherwise).
#[inline(always)]
pub fn flow_key(ctx: &TcContext) -> (FlowKey, bool, u32) {
    let mut key = FlowKey::default();
    // SAFETY: reads of the context the kernel passed in.
    let (if_index, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    key.interface = if if_index == LOOPBACK_IFINDEX {
        interface::LOOPBACK
    } else {
        interface::POD
    };
    // `protocol` holds the big-endian ethertype in its low 16 bits.
    let l4 = match u16::from_be(protocol as u16) {
        ETH_P_IP => ipv4(ctx, &mut key),
        ETH_P_IPV6 => ipv6(ctx, &mut key),
        _ => None,
    };
    let Some(offset) = l4 else {
        return (key, false, 0);
    };
    if key.protocol == protocol::TCP {
        // Ports, sequence and acknowledgement numbers, offset and flags.
        if let Some(tcp) = load::<u16, 7>(ctx, offset) {
            set_ports(&mut key, tcp[0], tcp[1]);
            let flags = tcp[6].to_ne_bytes()[1];
            let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let [a, b] = tcp[2].to_ne_bytes();
            let [c, d] = tcp[3].to_ne_bytes();
            let seq = if syn {
                u32::from_be_bytes([a, b, c, d])
            } else {
                0
            };
            return (key, syn, seq);
        }
    } else {
        if let Some(ports) = load::<u16, 2>(ctx, offset) {
            set_ports(&mut key, ports[0], ports[1]);
        }
    }
    (key, false, 0)
}

/// Fills the IPv4 fields; returns the transport header's offset if it has ports.
#[inline(always)]
fn ipv4(ctx: &TcContext, key: &mut FlowKey) -> Option<u32> {
    // Words: version/IHL/TOS/length, id/fragment, TTL/protocol/checksum,
    // source, destination.
    let [first, fragment, ttl_protocol, src, dst] = load::<u32, 5>(ctx, ETH_HLEN)?;
    key.family = family::IPV4;
    key.protocol = ttl_protocol.to_ne_bytes()[1];
    set_addr(
        &mut key.src_addr,
        [IPV4_MAPPED[0], IPV4_MAPPED[1], IPV4_MAPPED[2], src],
    );
    set_addr(
        &mut key.dst_addr,
        [IPV4_MAPPED[0], IPV4_MAPPED[1], IPV4_MAPPED[2], dst],
    );
    // Only the first fragment carries the ports.
    let [_, _, offset_high, offset_low] = fragment.to_ne_bytes();
    let first_fragment = u16::from_be_bytes([offset_high, offset_low]) & 0x1fff == 0;
    let header_len = u32::from(first.to_ne_bytes()[0] & 0x0f) * 4;
    (first_fragment && has_ports(key.protocol)).then_some(ETH_HLEN + header_len)
}

/// Fills the IPv6 fields. Extension headers are not followed: such packets are
/// counted under their first next-header value, without ports.
#[inline(always)]
fn ipv6(ctx: &TcContext, key: &mut FlowKey) -> Option<u32> {
    // Words: version/class/flow, length/next header/hop limit, addresses.
    let ip = load::<u32, 10>(ctx, ETH_HLEN)?;
    key.family = family::IPV6;
    key.protocol = ip[1].to_ne_bytes()[2];
    set_addr(&mut key.src_addr, [ip[2], ip[3], ip[4], ip[5]]);
    set_addr(&mut key.dst_addr, [ip[6], ip[7], ip[8], ip[9]]);
    has_ports(key.protocol).then_some(ETH_HLEN + 40)
}

#[inline(always)]
fn set_ports(key: &mut FlowKey, src: u16, dst: u16) {
    key.src_port = u16::from_be(src);
    key.dst_port = u16::from_be(dst);
}

/// Writes an address as four words (the key's address fields are 8-byte
/// aligned, so these are aligned stores, not sixteen byte stores).
#[inline(always)]
fn set_addr(field: &mut [u8; 16], words: [u32; 4]) {
    // SAFETY: [u8; 16] and [u32; 4] have the same size; the field sits at
    // offsets 8 and 24 of the 8-aligned FlowKey, so it is 4-aligned.
    unsafe { field.as_mut_ptr().cast::<[u32; 4]>().write(words) };
}

/// Reads `[W; N]` (plain integers) from `offset` of the frame.
#[inline(always)]
fn load<W: Copy, const N: usize>(ctx: &TcContext, offset: u32) -> Option<[W; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    let size = size_of::<[W; N]>();
    let at = start + offset as usize;
    if at + size <= end {
        // SAFETY: within [data, data_end), as checked just above.
        return Some(unsafe { (at as *const [W; N]).read_unaligned() });
    }
    // Not zeroed (that would cost a memset call): the helper writes all of
    // it or fails, and then nothing reads it.
    let mut buf = MaybeUninit::<[W; N]>::uninit();
    // SAFETY: the helper writes exactly `size` bytes into `buf`.
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            buf.as_mut_ptr().cast(),
            size as u32,
        )
    };
    // SAFETY: initialised by the helper when it succeeded.
    (copied == 0).then(|| unsafe { buf.assume_init() })
}
