//! The Kubernetes client logic against a scripted API server (tower-test's
//! mock service in place of the HTTP connection): the requests the watches
//! make, and what the view holds after each answer.
//! (Longer than most files: one test per kind of answer.)

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tower_test::mock::{self, SendResponse};

use super::{ClusterView, ClusterWatch};
use crate::metrics::Metrics;

const NODE: &str = "node-1";
const TIMEOUT: Duration = Duration::from_secs(10);

type Chunks = BoxStream<'static, Result<Frame<Bytes>, Infallible>>;
type Reply = Response<StreamBody<Chunks>>;

/// The four watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Pods of this node (`spec.nodeName` field selector).
    LocalPods,
    /// Every running pod.
    Pods,
    Services,
    Nodes,
}

/// A request of the observer, waiting for its answer.
struct Call {
    route: Route,
    watch: bool,
    query: String,
    respond: SendResponse<Reply>,
}

impl Call {
    /// The query parameter `name`, decoded.
    fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| {
                value
                    .replace("%3D", "=")
                    .replace("%21", "!")
                    .replace("%2C", ",")
            })
        })
    }

    /// Answers a list request.
    fn list(self, resource_version: &str, items: Vec<Value>) {
        assert!(!self.watch, "expected a list, got a watch: {}", self.query);
        let kind = match self.route {
            Route::LocalPods | Route::Pods => "PodList",
            Route::Services => "ServiceList",
            Route::Nodes => "NodeList",
        };
        let body = json!({
            "apiVersion": "v1", "kind": kind,
            "metadata": {"resourceVersion": resource_version},
            "items": items,
        });
        self.respond
            .send_response(reply(StatusCode::OK, once(body.to_string())));
    }

    /// Answers a watch request with a stream kept open until the returned
    /// sender is dropped.
    fn watch(self) -> Events {
        assert!(self.watch, "expected a watch, got a list: {}", self.query);
        let (sender, chunks) = mpsc::unbounded_channel::<String>();
        let chunks = futures::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok(Frame::data(Bytes::from(chunk))), chunks))
        });
        self.respond
            .send_response(reply(StatusCode::OK, chunks.boxed()));
        Events(sender)
    }

    /// Answers with a failure, as an API server behind a broken proxy would.
    fn fail(self) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "service unavailable", "reason": "ServiceUnavailable", "code": 503});
        self.respond.send_response(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            once(status.to_string()),
        ));
    }
}

fn once(text: String) -> Chunks {
    futures::stream::once(async move { Ok(Frame::data(Bytes::from(text))) }).boxed()
}

fn reply(status: StatusCode, chunks: Chunks) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(chunks))
        .unwrap()
}

/// An open watch: events go to the observer as the test sends them.
struct Events(mpsc::UnboundedSender<String>);

impl Events {
    fn send(&self, kind: &str, object: Value) {
        let event = json!({"type": kind, "object": object});
        self.0
            .send(format!("{event}\n"))
            .expect("the watch is open");
    }

    /// The API server's answer to a resource version it no longer has.
    fn gone(&self) {
        self.send(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "too old resource version", "reason": "Expired", "code": 410}),
        );
    }
}

/// The scripted API server: the test answers the routes it scripts; a
/// background task answers the others with an empty list and a watch that
/// stays quiet.
struct ApiServer {
    calls: mpsc::UnboundedReceiver<Call>,
    parked: Vec<Call>,
}

impl ApiServer {
    fn new(mut handle: mock::Handle<Request<Body>, Reply>, scripted: Vec<Route>) -> Self {
        let (sender, calls) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut quiet = Vec::new();
            while let Some((request, respond)) = handle.next_request().await {
                let call = classify(&request, respond);
                if scripted.contains(&call.route) {
                    let _ = sender.send(call);
                } else if call.watch {
                    quiet.push(call.watch());
                } else {
                    call.list("1", Vec::new());
                }
            }
        });
        Self {
            calls,
            parked: Vec::new(),
        }
    }

    /// The next request for `route`.
    async fn next(&mut self, route: Route) -> Call {
        if let Some(i) = self.parked.iter().position(|c| c.route == route) {
            return self.parked.remove(i);
        }
        loop {
            let call = tokio::time::timeout(TIMEOUT, self.calls.recv())
                .await
                .unwrap_or_else(|_| panic!("no request for {route:?} within {TIMEOUT:?}"))
                .expect("the client is alive");
            if call.route == route {
                return call;
            }
            self.parked.push(call);
        }
    }
}

