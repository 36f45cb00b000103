use super::*;

fn value(packets: u64, bytes: u64) -> FlowValue {
    FlowValue {
        packets,
        bytes,
        ..FlowValue::default()
    }
}

fn seen(packets: u32, bytes: u64) -> Seen {
    Seen {
        packets,
        bytes,
        ..Seen::default()
    }
}

#[test]
fn difference_is_what_was_added() {
    let d = difference(&value(5, 500), &seen(2, 200));
    assert_eq!((d.packets, d.bytes), (3, 300));
}

#[test]
fn a_flow_that_restarted_counts_from_zero() {
    let d = difference(&value(2, 100), &seen(9, 900));
    assert_eq!((d.packets, d.bytes), (2, 100));
}

#[test]
fn a_flow_that_came_back_with_fewer_packets_and_more_bytes_counts_from_zero() {
    // Evicted after 100 small packets; back with 10 large ones.
    let d = difference(&value(10, 15_000), &seen(100, 6_400));
    assert_eq!((d.packets, d.bytes), (10, 15_000), "no jump of 4 G packets");
    // A long-lived flow past 2^32 packets: its 32 bits wrap, it goes on.
    let before = Seen {
        packets: u32::MAX - 5,
        bytes: 1 << 40,
        ..Seen::default()
    };
    let d = difference(&value((1 << 32) + 10, (1 << 40) + 16 * 64), &before);
    assert_eq!((d.packets, d.bytes), (16, 16 * 64));
}

#[test]
fn a_packet_read_half_counted_is_counted_whole_by_the_next_reading() {
    // The kernel had added the packet, not yet its bytes and connection.
    let before = Seen {
        connections: 1,
        ..seen(3, 300)
    };
    let torn = FlowValue {
        packets: 4,
        bytes: 300,
        connections: 1,
        ..FlowValue::default()
    };
    let d = difference(&torn, &before);
    assert_eq!(
        (d.packets, d.bytes, d.connections),
        (1, 0, 0),
        "not a flow made anew"
    );
    // The rest, at the next reading: no packet, but not nothing.
    let whole = FlowValue {
        bytes: 360,
        connections: 2,
        ..torn
    };
    // The baseline the torn reading left.
    let after = Seen {
        connections: 1,
        ..seen(4, 300)
    };
    let d = difference(&whole, &after);
    assert_eq!((d.packets, d.bytes, d.connections), (0, 60, 1));
    assert!(!d.is_zero(), "counted, not taken for a quiet flow");
}
