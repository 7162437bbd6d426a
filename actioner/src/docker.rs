//! The Docker engine, as the failover and repair actions use it (bollard): inspect, start,
//! stop and restart with the container's own stop timeout, wait for health, and recreate a
//! container from its own config keeping every volume and network.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aistack_common::docker;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HealthStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};

/// What the actions need to know about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
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

/// Talks to the engine at a socket (`DOCKER_HOST` wins when set).
#[derive(Debug, Clone)]
pub struct DockerControl {
    socket: String,
}

/// Default seconds the engine waits on stop before it kills.
const DEFAULT_STOP_TIMEOUT: i32 = 10;

impl DockerControl {
    /// The engine at `socket`.
    pub fn new(socket: &str) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    async fn client(&self) -> Result<Docker, String> {
        let endpoint = docker::endpoint(&self.socket);
        docker::connect(&endpoint, Duration::from_secs(120))
            .await
            .map_err(|e| format!("docker engine unreachable: {e}"))
    }

    /// The container named `name`, or `None` when there is none.
    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerView>, String> {
        let docker = self.client().await?;
        let inspect = match docker.inspect_container(name, None).await {
            Ok(inspect) => inspect,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(format!("inspecting {name}: {e}")),
        };
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
        let stop_timeout = inspect
            .config
            .and_then(|c| c.stop_timeout)
            .and_then(|t| i32::try_from(t).ok())
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        Ok(Some(ContainerView {
            name: name.to_owned(),
            running: state.running.unwrap_or(false),
            restarting: state.restarting.unwrap_or(false),
            health: health_name,
            stop_timeout,
            last_check,
        }))
    }

    /// Starts it (a no-op when it runs).
    pub async fn start(&self, name: &str) -> Result<(), String> {
        let docker = self.client().await?;
        match docker.start_container(name, None).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(format!("starting {name}: {e}")),
        }
    }

    /// Stops it with its stop timeout (a no-op when stopped).
    pub async fn stop(&self, name: &str, stop_timeout: i32) -> Result<(), String> {
        let docker = self.client().await?;
        let options = StopContainerOptionsBuilder::new().t(stop_timeout).build();
        match docker.stop_container(name, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(format!("stopping {name}: {e}")),
        }
    }

    /// Restarts it with its stop timeout.
    pub async fn restart(&self, name: &str, stop_timeout: i32) -> Result<(), String> {
        let docker = self.client().await?;
        let options = RestartContainerOptionsBuilder::new()
            .t(stop_timeout)
            .build();
        docker
            .restart_container(name, Some(options))
            .await
            .map_err(|e| format!("restarting {name}: {e}"))
    }

    /// Waits until it is healthy (or, without a health check, running) for up to `timeout`.
    pub async fn wait_healthy(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Duration, ContainerView> {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            if let Ok(Some(view)) = self.inspect(name).await {
                if view.running && (view.health == "healthy" || view.health == "none") {
                    return Ok(started.elapsed());
                }
                last = Some(view);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last.unwrap_or(ContainerView {
            name: name.to_owned(),
            running: false,
            restarting: false,
            health: "none",
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            last_check: None,
        }))
    }

    /// Replaces the container with a new one from its own config: same image, command,
    /// environment, labels, host config (binds, ports, devices, restart policy, runtime),
    /// networks with their aliases, and every volume — anonymous ones included, mounted by
    /// name. The old one is renamed aside, and only removed (without its volumes) once the
    /// new one started; on failure it is put back.
    pub async fn recreate(&self, name: &str) -> Result<(), String> {
        let docker = self.client().await?;
        let inspect = docker
            .inspect_container(name, None)
            .await
            .map_err(|e| format!("inspecting {name}: {e}"))?;
        let stop_timeout = inspect
            .config
            .as_ref()
            .and_then(|c| c.stop_timeout)
            .and_then(|t| i32::try_from(t).ok())
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        let body = create_body(&inspect)?;
        let aside = format!("{name}-aistack-replaced");
        let _ = docker
            .stop_container(
                name,
                Some(StopContainerOptionsBuilder::new().t(stop_timeout).build()),
            )
            .await;
        docker
            .rename_container(
                name,
                RenameContainerOptionsBuilder::new().name(&aside).build(),
            )
            .await
            .map_err(|e| format!("renaming {name} aside: {e}"))?;
        let created = docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(name).build()),
                body,
            )
            .await;
        let started = match created {
            Ok(_) => docker
                .start_container(name, None)
                .await
                .map_err(|e| format!("starting the new {name}: {e}")),
            Err(e) => Err(format!("creating the new {name}: {e}")),
        };
        if let Err(why) = started {
            // Put the old one back as it was.
            let _ = docker
                .remove_container(
                    name,
                    Some(
                        RemoveContainerOptionsBuilder::new()
                            .force(true)
                            .v(false)
                            .build(),
                    ),
                )
                .await;
            let _ = docker
                .rename_container(
                    &aside,
                    RenameContainerOptionsBuilder::new().name(name).build(),
                )
                .await;
            let _ = docker.start_container(name, None).await;
            return Err(why);
        }
        docker
            .remove_container(
                &aside,
                Some(RemoveContainerOptionsBuilder::new().v(false).build()),
            )
            .await
            .map_err(|e| format!("removing the old {name} (the new one runs): {e}"))
    }
}

/// The create body of a container like the inspected one.
fn create_body(
    inspect: &bollard::models::ContainerInspectResponse,
) -> Result<ContainerCreateBody, String> {
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
