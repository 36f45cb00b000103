//! A pod's quality-of-service class, and the cgroup the kubelet gives it
//! with the cgroupfs driver: `kubepods/pod<uid>` (Guaranteed),
//! `kubepods/burstable/pod<uid>`, `kubepods/besteffort/pod<uid>`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// A container's requests and limits, as in a pod spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The resources the class is decided on.
const COMPUTE: [&str; 2] = ["cpu", "memory"];

impl Qos {
    /// Kubernetes' rule: no CPU or memory request or limit anywhere is
    /// BestEffort; limits for both on every container, with requests (which
    /// default to the limits) equal to them, is Guaranteed; else Burstable.
    pub fn of<'a>(containers: impl IntoIterator<Item = &'a Resources>) -> Self {
        let mut any = false;
        let mut guaranteed = true;
        for resources in containers {
            for name in COMPUTE {
                let limit = resources.limits.get(name).and_then(|q| quantity(q));
                let request = resources
                    .requests
                    .get(name)
                    .and_then(|q| quantity(q))
                    .or(limit);
                any |= limit.is_some() || request.is_some();
                guaranteed &= limit.is_some() && request == limit;
            }
        }
        match (any, guaranteed) {
            (false, _) => Self::BestEffort,
            (true, true) => Self::Guaranteed,
            (true, false) => Self::Burstable,
        }
    }

    /// The pod's cgroup below `kubepods`, as the cgroupfs driver names it.
    pub fn pod_cgroup(self, uid: &str) -> String {
        match self {
            Self::Guaranteed => format!("kubepods/pod{uid}"),
            Self::Burstable => format!("kubepods/burstable/pod{uid}"),
            Self::BestEffort => format!("kubepods/besteffort/pod{uid}"),
        }
    }
}

/// A Kubernetes quantity in thousandths (`100m` is 100, `1` is 1000,
/// `160Mi` is 160 * 2^20 * 1000), if it is one.
fn quantity(text: &str) -> Option<u128> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let scale: u128 = match suffix {
        "m" => 1,
        "" => 1_000,
        "k" => 1_000_000,
        "M" => 1_000_000_000,
        "G" => 1_000_000_000_000,
        "T" => 1_000_000_000_000_000,
        "Ki" => 1_000 << 10,
        "Mi" => 1_000 << 20,
        "Gi" => 1_000 << 30,
        "Ti" => 1_000 << 40,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut value = whole.checked_mul(scale)?;
    // Decimal places, down to the scale's unit.
    let mut unit = scale;
    for digit in fraction.chars() {
        unit /= 10;
        value += u128::from(digit.to_digit(10)?) * unit;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Resources {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Resources {
            requests: map(requests),
            limits: map(limits),
        }
    }

    #[test]
    fn classes_follow_kubernetes() {
        assert_eq!(Qos::of(&[Resources::default()]), Qos::BestEffort);
        // The DaemonSet's observer: requests, and a memory limit only.
        let observer = resources(
            &[("cpu", "100m"), ("memory", "160Mi")],
            &[("memory", "384Mi")],
        );
        assert_eq!(Qos::of(&[observer]), Qos::Burstable);
        // Limits alone: requests default to them.
        let limits = resources(&[], &[("cpu", "1"), ("memory", "1Gi")]);
        assert_eq!(Qos::of(std::slice::from_ref(&limits)), Qos::Guaranteed);
        // Equal quantities written differently.
        let same = resources(
            &[("cpu", "1000m"), ("memory", "1024Mi")],
            &[("cpu", "1"), ("memory", "1Gi")],
        );
        assert_eq!(Qos::of(&[same]), Qos::Guaranteed);
        // One container without limits makes the pod burstable.
        assert_eq!(
            Qos::of(&[limits, resources(&[("cpu", "1")], &[])]),
            Qos::Burstable
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("100m"), Some(100));
        assert_eq!(quantity("0.5"), Some(500));
        assert_eq!(quantity("1.5Gi"), Some(1_000 * 3 * (1 << 29)));
        assert_eq!(quantity("2k"), Some(2_000_000));
        assert_eq!(quantity("1x"), None);
        assert_eq!(quantity("."), None);
        assert_eq!(quantity(""), None);
    }

    #[test]
    fn cgroups_per_class() {
        assert_eq!(Qos::Guaranteed.pod_cgroup("u"), "kubepods/podu");
        assert_eq!(Qos::Burstable.pod_cgroup("u"), "kubepods/burstable/podu");
        assert_eq!(Qos::BestEffort.pod_cgroup("u"), "kubepods/besteffort/podu");
    }
}
