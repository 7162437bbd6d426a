//! A stand-in Kubernetes API server on a loopback port, for the actioner's failover, failback
//! and repair on `platform: kubernetes`: Deployments (with their `scale` subresource) and
//! Services, read with GET and changed with JSON merge patches, answering with the objects,
//! `Scale` and `Status` bodies the real API server sends. A Deployment's status follows its
//! spec as a controller would: the new generation is observed at once, and its pods become
//! ready `ready_after` later (or never, for a broken image). coordination.k8s.io/v1 Leases are
//! kept as the API server keeps them for leader election: created with POST (409
//! AlreadyExists when one is there), replaced with PUT only when the body carries the current
//! `resourceVersion` (409 Conflict otherwise: optimistic concurrency). Every request is
//! recorded, so a test can check each against the Role the bundle ships.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// The token the kubeconfig carries and the server demands.
pub const TOKEN: &str = "stand-in-service-account-token";

/// One request, as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// GET or PATCH.
    pub method: String,
    /// The URL path.
    pub path: String,
    /// `Content-Type`.
    pub content_type: String,
    /// The body, as JSON (`null` when empty).
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

#[derive(Debug)]
struct Workload {
    object: Value,
    /// The status the pods last settled at.
    settled: Value,
    changed_at: Instant,
    template_changed: bool,
    ready_after: Duration,
    never_ready: bool,
    fixed_by_restart: bool,
}

#[derive(Debug, Default)]
struct Cluster {
    deployments: BTreeMap<(String, String), Workload>,
    services: BTreeMap<(String, String), Value>,
    leases: BTreeMap<(String, String), Value>,
    /// Pods, listed across namespaces with a `spec.nodeName` field selector.
    pods: Vec<Value>,
    /// Lease requests hang while set (an API server that stopped answering).
    stalled: bool,
    requests: Vec<Recorded>,
    resource_version: u64,
}

impl Cluster {
    fn next_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

/// JSON merge patch (RFC 7386), as the API server applies `application/merge-patch+json`.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

impl Workload {
    /// The object with the status a controller would show now.
    fn current(&mut self) -> Value {
        let spec_replicas = self.object["spec"]["replicas"].as_i64().unwrap_or(1);
        let generation = int(&self.object["metadata"]["generation"]);
        let mut status = self.settled.clone();
        status["observedGeneration"] = json!(generation);
        if self.changed_at.elapsed() >= self.ready_after {
            let ready = if self.never_ready { 0 } else { spec_replicas };
            status["replicas"] = json!(spec_replicas);
            status["updatedReplicas"] = json!(spec_replicas);
            status["readyReplicas"] = json!(ready);
            status["availableReplicas"] = json!(ready);
            status["unavailableReplicas"] = json!(spec_replicas - ready);
            self.settled = status.clone();
        } else if self.template_changed {
            // Surge: a new pod starting beside the old ones.
            status["updatedReplicas"] = json!(0);
            status["replicas"] = json!(int(&self.settled["replicas"]) + 1);
        } else if spec_replicas < int(&self.settled["replicas"]) {
            // Scaling down: the pods beyond the new count shut down for their grace period;
            // `replicas` no longer counts them, `terminatingReplicas` (Kubernetes 1.33) does.
            let old = int(&self.settled["replicas"]);
            for key in [
                "replicas",
                "updatedReplicas",
                "readyReplicas",
                "availableReplicas",
            ] {
                status[key] = json!(spec_replicas.min(int(&self.settled[key])));
            }
            status["terminatingReplicas"] = json!(old - spec_replicas);
        }
        // The API server leaves zero counts out.
        let fields = status.as_object_mut().unwrap();
        fields.retain(|k, v| k == "observedGeneration" || int(v) != 0);
        self.object["status"] = status;
        self.object.clone()
    }
}

fn status_error(code: u16, reason: &str, message: String) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code
        })
        .to_string(),
    )
        .into_response()
}

fn ok(body: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

type Shared = Arc<Mutex<Cluster>>;

/// Records the request and checks what every API request needs; the parsed body, or the
/// answer to give instead.
fn admit(
    cluster: &mut Cluster,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Value, Box<Response>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    cluster.requests.push(Recorded {
        method: method.to_string(),
        path: path.to_owned(),
        content_type: content_type.clone(),
        body: parsed.clone(),
        at: Instant::now(),
    });
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if !authorized {
        return Err(Box::new(status_error(
            401,
            "Unauthorized",
            "Unauthorized".into(),
        )));
    }
    if *method == Method::PATCH && content_type != "application/merge-patch+json" {
        return Err(Box::new(status_error(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type}"
            ),
        )));
    }
    Ok(parsed)
}

