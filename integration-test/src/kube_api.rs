//! A stand-in Kubernetes API server on loopback, for the observer's
//! Kubernetes mode on the node lab: it serves the lab's pods, Services and
//! nodes as Kubernetes objects (list and watch, over plain HTTP/1.1), and
//! the test adds and deletes objects while the observer watches.
//!
//! Only what the observer asks is implemented: GET of the core/v1 `pods`,
//! `services` and `nodes` collections, the `spec.nodeName` field selector,
//! and `watch=true` answered with a chunked stream of events. Over plain
//! HTTP for an observer given a kubeconfig; over TLS, with a CA of its own,
//! for one in a pod (in-cluster configuration is https), listening in a
//! lab node's network namespace where the pod reaches it.
//! (Longer than most files: list, watch, TLS and the objects it serves
//! make one server.)

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, Sender},
    },
    thread,
    time::Duration,
};

use observer_common::inventory::Inventory;
use serde_json::{Value, json};

/// Which collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Services,
    Nodes,
}

impl Kind {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/pods" => Some(Self::Pods),
            "/api/v1/services" => Some(Self::Services),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Pods => "PodList",
            Self::Services => "ServiceList",
            Self::Nodes => "NodeList",
        }
    }
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    events: Sender<String>,
}

#[derive(Default)]
struct State {
    version: u64,
    /// By kind, then by UID.
    objects: BTreeMap<Kind, BTreeMap<String, Value>>,
    watchers: Vec<Watcher>,
    /// Bearer tokens the API authenticates (TokenReview), and their users.
    tokens: BTreeMap<String, String>,
    /// (user, non-resource path) pairs allowed `get` (SubjectAccessReview).
    grants: std::collections::BTreeSet<(String, String)>,
    /// Reviews asked so far.
    reviews: usize,
}

/// The API server; stops serving when dropped.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeApi {
    /// Serves on `addr` (a free loopback port), plain HTTP.
    pub fn serve(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).expect("binding the fake API server");
        Self::serve_on(listener, None)
    }

    /// Serves over TLS on `addr`, in the network namespace `netns` (a lab
    /// node's); returns what a kubelet tells a pod of it (address, CA,
    /// token).
    pub fn serve_tls_in(netns: &lab::Netns, addr: SocketAddr) -> (Self, lab::ApiServer) {
        let listener = netns
            .run(|| TcpListener::bind(addr))
            .expect("entering the node")
            .expect("binding the fake API server");
        let (config, ca_pem) = tls_config(addr);
        let api = lab::ApiServer {
            host: addr.ip().to_string(),
            port: addr.port(),
            ca_pem,
            token: "lab-token".into(),
        };
        (Self::serve_on(listener, Some(config)), api)
    }

    fn serve_on(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (shared, stopping) = (Arc::clone(&state), Arc::clone(&stop));
        thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = Arc::clone(&shared);
                        let tls = tls.clone();
                        thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            match tls {
                                None => serve_connection(stream, state),
                                Some(config) => {
                                    let connection = rustls::ServerConnection::new(config)
                                        .expect("a TLS connection");
                                    serve_connection(
                                        rustls::StreamOwned::new(connection, stream),
                                        state,
                                    );
                                }
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { state, stop }
    }

    /// Adds (or replaces) an object, and tells the watches.
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        let uid = object["metadata"]["uid"]
            .as_str()
            .expect("a uid")
            .to_owned();
        let objects = state.objects.entry(kind).or_default();
        let event = if objects.insert(uid, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.notify(kind, event, &object);
    }

    /// Deletes an object by UID, and tells the watches.
    pub fn delete(&self, kind: Kind, uid: &str) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        let version = state.version.to_string();
        if let Some(mut object) = state.objects.entry(kind).or_default().remove(uid) {
            object["metadata"]["resourceVersion"] = json!(version);
            state.notify(kind, "DELETED", &object);
        }
    }

    /// A service account's token, as TokenReview will know it.
    pub fn add_token(&self, token: &str, user: &str) {
        let mut state = self.state.lock().unwrap();
        state.tokens.insert(token.into(), user.into());
    }

    /// Lets `user` `get` the non-resource URL `path` (as a ClusterRole
    /// with `nonResourceURLs` bound to it would).
    pub fn grant(&self, user: &str, path: &str) {
        let mut state = self.state.lock().unwrap();
        state.grants.insert((user.into(), path.into()));
    }

    /// TokenReviews and SubjectAccessReviews asked so far.
    pub fn reviews(&self) -> usize {
        self.state.lock().unwrap().reviews
    }

    /// Loads the lab's pods, Services and nodes.
    pub fn load(&self, inventory: &Inventory) {
        for node in &inventory.nodes {
            self.apply(Kind::Nodes, node_object(node));
        }
        for service in &inventory.services {
            self.apply(Kind::Services, service_object(service));
        }
        for pod in &inventory.pods {
            self.apply(Kind::Pods, pod_object(pod));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Ends every watch: their senders go.
        self.state.lock().unwrap().watchers.clear();
    }
}

