//! `failover` and `failback`: move inference from the primary (vLLM) to the fallback (Ollama)
//! while the GPU is wanted for something else — a game — and back when it is free.
//!
//! On Docker: failover stops the primary container (its VRAM is freed), starts the fallback if
//! it is not running and waits for `fallback_health_url`; failback re-checks that no host
//! workload holds the GPU — positive evidence only: the exporter's `GET /api/v1/gpu` answers,
//! NVML is up, the sample is fresh, and no GPU has host workload (a manual trigger may say
//! `"force": true`) — starts the primary and waits for `primary_health_url` — and if it does
//! not answer within
//! `primary_timeout`, stops it again and stays on the fallback. Both are idempotent: failing
//! over while on the fallback (or back while on the primary) changes nothing and says so.
//!
//! On Kubernetes: failover scales the primary Deployment to 0 and waits until no pod of it runs
//! (nor terminates, where the API server says), makes sure the fallback Deployment has a ready
//! replica and answers `fallback_health_url`, then points the Service at the fallback's pod
//! selector — and points it there also when the fallback does not come up in time, since the
//! primary is gone either way. Failback
//! re-checks the GPU as on Docker, scales the primary back to its replica count from before
//! the failover, waits for a ready replica and `primary_health_url`, and only then points the
//! Service back; if the primary does not come up within `primary_timeout`, it is scaled to 0
//! again and the Service stays on the fallback.
//!
//! Containers are looked up by their exact name and then acted on by the id the engine
//! returned, never by a name the engine might resolve as an id prefix. Failover and failback
//! never run at once: the executor gives both one lane, so a resolution that arrives during a
//! failover is decided after it ends, against the state it left.
//!
//! The current backend is kept in the journal (see `GET /api/v1/state`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aistack_common::api::{GPU_PATH, GpuReport};
use aistack_common::config::{HumanDuration, Problems, check_http_url};
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{Action, ActionError, Job, RunContext, SetupError, http_client, recheck_client};
use crate::docker::DockerControl;
use crate::exporter::ExporterUrl;
use crate::kubernetes::{KubeControl, REPLICAS_BEFORE_FAILOVER};
use crate::poll;
use crate::vocab::ActionKind;

/// `actions.failover`: where the two inference services run, how to tell they serve — one
/// pair for the cluster (or the host), or one pair per GPU node (`nodes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "FailoverFile")]
pub struct FailoverConfig {
    /// The pair when one serves the cluster (or the one host).
    pub pair: Pair,
    /// One pair per GPU node, by the node's name as alerts name it (their `host` label, else
    /// the host part of `instance`). When set, a failover or failback is about one node: its
    /// target, its own pair, its own state, its own exporter's re-check.
    pub nodes: BTreeMap<String, Pair>,
    /// How long the fallback may take to answer after failing over (default 2m).
    pub fallback_timeout: HumanDuration,
    /// How long the primary may take to load its model and answer after failing back
    /// (default 15m); past it the fallback stays.
    pub primary_timeout: HumanDuration,
}

/// One vLLM/Ollama pair: where the two run and how to tell they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// The platform and its settings.
    pub platform: Platform,
    /// Health URL of the primary (vLLM), checked before failing back.
    pub primary_health_url: String,
    /// Health URL of the fallback (Ollama), checked after failing over.
    pub fallback_health_url: String,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverFile::default().into()
    }
}

/// Where the inference services run, with that platform's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platform {
    /// Containers on this host's Docker engine.
    Docker(DockerFailover),
    /// Deployments and a Service in a Kubernetes cluster.
    Kubernetes(KubernetesFailover),
    /// `platform` names one whose section is missing: failover and failback are unavailable
    /// (check-config says so when a rule or button uses them).
    Unconfigured(PlatformKind),
}

/// The `platform` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformKind {
    /// The Docker engine on this host.
    #[default]
    Docker,
    /// A Kubernetes cluster.
    Kubernetes,
}

impl PlatformKind {
    /// The key of its section.
    pub const fn key(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// `actions.failover.docker`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerFailover {
    /// Primary container name.
    pub primary: String,
    /// Fallback container name.
    pub fallback: String,
}

/// `actions.failover.kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesFailover {
    /// Namespace of both Deployments and the Service.
    pub namespace: String,
    /// Primary Deployment.
    pub primary: String,
    /// Fallback Deployment.
    pub fallback: String,
    /// The Service clients use, re-pointed between the two.
    pub service: String,
}

