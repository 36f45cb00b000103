//! The policy maps: what they hold ([`PolicyEntries`], compiled by
//! `policy::compile`), and writing changes into the kernel's maps. The
//! socket hooks read them at the next `connect()`: no program is reloaded.

use std::collections::{HashMap, HashSet};

use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use observer_common::{
    MemberKey, NodeInfo, PodPolicy, UnixPathName, UnixPolicyKey, UnixVerdict, ipc::UnixPathKey,
    policy::RuleSets, policy_cidr_key,
};

use super::class_maps::mask;

#[derive(Debug, thiserror::Error)]
#[error("updating the kernel's {map} map: {source}")]
pub struct PolicyMapsError {
    map: &'static str,
    #[source]
    source: Box<MapError>,
}

/// What the policy maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    /// By network namespace cookie.
    pub pods: HashMap<u64, PodPolicy>,
    pub members: HashSet<MemberKey>,
    /// (prefix length, [`policy_cidr_key`]) of the LPM trie.
    pub cidrs: HashSet<(u32, [u8; 20])>,
    /// What pods' unix-socket rules decide, per client and path.
    pub unix: HashMap<UnixPolicyKey, UnixVerdict>,
    /// The paths those rules name, whole: a path is the one a rule names
    /// only if its bytes are, not only its hash.
    pub unix_paths: HashMap<UnixPathKey, UnixPathName>,
}

/// The same lookups the kernel makes, on the entries in memory.
impl RuleSets for PolicyEntries {
    fn member(&self, set: u32, member: u64) -> bool {
        self.members.contains(&MemberKey::new(set, member))
    }

    fn cidr(&self, set: u32, addr: &[u8; 16]) -> bool {
        let key = policy_cidr_key(set, *addr);
        self.cidrs
            .iter()
            .any(|(len, data)| mask(&key, *len) == *data)
    }
}

/// The policy maps, shared by the hooks on every pod's cgroup.
pub struct KernelPolicyMaps {
    pub policies: BpfHashMap<MapData, u64, PodPolicy>,
    pub members: BpfHashMap<MapData, MemberKey, u8>,
    pub cidrs: LpmTrie<MapData, [u8; 20], u8>,
    pub unix: BpfHashMap<MapData, UnixPolicyKey, UnixVerdict>,
    pub unix_paths: BpfHashMap<MapData, UnixPathKey, UnixPathName>,
    /// How the node's own processes are told (their connections are not
    /// subject to ingress rules).
    pub node: Array<MapData, NodeInfo>,
    pub node_written: Option<NodeInfo>,
}

