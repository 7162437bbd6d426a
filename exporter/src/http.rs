//! The HTTP surface: `/` (landing page), `/healthz`, the telemetry path (`/metrics`), and the
//! JSON API the actioner re-checks at action time: `/api/v1/idle` (the idle engine's verdict)
//! and `/api/v1/gpu` (host workload on the GPUs).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, SystemTime};

use aistack_common::api::{GPU_PATH, IDLE_PATH};
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::collectors::gpu::{self, GpuSample};
use crate::collectors::idle::IdleSample;
use crate::collectors::{CollectorKind, Latest};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    registry: Arc<Registry>,
    telemetry_path: Arc<str>,
    /// Size of the last response, to allocate the next one in one go.
    last_len: Arc<AtomicUsize>,
    /// The idle engine's verdicts, when the idle collector runs.
    idle: Option<Latest<IdleSample>>,
    /// The GPU samples, when the gpu collector runs.
    gpu: Option<Latest<GpuSample>>,
    /// How often the gpu collector samples (the age a sample may have and still count).
    gpu_interval: std::time::Duration,
}

impl AppState {
    /// Serves `registry` at `telemetry_path`.
    pub fn new(registry: Arc<Registry>, telemetry_path: &str) -> Self {
        Self {
            registry,
            telemetry_path: telemetry_path.into(),
            last_len: Arc::new(AtomicUsize::new(4096)),
            idle: None,
            gpu: None,
            gpu_interval: crate::collectors::CollectorKind::Gpu.default_interval(),
        }
    }

    /// Serves the idle engine's verdicts at `/api/v1/idle`.
    pub fn with_idle(mut self, idle: Option<Latest<IdleSample>>) -> Self {
        self.idle = idle;
        self
    }

    /// Serves the GPUs' host-workload state at `/api/v1/gpu`.
    pub fn with_gpu(mut self, gpu: Option<Latest<GpuSample>>) -> Self {
        self.gpu = gpu;
        self
    }

    /// The gpu collector's sampling interval, which `/api/v1/gpu` reports.
    pub fn with_gpu_interval(mut self, interval: std::time::Duration) -> Self {
        self.gpu_interval = interval;
        self
    }
}

/// Why the JSON API has no answer: the client's to act on, so never logged.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    /// The collector behind the endpoint does not run (404).
    #[error("the {0} collector is disabled")]
    Disabled(CollectorKind),
    /// The collector has not produced its first answer (503: ask again).
    #[error("no verdict yet")]
    NotYet,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            Self::Disabled(_) => StatusCode::NOT_FOUND,
            Self::NotYet => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, Json(serde_json::json!({"error": self.to_string()}))).into_response()
    }
}

/// The exporter's router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(landing))
        .route("/healthz", get(healthz))
        .route(IDLE_PATH, get(idle))
        .route(GPU_PATH, get(gpu))
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
            (IDLE_PATH, "idle engine (JSON)"),
            (GPU_PATH, "GPU host workload (JSON)"),
        ],
    ))
}

async fn healthz() -> &'static str {
    "ok"
}

/// `GET /api/v1/idle`: the idle engine's latest verdict (what the actioner re-checks before
/// suspending).
async fn idle(State(state): State<AppState>) -> Result<Response, ApiError> {
    let idle = state
        .idle
        .as_ref()
        .ok_or(ApiError::Disabled(CollectorKind::Idle))?;
    let sample = idle.borrow().sample.clone().ok_or(ApiError::NotYet)?;
    Ok(Json(sample.report()).into_response())
}

/// `GET /api/v1/gpu`: what the gpu collector last saw (what the actioner re-checks before
/// failing back to the primary inference service).
async fn gpu(State(state): State<AppState>) -> Result<Response, ApiError> {
    let latest = state
        .gpu
        .as_ref()
        .ok_or(ApiError::Disabled(CollectorKind::Gpu))?;
    let report = gpu::report(&latest.borrow(), SystemTime::now(), state.gpu_interval);
    Ok(Json(report).into_response())
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    aistack_common::http::metrics_response(&state.registry, &headers, &state.last_len)
}

