//! Unix-socket and named-pipe traffic into the same traffic series as the
//! packet flows: `class="unix"` per (client container, server container,
//! path, socket type, direction), `class="fifo"` per (writer, readers,
//! pipe). The kernel keeps cumulative counts per unix connection and per
//! container and pipe; each collection adds the difference since the last.
//!
//! A connection's server is known once the server's process accepts it,
//! reads or writes: until then (at most [`HOLD`]) its counts wait, then
//! they are counted with `server_container="unknown"`. A connection quiet
//! for the idle time leaves the map, counted to its last message.
//!
//! A pipe's writers and readers are counted apart in the kernel (a write
//! does not know who will read it): each writer's series names the
//! containers that read the pipe, and counts what the writer wrote.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use aya::maps::IterableMap;
use observer_common::{
    direction,
    ipc::{
        FIFO_CLASS, FifoId, FifoKey, IpcCounts, RetiredKey, Sent, UNIX_CLASS, UNNAMED_PATH,
        UnixConn, UnixConnKey, UnixPath, UnixPathKey, unix_kind,
    },
};

use super::{Collector, Naming, naming};
use crate::{
    flows::{
        cgroups::CgroupNames,
        metrics::Counts,
        schema::FlowLabels,
        series::{UNKNOWN, container_label},
    },
    kernel::{self, ipc::IpcMaps},
    names::{Identities, ObjectRef},
};

/// How long a connection's counts wait for its server's container.
const HOLD: Duration = Duration::from_secs(10);

/// The IPC maps and what the collector last saw in them.
pub struct Ipc {
    maps: IpcMaps,
    conns: HashMap<UnixConnKey, Seen>,
    fifo: HashMap<FifoKey, IpcCounts>,
    /// Paths and pipe names read from the kernel, kept while a series
    /// may need them (the kernel's entry may go with a pod).
    paths: HashMap<UnixPathKey, String>,
    pipes: HashMap<FifoId, String>,
    /// Connections taken out of the map while quiet, by their client
    /// socket's inode: one that talks again comes back as a new entry,
    /// and is not a new connection.
    reclaimed: HashMap<UnixConnKey, u64>,
    /// What was counted of connections whose ends a new connection took
    /// since the last collection, until their retired record comes.
    settling: HashMap<RetiredKey, UnixConn>,
}

/// Reclaimed connections remembered at most (then forgotten all at once:
/// one that talks again after that counts as opened twice).
const RECLAIMED_MAX: usize = 65_536;

/// A connection at the last collection.
#[derive(Clone, Copy)]
struct Seen {
    counted: UnixConn,
    first_seen: Instant,
    /// Ticks in a row without a message.
    quiet: u8,
}

impl Ipc {
    pub fn new(maps: IpcMaps) -> Self {
        Self {
            maps,
            conns: HashMap::new(),
            fifo: HashMap::new(),
            paths: HashMap::new(),
            pipes: HashMap::new(),
            reclaimed: HashMap::new(),
            settling: HashMap::new(),
        }
    }
}

/// A series of the last collection: the pod's cookie, its labels, counts.
pub type IpcRow = (u64, FlowLabels, Counts);

impl Collector {
    /// Follows the IPC of a pod that was attached.
    pub(super) fn follow_ipc(&mut self, cookie: u64) {
        if let Some(ipc) = &mut self.ipc
            && let Err(err) = ipc.maps.follow(cookie)
        {
            tracing::warn!(%err, cookie, "cannot follow the pod's unix sockets and pipes");
            self.metrics
                .errors
                .with_label_values(&["kernel_maps"])
                .inc();
        }
    }

    /// Tells the IPC programs where the pods' cgroups are.
    pub fn pods_cgroup(&mut self, cgroup: u64, level: u32) {
        if let Some(ipc) = &mut self.ipc
            && let Err(err) = ipc.maps.set_pods_cgroup(cgroup, level)
        {
            tracing::warn!(%err, "cannot tell the IPC programs the pods' cgroup: they read every socket's namespace");
            self.metrics
                .errors
                .with_label_values(&["kernel_maps"])
                .inc();
        }
    }

