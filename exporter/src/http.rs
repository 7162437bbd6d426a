//! The HTTP surface: `/` (landing page), `/healthz`, and the telemetry path (`/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tower_http::timeout::TimeoutLayer;

use crate::collectors::Latest;
use crate::collectors::idle::IdleSample;
use tower_http::trace::TraceLayer;

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    registry: Arc<Registry>,
    telemetry_path: Arc<str>,
    /// Size of the last response, to allocate the next one in one go.
    last_len: Arc<AtomicUsize>,
    /// The idle engine's verdicts, when the idle collector runs.
    idle: Option<Latest<IdleSample>>,
}

impl AppState {
    /// Serves `registry` at `telemetry_path`.
    pub fn new(registry: Arc<Registry>, telemetry_path: &str) -> Self {
        Self {
            registry,
            telemetry_path: telemetry_path.into(),
            last_len: Arc::new(AtomicUsize::new(4096)),
            idle: None,
        }
    }

    /// Serves the idle engine's verdicts at `/api/v1/idle`.
    pub fn with_idle(mut self, idle: Option<Latest<IdleSample>>) -> Self {
        self.idle = idle;
        self
    }
}

/// The exporter's router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/healthz", get(healthz))
        .route("/api/v1/idle", get(idle))
        .route(&state.telemetry_path, get(metrics))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(10),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn landing(State(state): State<AppState>) -> Html<String> {
    Html(aistack_common::server::landing_page(
        "aistack-exporter",
        &[
            (&state.telemetry_path, "metrics"),
            ("/healthz", "health check"),
            ("/api/v1/idle", "idle engine (JSON)"),
        ],
    ))
}

async fn healthz() -> &'static str {
    "ok"
}

/// `GET /api/v1/idle`: the idle engine's latest verdict as JSON (what the actioner re-checks
/// before suspending).
async fn idle(State(state): State<AppState>) -> Response {
    let Some(idle) = &state.idle else {
        let error = serde_json::json!({"error": "the idle collector is disabled"});
        return (StatusCode::NOT_FOUND, Json(error)).into_response();
    };
    let sample = idle.borrow().sample.clone();
    match sample {
        Some(sample) => Json(sample.report()).into_response(),
        None => {
            let error = serde_json::json!({"error": "no verdict yet"});
            (StatusCode::SERVICE_UNAVAILABLE, Json(error)).into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = String::with_capacity(state.last_len.load(Ordering::Relaxed) + 512);
    if let Err(err) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        tracing::error!(%err, "encoding metrics failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response();
    }
    state.last_len.store(body.len(), Ordering::Relaxed);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::metrics::ExporterMetrics;

    async fn get(router: Router, path: &str) -> (StatusCode, String, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn router(path: &str) -> Router {
        app(AppState::new(
            ExporterMetrics::new(vec![]).into_registry(),
            path,
        ))
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_with_build_info() {
        let (status, content_type, body) = get(router("/metrics"), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(
            body.contains("# TYPE aistack_exporter_build_info gauge\n"),
            "{body}"
        );
        assert!(
            body.contains("aistack_exporter_build_info{version=\""),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn healthz_landing_and_custom_telemetry_path() {
        let (status, _, body) = get(router("/custom"), "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        let (status, _, body) = get(router("/custom"), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<a href=\"/custom\">"), "{body}");
        let (status, _, _) = get(router("/custom"), "/metrics").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, body) = get(router("/custom"), "/custom").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("aistack_exporter_build_info"));
    }
}
