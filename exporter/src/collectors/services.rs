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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, LabelSetEncoder,
};
use serde::Deserialize;

use super::docker::DockerSample;
use super::{Collector, CollectorError, EncodeSample, Latest};
use crate::config::{ServiceConfig, ServiceKind, ServiceScope};
use crate::metrics::{counter_family, gauge_family};

/// Largest response body a probe reads; a larger one fails the probe.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// `discovery:` in the config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Probe containers of known inference images (vllm/vllm-openai, ollama/ollama,
    /// open-webui, localai) without config (default true; needs the docker collector).
    pub docker: bool,
    /// On Kubernetes (`NODE_NAME` set, and the in-cluster account or `KUBECONFIG`): name the
    /// pods GPU processes run in from the node's pods, and count processes in pods of known
    /// inference images as services (default true). Off, pods are still listed for services
    /// that name theirs (`services[].pods`).
    pub kubernetes: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            docker: true,
            kubernetes: true,
        }
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
                pods: None,
                scope: ServiceScope::Host,
                node: None,
            })
        })
        .collect()
}

/// How long the last good answer of an optional endpoint stands in for failing ones.
pub const EXTRAS_KEPT_FOR: Duration = Duration::from_secs(300);

/// The request whose answer alone decides whether a service is up: a path under the server's
/// root, or for `http` the URL exactly as configured.
fn health_url(service: &ServiceConfig) -> String {
    let path = match service.kind {
        ServiceKind::Vllm | ServiceKind::Openwebui => "/health",
        ServiceKind::Ollama => "/api/version",
        ServiceKind::Localai => "/readyz",
        ServiceKind::Http => return service.url.clone(),
    };
    join(service.base_url(), path)
}

/// The `endpoint` label of the health request: its path (for `http`, the configured URL's).
fn health_endpoint(service: &ServiceConfig) -> String {
    reqwest::Url::parse(&health_url(service))
        .map(|url| url.path().to_owned())
        .unwrap_or_else(|_| "/".to_owned())
}

/// Most models a service's series name, per list; more (a listing of 200 000 models) are cut,
/// in name order, so one server cannot flood the exposition.
pub const MAX_MODELS: usize = 1000;

/// An optional endpoint: asked only once the health request said up, it adds detail and
/// never turns the service down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Extra {
    /// `GET /v1/models` (vLLM, LocalAI): the served models.
    Models,
    /// `GET /api/tags` (Ollama): models on disk, and cloud models.
    OllamaTags,
    /// `GET /api/ps` (Ollama): loaded models and their VRAM.
    OllamaPs,
}

impl Extra {
    /// Its path, the `endpoint` label.
    pub const fn path(self) -> &'static str {
        match self {
            Self::Models => "/v1/models",
            Self::OllamaTags => "/api/tags",
            Self::OllamaPs => "/api/ps",
        }
    }

    /// The extras a kind of service has.
    pub const fn of(kind: ServiceKind) -> &'static [Self] {
        match kind {
            ServiceKind::Vllm | ServiceKind::Localai => &[Self::Models],
            ServiceKind::Ollama => &[Self::OllamaTags, Self::OllamaPs],
            ServiceKind::Openwebui | ServiceKind::Http => &[],
        }
    }
}

/// What an optional endpoint told, merged so that every name appears once.
#[derive(Debug, Clone, PartialEq)]
enum Detail {
    Models(BTreeSet<String>),
    Tags {
        local: BTreeMap<String, u64>,
        remote: BTreeMap<String, String>,
    },
    Loaded(BTreeMap<String, u64>),
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Its kind.
    pub kind: Option<ServiceKind>,
    /// A cluster Service (`scope: cluster`): its series say `scope="cluster"`.
    pub cluster: bool,
    /// The GPU node whose vLLM/Ollama pair it is (`node:`): its series say `node=...`.
    pub node: Option<String>,
    /// Whether it answered its health request as it should.
    pub up: bool,
    /// How long the health request took.
    pub duration: Duration,
    /// Why it is down, for the debug log.
    pub error: Option<String>,
    /// Models it serves (vLLM, LocalAI), each once.
    pub models: BTreeSet<String>,
    /// Ollama: local models on disk and their size in bytes.
    pub model_sizes: BTreeMap<String, u64>,
    /// Ollama: cloud models (`remote_host` set) and the host that runs them.
    pub remote_models: BTreeMap<String, String>,
    /// Ollama: loaded local models and the VRAM they hold.
    pub loaded_vram: BTreeMap<String, u64>,
    /// Optional endpoints whose last answer failed, with why.
    pub extra_errors: Vec<(Extra, String)>,
}