    /// Forgets a pod that went.
    pub(super) fn forget_ipc(&mut self, cookie: u64) {
        if let Some(ipc) = &mut self.ipc {
            if let Err(err) = ipc.maps.forget(cookie) {
                tracing::warn!(%err, cookie, "cannot read an IPC map to take a pod's entries out");
                self.metrics.error("map_read");
            }
            ipc.conns.retain(|_, seen| seen.counted.netns != cookie);
            ipc.settling.retain(|_, counted| counted.netns != cookie);
            ipc.fifo.retain(|k, _| k.netns != cookie);
        }
    }

    /// The IPC series since the last collection. `tick`: a
    /// `--collect-interval` collection, which measures how long a
    /// connection has been quiet.
    pub(super) fn collect_ipc(&mut self, started: Instant, tick: bool) -> Vec<IpcRow> {
        let Some(ipc) = &mut self.ipc else {
            return Vec::new();
        };
        // Retired connections first: a connection retired after this read
        // shows in the walk below as its successor, and is settled at the
        // next collection (`settling`).
        let retired =
            kernel::bpf::entries::<RetiredKey, UnixConn>(ipc.maps.unix_retired.map().fd().as_fd());
        let conns =
            kernel::bpf::entries::<UnixConnKey, UnixConn>(ipc.maps.unix_conns.map().fd().as_fd());
        let fifo =
            kernel::bpf::entries::<FifoKey, IpcCounts>(ipc.maps.fifo_flows.map().fd().as_fd());
        let (retired, mut conns, fifo) = match (retired, conns, fifo) {
            (Ok(retired), Ok(conns), Ok(fifo)) => (own_servers(retired), own_servers(conns), fifo),
            (Err(err), _, _) | (_, Err(err), _) | (_, _, Err(err)) => {
                // Counted at the next collection: nothing changed here.
                tracing::warn!(%err, "cannot read the IPC maps");
                self.metrics.error("map_read");
                return Vec::new();
            }
        };
        // Datagrams sent with an address: their server is whoever receives
        // on the path, once it has (the kernel sets it at later sends).
        if conns.iter().any(|(_, c)| c.addressed != 0 && c.server == 0) {
            let receivers: Vec<(UnixPathKey, u64)> =
                match kernel::bpf::entries(ipc.maps.unix_receivers.map().fd().as_fd()) {
                    Ok(receivers) => receivers,
                    Err(err) => {
                        tracing::warn!(%err, "cannot read the IPC maps");
                        self.metrics.error("map_read");
                        return Vec::new();
                    }
                };
            let receivers: HashMap<(u64, u64), u64> = receivers
                .into_iter()
                .map(|(k, cgroup)| ((k.netns, k.hash), cgroup))
                .collect();
            for (_, conn) in conns.iter_mut().filter(|(_, c)| c.addressed != 0) {
                if conn.server == 0 {
                    conn.server = receivers
                        .get(&(conn.netns, conn.path))
                        .copied()
                        .unwrap_or(0);
                }
            }
        }

        // Containers are named as the packet flows' are: the cgroups no
        // source names are looked for first; a container that just
        // started waits a while for its name.
        let ids: HashSet<u64> = conns
            .iter()
            .map(|(_, c)| c)
            .chain(retired.iter().map(|(_, c)| c))
            .flat_map(|c| [c.client, c.server])
            .chain(fifo.iter().map(|(k, _)| k.cgroup))
            .filter(|&id| id != 0 && !self.identities.containers.contains_key(&id))
            .collect();
        let unnamed: HashSet<u64, super::Fast> = ids
            .into_iter()
            .filter(|&id| !self.cgroups.looked_for(id))
            .collect();
        self.cgroups.learn(&unnamed);
        let (identities, cgroups, unnamed) = (&self.identities, &self.cgroups, &mut self.unnamed);
        let mut held =
            |id: u64| id != 0 && naming(identities, cgroups, unnamed, id, started) == Naming::Held;

        let mut series: HashMap<(u64, FlowLabels), Counts> = HashMap::new();
        let mut quiet = Vec::new();
        // A retired connection: what it counted since the baseline of its
        // own (its entry's, or the one put aside when the walk saw its
        // successor first), under its own path and containers.
        let retired_fd = ipc.maps.unix_retired.map().fd().as_fd();
        for (key, old) in retired {
            let Some(netns) = self.attached.get(&old.netns) else {
                let _ = kernel::bpf::take::<RetiredKey, UnixConn>(retired_fd, &key);
                continue;
            };
            if held(old.client) || held(old.server) {
                continue;
            }
            let Ok(Some(last)) = kernel::bpf::take::<RetiredKey, UnixConn>(retired_fd, &key) else {
                continue;
            };
            let last = own_server(last);
            let counted = retired_baseline(
                &mut ipc.settling,
                &mut ipc.conns,
                &mut ipc.reclaimed,
                &key,
                &last,
                started,
            );
            let (request, response) = conn_difference(&last, &counted);
            let path = unix_path(&mut ipc.paths, &ipc.maps.unix_paths, last.netns, last.path);
            let labels =
                |way: &str| unix_labels(&netns.pod, &last, &path, way, identities, cgroups);
            add_ways(&mut series, last.netns, labels, request, response);
        }
        if ipc.settling.len() > RECLAIMED_MAX {
            // Records the kernel had no room for (counted as lost there).
            ipc.settling.clear();
        }

        let fd = ipc.maps.unix_conns.map().fd().as_fd();
        for (key, now) in conns {
            let Some(netns) = self.attached.get(&now.netns) else {
                // Made as its pod went (the pod is followed no more): no
                // pod's, and nothing will count it.
                let _ = kernel::bpf::take::<UnixConnKey, UnixConn>(fd, &key);
                continue;
            };
            let before = ipc.conns.get(&key).copied();
            // A new connection on the entry (see below) is first seen now:
            // its server's name is waited for as any new connection's.
            let renewed = before.is_some_and(|b| successor(key, &b.counted, &now).is_some());
            let first_seen = match before {
                Some(b) if !renewed => b.first_seen,
                _ => started,
            };
            let counted = entry_baseline(
                &mut ipc.settling,
                &mut ipc.reclaimed,
                key,
                before.map(|b| b.counted),
                &now,
            );
            let waits = waits_for_server(renewed, &now, first_seen, started);
            if waits || held(now.client) || held(now.server) {
                let quiet = before.map_or(0, |b| b.quiet);
                ipc.conns.insert(
                    key,
                    Seen {
                        counted,
                        first_seen,
                        quiet,
                    },
                );
                continue;
            }
            let (request, response) = conn_difference(&now, &counted);
            let active = request.packets + response.packets + request.connections > 0;
            let idle = match (active, before) {
                (true, _) | (false, None) => 0,
                (false, Some(b)) => b.quiet.saturating_add(u8::from(tick)),
            };
            ipc.conns.insert(
                key,
                Seen {
                    counted: now,
                    first_seen,
                    quiet: idle,
                },
            );
            if idle >= self.idle_ticks {
                quiet.push(key);
            }
            let path = unix_path(&mut ipc.paths, &ipc.maps.unix_paths, now.netns, now.path);
            let labels = |way: &str| unix_labels(&netns.pod, &now, &path, way, identities, cgroups);
            add_ways(&mut series, now.netns, labels, request, response);
        }
        // Quiet connections go, with what came since the walk (forgotten
        // here only once the kernel's entry is taken).
        let taken: Vec<(UnixConnKey, Seen, UnixConn)> = quiet
            .into_iter()
            .filter_map(|key| {
                let last = own_server(kernel::bpf::take::<UnixConnKey, UnixConn>(fd, &key).ok()??);
                let seen = ipc.conns.remove(&key)?;
                Some((key, seen, last))
            })
            .collect();
        if ipc.reclaimed.len() + taken.len() > RECLAIMED_MAX {
            ipc.reclaimed.clear();
        }
        for (key, seen, last) in taken {
            // A new connection that took the entry between the walk and the
            // take is counted at once, under what the entry says (its server
            // may not be known yet). Not put back to wait: a take that copied
            // the entry while a program renewed it would keep the old
            // connection's counts and containers for the new one's life.
            let (request, response) = taken_difference(
                &mut ipc.settling,
                &mut ipc.reclaimed,
                key,
                seen.counted,
                &last,
            );
            if request.packets + response.packets + request.connections == 0 {
                continue;
            }
            let Some(netns) = self.attached.get(&last.netns) else {
                continue;
            };
            let path = unix_path(&mut ipc.paths, &ipc.maps.unix_paths, last.netns, last.path);
            let labels =
                |way: &str| unix_labels(&netns.pod, &last, &path, way, identities, cgroups);
            add_ways(&mut series, last.netns, labels, request, response);
        }

        let readers = fifo_readers(&fifo);
        for (key, now) in fifo.iter().filter(|(k, _)| k.writes == 1) {
            let Some(netns) = self.attached.get(&key.netns) else {
                continue;
            };
            let reading = readers.get(&(key.netns, key.pipe));
            let waits = reading.is_some_and(|r| r.iter().any(|&id| held(id)));
            if held(key.cgroup) || waits {
                continue;
            }
            let delta = fifo_difference(now, ipc.fifo.insert(*key, *now).as_ref());
            if delta.is_zero() {
                continue;
            }
            if !ipc.pipes.contains_key(&key.pipe) {
                let name = ipc
                    .maps
                    .fifo_names
                    .get(&key.pipe, 0)
                    .map_or_else(|_| UNKNOWN.to_owned(), |n| path_label(n.name()));
                ipc.pipes.insert(key.pipe, name);
            }
            let pod = &netns.pod;
            let reader = match reading {
                None => UNKNOWN.to_owned(),
                Some(ids) => ids
                    .iter()
                    .map(|&id| container_label(id, pod, identities, cgroups))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join("+"),
            };
            let labels = FlowLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                class: FIFO_CLASS.to_owned(),
                direction: direction::REQUEST.to_owned(),
                path: ipc.pipes.get(&key.pipe).cloned().unwrap_or_default(),
                client_container: container_label(key.cgroup, pod, identities, cgroups),
                server_container: reader,
                ..FlowLabels::default()
            };
            series.entry((key.netns, labels)).or_default().add(delta);
        }
        // Paths and names no key uses any more go.
        let used: HashSet<UnixPathKey> = ipc
            .conns
            .values()
            .map(|s| UnixPathKey {
                netns: s.counted.netns,
                hash: s.counted.path,
            })
            .collect();
        ipc.paths.retain(|key, _| used.contains(key));
        let pipes: HashSet<FifoId> = ipc.fifo.keys().map(|k| k.pipe).collect();
        ipc.pipes.retain(|id, _| pipes.contains(id));
        series
            .into_iter()
            .map(|((cookie, labels), counts)| (cookie, labels, counts))
            .collect()
    }
}

