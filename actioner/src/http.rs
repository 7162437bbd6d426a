//! The HTTP surface. Handlers authenticate, parse and hand decisions to the recorder; they
//! never run an action themselves. Reads (`/api/v1/state`, `/api/v1/actions`, `/metrics`)
//! come from the ledger's latest snapshot and never wait behind decisions.
//!
//! | method, path | auth |
//! |---|---|
//! | `GET /`, `/healthz`, `/metrics` | none |
//! | `POST /api/v1/alerts` (Alertmanager webhook v4) | bearer or Basic |
//! | `POST /api/v1/wake` | the relay key in the body, or bearer/Basic; rate-limited per client |
//! | `POST /api/v1/buttons/{token}` (notification buttons) | the token's signature |
//! | `GET /api/v1/actions?limit=N&before=SEQ`, `POST /api/v1/actions/{action}` | bearer or Basic |
//! | `GET /api/v1/state`, `POST /api/v1/pause`, `POST /api/v1/resume` | bearer or Basic |

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::actions::RawWake;
use crate::actions::notify::buttons::{ButtonError, Buttons};
use crate::actions::wake::RelayDestinations;
use crate::alert::parse_payload;
use crate::auth::Auth;
use crate::ledger::RECENT_CAPACITY;
use crate::metrics::{CodeLabel, Metrics};
use crate::planner::{ManualRequest, Outcome};
use crate::policy::{Once, Request as RunRequest};
use crate::recorder::{RecordError, Recorder, Refusal};
use crate::throttle::Throttle;
use crate::vocab::{ActionKind, MacAddress, Origin, Reason};

/// Longest a webhook waits for its decision to be on disk.
const DECISION_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a manual trigger waits for its action to end before answering 202.
const MANUAL_WAIT: Duration = Duration::from_secs(60);
/// Longest a button press waits: the ntfy app gives up on a request after 15 s, and would
/// report a failure for an action that runs on.
const BUTTON_WAIT: Duration = Duration::from_secs(10);

/// The wake relay's own gate: where it may send, how often each client may ask.
#[derive(Debug)]
pub struct RelayGate {
    /// Where explicit MACs may be woken.
    pub destinations: RelayDestinations,
    /// Requests per client and in all.
    pub throttle: Throttle,
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    metrics: Metrics,
    recorder: Recorder,
    auth: Arc<Auth>,
    max_body_bytes: usize,
    buttons: Option<Arc<Buttons>>,
    relay: Arc<RelayGate>,
    last_len: Arc<AtomicUsize>,
    /// `exporter_url` names `{node}` and one pair serves the cluster: failback takes a
    /// `"node"` (with a pair per node, its `"target"` is the node).
    per_node: bool,
}

impl AppState {
    /// Serves `metrics`, decides through `recorder`, admits who `auth` allows.
    pub fn new(
        metrics: Metrics,
        recorder: Recorder,
        auth: Auth,
        max_body_bytes: usize,
        relay: RelayGate,
    ) -> Self {
        Self {
            metrics,
            recorder,
            auth: Arc::new(auth),
            max_body_bytes,
            buttons: None,
            relay: Arc::new(relay),
            last_len: Arc::new(AtomicUsize::new(4096)),
            per_node: false,
        }
    }

    /// Takes a failback's `"node"`: `exporter_url` names `{node}`.
    pub fn with_per_node(mut self, per_node: bool) -> Self {
        self.per_node = per_node;
        self
    }

    /// Answers the notification buttons `buttons` signs.
    pub fn with_buttons(mut self, buttons: Option<Arc<Buttons>>) -> Self {
        self.buttons = buttons;
        self
    }
}

/// An API error: a status and a message for the client; server faults are logged once here.
#[derive(Debug)]
pub enum ApiError {
    /// 400.
    BadRequest(String),
    /// 401, with a `WWW-Authenticate` challenge.
    Unauthorized,
    /// 403.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 415.
    UnsupportedMediaType,
    /// 429, with `Retry-After`.
    TooManyRequests(Duration),
    /// 500.
    Internal(String),
    /// 503.
    Unavailable(String),
}