/// `actions.failover` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FailoverFile {
    platform: PlatformKind,
    docker: Option<DockerFailover>,
    kubernetes: Option<KubernetesFailover>,
    primary_health_url: String,
    fallback_health_url: String,
    fallback_timeout: HumanDuration,
    primary_timeout: HumanDuration,
    nodes: BTreeMap<String, PairFile>,
}

/// `actions.failover.nodes.<node>` as written: its platform's section; the health URLs
/// default to `actions.failover`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairFile {
    docker: Option<DockerFailover>,
    kubernetes: Option<KubernetesFailover>,
    primary_health_url: Option<String>,
    fallback_health_url: Option<String>,
}

impl Default for FailoverFile {
    fn default() -> Self {
        Self {
            platform: PlatformKind::Docker,
            docker: None,
            kubernetes: None,
            primary_health_url: "http://127.0.0.1:8000/health".into(),
            fallback_health_url: "http://127.0.0.1:11434/api/tags".into(),
            fallback_timeout: HumanDuration::from_secs(120),
            primary_timeout: HumanDuration::from_secs(900),
            nodes: BTreeMap::new(),
        }
    }
}

impl Platform {
    fn of(
        kind: PlatformKind,
        docker: Option<DockerFailover>,
        kubernetes: Option<KubernetesFailover>,
    ) -> Self {
        match (kind, docker, kubernetes) {
            (PlatformKind::Docker, Some(docker), _) => Self::Docker(docker),
            (PlatformKind::Kubernetes, _, Some(kubernetes)) => Self::Kubernetes(kubernetes),
            (kind, _, _) => Self::Unconfigured(kind),
        }
    }
}

impl From<FailoverFile> for FailoverConfig {
    fn from(file: FailoverFile) -> Self {
        let nodes = file
            .nodes
            .into_iter()
            .map(|(node, pair)| {
                let pair = Pair {
                    platform: Platform::of(file.platform, pair.docker, pair.kubernetes),
                    primary_health_url: pair
                        .primary_health_url
                        .unwrap_or_else(|| file.primary_health_url.clone()),
                    fallback_health_url: pair
                        .fallback_health_url
                        .unwrap_or_else(|| file.fallback_health_url.clone()),
                };
                (node, pair)
            })
            .collect();
        Self {
            pair: Pair {
                platform: Platform::of(file.platform, file.docker, file.kubernetes),
                primary_health_url: file.primary_health_url,
                fallback_health_url: file.fallback_health_url,
            },
            nodes,
            fallback_timeout: file.fallback_timeout,
            primary_timeout: file.primary_timeout,
        }
    }
}

impl Pair {
    /// Problems with its URLs and its two services (paths under `at`).
    fn validate(&self, problems: &mut Problems, at: &str) {
        check_http_url(
            problems,
            format!("{at}.primary_health_url"),
            &self.primary_health_url,
        );
        check_http_url(
            problems,
            format!("{at}.fallback_health_url"),
            &self.fallback_health_url,
        );
        let (key, same) = match &self.platform {
            Platform::Docker(d) => ("docker", d.primary == d.fallback),
            Platform::Kubernetes(k) => ("kubernetes", k.primary == k.fallback),
            Platform::Unconfigured(_) => return,
        };
        problems.check(
            !same,
            format!("{at}.{key}.fallback"),
            "must differ from primary",
        );
    }
}

impl Pair {
    /// What it moves and asks, each with its key: the two Deployments (or containers), the
    /// Service, the two health URLs.
    fn claims(&self) -> Vec<(&'static str, String)> {
        let mut claims = vec![
            ("primary_health_url", self.primary_health_url.clone()),
            ("fallback_health_url", self.fallback_health_url.clone()),
        ];
        match &self.platform {
            Platform::Kubernetes(k) => claims.extend([
                (
                    "kubernetes.primary",
                    format!("Deployment {}/{}", k.namespace, k.primary),
                ),
                (
                    "kubernetes.fallback",
                    format!("Deployment {}/{}", k.namespace, k.fallback),
                ),
                (
                    "kubernetes.service",
                    format!("Service {}/{}", k.namespace, k.service),
                ),
            ]),
            Platform::Docker(d) => claims.extend([
                ("docker.primary", format!("container {}", d.primary)),
                ("docker.fallback", format!("container {}", d.fallback)),
            ]),
            Platform::Unconfigured(_) => {}
        }
        claims
    }
}

