//! Naming GPU processes that run in Kubernetes pods: from a process's cgroup to its pod's UID
//! and container id, and from the container id to namespace, pod, container and image through
//! the pods the API server lists for this node (`spec.nodeName`, listed every [`REFRESH`]: a
//! container started since the last list is named at the next).
//!
//! Cgroup paths, as kubelet and the runtimes write them (cgroup v1 lines `N:ctrl:/path`, v2
//! `0::/path`):
//!
//! - cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>` (K3s's default), `/kubepods/pod<uid>/<id>`
//! - systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/
//!   cri-containerd-<id>.scope` (`crio-<id>.scope` for CRI-O, `docker-<id>.scope` for
//!   dockershim), and containerd's `...pod<uid>.slice:cri-containerd:<id>` where it runs
//!   without delegation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::sync::watch;

/// How often the node's pods are listed again.
pub const REFRESH: Duration = Duration::from_secs(15);

/// What a process's cgroup says about its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, with dashes (`5b1c...-...`).
    pub uid: String,
    /// The container's id (64 hex), when the path names it.
    pub container_id: Option<String>,
}

fn is_hex64(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as kubelet writes it in a path (dashes, or underscores for systemd), with dashes.
fn pod_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    (groups.len() == 5
        && groups
            .iter()
            .zip(lengths)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(uid.to_ascii_lowercase())
}

/// The container id in one path segment: bare, or as a runtime's scope or suffix.
fn container_id(segment: &str) -> Option<String> {
    let id = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = id.rsplit(':').next().unwrap_or(id);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| id.strip_prefix(prefix))
        .unwrap_or(id);
    is_hex64(id).then(|| id.to_owned())
}

/// The pod (and container) of a process from its `/proc/<pid>/cgroup`; `None` outside pods.
pub fn parse_pod(cgroup: &str) -> Option<PodCgroup> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        if !path.contains("kubepods") {
            return None;
        }
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (at, uid) = segments.iter().enumerate().find_map(|(i, segment)| {
            // `kubepods-burstable-pod<uid>.slice`, `kubepods-pod<uid>.slice`, `pod<uid>`, and
            // containerd's `...pod<uid>.slice:cri-containerd:<id>`.
            let name = segment.split(':').next()?;
            let name = name.strip_suffix(".slice").unwrap_or(name);
            let raw = name.rsplit_once("pod").map(|(_, uid)| uid)?;
            pod_uid(raw).map(|uid| (i, uid))
        })?;
        let container_id = segments[at..].iter().find_map(|s| container_id(s));
        Some(PodCgroup { uid, container_id })
    })
}

/// One container of a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name in the pod.
    pub container: String,
    /// Its image, as the pod spec names it.
    pub image: String,
    /// The pod's labels (what services' `pods.selector` matches).
    pub labels: Arc<BTreeMap<String, String>>,
}

/// The containers of the pods on this node, by container id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIndex {
    by_container: HashMap<String, PodContainer>,
    /// The last list succeeded (false before the first, and after one that failed).
    up: bool,
}

impl PodIndex {
    /// From the API server's pods: each container status's id (`containerd://<id>`,
    /// `cri-o://<id>`, `docker://<id>`) and name, with the image its spec names.
    pub fn from_pods(pods: &[Pod]) -> Self {
        let mut index = Self {
            up: true,
            ..Self::default()
        };
        for pod in pods {
            let meta = &pod.metadata;
            let Some(name) = &meta.name else {
                continue;
            };
            let namespace = meta.namespace.clone().unwrap_or_default();
            let labels = Arc::new(meta.labels.clone().unwrap_or_default());
            let images: HashMap<&str, &str> = pod
                .spec
                .iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
                .collect();
            let statuses = pod.status.iter().flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            });
            for status in statuses {
                let Some(id) = status
                    .container_id
                    .as_deref()
                    .and_then(|id| id.rsplit_once("://"))
                    .map(|(_, id)| id)
                    .filter(|id| is_hex64(id))
                else {
                    continue;
                };
                let image = images
                    .get(status.name.as_str())
                    .map_or_else(|| status.image.clone(), |i| (*i).to_owned());
                index.by_container.insert(
                    id.to_owned(),
                    PodContainer {
                        namespace: namespace.clone(),
                        pod: name.clone(),
                        container: status.name.clone(),
                        image,
                        labels: labels.clone(),
                    },
                );
            }
        }
        index
    }

    /// Whether the last list succeeded (`aistack_gpu_pods_listed`).
    pub fn up(&self) -> bool {
        self.up
    }

    /// The container with full id `id`.
    pub fn container(&self, id: &str) -> Option<&PodContainer> {
        self.by_container.get(id)
    }
}