#[cfg(test)]
mod tests {
    use aistack_common::api::{GpuReport, IdleReport, IdleState};
    use aistack_common::http::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
    use axum::body::Body;
    use axum::http::{Request, header};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::collectors::gpu::{DeviceReading, GpuDevice, GpuProcess, ProcessKind};
    use crate::collectors::{Snapshot, Status, channel};
    use crate::idle::{Gate, GateKind, Verdict};
    use crate::metrics::ExporterMetrics;

    async fn get(router: Router, path: &str) -> (StatusCode, String, String) {
        get_accepting(router, path, "*/*").await
    }

    async fn get_accepting(
        router: Router,
        path: &str,
        accept: &str,
    ) -> (StatusCode, String, String) {
        let request = Request::get(path).header(header::ACCEPT, accept);
        let response = router
            .oneshot(request.body(Body::empty()).unwrap())
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

    fn state(path: &str) -> AppState {
        AppState::new(ExporterMetrics::new(vec![]).into_registry(), path)
    }

    fn router(path: &str) -> Router {
        app(state(path))
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_when_asked_with_build_info() {
        let accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3";
        let (status, content_type, body) =
            get_accepting(router("/metrics"), "/metrics", accept).await;
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

        let (status, content_type, body) = get(router("/metrics"), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, TEXT_CONTENT_TYPE);
        assert!(body.contains("aistack_exporter_build_info{version=\""));
        assert!(!body.contains("# EOF"), "{body}");
    }

    #[tokio::test]
    async fn healthz_landing_and_custom_telemetry_path() {
        let (status, _, body) = get(router("/custom"), "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        let (status, _, body) = get(router("/custom"), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("<a href=\"/custom\">"), "{body}");
        assert!(body.contains("<a href=\"/api/v1/gpu\">"), "{body}");
        let (status, _, _) = get(router("/custom"), "/metrics").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, body) = get(router("/custom"), "/custom").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("aistack_exporter_build_info"));
        // A colon inside a segment is literal (the flag refuses one that starts a segment).
        let (status, _, _) = get(router("/prom/metrics:v1"), "/prom/metrics:v1").await;
        assert_eq!(status, StatusCode::OK);
    }

    fn ran(success: bool, last_success: Option<SystemTime>) -> Option<Status> {
        Some(Status {
            success,
            duration: Duration::from_millis(3),
            last_success,
        })
    }

    #[tokio::test]
    async fn the_idle_api_answers_the_shared_report() {
        let (status, content_type, body) = get(router("/metrics"), IDLE_PATH).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(body, r#"{"error":"the idle collector is disabled"}"#);

        let (tx, rx) = channel();
        let router = || app(state("/metrics").with_idle(Some(rx.clone())));
        let (status, _, body) = get(router(), IDLE_PATH).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, r#"{"error":"no verdict yet"}"#);

        tx.send_replace(Snapshot {
            sample: Some(Arc::new(IdleSample {
                verdict: Verdict {
                    state: IdleState::Idle,
                    idle_for: Duration::from_secs(1900),
                    threshold: Duration::from_secs(1800),
                    cpu_idle_pct: Some(98.234),
                    gpu_idle_pct: Some(100.0),
                    suspend_ready: false,
                    gates: vec![Gate {
                        kind: GateKind::Inhibitor,
                        detail: "inhibitor: Steam (Downloading)".into(),
                    }],
                    resumed: false,
                },
                suspended: Duration::ZERO,
            })),
            status: ran(true, Some(SystemTime::now())),
        });
        let (status, content_type, body) = get(router(), IDLE_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(
            body,
            r#"{"state":"idle","idle_for_s":1900,"threshold_s":1800,"cpu_idle_pct":98.2,"gpu_idle_pct":100.0,"suspend_ready":false,"gating_reasons":["inhibitor: Steam (Downloading)"]}"#
        );
        let report: IdleReport = serde_json::from_str(&body).unwrap();
        assert_eq!(
            report.not_ready_because().as_deref(),
            Some("inhibitor: Steam (Downloading)")
        );

        // No CPU reading yet and NVML down: unknown is null, not "100 % busy" (0.1.0 said 0.0).
        tx.send_modify(|s| {
            let mut sample = (**s.sample.as_ref().unwrap()).clone();
            sample.verdict.cpu_idle_pct = None;
            sample.verdict.gpu_idle_pct = None;
            s.sample = Some(Arc::new(sample));
        });
        let (_, _, body) = get(router(), IDLE_PATH).await;
        assert!(
            body.contains(r#""cpu_idle_pct":null,"gpu_idle_pct":null"#),
            "{body}"
        );
        let report: IdleReport = serde_json::from_str(&body).unwrap();
        assert_eq!((report.cpu_idle_pct, report.gpu_idle_pct), (None, None));
    }

    fn process(pid: u32, name: &str, service: &str, host_workload: bool) -> GpuProcess {
        GpuProcess {
            pid,
            kind: ProcessKind::Graphics,
            memory_bytes: Some(1 << 30),
            process: name.into(),
            container: String::new(),
            service: service.into(),
            host_workload,
            namespace: String::new(),
            pod: String::new(),
        }
    }

    fn device(index: u32, processes: Vec<GpuProcess>) -> GpuDevice {
        GpuDevice {
            reading: DeviceReading {
                index,
                name: "NVIDIA GeForce RTX 4090".into(),
                uuid: format!("GPU-{index}"),
                ..DeviceReading::default()
            },
            processes,
        }
    }

    async fn gpu_report(router: Router) -> GpuReport {
        let (status, content_type, body) = get(router, GPU_PATH).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    #[tokio::test]
    async fn the_gpu_api_says_what_nvml_up_says_and_who_holds_the_gpus() {
        let (status, content_type, body) = get(router("/metrics"), GPU_PATH).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(body, r#"{"error":"the gpu collector is disabled"}"#);

        let (tx, rx) = channel();
        let router = || app(state("/metrics").with_gpu(Some(rx.clone())));
        // Before the first sample: NVML is not known to answer, there is no age and no GPU.
        let report = gpu_report(router()).await;
        assert_eq!(
            report,
            GpuReport {
                nvml_up: false,
                sample_age_s: None,
                interval_s: Some(1.0),
                gpus: vec![]
            }
        );

        let sampled_at = SystemTime::now() - Duration::from_secs(2);
        let game = process(4242, "Cyberpunk2077.e", "", true);
        let sample = GpuSample {
            devices: vec![
                device(0, vec![process(900, "ollama", "ollama", false)]),
                device(
                    1,
                    vec![
                        process(900, "ollama", "ollama", false),
                        game.clone(),
                        process(4243, "Cyberpunk2077.e", "", true),
                        process(4250, "gamescope", "", true),
                    ],
                ),
            ],
            ..GpuSample::default()
        };
        tx.send_replace(Snapshot {
            sample: Some(Arc::new(sample)),
            status: ran(true, Some(sampled_at)),
        });
        let report = gpu_report(router()).await;
        assert!(report.nvml_up);
        let age = report.sample_age_s.unwrap();
        assert!((2.0..10.0).contains(&age), "{age}");
        assert_eq!(report.gpus.len(), 2);
        assert_eq!(
            (report.gpus[0].gpu, report.gpus[0].uuid.as_str()),
            (0, "GPU-0")
        );
        assert_eq!(report.gpus[0].name, "NVIDIA GeForce RTX 4090");
        assert!(!report.gpus[0].host_workload_active);
        assert!(report.gpus[0].host_workload_processes.is_empty());
        assert!(report.gpus[1].host_workload_active);
        assert_eq!(
            report.gpus[1].host_workload_processes,
            ["Cyberpunk2077.e", "gamescope"],
            "each name once, in NVML's order"
        );
        assert_eq!(
            report.confirm_free().unwrap_err(),
            "host workload still holds GPU 1 (Cyberpunk2077.e, gamescope)"
        );

        // The game quits: positive evidence that the GPUs are free.
        tx.send_modify(|s| {
            let mut sample = (**s.sample.as_ref().unwrap()).clone();
            sample.devices[1].processes.retain(|p| !p.host_workload);
            s.sample = Some(Arc::new(sample));
        });
        assert_eq!(gpu_report(router()).await.confirm_free(), Ok(()));

        // The next sample fails (NVML went away): down, no GPUs, the age of the last success.
        tx.send_replace(Snapshot {
            sample: None,
            status: ran(false, Some(sampled_at)),
        });
        let report = gpu_report(router()).await;
        assert!(!report.nvml_up);
        assert!(report.gpus.is_empty());
        assert!(report.sample_age_s.is_some_and(|age| age >= 2.0));
        assert!(report.confirm_free().is_err());
    }
}
