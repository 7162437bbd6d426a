//! The Docker engine connection both binaries use: `docker.socket` in their configs, with
//! `DOCKER_HOST` winning when set, as the docker CLI does.

use std::time::Duration;

use bollard::Docker;
use serde::Deserialize;

/// `docker:` in either config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// The engine's socket (default `unix:///var/run/docker.sock`); `DOCKER_HOST` wins when set.
    pub socket: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: "unix:///var/run/docker.sock".into(),
        }
    }
}

/// The endpoint to use: `DOCKER_HOST` when set, else `socket`.
pub fn endpoint(socket: &str) -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| socket.to_owned())
}

/// A client for `endpoint` (a unix socket path or URL, or `tcp://`/`http://`) whose requests
/// give up after `timeout`, speaking the engine's API version whatever bollard's default is.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Docker, bollard::errors::Error> {
    let secs = timeout.as_secs().max(1);
    let docker = if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
        Docker::connect_with_http(endpoint, secs, bollard::API_DEFAULT_VERSION)?
    } else {
        Docker::connect_with_socket(endpoint, secs, bollard::API_DEFAULT_VERSION)?
    };
    docker.negotiate_version().await
}