/// The labels of a unix connection's series one way.
fn unix_labels(
    pod: &ObjectRef,
    conn: &UnixConn,
    path: &str,
    way: &str,
    identities: &Identities,
    cgroups: &CgroupNames,
) -> FlowLabels {
    FlowLabels {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        class: UNIX_CLASS.to_owned(),
        direction: way.to_owned(),
        protocol: unix_kind::name(conn.kind).to_owned(),
        path: path.to_owned(),
        client_container: container_label(conn.client, pod, identities, cgroups),
        server_container: container_label(conn.server, pod, identities, cgroups),
        ..FlowLabels::default()
    }
}

/// Adds what a connection sent each way to its series.
fn add_ways(
    series: &mut HashMap<(u64, FlowLabels), Counts>,
    netns: u64,
    labels: impl Fn(&str) -> FlowLabels,
    request: Counts,
    response: Counts,
) {
    for (way, delta) in [
        (direction::REQUEST, request),
        (direction::RESPONSE, response),
    ] {
        if delta.packets + delta.connections > 0 {
            series.entry((netns, labels(way))).or_default().add(delta);
        }
    }
}

/// The `path` label of a pod's path hash (read from the kernel once).
fn unix_path(
    paths: &mut HashMap<UnixPathKey, String>,
    kernel: &aya::maps::HashMap<aya::maps::MapData, UnixPathKey, UnixPath>,
    netns: u64,
    hash: u64,
) -> String {
    if hash == 0 {
        return UNNAMED_PATH.to_owned();
    }
    let key = UnixPathKey { netns, hash };
    paths
        .entry(key)
        .or_insert_with(|| {
            kernel
                .get(&key, 0)
                .map_or_else(|_| UNKNOWN.to_owned(), |p| path_label(p.name()))
        })
        .clone()
}