fn classify(request: &Request<Body>, respond: SendResponse<Reply>) -> Call {
    assert_eq!(
        request.method(),
        http::Method::GET,
        "the observer only reads"
    );
    let query = request.uri().query().unwrap_or_default().to_owned();
    let route = match request.uri().path() {
        "/api/v1/pods" if query.contains("spec.nodeName") => Route::LocalPods,
        "/api/v1/pods" => Route::Pods,
        "/api/v1/services" => Route::Services,
        "/api/v1/nodes" => Route::Nodes,
        other => panic!("unexpected request for {other}"),
    };
    Call {
        route,
        watch: query.contains("watch=true"),
        query,
        respond,
    }
}

/// A watch over the scripted server, for `scripted` routes.
fn start(scripted: &[Route]) -> (ApiServer, ClusterWatch, Arc<Metrics>) {
    let (api, watch, metrics, _) = start_with_keys(scripted);
    (api, watch, metrics)
}

/// [`start`], with the sender of the label keys policies use.
fn start_with_keys(
    scripted: &[Route],
) -> (
    ApiServer,
    ClusterWatch,
    Arc<Metrics>,
    watch::Sender<super::LabelKeys>,
) {
    let (service, handle) = mock::pair::<Request<Body>, Reply>();
    let client = Client::new(service, "default");
    let metrics = Arc::new(Metrics::new());
    let (keys, receiver) = watch::channel(super::LabelKeys::default());
    let watch = ClusterWatch::start(client, NODE, Arc::clone(&metrics), receiver);
    (
        ApiServer::new(handle, scripted.to_vec()),
        watch,
        metrics,
        keys,
    )
}

/// Waits until the view satisfies `check`.
async fn until(
    view: &mut watch::Receiver<ClusterView>,
    what: &str,
    check: impl Fn(&ClusterView) -> bool,
) -> ClusterView {
    let found = match tokio::time::timeout(TIMEOUT, view.wait_for(|v| check(v))).await {
        Ok(Ok(view)) => Some(view.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("the view never got {what}: {:#?}", *view.borrow()))
}

/// A pod of this node.
fn pod(name: &str, uid: &str, version: &str, ip: Option<&str>) -> Value {
    pod_on(NODE, name, uid, version, ip)
}

fn pod_on(node: &str, name: &str, uid: &str, version: &str, ip: Option<&str>) -> Value {
    let id = format!("containerd://{}", uid.replace('-', "").repeat(2));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "shop", "name": name, "uid": uid, "resourceVersion": version,
                     "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "containerStatuses": [{"name": "app", "containerID": id, "image": "app",
                                          "imageID": "", "ready": true, "restartCount": 0}]},
    })
}

fn service(name: &str, version: &str, ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": name, "uid": format!("svc-{name}"),
                     "resourceVersion": version},
        "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": "TCP", "targetPort": 8080}]},
    })
}

const A: &str = "0f6c1a6e-2b8e-4c47-9a57-3d2f6c8e1b21";
const B: &str = "7d1f3b0a-95c4-4f4e-8d5e-1a2b3c4d5e6f";