impl State {
    fn notify(&mut self, kind: Kind, event: &str, object: &Value) {
        let line = format!("{}\n", json!({"type": event, "object": object}));
        let node = object["spec"]["nodeName"].as_str().map(str::to_owned);
        self.watchers.retain(|w| {
            if w.kind != kind || (w.node.is_some() && w.node != node) {
                return true;
            }
            w.events.send(line.clone()).is_ok()
        });
    }
}

fn serve_connection(stream: impl Read + Write, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers: only a body's length matters here.
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        if request_line.starts_with("POST ") {
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let answer = review(&state, target, &body);
            let (status, body) = match &answer {
                Some(answer) => ("201 Created", answer.to_string()),
                None => ("404 Not Found", "{}".to_owned()),
            };
            if respond(reader.get_mut(), status, &body).is_err() {
                return;
            }
            continue;
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), decode(v)))
            .collect();
        let Some(kind) = Kind::from_path(path) else {
            let _ = respond(reader.get_mut(), "404 Not Found", "{}");
            continue;
        };
        let node = params
            .get("fieldSelector")
            .and_then(|s| s.strip_prefix("spec.nodeName="))
            .map(str::to_owned);
        if params.get("watch").map(String::as_str) == Some("true") {
            let (sender, events) = mpsc::channel();
            state.lock().unwrap().watchers.push(Watcher {
                kind,
                node,
                events: sender,
            });
            stream_events(reader.into_inner(), events);
            return;
        }
        let body = {
            let state = state.lock().unwrap();
            // Pages, as a real API server gives them (`limit`, `continue`:
            // here the index of the next item).
            let skip: usize = params
                .get("continue")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let limit: usize = params
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|&l| l > 0)
                .unwrap_or(usize::MAX);
            let mut matching = state
                .objects
                .get(&kind)
                .into_iter()
                .flat_map(|o| o.values())
                .filter(|o| node.is_none() || o["spec"]["nodeName"].as_str() == node.as_deref())
                .skip(skip);
            let items: Vec<&Value> = matching.by_ref().take(limit).collect();
            let more = matching.next().is_some();
            let mut metadata = json!({"resourceVersion": state.version.to_string()});
            if more {
                metadata["continue"] = json!((skip + items.len()).to_string());
            }
            json!({
                "apiVersion": "v1", "kind": kind.list_kind(),
                "metadata": metadata,
                "items": items,
            })
            .to_string()
        };
        if respond(reader.get_mut(), "200 OK", &body).is_err() {
            return;
        }
    }
}

/// A TokenReview or SubjectAccessReview, answered from the tokens and
/// grants the test gave.
fn review(state: &Mutex<State>, target: &str, body: &[u8]) -> Option<Value> {
    let path = target.split('?').next().unwrap_or(target);
    let mut review: Value = serde_json::from_slice(body).ok()?;
    let mut state = state.lock().unwrap();
    state.reviews += 1;
    let status = match path {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            match state.tokens.get(token) {
                Some(user) => {
                    json!({"authenticated": true, "user": {"username": user, "groups": ["system:authenticated"]}})
                }
                None => json!({"authenticated": false}),
            }
        }
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
            let spec = &review["spec"];
            let user = spec["user"].as_str().unwrap_or_default().to_owned();
            let attributes = &spec["nonResourceAttributes"];
            let path = attributes["path"].as_str().unwrap_or_default().to_owned();
            let allowed = attributes["verb"] == "get" && state.grants.contains(&(user, path));
            json!({"allowed": allowed})
        }
        _ => return None,
    };
    review["status"] = status;
    Some(review)
}

