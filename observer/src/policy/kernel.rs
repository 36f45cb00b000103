//! Compiled policies into the kernel's maps, changes only. The socket hooks
//! read them at the next `connect()`: no program is reloaded.

use aya::maps::{
    HashMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use observer_common::{MemberKey, PodPolicy};

use super::compile::Compiled;

#[derive(Debug, thiserror::Error)]
#[error("updating the kernel's {map} map: {source}")]
pub struct PolicyMapsError {
    map: &'static str,
    #[source]
    source: Box<MapError>,
}

/// The policy maps, shared by the hooks on every pod's cgroup.
pub struct PolicyMaps {
    pub policies: HashMap<MapData, u64, PodPolicy>,
    pub members: HashMap<MapData, MemberKey, u8>,
    pub cidrs: LpmTrie<MapData, [u8; 8], u8>,
}

impl PolicyMaps {
    /// Brings the maps from `before` to `after`. Pods' entries go last on
    /// the way in and first on the way out, so that no rule ever points at
    /// a set that is not filled yet.
    pub fn sync(&mut self, before: &Compiled, after: &Compiled) -> Result<(), PolicyMapsError> {
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