async fn deployment(
    State(shared): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}");
    let mut cluster = shared.lock().unwrap();
    let patch = match admit(&mut cluster, &method, &path, &headers, &body) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let version = cluster.next_version();
    let Some(workload) = cluster.deployments.get_mut(&(ns, name.clone())) else {
        return status_error(
            404,
            "NotFound",
            format!("deployments.apps \"{name}\" not found"),
        );
    };
    if method == Method::PATCH {
        let before = workload.object["spec"].clone();
        let mut patch = patch;
        if let Some(fields) = patch.as_object_mut() {
            fields.remove("status");
        }
        merge(&mut workload.object, &patch);
        workload.object["metadata"]["resourceVersion"] = json!(version);
        if workload.object["spec"] != before {
            bump(
                workload,
                before["template"] != workload.object["spec"]["template"],
            );
        }
    }
    ok(&workload.current())
}

fn bump(workload: &mut Workload, template_changed: bool) {
    let generation = int(&workload.object["metadata"]["generation"]) + 1;
    workload.object["metadata"]["generation"] = json!(generation);
    workload.changed_at = Instant::now();
    workload.template_changed = template_changed;
    if template_changed && workload.fixed_by_restart {
        workload.never_ready = false;
    }
}

async fn scale(
    State(shared): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale");
    let mut cluster = shared.lock().unwrap();
    let patch = match admit(&mut cluster, &method, &path, &headers, &body) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let version = cluster.next_version();
    let Some(workload) = cluster.deployments.get_mut(&(ns.clone(), name.clone())) else {
        return status_error(
            404,
            "NotFound",
            format!("deployments.apps \"{name}\" not found"),
        );
    };
    let replicas = patch["spec"]["replicas"].as_i64();
    if method == Method::PATCH
        && let Some(replicas) = replicas
        && workload.object["spec"]["replicas"].as_i64() != Some(replicas)
    {
        workload.object["spec"]["replicas"] = json!(replicas);
        workload.object["metadata"]["resourceVersion"] = json!(version);
        bump(workload, false);
    }
    let object = workload.current();
    let selector = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    ok(&json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name, "namespace": ns,
            "uid": object["metadata"]["uid"],
            "resourceVersion": object["metadata"]["resourceVersion"],
            "creationTimestamp": object["metadata"]["creationTimestamp"]
        },
        "spec": {"replicas": object["spec"]["replicas"]},
        "status": {"replicas": object["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector}
    }))
}

async fn service(
    State(shared): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/api/v1/namespaces/{ns}/services/{name}");
    let mut cluster = shared.lock().unwrap();
    let patch = match admit(&mut cluster, &method, &path, &headers, &body) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let version = cluster.next_version();
    let Some(object) = cluster.services.get_mut(&(ns, name.clone())) else {
        return status_error(404, "NotFound", format!("services \"{name}\" not found"));
    };
    if method == Method::PATCH {
        merge(object, &patch);
        object["metadata"]["resourceVersion"] = json!(version);
    }
    ok(object)
}

async fn leases(
    State(shared): State<Shared>,
    Path(ns): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases");
    let mut cluster = shared.lock().unwrap();
    let mut object = match admit(&mut cluster, &method, &path, &headers, &body) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return status_error(
            422,
            "Invalid",
            "Lease.coordination.k8s.io \"\" is invalid: metadata.name: Required value".into(),
        );
    };
    if cluster.leases.contains_key(&(ns.clone(), name.clone())) {
        return status_error(
            409,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    let version = cluster.next_version();
    object["kind"] = json!("Lease");
    object["apiVersion"] = json!("coordination.k8s.io/v1");
    object["metadata"]["namespace"] = json!(ns);
    object["metadata"]["resourceVersion"] = json!(version);
    object["metadata"]["uid"] = json!(format!(
        "7a1d2c3e-2222-4000-8000-{:012}",
        cluster.resource_version
    ));
    cluster.leases.insert((ns, name), object.clone());
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        object.to_string(),
    )
        .into_response()
}

