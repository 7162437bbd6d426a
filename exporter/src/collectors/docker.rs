//! `docker`: the Docker engine and its containers, through bollard — `docker_up`,
//! `docker_nvidia_runtime`, and per container `container_running`, `container_health` and
//! `container_restarts_total`.
//!
//! Cost stays flat with many containers: each cycle makes one `info` and one `list` call; a
//! container is inspected (for its RestartCount) only when it is new or the engine's event
//! stream said something happened to it. When the event stream drops, every container is
//! inspected once after it reconnects. The engine being down or the socket missing is
//! `docker_up 0`; the collector reconnects on its next cycle.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerSummaryHealthStatusEnum, ContainerSummaryStateEnum};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use futures_util::StreamExt as _;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use tokio::task::JoinHandle;

use aistack_common::docker::{connect, endpoint};

use super::{Collector, CollectorError, EncodeSample};
use crate::metrics::{counter_family, gauge, gauge_family};

pub use aistack_common::docker::DockerConfig;

/// A container's health as the engine reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// The health check passes.
    Healthy,
    /// It fails.
    Unhealthy,
    /// No verdict yet (within the start period, or before the first check).
    Starting,
    /// No health check.
    None,
}

impl Health {
    const ALL: [Health; 4] = [Self::Healthy, Self::Unhealthy, Self::Starting, Self::None];

    fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Starting => "starting",
            Self::None => "none",
        }
    }

    /// From the `Status` text of a container listing: `Up 5 minutes (healthy)`,
    /// `Up 3 seconds (health: starting)`.
    pub fn from_status_text(status: &str) -> Self {
        if status.contains("(healthy)") {
            Self::Healthy
        } else if status.contains("(unhealthy)") {
            Self::Unhealthy
        } else if status.contains("(health: starting)") {
            Self::Starting
        } else {
            Self::None
        }
    }
}

/// One container.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerState {
    /// Full id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// Image as the container was created from.
    pub image: String,
    /// Whether it runs now.
    pub running: bool,
    /// Health check verdict.
    pub health: Health,
    /// Times the engine restarted it (its restart policy), from inspect.
    pub restarts: Option<i64>,
    /// Host ports it publishes, (private port, public port).
    pub published_ports: Vec<(u16, u16)>,
}

/// One `docker` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DockerSample {
    /// Whether the engine lists an `nvidia` runtime.
    pub nvidia_runtime: bool,
    /// Every container, running or not.
    pub containers: Vec<ContainerState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RunningLabels {
    container: String,
    image: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HealthLabels {
    container: String,
    status: &'static str,
}

const DOCKER_UP_HELP: &str = "1 when the Docker engine answers, 0 otherwise.";

impl EncodeSample for DockerSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "docker_up", DOCKER_UP_HELP, None, 1.0)?;
        gauge(
            encoder,
            "docker_nvidia_runtime",
            "1 when the engine lists an nvidia runtime (the NVIDIA Container Toolkit is set up).",
            None,
            if self.nvidia_runtime { 1.0 } else { 0.0 },
        )?;
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        gauge_family(
            encoder,
            "container_running",
            "1 when the container runs.",
            None,
            self.containers.iter().map(|c| {
                let labels = RunningLabels {
                    container: c.name.clone(),
                    image: c.image.clone(),
                };
                (labels, flag(c.running))
            }),
        )?;
        gauge_family(
            encoder,
            "container_health",
            "1 for the container's current health status, 0 for the others.",
            None,
            self.containers.iter().flat_map(|c| {
                Health::ALL.into_iter().map(move |h| {
                    let labels = HealthLabels {
                        container: c.name.clone(),
                        status: h.as_str(),
                    };
                    (labels, flag(c.health == h))
                })
            }),
        )?;
        counter_family(
            encoder,
            "container_restarts",
            "How many times the engine restarted the container (RestartCount); starts again at 0 when the container is recreated.",
            None,
            self.containers.iter().filter_map(|c| {
                let labels = ContainerLabels {
                    container: c.name.clone(),
                };
                Some((labels, c.restarts? as f64))
            }),
        )
    }

    fn encode_missing(encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "docker_up", DOCKER_UP_HELP, None, 0.0)
    }
}

/// Containers the event stream reported since the last sample.
#[derive(Debug, Default)]
enum Changed {
    #[default]
    Nothing,
    Some(HashSet<String>),
    /// The stream (re)connected: anything may have changed.
    All,
}

impl Changed {
    fn includes(&self, id: &str) -> bool {
        match self {
            Changed::Nothing => false,
            Changed::Some(ids) => ids.contains(id),
            Changed::All => true,
        }
    }
}

/// Samples the Docker engine.
pub struct DockerCollector {
    socket: String,
    timeout: Duration,
    client: Option<Docker>,
    restarts: HashMap<String, i64>,
    changed: Arc<Mutex<Changed>>,
    events: Option<JoinHandle<()>>,
    up: Option<bool>,
}

