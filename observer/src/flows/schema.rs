//! The flow schema: the labels of a traffic series, each declared once with
//! everything that depends on it. The collector fills [`FlowLabels`]; the
//! Prometheus families ([`super::metrics`]) and `/flows` serialize it;
//! `observer flows` reads the same type back and lays its table out from
//! [`LABELS`]; the README's label table is checked against it.
//!
//! Adding a label: one line in [`flow_labels!`] below, and the line in
//! `series.rs` that fills it.

use serde::{Deserialize, Serialize};

/// What a label is to the series bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Names the series' pod and kind of traffic: kept in `overflow` series,
    /// never dropped.
    Identity,
    /// A detail: `--drop-labels` may export it empty, and `overflow` series
    /// say `overflow` in it.
    Detail,
}

/// One label of the traffic families.
#[derive(Clone, Copy, Debug)]
pub struct Label {
    pub name: &'static str,
    pub role: Role,
    /// The `observer flows` column it is shown in, if any; labels sharing
    /// a column are joined with its separator.
    pub column: Option<Column>,
    /// Its line in the README's label table.
    pub doc: &'static str,
}

/// A column of `observer flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    pub header: &'static str,
    /// Between the values of the labels it shows.
    pub separator: &'static str,
    /// What stands for an empty value among others (`None`: it is left
    /// out), so that a value's place says what it is.
    pub placeholder: Option<&'static str>,
}

impl Column {
    /// The cell for these label values: empty if all are.
    pub fn cell(&self, values: &[&str]) -> String {
        if values.iter().all(|v| v.is_empty()) {
            return String::new();
        }
        let parts: Vec<&str> = values
            .iter()
            .filter_map(|v| match (v.is_empty(), self.placeholder) {
                (false, _) => Some(*v),
                (true, placeholder) => placeholder,
            })
            .collect();
        parts.join(self.separator)
    }
}

const POD: Column = Column {
    header: "POD",
    separator: "/",
    placeholder: None,
};
const CLASS: Column = Column {
    header: "CLASS",
    separator: "",
    placeholder: None,
};
const DIRECTION: Column = Column {
    header: "DIRECTION",
    separator: "",
    placeholder: None,
};
const PROTO: Column = Column {
    header: "PROTO",
    separator: "",
    placeholder: None,
};
const PORT: Column = Column {
    header: "PORT/PATH",
    separator: "",
    placeholder: None,
};
const PEER: Column = Column {
    header: "PEER",
    separator: "/",
    placeholder: None,
};
const CONTAINERS: Column = Column {
    header: "CONTAINERS (client -> server)",
    separator: " -> ",
    placeholder: Some("-"),
};
const ORIGINAL: Column = Column {
    header: "ORIGINALLY TO",
    separator: "/",
    placeholder: None,
};

/// A label's column, or none.
macro_rules! column {
    () => {
        None
    };
    ($column:ident) => {
        Some($column)
    };
}

/// Declares the labels, in their export order: the [`FlowLabels`] struct,
/// and [`LABELS`] with each one's role, column and documentation.
macro_rules! flow_labels {
    ($($field:ident: $role:ident, $($column:ident)?, $doc:literal;)*) => {
        /// A traffic series' label values.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub struct FlowLabels {
            $(#[doc = $doc] pub $field: String,)*
        }

        /// The labels, in [`FlowLabels::values`] order.
        pub const LABELS: &[Label] = &[$(Label {
            name: stringify!($field),
            role: Role::$role,
            column: column!($($column)?),
            doc: $doc,
        },)*];

        impl FlowLabels {
            /// The values, in [`LABELS`] order.
            pub fn values(&self) -> impl Iterator<Item = &str> {
                [$(self.$field.as_str(),)*].into_iter()
            }

            /// The value of the label at `index` of [`LABELS`].
            pub fn value_mut(&mut self, index: usize) -> &mut String {
                [$(&mut self.$field,)*]
                    .into_iter()
                    .nth(index)
                    .expect("an index into LABELS")
            }
        }
    };
}

