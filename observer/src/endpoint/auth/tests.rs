//! The authorizer against a scripted API server: the reviews it asks for,
//! and what it decides of each answer.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tower_test::mock;

use std::hash::BuildHasher as _;

use super::{Authorizer, Verdict};

type Reply = Response<Full<bytes::Bytes>>;

/// The API as the tests script it: `prometheus` may get /metrics; `nobody`
/// is a user without the permission; any other token is unknown.
async fn api(mut handle: mock::Handle<Request<Body>, Reply>, calls: Arc<AtomicUsize>) {
    while let Some((request, respond)) = handle.next_request().await {
        calls.fetch_add(1, Ordering::SeqCst);
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let review: Value = serde_json::from_slice(&body).unwrap();
        let answer = if path.ends_with("/tokenreviews") {
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let user = match token {
                "prometheus-token" => Some("system:serviceaccount:monitoring:prometheus"),
                "nobody-token" => Some("nobody"),
                "broken" => {
                    respond.send_response(
                        Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Full::from("{}"))
                            .unwrap(),
                    );
                    continue;
                }
                _ => None,
            };
            json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": review["spec"],
                "status": match user {
                    Some(user) => json!({"authenticated": true, "user": {"username": user, "groups": ["g"]}}),
                    None => json!({"authenticated": false}),
                },
            })
        } else {
            assert!(path.ends_with("/subjectaccessreviews"), "{path}");
            let spec = &review["spec"];
            let attributes = &spec["nonResourceAttributes"];
            assert_eq!(attributes["verb"], "get");
            let allowed = spec["user"] == "system:serviceaccount:monitoring:prometheus"
                && attributes["path"] == "/metrics";
            json!({
                "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec, "status": {"allowed": allowed},
            })
        };
        respond.send_response(
            Response::builder()
                .status(StatusCode::CREATED)
                .header("content-type", "application/json")
                .body(Full::from(answer.to_string()))
                .unwrap(),
        );
    }
}

fn authorizer() -> (Authorizer, Arc<AtomicUsize>) {
    let (service, handle) = mock::pair::<Request<Body>, Reply>();
    let calls = Arc::new(AtomicUsize::new(0));
    tokio::spawn(api(handle, Arc::clone(&calls)));
    (Authorizer::new(Client::new(service, "default")), calls)
}

#[tokio::test]
async fn a_valid_token_with_the_permission_reads_and_others_do_not() {
    let (auth, calls) = authorizer();
    let check = |token: Option<&'static str>, path: &'static str| {
        let auth = &auth;
        async move { auth.check(token, path).await }
    };
    assert_eq!(
        check(Some("prometheus-token"), "/metrics").await,
        Verdict::Allowed
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a TokenReview, then a SubjectAccessReview"
    );
    assert_eq!(
        check(Some("prometheus-token"), "/flows").await,
        Verdict::Forbidden,
        "the permission is per path"
    );
    assert_eq!(
        check(Some("nobody-token"), "/metrics").await,
        Verdict::Forbidden
    );
    assert_eq!(
        check(Some("forged"), "/metrics").await,
        Verdict::Unauthenticated
    );
    assert_eq!(check(None, "/metrics").await, Verdict::Unauthenticated);
    assert_eq!(check(Some(""), "/metrics").await, Verdict::Unauthenticated);
    assert_eq!(
        check(Some("broken"), "/metrics").await,
        Verdict::Unavailable,
        "fails closed"
    );

    // Answers are kept: a scrape again asks the API nothing.
    let before = calls.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(
            check(Some("prometheus-token"), "/metrics").await,
            Verdict::Allowed
        );
        assert_eq!(
            check(Some("forged"), "/metrics").await,
            Verdict::Unauthenticated
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // What the API could not answer is asked again.
    assert_eq!(
        check(Some("broken"), "/metrics").await,
        Verdict::Unavailable
    );
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn many_tokens_keep_memory_bounded() {
    let (auth, _) = authorizer();
    for i in 0..(super::KEPT + 100) {
        let token = format!("forged-{i}");
        assert_eq!(
            auth.check(Some(&token), "/metrics").await,
            Verdict::Unauthenticated
        );
    }
    assert!(auth.refused.lock().unwrap().len() <= super::KEPT);
}

/// A flood of unknown tokens neither pushes out an allowed answer nor
/// asks the API more than a few reviews at once; an allowed token keeps
/// reading while the API is busy with them.
#[tokio::test]
async fn a_flood_of_unknown_tokens_keeps_the_scraper_reading() {
    let (auth, calls) = authorizer();
    let auth = Arc::new(auth);
    assert_eq!(
        auth.check(Some("prometheus-token"), "/metrics").await,
        Verdict::Allowed
    );
    // Reviews that never finish hold every slot: the API is "busy".
    let (service, _silent) = mock::pair::<Request<Body>, Reply>();
    let stuck = Arc::new(Authorizer::new(Client::new(service, "default")));
    let mut held = Vec::new();
    for i in 0..super::REVIEWS_AT_ONCE {
        let stuck = Arc::clone(&stuck);
        held.push(tokio::spawn(async move {
            stuck.check(Some(&format!("slow-{i}")), "/metrics").await
        }));
    }
    tokio::task::yield_now().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        stuck.check(Some("one-more"), "/metrics").await,
        Verdict::Unavailable,
        "no more than the bound asked at once"
    );
    // A token allowed a moment ago, due again, reads while nothing can be
    // asked.
    let key = stuck.hasher.hash_one(("prometheus-token", "/metrics"));
    let earlier =
        std::time::Instant::now() - super::ALLOWED_FOR - std::time::Duration::from_secs(1);
    stuck.allowed.lock().unwrap().insert(key, earlier);
    assert_eq!(
        stuck.check(Some("prometheus-token"), "/metrics").await,
        Verdict::Allowed
    );
    for task in held {
        task.abort();
    }

    // Unknown tokens past the bound: the allowed answer stays.
    for i in 0..(super::KEPT + 100) {
        let token = format!("flood-{i}");
        auth.check(Some(&token), "/metrics").await;
    }
    let before = calls.load(Ordering::SeqCst);
    assert_eq!(
        auth.check(Some("prometheus-token"), "/metrics").await,
        Verdict::Allowed
    );
    assert_eq!(calls.load(Ordering::SeqCst), before, "still kept");
}