/// The baseline a retired connection's record (`key`) is counted
/// against: the one put aside when the walk or a take saw its successor
/// first; else its entry's, while that is still its own (the entry then
/// holds its successor, from zero, first seen `now`: its server's name
/// is waited for as any new connection's); else none: all of the record
/// (`last`) is new, but for its opening if the daemon took its entry out
/// as quiet before (`reclaimed`): counted then.
fn retired_baseline(
    settling: &mut HashMap<RetiredKey, UnixConn>,
    conns: &mut HashMap<UnixConnKey, Seen>,
    reclaimed: &mut HashMap<UnixConnKey, u64>,
    key: &RetiredKey,
    last: &UnixConn,
    now: Instant,
) -> UnixConn {
    let fresh = UnixConn {
        netns: last.netns,
        ..UnixConn::default()
    };
    match settling.remove(key) {
        Some(counted) => counted,
        None => match conns.get_mut(&key.conn) {
            Some(seen) if seen.counted.client_inode == key.client_inode => {
                seen.first_seen = now;
                std::mem::replace(&mut seen.counted, fresh)
            }
            Some(_) => fresh,
            None if reclaimed.get(&key.conn) == Some(&key.client_inode) => {
                reclaimed.remove(&key.conn);
                UnixConn {
                    connections: 1,
                    ..fresh
                }
            }
            None => fresh,
        },
    }
}

