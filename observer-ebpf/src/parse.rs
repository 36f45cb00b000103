//! Reads the few header fields a flow key needs, and nothing else.
//!
//! tc hands us the frame from its link-layer header on `lo` and on veth
//! alike. Headers are read in place, a 32-bit word at a time, where they
//! lie in the packet's linear part (the common case), and copied with
//! `bpf_skb_load_bytes` otherwise (a helper call per header).

// Both objects build this module; each uses its part.
#![allow(dead_code)]

use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use observer_common::{
    FlowKey, family, interface,
    protocol::{self, has_ports},
};

const _: () = assert!(size_of::<FlowKey>() == 48 && align_of::<FlowKey>() == 8);

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `lo` has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A packet's flow, as [`flow`] reads it.
pub struct Flow {
    /// The flow key's memory, six words: compared and hashed as such by
    /// the flow cache, which never needs its fields.
    pub words: [u64; 6],
    /// It opens a TCP connection (SYN without ACK).
    pub syn: bool,
    /// Then its sequence number (0 otherwise).
    pub seq: u32,
}

impl Flow {
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        // SAFETY: FlowKey is 48 bytes of plain integers without padding,
        // 8-aligned, which is what the words are.
        unsafe { core::mem::transmute::<[u64; 6], FlowKey>(self.words) }
    }
}

/// The flow of the packet seen at a hook of the namespace with this cookie
/// in this direction.
///
/// IPv4, almost all traffic, is read straight into the key's words: the
/// addresses as `::ffff:a.b.c.d`, then ports, protocol, direction, family
/// and interface (FlowKey's layout, little-endian, as BPF is here).
#[inline(always)]
pub fn flow(ctx: &TcContext, cookie: u64, direction: u8) -> Flow {
    // SAFETY: reads of the context the kernel passed in.
    let (if_index, protocol) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).protocol) };
    let interface = if if_index == LOOPBACK_IFINDEX {
        interface::LOOPBACK
    } else {
        interface::POD
    };
    // Bytes 40..48 of the key: ports (host order), then one byte each.
    let tail = |ports: u32, protocol: u8, family: u8| {
        u64::from(ports)
            | u64::from(protocol) << 32
            | u64::from(direction) << 40
            | u64::from(family) << 48
            | u64::from(interface) << 56
    };
    // `protocol` holds the big-endian ethertype in its low 16 bits.
    match u16::from_be(protocol as u16) {
        ETH_P_IP => {
            if let Some((ip, offset)) = ipv4(ctx) {
                let (ports, syn, seq) = match offset {
                    Some(offset) => transport(ctx, ip.protocol, offset),
                    None => (0, false, 0),
                };
                return Flow {
                    words: [
                        cookie,
                        0,
                        MAPPED | u64::from(ip.src) << 32,
                        0,
                        MAPPED | u64::from(ip.dst) << 32,
                        tail(ports, ip.protocol, family::IPV4),
                    ],
                    syn,
                    seq,
                };
            }
        }
        ETH_P_IPV6 => {
            if let Some((ip, offset)) = ipv6(ctx) {
                let (ports, syn, seq) = match offset {
                    Some(offset) => transport(ctx, ip[1].to_ne_bytes()[2], offset),
                    None => (0, false, 0),
                };
                let pair = |a: u32, b: u32| u64::from(a) | u64::from(b) << 32;
                return Flow {
                    words: [
                        cookie,
                        pair(ip[2], ip[3]),
                        pair(ip[4], ip[5]),
                        pair(ip[6], ip[7]),
                        pair(ip[8], ip[9]),
                        tail(ports, ip[1].to_ne_bytes()[2], family::IPV6),
                    ],
                    syn,
                    seq,
                };
            }
        }
        _ => {}
    }
    // Not IP, or a header that could not be read: counted without
    // addresses, ports or protocol.
    Flow {
        words: [cookie, 0, 0, 0, 0, tail(0, 0, family::OTHER)],
        syn: false,
        seq: 0,
    }
}

/// Bytes 8..16 of an IPv4-mapped address (`::ffff:a.b.c.d`) but for the
/// address itself: `ff ff` at bytes 10 and 11.
const MAPPED: u64 = 0xffff_0000;

/// What the flow needs of an IPv4 header.
struct Ipv4 {
    protocol: u8,
    /// The addresses as they lie in memory (network order).
    src: u32,
    dst: u32,
}

