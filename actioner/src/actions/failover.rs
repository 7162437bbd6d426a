//! `failover` and `failback`: move inference from the primary (vLLM) to the fallback (Ollama)
//! while the GPU is wanted for something else — a game — and back when it is free.
//!
//! On Docker: failover stops the primary container (its VRAM is freed), starts the fallback if
//! it is not running and waits for `fallback_health_url`; failback re-checks that no host
//! workload holds the GPU (the exporter's `aistack_gpu_host_workload_active`), starts the
//! primary and waits for `primary_health_url` — and if it does not answer within
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
//! The current backend is kept in the journal (see `GET /api/v1/state`).

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::{Action, ActionError, Job};
use crate::config::{ActionKind, FailoverConfig, KubernetesFailover, Platform};
use crate::docker::DockerControl;
use crate::kubernetes::{KubeControl, REPLICAS_BEFORE_FAILOVER};

/// Polls `url` until it answers 2xx, for up to `timeout`.
pub async fn wait_http(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no answer");
    while started.elapsed() < timeout {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(started.elapsed()),
            Ok(r) => last = format!("HTTP {}", r.status().as_u16()),
            Err(e) => {
                last = if e.is_connect() {
                    "connection refused".into()
                } else {
                    e.to_string()
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!(
        "{url} did not answer within {}s ({last})",
        timeout.as_secs()
    ))
}

/// Whether the exporter's metrics show host workload on any GPU.
pub fn host_workload_active(metrics: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with("aistack_gpu_host_workload_active{")
            && l.rsplit(' ')
                .next()
                .is_some_and(|v| v.parse::<f64>().is_ok_and(|v| v >= 1.0))
    })
}

/// One direction of the move.
#[derive(Debug)]
pub struct Failover {
    to_fallback: bool,
    config: FailoverConfig,
    docker: DockerControl,
    kube: KubeControl,
    exporter_metrics: String,
    client: reqwest::Client,
}

impl Failover {
    /// `failover` (`to_fallback`) or `failback`, as configured.
    pub fn new(
        to_fallback: bool,
        config: &FailoverConfig,
        docker: DockerControl,
        kube: KubeControl,
        exporter_url: &str,
    ) -> Result<Self, String> {
        aistack_common::install_tls_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            to_fallback,
            config: config.clone(),
            docker,
            kube,
            exporter_metrics: format!("{}/metrics", exporter_url.trim_end_matches('/')),
            client,
        })
    }

    fn containers(&self) -> Result<(&str, &str), ActionError> {
        match (self.config.platform, &self.config.docker) {
            (Platform::Docker, Some(d)) => Ok((&d.primary, &d.fallback)),
            (Platform::Docker, None) => Err(ActionError::Failed(
                "actions.failover.docker is not configured".into(),
            )),
            (Platform::Kubernetes, _) => Err(ActionError::Failed(
                "actions.failover.platform is kubernetes, not docker".into(),
            )),
        }
    }

    fn deployments(&self) -> Result<&KubernetesFailover, ActionError> {
        self.config.kubernetes.as_ref().ok_or_else(|| {
            ActionError::Failed("actions.failover.kubernetes is not configured".into())
        })
    }

    async fn failover(&self) -> Result<String, ActionError> {
        match self.config.platform {
            Platform::Docker => self.failover_docker().await,
            Platform::Kubernetes => self.failover_kubernetes().await,
        }
    }

    async fn failback(&self) -> Result<String, ActionError> {
        self.gpu_is_free().await?;
        match self.config.platform {
            Platform::Docker => self.failback_docker().await,
            Platform::Kubernetes => self.failback_kubernetes().await,
        }
    }

    async fn failover_docker(&self) -> Result<String, ActionError> {
        let (primary, fallback) = self.containers()?;
        let failed = ActionError::Failed;
        let p = self.docker.inspect(primary).await.map_err(failed)?;
        let f = self.docker.inspect(fallback).await.map_err(failed)?;
        let f = f.ok_or_else(|| ActionError::Failed(format!("no container named {fallback}")))?;
        if !p.as_ref().is_some_and(|p| p.running) && f.running {
            return Ok(format!(
                "already on the fallback: {primary} stopped, {fallback} running"
            ));
        }
        let started = Instant::now();
        if let Some(p) = p.filter(|p| p.running) {
            self.docker
                .stop(primary, p.stop_timeout)
                .await
                .map_err(failed)?;
        }
        self.docker.start(fallback).await.map_err(failed)?;
        wait_http(
            &self.client,
            &self.config.fallback_health_url,
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

    /// Failback's re-check: the exporter shows no host workload on any GPU.
    async fn gpu_is_free(&self) -> Result<(), ActionError> {
        let metrics = self
            .client
            .get(&self.exporter_metrics)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                ActionError::ConditionGone(format!(
                    "cannot confirm the GPU is free ({}): {e}",
                    self.exporter_metrics
                ))
            })?
            .text()
            .await
            .map_err(|e| {
                ActionError::ConditionGone(format!("cannot confirm the GPU is free: {e}"))
            })?;
        if host_workload_active(&metrics) {
            return Err(ActionError::ConditionGone(
                "host workload still holds a GPU".into(),
            ));
        }
        Ok(())
    }

    async fn failback_docker(&self) -> Result<String, ActionError> {
        let (primary, _) = self.containers()?;
        let failed = ActionError::Failed;
        let p = self
            .docker
            .inspect(primary)
            .await
            .map_err(failed)?
            .ok_or_else(|| ActionError::Failed(format!("no container named {primary}")))?;
        let timeout: Duration = self.config.primary_timeout.into();
        if p.running
            && wait_http(
                &self.client,
                &self.config.primary_health_url,
                Duration::from_secs(2),
            )
            .await
            .is_ok()
        {
            return Ok(format!(
                "already on the primary: {primary} running and healthy"
            ));
        }
        self.docker.start(primary).await.map_err(failed)?;
        match wait_http(&self.client, &self.config.primary_health_url, timeout).await {
            Ok(took) => Ok(format!(
                "{primary} serving again after {:.1}s",
                took.as_secs_f64()
            )),
            Err(why) => {
                // Half-loaded, it would hold VRAM for nothing: stop it and stay on the fallback.
                let _ = self.docker.stop(primary, p.stop_timeout).await;
                Err(ActionError::Failed(format!(
                    "staying on the fallback: {why}"
                )))
            }
        }
    }
}

