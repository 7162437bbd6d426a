//! aistack-exporter: Prometheus metrics for LLM inference hosts.
//!
//! `main` parses flags and config and calls [`Exporter::start`], which spawns one sampling task
//! per enabled collector and returns what [`http::app`] serves.

pub mod cli;
pub mod collectors;
pub mod config;
pub mod http;
pub mod idle;
pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::collectors::cpu::{CpuCollector, CpuSample};
use crate::collectors::docker::{DockerCollector, DockerSample};
use crate::collectors::gpu::attribution::Attribution;
use crate::collectors::gpu::health::HealthWhileMissing;
use crate::collectors::gpu::nvml::NvmlSource;
use crate::collectors::gpu::{GpuCollector, GpuSample};
use crate::collectors::hwmon::HwmonCollector;
use crate::collectors::idle::{IdleCollector, IdleSample};
use crate::collectors::logind::{LogindCollector, LogindSample};
use crate::collectors::power::PowerCollector;
use crate::collectors::rapl::{RaplCollector, RaplSample};
use crate::collectors::services::ServicesCollector;
use crate::collectors::wol::WolCollector;
use crate::collectors::{Collector, CollectorKind, Latest, Schedule, Snapshot, spawn};
use crate::config::Config;
use crate::http::AppState;
use crate::metrics::{CollectorView, ExporterMetrics, view, view_with_missing};

/// Where the collectors read the system from (`--path.procfs`, `--path.sysfs`).
#[derive(Debug, Clone)]
pub struct Roots {
    /// procfs mountpoint.
    pub procfs: PathBuf,
    /// sysfs mountpoint.
    pub sysfs: PathBuf,
}

/// Why the collectors could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A pattern in the config does not compile (check-config catches this first).
    #[error("invalid pattern: {0}")]
    Pattern(#[from] regex::Error),
    /// The HTTP client for service probes could not be built.
    #[error("building the HTTP client: {0}")]
    HttpClient(reqwest::Error),
}

type Publisher<S> = watch::Sender<Snapshot<S>>;

/// The channels of the samples that other collectors or the API read. They exist whether or
/// not their collector runs: a reader of a collector that is off sees no sample, ever.
#[derive(Debug, Default)]
struct Shared {
    cpu: Publisher<CpuSample>,
    rapl: Publisher<RaplSample>,
    gpu: Publisher<GpuSample>,
    docker: Publisher<DockerSample>,
    logind: Publisher<LogindSample>,
    idle: Publisher<IdleSample>,
}

/// The sampling tasks started so far and the views `/metrics` encodes.
#[derive(Default)]
struct Running {
    tasks: Vec<JoinHandle<()>>,
    views: Vec<Box<dyn CollectorView>>,
}

impl Running {
    /// Spawns `collector`'s sampling task on a channel of its own, and encodes what it
    /// publishes.
    fn add<C: Collector>(&mut self, kind: CollectorKind, schedule: Schedule, collector: C) {
        self.add_on(kind, schedule, collector, &Publisher::default());
    }

    /// Like [`Running::add`], publishing on the shared channel `tx`.
    fn add_on<C: Collector>(
        &mut self,
        kind: CollectorKind,
        schedule: Schedule,
        collector: C,
        tx: &Publisher<C::Sample>,
    ) {
        let task = spawn(kind, collector, schedule, tx.clone());
        self.tasks.push(task);
        self.views.push(view(kind, tx.subscribe()));
    }

    /// The gpu collector: [`Running::add_on`], showing the GPUs it saw while NVML is down.
    fn add_gpu(&mut self, schedule: Schedule, collector: GpuCollector, tx: &Publisher<GpuSample>) {
        let missing = Arc::new(HealthWhileMissing(collector.health()));
        let task = spawn(CollectorKind::Gpu, collector, schedule, tx.clone());
        self.tasks.push(task);
        self.views.push(view_with_missing(
            CollectorKind::Gpu,
            tx.subscribe(),
            missing,
        ));
    }
}