/// The baseline of the connection `now` that the entry on `key` holds,
/// given what was counted of the entry (`counted`, none if it is new to
/// the daemon): nothing if it is new, but a connection that went quiet
/// and talks again was counted as opened already. If a new connection took
/// the entry since (the kernel gave it the same two sockets), the entry is
/// the new one's from zero, and the one before is put aside, to be settled
/// with its retired record against what was counted of it.
fn entry_baseline(
    settling: &mut HashMap<RetiredKey, UnixConn>,
    reclaimed: &mut HashMap<UnixConnKey, u64>,
    key: UnixConnKey,
    counted: Option<UnixConn>,
    now: &UnixConn,
) -> UnixConn {
    match counted {
        None => {
            let again = reclaimed.remove(&key) == Some(now.client_inode);
            UnixConn {
                connections: u64::from(again && now.client_inode != 0),
                ..from_zero(now)
            }
        }
        Some(counted) => match successor(key, &counted, now) {
            Some(retired) => {
                settling.insert(retired, counted);
                from_zero(now)
            }
            None => counted,
        },
    }
}

/// What the entry of a quiet connection counted since it was counted to
/// `counted`, `last` being what its take returned. A new connection may
/// have taken the entry between the walk and the take: the one counted is
/// retired then, and the new one counts from zero.
fn taken_difference(
    settling: &mut HashMap<RetiredKey, UnixConn>,
    reclaimed: &mut HashMap<UnixConnKey, u64>,
    key: UnixConnKey,
    counted: UnixConn,
    last: &UnixConn,
) -> (Counts, Counts) {
    reclaimed.insert(key, last.client_inode);
    let counted = entry_baseline(settling, reclaimed, key, Some(counted), last);
    conn_difference(last, &counted)
}

/// Whether a connection first seen at `first_seen` waits (at most
/// [`HOLD`]) before it is counted: while its server is not known, and, if a
/// new connection took the entry since the last collection (`renewed`),
/// for one collection whatever its server: the copy that found it may have
/// been made while a program moved the counts of the one before out of the
/// entry.
fn waits_for_server(renewed: bool, now: &UnixConn, first_seen: Instant, started: Instant) -> bool {
    (renewed || now.server == 0) && started.duration_since(first_seen) < HOLD
}

