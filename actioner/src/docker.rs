//! The Docker engine, as the failover and repair actions use it (bollard): inspect, start,
//! stop and restart with the container's own stop timeout, wait for health, and recreate a
//! container from its own config keeping every volume and network.
//!
//! A container is looked up by its exact name — the engine resolves a name it does not know
//! as an id prefix, so the answer's own name is checked — and every later call uses the id
//! the engine returned. A container named like another one's id can never be hit instead.

use std::collections::HashMap;
use std::time::Duration;

use aistack_common::docker;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HealthStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};

use crate::fence::Fence;

/// What the actions need to know about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    /// Its id: what every call after the lookup uses.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Running now.
    pub running: bool,
    /// Being restarted by its restart policy.
    pub restarting: bool,
    /// `healthy`, `unhealthy`, `starting`, or `none` without a health check.
    pub health: &'static str,
    /// Seconds the engine waits on stop before it kills.
    pub stop_timeout: i32,
    /// Output of the last health check, for reports.
    pub last_check: Option<String>,
}

/// Why a call to the engine did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerError {
    /// No connection to the engine.
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
    /// The lease's renew deadline passed (see [`crate::fence`]): another replica may lead.
    #[error(
        "not calling the Docker engine: the lease's renew deadline passed {0:.1?} ago, another replica may lead"
    )]
    Fenced(Duration),
    /// The engine refused or failed.
    #[error("{what} {container}: {why}")]
    Call {
        /// What was being done (`starting`, `stopping`, ...).
        what: &'static str,
        /// The container's name.
        container: String,
        /// What the engine said.
        why: String,
    },
    /// The engine's answer could not be used.
    #[error("{0}")]
    Unusable(String),
}

fn call<'a>(
    what: &'static str,
    container: &'a str,
) -> impl FnOnce(bollard::errors::Error) -> DockerError + 'a {
    move |e| DockerError::Call {
        what,
        container: container.to_owned(),
        why: e.to_string(),
    }
}

/// `304 Not Modified`: already in the state asked for.
fn unchanged(result: Result<(), bollard::errors::Error>) -> Result<(), bollard::errors::Error> {
    match result {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        other => other,
    }
}

/// Talks to the engine at a socket (`DOCKER_HOST` wins when set).
#[derive(Debug, Clone)]
pub struct DockerControl {
    socket: String,
    fence: Fence,
}

/// Default seconds the engine waits on stop before it kills.
const DEFAULT_STOP_TIMEOUT: i32 = 10;

fn view_of(inspect: ContainerInspectResponse, name: &str) -> ContainerView {
    let stop_timeout = stop_timeout_of(&inspect);
    let state = inspect.state.unwrap_or_default();
    let health = state.health.as_ref();
    let health_name = match health.and_then(|h| h.status) {
        Some(HealthStatusEnum::HEALTHY) => "healthy",
        Some(HealthStatusEnum::UNHEALTHY) => "unhealthy",
        Some(HealthStatusEnum::STARTING) => "starting",
        _ => "none",
    };
    let last_check = health
        .and_then(|h| h.log.as_ref())
        .and_then(|log| log.last())
        .and_then(|r| r.output.clone())
        .map(|o| o.trim().chars().take(200).collect());
    ContainerView {
        id: inspect.id.unwrap_or_default(),
        name: name.to_owned(),
        running: state.running.unwrap_or(false),
        restarting: state.restarting.unwrap_or(false),
        health: health_name,
        stop_timeout,
        last_check,
    }
}

fn stop_timeout_of(inspect: &ContainerInspectResponse) -> i32 {
    inspect
        .config
        .as_ref()
        .and_then(|c| c.stop_timeout)
        .and_then(|t| i32::try_from(t).ok())
        .unwrap_or(DEFAULT_STOP_TIMEOUT)
}

impl DockerControl {
    /// The engine at `socket`.
    pub fn new(socket: &str) -> Self {
        Self {
            socket: socket.to_owned(),
            fence: Fence::none(),
        }
    }

    /// Calls only while `fence` is open (the leader of several replicas).
    #[must_use]
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// A connection, for one call now: every call asks for it right before it is sent, but a
    /// recreate, whose steps once begun go through or roll back rather than leave the
    /// container renamed aside.
    async fn client(&self) -> Result<Docker, DockerError> {
        self.fence.check().map_err(DockerError::Fenced)?;
        let endpoint = docker::endpoint(&self.socket);
        docker::connect(&endpoint, Duration::from_secs(120))
            .await
            .map_err(|e| DockerError::Unreachable(e.to_string()))
    }

    /// The container named exactly `name`, or `None` when there is none.
    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerView>, DockerError> {
        let docker = self.client().await?;
        match docker.inspect_container(name, None).await {
            // The engine answered for an id starting with `name`: not the container named so.
            Ok(inspect)
                if inspect.name.as_deref().map(|n| n.trim_start_matches('/')) != Some(name) =>
            {
                Ok(None)
            }
            Ok(inspect) => Ok(Some(view_of(inspect, name))),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(call("inspecting", name)(e)),
        }
    }

    /// Starts it (a no-op when it runs).
    pub async fn start(&self, container: &ContainerView) -> Result<(), DockerError> {
        let docker = self.client().await?;
        unchanged(docker.start_container(&container.id, None).await)
            .map_err(call("starting", &container.name))
    }

