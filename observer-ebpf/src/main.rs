//! The programs loaded and verified once: the classifier of a flow's first
//! packet and the inbound decision (tail-called by each pod's own
//! per-packet programs, pod.rs, with the namespace's cookie: handoff.rs),
//! the flow cache's flush, and the socket hooks on the pods' cgroups.
//!
//! They observe: every entry point returns `TC_ACT_UNSPEC` (TCX_NEXT), which
//! hands the packet to the next program or to the stack unchanged, except
//! for the packets of an inbound connection that a policy denies, which are
//! dropped at `eth0` ingress (`TC_ACT_SHOT`). Counting happens in kernel
//! maps; nothing is sent to user space per packet.
//!
//! Diagnostics (aya-log, debug level: a flow classified, a policy decision,
//! a failed tail call) are compiled in, and switched off at load time unless
//! the daemon's log level asks for them: the verifier then removes them, so
//! they cost nothing.
//!
//! (Longer than most files: the per-packet path and the programs it
//! tail-calls share the maps declared here, and read best together.)
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; `atomic_xadd` lowers to BPF's
// atomic add. The build runs with RUSTC_BOOTSTRAP=1 (see observer/build.rs).
#![feature(core_intrinsics)]
// Unaligned 32-bit packet loads, which LLVM would split (parse.rs).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod cache;
mod classify;
mod count;
mod handoff;
mod ipc;
mod parse;
mod policy;
mod sockets;

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::bpf_loop,
    macros::{classifier, map, raw_tracepoint},
    maps::{HashMap, LpmTrie, PerCpuArray},
    programs::{RawTracePointContext, TcContext},
};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};
use count::{FLOWS, GENERATION, action, add, overflow};
use handoff::{CLASSIFIER, bump_stats};
use observer_common::{
    CIDRS_CAPACITY, CidrValue, FLOW_CACHE_SLOTS, FlowKey, FlowValue, SERVICES_CAPACITY, ServiceKey,
    direction::{EGRESS, INGRESS},
    family, flow_flags, interface, ports, protocol, server, tail, verdict,
};

/// Service ClusterIP, port and protocol to the Service's id.
#[map]
static SERVICES: HashMap<ServiceKey, u32> = HashMap::with_max_entries(SERVICES_CAPACITY, 0);

/// Pod CIDRs and the Service range, pod and node addresses.
#[map]
static CIDRS: LpmTrie<[u8; 16], CidrValue> = LpmTrie::with_max_entries(CIDRS_CAPACITY, 0);

/// A flow the map had no room for, handed from `classify_flow` to
/// `decide_ingress` (see [`decide::UNSTORED`]).
#[map]
static UNSTORED: PerCpuArray<FlowValue> = PerCpuArray::with_max_entries(1, 0);

