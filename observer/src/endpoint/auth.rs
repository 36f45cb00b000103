//! Who may read `/metrics` and `/flows` (`--secure-serving`), as the
//! Kubernetes API says, the way controller-runtime protects an operator's
//! metrics: the request's bearer token goes to a `TokenReview`, the user it
//! names to a `SubjectAccessReview` for `get` on the path (a non-resource
//! URL: `ClusterRole` rules with `nonResourceURLs: [/metrics, /flows]`).
//! Answers are kept for a while (allowed: a minute, refused: ten seconds),
//! so that a scrape costs the API nothing most of the time. At most
//! [`REVIEWS_AT_ONCE`] reviews are asked at once. When the API cannot be
//! asked, the request is refused (503): nobody reads without the API's
//! word, except a token the API allowed in the last five minutes, which
//! keeps reading through an outage or a flood of other tokens.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Semaphore;

/// How long an answer is kept.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// How long an allowed answer still serves when it is due to be asked
/// again and the API cannot be asked now (busy with other reviews, or
/// down): a scraper is not cut off by a flood of other tokens.
const ALLOWED_STALE_FOR: Duration = Duration::from_secs(300);
/// Answers kept at most, each kind (tokens × paths); beyond, the stale
/// ones go, then all of that kind: an abusive client cannot grow the
/// observer's memory, and its refused tokens never push out an allowed
/// one.
const KEPT: usize = 4096;
/// Reviews asked of the API at once; a request that would need one more is
/// answered 503 at once: an abusive client cannot turn the observer into a
/// load on the API server.
const REVIEWS_AT_ONCE: usize = 4;

/// What the API said of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one the API does not know (401).
    Unauthenticated,
    /// A user the API knows, without `get` on the path (403).
    Forbidden,
    /// The API could not be asked (503; not kept).
    Unavailable,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
        }
    }
}

pub struct Authorizer {
    client: Client,
    /// By a keyed hash of (token, path): no token is kept.
    allowed: Mutex<HashMap<u64, Instant>>,
    refused: Mutex<HashMap<u64, (Instant, Verdict)>>,
    hasher: RandomState,
    reviews: Semaphore,
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            allowed: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            reviews: Semaphore::new(REVIEWS_AT_ONCE),
        }
    }

    /// May the bearer of `token` `get` `path`?
    pub async fn check(&self, token: Option<&str>, path: &str) -> Verdict {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Verdict::Unauthenticated;
        };
        let key = self.hasher.hash_one((token, path));
        let now = Instant::now();
        let allowed_at = self
            .allowed
            .lock()
            .expect("not poisoned")
            .get(&key)
            .copied();
        if allowed_at.is_some_and(|at| now < at + ALLOWED_FOR) {
            return Verdict::Allowed;
        }
        if let Some((until, verdict)) = self.refused.lock().expect("not poisoned").get(&key)
            && *until > now
        {
            return *verdict;
        }
        let stale = allowed_at.is_some_and(|at| now < at + ALLOWED_STALE_FOR);
        let verdict = match self.reviews.try_acquire() {
            Ok(_permit) => self.ask(token, path).await,
            Err(_) => Verdict::Unavailable,
        };
        match verdict {
            Verdict::Allowed => keep(&self.allowed, key, now, now),
            Verdict::Unavailable if stale => return Verdict::Allowed,
            Verdict::Unavailable => {}
            refused => {
                self.allowed.lock().expect("not poisoned").remove(&key);
                keep(&self.refused, key, (now + REFUSED_FOR, refused), now);
            }
        }
        verdict
    }

    async fn ask(&self, token: &str, path: &str) -> Verdict {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = match Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
        {
            Ok(reviewed) => reviewed,
            Err(err) => {
                tracing::warn!(%err, "TokenReview: the API cannot be asked");
                return Verdict::Unavailable;
            }
        };
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Verdict::Unauthenticated;
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some("get".into()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        match Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await
        {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => Verdict::Allowed,
            Ok(_) => Verdict::Forbidden,
            Err(err) => {
                tracing::warn!(%err, "SubjectAccessReview: the API cannot be asked");
                Verdict::Unavailable
            }
        }
    }
}

/// Keeps an answer, within [`KEPT`]: when full, answers past their time go
/// first, then all.
fn keep<V: Copy + Expiry>(kept: &Mutex<HashMap<u64, V>>, key: u64, value: V, now: Instant) {
    let mut kept = kept.lock().expect("not poisoned");
    if kept.len() >= KEPT && !kept.contains_key(&key) {
        kept.retain(|_, v| !v.expired(now));
        if kept.len() >= KEPT {
            kept.clear();
        }
    }
    kept.insert(key, value);
}

/// Whether a kept answer is past any use.
trait Expiry {
    fn expired(&self, now: Instant) -> bool;
}

/// An allowed answer: when it was given.
impl Expiry for Instant {
    fn expired(&self, now: Instant) -> bool {
        now >= *self + ALLOWED_STALE_FOR
    }
}

/// A refused answer: until when it holds.
impl Expiry for (Instant, Verdict) {
    fn expired(&self, now: Instant) -> bool {
        now >= self.0
    }
}

#[cfg(test)]
mod tests;