/// A connection with its server only if the server is its own (see
/// [`UnixConn::own_server`]): one left on the entry by the connection
/// before is not known yet.
fn own_server(conn: UnixConn) -> UnixConn {
    UnixConn {
        server: conn.own_server(),
        ..conn
    }
}

fn own_servers<K>(entries: Vec<(K, UnixConn)>) -> Vec<(K, UnixConn)> {
    entries
        .into_iter()
        .map(|(key, conn)| (key, own_server(conn)))
        .collect()
}

/// The retired record to settle the connection counted to `counted`
/// with, if the entry on `key` holds another connection `now` (its client
/// socket's inode differs: the kernel retired the one counted).
fn successor(key: UnixConnKey, counted: &UnixConn, now: &UnixConn) -> Option<RetiredKey> {
    (counted.client_inode != 0 && now.client_inode != counted.client_inode).then_some(RetiredKey {
        conn: key,
        client_inode: counted.client_inode,
    })
}

/// The baseline of connection `now` counted from zero: its client's inode
/// kept, so that its retired record, when a successor takes the entry,
/// is settled against this and not counted twice.
fn from_zero(now: &UnixConn) -> UnixConn {
    UnixConn {
        netns: now.netns,
        client_inode: now.client_inode,
        ..UnixConn::default()
    }
}

/// What a connection sent each way since `before`: (to the server, to the
/// client); connections go with the requests.
fn conn_difference(now: &UnixConn, before: &UnixConn) -> (Counts, Counts) {
    let fell = |now: Sent, before: Sent| now.messages < before.messages || now.bytes < before.bytes;
    // Not the connection counted before (its entry went and came back):
    // all of it is new, its opening too.
    let before = if fell(now.to_server, before.to_server)
        || fell(now.to_client, before.to_client)
        || now.connections < before.connections
    {
        &UnixConn::default()
    } else {
        before
    };
    let way = |now: Sent, before: Sent| (now.messages - before.messages, now.bytes - before.bytes);
    let (messages, bytes) = way(now.to_server, before.to_server);
    let request = Counts {
        packets: messages,
        bytes,
        connections: now.connections - before.connections,
    };
    let (messages, bytes) = way(now.to_client, before.to_client);
    let response = Counts {
        packets: messages,
        bytes,
        connections: 0,
    };
    (request, response)
}

/// The containers that read each pipe of a pod, in the order first seen.
fn fifo_readers(fifo: &[(FifoKey, IpcCounts)]) -> HashMap<(u64, FifoId), Vec<u64>> {
    let mut readers: HashMap<(u64, FifoId), Vec<u64>> = HashMap::new();
    for (key, _) in fifo.iter().filter(|(k, _)| k.writes == 0) {
        let ids = readers.entry((key.netns, key.pipe)).or_default();
        if !ids.contains(&key.cgroup) {
            ids.push(key.cgroup);
        }
    }
    readers
}

/// What a pipe key counted since `before` (all of it if it is new, or
/// came back after its pod's entries were removed).
fn fifo_difference(now: &IpcCounts, before: Option<&IpcCounts>) -> Counts {
    let before = before.copied().unwrap_or_default();
    let all = Counts {
        packets: now.messages,
        bytes: now.bytes,
        connections: now.connections,
    };
    if now.messages < before.messages
        || now.bytes < before.bytes
        || now.connections < before.connections
    {
        return all;
    }
    Counts {
        packets: now.messages - before.messages,
        bytes: now.bytes - before.bytes,
        connections: now.connections - before.connections,
    }
}