/// One `services` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServicesSample {
    /// Every service probed, configured and discovered, each name once.
    pub services: Vec<ServiceStatus>,
    /// Failed (or, for lack of time, unasked) requests since start, per service and endpoint
    /// path (health included).
    pub probe_errors: BTreeMap<(String, String), u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServiceLabels {
    service: String,
    kind: &'static str,
    /// `scope="cluster"` for a cluster Service; no label for a host's own.
    cluster: bool,
    /// `node=...` for one GPU node's pair; no label otherwise.
    node: Option<String>,
}

impl EncodeLabelSet for ServiceLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        ("service", self.service.as_str()).encode(encoder.encode_label())?;
        ("kind", self.kind).encode(encoder.encode_label())?;
        if self.cluster {
            ("scope", "cluster").encode(encoder.encode_label())?;
        }
        if let Some(node) = &self.node {
            ("node", node.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RemoteModelLabels {
    service: String,
    model: String,
    remote_host: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

impl ServiceStatus {
    fn labels(&self) -> ServiceLabels {
        ServiceLabels {
            service: self.name.clone(),
            kind: self.kind_label(),
            cluster: self.cluster,
            node: self.node.clone(),
        }
    }

    fn kind_label(&self) -> &'static str {
        self.kind.map_or("http", ServiceKind::as_str)
    }
}

impl EncodeSample for ServicesSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let services = &self.services;
        gauge_family(
            encoder,
            "service_up",
            "1 when the service answered its health request as it should.",
            None,
            services
                .iter()
                .map(|s| (s.labels(), if s.up { 1.0 } else { 0.0 })),
        )?;
        gauge_family(
            encoder,
            "service_probe_duration",
            "How long the service's last health request took.",
            Some("seconds"),
            services
                .iter()
                .map(|s| (s.labels(), s.duration.as_secs_f64())),
        )?;
        counter_family(
            encoder,
            "service_probe_errors",
            "Requests to the service that failed, or that the interval left no time for, by endpoint (the health request's path, or an optional endpoint's that only adds detail).",
            None,
            self.probe_errors.iter().map(|((service, endpoint), n)| {
                let labels = EndpointLabels {
                    service: service.clone(),
                    endpoint: endpoint.clone(),
                };
                (labels, *n as f64)
            }),
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
                        kind: s.kind_label(),
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
            "Size on disk of a local model Ollama has (/api/tags); cloud models are apart.",
            Some("bytes"),
            per_model(|s| &s.model_sizes),
        )?;
        gauge_family(
            encoder,
            "ollama_remote_model_info",
            "A cloud model Ollama lists (/api/tags entries with remote_host): it runs elsewhere and takes no local disk or VRAM; always 1.",
            None,
            services.iter().flat_map(|s| {
                s.remote_models.iter().map(move |(model, host)| {
                    let labels = RemoteModelLabels {
                        service: s.name.clone(),
                        model: model.clone(),
                        remote_host: host.clone(),
                    };
                    (labels, 1.0)
                })
            }),
        )?;
        gauge_family(
            encoder,
            "ollama_model_loaded_vram",
            "VRAM held by a local model Ollama has loaded (/api/ps).",
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
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("not asked: the health request left no time in the interval")]
    NoTime,
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

/// GETs `url` within `timeout` and returns the body, at most [`MAX_BODY_BYTES`], for a 2xx
/// answer.
async fn get(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ProbeError> {
    let request = async {
        let mut response = client.get(url).timeout(timeout).send().await?;
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
    };
    tokio::time::timeout(timeout, request)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProbeError> {
    serde_json::from_slice(body).map_err(|e| ProbeError::Content(e.to_string()))
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
    /// Set on cloud models (Ollama 0.12+): the host that runs them.
    #[serde(default)]
    remote_host: Option<String>,
}

impl OllamaModel {
    fn remote_host(&self) -> Option<&str> {
        self.remote_host.as_deref().filter(|h| !h.is_empty())
    }
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

/// The health request: its answer alone decides `up`.
async fn check_health(
    client: &reqwest::Client,
    service: &ServiceConfig,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let body = get(client, &health_url(service), timeout).await?;
    match service.kind {
        ServiceKind::Ollama => {
            if json::<OllamaVersion>(&body)?.version.is_empty() {
                return Err(ProbeError::Content("empty version".into()));
            }
        }
        ServiceKind::Openwebui => {
            if !json::<OpenWebUiHealth>(&body)?.status {
                return Err(ProbeError::Content("status false".into()));
            }
        }
        ServiceKind::Vllm | ServiceKind::Localai | ServiceKind::Http => {}
    }
    Ok(())
}

/// One optional endpoint, read into what it adds (names merged, each once).
async fn fetch_extra(
    client: &reqwest::Client,
    service: &ServiceConfig,
    extra: Extra,
    timeout: Duration,
) -> Result<Detail, ProbeError> {
    let body = get(client, &join(service.base_url(), extra.path()), timeout).await?;
    let detail = match extra {
        Extra::Models => Detail::Models(
            json::<ModelList>(&body)?
                .data
                .into_iter()
                .map(|m| m.id)
                .collect(),
        ),
        Extra::OllamaTags => {
            let (mut local, mut remote) = (BTreeMap::new(), BTreeMap::new());
            for model in json::<OllamaModels>(&body)?.models {
                match model.remote_host() {
                    Some(host) => {
                        remote.insert(model.name.clone(), host.to_owned());
                    }
                    None => {
                        local.insert(model.name, model.size);
                    }
                }
            }
            Detail::Tags { local, remote }
        }
        Extra::OllamaPs => Detail::Loaded(
            json::<OllamaModels>(&body)?
                .models
                .into_iter()
                .filter(|m| m.remote_host().is_none())
                .map(|m| (m.name, m.size_vram))
                .collect(),
        ),
    };
    Ok(detail.capped(&service.name, extra))
}

impl Detail {
    /// At most [`MAX_MODELS`] names per list, the first in name order.
    fn capped(self, service: &str, extra: Extra) -> Self {
        // The lists are sorted maps and sets: their first MAX_MODELS are the first by name.
        let mut dropped = 0;
        let mut cut = |len: usize| {
            dropped += len.saturating_sub(MAX_MODELS);
            MAX_MODELS
        };
        let capped = match self {
            Self::Models(models) => {
                let keep = cut(models.len());
                Self::Models(models.into_iter().take(keep).collect())
            }
            Self::Tags { local, remote } => {
                let (keep_local, keep_remote) = (cut(local.len()), cut(remote.len()));
                Self::Tags {
                    local: local.into_iter().take(keep_local).collect(),
                    remote: remote.into_iter().take(keep_remote).collect(),
                }
            }
            Self::Loaded(loaded) => {
                let keep = cut(loaded.len());
                Self::Loaded(loaded.into_iter().take(keep).collect())
            }
        };
        if dropped > 0 {
            tracing::debug!(
                collector = "services",
                service,
                endpoint = extra.path(),
                dropped,
                "more models than series allowed; the rest left out"
            );
        }
        capped
    }
}

/// What one round of requests to a service found, before it is merged into the collector's
/// memory of last good answers.
struct Probe {
    health: Result<(), ProbeError>,
    took: Duration,
    extras: Vec<(Extra, Result<Detail, ProbeError>)>,
}

/// Probes one service: the health request under its timeout; once it says up, the optional
/// endpoints concurrently, each under its own timeout, cut to what is left of `deadline`.
async fn probe(
    client: &reqwest::Client,
    service: &ServiceConfig,
    timeout: Duration,
    deadline: Instant,
) -> Probe {
    let started = Instant::now();
    // Never past the deadline, even when the timeout is the whole interval: a hung service
    // must not cost the sample, and with it every other service's series.
    let health_timeout = deadline.saturating_duration_since(started).min(timeout);
    let health = check_health(client, service, health_timeout).await;
    let took = started.elapsed();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .min(timeout);
    let extras = match &health {
        Err(_) => Vec::new(),
        Ok(()) if left < MIN_EXTRA_TIME => Extra::of(service.kind)
            .iter()
            .map(|&extra| (extra, Err(ProbeError::NoTime)))
            .collect(),
        Ok(()) => {
            let asks = Extra::of(service.kind).iter().map(|&extra| async move {
                (extra, fetch_extra(client, service, extra, left).await)
            });
            join_all(asks).await
        }
    };
    Probe {
        health,
        took,
        extras,
    }
}

/// Below this, an optional endpoint is not asked this round (its last answer stands).
const MIN_EXTRA_TIME: Duration = Duration::from_millis(50);

/// Probes the configured (and discovered) services.
pub struct ServicesCollector {
    client: reqwest::Client,
    services: Vec<ServiceConfig>,
    probe_timeout: Duration,
    /// How long a whole sample may take (the interval).
    budget: Duration,
    discovered_from: Option<Latest<DockerSample>>,
    /// The last good answer of each optional endpoint, and when it came.
    last_good: HashMap<(String, Extra), (Instant, Detail)>,
    /// Failed requests per service and endpoint since start.
    errors: BTreeMap<(String, String), u64>,
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
    /// Probes `services`: each request within `probe_timeout`, a whole sample within `budget`.
    pub fn new(
        services: Vec<ServiceConfig>,
        probe_timeout: Duration,
        budget: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = aistack_common::http_client(|builder| {
            builder
                .user_agent(concat!("aistack-exporter/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::limited(3))
                .connect_timeout(probe_timeout)
                .no_proxy()
        })?;
        Ok(Self {
            client,
            services,
            probe_timeout,
            budget,
            discovered_from: None,
            last_good: HashMap::new(),
            errors: BTreeMap::new(),
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
                .any(|t| t.name == service.name || t.base_url() == service.base_url())
            {
                targets.push(service);
            }
        }
        targets
    }

    /// Merges one service's round into the last good answers and the error counts.
    fn status(&mut self, service: &ServiceConfig, probe: Probe, now: Instant) -> ServiceStatus {
        let mut status = ServiceStatus {
            name: service.name.clone(),
            kind: Some(service.kind),
            cluster: service.scope == ServiceScope::Cluster,
            node: service.node.clone(),
            up: probe.health.is_ok(),
            duration: probe.took,
            ..ServiceStatus::default()
        };
        let mut count_error = |endpoint: String| {
            *self
                .errors
                .entry((service.name.clone(), endpoint))
                .or_default() += 1;
        };
        if let Err(err) = &probe.health {
            count_error(health_endpoint(service));
            status.error = Some(err.to_string());
            tracing::debug!(collector = "services", service = %service.name, url = %service.url, error = %err, "service down");
            return status;
        }
        for (extra, answer) in probe.extras {
            match answer {
                Ok(detail) => {
                    self.last_good
                        .insert((service.name.clone(), extra), (now, detail));
                }
                Err(err) => {
                    count_error(extra.path().to_owned());
                    tracing::debug!(collector = "services", service = %service.name, endpoint = extra.path(), error = %err, "optional endpoint failed");
                    status.extra_errors.push((extra, err.to_string()));
                }
            }
        }
        for extra in Extra::of(service.kind) {
            let Some((_, detail)) = self.last_good.get(&(service.name.clone(), *extra)) else {
                continue;
            };
            match detail.clone() {
                Detail::Models(models) => status.models = models,
                Detail::Tags { local, remote } => {
                    status.model_sizes = local;
                    status.remote_models = remote;
                }
                Detail::Loaded(loaded) => status.loaded_vram = loaded,
            }
        }
        status
    }
}

impl Collector for ServicesCollector {
    type Sample = ServicesSample;

    async fn sample(&mut self, now: Instant) -> Result<ServicesSample, CollectorError> {
        let targets = self.targets();
        // Forget what is too old, and services no longer probed (discovery churns).
        let names: HashSet<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        self.last_good.retain(|(name, _), (at, _)| {
            names.contains(name.as_str()) && now.saturating_duration_since(*at) <= EXTRAS_KEPT_FOR
        });
        self.errors
            .retain(|(name, _), _| names.contains(name.as_str()));
        // Leave a tenth of the budget for merging, so a slow extra never costs the sample.
        let deadline = Instant::now() + self.budget.mul_f64(0.9);
        let (client, timeout) = (&self.client, self.probe_timeout);
        let probes = join_all(
            targets
                .iter()
                .map(|service| probe(client, service, timeout, deadline)),
        )
        .await;
        let services = targets
            .iter()
            .zip(probes)
            .map(|(service, probe)| self.status(service, probe, now))
            .collect();
        Ok(ServicesSample {
            services,
            probe_errors: self.errors.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

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
            pods: None,
            scope: ServiceScope::Host,
            node: None,
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
        let mut collector =
            ServicesCollector::new(services, timeout, Duration::from_secs(5)).unwrap();
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

        let text = crate::collectors::encode_text(sample.clone());
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

    /// A server answering real payloads after the given delays, whose optional endpoints take
    /// 5 s more or fail (500) on demand.
    struct Flaky {
        base: String,
        slow_extras: Arc<AtomicBool>,
        failing_extras: Arc<AtomicBool>,
    }

    async fn flaky_server(health_delay: Duration, extra_delay: Duration) -> Flaky {
        use axum::Router;
        use axum::http::StatusCode;
        use axum::routing::get;

        let slow_extras = Arc::new(AtomicBool::new(false));
        let failing_extras = Arc::new(AtomicBool::new(false));
        let extra = |name: &'static str| {
            let (slow, failing) = (slow_extras.clone(), failing_extras.clone());
            move || async move {
                tokio::time::sleep(extra_delay).await;
                if slow.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                if failing.load(Ordering::SeqCst) {
                    return Err(StatusCode::INTERNAL_SERVER_ERROR);
                }
                Ok(fixture(name))
            }
        };
        let health = move |name: &'static str| {
            move || async move {
                tokio::time::sleep(health_delay).await;
                fixture(name)
            }
        };
        let app = Router::new()
            .route("/api/version", get(health("ollama-version.json")))
            .route("/api/tags", get(extra("ollama-tags.json")))
            .route("/api/ps", get(extra("ollama-ps.json")))
            .route("/health", get(health("vllm-health.txt")))
            .route("/v1/models", get(extra("vllm-models.json")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Flaky {
            base: format!("http://{address}"),
            slow_extras,
            failing_extras,
        }
    }

    fn fixture(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/services")
            .join(name);
        std::fs::read_to_string(path).unwrap()
    }

    fn errors(sample: &ServicesSample, service: &str, endpoint: &str) -> u64 {
        sample
            .probe_errors
            .get(&(service.to_owned(), endpoint.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// 0.1.0 let one 2 s timeout cover the health request and the extras together: a slow
    /// `/api/ps` or `/v1/models` marked a healthy service down, and so did a 1.2 s version
    /// plus a 1.2 s tags. Now the health request alone decides, under its own timeout.
    #[tokio::test]
    async fn slow_or_failing_extras_never_turn_a_service_down() {
        let timeout = Duration::from_millis(400);
        // Each request takes 70 % of the timeout: together they would exceed it.
        let server = flaky_server(timeout.mul_f64(0.7), timeout.mul_f64(0.7)).await;
        let services = vec![
            service(&server.base, "ollama", ServiceKind::Ollama, ""),
            service(&server.base, "vllm", ServiceKind::Vllm, ""),
        ];
        let mut collector =
            ServicesCollector::new(services, timeout, Duration::from_secs(5)).unwrap();
        let t0 = Instant::now();
        let first = collector.sample(t0).await.unwrap();
        let [ollama, vllm] = &first.services[..] else {
            panic!("{first:#?}")
        };
        assert!(ollama.up && vllm.up, "{first:#?}");
        assert_eq!(ollama.model_sizes.len(), 3, "{ollama:#?}");
        assert_eq!(ollama.loaded_vram.len(), 1, "{ollama:#?}");
        assert_eq!(vllm.models.len(), 1);
        assert!(first.probe_errors.is_empty(), "{first:#?}");

        // The extras now take 5 s (Ollama's /api/tags waits for its model cache at start-up):
        // still up, the last good answers stand, the misses are counted per endpoint.
        server.slow_extras.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let slow = collector.sample(t0 + Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
        let [ollama, vllm] = &slow.services[..] else {
            panic!("{slow:#?}")
        };
        assert!(ollama.up && vllm.up, "{slow:#?}");
        assert_eq!(ollama.model_sizes, first.services[0].model_sizes);
        assert_eq!(ollama.loaded_vram, first.services[0].loaded_vram);
        assert_eq!(vllm.models, first.services[1].models);
        assert_eq!(errors(&slow, "ollama", "/api/tags"), 1);
        assert_eq!(errors(&slow, "ollama", "/api/ps"), 1);
        assert_eq!(errors(&slow, "vllm", "/v1/models"), 1);
        assert_eq!(errors(&slow, "ollama", "/api/version"), 0);
        assert_eq!(ollama.extra_errors.len(), 2);

        // Failing (500) for longer than they are kept: the detail goes, the service stays up.
        server.slow_extras.store(false, Ordering::SeqCst);
        server.failing_extras.store(true, Ordering::SeqCst);
        let kept = collector
            .sample(t0 + Duration::from_secs(200))
            .await
            .unwrap();
        assert!(kept.services.iter().all(|s| s.up));
        assert_eq!(kept.services[0].model_sizes.len(), 3);
        let gone = collector
            .sample(t0 + EXTRAS_KEPT_FOR + Duration::from_secs(1))
            .await
            .unwrap();
        assert!(gone.services.iter().all(|s| s.up), "{gone:#?}");
        assert!(gone.services[0].model_sizes.is_empty());
        assert!(gone.services[1].models.is_empty());
        assert_eq!(errors(&gone, "ollama", "/api/tags"), 3);
        assert_eq!(
            gone.services[0].extra_errors[0],
            (Extra::OllamaTags, "HTTP 500".to_owned())
        );

        // Back: fresh detail at once.
        server.failing_extras.store(false, Ordering::SeqCst);
        let back = collector
            .sample(t0 + EXTRAS_KEPT_FOR + Duration::from_secs(6))
            .await
            .unwrap();
        assert_eq!(back.services[0].model_sizes.len(), 3);
        assert_eq!(back.services[1].models.len(), 1);
    }

    /// A slow health request still turns the service down, and costs the sample no more than
    /// its timeout; the extras of a down service are not asked.
    #[tokio::test]
    async fn the_health_request_alone_decides() {
        let timeout = Duration::from_millis(300);
        let server = flaky_server(Duration::from_secs(3), Duration::ZERO).await;
        let services = vec![service(&server.base, "ollama", ServiceKind::Ollama, "")];
        let mut collector =
            ServicesCollector::new(services, timeout, Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        let sample = collector.sample(Instant::now()).await.unwrap();
        assert!(started.elapsed() < timeout * 2, "{:?}", started.elapsed());
        let ollama = &sample.services[0];
        assert!(!ollama.up);
        assert!(
            ollama.error.as_deref().unwrap().contains("timed out"),
            "{ollama:?}"
        );
        assert!(ollama.model_sizes.is_empty());
        assert_eq!(errors(&sample, "ollama", "/api/version"), 1);
        assert_eq!(errors(&sample, "ollama", "/api/tags"), 0);
    }

    /// Users copy the OpenAI base (`http://host:8000/v1`) into the config: the probes still
    /// ask the server's root.
    #[tokio::test]
    async fn an_openai_style_v1_base_probes_the_root() {
        let server = flaky_server(Duration::ZERO, Duration::ZERO).await;
        let services = vec![
            service(&server.base, "vllm", ServiceKind::Vllm, "/v1"),
            service(&server.base, "ollama", ServiceKind::Ollama, "/v1/"),
        ];
        let mut collector =
            ServicesCollector::new(services, Duration::from_secs(1), Duration::from_secs(5))
                .unwrap();
        let sample = collector.sample(Instant::now()).await.unwrap();
        assert!(sample.services.iter().all(|s| s.up), "{sample:#?}");
        assert_eq!(sample.services[0].models.len(), 1);
    }

    /// A cluster Service's series say `scope="cluster"`, so the rules page once per cluster;
    /// a host's own service has no such label (its series are as before).
    #[test]
    fn a_cluster_service_is_labelled_so() {
        let status = |name: &str, cluster| ServiceStatus {
            name: name.into(),
            kind: Some(ServiceKind::Vllm),
            cluster,
            ..ServiceStatus::default()
        };
        let vllm_b = ServiceStatus {
            node: Some("gpu-b".into()),
            ..status("vllm-b", true)
        };
        let sample = ServicesSample {
            services: vec![status("vllm", true), status("local", false), vllm_b],
            ..ServicesSample::default()
        };
        let text = crate::collectors::encode_text(sample);
        for want in [
            r#"aistack_service_up{service="vllm",kind="vllm",scope="cluster"} 0"#,
            r#"aistack_service_up{service="local",kind="vllm"} 0"#,
            r#"aistack_service_probe_duration_seconds{service="vllm",kind="vllm",scope="cluster"} 0"#,
            r#"aistack_service_up{service="vllm-b",kind="vllm",scope="cluster",node="gpu-b"} 0"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        let config: crate::config::Config = aistack_common::config::parse(
            "services: [{name: vllm, kind: vllm, url: 'http://vllm.ml.svc:8000', scope: cluster, node: gpu-b}]",
        )
        .unwrap();
        assert_eq!(config.services[0].scope, ServiceScope::Cluster);
        assert_eq!(config.services[0].node.as_deref(), Some("gpu-b"));
        assert!(
            aistack_common::config::parse::<crate::config::Config>(
                "services: [{name: vllm, kind: vllm, url: 'http://x:8000', node: 'gpu b'}]",
            )
            .is_err(),
            "a node name no alert can carry"
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