/// The IPv4 header, and the transport header's offset if the packet has
/// ports (only the first fragment carries them).
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(Ipv4, Option<u32>)> {
    // Words: version/IHL/TOS/length, id/fragment, TTL/protocol/checksum,
    // source, destination.
    let [first, fragment, ttl_protocol, src, dst] = match linear(ctx, ETH_HLEN, 20) {
        Some(at) => words!(at; 0, 4, 8, 12, 16),
        None => copy::<5>(ctx, ETH_HLEN)?,
    };
    let protocol = ttl_protocol.to_ne_bytes()[1];
    let [_, _, offset_high, offset_low] = fragment.to_ne_bytes();
    let first_fragment = u16::from_be_bytes([offset_high, offset_low]) & 0x1fff == 0;
    let header_len = u32::from(first.to_ne_bytes()[0] & 0x0f) * 4;
    let offset = (first_fragment && has_ports(protocol)).then_some(ETH_HLEN + header_len);
    Some((Ipv4 { protocol, src, dst }, offset))
}

/// The IPv6 header's ten words, and the transport header's offset if the
/// packet has ports. Extension headers are not followed: such packets are
/// counted under their first next-header value, without ports.
#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<([u32; 10], Option<u32>)> {
    // Words: version/class/flow, length/next header/hop limit, addresses.
    let ip = match linear(ctx, ETH_HLEN, 40) {
        Some(at) => words!(at; 0, 4, 8, 12, 16, 20, 24, 28, 32, 36),
        None => copy::<10>(ctx, ETH_HLEN)?,
    };
    let offset = has_ports(ip[1].to_ne_bytes()[2]).then_some(ETH_HLEN + 40);
    Some((ip, offset))
}

/// The transport header at `offset`: the ports as the key holds them
/// (source in the low half, host order), whether it is a TCP SYN, and then
/// its sequence number.
#[inline(always)]
fn transport(ctx: &TcContext, protocol: u8, offset: u32) -> (u32, bool, u32) {
    // Network order, both ports: source in the high half once read as
    // big-endian; the key wants it in the low half.
    let ports = |word: u32| u32::from_be(word).rotate_left(16);
    if protocol == protocol::TCP {
        // Ports, sequence and acknowledgement numbers, offset and flags.
        let tcp = match linear(ctx, offset, 16) {
            Some(at) => Some(words!(at; 0, 4, 12)),
            None => copy::<4>(ctx, offset).map(|[ports, seq, _, flags]| [ports, seq, flags]),
        };
        return match tcp {
            Some([word, seq, flags]) => {
                let flags = flags.to_ne_bytes()[1];
                let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
                (ports(word), syn, if syn { u32::from_be(seq) } else { 0 })
            }
            None => (0, false, 0),
        };
    }
    let word = match linear(ctx, offset, 4) {
        Some(at) => Some(words!(at; 0)),
        None => copy::<1>(ctx, offset),
    };
    (word.map_or(0, |[word]| ports(word)), false, 0)
}

/// The address of the frame's bytes `offset..offset + len`, if they lie
/// in the packet's linear part (the common case), where they are read in
/// place with [`words!`].
#[inline(always)]
fn linear(ctx: &TcContext, offset: u32, len: usize) -> Option<usize> {
    let at = ctx.data() + offset as usize;
    (at + len <= ctx.data_end()).then_some(at)
}

/// The 32-bit words at these constant offsets from `at`, which [`linear`]
/// returned for enough bytes.
macro_rules! words {
    ($at:expr; $($offset:literal),+) => {
        // SAFETY: within the linear bytes `linear` checked.
        [$(unsafe { word::<$offset>($at) }),+]
    };
}
use words;

/// Copies `N` 32-bit words from `offset` of the frame, where they do not
/// lie in its linear part: a helper call.
#[inline(always)]
fn copy<const N: usize>(ctx: &TcContext, offset: u32) -> Option<[u32; N]> {
    // Not zeroed (that would cost a memset call): the helper writes all of
    // it or fails, and then nothing reads it.
    let mut buf = MaybeUninit::<[u32; N]>::uninit();
    // SAFETY: the helper writes exactly `4 * N` bytes into `buf`.
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset,
            buf.as_mut_ptr().cast(),
            (4 * N) as u32,
        )
    };
    // SAFETY: initialised by the helper when it succeeded.
    (copied == 0).then(|| unsafe { buf.assume_init() })
}

/// The 32-bit word at `at + OFFSET`, whatever its alignment, in one load:
/// the verifier lets a program load packet memory unaligned where the CPU
/// does that fast (x86, arm64), but LLVM, which must assume it cannot,
/// would make four byte loads and six shifts of it (measured:
/// BENCHMARKS.md).
///
/// # Safety
/// `at + OFFSET..at + OFFSET + 4` lies within the packet's linear data,
/// checked against `data_end` before.
#[inline(always)]
unsafe fn word<const OFFSET: usize>(at: usize) -> u32 {
    let value: u64;
    // SAFETY: a load from memory the caller checked; not `pure`, so that
    // it is never moved above that check.
    unsafe {
        core::arch::asm!(
            "{0} = *(u32 *)({1} + {2})",
            lateout(reg) value,
            in(reg) at,
            const OFFSET,
            options(readonly, nostack, preserves_flags),
        );
    }
    value as u32
}