async fn lease(
    State(shared): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}");
    while shared.lock().unwrap().stalled {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cluster = shared.lock().unwrap();
    let mut object = match admit(&mut cluster, &method, &path, &headers, &body) {
        Ok(p) => p,
        Err(answer) => return *answer,
    };
    let not_found = || {
        status_error(
            404,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        )
    };
    if method == Method::GET {
        return cluster
            .leases
            .get(&(ns, name.clone()))
            .map_or_else(not_found, ok);
    }
    let version = cluster.next_version();
    let Some(current) = cluster.leases.get_mut(&(ns.clone(), name.clone())) else {
        return not_found();
    };
    if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
        return status_error(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    object["kind"] = json!("Lease");
    object["apiVersion"] = json!("coordination.k8s.io/v1");
    object["metadata"]["resourceVersion"] = json!(version);
    object["metadata"]["uid"] = current["metadata"]["uid"].clone();
    *current = object.clone();
    ok(&object)
}

/// `GET /api/v1/pods?fieldSelector=spec.nodeName=NODE`: a PodList of that node's pods (all
/// pods without a selector), as the API server answers it.
async fn pods(
    State(shared): State<Shared>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut cluster = shared.lock().unwrap();
    // Recorded with its query: the field selector is what keeps the list to one node.
    let path = uri.path_and_query().map_or("/api/v1/pods", |p| p.as_str());
    if let Err(answer) = admit(&mut cluster, &method, path, &headers, &body) {
        return *answer;
    }
    let query = uri.query().unwrap_or_default();
    let node = query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("fieldSelector=")?;
        let value = value.replace("%3D", "=").replace("%3d", "=");
        value.strip_prefix("spec.nodeName=").map(str::to_owned)
    });
    let items: Vec<Value> = cluster
        .pods
        .iter()
        .filter(|p| node.as_deref().is_none_or(|n| p["spec"]["nodeName"] == n))
        .cloned()
        .collect();
    let version = cluster.resource_version.to_string();
    ok(&json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": version},
        "items": items
    }))
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    status_error(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({method} {uri})"),
    )
}

/// How a Deployment's pods behave.
#[derive(Debug, Clone, Copy)]
pub struct Pods {
    /// Time from a change to its pods being ready.
    pub ready_after: Duration,
    /// Its pods never become ready (a broken image, a model that does not fit).
    pub never_ready: bool,
    /// A rollout restart cures `never_ready` (pods wedged until restarted).
    pub fixed_by_restart: bool,
}

impl Default for Pods {
    fn default() -> Self {
        Self {
            ready_after: Duration::from_millis(300),
            never_ready: false,
            fixed_by_restart: false,
        }
    }
}