/// One write to the policy maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write<'a> {
    Member(MemberKey, bool),
    Cidr((u32, [u8; 20]), bool),
    /// A pod's entry; `None`: removed.
    Pod(u64, Option<&'a PodPolicy>),
    /// A unix-socket decision; `None`: removed.
    Unix(UnixPolicyKey, Option<&'a UnixVerdict>),
    /// The name of a path a pod's unix rules name; `None`: removed.
    UnixPath(UnixPathKey, Option<&'a UnixPathName>),
}

/// Where [`sync`] writes: the kernel's maps, or a test's.
pub trait PolicyMaps {
    fn write(&mut self, write: Write<'_>) -> Result<(), PolicyMapsError>;
}

impl PolicyMaps for KernelPolicyMaps {
    fn write(&mut self, write: Write<'_>) -> Result<(), PolicyMapsError> {
        let error = |map| {
            move |source| PolicyMapsError {
                map,
                source: Box::new(source),
            }
        };
        match write {
            Write::Member(key, true) => self
                .members
                .insert(key, 1, 0)
                .map_err(error("POLICY_MEMBERS")),
            Write::Member(key, false) => {
                let _ = self.members.remove(&key);
                Ok(())
            }
            Write::Cidr((prefix, data), true) => self
                .cidrs
                .insert(&Key::new(prefix, data), 1, 0)
                .map_err(error("POLICY_CIDRS")),
            Write::Cidr((prefix, data), false) => {
                let _ = self.cidrs.remove(&Key::new(prefix, data));
                Ok(())
            }
            Write::Pod(cookie, Some(policy)) => self
                .policies
                .insert(cookie, policy, 0)
                .map_err(error("POLICIES")),
            Write::Pod(cookie, None) => {
                let _ = self.policies.remove(&cookie);
                Ok(())
            }
            Write::Unix(key, Some(verdict)) => self
                .unix
                .insert(key, verdict, 0)
                .map_err(error("UNIX_POLICY")),
            Write::Unix(key, None) => {
                let _ = self.unix.remove(&key);
                Ok(())
            }
            Write::UnixPath(key, Some(name)) => self
                .unix_paths
                .insert(key, name, 0)
                .map_err(error("UNIX_POLICY_PATHS")),
            Write::UnixPath(key, None) => {
                let _ = self.unix_paths.remove(&key);
                Ok(())
            }
        }
    }
}

impl KernelPolicyMaps {
    /// What the maps hold (an earlier observer's entries, when they are
    /// taken over). A read that fails leaves that entry out.
    pub fn read(&self) -> PolicyEntries {
        PolicyEntries {
            pods: self.policies.iter().flatten().collect(),
            members: self.members.keys().flatten().collect(),
            cidrs: self
                .cidrs
                .keys()
                .flatten()
                .map(|key| (key.prefix_len(), key.data()))
                .collect(),
            unix: self.unix.iter().flatten().collect(),
            unix_paths: self.unix_paths.iter().flatten().collect(),
        }
    }

    /// Empties the maps (an earlier observer's entries, when this one has
    /// no policy): every pod is then left alone.
    pub fn clear(&mut self) -> Result<(), PolicyMapsError> {
        let entries = self.read();
        self.sync(&entries, &PolicyEntries::default())
    }

    /// Writes the node's [`NodeInfo`] if it changed; returns whether it did.
    pub fn set_node(&mut self, node: NodeInfo) -> Result<bool, PolicyMapsError> {
        if self.node_written == Some(node) {
            return Ok(false);
        }
        self.node
            .set(0, node, 0)
            .map_err(|source| PolicyMapsError {
                map: "NODE",
                source: Box::new(source),
            })?;
        self.node_written = Some(node);
        Ok(true)
    }

    /// See [`sync`].
    pub fn sync(
        &mut self,
        before: &PolicyEntries,
        after: &PolicyEntries,
    ) -> Result<(), PolicyMapsError> {
        sync(self, before, after)
    }
}

/// Brings the maps from `before` to `after`. Pods' entries go last on the
/// way in and first on the way out, so that no rule ever points at a set
/// that is not filled yet. All or nothing: if a write fails, what this
/// call wrote is undone, in reverse order, and the maps hold `before`.
pub fn sync(
    maps: &mut impl PolicyMaps,
    before: &PolicyEntries,
    after: &PolicyEntries,
) -> Result<(), PolicyMapsError> {
    let mut writes = Vec::new();
    for cookie in before.pods.keys().filter(|c| !after.pods.contains_key(c)) {
        writes.push(Write::Pod(*cookie, None));
    }
    for key in after.members.difference(&before.members) {
        writes.push(Write::Member(*key, true));
    }
    for cidr in after.cidrs.difference(&before.cidrs) {
        writes.push(Write::Cidr(*cidr, true));
    }
    for (cookie, policy) in &after.pods {
        if before.pods.get(cookie) != Some(policy) {
            writes.push(Write::Pod(*cookie, Some(policy)));
        }
    }
    // Unix decisions, the most specific first (the kernel tries them from
    // the most specific): a client and a path, then a client or a path,
    // then a pod's "any client, any path", which says it has unix rules.
    // The names of the paths come before the decisions that need them.
    for (key, name) in &after.unix_paths {
        if before.unix_paths.get(key) != Some(name) {
            writes.push(Write::UnixPath(*key, Some(name)));
        }
    }
    let specific = |key: &UnixPolicyKey| u8::from(key.cgroup != 0) + u8::from(key.path != 0);
    for level in [2, 1, 0] {
        for (key, verdict) in after.unix.iter().filter(|(k, _)| specific(k) == level) {
            if before.unix.get(key) != Some(verdict) {
                writes.push(Write::Unix(*key, Some(verdict)));
            }
        }
    }
    for level in [0, 1, 2] {
        let gone = before.unix.keys().filter(|k| !after.unix.contains_key(k));
        for key in gone.filter(|k| specific(k) == level) {
            writes.push(Write::Unix(*key, None));
        }
    }
    for key in before.unix_paths.keys() {
        if !after.unix_paths.contains_key(key) {
            writes.push(Write::UnixPath(*key, None));
        }
    }
    for key in before.members.difference(&after.members) {
        writes.push(Write::Member(*key, false));
    }
    for cidr in before.cidrs.difference(&after.cidrs) {
        writes.push(Write::Cidr(*cidr, false));
    }
    let undo = |write: &Write| match *write {
        Write::Member(key, added) => Write::Member(key, !added),
        Write::Cidr(cidr, added) => Write::Cidr(cidr, !added),
        Write::Pod(cookie, _) => Write::Pod(cookie, before.pods.get(&cookie)),
        Write::Unix(key, _) => Write::Unix(key, before.unix.get(&key)),
        Write::UnixPath(key, _) => Write::UnixPath(key, before.unix_paths.get(&key)),
    };
    for (done, write) in writes.iter().enumerate() {
        if let Err(err) = maps.write(*write) {
            for written in writes[..done].iter().rev() {
                // Undoing frees room or restores what was there: it does
                // not fail for want of room.
                let _ = maps.write(undo(written));
            }
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps in memory that refuse the `fail_at`-th insert.
    #[derive(Default)]
    struct Fake {
        entries: PolicyEntries,
        inserts: usize,
        fail_at: usize,
    }

    impl PolicyMaps for Fake {
        fn write(&mut self, write: Write<'_>) -> Result<(), PolicyMapsError> {
            let insert = matches!(
                write,
                Write::Member(_, true)
                    | Write::Cidr(_, true)
                    | Write::Pod(_, Some(_))
                    | Write::Unix(_, Some(_))
                    | Write::UnixPath(_, Some(_))
            );
            if insert {
                self.inserts += 1;
                if self.inserts == self.fail_at {
                    return Err(PolicyMapsError {
                        map: "TEST",
                        source: Box::new(MapError::KeyNotFound),
                    });
                }
            }
            match write {
                Write::Member(key, true) => drop(self.entries.members.insert(key)),
                Write::Member(key, false) => drop(self.entries.members.remove(&key)),
                Write::Cidr(cidr, true) => drop(self.entries.cidrs.insert(cidr)),
                Write::Cidr(cidr, false) => drop(self.entries.cidrs.remove(&cidr)),
                Write::Pod(cookie, Some(p)) => drop(self.entries.pods.insert(cookie, *p)),
                Write::Pod(cookie, None) => drop(self.entries.pods.remove(&cookie)),
                Write::Unix(key, Some(v)) => drop(self.entries.unix.insert(key, *v)),
                Write::Unix(key, None) => drop(self.entries.unix.remove(&key)),
                Write::UnixPath(key, Some(n)) => drop(self.entries.unix_paths.insert(key, *n)),
                Write::UnixPath(key, None) => drop(self.entries.unix_paths.remove(&key)),
            }
            Ok(())
        }
    }

    fn entries(pods: &[(u64, u32)], members: &[u64], cidrs: &[u8]) -> PolicyEntries {
        PolicyEntries {
            pods: pods
                .iter()
                .map(|&(cookie, rules)| {
                    (
                        cookie,
                        PodPolicy {
                            rules,
                            ..PodPolicy::default()
                        },
                    )
                })
                .collect(),
            members: members.iter().map(|&m| MemberKey::new(1, m)).collect(),
            cidrs: cidrs.iter().map(|&c| (32, [c; 20])).collect(),
            unix: pods
                .iter()
                .map(|&(netns, rules)| {
                    let key = UnixPolicyKey {
                        netns,
                        cgroup: 0,
                        path: u64::from(rules),
                    };
                    let verdict = UnixVerdict {
                        rule: rules,
                        verdict: 1,
                        _pad: [0; 3],
                    };
                    (key, verdict)
                })
                .collect(),
            unix_paths: pods
                .iter()
                .map(|&(netns, rules)| {
                    let key = UnixPathKey {
                        netns,
                        hash: u64::from(rules),
                    };
                    (key, UnixPathName::of(b"/a", 2).1)
                })
                .collect(),
        }
    }

    #[test]
    fn a_failed_write_leaves_the_maps_as_they_were() {
        let before = entries(&[(1, 1), (2, 1)], &[10, 11], &[1]);
        let after = entries(&[(2, 2), (3, 1)], &[11, 12, 13], &[2]);
        // Each insert in turn fails: nothing is half-written, nothing leaks.
        for fail_at in 1..=9 {
            let mut maps = Fake {
                entries: before.clone(),
                fail_at,
                ..Fake::default()
            };
            assert!(
                sync(&mut maps, &before, &after).is_err(),
                "insert {fail_at}"
            );
            assert_eq!(maps.entries, before, "insert {fail_at} failed");
        }
        let mut maps = Fake {
            entries: before.clone(),
            ..Fake::default()
        };
        sync(&mut maps, &before, &after).unwrap();
        assert_eq!(maps.entries, after);
    }
}