/// Counts a packet of a flow that is new, or was classified under an older
/// generation, and classifies it. Tail-called by the instances: loaded (and
/// verified) once, while each namespace's instance stays small.
#[classifier]
pub fn classify_flow(mut ctx: TcContext) -> i32 {
    let Some((mut key, syn, seq, _)) = flow_of(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let (verdict, decide) = count(&ctx, &mut key, u64::from(ctx.len()), u32::from(syn), seq);
    if let Some(decide) = decide {
        handoff::set_flag(&mut ctx, decide);
        // SAFETY: on success this does not return.
        unsafe { CLASSIFIER.tail_call(&ctx, tail::DECIDE) };
        bump_stats(|s| s.classify_failed += 1);
    } else if level_enabled(Level::Debug) {
        // SAFETY: as above.
        unsafe { CLASSIFIER.tail_call(&ctx, tail::LOG) };
    }
    action(verdict)
}

/// Decides an inbound connection of a pod with a policy (its flow was just
/// classified, and is in the map): writes the flow's verdict, counts the
/// decision (if the connection's first), and drops the packet if it is
/// denied. A program
/// of its own, so that the verifier walks the rules once, not once for each
/// way a flow can be classified.
#[classifier]
pub fn decide_ingress(ctx: TcContext) -> i32 {
    let Some((key, _, _, flag)) = flow_of(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let counted = flag & decide::COUNTED != 0;
    // A flow the map had no room for: its value is in this CPU's scratch
    // slot (a tail call stays on the CPU), and its verdict is not kept:
    // each of its packets is decided anew.
    let value = if flag & decide::UNSTORED != 0 {
        UNSTORED.get_ptr_mut(0)
    } else {
        FLOWS.get_ptr_mut(&key)
    };
    let Some(value) = value else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a live map value; racing writers write the same verdict.
    let value = unsafe { &mut *value };
    let verdict = policy::ingress(&ctx, &key, value, counted);
    value.verdict = if verdict == verdict::DENY { verdict } else { 0 };
    if level_enabled(Level::Debug) {
        // SAFETY: on success this does not return.
        unsafe { CLASSIFIER.tail_call(&ctx, tail::LOG) };
    }
    action(value.verdict)
}

/// What `classify_flow` tells `decide_ingress`, in the control buffer.
mod decide {
    /// The decision is the connection's first: counted in VERDICTS.
    pub const COUNTED: u32 = 1;
    /// The flow map had no room for the flow: its value is in UNSTORED.
    pub const UNSTORED: u32 = 2;
}

/// The flow of a tail-called program's packet: the key (with the namespace
/// and direction its caller put in the control buffer), whether it opens a
/// TCP connection and its sequence number, and the caller's flags.
#[inline(always)]
fn flow_of(ctx: &TcContext) -> Option<(FlowKey, bool, u32, u32)> {
    let handed = handoff::handed(ctx);
    let flow = parse::flow(ctx, handed.cookie, handed.direction);
    Some((flow.key(), flow.syn, flow.seq, handed.flag))
}

/// Counts a packet of a flow, classifying the flow if it is new or its
/// classification is stale. Returns the flow's verdict, and whether an
/// ingress decision is to be made (`Some` of [`decide`] flags: counted if
/// it is the connection's first: a new flow, a SYN of a flow not decided as
/// inbound yet or of a new connection on the same addresses and ports
/// (another sequence number than the last decided SYN's), or the first
/// datagram a socket receives).
#[inline(always)]
fn count(ctx: &TcContext, key: &mut FlowKey, bytes: u64, syn: u32, seq: u32) -> (u8, Option<u32>) {
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    if let Some(value) = FLOWS.get_ptr_mut(&*key) {
        add(value, bytes, syn);
        // SAFETY: a live map value. Classification fields are written without
        // atomics: CPUs racing here write the same result.
        let value = unsafe { &mut *value };
        // A SYN to a pod with a policy is a new inbound connection: decided
        // now, whatever the flow decided before (it may have reached no
        // listener, or come before the policy). Counted unless the flow was
        // already decided as inbound (a retransmitted SYN).
        let opens = syn != 0 && key.direction == INGRESS && policy::has_policy(key.netns_cookie);
        // A SYN out of another container than the flow's: a new connection
        // on a port of the pod's that another container used before.
        let moved = syn != 0 && key.direction == EGRESS && classify::sent_by_another(ctx, value);
        if value.generation != generation || opens || moved {
            let retransmitted = value.server == server::DESTINATION && value.syn_seq == seq;
            let counted =
                (opens && !retransmitted) || value.flags & flow_flags::AWAITS_LISTENER != 0;
            if opens {
                value.syn_seq = seq;
            }
            value.generation = generation;
            value.flags &= !flow_flags::AWAITS_LISTENER;
            // A connection's SYN renews what the sockets told: they are
            // the connection's own.
            let received = classify::classify(ctx, key, value, syn != 0);
            value.verdict = 0;
            match inbound(ctx, key, value, received) {
                Inbound::Decide => return (0, Some(u32::from(counted))),
                Inbound::NobodyListens => awaits_listener(value, generation),
                Inbound::No => {}
            }
        }
        return (value.verdict, None);
    }
    let mut first = FlowValue {
        packets: 1,
        bytes,
        connections: syn,
        syn_seq: seq,
        generation,
        ..FlowValue::default()
    };
    let received = classify::classify(ctx, key, &mut first, syn != 0);
    pair_with_reverse(key, &mut first);
    let decide = inbound(ctx, key, &first, received);
    if decide == Inbound::NobodyListens {
        awaits_listener(&mut first, generation);
    }
    if FLOWS.insert(&*key, &first, u64::from(BPF_NOEXIST)).is_ok() {
        bump_stats(|s| s.flows_created += 1);
        if decide == Inbound::Decide {
            return (0, Some(decide::COUNTED));
        }
    } else if let Some(value) = FLOWS.get_ptr_mut(&*key) {
        // Another CPU inserted it first (and decides it).
        add(value, bytes, syn);
        // SAFETY: a live map value.
        return (unsafe { (*value).verdict }, None);
    } else {
        // No room: counted all the same, as the pod's.
        overflow(key, 1, bytes, syn);
        // And decided all the same, at every packet (no verdict can be
        // kept): a full map must not open a way in. A TCP connection's
        // decision is counted at its SYN; a datagram's at each one.
        if decide == Inbound::Decide
            && let Some(scratch) = UNSTORED.get_ptr_mut(0)
        {
            // SAFETY: this CPU's slot, read by the tail call on this CPU.
            unsafe { *scratch = first };
            let counted = syn != 0 || key.protocol == protocol::UDP;
            return (0, Some(decide::UNSTORED | u32::from(counted)));
        }
    }
    (0, None)
}

/// Whether a flow is an inbound connection to be decided by `decide_ingress`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// Not inbound, or the pod has no policy.
    No,
    /// An inbound IPv4 connection to a pod with a policy: it enters at
    /// `eth0` and the pod is the server (a TCP listener, or a UDP socket
    /// bound to the port).
    Decide,
    /// UDP to a pod with a policy that no socket receives (yet): decided
    /// again at the flow's next packet, so that a socket bound later does
    /// not inherit an undecided flow.
    NobodyListens,
}

/// `received`: a socket of the pod receives the flow (the classifier's
/// lookup of the whole tuple, which finds connected sockets too).
#[inline(always)]
fn inbound(ctx: &TcContext, key: &FlowKey, value: &FlowValue, received: bool) -> Inbound {
    if key.interface != interface::POD || key.direction != INGRESS || key.family != family::IPV4 {
        return Inbound::No;
    }
    // SAFETY: a plain lookup. First: most pods have no policy, and telling
    // an inbound flow may take a socket lookup.
    if !policy::has_policy(key.netns_cookie) {
        return Inbound::No;
    }
    if value.server == server::DESTINATION {
        return Inbound::Decide;
    }
    // TCP without a listener: its next SYN decides. UDP to a socket the
    // hooks did not see bound (one from before the observer): a socket
    // bound to the port outside Linux's ephemeral range (where the replies
    // to the pod's own queries land).
    if key.protocol != protocol::UDP || value.server != server::UNKNOWN {
        return Inbound::No;
    }
    if !sockets::listening(ctx, key.family, key.protocol, key.dst_addr, key.dst_port) {
        // A connected socket receives it (a client's), or nobody does.
        return if received {
            Inbound::No
        } else {
            Inbound::NobodyListens
        };
    }
    if key.dst_port < ports::EPHEMERAL_FIRST {
        Inbound::Decide
    } else {
        Inbound::No
    }
}

/// Marks a flow to be classified again at its next packet (a generation
/// that is never the current one), and its decision to be counted then.
#[inline(always)]
fn awaits_listener(value: &mut FlowValue, generation: u32) {
    value.generation = generation.wrapping_sub(1);
    value.flags |= flow_flags::AWAITS_LISTENER;
}

/// With diagnostics on (debug level), the classification of each flow, in
/// a program of its own: in `classify_flow` the verifier would walk the
/// logging code once for each way a flow can be classified.
#[classifier]
pub fn log_flow(ctx: TcContext) -> i32 {
    let Some((key, _, _, _)) = flow_of(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let Some(value) = FLOWS.get_ptr(&key) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a live map value, copied.
    let value = unsafe { *value };
    debug!(
        &ctx,
        "flow classified: class {} peer {} server {} containers {} -> {} original class {}",
        value.class,
        value.peer_id,
        value.server,
        value.src_cgroup,
        value.dst_cgroup,
        value.orig_class
    );
    action(value.verdict)
}

/// Moves this CPU's cached counts into the flow map. Run by the daemon on
/// each CPU (`BPF_PROG_TEST_RUN` on that CPU), never attached.
#[raw_tracepoint]
pub fn flush_flow_cache(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: the callback is a function of this program; it takes no
    // context.
    unsafe {
        bpf_loop(
            FLOW_CACHE_SLOTS,
            cache::flush_slot as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    0
}

/// Each direction of a conversation knows its sending socket's container
/// (the skb's): where the receiving socket's storage did not name its
/// container (a socket made before the observer attached), each flow
/// learns it from the other direction's flow. On `lo` both directions pass
/// egress; on `eth0` the reverse flow is the other hook's. The key is
/// reversed in place (and back) to spare the verifier's 512-byte stack.
#[inline(always)]
fn pair_with_reverse(key: &mut FlowKey, value: &mut FlowValue) {
    reverse(key);
    if let Some(other) = FLOWS.get_ptr_mut(&*key) {
        // SAFETY: a live map value; racing writers write the same numbers.
        unsafe {
            if value.dst_cgroup == 0 {
                value.dst_cgroup = (*other).src_cgroup;
            }
            if (*other).dst_cgroup == 0 {
                (*other).dst_cgroup = value.src_cgroup;
            }
            // Answers to a connection whose socket knew where it was going
            // (before a translation in the pod, which the answers still
            // carry at tc): the same peer.
            let decided = flow_flags::DECIDED_AT_SOCKET;
            if value.flags & decided == 0 && (*other).flags & decided != 0 {
                value.class = (*other).class;
                value.peer_id = (*other).peer_id;
                value.server_port = (*other).server_port;
                value.server = match (*other).server {
                    server::SOURCE => server::DESTINATION,
                    server::DESTINATION => server::SOURCE,
                    _ => server::UNKNOWN,
                };
                value.flags |= decided;
            }
        }
    }
    reverse(key);
}

#[inline(always)]
fn reverse(key: &mut FlowKey) {
    core::mem::swap(&mut key.src_addr, &mut key.dst_addr);
    core::mem::swap(&mut key.src_port, &mut key.dst_port);
    if key.interface == interface::POD {
        key.direction ^= EGRESS ^ INGRESS;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