/// The stand-in; runs until the test process ends.
#[derive(Debug, Clone)]
pub struct FakeKubernetes {
    cluster: Shared,
    /// Base URL.
    pub url: String,
    /// A kubeconfig pointing at it with [`TOKEN`].
    pub kubeconfig: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl FakeKubernetes {
    /// Starts it, empty, on a loopback port.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// Starts it, empty, on a port of `address` (a test network's gateway, for containers).
    pub fn start_on(address: &str) -> Self {
        let cluster = Shared::default();
        let listener = std::net::TcpListener::bind((address, 0)).unwrap();
        let url = crate::serve_on(
            listener,
            Router::new()
                .route(
                    "/apis/apps/v1/namespaces/{ns}/deployments/{name}",
                    get(deployment).patch(deployment),
                )
                .route(
                    "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
                    get(scale).patch(scale),
                )
                .route(
                    "/api/v1/namespaces/{ns}/services/{name}",
                    get(service).patch(service),
                )
                .route("/api/v1/pods", get(pods))
                .route(
                    "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                    axum::routing::post(leases),
                )
                .route(
                    "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                    get(lease).put(lease),
                )
                .fallback(not_found)
                .with_state(cluster.clone()),
        );
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n  - name: stand-in\n    cluster: {{server: \"{url}\"}}\nusers:\n  - name: actioner\n    user: {{token: {TOKEN}}}\ncontexts:\n  - name: stand-in\n    context: {{cluster: stand-in, user: actioner, namespace: ml}}\ncurrent-context: stand-in\n"
            ),
        )
        .unwrap();
        Self {
            cluster,
            url,
            kubeconfig,
            _dir: Arc::new(dir),
        }
    }

    /// Adds a settled Deployment with `replicas` ready pods, selecting `labels`.
    pub fn add_deployment(
        &self,
        namespace: &str,
        name: &str,
        replicas: i64,
        labels: &[(&str, &str)],
        pods: Pods,
    ) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let mut cluster = self.cluster.lock().unwrap();
        let version = cluster.next_version();
        let ready = if pods.never_ready { 0 } else { replicas };
        let object = json!({
            "kind": "Deployment",
            "apiVersion": "apps/v1",
            "metadata": {
                "name": name, "namespace": namespace,
                "uid": format!("5b8c0f7e-0000-4000-8000-{:012}", cluster.resource_version),
                "resourceVersion": version, "generation": 1,
                "creationTimestamp": "2026-11-20T09:12:44Z",
                "labels": labels.clone(),
                "annotations": {"deployment.kubernetes.io/revision": "1"}
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels.clone()},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [{"name": name, "image": format!("registry.example/{name}:1"), "resources": {}}],
                        "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
                        "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler"
                    }
                },
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
                "revisionHistoryLimit": 10, "progressDeadlineSeconds": 600
            }
        });
        let settled = json!({
            "observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": replicas - ready
        });
        let mut workload = Workload {
            object,
            settled,
            changed_at: Instant::now() - pods.ready_after,
            template_changed: false,
            ready_after: pods.ready_after,
            never_ready: pods.never_ready,
            fixed_by_restart: pods.fixed_by_restart,
        };
        workload.current();
        cluster
            .deployments
            .insert((namespace.into(), name.into()), workload);
    }

    /// Adds a Service selecting `selector`.
    pub fn add_service(&self, namespace: &str, name: &str, selector: &[(&str, &str)]) {
        let selector: serde_json::Map<String, Value> = selector
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let mut cluster = self.cluster.lock().unwrap();
        let version = cluster.next_version();
        cluster.services.insert(
            (namespace.into(), name.into()),
            json!({
                "kind": "Service", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "uid": "0d9c5c1e-1111-4000-8000-000000000001",
                             "resourceVersion": version, "creationTimestamp": "2026-11-20T09:12:44Z"},
                "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8000}],
                         "selector": selector, "clusterIP": "10.43.12.7", "clusterIPs": ["10.43.12.7"],
                         "type": "ClusterIP", "sessionAffinity": "None",
                         "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"},
                "status": {"loadBalancer": {}}
            }),
        );
    }

    /// Changes how a Deployment's pods behave from now on.
    pub fn set_pods(&self, namespace: &str, name: &str, pods: Pods) {
        let mut cluster = self.cluster.lock().unwrap();
        let workload = cluster
            .deployments
            .get_mut(&(namespace.into(), name.into()))
            .unwrap();
        workload.ready_after = pods.ready_after;
        workload.never_ready = pods.never_ready;
        workload.fixed_by_restart = pods.fixed_by_restart;
    }

    /// A Deployment as a GET would show it now.
    pub fn deployment(&self, namespace: &str, name: &str) -> Value {
        self.cluster
            .lock()
            .unwrap()
            .deployments
            .get_mut(&(namespace.into(), name.into()))
            .unwrap()
            .current()
    }

    /// A Service's selector.
    pub fn selector(&self, namespace: &str, name: &str) -> Value {
        self.cluster.lock().unwrap().services[&(namespace.into(), name.into())]["spec"]["selector"]
            .clone()
    }

    /// Adds a Lease nobody holds, as the bundle ships it (so the actioner needs no `create`).
    pub fn add_lease(&self, namespace: &str, name: &str) {
        let mut cluster = self.cluster.lock().unwrap();
        let version = cluster.next_version();
        cluster.leases.insert(
            (namespace.into(), name.into()),
            json!({
                "kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": version,
                             "uid": "7a1d2c3e-2222-4000-8000-000000000000",
                             "creationTimestamp": "2026-11-20T09:12:44Z"},
                "spec": {}
            }),
        );
    }

    /// Adds a running pod on `node` with one container `container` running `image`, whose
    /// container id is `container_id` (containerd's), as the API server shows it.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        container: &str,
        image: &str,
        container_id: &str,
    ) {
        let mut cluster = self.cluster.lock().unwrap();
        let version = cluster.next_version();
        let uid = format!("5b1c0f7e-3333-4000-8000-{:012}", cluster.resource_version);
        cluster.pods.push(json!({
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": version,
                         "creationTimestamp": "2026-12-07T09:12:44Z", "labels": {"app": container}},
            "spec": {"nodeName": node, "containers": [{"name": container, "image": image, "resources": {}}],
                     "restartPolicy": "Always", "schedulerName": "default-scheduler"},
            "status": {"phase": "Running", "podIP": "10.42.1.17", "qosClass": "BestEffort",
                       "containerStatuses": [{"name": container, "ready": true, "restartCount": 0, "started": true,
                                              "image": format!("docker.io/{image}"), "imageID": format!("docker.io/{image}@sha256:00"),
                                              "containerID": format!("containerd://{container_id}"),
                                              "state": {"running": {"startedAt": "2026-12-07T09:12:50Z"}}}]}
        }));
    }

    /// Makes Lease requests hang (`true`) until set back: the API server stalls.
    pub fn stall_leases(&self, stalled: bool) {
        self.cluster.lock().unwrap().stalled = stalled;
    }

    /// A Lease as stored, if any.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.cluster
            .lock()
            .unwrap()
            .leases
            .get(&(namespace.into(), name.into()))
            .cloned()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.cluster.lock().unwrap().requests.clone()
    }

    /// Requests that changed something.
    pub fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        merge(&mut target, &json!({"c": ["x"]}));
        assert_eq!(target, json!({"a": "z", "c": ["x"]}));
    }
}
