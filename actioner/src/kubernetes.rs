//! The Kubernetes API, for failover, failback and repair on `platform: kubernetes`.
//!
//! It asks only for what the Role in k8s/base/rbac.yaml grants: `get` and `patch` on the named
//! Deployments and the one Service, `patch` on the Deployments' `scale` subresource. Changes are JSON merge
//! patches, the same requests `kubectl scale`, `kubectl rollout restart` and `kubectl patch`
//! send. The client comes from kube's defaults (the pod's service account in a cluster,
//! `KUBECONFIG` or `~/.kube/config` outside), made at first use so that an actioner whose
//! cluster is briefly away still starts, and says why when an action needs it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::fence::Fence;

/// The annotation `kubectl rollout restart` sets on the pod template.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// Where failover keeps the primary's replica count, for failback to restore.
pub const REPLICAS_BEFORE_FAILOVER: &str = "aistack.io/replicas-before-failover";

/// How often a wait polls.
const POLL: Duration = Duration::from_millis(500);

/// A Deployment as the actions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentView {
    /// `spec.replicas` (1 when unset, as the API server defaults it).
    pub replicas: i32,
    /// `metadata.generation`.
    pub generation: i64,
    /// `status.observedGeneration`.
    pub observed_generation: i64,
    /// `status.replicas`: pods of any revision, not terminating.
    pub current: i32,
    /// `status.terminatingReplicas`: pods shutting down. Only API servers with the
    /// DeploymentReplicaSetTerminatingReplicas feature (Kubernetes 1.33 and later) send it.
    pub terminating: i32,
    /// `status.updatedReplicas`.
    pub updated: i32,
    /// `status.availableReplicas`.
    pub available: i32,
    /// `spec.selector.matchLabels`.
    pub selector: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl DeploymentView {
    fn from_api(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        let status = d.status.as_ref();
        Self {
            replicas: spec.and_then(|s| s.replicas).unwrap_or(1),
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            current: status.and_then(|s| s.replicas).unwrap_or(0),
            terminating: status.and_then(|s| s.terminating_replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            selector: spec
                .and_then(|s| s.selector.match_labels.clone())
                .unwrap_or_default(),
            annotations: d.metadata.annotations.clone().unwrap_or_default(),
        }
    }

    /// The controller has seen the latest spec.
    pub fn observed(&self) -> bool {
        self.observed_generation >= self.generation
    }

    /// Every replica runs the current template and is available, and no old pod is left.
    pub fn rolled_out(&self) -> bool {
        self.observed()
            && self.updated == self.replicas
            && self.available == self.replicas
            && self.current == self.replicas
    }

    /// Scaled to zero with no pod left running. Pods still shutting down are seen only where
    /// the API server reports `terminatingReplicas`; elsewhere they may hold GPU memory for up
    /// to their `terminationGracePeriodSeconds` after this.
    pub fn scaled_down(&self) -> bool {
        self.observed() && self.replicas == 0 && self.current == 0 && self.terminating == 0
    }

    /// A rollout is under way (a new template or replica count not reached yet).
    pub fn rolling(&self) -> bool {
        !self.observed() || self.updated < self.replicas || self.current > self.replicas
    }

    /// `n/m available`, for messages.
    pub fn availability(&self) -> String {
        format!("{}/{} available", self.available, self.replicas)
    }
}

/// A handle on the cluster; cheap to clone.
#[derive(Clone, Default)]
pub struct KubeControl {
    client: Arc<OnceCell<Client>>,
    fence: Fence,
}

impl std::fmt::Debug for KubeControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeControl")
            .field("connected", &self.client.initialized())
            .finish()
    }
}

