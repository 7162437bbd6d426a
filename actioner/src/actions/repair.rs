//! `repair`: brings an allowlisted container that is unhealthy back.
//!
//! It re-checks first and leaves alone a container that is healthy again, still starting, or
//! not running — a container someone stopped stays stopped. Then it restarts it with its own
//! stop timeout and waits for it to report healthy; if it does not within `healthy_timeout`,
//! it recreates it from its own config (image, command, environment, ports, devices, every
//! volume and network) and waits again; if that does not help either, the run fails with the
//! last health check's output. At most `max_attempts` repairs per target per `window` are
//! planned; past that the rule is skipped ("repairs exhausted") and
//! `aistack_actioner_repair_exhausted{target}` says so, for an alert to reach a person.
//!
//! A Kubernetes Deployment (`namespace/name`) gets a rollout restart — the pod-template
//! annotation `kubectl rollout restart` sets — when it is still short of available replicas,
//! is not scaled to 0 (stopped on purpose) and no rollout is already under way; then the run
//! waits up to `healthy_timeout` for the rollout to finish. Readiness probes say what healthy
//! means there, as health checks do on Docker.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Action, ActionError, Job};
use crate::config::{ActionKind, RepairConfig};
use crate::docker::DockerControl;
use crate::kubernetes::KubeControl;

/// Repairs containers.
#[derive(Debug)]
pub struct Repair {
    docker: DockerControl,
    kube: KubeControl,
    containers: Vec<String>,
    deployments: Vec<String>,
    healthy_timeout: Duration,
}

impl Repair {
    /// Repairs the allowlisted containers of `config`.
    pub fn new(config: &RepairConfig, docker: DockerControl, kube: KubeControl) -> Self {
        Self {
            docker,
            kube,
            containers: config.docker.containers.clone(),
            deployments: config.kubernetes.deployments.clone(),
            healthy_timeout: config.healthy_timeout.into(),
        }
    }

    async fn repair(&self, name: &str) -> Result<String, ActionError> {
        if self.deployments.iter().any(|d| d == name) {
            return self.restart_deployment(name).await;
        }
        if !self.containers.iter().any(|c| c == name) {
            return Err(ActionError::Failed(format!(
                "{name} is neither a docker container nor a kubernetes deployment of actions.repair"
            )));
        }
        let failed = ActionError::Failed;
        let view = self
            .docker
            .inspect(name)
            .await
            .map_err(failed)?
            .ok_or_else(|| ActionError::Failed(format!("no container named {name}")))?;
        if !view.running {
            return Err(ActionError::ConditionGone(format!(
                "{name} is not running: stopped on purpose, left as it is"
            )));
        }
        if view.restarting {
            return Err(ActionError::ConditionGone(format!(
                "{name} is being restarted by its restart policy"
            )));
        }
        if view.health != "unhealthy" {
            return Err(ActionError::ConditionGone(format!(
                "{name} is {} now",
                view.health
            )));
        }
        self.docker
            .restart(name, view.stop_timeout)
            .await
            .map_err(failed)?;
        if let Ok(took) = self.docker.wait_healthy(name, self.healthy_timeout).await {
            return Ok(format!(
                "restarted {name}; healthy after {:.1}s",
                took.as_secs_f64()
            ));
        }
        self.docker.recreate(name).await.map_err(|why| {
            ActionError::Failed(format!("restart did not help; recreating failed: {why}"))
        })?;
        match self.docker.wait_healthy(name, self.healthy_timeout).await {
            Ok(took) => Ok(format!(
                "recreated {name}; healthy after {:.1}s",
                took.as_secs_f64()
            )),
            Err(last) => Err(ActionError::Failed(format!(
                "{name} still {} after a restart and a recreate; last check: {}",
                last.health,
                last.last_check.as_deref().unwrap_or("no output")
            ))),
        }
    }
}

impl Repair {
    async fn restart_deployment(&self, target: &str) -> Result<String, ActionError> {
        let (namespace, name) = target
            .split_once('/')
            .ok_or_else(|| ActionError::Failed(format!("{target} is not namespace/name")))?;
        let failed = ActionError::Failed;
        let view = self
            .kube
            .deployment(namespace, name)
            .await
            .map_err(failed)?;
        if view.replicas == 0 {
            return Err(ActionError::ConditionGone(format!(
                "{target} is scaled to 0: stopped on purpose, left as it is"
            )));
        }
        if view.rolling() {
            return Err(ActionError::ConditionGone(format!(
                "{target} is being rolled out already ({})",
                view.availability()
            )));
        }
        if view.available >= view.replicas {
            return Err(ActionError::ConditionGone(format!(
                "{target} is healthy now ({})",
                view.availability()
            )));
        }
        let before = view.availability();
        self.kube
            .rollout_restart(namespace, name)
            .await
            .map_err(failed)?;
        match self
            .kube
            .wait_for(namespace, name, self.healthy_timeout, |d| d.rolled_out())
            .await
        {
            Ok((took, after)) => Ok(format!(
                "rollout restart of {target}: {before} before, {} after {:.1}s",
                after.availability(),
                took.as_secs_f64()
            )),
            Err((why, _)) => Err(ActionError::Failed(format!(
                "rollout restart of {target} did not finish: {why}"
            ))),
        }
    }
}

impl Action for Repair {
    fn kind(&self) -> ActionKind {
        ActionKind::Repair
    }

    fn timeout(&self) -> Duration {
        2 * self.healthy_timeout + Duration::from_secs(180)
    }

    fn concurrency(&self) -> usize {
        2
    }

    fn describe(&self, job: &Job) -> String {
        let target = job.plan.target.as_deref().unwrap_or("?");
        if self.deployments.iter().any(|d| d == target) {
            format!(
                "would rollout-restart {target} if it is still short of available replicas, and wait for the rollout"
            )
        } else {
            format!(
                "would restart {target} if it is still unhealthy, and recreate it if that does not help"
            )
        }
    }

    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let target = job.plan.target.as_deref().unwrap_or_default();
            self.repair(target).await
        })
    }
}
