//! The bpf(2) calls that aya 0.14 does not offer. On links: pin one
//! without giving up the descriptor (aya's `FdLink::pin` consumes the link,
//! and detaches it if the pin fails), open a pin, swap the program of a
//! link (`BPF_LINK_UPDATE`: the hook never runs without a program), and ask
//! whether a link still has its hook (an interface or a cgroup that is gone
//! leaves a defunct link). On maps: take an entry out with what it held
//! (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`: nothing counted in between is lost),
//! and read a hash map in batches (`BPF_MAP_LOOKUP_BATCH`: one call per
//! batch, where aya's iterator makes two per entry; the collector reads
//! every map it walks so), a large one by two walks side by side. On programs: run one
//! on a given CPU (`BPF_PROG_TEST_RUN`); load a socket hook of an attach
//! type aya does not know, and attach it to a cgroup (the unix-socket
//! hooks, [`super::unix_hooks`]).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
    sync::mpsc,
};

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// `union bpf_attr` is 144 bytes on 6.x; every command reads its own
/// prefix, and the rest must be zero.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Self {
        Self([0; 144])
    }

    fn put_u32(&mut self, at: usize, value: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, at: usize, value: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr with the command's fields set,
    // valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Pins the link with this kernel id at `path` (the link stays attached
/// while the pin exists, whatever becomes of the observer's descriptor).
pub fn pin(link_id: u32, path: &Path) -> io::Result<()> {
    let name = c_path(path)?;
    let mut get = Attr::new();
    get.put_u32(0, link_id);
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut get)?;
    // SAFETY: the kernel just gave us this descriptor.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = Attr::new();
    attr.put_u64(0, name.as_ptr() as u64)
        .put_u32(8, link.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the object pinned at `path` (a link, here).
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    let name = c_path(path)?;
    let mut attr = Attr::new();
    attr.put_u64(0, name.as_ptr() as u64);
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of the link at `path` with `program`, atomically:
/// a packet or a `connect()` meets the old program or the new one, never none.
pub fn swap_program(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = open_pin(path)?;
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32)
        .put_u32(4, program.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Whether the link at `path` still has its hook: a TCX link whose
/// interface is gone, or a cgroup link whose cgroup was removed, is
/// defunct (the kernel reports no interface, no cgroup).
pub fn is_live(path: &Path) -> io::Result<bool> {
    let link = open_pin(path)?;
    let info = object_info(link.as_fd())?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    // struct bpf_link_info: type, id, prog_id, then the type's union at 16.
    Ok(match word(0) {
        BPF_LINK_TYPE_TCX => word(16) != 0,
        BPF_LINK_TYPE_CGROUP => u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")) != 0,
        _ => true,
    })
}

/// The kernel id of a link.
pub fn link_id(link: BorrowedFd<'_>) -> io::Result<u32> {
    let info = object_info(link)?;
    Ok(u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")))
}

/// Loads a cgroup socket-address program (`BPF_PROG_TYPE_CGROUP_SOCK_ADDR`)
/// for `attach_type`: its relocated instructions and license. A refusal
/// carries the end of the verifier's log.
pub fn load_sock_addr(
    name: &str,
    instructions: &[aya_obj::generated::bpf_insn],
    license: &std::ffi::CStr,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let load = |log: &mut [u8]| {
        let mut attr = Attr::new();
        attr.put_u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            .put_u32(4, instructions.len() as u32)
            .put_u64(8, instructions.as_ptr() as u64)
            .put_u64(16, license.as_ptr() as u64)
            .put_u32(68, attach_type);
        if !log.is_empty() {
            attr.put_u32(24, 1)
                .put_u32(28, log.len() as u32)
                .put_u64(32, log.as_mut_ptr() as u64);
        }
        // prog_name: at most 15 bytes and a NUL.
        let name = &name.as_bytes()[..name.len().min(15)];
        attr.0[48..48 + name.len()].copy_from_slice(name);
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    let fd = match load(&mut []) {
        Ok(fd) => fd,
        Err(err)
            if err.raw_os_error() == Some(libc::EACCES)
                || err.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Again, for the verifier's reason.
            let mut log = vec![0u8; 1 << 20];
            match load(&mut log) {
                Ok(fd) => fd,
                Err(again) => {
                    let text = String::from_utf8_lossy(&log);
                    let text = text.trim_end_matches('\0');
                    let tail: String = text
                        .lines()
                        .rev()
                        .take(6)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(io::Error::new(again.kind(), format!("{again}: {tail}")));
                }
            }
        }
        Err(err) => return Err(err),
    };
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `program` to the cgroup `cgroup` for `attach_type` as a bpf
/// link (it runs beside other programs there; closing the last descriptor,
/// with no pin, detaches it).
pub fn link_cgroup(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, program.as_raw_fd() as u32)
        .put_u32(4, cgroup.as_raw_fd() as u32)
        .put_u32(8, attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the first 64 bytes of a link's or a map's
/// information.
fn object_info(fd: BorrowedFd<'_>) -> io::Result<[u8; 64]> {
    let mut info = [0u8; 64];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Removes `key` from the hash map `map` and returns what it held, in one
/// step: an update between a read and a delete would be lost. `None` if
/// the key is not there.
pub fn take<K: Copy, V: Copy + Default>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = Attr::new();
    attr.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, std::ptr::from_ref(key) as u64)
        .put_u64(16, std::ptr::from_mut(&mut value) as u64);
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Reads every entry of a hash map, a batch per system call. The buffers
/// are kept from one read to the next.
pub struct BatchReader<K, V> {
    /// Two a walk: the kernel fills one while the caller goes through the
    /// other. The second pair is the second walk's ([`Self::read_batches`]).
    buffers: [Batch<K, V>; 4],
}

/// The entries of one `BPF_MAP_LOOKUP_BATCH` call.
struct Batch<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    /// How many of them the kernel filled.
    count: usize,
}

impl<K: Copy + Default, V: Copy + Default> Batch<K, V> {
    fn new(entries: usize) -> Self {
        Self {
            keys: vec![K::default(); entries],
            values: vec![V::default(); entries],
            count: 0,
        }
    }

    fn entries(&self) -> (&[K], &[V]) {
        (&self.keys[..self.count], &self.values[..self.count])
    }
}

/// Where a walk of a hash map is: the kernel writes a position after each
/// batch, and is given it back with the next. For hash maps it is the
/// index of the next bucket, a `u32` at the start of the 8 bytes.
struct Walk<'fd> {
    map: BorrowedFd<'fd>,
    position: Option<u64>,
    done: bool,
}

impl<'fd> Walk<'fd> {
    fn new(map: BorrowedFd<'fd>) -> Self {
        Self {
            map,
            position: None,
            done: false,
        }
    }

    /// A walk that starts at `bucket` of a hash map.
    fn from_bucket(map: BorrowedFd<'fd>, bucket: u32) -> Self {
        let mut position = [0u8; 8];
        position[..4].copy_from_slice(&bucket.to_ne_bytes());
        Self {
            map,
            position: Some(u64::from_ne_bytes(position)),
            done: false,
        }
    }

    /// The bucket the next batch starts at.
    fn bucket(&self) -> u32 {
        let position = self.position.unwrap_or(0).to_ne_bytes();
        u32::from_ne_bytes(position[..4].try_into().expect("4 bytes"))
    }

    /// Fills `batch` with the next entries; false once the map is done.
    fn next<K: Copy + Default, V: Copy + Default>(
        &mut self,
        batch: &mut Batch<K, V>,
    ) -> io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        let mut next = 0u64;
        loop {
            let mut attr = Attr::new();
            attr.put_u64(
                0,
                self.position
                    .as_ref()
                    .map_or(0, |position| std::ptr::from_ref(position) as u64),
            )
            .put_u64(8, std::ptr::from_mut(&mut next) as u64)
            .put_u64(16, batch.keys.as_mut_ptr() as u64)
            .put_u64(24, batch.values.as_mut_ptr() as u64)
            .put_u32(32, batch.keys.len() as u32)
            .put_u32(36, self.map.as_raw_fd() as u32);
            match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
                Ok(_) => {}
                // The end of the map, with the last entries: the kernel
                // wrote their count, and the position past the last bucket.
                // Or a start past the last bucket, refused before the walk
                // (the count still the buffers' size, the position unwritten).
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    self.done = true;
                    if next == 0 {
                        batch.count = 0;
                        return Ok(false);
                    }
                }
                // One bucket holds more entries than the buffers do.
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    let entries = batch.keys.len() * 2;
                    batch.keys.resize(entries, K::default());
                    batch.values.resize(entries, V::default());
                    continue;
                }
                Err(err) => return Err(err),
            }
            batch.count = u32::from_ne_bytes(attr.0[32..36].try_into().expect("4 bytes")) as usize;
            self.position = Some(next);
            return Ok(true);
        }
    }
}

