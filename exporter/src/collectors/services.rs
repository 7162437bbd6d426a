//! `services`: probes the inference services next to the GPUs over HTTP, each on its own with
//! a timeout, concurrently, so a slow or hung service delays neither a scrape nor another
//! probe.
//!
//! | kind | probe (up when) | more |
//! |---|---|---|
//! | vllm | `GET /health` answers 2xx | `GET /v1/models`: served models |
//! | ollama | `GET /api/version` answers 2xx with `{"version": ...}` | `/api/tags` models and sizes, `/api/ps` loaded models and their VRAM |
//! | openwebui | `GET /health` answers 2xx with `{"status": true}` | |
//! | localai | `GET /readyz` answers 2xx | `GET /v1/models`: models |
//! | http | `GET <url>` answers 2xx | |
//!
//! Services come from `services:` in the config, plus — when `discovery.docker` is on and the
//! docker collector runs — containers of known inference images, probed on the host port they
//! publish.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use serde::Deserialize;

use super::docker::DockerSample;
use super::{Collector, CollectorError, EncodeSample, Latest};
use crate::config::{ServiceConfig, ServiceKind};
use crate::metrics::gauge_family;

/// Largest response body a probe reads; a larger one fails the probe.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// `discovery:` in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Probe containers of known inference images (vllm/vllm-openai, ollama/ollama,
    /// open-webui, localai) without config (default true; needs the docker collector).
    pub docker: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self { docker: true }
    }
}

impl ServiceKind {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Vllm => "vllm",
            Self::Ollama => "ollama",
            Self::Openwebui => "openwebui",
            Self::Localai => "localai",
            Self::Http => "http",
        }
    }
}

/// The kind and in-container port of a known inference image, by image name.
pub fn known_image(image: &str) -> Option<(ServiceKind, u16)> {
    // Registry host and tag do not matter: ghcr.io/open-webui/open-webui:main, ollama/ollama:0.5.
    let repository = image.split('@').next()?;
    let repository = match repository.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => repository,
    };
    let path = repository.to_ascii_lowercase();
    let ends = |suffix: &str| path == suffix || path.ends_with(&format!("/{suffix}"));
    if ends("vllm/vllm-openai") || ends("vllm-openai") {
        Some((ServiceKind::Vllm, 8000))
    } else if ends("ollama/ollama") {
        Some((ServiceKind::Ollama, 11434))
    } else if ends("open-webui/open-webui") {
        Some((ServiceKind::Openwebui, 8080))
    } else if ends("localai/localai") || ends("go-skynet/local-ai") || ends("mudler/localai") {
        Some((ServiceKind::Localai, 8080))
    } else {
        None
    }
}

/// Services to probe for the running containers of known images that publish their port.
pub fn discover(docker: &DockerSample) -> Vec<ServiceConfig> {
    docker
        .containers
        .iter()
        .filter(|c| c.running)
        .filter_map(|c| {
            let (kind, port) = known_image(&c.image)?;
            let (_, public) = c
                .published_ports
                .iter()
                .find(|(private, _)| *private == port)?;
            Some(ServiceConfig {
                name: c.name.clone(),
                kind,
                url: format!("http://127.0.0.1:{public}"),
                container: Some(c.name.clone()),
                process: None,
            })
        })
        .collect()
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Its kind.
    pub kind: Option<ServiceKind>,
    /// Whether it answered as it should.
    pub up: bool,
    /// How long the probe took.
    pub duration: Duration,
    /// Why it is down, for the debug log.
    pub error: Option<String>,
    /// Models it serves (vLLM, LocalAI).
    pub models: Vec<String>,
    /// Ollama: models on disk and their size in bytes.
    pub model_sizes: BTreeMap<String, u64>,
    /// Ollama: loaded models and the VRAM they hold.
    pub loaded_vram: BTreeMap<String, u64>,
}