    /// Stops it with its stop timeout (a no-op when stopped).
    pub async fn stop(&self, container: &ContainerView) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = StopContainerOptionsBuilder::new()
            .t(container.stop_timeout)
            .build();
        unchanged(docker.stop_container(&container.id, Some(options)).await)
            .map_err(call("stopping", &container.name))
    }

    /// Restarts it with its stop timeout.
    pub async fn restart(&self, container: &ContainerView) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let options = RestartContainerOptionsBuilder::new()
            .t(container.stop_timeout)
            .build();
        docker
            .restart_container(&container.id, Some(options))
            .await
            .map_err(call("restarting", &container.name))
    }

    /// Waits until the container named `name` is healthy (or, without a health check,
    /// running) for up to `timeout`; the last view when it is not.
    pub async fn wait_healthy(
        &self,
        container: &ContainerView,
        timeout: Duration,
    ) -> Result<Duration, ContainerView> {
        let waited = crate::poll::until(timeout, Duration::from_millis(500), || async {
            match self.inspect(&container.name).await {
                Ok(Some(view)) if view.running && matches!(view.health, "healthy" | "none") => {
                    Ok(())
                }
                Ok(Some(view)) => Err(Some(view)),
                _ => Err(None),
            }
        })
        .await;
        waited.map(|((), took)| took).map_err(|last| {
            last.unwrap_or_else(|| ContainerView {
                running: false,
                health: "none",
                last_check: None,
                ..container.clone()
            })
        })
    }

    /// Replaces the container with a new one from its own config: same image, command,
    /// environment, labels, host config (binds, ports, devices, restart policy, runtime),
    /// networks with their aliases, and every volume — anonymous ones included, mounted by
    /// name. The old one is renamed aside, and only removed (without its volumes) once the
    /// new one started; on failure the new one (by its id) is removed and the old one put back.
    pub async fn recreate(&self, container: &ContainerView) -> Result<(), DockerError> {
        let docker = self.client().await?;
        let name = container.name.as_str();
        let inspect = docker
            .inspect_container(&container.id, None)
            .await
            .map_err(call("inspecting", name))?;
        let stop_timeout = stop_timeout_of(&inspect);
        let body = create_body(&inspect).map_err(DockerError::Unusable)?;
        let old = container.id.as_str();
        let aside = format!("{name}-aistack-replaced");
        let _ = docker
            .stop_container(
                old,
                Some(StopContainerOptionsBuilder::new().t(stop_timeout).build()),
            )
            .await;
        docker
            .rename_container(
                old,
                RenameContainerOptionsBuilder::new().name(&aside).build(),
            )
            .await
            .map_err(call("renaming aside", name))?;
        let created = docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(name).build()),
                body,
            )
            .await;
        let started = match created {
            Ok(new) => docker
                .start_container(&new.id, None)
                .await
                .map_err(|e| (Some(new.id), call("starting the new", name)(e))),
            Err(e) => Err((None, call("creating the new", name)(e))),
        };
        if let Err((new, why)) = started {
            // Put the old one back as it was; only the container just created is removed.
            if let Some(new) = new {
                let _ = docker
                    .remove_container(
                        &new,
                        Some(
                            RemoveContainerOptionsBuilder::new()
                                .force(true)
                                .v(false)
                                .build(),
                        ),
                    )
                    .await;
            }
            let _ = docker
                .rename_container(old, RenameContainerOptionsBuilder::new().name(name).build())
                .await;
            let _ = docker.start_container(old, None).await;
            return Err(why);
        }
        docker
            .remove_container(
                old,
                Some(RemoveContainerOptionsBuilder::new().v(false).build()),
            )
            .await
            .map_err(call("removing the old (the new one runs)", name))
    }
}

/// The create body of a container like the inspected one.
fn create_body(inspect: &ContainerInspectResponse) -> Result<ContainerCreateBody, String> {
    let mut body = serde_json::to_value(inspect.config.clone().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let mut host_config = inspect.host_config.clone().unwrap_or_default();
    // Anonymous volumes would come back empty: mount each existing volume by name where the
    // binds and mounts do not cover its destination already.
    let mut binds = host_config.binds.clone().unwrap_or_default();
    let covered = |dest: &str, binds: &[String]| {
        binds.iter().any(|b| b.split(':').nth(1) == Some(dest))
            || host_config
                .mounts
                .as_ref()
                .is_some_and(|m| m.iter().any(|m| m.target.as_deref() == Some(dest)))
    };
    for mount in inspect.mounts.iter().flatten() {
        if let (Some(volume), Some(dest)) = (&mount.name, &mount.destination)
            && mount.typ.as_ref().is_some_and(|t| t == "volume")
            && !covered(dest, &binds)
        {
            binds.push(format!("{volume}:{dest}"));
        }
    }
    host_config.binds = (!binds.is_empty()).then_some(binds);
    let networks: HashMap<String, bollard::models::EndpointSettings> = inspect
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(net, endpoint)| {
            // Keep what the user chose (aliases, static addresses), not what the engine assigned.
            let keep = bollard::models::EndpointSettings {
                aliases: endpoint.aliases,
                ipam_config: endpoint.ipam_config,
                links: endpoint.links,
                driver_opts: endpoint.driver_opts,
                ..Default::default()
            };
            (net, keep)
        })
        .collect();
    let object = body
        .as_object_mut()
        .ok_or("container config is not an object")?;
    object.insert(
        "HostConfig".into(),
        serde_json::to_value(host_config).map_err(|e| e.to_string())?,
    );
    object.insert(
        "NetworkingConfig".into(),
        serde_json::json!({"EndpointsConfig": networks}),
    );
    serde_json::from_value(body).map_err(|e| format!("building the new container's config: {e}"))
}