impl From<RecordError> for ApiError {
    fn from(err: RecordError) -> Self {
        match err {
            RecordError::Journal(_) => ApiError::Internal(err.to_string()),
            RecordError::Overloaded | RecordError::Stopped => {
                ApiError::Unavailable(err.to_string())
            }
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(err: Refusal) -> Self {
        match err {
            Refusal::Policy(skip) => match skip.reason() {
                Reason::NotAllowlisted | Reason::NoTarget => ApiError::BadRequest(skip.to_string()),
                _ => ApiError::Conflict(skip.to_string()),
            },
            Refusal::Record(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized => {
                let body = axum::Json(serde_json::json!({"error": "unauthorized"}));
                return (
                    StatusCode::UNAUTHORIZED,
                    [(
                        header::WWW_AUTHENTICATE,
                        "Bearer, Basic realm=\"aistack-actioner\"",
                    )],
                    body,
                )
                    .into_response();
            }
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type: application/json".to_owned(),
            ),
            ApiError::TooManyRequests(wait) => {
                let secs = wait.as_secs().max(1);
                let body = axum::Json(serde_json::json!({
                    "error": format!("too many wake requests; try again in {secs}s")
                }));
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, HeaderValue::from(secs))],
                    body,
                )
                    .into_response();
            }
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, m)
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "request refused");
                (StatusCode::SERVICE_UNAVAILABLE, m)
            }
        };
        (status, axum::Json(serde_json::json!({"error": message}))).into_response()
    }
}

/// The actioner's router.
pub fn app(state: AppState) -> Router {
    let authenticated = middleware::from_fn_with_state(state.clone(), require_auth);
    let api = Router::new()
        .route("/api/v1/actions", get(list_actions))
        .route("/api/v1/actions/{action}", post(trigger))
        .route("/api/v1/state", get(show_state))
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route_layer(authenticated.clone())
        .layer(RequestBodyLimitLayer::new(64 * 1024));
    let alerts = Router::new()
        .route("/api/v1/alerts", post(receive_alerts))
        .route_layer(authenticated)
        .layer(RequestBodyLimitLayer::new(state.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_webhooks,
        ));
    let relay = Router::new()
        .route("/api/v1/wake", post(wake_relay))
        .layer(RequestBodyLimitLayer::new(64 * 1024))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            throttle_relay,
        ));
    let buttons = Router::new()
        .route("/api/v1/buttons/{token}", post(press_button))
        .layer(RequestBodyLimitLayer::new(64 * 1024));
    Router::new()
        .route("/", get(landing))
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(api)
        .merge(alerts)
        .merge(relay)
        .merge(buttons)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(90),
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The span of a request, as tower-http's default but with button tokens left out of the path:
/// they are credentials.
fn request_span(request: &Request) -> tracing::Span {
    let path = request.uri().path();
    let path = match path.find(BUTTONS_PATH) {
        Some(at) => &path[..at + BUTTONS_PATH.len()],
        None => path,
    };
    tracing::debug_span!("request", method = %request.method(), path, version = ?request.version())
}

const BUTTONS_PATH: &str = "/api/v1/buttons/";

/// The relay's budget per client, charged before the body is read: a client that floods the
/// relay is answered 429 without costing a body read, a key check or a journal line.
async fn throttle_relay(
    State(state): State<AppState>,
    ClientAddress(client): ClientAddress,
    request: Request,
    next: Next,
) -> Response {
    match state.relay.throttle.admit_client(client, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            state.metrics.relay_refused("rate_limited");
            ApiError::TooManyRequests(wait).into_response()
        }
    }
}