/// A running exporter: its sampling tasks and the latest samples the HTTP surface serves.
#[derive(Debug)]
pub struct Exporter {
    registry: Arc<Registry>,
    gpu: Option<Latest<GpuSample>>,
    gpu_interval: std::time::Duration,
    idle: Option<Latest<IdleSample>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Exporter {
    /// Spawns a sampling task for every enabled collector (must run inside a Tokio runtime).
    /// `enabled` decides, per collector, whether it runs.
    pub fn start(
        config: &Config,
        roots: &Roots,
        enabled: impl Fn(CollectorKind) -> bool,
    ) -> Result<Self, StartError> {
        use CollectorKind as K;
        let (procfs, sysfs) = (roots.procfs.as_path(), roots.sysfs.as_path());
        let shared = Shared::default();
        // The docker collector's containers name the GPU processes' containers, and (with
        // discovery) are probed as services.
        let containers = enabled(K::Docker).then_some(&shared.docker);
        let discovery = containers.filter(|_| config.discovery.docker);
        let mut run = Running::default();
        for kind in K::ALL.into_iter().filter(|k| enabled(*k)) {
            let at = config.schedule(kind);
            tracing::info!(collector = %kind, interval = ?at.interval, "collector enabled");
            match kind {
                K::Cpu => run.add_on(kind, at, CpuCollector::new(procfs), &shared.cpu),
                K::Rapl => run.add_on(kind, at, RaplCollector::new(sysfs), &shared.rapl),
                K::Hwmon => run.add(kind, at, HwmonCollector::new(sysfs)),
                K::Gpu => run.add_gpu(at, gpu(config, roots, containers)?, &shared.gpu),
                K::Docker => run.add_on(kind, at, docker(config, at), &shared.docker),
                K::Services => run.add(kind, whole(at), services(config, at, discovery)?),
                K::Wol => run.add(kind, at, WolCollector::new(&config.wol, sysfs)),
                K::Logind => run.add_on(kind, at, LogindCollector::new(), &shared.logind),
                K::Idle => run.add_on(kind, at, idle(config, roots, &shared)?, &shared.idle),
                K::Power => run.add(kind, at, power(config, &shared)),
            }
        }
        Ok(Self {
            registry: ExporterMetrics::new(run.views).into_registry(),
            gpu: enabled(K::Gpu).then(|| shared.gpu.subscribe()),
            gpu_interval: config.schedule(K::Gpu).interval,
            idle: enabled(K::Idle).then(|| shared.idle.subscribe()),
            tasks: run.tasks,
        })
    }

    /// What the HTTP surface serves: the registry at `telemetry_path`, and the JSON API from
    /// the gpu and idle collectors where they run.
    pub fn app_state(&self, telemetry_path: &str) -> AppState {
        AppState::new(self.registry.clone(), telemetry_path)
            .with_gpu(self.gpu.clone())
            .with_gpu_interval(self.gpu_interval)
            .with_idle(self.idle.clone())
    }
}

// How each collector is built from the config, where it takes more than a line.

fn gpu(
    config: &Config,
    roots: &Roots,
    containers: Option<&Publisher<DockerSample>>,
) -> Result<GpuCollector, StartError> {
    let source = NvmlSource::new(config.gpu.nvml_library.clone());
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    // Pods are listed to discover inference images, and for services that name their pods.
    let pods_named = config.services.iter().any(|s| s.pods.is_some());
    let node = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty());
    let pods_node = node.filter(|_| (config.discovery.kubernetes || pods_named) && in_cluster);
    if pods_named && pods_node.is_none() {
        tracing::warn!(
            collector = "gpu",
            "services name pods (services[].pods), but the node's pods cannot be listed here (NODE_NAME and the in-cluster account or KUBECONFIG are needed): those services claim no GPU process"
        );
    }
    let attribution = Attribution::new(&config.services, &config.host_workload)?
        .listing_pods(pods_node.is_some());
    let mut gpu = GpuCollector::new(Box::new(source), roots.procfs.clone(), attribution);
    if let Some(file) = config
        .gpu
        .roster_file(std::env::var_os("STATE_DIRECTORY").as_deref())
    {
        tracing::info!(collector = "gpu", path = %file.display(), "GPUs seen are remembered across restarts");
        gpu = gpu.with_roster_file(file, &config.gpu.forget);
    }
    if let Some(node) = pods_node {
        tracing::info!(collector = "gpu", %node, "naming GPU processes in pods from the node's pods");
        gpu = gpu.with_pods(
            crate::collectors::gpu::pods::watch_node(node),
            config.discovery.kubernetes,
        );
    }
    Ok(match containers {
        Some(docker) => gpu.with_containers(docker.subscribe(), config.discovery.docker),
        None => gpu,
    })
}

