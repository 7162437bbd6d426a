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

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use aistack_common::config::{HumanDuration, Problems};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer};

use super::{Action, ActionError, Job, RunContext};
use crate::docker::DockerControl;
use crate::kubernetes::KubeControl;
use crate::vocab::ActionKind;

/// `actions.repair`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairConfig {
    /// Containers that may be repaired.
    pub docker: DockerRepair,
    /// Deployments that may be restarted.
    pub kubernetes: KubernetesRepair,
    /// Repairs per target per window before giving up (default 3).
    pub max_attempts: u32,
    /// The window (default 1h).
    pub window: HumanDuration,
    /// How long a repaired container may take to report healthy before the next step
    /// (default 2m).
    pub healthy_timeout: HumanDuration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            docker: DockerRepair::default(),
            kubernetes: KubernetesRepair::default(),
            max_attempts: 3,
            window: HumanDuration::from_secs(3600),
            healthy_timeout: HumanDuration::from_secs(120),
        }
    }
}

/// `actions.repair.docker`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerRepair {
    /// Container names.
    pub containers: Vec<String>,
}

/// `actions.repair.kubernetes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesRepair {
    /// `namespace/name` of each Deployment.
    pub deployments: Vec<DeploymentRef>,
}

/// A Deployment, written `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeploymentRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl FromStr for DeploymentRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("expected namespace/name, got {s:?}")),
        }
    }
}

impl fmt::Display for DeploymentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl<'de> Deserialize<'de> for DeploymentRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl RepairConfig {
    /// Problems with the budget (paths under `actions.repair`).
    pub fn validate(&self, problems: &mut Problems) {
        problems.check(
            self.max_attempts >= 1,
            "actions.repair.max_attempts",
            "must be at least 1",
        );
        problems.check(
            !self.window.0.is_zero(),
            "actions.repair.window",
            "must be more than 0",
        );
    }

    /// Every target repairs may name: the containers, and the Deployments as `namespace/name`.
    pub fn targets(&self) -> impl Iterator<Item = String> + '_ {
        self.docker
            .containers
            .iter()
            .cloned()
            .chain(self.kubernetes.deployments.iter().map(ToString::to_string))
    }
}

/// Repairs containers and Deployments.
#[derive(Debug)]
pub struct Repair {
    docker: DockerControl,
    kube: KubeControl,
    containers: Vec<String>,
    deployments: Vec<DeploymentRef>,
    healthy_timeout: Duration,
}

impl Repair {
    /// Repairs the allowlisted containers and Deployments of `config`.
    pub fn new(config: &RepairConfig, docker: DockerControl, kube: KubeControl) -> Self {
        Self {
            docker,
            kube,
            containers: config.docker.containers.clone(),
            deployments: config.kubernetes.deployments.clone(),
            healthy_timeout: config.healthy_timeout.into(),
        }
    }

    fn deployment(&self, target: &str) -> Option<&DeploymentRef> {
        self.deployments.iter().find(|d| d.to_string() == target)
    }

    async fn repair(&self, name: &str) -> Result<String, ActionError> {
        if let Some(deployment) = self.deployment(name) {
            return self.restart_deployment(deployment).await;
        }
        if !self.containers.iter().any(|c| c == name) {
            return Err(ActionError::Failed(format!(
                "{name} is neither a docker container nor a kubernetes deployment of actions.repair"
            )));
        }
        let view = self
            .docker
            .inspect(name)
            .await?
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
        self.docker.restart(&view).await?;
        if let Ok(took) = self.docker.wait_healthy(&view, self.healthy_timeout).await {
            return Ok(format!(
                "restarted {name}; healthy after {:.1}s",
                took.as_secs_f64()
            ));
        }
        self.docker.recreate(&view).await.map_err(|why| {
            ActionError::Failed(format!("restart did not help; recreating failed: {why}"))
        })?;
        match self.docker.wait_healthy(&view, self.healthy_timeout).await {
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
    async fn restart_deployment(&self, deployment: &DeploymentRef) -> Result<String, ActionError> {
        let (namespace, name) = (deployment.namespace.as_str(), deployment.name.as_str());
        let target = deployment.to_string();
        let view = self.kube.deployment(namespace, name).await?;
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
        self.kube.rollout_restart(namespace, name).await?;
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
        if self.deployment(target).is_some() {
            format!(
                "would rollout-restart {target} if it is still short of available replicas, and wait for the rollout"
            )
        } else {
            format!(
                "would restart {target} if it is still unhealthy, and recreate it if that does not help"
            )
        }
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        _context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let target = job.plan.target.as_deref().unwrap_or_default();
            self.repair(target).await
        })
    }
}