impl Failover {
    async fn failover_kubernetes(&self) -> Result<String, ActionError> {
        let k = self.deployments()?;
        let (ns, failed) = (k.namespace.as_str(), ActionError::Failed);
        let p = self.kube.deployment(ns, &k.primary).await.map_err(failed)?;
        let f = self
            .kube
            .deployment(ns, &k.fallback)
            .await
            .map_err(failed)?;
        let selector = self
            .kube
            .service_selector(ns, &k.service)
            .await
            .map_err(failed)?;
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
                .await
                .map_err(failed)?;
            self.kube.scale(ns, &k.primary, 0).await.map_err(failed)?;
        }
        self.kube
            .wait_for(ns, &k.primary, timeout, |d| d.scaled_down())
            .await
            .map_err(|(why, _)| {
                ActionError::Failed(format!("{} did not scale down: {why}", k.primary))
            })?;
        if f.replicas == 0 {
            self.kube.scale(ns, &k.fallback, 1).await.map_err(failed)?;
        }
        let left = timeout.saturating_sub(started.elapsed());
        let serving = match self
            .kube
            .wait_for(ns, &k.fallback, left, |d| d.observed() && d.available >= 1)
            .await
        {
            Ok(_) => {
                let left = timeout.saturating_sub(started.elapsed());
                wait_http(&self.client, &self.config.fallback_health_url, left)
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
                Err(e) => e,
            };
            return Err(ActionError::Failed(format!(
                "{} scaled to 0, but {why}; {service}",
                k.primary
            )));
        }
        repointed.map_err(failed)?;
        Ok(format!(
            "{} scaled to 0 (VRAM freed), {} serving, Service {} on it, in {:.1}s",
            k.primary,
            k.fallback,
            k.service,
            started.elapsed().as_secs_f64()
        ))
    }

    async fn failback_kubernetes(&self) -> Result<String, ActionError> {
        let k = self.deployments()?;
        let (ns, failed) = (k.namespace.as_str(), ActionError::Failed);
        let p = self.kube.deployment(ns, &k.primary).await.map_err(failed)?;
        let selector = self
            .kube
            .service_selector(ns, &k.service)
            .await
            .map_err(failed)?;
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
            self.kube
                .scale(ns, &k.primary, replicas)
                .await
                .map_err(failed)?;
        }
        let ready = self
            .kube
            .wait_for(ns, &k.primary, timeout, |d| {
                d.observed() && d.available >= 1
            })
            .await
            .map_err(|(why, _)| why);
        let healthy = match ready {
            Ok(_) => {
                let left = timeout.saturating_sub(started.elapsed());
                wait_http(&self.client, &self.config.primary_health_url, left).await
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
            .await
            .map_err(failed)?;
        self.kube
            .annotate(ns, &k.primary, REPLICAS_BEFORE_FAILOVER, None)
            .await
            .map_err(failed)?;
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

    fn timeout(&self) -> Duration {
        let wait: Duration = if self.to_fallback {
            self.config.fallback_timeout.into()
        } else {
            self.config.primary_timeout.into()
        };
        wait + Duration::from_secs(120)
    }

    fn describe(&self, _job: &Job) -> String {
        if self.config.platform == Platform::Kubernetes {
            return match (self.deployments(), self.to_fallback) {
                (Ok(k), true) => format!(
                    "would scale {ns}/{} to 0, make sure {ns}/{} has a ready replica and answers {}, and point Service {ns}/{} at it",
                    k.primary,
                    k.fallback,
                    self.config.fallback_health_url,
                    k.service,
                    ns = k.namespace
                ),
                (Ok(k), false) => format!(
                    "would check {} for host workload, scale {ns}/{} back up, wait for {} and point Service {ns}/{} at it",
                    self.exporter_metrics,
                    k.primary,
                    self.config.primary_health_url,
                    k.service,
                    ns = k.namespace
                ),
                (Err(e), _) => format!("would fail: {e}"),
            };
        }
        match (self.containers(), self.to_fallback) {
            (Ok((p, f)), true) => format!(
                "would stop {p}, start {f} and wait for {}",
                self.config.fallback_health_url
            ),
            (Ok((p, _)), false) => format!(
                "would check {} for host workload, start {p} and wait for {}",
                self.exporter_metrics, self.config.primary_health_url
            ),
            (Err(e), _) => format!("would fail: {e}"),
        }
    }

    fn run<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, Result<String, ActionError>> {
        if self.to_fallback {
            Box::pin(self.failover())
        } else {
            Box::pin(self.failback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_workload_from_exporter_metrics() {
        let busy = "aistack_gpu_host_workload_active{gpu=\"0\",uuid=\"GPU-1\",name=\"RTX\"} 1.0\naistack_gpu_host_workload_active{gpu=\"1\",uuid=\"GPU-2\",name=\"RTX\"} 0.0\n";
        assert!(host_workload_active(busy));
        assert!(!host_workload_active(&busy.replace(" 1.0", " 0.0")));
        assert!(!host_workload_active("aistack_nvml_up 0\n"));
    }
}