async fn require_auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.auth.allows(request.headers()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Counts every webhook answer by code, refusals by the body limit and auth included.
async fn count_webhooks(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state
        .metrics
        .webhooks
        .get_or_create(&CodeLabel {
            code: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// `200 ok` while decisions can be made and journaled; `503` with what stops them (the
/// journal cannot be written, the recorder or the executor stopped).
async fn healthz(State(state): State<AppState>) -> Response {
    match state.recorder.health() {
        Ok(()) => "ok".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

async fn receive_alerts(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let payload = parse_payload(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let receipt = tokio::time::timeout(DECISION_TIMEOUT, state.recorder.webhook(payload))
        .await
        .map_err(|_| ApiError::Unavailable("timed out waiting for the journal".into()))??;
    Ok(axum::Json(serde_json::json!({"status": "ok", "received": receipt.received, "planned": receipt.planned})).into_response())
}

/// The client's address, where the server knows it (not through `oneshot` in tests).
#[derive(Debug, Clone, Copy)]
struct ClientAddress(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_canonical()),
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeRequest {
    target: Option<String>,
    mac: Option<String>,
    broadcast: Option<IpAddr>,
    port: Option<u16>,
    key: Option<String>,
}

async fn wake_relay(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: WakeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed wake request: {e}")))?;
    let by_token = state.auth.allows(&headers);
    let by_key = request
        .key
        .as_deref()
        .is_some_and(|k| state.auth.wake_key_matches(k));
    if !by_key && !by_token {
        return Err(ApiError::Forbidden("wrong or missing key".into()));
    }
    // The budget all key holders share; the bearer token's holders (Alertmanager, an admin)
    // are not held to it.
    if !by_token && let Err(wait) = state.relay.throttle.admit_total(Instant::now()) {
        state.metrics.relay_refused("rate_limited");
        return Err(ApiError::TooManyRequests(wait));
    }
    let run = |target, raw_wake: Option<RawWake>| ManualRequest {
        request: RunRequest {
            action: ActionKind::Wake,
            target,
            dry_run: false,
            origin: Origin::Relay,
            once: None,
        },
        raw_wake,
        force: false,
        node: None,
    };
    let manual = match (&request.target, &request.mac) {
        (Some(target), None) => run(Some(target.clone()), None),
        (None, Some(mac)) => {
            let mac: MacAddress = mac
                .parse()
                .map_err(|e: crate::vocab::InvalidMac| ApiError::BadRequest(e.to_string()))?;
            let broadcast = request
                .broadcast
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::BROADCAST));
            let port = request.port.unwrap_or(9);
            if let Err(why) = state.relay.destinations.check(broadcast, port) {
                state.metrics.relay_refused("destination");
                return Err(ApiError::BadRequest(why));
            }
            let raw = RawWake {
                mac,
                broadcast,
                port,
                secureon: None,
            };
            run(None, Some(raw))
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either \"target\" or \"mac\"".into(),
            ));
        }
    };
    let outcome = state.recorder.manual(manual).await?;
    match tokio::time::timeout(MANUAL_WAIT, outcome).await {
        Ok(Ok(Outcome::Succeeded(_) | Outcome::DryRun(_))) => {
            Ok(axum::Json(serde_json::json!({"status": "ok"})).into_response())
        }
        Ok(Ok(Outcome::Failed(why) | Outcome::Skipped(why))) => {
            Err(ApiError::Internal(format!("wake failed: {why}")))
        }
        Ok(Err(_)) | Err(_) => Err(ApiError::Internal("wake did not finish".into())),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerRequest {
    target: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// Failback only: skip the GPU check.
    #[serde(default)]
    force: bool,
    /// The node the run is about, where `exporter_url` names `{node}`.
    node: Option<String>,
}

async fn trigger(
    State(state): State<AppState>,
    Path(action): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let kind = ActionKind::from_name(&action)
        .ok_or_else(|| ApiError::NotFound(format!("unknown action {action:?}")))?;
    let request: TriggerRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TriggerRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("malformed request: {e}")))?
    };
    if request.force && kind != ActionKind::Failback {
        return Err(ApiError::BadRequest(
            "\"force\" is for failback only: it skips the check that the GPU is free".into(),
        ));
    }
    if let Some(node) = &request.node {
        let why = if kind != ActionKind::Failback {
            Some("\"node\" is for failback only: it names the node whose GPU is re-checked")
        } else if !state.per_node {
            Some(
                "\"node\" needs {node} in exporter_url and one pair for the cluster: without {node} the one exporter is asked; with actions.failover.nodes, \"target\" names the node",
            )
        } else if !crate::exporter::valid_node(node) {
            Some("\"node\" must be a host name or an IP address")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ApiError::BadRequest(why.into()));
        }
    }
    let outcome = state
        .recorder
        .manual(ManualRequest {
            request: RunRequest {
                action: kind,
                target: request.target,
                dry_run: request.dry_run,
                origin: Origin::Api,
                once: None,
            },
            raw_wake: None,
            force: request.force,
            node: request.node,
        })
        .await?;
    answer_outcome(outcome, MANUAL_WAIT, |_| StatusCode::OK).await
}

/// The run's outcome as JSON, with the status `status_of` gives it, once it ends; 202
/// `running` if it has not ended within `wait` (it runs on).
async fn answer_outcome(
    outcome: oneshot::Receiver<Outcome>,
    wait: Duration,
    status_of: fn(&Outcome) -> StatusCode,
) -> Result<Response, ApiError> {
    match tokio::time::timeout(wait, outcome).await {
        Ok(Ok(outcome)) => Ok((status_of(&outcome), axum::Json(outcome)).into_response()),
        Ok(Err(_)) => Err(ApiError::Internal(
            "the action ended without a result".into(),
        )),
        Err(_) => Ok((
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"status": "running"})),
        )
            .into_response()),
    }
}