/// Hash map types, whose batch position is a bucket index
/// (`kernel/bpf/hashtab.c`): plain, per-CPU, and their LRU kinds.
const HASH_MAP_TYPES: [u32; 4] = [1, 5, 9, 10];

/// The bucket a second walk of `map` starts at, if `map` is a hash map of
/// more than two batches' worth of buckets: the middle one (a hash map has
/// its capacity rounded up to a power of two of buckets). `None`: one
/// walk does.
fn halfway(map: BorrowedFd<'_>, batch: usize) -> io::Result<Option<u32>> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries.
    let info = object_info(map)?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    let (kind, capacity) = (word(0), word(16));
    let buckets = capacity.checked_next_power_of_two().unwrap_or(0);
    Ok((HASH_MAP_TYPES.contains(&kind) && buckets as usize > 2 * batch).then_some(buckets / 2))
}

impl<K: Copy + Default + Send, V: Copy + Default + Send> BatchReader<K, V> {
    /// Buffers for `entries` entries a call (at least one).
    pub fn new(entries: usize) -> Self {
        let entries = entries.max(1);
        Self {
            buffers: std::array::from_fn(|_| Batch::new(entries)),
        }
    }

    /// Calls `each` on every entry of `map` (whose key and value are `K`
    /// and `V`). The kernel walks the map bucket by bucket: an entry added
    /// or removed meanwhile is seen once or not at all. An entry may come
    /// twice (see [`Self::read_batches`]).
    pub fn read(&mut self, map: BorrowedFd<'_>, mut each: impl FnMut(&K, &V)) -> io::Result<()> {
        self.read_batches(map, |keys, values| {
            keys.iter().zip(values).for_each(|(k, v)| each(k, v));
        })
    }