impl FailoverConfig {
    /// Problems with the URLs and the services of every pair (paths under
    /// `actions.failover`).
    pub fn validate(&self, problems: &mut Problems) {
        const AT: &str = "actions.failover";
        if self.nodes.is_empty() {
            self.pair.validate(problems, AT);
            return;
        }
        if !matches!(self.pair.platform, Platform::Unconfigured(_)) {
            problems.push(
                AT,
                "set one pair (docker/kubernetes) for the cluster or `nodes`, a pair per GPU node, not both",
            );
        }
        // What each pair moves and asks: no two pairs may share one, or a run on one node
        // would move (or take the health of) another node's.
        let mut owners: BTreeMap<String, &str> = BTreeMap::new();
        for (node, pair) in &self.nodes {
            let at = format!("{AT}.nodes.{node}");
            if let Platform::Docker(_) = pair.platform {
                problems.push(
                    &at,
                    "a pair per node needs platform: kubernetes (the actioner drives one Docker engine, its own host's)",
                );
            }
            for (what, used) in pair.claims() {
                if let Some(other) = owners.insert(used.clone(), node) {
                    problems.push(
                        format!("{at}.{what}"),
                        format!(
                            "{used} is also nodes.{other}'s: each node needs a pair of its own"
                        ),
                    );
                }
            }
            problems.check(
                crate::exporter::valid_node(node),
                &at,
                format!(
                    "{node:?} is not a node name (a host name or an IP address, as alerts name it)"
                ),
            );
            if let Platform::Unconfigured(kind) = pair.platform {
                problems.push(&at, format!("needs its {} section", kind.key()));
            }
            pair.validate(problems, &at);
        }
    }

    /// `None` when failover can run; otherwise the section it needs.
    pub fn missing_section(&self) -> Option<&'static str> {
        match self.pair.platform {
            _ if !self.nodes.is_empty() => None,
            Platform::Unconfigured(kind) => Some(kind.key()),
            _ => None,
        }
    }

    /// The pair a run on `target` moves: the node's own where pairs are per node, else the
    /// one pair.
    fn pair_of(&self, target: Option<&str>) -> Result<&Pair, ActionError> {
        match target {
            None if self.nodes.is_empty() => Ok(&self.pair),
            None => Err(ActionError::Failed(
                "each GPU node has its own pair (actions.failover.nodes): the run names none"
                    .into(),
            )),
            Some(node) => self.nodes.get(node).ok_or_else(|| {
                ActionError::Failed(format!("no pair for node {node} in actions.failover.nodes"))
            }),
        }
    }
}