flow_labels! {
    namespace: Identity, POD, "the observed pod's namespace (with `--netns`: empty)";
    pod: Identity, POD, "the observed pod (with `--netns`: the network namespace's name)";
    class: Identity, CLASS, "`localhost`, `pod`, `service`, `node`, `external`; `unknown` for packets counted while the flow map had no room (an `overflow` series, not classified); `unix` for unix-socket messages, `fifo` for named-pipe writes (no network: packets count messages or write calls)";
    direction: Identity, DIRECTION, "`egress` / `ingress` on `eth0`, from the pod's side; on `lo` and for `unix`, `request` (client to server) / `response`, or `unknown` for traffic without ports; `request` (writer to reader) for `fifo`";
    protocol: Detail, PROTO, "`tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, the IP protocol number for others, `non_ip` (ARP); for `unix`: `stream`, `dgram`, `seqpacket`; empty for `fifo`";
    port: Detail, PORT, "the server's port; empty for traffic without ports";
    path: Detail, PORT, "`unix`: the path the server's socket is bound to, as it bound it (an abstract name as `@name`; `(unnamed)` for a socket without one); `fifo`: the pipe's file name (its last path component); empty otherwise";
    peer_namespace: Detail, PEER, "the peer pod's or Service's namespace; empty for `localhost`, `node` and `external`";
    peer: Detail, PEER, "the peer pod, or the Service; the node's name for `node`; `external`; empty for `localhost`; `unknown` when the address is in a pod CIDR or the Service range but not known";
    client_container: Detail, CONTAINERS, "the pod's container at the client's end: the one whose socket connects or sends (on `lo` and `eth0` alike); its cgroup's directory name where no inventory or API names it; `kernel` for a packet without a socket, `unknown` where the receiving socket is not known; empty when the client is not in the pod; for `fifo`, the writer";
    server_container: Detail, CONTAINERS, "the pod's container at the server's end: the one whose socket listens (for UDP: is bound to the port; for `unix`: is bound to the path); for `fifo`, the reader (several joined with `+`, `unknown` while none has read); as `client_container` otherwise";
    original_class: Detail, , "behind a redirect to a local proxy (a sidecar mesh's): the class of where the client's connection was going (`service`, `pod`, `node`, `external`); empty otherwise";
    original_namespace: Detail, ORIGINAL, "behind a redirect: the namespace of the Service or pod the client was calling";
    original_peer: Detail, ORIGINAL, "behind a redirect: the Service, pod or node the client was calling (`external` outside the cluster)";
    original_port: Detail, , "behind a redirect: the port the client was calling";
}

/// What `overflow` series say in their details.
pub const OVERFLOW: &str = "overflow";

/// The labels of an `overflow` series: every detail says so.
pub fn overflow(namespace: &str, pod: &str, class: &str, direction: &str) -> FlowLabels {
    let mut labels = FlowLabels {
        namespace: namespace.into(),
        pod: pod.into(),
        class: class.into(),
        direction: direction.into(),
        ..FlowLabels::default()
    };
    for (i, label) in LABELS.iter().enumerate() {
        if label.role == Role::Detail {
            *labels.value_mut(i) = OVERFLOW.into();
        }
    }
    labels
}

/// The index of a label in [`LABELS`].
pub fn index(name: &str) -> Option<usize> {
    LABELS.iter().position(|l| l.name == name)
}

/// The labels `--drop-labels` accepts.
pub fn droppable() -> impl Iterator<Item = &'static str> {
    LABELS
        .iter()
        .filter(|l| l.role == Role::Detail)
        .map(|l| l.name)
}

/// The columns of `observer flows`, in order, each with the indices of the
/// labels it shows.
pub fn columns() -> Vec<(Column, Vec<usize>)> {
    let mut columns: Vec<(Column, Vec<usize>)> = Vec::new();
    for (i, label) in LABELS.iter().enumerate() {
        let Some(column) = label.column else {
            continue;
        };
        match columns.iter_mut().find(|(c, _)| *c == column) {
            Some((_, labels)) => labels.push(i),
            None => columns.push((column, vec![i])),
        }
    }
    columns
}

/// The README's table of traffic labels.
pub fn markdown_table() -> String {
    let mut out = String::from("| label | value |\n|---|---|\n");
    for label in LABELS {
        out.push_str(&format!("| `{}` | {} |\n", label.name, label.doc));
    }
    out
}

/// A series of the last collection, as `/flows` serves it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowRow {
    pub labels: FlowLabels,
    pub packets: u64,
    pub bytes: u64,
    /// Seconds the counts were gathered over.
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_has_a_column_and_values_follow_the_table() {
        let labels = FlowLabels {
            namespace: "a".into(),
            original_port: "z".into(),
            ..FlowLabels::default()
        };
        let values: Vec<&str> = labels.values().collect();
        assert_eq!(values.len(), LABELS.len());
        assert_eq!((values[0], values[LABELS.len() - 1]), ("a", "z"));
        let shown: usize = columns().iter().map(|(_, l)| l.len()).sum();
        let columned = LABELS.iter().filter(|l| l.column.is_some()).count();
        assert_eq!(shown, columned);
        let mut copy = labels.clone();
        *copy.value_mut(index("pod").unwrap()) = "p".into();
        assert_eq!(copy.pod, "p");
        assert_eq!(copy.namespace, "a", "only that label changed");
    }

    #[test]
    fn the_readme_documents_every_label() {
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(&markdown_table()),
            "README.md's traffic label table is out of date; it should read:\n{}",
            markdown_table()
        );
    }
}