fn respond(stream: &mut impl Write, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A watch: events as chunks until the server is dropped or the client goes.
fn stream_events(mut stream: impl Write, events: Receiver<String>) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    for event in events {
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        if stream.write_all(chunk.as_bytes()).is_err() {
            return;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
}

/// A CA of the test's own, and a certificate of it for `addr`'s IP.
fn tls_config(addr: SocketAddr) -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![addr.ip().to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("a server certificate");
    (Arc::new(config), ca_cert.pem())
}

fn decode(value: &str) -> String {
    let mut out = Vec::new();
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A kubeconfig for an API server at `addr` (plain HTTP), written to `dir`.
pub fn kubeconfig(addr: SocketAddr, dir: &Path) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
         clusters:\n- name: lab\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: lab\n  user: {{}}\n\
         contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\n"
    );
    std::fs::write(&path, text).expect("writing the kubeconfig");
    path
}

/// A lab pod as the API shows it, its containers running.
pub fn pod_object(pod: &observer_common::inventory::Pod) -> Value {
    pod_object_restarted(pod, &BTreeMap::new())
}

/// A lab pod as the API shows it, its containers running, restarted as
/// often as `restarts` says (by container name; none if absent).
pub fn pod_object_restarted(
    pod: &observer_common::inventory::Pod,
    restarts: &BTreeMap<String, u32>,
) -> Value {
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({"name": c.name, "containerID": format!("containerd://{}", c.id),
                   "image": "lab", "imageID": "", "ready": true,
                   "restartCount": restarts.get(&c.name).copied().unwrap_or(0),
                   "state": {"running": {}}})
        })
        .collect();
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| json!({"name": c.name}))
        .collect();
    object(pod, containers, "Running", statuses)
}

/// A pod whose sandbox runs while its containers are being created: the
/// API knows its IP, and no container id yet.
pub fn pending_pod_object(pod: &observer_common::inventory::Pod, containers: &[&str]) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|name| {
            json!({"name": name, "image": "lab", "imageID": "", "ready": false,
                   "restartCount": 0,
                   "state": {"waiting": {"reason": "ContainerCreating"}}})
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(|name| json!({"name": name}))
        .collect();
    object(pod, specs, "Pending", statuses)
}

fn object(
    pod: &observer_common::inventory::Pod,
    containers: Vec<Value>,
    phase: &str,
    statuses: Vec<Value>,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid,
                     "labels": pod.labels},
        "spec": {"nodeName": pod.node, "containers": containers},
        "status": {"phase": phase, "podIP": pod.ip.to_string(),
                   "podIPs": [{"ip": pod.ip.to_string()}], "containerStatuses": statuses},
    })
}

fn service_object(service: &observer_common::inventory::Service) -> Value {
    let ports: Vec<Value> = service
        .ports
        .iter()
        .map(
            |p| json!({"port": p.port, "targetPort": p.target_port, "protocol": p.protocol.name()}),
        )
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": service.namespace, "name": service.name,
                     "uid": format!("svc-{}-{}", service.namespace, service.name)},
        "spec": {"clusterIP": service.cluster_ip.to_string(), "ports": ports},
    })
}

fn node_object(node: &observer_common::inventory::Node) -> Value {
    let cidrs: Vec<String> = node.pod_cidr.iter().map(ToString::to_string).collect();
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name, "uid": format!("node-{}", node.name)},
        "spec": {"podCIDR": cidrs.first(), "podCIDRs": cidrs},
        "status": {"addresses": [{"type": "InternalIP", "address": node.address.to_string()}]},
    })
}
