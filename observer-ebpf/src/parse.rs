//! Reads the few header fields a flow key needs, and nothing else.
//!
//! tc hands us the frame from its link-layer header on `lo` and on veth
//! alike. Headers are copied with `bpf_skb_load_bytes` into aligned buffers
//! on the stack: a direct read of packet data may be misaligned, and LLVM
//! then reads it byte by byte. The helper also works for a non-linear skb.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use observer_common::{FlowKey, family, interface};

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// `::ffff:0:0` as the first 12 bytes, in 32-bit words of memory order.
const IPV4_MAPPED: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The flow key of the packet (but for `netns_cookie` and `direction`), and
/// whether it opens a TCP connection (SYN without ACK).
#[inline(always)]
pub fn flow_key(ctx: &TcContext) -> (FlowKey, bool) {
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
        return (key, false);
    };
    if key.protocol == IPPROTO_TCP {
        // Ports, sequence and acknowledgement numbers, offset and flags.
        let mut tcp = [0u16; 7];
        if load(ctx, offset, &mut tcp) {
            set_ports(&mut key, tcp[0], tcp[1]);
            let flags = tcp[6].to_ne_bytes()[1];
            return (key, flags & (TCP_SYN | TCP_ACK) == TCP_SYN);
        }
    } else {
        let mut ports = [0u16; 2];
        if load(ctx, offset, &mut ports) {
            set_ports(&mut key, ports[0], ports[1]);
        }
    }
    (key, false)
}

/// Fills the IPv4 fields; returns the transport header's offset if it has ports.
#[inline(always)]
fn ipv4(ctx: &TcContext, key: &mut FlowKey) -> Option<u32> {
    // Words: version/IHL/TOS/length, id/fragment, TTL/protocol/checksum,
    // source, destination.
    let mut ip = [0u32; 5];
    if !load(ctx, ETH_HLEN, &mut ip) {
        return None;
    }
    let [first, fragment, ttl_protocol, src, dst] = ip;
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
    let mut ip = [0u32; 10];
    if !load(ctx, ETH_HLEN, &mut ip) {
        return None;
    }
    key.family = family::IPV6;
    key.protocol = ip[1].to_ne_bytes()[2];
    set_addr(&mut key.src_addr, [ip[2], ip[3], ip[4], ip[5]]);
    set_addr(&mut key.dst_addr, [ip[6], ip[7], ip[8], ip[9]]);
    has_ports(key.protocol).then_some(ETH_HLEN + 40)
}

#[inline(always)]
fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
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

/// Copies `size_of_val(buf)` bytes from `offset` of the frame into `buf`.
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: u32, buf: &mut T) -> bool {
    // SAFETY: the helper writes at most size_of::<T>() bytes into `buf`,
    // which is plain integers.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            (buf as *mut T).cast(),
            size_of::<T>() as u32,
        ) == 0
    }
}