fn docker(config: &Config, schedule: Schedule) -> DockerCollector {
    DockerCollector::new(&config.docker, schedule.timeout)
}

/// The services collector's schedule: each probe has the configured timeout; the sample as a
/// whole may take up to the interval.
fn whole(schedule: Schedule) -> Schedule {
    Schedule {
        timeout: schedule.interval,
        ..schedule
    }
}

fn services(
    config: &Config,
    schedule: Schedule,
    discovery: Option<&Publisher<DockerSample>>,
) -> Result<ServicesCollector, StartError> {
    let services =
        ServicesCollector::new(config.services.clone(), schedule.timeout, schedule.interval)
            .map_err(StartError::HttpClient)?;
    Ok(match discovery {
        Some(docker) => services.with_discovery(docker.subscribe()),
        None => services,
    })
}

fn idle(config: &Config, roots: &Roots, shared: &Shared) -> Result<IdleCollector, StartError> {
    Ok(IdleCollector::new(
        config.idle.clone(),
        roots.procfs.clone(),
        roots.sysfs.clone(),
        shared.cpu.subscribe(),
        shared.gpu.subscribe(),
        shared.logind.subscribe(),
    )?)
}

fn power(config: &Config, shared: &Shared) -> PowerCollector {
    PowerCollector::new(
        config.power_estimation.clone(),
        shared.cpu.subscribe(),
        shared.rapl.subscribe(),
        shared.gpu.subscribe(),
    )
}

impl Drop for Exporter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use aistack_common::api::{GPU_PATH, IDLE_PATH};
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn get(exporter: &Exporter, path: &str) -> (StatusCode, String) {
        let response = http::app(exporter.app_state("/metrics"))
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Polls `/metrics` until it holds `needle`.
    async fn metrics_with(exporter: &Exporter, needle: &str) -> String {
        for _ in 0..100 {
            let (_, body) = get(exporter, "/metrics").await;
            if body.contains(needle) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {needle} in /metrics");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_enabled_collectors_run_and_the_api_follows_them() {
        let t0 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/roots/t0");
        let roots = Roots {
            procfs: t0.join("proc"),
            sysfs: t0.join("sys"),
        };
        let config: Config =
            aistack_common::config::parse("gpu: {nvml_library: /nonexistent/libnvidia-ml.so.1}")
                .unwrap();
        let exporter = Exporter::start(&config, &roots, |k| {
            matches!(k, CollectorKind::Cpu | CollectorKind::Gpu)
        })
        .unwrap();
        let body = metrics_with(&exporter, "aistack_nvml_up 0").await;
        let running: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("aistack_collector_success{collector=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(running, ["cpu", "gpu"], "{body}");

        let (status, body) = get(&exporter, GPU_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"nvml_up":false,"sample_age_s":null,"interval_s":1.0,"gpus":[]}"#
        );
        let (status, body) = get(&exporter, IDLE_PATH).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, r#"{"error":"the idle collector is disabled"}"#);

        let idle_only = Exporter::start(&config, &roots, |k| k == CollectorKind::Idle).unwrap();
        let (status, body) = get(&idle_only, GPU_PATH).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, r#"{"error":"the gpu collector is disabled"}"#);
        metrics_with(&idle_only, "aistack_idle_state{").await;
        let (status, body) = get(&idle_only, IDLE_PATH).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with(r#"{"state":"warming_up","#), "{body}");
    }
}
