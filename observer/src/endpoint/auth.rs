//! Who may read `/metrics` and `/flows` (`--secure-serving`), as the
//! Kubernetes API says, the way controller-runtime protects an operator's
//! metrics: the request's bearer token goes to a `TokenReview`, the user it
//! names to a `SubjectAccessReview` for `get` on the path (a non-resource
//! URL: `ClusterRole` rules with `nonResourceURLs: [/metrics, /flows]`).
//! Answers are kept for a while (allowed: a minute, refused: ten seconds),
//! so that a scrape costs the API nothing most of the time. When the API
//! cannot be asked, the request is refused (503): nobody reads without the
//! API's word.

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

/// How long an answer is kept.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Answers kept at most (tokens × paths); beyond, the stale ones go, then
/// all: an abusive client cannot grow the observer's memory.
const KEPT: usize = 4096;

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
    kept: Mutex<HashMap<u64, (Instant, Verdict)>>,
    hasher: RandomState,
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            kept: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }

    /// May the bearer of `token` `get` `path`?
    pub async fn check(&self, token: Option<&str>, path: &str) -> Verdict {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Verdict::Unauthenticated;
        };
        let key = self.hasher.hash_one((token, path));
        let now = Instant::now();
        if let Some((until, verdict)) = self.kept.lock().expect("not poisoned").get(&key)
            && *until > now
        {
            return *verdict;
        }
        let verdict = self.ask(token, path).await;
        let keep_for = match verdict {
            Verdict::Allowed => ALLOWED_FOR,
            Verdict::Unavailable => return verdict,
            _ => REFUSED_FOR,
        };
        let mut kept = self.kept.lock().expect("not poisoned");
        if kept.len() >= KEPT {
            kept.retain(|_, (until, _)| *until > now);
            if kept.len() >= KEPT {
                kept.clear();
            }
        }
        kept.insert(key, (now + keep_for, verdict));
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

#[cfg(test)]
mod tests;