#[tokio::test]
async fn lists_then_watches_pods_through_their_lives() {
    let (mut api, cluster, _) = start(&[Route::LocalPods]);
    let mut view = cluster.view();

    let list = api.next(Route::LocalPods).await;
    assert_eq!(
        list.param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-1")
    );
    list.list("100", vec![pod("a", A, "90", Some("10.244.1.5"))]);
    let synced = until(&mut view, "synced", ClusterView::synced).await;
    assert_eq!(
        synced.local_pods.items[A].ip,
        Some("10.244.1.5".parse().unwrap())
    );
    assert_eq!(synced.local_pods.items[A].labels["app"], "a");
    let (name, id) = &synced.local_pods.items[A].containers[0];
    assert_eq!((name.as_str(), id.as_ref().unwrap().len()), ("app", 64));

    let watch = api.next(Route::LocalPods).await;
    assert_eq!(
        watch.param("resourceVersion").as_deref(),
        Some("100"),
        "resumes from the list"
    );
    assert_eq!(
        watch.param("fieldSelector").as_deref(),
        Some("spec.nodeName=node-1")
    );
    let events = watch.watch();

    // Created: scheduled, no IP yet.
    events.send("ADDED", pod("b", B, "101", None));
    let v = until(&mut view, "pod b", |v| v.local_pods.items.contains_key(B)).await;
    assert_eq!(v.local_pods.items[B].ip, None);
    // The IP, assigned later.
    events.send("MODIFIED", pod("b", B, "102", Some("10.244.1.6")));
    until(&mut view, "pod b's IP", |v| {
        v.local_pods.items.get(B).and_then(|p| p.ip) == Some("10.244.1.6".parse().unwrap())
    })
    .await;
    // Deleted.
    events.send("DELETED", pod("a", A, "103", Some("10.244.1.5")));
    let v = until(&mut view, "pod a gone", |v| {
        !v.local_pods.items.contains_key(A)
    })
    .await;
    assert!(v.local_pods.items.contains_key(B));
}

#[tokio::test]
async fn a_dropped_watch_resumes_where_it_stopped() {
    let (mut api, cluster, metrics) = start(&[Route::LocalPods]);
    let mut view = cluster.view();
    api.next(Route::LocalPods).await.list("100", Vec::new());
    let events = api.next(Route::LocalPods).await.watch();
    events.send("ADDED", pod("a", A, "105", Some("10.244.1.5")));
    until(&mut view, "pod a", |v| v.local_pods.items.contains_key(A)).await;

    // The connection ends (a load balancer's idle timeout, say).
    drop(events);
    let watch = api.next(Route::LocalPods).await;
    assert!(watch.watch, "a new watch, not a list: {}", watch.query);
    assert_eq!(watch.param("resourceVersion").as_deref(), Some("105"));
    let events = watch.watch();
    events.send("ADDED", pod("b", B, "106", Some("10.244.1.6")));
    let v = until(&mut view, "pod b", |v| v.local_pods.items.contains_key(B)).await;
    assert!(v.local_pods.items.contains_key(A), "nothing lost");
    assert_eq!(
        metrics.errors.with_label_values(&["kubernetes_api"]).get(),
        0
    );
}

#[tokio::test]
async fn gone_410_relists_and_forgets_what_was_deleted_meanwhile() {
    let (mut api, cluster, _) = start(&[Route::Pods]);
    let mut view = cluster.view();
    let list = api.next(Route::Pods).await;
    assert_eq!(
        list.param("fieldSelector").as_deref(),
        Some("status.phase!=Succeeded,status.phase!=Failed")
    );
    // Peers: of other nodes, with an address; of this node, or without
    // an address yet, not kept (this node's own watch has those).
    list.list(
        "100",
        vec![
            pod_on("node-2", "a", A, "90", Some("10.244.1.5")),
            pod_on("node-2", "b", B, "91", Some("10.244.2.6")),
            pod_on("node-2", "pending", "u-pending", "92", None),
            pod("here", "u-here", "93", Some("10.244.1.9")),
        ],
    );
    let v = until(&mut view, "both pods", |v| v.pods.synced).await;
    assert_eq!(v.pods.items.len(), 2, "{:?}", v.pods.items.keys());
    assert!(
        v.pods.items[A].containers.is_empty(),
        "no containers for peers"
    );
    assert!(
        v.pods.items[A].labels.is_empty(),
        "no policy matches peers by labels"
    );

    let events = api.next(Route::Pods).await.watch();
    events.gone();
    // A relist, not a watch: pod a was deleted while the watch was away.
    let relist = api.next(Route::Pods).await;
    assert!(!relist.watch, "after 410 comes a list: {}", relist.query);
    relist.list(
        "200",
        vec![pod_on("node-2", "b", B, "91", Some("10.244.2.6"))],
    );
    let v = until(&mut view, "pod a forgotten", |v| {
        !v.pods.items.contains_key(A)
    })
    .await;
    assert!(v.pods.items.contains_key(B));
    let watch = api.next(Route::Pods).await;
    assert_eq!(watch.param("resourceVersion").as_deref(), Some("200"));
}

