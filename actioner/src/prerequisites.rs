//! What the actions need from the host, looked at once at start. The actioner starts without
//! any of it: an action whose piece is missing fails each run with why (journaled), and the
//! others run. This says so at start, once per missing piece and naming the actions it stops,
//! so nobody learns it from the first failed run in the middle of the night.
//!
//! Only cheap, local looks: a socket file, an environment variable, a kubeconfig file. Whether
//! logind, the Docker engine or the API server answer is for each run to find out.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::actions::failover::Platform;
use crate::config::Config;
use crate::vocab::ActionKind;

/// The well-known system bus socket, when `DBUS_SYSTEM_BUS_ADDRESS` is not set.
const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// A piece some actions need that is not there now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// What, in words, with where it was looked for.
    pub what: String,
    /// The actions the rules and buttons use that need it.
    pub actions: Vec<ActionKind>,
}

/// The pieces the configured rules and buttons need that are missing now.
pub fn missing(config: &Config) -> Vec<Missing> {
    let mut used: BTreeSet<ActionKind> = config.rules.iter().map(|r| r.action).collect();
    if let Some(buttons) = &config.actions.notify.buttons {
        used.extend(buttons.offer.iter().map(|o| o.action));
    }
    let uses = |kinds: &[ActionKind]| -> Vec<ActionKind> {
        kinds.iter().copied().filter(|k| used.contains(k)).collect()
    };
    let failover = &config.actions.failover;
    let platforms: Vec<&Platform> = std::iter::once(&failover.pair.platform)
        .chain(failover.nodes.values().map(|pair| &pair.platform))
        .collect();
    let repair = &config.actions.repair;
    let mut found = Vec::new();

    let needs_bus = uses(&[ActionKind::Suspend]);
    if !needs_bus.is_empty()
        && let Some(socket) = system_bus_socket()
        && !is_socket(&socket)
    {
        found.push(Missing {
            what: format!("the system bus (no socket at {})", socket.display()),
            actions: needs_bus,
        });
    }

    let mut needs_docker = Vec::new();
    if platforms.iter().any(|p| matches!(p, Platform::Docker(_))) {
        needs_docker.extend(uses(&[ActionKind::Failover, ActionKind::Failback]));
    }
    if !repair.docker.containers.is_empty() {
        needs_docker.extend(uses(&[ActionKind::Repair]));
    }
    let endpoint = aistack_common::docker::endpoint(&config.docker.socket);
    if !needs_docker.is_empty()
        && let Some(socket) = unix_socket_path(&endpoint)
        && !is_socket(socket)
    {
        found.push(Missing {
            what: format!("the Docker engine (no socket at {})", socket.display()),
            actions: needs_docker,
        });
    }

    let mut needs_kube = Vec::new();
    if platforms
        .iter()
        .any(|p| matches!(p, Platform::Kubernetes(_)))
    {
        needs_kube.extend(uses(&[ActionKind::Failover, ActionKind::Failback]));
    }
    if !repair.kubernetes.deployments.is_empty() {
        needs_kube.extend(uses(&[ActionKind::Repair]));
    }
    if !needs_kube.is_empty() && !kubernetes_reachable() {
        found.push(Missing {
            what:
                "a Kubernetes API (no service account here, no KUBECONFIG file, no ~/.kube/config)"
                    .into(),
            actions: needs_kube,
        });
    }
    found
}

/// Logs each missing piece once, as a warning naming the actions it stops.
pub fn announce(config: &Config) {
    for missing in missing(config) {
        let actions: Vec<String> = missing.actions.iter().map(ToString::to_string).collect();
        tracing::warn!(
            missing = %missing.what,
            actions = %actions.join(", "),
            "these actions fail until it appears; the others run"
        );
    }
}

/// The system bus socket to look for: `DBUS_SYSTEM_BUS_ADDRESS`'s `unix:path=`, the well-known
/// socket without it; `None` for a transport that is not a socket file (not looked at).
fn system_bus_socket() -> Option<PathBuf> {
    match std::env::var("DBUS_SYSTEM_BUS_ADDRESS") {
        Ok(address) if !address.is_empty() => address.split(';').find_map(|one| {
            let path = one.strip_prefix("unix:path=")?;
            Some(PathBuf::from(path.split(',').next().unwrap_or(path)))
        }),
        _ => Some(PathBuf::from(SYSTEM_BUS_SOCKET)),
    }
}

/// The socket file of a Docker endpoint (`unix:///var/run/docker.sock` or a bare path); `None`
/// for `tcp://` and `http://`.
fn unix_socket_path(endpoint: &str) -> Option<&Path> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        Some(Path::new(path))
    } else if endpoint.starts_with('/') {
        Some(Path::new(endpoint))
    } else {
        None
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether kube's `Client::try_default` has anything to go on: an in-cluster service account,
/// or a kubeconfig file.
fn kubernetes_reachable() -> bool {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists();
    let kubeconfig = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(files) => std::env::split_paths(&files).any(|f| f.is_file()),
        None => std::env::var_os("HOME")
            .is_some_and(|home| Path::new(&home).join(".kube/config").is_file()),
    };
    in_cluster || kubeconfig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_endpoints_and_bus_addresses() {
        assert_eq!(
            unix_socket_path("unix:///var/run/docker.sock"),
            Some(Path::new("/var/run/docker.sock"))
        );
        assert_eq!(
            unix_socket_path("/run/user/1000/docker.sock"),
            Some(Path::new("/run/user/1000/docker.sock"))
        );
        assert_eq!(unix_socket_path("tcp://10.0.0.2:2375"), None);
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_socket(dir.path()), "a directory is no socket");
        let socket = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(is_socket(&socket));
        assert!(!is_socket(&dir.path().join("absent")));
    }
}