/// A notification button: the token is the authorisation (signed, unexpired), the press runs
/// through the manual trigger's safety path once. 200 when the action succeeded (or dry run),
/// 202 when it still runs after 10 s, 409 when it was skipped, refused (paused, cooldown,
/// resolved) or pressed before, 502 when it failed.
async fn press_button(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let buttons = state
        .buttons
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("buttons are not configured".into()))?;
    let press = buttons
        .verify(&token, SystemTime::now())
        .map_err(|err: ButtonError| ApiError::Forbidden(err.to_string()))?;
    let outcome = state
        .recorder
        .manual(ManualRequest {
            request: RunRequest {
                action: press.action,
                target: press.target,
                dry_run: false,
                origin: Origin::Button,
                once: Some(Once {
                    key: press.key,
                    firing: press.firing,
                }),
            },
            raw_wake: None,
            force: false,
            node: press.node,
        })
        .await?;
    answer_outcome(outcome, BUTTON_WAIT, |outcome| match outcome {
        Outcome::Succeeded(_) | Outcome::DryRun(_) => StatusCode::OK,
        Outcome::Skipped(_) => StatusCode::CONFLICT,
        Outcome::Failed(_) => StatusCode::BAD_GATEWAY,
    })
    .await
}

#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<usize>,
    /// Only entries with a smaller `seq`: the next page after one ending at `before`.
    before: Option<u64>,
}

/// The journal tail, newest first: at most `limit` (default 50, at most 1000) entries, older
/// than `before` when given. It pages through the entries kept in memory (the newest 1000).
async fn list_actions(
    State(state): State<AppState>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let limit = page.limit.unwrap_or(50).clamp(1, RECENT_CAPACITY);
    let snapshot = state.recorder.snapshot();
    let entries: Vec<_> = snapshot
        .recent
        .iter()
        .rev()
        .filter(|e| page.before.is_none_or(|before| e.seq < before))
        .take(limit)
        .map(|e| &**e)
        .collect();
    Ok(axum::Json(entries).into_response())
}

/// `GET /api/v1/state`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateView {
    /// `primary` or `fallback`.
    pub inference_backend: &'static str,
    /// When it became so (RFC 3339), if ever.
    pub since: Option<String>,
    /// Whether automatic actions are paused.
    pub paused: bool,
    /// Seconds left per `rule/target` in cooldown.
    pub cooldowns: HashMap<String, u64>,
    /// Where each GPU node has its own pair: each node's backend (`inference_backend` is then
    /// `fallback` while any node is on its fallback).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodeState>,
}

/// One GPU node's pair in `GET /api/v1/state`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeState {
    /// `primary` or `fallback`.
    pub inference_backend: &'static str,
    /// When it became so (RFC 3339), if ever.
    pub since: Option<String>,
}

async fn show_state(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = state.recorder.snapshot();
    let now = SystemTime::now();
    let view = StateView {
        inference_backend: snapshot.backend.as_str(),
        since: snapshot.backend_since.map(|t| t.to_string()),
        paused: snapshot.paused,
        cooldowns: snapshot
            .cooldowns
            .iter()
            .filter_map(|(key, until)| {
                let left = until.duration_since(now).ok()?;
                Some((key.clone(), left.as_secs().max(1)))
            })
            .collect(),
        nodes: snapshot
            .node_backends
            .iter()
            .map(|(node, backend, since)| {
                let state = NodeState {
                    inference_backend: backend.as_str(),
                    since: since.map(|t| t.to_string()),
                };
                (node.clone(), state)
            })
            .collect(),
    };
    Ok(axum::Json(view).into_response())
}

async fn pause(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.recorder.set_paused(true).await?;
    Ok(axum::Json(serde_json::json!({"paused": true})).into_response())
}

async fn resume(State(state): State<AppState>) -> Result<Response, ApiError> {
    state.recorder.set_paused(false).await?;
    Ok(axum::Json(serde_json::json!({"paused": false})).into_response())
}

async fn landing() -> Html<String> {
    Html(aistack_common::server::landing_page(
        "aistack-actioner",
        &[
            ("/metrics", "metrics"),
            ("/healthz", "health check"),
            ("/api/v1/state", "state (authenticated)"),
            ("/api/v1/actions", "journal tail (authenticated)"),
        ],
    ))
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    aistack_common::http::metrics_response(&state.metrics.registry, &headers, &state.last_len)
}