    /// [`Self::read`], a batch at a time: `each` is given a batch's keys
    /// and values (as many of each), and may look ahead in them.
    ///
    /// The kernel's walk is most of the time of a large map (it locks and
    /// copies bucket by bucket): a hash map of more than one batch is
    /// walked by two threads side by side, one from the first bucket to
    /// the middle one and one from there to the end, while this thread
    /// calls `each` on their batches as they come (in no set order).
    /// Batches hold whole buckets, so the first walk's last batch may run
    /// past the middle: the entries of those buckets then come twice, at
    /// most a batch of them, and `each` must take an entry's second coming
    /// as nothing new.
    pub fn read_batches(
        &mut self,
        map: BorrowedFd<'_>,
        mut each: impl FnMut(&[K], &[V]),
    ) -> io::Result<()> {
        let batch = self.buffers[0].keys.len();
        let mut first = Walk::new(map);
        let [a, b, c, d] = &mut self.buffers;
        if !first.next(a)? {
            return Ok(());
        }
        if first.done {
            let (keys, values) = a.entries();
            each(keys, values);
            return Ok(());
        }
        // The second walk, if the first has not reached the middle yet.
        let second = halfway(map, batch)?
            .filter(|&middle| first.bucket() < middle)
            .map(|middle| (Walk::from_bucket(map, middle), [c, d]));
        let middle = second.as_ref().map_or(u32::MAX, |(walk, _)| walk.bucket());
        let (full, filled) = mpsc::sync_channel::<(usize, &mut Batch<K, V>)>(2);
        // `move`: should `each` panic, the channels go with it and the
        // walkers end (the scope waits for them).
        std::thread::scope(move |scope| {
            let mut walkers = Vec::new();
            let mut empties = Vec::new();
            let walks = [Some((first, [a, b])), second];
            for (i, (mut walk, [filled_first, spare])) in walks.into_iter().flatten().enumerate() {
                let (empty, to_fill) = mpsc::sync_channel::<&mut Batch<K, V>>(2);
                let full = full.clone();
                let _ = empty.send(spare);
                // The first walk has its first batch already.
                if i == 0 {
                    let _ = full.send((i, filled_first));
                } else {
                    let _ = empty.send(filled_first);
                }
                empties.push(empty);
                // The first walk ends at the middle, the second at the end;
                // either, if the reader has gone.
                let end = if i == 0 { middle } else { u32::MAX };
                walkers.push(scope.spawn(move || -> io::Result<()> {
                    while walk.bucket() < end {
                        let Ok(batch) = to_fill.recv() else { break };
                        if !walk.next(batch)? || full.send((i, batch)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                }));
            }
            drop(full);
            for (i, batch) in filled {
                let (keys, values) = batch.entries();
                each(keys, values);
                let _ = empties[i].send(batch);
            }
            walkers
                .into_iter()
                .try_for_each(|walker| walker.join().expect("a walker does not panic"))
        })
    }
}

/// Every entry of the hash map `map` (keys `K`, values `V`), read in
/// batches of [`ENTRIES_BATCH`]: aya's iterator makes two system calls per
/// entry. For the small maps read at every collection: one buffer, on the
/// calling thread ([`BatchReader`] is for the flow map).
pub fn entries<K, V>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>>
where
    K: Copy + Default,
    V: Copy + Default,
{
    let mut walk = Walk::new(map);
    let mut batch = Batch::new(ENTRIES_BATCH);
    let mut all = Vec::new();
    while walk.next(&mut batch)? {
        let (keys, values) = batch.entries();
        all.extend(keys.iter().copied().zip(values.iter().copied()));
    }
    Ok(all)
}

/// Entries a call for the maps read whole ([`entries`]): most hold far
/// fewer.
const ENTRIES_BATCH: usize = 256;

/// Runs a program that takes no context (a raw tracepoint's, never
/// attached) once, on `cpu` (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`: from another CPU, in an interrupt there).
/// Returns what the program returned.
pub fn run_on_cpu(program: BorrowedFd<'_>, cpu: u32) -> io::Result<u32> {
    let mut attr = Attr::new();
    attr.put_u32(0, program.as_raw_fd() as u32)
        .put_u32(64, BPF_F_TEST_RUN_ON_CPU)
        .put_u32(68, cpu);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(u32::from_ne_bytes(
        attr.0[4..8].try_into().expect("4 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_HASH: u32 = 1;

    /// A hash map of `capacity` u32 keys to u64 values, holding `entries`.
    fn hash_map(capacity: u32, entries: u32) -> OwnedFd {
        let mut attr = Attr::new();
        attr.put_u32(0, BPF_MAP_TYPE_HASH)
            .put_u32(4, 4)
            .put_u32(8, 8)
            .put_u32(12, capacity);
        let fd = bpf(BPF_MAP_CREATE, &mut attr).expect("a hash map (as root, with eBPF)");
        // SAFETY: the kernel just gave us this descriptor.
        let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for key in 0..entries {
            let value = u64::from(key) * 10;
            let mut attr = Attr::new();
            attr.put_u32(0, map.as_raw_fd() as u32)
                .put_u64(8, std::ptr::from_ref(&key) as u64)
                .put_u64(16, std::ptr::from_ref(&value) as u64);
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("an entry");
        }
        map
    }

    #[test]
    fn two_walks_read_every_entry_at_least_once_and_a_walk_past_the_end_reads_none() {
        let map = hash_map(256, 200);
        let mut seen = std::collections::HashMap::new();
        // Batches of 8 entries: the map is walked by two threads.
        BatchReader::<u32, u64>::new(8)
            .read(map.as_fd(), |key, value| {
                assert_eq!(*value, u64::from(*key) * 10);
                *seen.entry(*key).or_insert(0u32) += 1;
            })
            .expect("read");
        assert_eq!(seen.len(), 200);
        // Whole buckets come twice at most (the first walk's last batch).
        assert!(seen.values().all(|&n| n <= 2));
        let mut batch = Batch::<u32, u64>::new(8);
        // The map has 256 buckets: a walk from the 256th reads nothing, and
        // says so (the kernel refuses it without writing a count).
        let mut past = Walk::from_bucket(map.as_fd(), 256);
        assert!(!past.next(&mut batch).expect("a walk past the end"));
        assert_eq!(batch.entries().0.len(), 0);
        // From the last bucket: what it holds, then the end.
        let mut last = Walk::from_bucket(map.as_fd(), 255);
        let mut read = 0;
        while last.next(&mut batch).expect("the last bucket") {
            read += batch.entries().0.len();
        }
        assert!(read <= 8, "the last bucket's entries only: {read}");
    }
}