/// The node's pods, listed again every [`REFRESH`] in a task of their own; samples read the
/// latest index and never wait for the API server.
pub type Pods = watch::Receiver<Arc<PodIndex>>;

/// Starts listing the pods of `node` through the in-cluster account or `KUBECONFIG`, in a task
/// of its own (inside a Tokio runtime); the index stays empty while no client can be made
/// (retried every minute) and keeps the last list while the API server does not answer
/// (said once, and again when what is wrong changes).
pub fn watch_node(node: String) -> Pods {
    let (tx, rx) = watch::channel(Arc::new(PodIndex::default()));
    tokio::spawn(async move {
        aistack_common::install_tls_provider();
        let client = loop {
            match kube::Client::try_default().await {
                Ok(client) => break client,
                Err(err) => {
                    tracing::warn!(collector = "gpu", error = %err, "no Kubernetes API yet: GPU processes in pods are not named; retrying");
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(REFRESH * 4).await;
                }
            }
        };
        let api: Api<Pod> = Api::all(client);
        // From the API server's cache (resourceVersion=0), as the kubelet lists: every node
        // asks every 15 s, and a list a moment old names the same pods.
        let params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .match_any();
        let mut last_error = None::<String>;
        loop {
            match tokio::time::timeout(REFRESH, api.list(&params)).await {
                Ok(Ok(list)) => {
                    let index = PodIndex::from_pods(&list.items);
                    if last_error.take().is_some() {
                        tracing::info!(collector = "gpu", %node, "listing the node's pods again");
                    }
                    tx.send_if_modified(|current| {
                        let changed = **current != index;
                        if changed {
                            *current = Arc::new(index);
                        }
                        changed
                    });
                }
                failed => {
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    if last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!(collector = "gpu", %node, error = %why, "cannot list the node's pods; keeping the last list");
                        last_error = Some(why);
                    }
                    tx.send_if_modified(|current| {
                        let was_up = current.up;
                        if was_up {
                            let mut kept = (**current).clone();
                            kept.up = false;
                            *current = Arc::new(kept);
                        }
                        was_up
                    });
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(REFRESH).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `/proc/<pid>/cgroup` files, from neuvector/neuvector's share/system/cgroup_test.go
    /// (Apache-2.0, commit 0553cd33): kubepods with cgroupfs (v1), with the systemd driver and
    /// dockershim, and Bottlerocket's containerd.
    const CGROUPFS_V1: &str = "11:devices:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c\n1:name=systemd:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c";
    const SYSTEMD_DOCKERSHIM: &str = "11:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod045b1e35_7f13_11e7_ac42_0050568ffca0.slice/docker-b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70.scope";
    const BOTTLEROCKET: &str = "11:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830.scope";
    const K8S_PROXY_SUBGROUP: &str = "11:freezer:/kubepods/besteffort/podf8a694f2-7c08-11e9-98da-000c29077430/c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903/kube-proxy";

    #[test]
    fn pods_from_cgroup_paths_of_every_driver_and_runtime() {
        let cases = [
            (
                CGROUPFS_V1,
                "74ba62da-1a3d-11e7-bb11-080027cb0e22",
                "cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c",
            ),
            (
                SYSTEMD_DOCKERSHIM,
                "045b1e35-7f13-11e7-ac42-0050568ffca0",
                "b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70",
            ),
            (
                BOTTLEROCKET,
                "dd1bf9d1-241d-47f5-8e25-12de83135812",
                "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830",
            ),
            (
                K8S_PROXY_SUBGROUP,
                "f8a694f2-7c08-11e9-98da-000c29077430",
                "c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903",
            ),
            // cgroup v2 with the systemd driver and containerd (K3s, kubeadm on Ubuntu 22.04).
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b1c0f7e_0000_4000_8000_000000000001.slice/cri-containerd-aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n",
                "5b1c0f7e-0000-4000-8000-000000000001",
                "aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
            // cgroup v2, cgroupfs driver (K3s without systemd), guaranteed QoS (no class).
            (
                "0::/kubepods/pod5b1c0f7e-0000-4000-8000-000000000002/bb2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n",
                "5b1c0f7e-0000-4000-8000-000000000002",
                "bb2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
            // CRI-O, and containerd without delegation (`slice:prefix:id`).
            (
                "0::/kubepods.slice/kubepods-pod5b1c0f7e_0000_4000_8000_000000000003.slice/crio-cc2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n",
                "5b1c0f7e-0000-4000-8000-000000000003",
                "cc2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
            (
                "0::/system.slice/containerd.service/kubepods-burstable-pod5b1c0f7e_0000_4000_8000_000000000004.slice:cri-containerd:dd2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b\n",
                "5b1c0f7e-0000-4000-8000-000000000004",
                "dd2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
            // Read by an exporter in a cgroup namespace of its own (the default on cgroup v2):
            // paths relative to its own cgroup, another QoS class or the same one.
            (
                "0::/../../../kubepods-besteffort.slice/kubepods-besteffort-pod5b1c0f7e_0000_4000_8000_000000000005.slice/cri-containerd-ee2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n",
                "5b1c0f7e-0000-4000-8000-000000000005",
                "ee2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
            (
                "0::/../../kubepods-burstable-pod5b1c0f7e_0000_4000_8000_000000000006.slice/cri-containerd-ff2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n",
                "5b1c0f7e-0000-4000-8000-000000000006",
                "ff2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b",
            ),
        ];
        for (cgroup, uid, id) in cases {
            let pod = parse_pod(cgroup).unwrap_or_else(|| panic!("{cgroup}"));
            assert_eq!(pod.uid, uid, "{cgroup}");
            assert_eq!(pod.container_id.as_deref(), Some(id), "{cgroup}");
        }
    }

    #[test]
    fn processes_outside_pods_have_none() {
        for cgroup in [
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-steam.scope\n",
            "0::/system.slice/docker-3f2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b.scope\n",
            "12:pids:/\n1:name=systemd:/init.scope\n",
            // A pod cgroup with no container yet (the sandbox's own), and a bad UID.
            "0::/kubepods/burstable/podnot-a-uid/x\n",
            "",
        ] {
            assert_eq!(parse_pod(cgroup), None, "{cgroup}");
        }
        let sandbox = parse_pod("0::/kubepods/burstable/pod5b1c0f7e-0000-4000-8000-000000000009\n");
        assert_eq!(sandbox.unwrap().container_id, None);
    }

    #[test]
    fn the_index_names_containers_by_id_from_the_api_servers_pods() {
        let pods: Vec<Pod> = serde_json::from_value(serde_json::json!([{
            "metadata": {"name": "vllm-7d9f8c6b5-x2x9q", "namespace": "ml", "uid": "5B1C0F7E-0000-4000-8000-000000000001"},
            "spec": {"nodeName": "gpu-b", "containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.6.4"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "vllm", "ready": true, "restartCount": 0, "image": "docker.io/vllm/vllm-openai:v0.6.4",
                "imageID": "docker.io/vllm/vllm-openai@sha256:00", "started": true,
                "containerID": "containerd://aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b"
            }]}
        }, {
            "metadata": {"name": "pending", "namespace": "ml", "uid": "5b1c0f7e-0000-4000-8000-000000000005"},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "c", "ready": false, "restartCount": 0, "image": "x", "imageID": ""}]}
        }]))
        .unwrap();
        let index = PodIndex::from_pods(&pods);
        let vllm = index
            .container("aa2b9c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b")
            .unwrap();
        assert_eq!(
            (
                vllm.namespace.as_str(),
                vllm.pod.as_str(),
                vllm.container.as_str(),
                vllm.image.as_str()
            ),
            (
                "ml",
                "vllm-7d9f8c6b5-x2x9q",
                "vllm",
                "vllm/vllm-openai:v0.6.4"
            )
        );
        assert_eq!(
            index.by_container.len(),
            1,
            "a container not started has no id"
        );
    }
}