/// GETs `url` until it answers 2xx, for up to `timeout`.
pub async fn wait_http(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let probed = poll::until(timeout, Duration::from_millis(500), || async {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_connect() => Err("connection refused".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    probed.map(|((), took)| took).map_err(|last| {
        format!(
            "{url} did not answer within {}s ({last})",
            timeout.as_secs()
        )
    })
}

/// One direction of the move.
#[derive(Debug)]
pub struct Failover {
    to_fallback: bool,
    config: FailoverConfig,
    docker: DockerControl,
    kube: KubeControl,
    exporter: ExporterUrl,
    /// Nodes a failback re-checks besides the run's own (`gpu_nodes`).
    gpu_nodes: Vec<String>,
    client: reqwest::Client,
    recheck: reqwest::Client,
}

impl Failover {
    /// `failover` (`to_fallback`) or `failback`, as configured; `None` when the platform's
    /// section is missing.
    pub fn new(
        to_fallback: bool,
        config: &FailoverConfig,
        docker: DockerControl,
        kube: KubeControl,
        exporter: &ExporterUrl,
        gpu_nodes: &[String],
    ) -> Result<Option<Self>, SetupError> {
        if config.missing_section().is_some() {
            return Ok(None);
        }
        Ok(Some(Self {
            to_fallback,
            config: config.clone(),
            docker,
            kube,
            exporter: exporter.clone(),
            gpu_nodes: gpu_nodes.to_vec(),
            client: http_client(Duration::from_secs(2), Duration::from_secs(5))?,
            recheck: recheck_client(Duration::from_secs(2), Duration::from_secs(5))?,
        }))
    }

    async fn failover(&self, target: Option<&str>) -> Result<String, ActionError> {
        let pair = self.config.pair_of(target)?;
        match &pair.platform {
            Platform::Docker(d) => self.failover_docker(pair, d).await,
            Platform::Kubernetes(k) => self.failover_kubernetes(pair, k).await,
            Platform::Unconfigured(kind) => Err(unconfigured(*kind)),
        }
    }

    /// Fails `target`'s pair back (the one pair when `None`), after the GPU check on `node` —
    /// the pair's own node where pairs are per node.
    async fn failback(
        &self,
        force: bool,
        target: Option<&str>,
        node: Option<&str>,
    ) -> Result<String, ActionError> {
        let pair = self.config.pair_of(target)?;
        if !force {
            self.gpu_is_free(target, node).await?;
        }
        let done = match &pair.platform {
            Platform::Docker(d) => self.failback_docker(pair, d).await,
            Platform::Kubernetes(k) => self.failback_kubernetes(pair, k).await,
            Platform::Unconfigured(kind) => Err(unconfigured(*kind)),
        }?;
        Ok(if force {
            format!("{done} (forced: the GPU check was skipped)")
        } else {
            done
        })
    }

    async fn failover_docker(
        &self,
        pair: &Pair,
        d: &DockerFailover,
    ) -> Result<String, ActionError> {
        let (primary, fallback) = (d.primary.as_str(), d.fallback.as_str());
        let p = self.docker.inspect(primary).await?;
        let f = self
            .docker
            .inspect(fallback)
            .await?
            .ok_or_else(|| ActionError::Failed(format!("no container named {fallback}")))?;
        if !p.as_ref().is_some_and(|p| p.running) && f.running {
            return Ok(format!(
                "already on the fallback: {primary} stopped, {fallback} running"
            ));
        }
        let started = Instant::now();
        if let Some(p) = p.filter(|p| p.running) {
            self.docker.stop(&p).await?;
        }
        self.docker.start(&f).await?;
        wait_http(
            &self.client,
            &pair.fallback_health_url,
            self.config.fallback_timeout.into(),
        )
        .await
        .map_err(|why| {
            ActionError::Failed(format!(
                "{primary} stopped, but {fallback} is not healthy: {why}"
            ))
        })?;
        Ok(format!(
            "{primary} stopped (VRAM freed), {fallback} serving, in {:.1}s",
            started.elapsed().as_secs_f64()
        ))
    }

    /// Where failback re-checks the GPU: the exporter of a per-node pair's own node; for the
    /// one pair, of the run's `node` and of every one in `gpu_nodes` (where `exporter_url`
    /// names the node), or the one exporter.
    fn recheck_urls(
        &self,
        target: Option<&str>,
        node: Option<&str>,
    ) -> Result<Vec<String>, String> {
        match target {
            Some(pair_node) => self.exporter.urls(Some(pair_node), &[], GPU_PATH),
            None => self.exporter.urls(node, &self.gpu_nodes, GPU_PATH),
        }
    }

    /// Failback's re-check: the exporters of [`Self::recheck_urls`] show, positively, that no
    /// host workload holds a GPU. A run whose node cannot be named fails (and pages): it is
    /// not a condition that passes.
    async fn gpu_is_free(
        &self,
        target: Option<&str>,
        node: Option<&str>,
    ) -> Result<(), ActionError> {
        let urls = self
            .recheck_urls(target, node)
            .map_err(|why| ActionError::Failed(format!("cannot re-check the GPU: {why}")))?;
        for url in &urls {
            self.gpu_is_free_at(url).await?;
        }
        Ok(())
    }

    async fn gpu_is_free_at(&self, url: &str) -> Result<(), ActionError> {
        let gone = |why: String| {
            ActionError::ConditionGone(format!("cannot confirm the GPU is free: {why}"))
        };
        let response = self
            .recheck
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| gone(format!("{url} ({e})")))?;
        let report: GpuReport = response
            .json()
            .await
            .map_err(|e| gone(format!("unexpected answer from {url}: {e}")))?;
        report.confirm_free().map_err(|why| {
            let why = if self.exporter.per_node() {
                format!("{why} (at {url})")
            } else {
                why
            };
            if why.starts_with("host workload") {
                ActionError::ConditionGone(why)
            } else {
                gone(why)
            }
        })
    }

    async fn failback_docker(
        &self,
        pair: &Pair,
        d: &DockerFailover,
    ) -> Result<String, ActionError> {
        let primary = d.primary.as_str();
        let p = self
            .docker
            .inspect(primary)
            .await?
            .ok_or_else(|| ActionError::Failed(format!("no container named {primary}")))?;
        let timeout: Duration = self.config.primary_timeout.into();
        if p.running
            && wait_http(
                &self.client,
                &pair.primary_health_url,
                Duration::from_secs(2),
            )
            .await
            .is_ok()
        {
            return Ok(format!(
                "already on the primary: {primary} running and healthy"
            ));
        }
        self.docker.start(&p).await?;
        match wait_http(&self.client, &pair.primary_health_url, timeout).await {
            Ok(took) => Ok(format!(
                "{primary} serving again after {:.1}s",
                took.as_secs_f64()
            )),
            Err(why) => {
                // Half-loaded, it would hold VRAM for nothing: stop it and stay on the fallback.
                let _ = self.docker.stop(&p).await;
                Err(ActionError::Failed(format!(
                    "staying on the fallback: {why}"
                )))
            }
        }
    }
}

fn unconfigured(kind: PlatformKind) -> ActionError {
    ActionError::Failed(format!("actions.failover.{} is not configured", kind.key()))
}

impl Failover {
    async fn failover_kubernetes(
        &self,
        pair: &Pair,
        k: &KubernetesFailover,
    ) -> Result<String, ActionError> {
        let ns = k.namespace.as_str();
        let p = self.kube.deployment(ns, &k.primary).await?;
        let f = self.kube.deployment(ns, &k.fallback).await?;
        let selector = self.kube.service_selector(ns, &k.service).await?;
        if p.scaled_down() && f.available >= 1 && selector == f.selector {
            return Ok(format!(
                "already on the fallback: {} scaled to 0, {} {}, Service {} on it",
                k.primary,
                k.fallback,
                f.availability(),
                k.service
            ));
        }
        let started = Instant::now();
        let timeout: Duration = self.config.fallback_timeout.into();
        if p.replicas > 0 {
            // Remembered on the Deployment itself, for failback to restore.
            let replicas = p.replicas.to_string();
            self.kube
                .annotate(ns, &k.primary, REPLICAS_BEFORE_FAILOVER, Some(&replicas))
                .await?;
            self.kube.scale(ns, &k.primary, 0).await?;
        }
        self.kube
            .wait_for(ns, &k.primary, timeout, |d| d.scaled_down())
            .await
            .map_err(|(why, _)| {
                ActionError::Failed(format!("{} did not scale down: {why}", k.primary))
            })?;
        if f.replicas == 0 {
            self.kube.scale(ns, &k.fallback, 1).await?;
        }
        let left = timeout.saturating_sub(started.elapsed());
        let serving = match self
            .kube
            .wait_for(ns, &k.fallback, left, |d| d.observed() && d.available >= 1)
            .await
        {
            Ok(_) => {
                let left = timeout.saturating_sub(started.elapsed());
                wait_http(&self.client, &pair.fallback_health_url, left)
                    .await
                    .map(drop)
                    .map_err(|why| format!("{} is not healthy: {why}", k.fallback))
            }
            Err((why, _)) => Err(format!("{} has no ready replica: {why}", k.fallback)),
        };
        // The primary is gone either way: the Service points at the fallback, which may still
        // come up, rather than at nothing.
        let repointed = self
            .kube
            .set_service_selector(ns, &k.service, &selector, &f.selector)
            .await;
        if let Err(why) = serving {
            let service = match repointed {
                Ok(()) => format!("Service {} on {}", k.service, k.fallback),
                Err(e) => e.to_string(),
            };
            return Err(ActionError::Failed(format!(
                "{} scaled to 0, but {why}; {service}",
                k.primary
            )));
        }
        repointed?;
        Ok(format!(
            "{} scaled to 0 (VRAM freed), {} serving, Service {} on it, in {:.1}s",
            k.primary,
            k.fallback,
            k.service,
            started.elapsed().as_secs_f64()
        ))
    }

    async fn failback_kubernetes(
        &self,
        pair: &Pair,
        k: &KubernetesFailover,
    ) -> Result<String, ActionError> {
        let ns = k.namespace.as_str();
        let p = self.kube.deployment(ns, &k.primary).await?;
        let selector = self.kube.service_selector(ns, &k.service).await?;
        if p.replicas > 0 && p.available >= 1 && selector == p.selector {
            return Ok(format!(
                "already on the primary: {} {}, Service {} on it",
                k.primary,
                p.availability(),
                k.service
            ));
        }
        let started = Instant::now();
        let timeout: Duration = self.config.primary_timeout.into();
        let replicas = p
            .annotations
            .get(REPLICAS_BEFORE_FAILOVER)
            .and_then(|r| r.parse::<i32>().ok())
            .filter(|r| *r > 0)
            .unwrap_or(1);
        if p.replicas == 0 {
            self.kube.scale(ns, &k.primary, replicas).await?;
        }
        let ready = self
            .kube
            .wait_for(ns, &k.primary, timeout, |d| {
                d.observed() && d.available >= 1
            })
            .await
            .map_err(|(why, _)| why.to_string());
        let healthy = match ready {
            Ok(_) => {
                let left = timeout.saturating_sub(started.elapsed());
                wait_http(&self.client, &pair.primary_health_url, left).await
            }
            Err(why) => Err(why),
        };
        if let Err(why) = healthy {
            // Half-loaded, it would hold VRAM for nothing: back to 0, the fallback serves on.
            let _ = self.kube.scale(ns, &k.primary, 0).await;
            return Err(ActionError::Failed(format!(
                "staying on the fallback: {why}"
            )));
        }
        self.kube
            .set_service_selector(ns, &k.service, &selector, &p.selector)
            .await?;
        self.kube
            .annotate(ns, &k.primary, REPLICAS_BEFORE_FAILOVER, None)
            .await?;
        Ok(format!(
            "{} serving again ({} replicas), Service {} on it, after {:.1}s",
            k.primary,
            replicas.max(p.replicas),
            k.service,
            started.elapsed().as_secs_f64()
        ))
    }
}

impl Action for Failover {
    fn kind(&self) -> ActionKind {
        if self.to_fallback {
            ActionKind::Failover
        } else {
            ActionKind::Failback
        }
    }

    /// One run per pair at once (their lanes keep each pair's runs in order).
    fn concurrency(&self) -> usize {
        self.config.nodes.len().max(1)
    }

    fn timeout(&self) -> Duration {
        let wait: Duration = if self.to_fallback {
            self.config.fallback_timeout.into()
        } else {
            self.config.primary_timeout.into()
        };
        wait + Duration::from_secs(120)
    }

    fn describe(&self, job: &Job) -> String {
        let target = job.plan.target.as_deref();
        let pair = match self.config.pair_of(target) {
            Ok(pair) => pair,
            Err(why) => return format!("would fail: {why}"),
        };
        let check = if job.force {
            "skip the GPU check (forced)".to_owned()
        } else {
            match self.recheck_urls(target, job.node.as_deref()) {
                Ok(urls) => format!("check {} for host workload", urls.join(", ")),
                Err(why) if !self.to_fallback => return format!("would fail: {why}"),
                Err(_) => String::new(),
            }
        };
        match (&pair.platform, self.to_fallback) {
            (Platform::Kubernetes(k), true) => format!(
                "would scale {ns}/{} to 0, make sure {ns}/{} has a ready replica and answers {}, and point Service {ns}/{} at it",
                k.primary,
                k.fallback,
                pair.fallback_health_url,
                k.service,
                ns = k.namespace
            ),
            (Platform::Kubernetes(k), false) => format!(
                "would {check}, scale {ns}/{} back up, wait for {} and point Service {ns}/{} at it",
                k.primary,
                pair.primary_health_url,
                k.service,
                ns = k.namespace
            ),
            (Platform::Docker(d), true) => format!(
                "would stop {}, start {} and wait for {}",
                d.primary, d.fallback, pair.fallback_health_url
            ),
            (Platform::Docker(d), false) => format!(
                "would {check}, start {} and wait for {}",
                d.primary, pair.primary_health_url
            ),
            (Platform::Unconfigured(kind), _) => format!("would fail: {}", unconfigured(*kind)),
        }
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        _context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        let target = job.plan.target.as_deref();
        if self.to_fallback {
            Box::pin(self.failover(target))
        } else {
            Box::pin(self.failback(job.force, target, job.node.as_deref()))
        }
    }
}