impl fmt::Debug for DockerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerCollector")
            .field("socket", &self.socket)
            .field("connected", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for DockerCollector {
    fn drop(&mut self) {
        if let Some(events) = self.events.take() {
            events.abort();
        }
    }
}

fn unreachable(err: impl fmt::Display) -> CollectorError {
    CollectorError::NoData(format!("docker engine unreachable: {err}"))
}

impl DockerCollector {
    /// Talks to `config.socket` (or `DOCKER_HOST`); each call gives up after `timeout`.
    pub fn new(config: &DockerConfig, timeout: Duration) -> Self {
        Self {
            socket: config.socket.clone(),
            timeout,
            client: None,
            restarts: HashMap::new(),
            changed: Arc::default(),
            events: None,
            up: None,
        }
    }

    fn note_up(&mut self, up: bool, reason: &str) {
        match (self.up, up) {
            (None, false) => {
                tracing::info!(collector = "docker", %reason, "Docker engine not reachable; retrying every interval")
            }
            (Some(true), false) => {
                tracing::warn!(collector = "docker", %reason, "Docker engine went away")
            }
            (Some(false), true) => tracing::info!(collector = "docker", "Docker engine is back"),
            _ => {}
        }
        self.up = Some(up);
    }

    /// Keeps a task reading the engine's container events, marking containers to re-inspect.
    fn watch_events(&mut self, endpoint: String) {
        if self.events.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let changed = self.changed.clone();
        self.events = Some(tokio::spawn(async move {
            loop {
                // The events request lives as long as the stream: a day, not a call timeout.
                if let Ok(docker) = connect(&endpoint, Duration::from_secs(86_400)).await {
                    let filters =
                        HashMap::from([("type".to_owned(), vec!["container".to_owned()])]);
                    let mut stream =
                        docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
                    *changed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Changed::All;
                    while let Some(Ok(event)) = stream.next().await {
                        let Some(id) = event.actor.and_then(|a| a.id) else {
                            continue;
                        };
                        let mut changed = changed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        match &mut *changed {
                            Changed::All => {}
                            Changed::Some(ids) => {
                                ids.insert(id);
                            }
                            nothing @ Changed::Nothing => {
                                *nothing = Changed::Some(HashSet::from([id]))
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }));
    }

    async fn read(&mut self, docker: &Docker) -> Result<DockerSample, bollard::errors::Error> {
        let info = docker.info().await?;
        let nvidia_runtime = info
            .runtimes
            .is_some_and(|r| r.keys().any(|name| name.contains("nvidia")));
        let list = docker
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
            .await?;
        let changed = std::mem::take(
            &mut *self
                .changed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let ids: HashSet<String> = list.iter().filter_map(|c| c.id.clone()).collect();
        self.restarts.retain(|id, _| ids.contains(id));

        let mut containers = Vec::with_capacity(list.len());
        for summary in list {
            let Some(id) = summary.id else { continue };
            if !self.restarts.contains_key(&id) || changed.includes(&id) {
                match docker.inspect_container(&id, None).await {
                    Ok(inspect) => {
                        self.restarts
                            .insert(id.clone(), inspect.restart_count.unwrap_or(0));
                    }
                    // Removed between list and inspect: it will be gone next cycle.
                    Err(err) => {
                        tracing::debug!(collector = "docker", container = %id, error = %err, "inspect failed")
                    }
                }
            }
            let name = summary
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.chars().take(12).collect());
            // Engines since API 1.49 list the health; older ones only say it in the status text.
            let health = match summary.health.and_then(|h| h.status) {
                Some(ContainerSummaryHealthStatusEnum::HEALTHY) => Health::Healthy,
                Some(ContainerSummaryHealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
                Some(ContainerSummaryHealthStatusEnum::STARTING) => Health::Starting,
                _ => Health::from_status_text(summary.status.as_deref().unwrap_or("")),
            };
            let running = summary
                .state
                .is_some_and(|s| s == ContainerSummaryStateEnum::RUNNING);
            let published_ports = summary
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| Some((p.private_port, p.public_port?)))
                .collect();
            containers.push(ContainerState {
                restarts: self.restarts.get(&id).copied(),
                id,
                name,
                image: summary.image.unwrap_or_default(),
                running,
                health,
                published_ports,
            });
        }
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(DockerSample {
            nvidia_runtime,
            containers,
        })
    }
}

impl Collector for DockerCollector {
    type Sample = DockerSample;

    async fn sample(&mut self, _now: Instant) -> Result<DockerSample, CollectorError> {
        let endpoint = endpoint(&self.socket);
        let docker = match self.client.clone() {
            Some(docker) => docker,
            None => match connect(&endpoint, self.timeout).await {
                Ok(docker) => docker,
                Err(err) => {
                    let err = unreachable(err);
                    self.note_up(false, &err.to_string());
                    return Err(err);
                }
            },
        };
        match self.read(&docker).await {
            Ok(sample) => {
                self.client = Some(docker);
                self.watch_events(endpoint);
                self.note_up(true, "");
                Ok(sample)
            }
            Err(err) => {
                self.client = None;
                let err = unreachable(err);
                self.note_up(false, &err.to_string());
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_status_text() {
        assert_eq!(
            Health::from_status_text("Up 5 minutes (healthy)"),
            Health::Healthy
        );
        assert_eq!(
            Health::from_status_text("Up 2 minutes (unhealthy)"),
            Health::Unhealthy
        );
        assert_eq!(
            Health::from_status_text("Up 1 second (health: starting)"),
            Health::Starting
        );
        assert_eq!(Health::from_status_text("Up 3 hours"), Health::None);
        assert_eq!(
            Health::from_status_text("Exited (0) 2 days ago"),
            Health::None
        );
        assert_eq!(Health::from_status_text(""), Health::None);
    }

    #[tokio::test]
    async fn a_missing_socket_is_no_data() {
        let config = DockerConfig {
            socket: "unix:///nonexistent/docker.sock".into(),
        };
        if std::env::var_os("DOCKER_HOST").is_some() {
            return;
        }
        let mut docker = DockerCollector::new(&config, Duration::from_secs(1));
        let err = docker.sample(Instant::now()).await.unwrap_err();
        assert!(err.is_no_data(), "{err}");
        assert!(
            err.to_string().contains("docker engine unreachable"),
            "{err}"
        );
    }
}