/// One `services` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServicesSample {
    /// Every service probed, configured and discovered.
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModelLabels {
    service: String,
    model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServedModelLabels {
    service: String,
    kind: &'static str,
    model: String,
}

impl ServiceStatus {
    fn labels(&self) -> ServiceLabels {
        ServiceLabels {
            service: self.name.clone(),
            kind: self.kind.map_or("http", ServiceKind::as_str),
        }
    }
}

impl EncodeSample for ServicesSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let services = &self.services;
        gauge_family(
            encoder,
            "service_up",
            "1 when the service answered its health probe as it should.",
            None,
            services
                .iter()
                .map(|s| (s.labels(), if s.up { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            encoder,
            "service_probe_duration",
            "How long the service's last probe took.",
            Some("seconds"),
            services
                .iter()
                .map(|s| (s.labels(), s.duration.as_secs_f64())),
        )?;
        gauge_family(
            encoder,
            "service_model_info",
            "A model the service serves (vLLM and LocalAI /v1/models); always 1.",
            None,
            services.iter().flat_map(|s| {
                s.models.iter().map(move |m| {
                    let labels = ServedModelLabels {
                        service: s.name.clone(),
                        kind: s.kind.map_or("http", ServiceKind::as_str),
                        model: m.clone(),
                    };
                    (labels, 1.0)
                })
            }),
        )?;
        let per_model = |f: fn(&ServiceStatus) -> &BTreeMap<String, u64>| {
            services
                .iter()
                .flat_map(move |s| {
                    f(s).iter().map(move |(model, bytes)| {
                        let labels = ModelLabels {
                            service: s.name.clone(),
                            model: model.clone(),
                        };
                        (labels, *bytes as f64)
                    })
                })
                .collect::<Vec<_>>()
        };
        gauge_family(
            encoder,
            "ollama_model_size",
            "Size on disk of a model Ollama has (/api/tags).",
            Some("bytes"),
            per_model(|s| &s.model_sizes),
        )?;
        gauge_family(
            encoder,
            "ollama_model_loaded_vram",
            "VRAM held by a model Ollama has loaded (/api/ps).",
            Some("bytes"),
            per_model(|s| &s.loaded_vram),
        )
    }
}

/// Why a request did not give a usable answer.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{}", describe(.0))]
    Http(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("response larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("unexpected response: {0}")]
    Content(String),
}

/// A reqwest error in words: what failed and why, without the URL (the log line has it).
fn describe(err: &reqwest::Error) -> String {
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_redirect() {
        "too many redirects"
    } else if err.is_connect() {
        "connection failed"
    } else if err.is_body() || err.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    let mut why = Vec::new();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        why.push(cause.to_string());
        source = cause.source();
    }
    if why.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", why.join(": "))
    }
}

/// GETs `url` and returns the body, at most [`MAX_BODY_BYTES`], for a 2xx answer.
async fn get(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, ProbeError> {
    let mut response = client.get(url).send().await?;
    let status = response.status();
    if !status.is_success() {
        return Err(ProbeError::Status(status.as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(ProbeError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ProbeError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, ProbeError> {
    let body = get(client, url).await?;
    serde_json::from_slice(&body).map_err(|e| ProbeError::Content(e.to_string()))
}

#[derive(Deserialize)]
struct OllamaVersion {
    version: String,
}

#[derive(Deserialize)]
struct OllamaModels {
    #[serde(default)]
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    size_vram: u64,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
}

#[derive(Deserialize)]
struct OpenWebUiHealth {
    status: bool,
}

fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// Probes one service: the health check decides `up`; the extras (models) only add detail.
async fn probe(
    client: &reqwest::Client,
    service: &ServiceConfig,
) -> Result<ServiceStatus, ProbeError> {
    let url = service.url.as_str();
    let mut status = ServiceStatus::default();
    match service.kind {
        ServiceKind::Vllm => {
            get(client, &join(url, "/health")).await?;
            if let Ok(list) = get_json::<ModelList>(client, &join(url, "/v1/models")).await {
                status.models = list.data.into_iter().map(|m| m.id).collect();
            }
        }
        ServiceKind::Ollama => {
            let version: OllamaVersion = get_json(client, &join(url, "/api/version")).await?;
            if version.version.is_empty() {
                return Err(ProbeError::Content("empty version".into()));
            }
            let (tags_url, ps_url) = (join(url, "/api/tags"), join(url, "/api/ps"));
            let (tags, ps) = tokio::join!(
                get_json::<OllamaModels>(client, &tags_url),
                get_json::<OllamaModels>(client, &ps_url),
            );
            if let Ok(tags) = tags {
                status.model_sizes = tags.models.into_iter().map(|m| (m.name, m.size)).collect();
            }
            if let Ok(ps) = ps {
                status.loaded_vram = ps
                    .models
                    .into_iter()
                    .map(|m| (m.name, m.size_vram))
                    .collect();
            }
        }
        ServiceKind::Openwebui => {
            let health: OpenWebUiHealth = get_json(client, &join(url, "/health")).await?;
            if !health.status {
                return Err(ProbeError::Content("status false".into()));
            }
        }
        ServiceKind::Localai => {
            get(client, &join(url, "/readyz")).await?;
            if let Ok(list) = get_json::<ModelList>(client, &join(url, "/v1/models")).await {
                status.models = list.data.into_iter().map(|m| m.id).collect();
            }
        }
        ServiceKind::Http => {
            get(client, url).await?;
        }
    }
    status.up = true;
    Ok(status)
}

/// Probes the configured (and discovered) services.
pub struct ServicesCollector {
    client: reqwest::Client,
    services: Vec<ServiceConfig>,
    probe_timeout: Duration,
    discovered_from: Option<Latest<DockerSample>>,
}

impl fmt::Debug for ServicesCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicesCollector")
            .field("services", &self.services.len())
            .field("probe_timeout", &self.probe_timeout)
            .field("discovery", &self.discovered_from.is_some())
            .finish()
    }
}

impl ServicesCollector {
    /// Probes `services`, each within `probe_timeout`.
    pub fn new(
        services: Vec<ServiceConfig>,
        probe_timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        aistack_common::install_tls_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("aistack-exporter/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(3))
            .connect_timeout(probe_timeout)
            .timeout(probe_timeout)
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            services,
            probe_timeout,
            discovered_from: None,
        })
    }

    /// Also probes containers of known inference images the docker collector sees.
    pub fn with_discovery(mut self, docker: Latest<DockerSample>) -> Self {
        self.discovered_from = Some(docker);
        self
    }

    /// Configured services, then discovered ones not already configured (same name or URL).
    fn targets(&self) -> Vec<ServiceConfig> {
        let mut targets = self.services.clone();
        let discovered = self
            .discovered_from
            .as_ref()
            .and_then(|d| d.borrow().sample.clone())
            .map(|sample| discover(&sample))
            .unwrap_or_default();
        for service in discovered {
            if !targets
                .iter()
                .any(|t| t.name == service.name || t.url == service.url)
            {
                targets.push(service);
            }
        }
        targets
    }
}

impl Collector for ServicesCollector {
    type Sample = ServicesSample;

    async fn sample(&mut self, _now: Instant) -> Result<ServicesSample, CollectorError> {
        let targets = self.targets();
        let (client, probe_timeout) = (&self.client, self.probe_timeout);
        let probes = targets.iter().map(|service| async move {
            let started = Instant::now();
            let result = tokio::time::timeout(probe_timeout, probe(client, service)).await;
            let mut status = match result {
                Ok(Ok(status)) => status,
                Ok(Err(err)) => ServiceStatus {
                    error: Some(err.to_string()),
                    ..ServiceStatus::default()
                },
                Err(_) => ServiceStatus {
                    error: Some(format!("timed out after {probe_timeout:?}")),
                    ..ServiceStatus::default()
                },
            };
            status.name = service.name.clone();
            status.kind = Some(service.kind);
            status.duration = started.elapsed();
            if let Some(error) = &status.error {
                tracing::debug!(collector = "services", service = %service.name, url = %service.url, %error, "service down");
            }
            status
        });
        Ok(ServicesSample {
            services: join_all(probes).await,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collectors::docker::{ContainerState, Health};

    #[test]
    fn known_images() {
        assert_eq!(
            known_image("vllm/vllm-openai:v0.6.4"),
            Some((ServiceKind::Vllm, 8000))
        );
        assert_eq!(
            known_image("docker.io/vllm/vllm-openai@sha256:abc"),
            Some((ServiceKind::Vllm, 8000))
        );
        assert_eq!(
            known_image("ollama/ollama"),
            Some((ServiceKind::Ollama, 11434))
        );
        assert_eq!(
            known_image("ghcr.io/open-webui/open-webui:main"),
            Some((ServiceKind::Openwebui, 8080))
        );
        assert_eq!(
            known_image("localai/localai:latest-gpu-nvidia-cuda-12"),
            Some((ServiceKind::Localai, 8080))
        );
        assert_eq!(
            known_image("quay.io/go-skynet/local-ai:v2"),
            Some((ServiceKind::Localai, 8080))
        );
        assert_eq!(
            known_image("localhost:5000/ollama/ollama:rocm"),
            Some((ServiceKind::Ollama, 11434))
        );
        assert_eq!(known_image("nginx:latest"), None);
        assert_eq!(known_image("myollama/ollama-proxy"), None);
    }

    fn container(name: &str, image: &str, running: bool, ports: &[(u16, u16)]) -> ContainerState {
        ContainerState {
            id: format!("{name}-id"),
            name: name.into(),
            image: image.into(),
            running,
            health: Health::None,
            restarts: Some(0),
            published_ports: ports.to_vec(),
        }
    }

    #[test]
    fn discovery_needs_a_running_container_publishing_the_service_port() {
        let docker = DockerSample {
            nvidia_runtime: true,
            containers: vec![
                container("ollama", "ollama/ollama:0.5.7", true, &[(11434, 11434)]),
                container("vllm", "vllm/vllm-openai:latest", true, &[(8000, 18000)]),
                container("webui", "ghcr.io/open-webui/open-webui:main", true, &[]),
                container(
                    "old-vllm",
                    "vllm/vllm-openai:latest",
                    false,
                    &[(8000, 8001)],
                ),
                container("nginx", "nginx", true, &[(80, 8080)]),
            ],
        };
        let found: Vec<(String, String)> = discover(&docker)
            .into_iter()
            .map(|s| (s.name, s.url))
            .collect();
        assert_eq!(
            found,
            [
                ("ollama".to_owned(), "http://127.0.0.1:11434".to_owned()),
                ("vllm".to_owned(), "http://127.0.0.1:18000".to_owned()),
            ]
        );
    }

    /// Serves captured payloads of real servers under per-service prefixes, plus servers that
    /// misbehave: hung, 5xx, redirecting, looping, huge, wrong content.
    async fn fake_servers() -> String {
        use axum::Router;
        use axum::http::{StatusCode, header};
        use axum::response::{IntoResponse, Redirect};
        use axum::routing::get;

        fn fixture(name: &str) -> String {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/services")
                .join(name);
            std::fs::read_to_string(path).unwrap()
        }
        let json = |name: &'static str| {
            move || async move { ([(header::CONTENT_TYPE, "application/json")], fixture(name)) }
        };
        let app = Router::new()
            .route("/vllm/health", get(|| async { "" }))
            .route("/vllm/v1/models", get(json("vllm-models.json")))
            .route("/ollama/api/version", get(json("ollama-version.json")))
            .route("/ollama/api/tags", get(json("ollama-tags.json")))
            .route("/ollama/api/ps", get(json("ollama-ps.json")))
            .route("/idle-ollama/api/version", get(json("ollama-version.json")))
            .route("/idle-ollama/api/tags", get(json("ollama-tags.json")))
            .route("/idle-ollama/api/ps", get(json("ollama-ps-empty.json")))
            .route("/webui/health", get(json("openwebui-health.json")))
            .route(
                "/localai/readyz",
                get(|| async { fixture("localai-readyz.txt") }),
            )
            .route("/localai/v1/models", get(json("localai-models.json")))
            .route(
                "/hung/health",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    ""
                }),
            )
            .route(
                "/broken/health",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route(
                "/moved/health",
                get(|| async { Redirect::temporary("/vllm/health") }),
            )
            .route(
                "/loop/health",
                get(|| async { Redirect::temporary("/loop/health") }),
            )
            .route("/huge", get(|| async { "x".repeat(MAX_BODY_BYTES + 1) }))
            .route(
                "/html/api/version",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/html")],
                        "<html><body>It works!</body></html>",
                    )
                        .into_response()
                }),
            )
            .route(
                "/webui-down/health",
                get(|| async { r#"{"status": false}"# }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{address}")
    }

    fn service(base: &str, name: &str, kind: ServiceKind, path: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            kind,
            url: format!("{base}{path}"),
            container: None,
            process: None,
        }
    }

    #[tokio::test]
    async fn probes_real_payloads_and_survives_misbehaving_servers() {
        let base = fake_servers().await;
        let services = vec![
            service(&base, "vllm", ServiceKind::Vllm, "/vllm"),
            service(&base, "ollama", ServiceKind::Ollama, "/ollama"),
            service(&base, "idle-ollama", ServiceKind::Ollama, "/idle-ollama/"),
            service(&base, "webui", ServiceKind::Openwebui, "/webui"),
            service(&base, "localai", ServiceKind::Localai, "/localai"),
            service(&base, "hung", ServiceKind::Vllm, "/hung"),
            service(&base, "broken", ServiceKind::Vllm, "/broken"),
            service(&base, "moved", ServiceKind::Vllm, "/moved"),
            service(&base, "loop", ServiceKind::Vllm, "/loop"),
            service(&base, "huge", ServiceKind::Http, "/huge"),
            service(&base, "html", ServiceKind::Ollama, "/html"),
            service(&base, "webui-down", ServiceKind::Openwebui, "/webui-down"),
            service("http://127.0.0.1:9", "refused", ServiceKind::Http, "/"),
        ];
        let timeout = Duration::from_millis(500);
        let mut collector = ServicesCollector::new(services, timeout).unwrap();
        let sample = collector.sample(Instant::now()).await.unwrap();
        let by_name = |name: &str| sample.services.iter().find(|s| s.name == name).unwrap();

        let up: Vec<&str> = sample
            .services
            .iter()
            .filter(|s| s.up)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            up,
            ["vllm", "ollama", "idle-ollama", "webui", "localai", "moved"],
            "{sample:#?}"
        );

        let tags: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures/services/ollama-tags.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let ollama = by_name("ollama");
        assert_eq!(
            ollama.model_sizes.len(),
            tags["models"].as_array().unwrap().len()
        );
        for model in tags["models"].as_array().unwrap() {
            assert_eq!(
                ollama.model_sizes[model["name"].as_str().unwrap()],
                model["size"].as_u64().unwrap()
            );
        }
        assert_eq!(ollama.loaded_vram.len(), 1, "{ollama:#?}");
        assert!(ollama.loaded_vram.values().all(|&v| v > 0));
        assert!(by_name("idle-ollama").loaded_vram.is_empty());
        assert_eq!(by_name("vllm").models.len(), 1);
        assert!(!by_name("localai").models.is_empty());

        let hung = by_name("hung");
        assert!(
            hung.error.as_deref().unwrap().contains("timed out"),
            "{hung:?}"
        );
        assert!(hung.duration >= timeout);
        assert_eq!(by_name("broken").error.as_deref(), Some("HTTP 500"));
        assert!(
            by_name("loop")
                .error
                .as_deref()
                .unwrap()
                .starts_with("too many redirects"),
            "{:?}",
            by_name("loop")
        );
        assert!(
            by_name("refused")
                .error
                .as_deref()
                .unwrap()
                .starts_with("connection failed"),
            "{:?}",
            by_name("refused")
        );
        assert!(
            by_name("huge")
                .error
                .as_deref()
                .unwrap()
                .contains("larger than")
        );
        assert!(
            by_name("html")
                .error
                .as_deref()
                .unwrap()
                .starts_with("unexpected response")
        );
        assert!(by_name("webui-down").error.is_some());

        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::with_prefix("aistack");
        #[derive(Debug)]
        struct One(ServicesSample);
        impl prometheus_client::collector::Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
                self.0.encode(&mut encoder)
            }
        }
        registry.register_collector(Box::new(One(sample.clone())));
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"aistack_service_up{service="vllm",kind="vllm"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"aistack_service_up{service="hung",kind="vllm"} 0"#),
            "{text}"
        );
        assert!(
            text.contains("aistack_ollama_model_loaded_vram_bytes{service=\"ollama\",model=\""),
            "{text}"
        );
        assert!(
            text.contains("aistack_service_model_info{service=\"vllm\",kind=\"vllm\",model=\""),
            "{text}"
        );
    }

    #[test]
    fn urls_join_without_double_slashes() {
        assert_eq!(
            join("http://127.0.0.1:8000/", "/health"),
            "http://127.0.0.1:8000/health"
        );
        assert_eq!(join("http://h:1", "/api/ps"), "http://h:1/api/ps");
    }
}
