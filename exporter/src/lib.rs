//! aistack-exporter: Prometheus metrics for LLM inference hosts.
//!
//! `main` parses flags and config and calls [`Exporter::start`], which spawns one sampling task
//! per enabled collector and returns the registry that [`http::app`] serves.

pub mod cli;
pub mod collectors;
pub mod config;
pub mod http;
pub mod idle;
pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::collectors::cpu::{CpuCollector, CpuSample};
use crate::collectors::docker::{DockerCollector, DockerSample};
use crate::collectors::gpu::attribution::Attribution;
use crate::collectors::gpu::nvml::NvmlSource;
use crate::collectors::gpu::{GpuCollector, GpuSample};
use crate::collectors::hwmon::HwmonCollector;
use crate::collectors::idle::{IdleCollector, IdleSample};
use crate::collectors::logind::LogindCollector;
use crate::collectors::power::PowerCollector;
use crate::collectors::rapl::{RaplCollector, RaplSample};
use crate::collectors::services::ServicesCollector;
use crate::collectors::wol::WolCollector;
use crate::collectors::{CollectorKind, Latest, Schedule, channel, spawn};
use crate::config::Config;
use crate::metrics::{CollectorView, ExporterMetrics, view};

/// Where the collectors read the system from (`--path.procfs`, `--path.sysfs`).
#[derive(Debug, Clone)]
pub struct Roots {
    /// procfs mountpoint.
    pub procfs: PathBuf,
    /// sysfs mountpoint.
    pub sysfs: PathBuf,
}

/// The latest samples other parts of the exporter consume.
#[derive(Debug, Clone)]
pub struct Samples {
    /// `cpu` collector output.
    pub cpu: Latest<CpuSample>,
    /// `rapl` collector output.
    pub rapl: Latest<RaplSample>,
    /// `gpu` collector output.
    pub gpu: Latest<GpuSample>,
    /// `docker` collector output.
    pub docker: Latest<DockerSample>,
    /// The idle engine's verdicts; `None` when the idle collector is off.
    pub idle: Option<Latest<IdleSample>>,
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

/// A running exporter: its sampling tasks and the registry that encodes their output.
#[derive(Debug)]
pub struct Exporter {
    /// What `/metrics` encodes.
    pub registry: Arc<Registry>,
    /// The collectors' channels.
    pub samples: Samples,
    /// The enabled collectors.
    pub enabled: Vec<CollectorKind>,
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
        let (cpu_tx, cpu_rx) = channel();
        let (gpu_tx, gpu_rx) = channel();
        let (docker_tx, docker_rx) = channel();
        let (services_tx, services_rx) = channel();
        let (wol_tx, wol_rx) = channel();
        let (logind_tx, logind_rx) = channel();
        let (idle_tx, idle_rx) = channel();
        let (rapl_tx, rapl_rx) = channel();
        let (hwmon_tx, hwmon_rx) = channel();
        let (power_tx, power_rx) = channel();

        let mut tasks = Vec::new();
        let mut views: Vec<Box<dyn CollectorView>> = Vec::new();
        let mut enabled_kinds = Vec::new();
        for kind in CollectorKind::ALL.into_iter().filter(|k| enabled(*k)) {
            let schedule = config.schedule(kind);
            tracing::info!(collector = %kind, interval = ?schedule.interval, "collector enabled");
            enabled_kinds.push(kind);
            match kind {
                CollectorKind::Cpu => {
                    tasks.push(spawn(
                        kind,
                        CpuCollector::new(&roots.procfs),
                        schedule,
                        cpu_tx.clone(),
                    ));
                    views.push(view(kind, cpu_rx.clone()));
                }
                CollectorKind::Rapl => {
                    tasks.push(spawn(
                        kind,
                        RaplCollector::new(&roots.sysfs),
                        schedule,
                        rapl_tx.clone(),
                    ));
                    views.push(view(kind, rapl_rx.clone()));
                }
                CollectorKind::Hwmon => {
                    tasks.push(spawn(
                        kind,
                        HwmonCollector::new(&roots.sysfs),
                        schedule,
                        hwmon_tx.clone(),
                    ));
                    views.push(view(kind, hwmon_rx.clone()));
                }
                CollectorKind::Gpu => {
                    let source = NvmlSource::new(config.gpu.nvml_library.clone());
                    let attribution = Attribution::new(&config.services, &config.host_workload)
                        .map_err(StartError::Pattern)?;
                    let mut gpu =
                        GpuCollector::new(Box::new(source), roots.procfs.clone(), attribution);
                    if enabled(CollectorKind::Docker) {
                        gpu = gpu.with_containers(docker_rx.clone(), config.discovery.docker);
                    }
                    tasks.push(spawn(kind, gpu, schedule, gpu_tx.clone()));
                    views.push(view(kind, gpu_rx.clone()));
                }
                CollectorKind::Docker => {
                    let docker = DockerCollector::new(&config.docker, schedule.timeout);
                    tasks.push(spawn(kind, docker, schedule, docker_tx.clone()));
                    views.push(view(kind, docker_rx.clone()));
                }
                CollectorKind::Services => {
                    let mut services =
                        ServicesCollector::new(config.services.clone(), schedule.timeout)
                            .map_err(StartError::HttpClient)?;
                    if config.discovery.docker && enabled(CollectorKind::Docker) {
                        services = services.with_discovery(docker_rx.clone());
                    }
                    // Each probe has the configured timeout; the sample as a whole may take
                    // up to the interval.
                    let whole = Schedule {
                        interval: schedule.interval,
                        timeout: schedule.interval,
                    };
                    tasks.push(spawn(kind, services, whole, services_tx.clone()));
                    views.push(view(kind, services_rx.clone()));
                }
                CollectorKind::Wol => {
                    let wol = WolCollector::new(&config.wol, &roots.sysfs);
                    tasks.push(spawn(kind, wol, schedule, wol_tx.clone()));
                    views.push(view(kind, wol_rx.clone()));
                }
                CollectorKind::Logind => {
                    tasks.push(spawn(
                        kind,
                        LogindCollector::new(),
                        schedule,
                        logind_tx.clone(),
                    ));
                    views.push(view(kind, logind_rx.clone()));
                }
                CollectorKind::Idle => {
                    let idle = IdleCollector::new(
                        config.idle.clone(),
                        roots.procfs.clone(),
                        roots.sysfs.clone(),
                        cpu_rx.clone(),
                        gpu_rx.clone(),
                        logind_rx.clone(),
                    )?;
                    tasks.push(spawn(kind, idle, schedule, idle_tx.clone()));
                    views.push(view(kind, idle_rx.clone()));
                }
                CollectorKind::Power => {
                    let power = PowerCollector::new(
                        config.power_estimation.clone(),
                        cpu_rx.clone(),
                        rapl_rx.clone(),
                        gpu_rx.clone(),
                    );
                    tasks.push(spawn(kind, power, schedule, power_tx.clone()));
                    views.push(view(kind, power_rx.clone()));
                }
            }
        }
        Ok(Self {
            registry: ExporterMetrics::new(views).into_registry(),
            samples: Samples {
                cpu: cpu_rx,
                rapl: rapl_rx,
                gpu: gpu_rx,
                docker: docker_rx,
                idle: enabled_kinds
                    .contains(&CollectorKind::Idle)
                    .then_some(idle_rx),
            },
            enabled: enabled_kinds,
            tasks,
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