#[tokio::test]
async fn peers_are_listed_again_with_the_label_keys_policies_come_to_use() {
    let (mut api, cluster, _, keys) = start_with_keys(&[Route::Pods]);
    let mut view = cluster.view();
    let peer = || {
        let mut p = pod_on("node-2", "a", A, "90", Some("10.244.1.5"));
        p["metadata"]["labels"] = json!({"app": "a", "tier": "web", "team": "checkout"});
        p
    };
    api.next(Route::Pods).await.list("100", vec![peer()]);
    let v = until(&mut view, "the peer", |v| v.pods.synced).await;
    assert!(v.pods.items[A].labels.is_empty(), "no key used yet");
    let _watch = api.next(Route::Pods).await.watch();

    // A policy now matches peers by `tier`: the pods are listed again,
    // kept with that label and no other.
    keys.send_replace(Arc::new(["tier".to_owned()].into()));
    let relist = api.next(Route::Pods).await;
    assert!(!relist.watch, "a new list, not a watch: {}", relist.query);
    relist.list("101", vec![peer()]);
    let v = until(&mut view, "the peer's tier", |v| {
        v.pods.items.get(A).is_some_and(|p| !p.labels.is_empty())
    })
    .await;
    let labels: Vec<_> = v.pods.items[A].labels.iter().collect();
    assert_eq!(labels, [(&"tier".to_owned(), &"web".to_owned())]);
}

#[tokio::test]
async fn follows_service_changes() {
    let (mut api, cluster, _) = start(&[Route::Services]);
    let mut view = cluster.view();
    let headless = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": "db", "uid": "svc-db", "resourceVersion": "5"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]},
    });
    api.next(Route::Services)
        .await
        .list("10", vec![service("web", "4", "10.96.0.10", 80), headless]);
    let v = until(&mut view, "synced", ClusterView::synced).await;
    assert_eq!(
        v.services.items.len(),
        1,
        "headless Services have no ClusterIP to classify"
    );
    let inventory = v.inventory(NODE, None, &Default::default());
    assert_eq!(inventory.services[0].cluster_ip.to_string(), "10.96.0.10");
    assert_eq!(inventory.services[0].ports[0].port, 80);

    let events = api.next(Route::Services).await.watch();
    events.send("MODIFIED", service("web", "11", "10.96.0.10", 8080));
    until(&mut view, "the new port", |v| {
        v.services.items["svc-web"].ports.first().map(|p| p.port) == Some(8080)
    })
    .await;
    events.send("DELETED", service("web", "12", "10.96.0.10", 8080));
    until(&mut view, "no Service", |v| v.services.items.is_empty()).await;
}

#[tokio::test]
async fn an_unreachable_api_server_is_retried_and_counted() {
    let (mut api, cluster, metrics) = start(&[Route::Nodes]);
    let mut view = cluster.view();
    api.next(Route::Nodes).await.fail();
    // Backoff, then again.
    api.next(Route::Nodes).await.fail();
    assert!(!view.borrow().synced(), "not synced without nodes");
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "uid": "node-uid-1", "resourceVersion": "3"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [{"type": "Hostname", "address": NODE},
                                 {"type": "InternalIP", "address": "172.18.0.2"}]},
    });
    api.next(Route::Nodes).await.list("20", vec![node]);
    let v = until(&mut view, "synced", ClusterView::synced).await;
    let inventory = v.inventory(NODE, None, &Default::default());
    assert_eq!(inventory.nodes[0].address.to_string(), "172.18.0.2");
    assert_eq!(inventory.pod_cidrs[0].to_string(), "10.244.1.0/24");
    assert!(metrics.errors.with_label_values(&["kubernetes_api"]).get() >= 2);
}