/// A path or name as a label value: an abstract name as `@name` (its NUL
/// bytes as `@`, as `ss` and `/proc/net/unix` show them), bytes that are
/// not text escaped, so that a hostile name cannot forge a label.
pub fn path_label(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\0' => out.push('@'),
                c if c.is_control() => out.push_str(&c.escape_default().to_string()),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use observer_common::ipc::server_check;

    use super::*;

    #[test]
    fn paths_are_labels_and_cannot_forge_one() {
        assert_eq!(
            path_label(b"/run/php/php-fpm.sock"),
            "/run/php/php-fpm.sock"
        );
        assert_eq!(path_label(b"\0envoy_admin"), "@envoy_admin");
        assert_eq!(path_label(b"a\"b\n\xff"), "a\"b\\n\\xff");
    }

    #[test]
    fn counts_never_go_backwards() {
        let before = IpcCounts {
            messages: 10,
            bytes: 100,
            connections: 1,
        };
        let now = IpcCounts {
            messages: 12,
            bytes: 130,
            connections: 1,
        };
        let delta = fifo_difference(&now, Some(&before));
        assert_eq!((delta.packets, delta.bytes, delta.connections), (2, 30, 0));
        // The key went and came back: all it has is new.
        let again = IpcCounts {
            messages: 3,
            bytes: 300,
            connections: 0,
        };
        let delta = fifo_difference(&again, Some(&before));
        assert_eq!((delta.packets, delta.bytes), (3, 300));
    }

    /// One unix connection on the entry `KEY`, as the kernel counts it.
    fn conn(client_inode: u64, messages: u64, connections: u64) -> UnixConn {
        UnixConn {
            netns: 7,
            client_inode,
            to_server: Sent {
                messages,
                bytes: messages * 10,
            },
            connections,
            ..UnixConn::default()
        }
    }

    const KEY: UnixConnKey = UnixConnKey {
        server_end: 1,
        client_end: 2,
    };

    /// What the daemon exports of `now` against `counted`: messages to the
    /// server and connections.
    fn exported(now: &UnixConn, counted: &UnixConn) -> (u64, u64) {
        let (request, _) = conn_difference(now, counted);
        (request.packets, request.connections)
    }

    fn seen(counted: UnixConn) -> Seen {
        Seen {
            counted,
            first_seen: Instant::now(),
            quiet: 0,
        }
    }

    /// A quiet connection's entry is taken; a new connection on the same
    /// two sockets took it just before (the kernel retired the one
    /// counted). The new one counts from zero, the retired one's record
    /// settles against what was counted of it: each counted once.
    #[test]
    fn an_entry_taken_as_a_new_connection_took_it_counts_each_connection_once() {
        let (mut settling, mut reclaimed, mut conns) = Default::default();
        let a = conn(100, 10, 1);
        // First collection: A is new, and counted whole.
        let counted = entry_baseline(&mut settling, &mut reclaimed, KEY, None, &a);
        assert_eq!(exported(&a, &counted), (10, 1));
        // A went quiet; B took the entry before the daemon took it out.
        let b = conn(200, 20, 1);
        let (request, _) = taken_difference(&mut settling, &mut reclaimed, KEY, a, &b);
        assert_eq!(
            (request.packets, request.connections),
            (20, 1),
            "B, all of it"
        );
        // Next collection: A's retired record, all counted already.
        let retired = RetiredKey {
            conn: KEY,
            client_inode: 100,
        };
        let counted = retired_baseline(
            &mut settling,
            &mut conns,
            &mut reclaimed,
            &retired,
            &a,
            Instant::now(),
        );
        assert_eq!(exported(&a, &counted), (0, 0), "A, nothing more");
    }

    /// A server on the entry that the connection before set (its check
    /// made with that one's client inode) is not the new connection's:
    /// unknown until the new one's server process sets it. Nor is a
    /// server copied with another's check. A renewed entry waits a
    /// collection even with its server known; an old one does not.
    #[test]
    fn a_server_left_by_the_connection_before_is_not_the_new_ones() {
        let a = UnixConn {
            server: 7,
            server_check: server_check(7, 100),
            ..conn(100, 3, 1)
        };
        assert_eq!(own_server(a).server, 7);
        let b = UnixConn {
            client_inode: 200,
            ..a
        };
        assert_eq!(own_server(b).server, 0, "A's server, not B's");
        let b_served = UnixConn {
            server: 8,
            server_check: server_check(8, 200),
            ..b
        };
        assert_eq!(own_server(b_served).server, 8);
        let torn = UnixConn {
            server: 7,
            ..b_served
        };
        assert_eq!(own_server(torn).server, 0, "A's server with B's check");
        let now = Instant::now();
        assert!(waits_for_server(true, &b_served, now, now));
        assert!(!waits_for_server(false, &b_served, now, now));
        let datagrams = UnixConn {
            server: 9,
            server_check: server_check(9, 0),
            ..conn(0, 1, 0)
        };
        assert_eq!(own_server(datagrams).server, 9, "no inode: from the start");
    }

    /// A connection that went quiet, was taken out and talks again waits
    /// (its server not named yet) with its opening counted already; a new
    /// connection then takes the entry. The retired record does not count
    /// that opening again, and the new connection's own is counted.
    #[test]
    fn a_waiting_connection_retired_is_settled_against_its_own_baseline() {
        let (mut settling, mut reclaimed, mut conns) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        reclaimed.insert(KEY, 100);
        let a = conn(100, 2, 1);
        let counted = entry_baseline(&mut settling, &mut reclaimed, KEY, None, &a);
        assert_eq!(counted.connections, 1, "opened before it went quiet");
        // It waits: its baseline is kept, nothing exported.
        conns.insert(KEY, seen(counted));
        // B takes the entry; the kernel retires A with what it counted.
        let retired = RetiredKey {
            conn: KEY,
            client_inode: 100,
        };
        let later = Instant::now() + Duration::from_secs(1);
        let counted = retired_baseline(
            &mut settling,
            &mut conns,
            &mut reclaimed,
            &retired,
            &a,
            later,
        );
        assert_eq!(exported(&a, &counted), (2, 0), "A: its messages only");
        assert_eq!(conns[&KEY].first_seen, later, "B: first seen now");
        let b = conn(200, 3, 1);
        let before = conns.get(&KEY).map(|s| s.counted);
        let counted = entry_baseline(&mut settling, &mut reclaimed, KEY, before, &b);
        assert_eq!(exported(&b, &counted), (3, 1), "B, its opening too");
    }

    /// A connection taken out as quiet talks again (the kernel makes its
    /// entry anew, its opening counted once more there), and a new one
    /// takes the entry before the next walk: the retired record alone
    /// tells of it, and its opening, counted already, is not again.
    #[test]
    fn a_connection_back_from_quiet_and_retired_at_once_is_not_opened_twice() {
        let (mut settling, mut conns) = (HashMap::new(), HashMap::new());
        let mut reclaimed = HashMap::from([(KEY, 100)]);
        let retired = RetiredKey {
            conn: KEY,
            client_inode: 100,
        };
        let a = conn(100, 4, 1);
        let counted = retired_baseline(
            &mut settling,
            &mut conns,
            &mut reclaimed,
            &retired,
            &a,
            Instant::now(),
        );
        assert_eq!(exported(&a, &counted), (4, 0));
        assert!(reclaimed.is_empty());
    }

    #[test]
    fn a_connection_entry_that_came_back_counts_from_zero_its_opening_too() {
        let sent = |messages, bytes| Sent { messages, bytes };
        let conn = |to_server, to_client, connections| UnixConn {
            to_server,
            to_client,
            connections,
            ..UnixConn::default()
        };
        let before = conn(sent(10, 100), sent(10, 1000), 2);
        let (request, response) = conn_difference(&conn(sent(12, 120), sent(11, 1100), 3), &before);
        assert_eq!(
            (request.packets, request.bytes, request.connections),
            (2, 20, 1)
        );
        assert_eq!((response.packets, response.bytes), (1, 100));
        // Fewer messages one way: another entry under the same key, all of
        // it new, the connection it opened as well.
        let (request, response) = conn_difference(&conn(sent(1, 5), sent(20, 2000), 1), &before);
        assert_eq!(
            (request.packets, request.bytes, request.connections),
            (1, 5, 1)
        );
        assert_eq!((response.packets, response.bytes), (20, 2000));
        // Fewer connections alone tell it too.
        let (request, _) = conn_difference(&conn(sent(10, 100), sent(10, 1000), 1), &before);
        assert_eq!(request.connections, 1);
    }
}
