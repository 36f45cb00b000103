//! The policy maps: what they hold ([`PolicyEntries`], compiled by
//! `policy::compile`), and writing changes into the kernel's maps. The
//! socket hooks read them at the next `connect()`: no program is reloaded.

use std::collections::{HashMap, HashSet};

use aya::maps::{
    HashMap as BpfHashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use observer_common::{MemberKey, PodPolicy, policy::RuleSets, policy_cidr_key};

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
}

impl KernelPolicyMaps {
    /// Brings the maps from `before` to `after`. Pods' entries go last on
    /// the way in and first on the way out, so that no rule ever points at
    /// a set that is not filled yet.
    pub fn sync(
        &mut self,
        before: &PolicyEntries,
        after: &PolicyEntries,
    ) -> Result<(), PolicyMapsError> {
        let error = |map| {
            move |source| PolicyMapsError {
                map,
                source: Box::new(source),
            }
        };
        for cookie in before.pods.keys().filter(|c| !after.pods.contains_key(c)) {
            let _ = self.policies.remove(cookie);
        }
        for key in after.members.difference(&before.members) {
            self.members
                .insert(key, 1, 0)
                .map_err(error("POLICY_MEMBERS"))?;
        }
        for (prefix, data) in after.cidrs.difference(&before.cidrs) {
            self.cidrs
                .insert(&Key::new(*prefix, *data), 1, 0)
                .map_err(error("POLICY_CIDRS"))?;
        }
        for (cookie, policy) in &after.pods {
            if before.pods.get(cookie) != Some(policy) {
                self.policies
                    .insert(cookie, policy, 0)
                    .map_err(error("POLICIES"))?;
            }
        }
        for key in before.members.difference(&after.members) {
            let _ = self.members.remove(key);
        }
        for (prefix, data) in before.cidrs.difference(&after.cidrs) {
            let _ = self.cidrs.remove(&Key::new(*prefix, *data));
        }
        Ok(())
    }
}
