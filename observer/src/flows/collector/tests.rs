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