/// Why a call to the Kubernetes API did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeError {
    /// No client could be made.
    #[error(
        "no Kubernetes API: {0} (in a pod: its service account; elsewhere: KUBECONFIG or ~/.kube/config)"
    )]
    NoClient(String),
    /// The object is not there.
    #[error("no {0}")]
    Missing(String),
    /// The API server refused or failed.
    #[error("{what}: {why}")]
    Call {
        /// What was being done.
        what: String,
        /// What the API server (or the connection) said.
        why: String,
    },
    /// The lease's renew deadline passed (see [`crate::fence`]): another replica may lead.
    #[error(
        "not calling the Kubernetes API: the lease's renew deadline passed {0:.1?} ago, another replica may lead"
    )]
    Fenced(Duration),
    /// A wait ran out.
    #[error("{0}")]
    TimedOut(String),
}

fn api_error(what: &str) -> impl FnOnce(kube::Error) -> KubeError + '_ {
    move |e| KubeError::Call {
        what: what.to_owned(),
        why: match e {
            kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
            other => other.to_string(),
        },
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some("aistack-actioner".into()),
        ..PatchParams::default()
    }
}

impl KubeControl {
    /// A handle whose client is made at first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls only while `fence` is open (the leader of several replicas).
    #[must_use]
    pub fn fenced(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// The client, for one call now: every call asks for it right before it is sent.
    async fn client(&self) -> Result<Client, KubeError> {
        self.fence.check().map_err(KubeError::Fenced)?;
        self.client
            .get_or_try_init(|| async {
                aistack_common::install_tls_provider();
                Client::try_default()
                    .await
                    .map_err(|e| KubeError::NoClient(e.to_string()))
            })
            .await
            .cloned()
    }

    async fn deployments(&self, namespace: &str) -> Result<Api<Deployment>, KubeError> {
        Ok(Api::namespaced(self.client().await?, namespace))
    }

    async fn services(&self, namespace: &str) -> Result<Api<Service>, KubeError> {
        Ok(Api::namespaced(self.client().await?, namespace))
    }

    /// The Deployment `namespace/name`.
    pub async fn deployment(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<DeploymentView, KubeError> {
        let what = format!("Deployment {namespace}/{name}");
        self.deployments(namespace)
            .await?
            .get_opt(name)
            .await
            .map_err(api_error(&what))?
            .map(|d| DeploymentView::from_api(&d))
            .ok_or(KubeError::Missing(what))
    }

    /// Sets the replica count through the `scale` subresource, as `kubectl scale` does.
    pub async fn scale(&self, namespace: &str, name: &str, replicas: i32) -> Result<(), KubeError> {
        let what = format!("scaling Deployment {namespace}/{name} to {replicas}");
        self.deployments(namespace)
            .await?
            .patch_scale(
                name,
                &params(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .map(drop)
            .map_err(api_error(&what))
    }

    /// Sets (or with `None` removes) an annotation of the Deployment itself.
    pub async fn annotate(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), KubeError> {
        let what = format!("annotating Deployment {namespace}/{name}");
        self.deployments(namespace)
            .await?
            .patch(
                name,
                &params(),
                &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
            )
            .await
            .map(drop)
            .map_err(api_error(&what))
    }

    /// Restarts every pod, as `kubectl rollout restart` does: a new pod-template annotation.
    pub async fn rollout_restart(&self, namespace: &str, name: &str) -> Result<(), KubeError> {
        let what = format!("restarting Deployment {namespace}/{name}");
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        self.deployments(namespace)
            .await?
            .patch(
                name,
                &params(),
                &Patch::Merge(json!({
                    "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}
                })),
            )
            .await
            .map(drop)
            .map_err(api_error(&what))
    }

    /// The Service's `spec.selector`.
    pub async fn service_selector(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<BTreeMap<String, String>, KubeError> {
        let what = format!("Service {namespace}/{name}");
        let service = self
            .services(namespace)
            .await?
            .get_opt(name)
            .await
            .map_err(api_error(&what))?
            .ok_or(KubeError::Missing(what))?;
        Ok(service.spec.and_then(|s| s.selector).unwrap_or_default())
    }

    /// Makes the Service's selector exactly `selector`: keys it had and `selector` lacks are
    /// removed (a merge patch with `null`), so it selects one Deployment's pods and no other's.
    pub async fn set_service_selector(
        &self,
        namespace: &str,
        name: &str,
        current: &BTreeMap<String, String>,
        selector: &BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let what = format!("re-pointing Service {namespace}/{name}");
        let mut patch = serde_json::Map::new();
        for key in current.keys().filter(|k| !selector.contains_key(*k)) {
            patch.insert(key.clone(), serde_json::Value::Null);
        }
        for (key, value) in selector {
            patch.insert(key.clone(), json!(value));
        }
        self.services(namespace)
            .await?
            .patch(
                name,
                &params(),
                &Patch::Merge(json!({"spec": {"selector": patch}})),
            )
            .await
            .map(drop)
            .map_err(api_error(&what))
    }

    /// Polls the Deployment until `done` holds, for up to `timeout`; the last view either way.
    pub async fn wait_for(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        done: impl Fn(&DeploymentView) -> bool,
    ) -> Result<(Duration, DeploymentView), (KubeError, DeploymentView)> {
        let last = std::sync::Mutex::new(DeploymentView::default());
        let waited = crate::poll::until(timeout, POLL, || async {
            let view = self.deployment(namespace, name).await.map_err(Some)?;
            if done(&view) {
                return Ok(view);
            }
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
            Err(None)
        })
        .await;
        let last = last
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match waited {
            Ok((view, took)) => Ok((took, view)),
            Err(Some(err)) => Err((err, last)),
            Err(None) => Err((
                KubeError::TimedOut(format!(
                    "Deployment {namespace}/{name} not there within {}s: {}, {} updated, {} pods",
                    timeout.as_secs(),
                    last.availability(),
                    last.updated,
                    last.current
                )),
                last,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(json: serde_json::Value) -> DeploymentView {
        DeploymentView::from_api(&serde_json::from_value(json).unwrap())
    }

    #[test]
    fn views_read_what_the_api_server_sends() {
        let view = deployment(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "vllm", "namespace": "ml", "generation": 4,
                         "annotations": {"deployment.kubernetes.io/revision": "3"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "vllm"}},
                     "template": {"metadata": {"labels": {"app": "vllm"}}, "spec": {"containers": []}}},
            "status": {"observedGeneration": 4, "replicas": 2, "updatedReplicas": 2,
                       "readyReplicas": 2, "availableReplicas": 2}
        }));
        assert_eq!(view.replicas, 2);
        assert!(view.rolled_out() && !view.rolling() && !view.scaled_down());
        assert_eq!(
            view.selector,
            BTreeMap::from([("app".into(), "vllm".into())])
        );
        assert_eq!(view.availability(), "2/2 available");
    }

    #[test]
    fn a_new_generation_is_a_rollout_until_observed_and_updated() {
        let mut view = DeploymentView {
            replicas: 1,
            generation: 5,
            observed_generation: 4,
            current: 1,
            updated: 1,
            available: 1,
            ..DeploymentView::default()
        };
        assert!(view.rolling() && !view.rolled_out());
        view.observed_generation = 5;
        view.updated = 0;
        view.current = 2;
        assert!(view.rolling() && !view.rolled_out());
        view.updated = 1;
        view.current = 1;
        assert!(view.rolled_out());
    }

    #[test]
    fn scaled_down_means_no_pod_left() {
        // An empty status (all counts omitted) is what the API sends for zero pods.
        let view = deployment(json!({
            "metadata": {"name": "vllm", "generation": 7},
            "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "vllm"}}, "template": {}},
            "status": {"observedGeneration": 7}
        }));
        assert!(view.scaled_down());
        let running = DeploymentView {
            current: 1,
            ..view.clone()
        };
        assert!(!running.scaled_down());
        let terminating = DeploymentView {
            terminating: 1,
            ..view
        };
        assert!(!terminating.scaled_down());
    }
}
