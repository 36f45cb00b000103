//! What a policy field may hold, checked while the file is read: the
//! words of the kernel's vocabulary a rule's fields take, and Kubernetes
//! names and labels.

use std::collections::BTreeMap;

use observer_common::verdict;
use serde::{Deserialize, Deserializer, de};

use super::model::{API_VERSION, KIND};

/// What a rule's fields mean in the kernel's vocabulary: each word a user
/// writes stands for the number the kernel's rules hold.
pub mod words {
    use observer_common::{class, direction, inventory::Protocol, verdict};

    /// `class:` any, or a traffic class.
    pub fn classes() -> Vec<(&'static str, u8)> {
        let mut words = vec![("any", class::UNKNOWN)];
        // Not `fifo`: a named pipe has no hook a policy could decide at.
        let classes = (class::LOCALHOST..=class::UNIX).map(|c| (class::name(c), c));
        words.extend(classes);
        words
    }

    /// `direction:`.
    pub fn directions() -> Vec<(&'static str, u8)> {
        [direction::EGRESS, direction::INGRESS]
            .map(|d| (direction::name(d), d))
            .into()
    }

    /// `protocol:` any, or a protocol as Kubernetes spells it.
    pub fn protocols() -> Vec<(&'static str, u8)> {
        let mut words = vec![("any", 0)];
        words
            .extend([Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|p| (p.name(), p.number())));
        words
    }

    /// `action:` and `defaultAction:`.
    pub fn actions() -> Vec<(&'static str, u8)> {
        [verdict::ALLOW, verdict::DENY]
            .map(|v| (verdict::name(v), v))
            .into()
    }

    /// The word for `number` among `words`.
    pub fn word(words: &[(&'static str, u8)], number: u8) -> &'static str {
        words
            .iter()
            .find(|(_, n)| *n == number)
            .map_or("?", |(w, _)| w)
    }
}

/// Reads a word of `words` as its number.
pub(super) fn word<'de, D: Deserializer<'de>>(
    deserializer: D,
    what: &str,
    words: Vec<(&'static str, u8)>,
) -> Result<u8, D::Error> {
    let text = String::deserialize(deserializer)?;
    words
        .iter()
        .find(|(w, _)| *w == text)
        .map(|(_, n)| *n)
        .ok_or_else(|| {
            let known: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
            de::Error::custom(format!(
                "unknown variant `{text}` for `{what}`, expected one of {}",
                known.join(", ")
            ))
        })
}

pub(super) fn class_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "class", words::classes())
}

pub(super) fn direction_word<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    word(d, "direction", words::directions()).map(Some)
}

pub(super) fn protocol_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "protocol", words::protocols())
}

pub(super) fn action_word<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    word(d, "action", words::actions())
}

pub(super) const fn allow() -> u8 {
    verdict::ALLOW
}

pub(super) fn api_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if value != API_VERSION {
        return Err(de::Error::custom(format!(
            "apiVersion `{value}` is not known: this observer reads `{API_VERSION}`"
        )));
    }
    Ok(value)
}

pub(super) fn kind<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let value = String::deserialize(deserializer)?;
    if value != KIND {
        return Err(de::Error::custom(format!(
            "kind `{value}` is not a policy: expected `{KIND}`"
        )));
    }
    Ok(value)
}

/// A Kubernetes name (RFC 1123 label): what namespaces, Services and our
/// policies and rules are named with.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

pub(super) fn dns_label<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let name = String::deserialize(deserializer)?;
    if !is_dns_label(&name) {
        return Err(de::Error::custom(format!(
            "`{name}` is not a valid name: lowercase letters, digits and `-`, at most 63"
        )));
    }
    Ok(name)
}

pub(super) fn optional_dns_label<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    dns_label(deserializer).map(Some)
}

/// Label keys and values as Kubernetes accepts them.
pub(super) fn labels<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(deserializer)?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
    };
    for (key, value) in &labels {
        let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
        let prefix_ok =
            prefix.is_empty() || (prefix.len() <= 253 && prefix.split('.').all(is_dns_label));
        if !prefix_ok || !name_ok(name) {
            return Err(de::Error::custom(format!(
                "`{key}` is not a valid label key"
            )));
        }
        if !value.is_empty() && !name_ok(value) {
            return Err(de::Error::custom(format!(
                "`{value}` is not a valid label value (for `{key}`)"
            )));
        }
    }
    Ok(labels)
}
