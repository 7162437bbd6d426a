//! High availability: two or more actioners elect a leader on a coordination.k8s.io/v1 Lease
//! (`ha: {lease: NAMESPACE/NAME}`), and only the leader opens the journal, plans and acts.
//!
//! The election is client-go's, by hand (kube has none): every `retry` each replica reads
//! the Lease; the holder renews it (a `replace` carrying the `resourceVersion` it read, so a
//! write that raced another fails with 409 Conflict and changes nothing); another replica
//! takes it over once the record has not changed for `lease_duration` **as it observed it**
//! — its own clock, never the holder's timestamps, so clock skew between nodes cannot hand
//! the lease over early.
//!
//! A leader that cannot renew for `renew_deadline` (less than `lease_duration`) steps down
//! by ending the process, before any other replica can see the lease expire: two replicas
//! never act at once, and an action cut short is journaled as interrupted by the next leader,
//! which reads the same journal (shared storage) and never runs it again. A follower serves
//! `/healthz` (alive) but not `/readyz`, so a Service routes webhooks to the leader only; a
//! request that reaches a follower gets 503 and Alertmanager's retry.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use tokio::sync::watch;
use tower::ServiceExt as _;

use aistack_common::config::{HumanDuration, Problems};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;

/// `ha:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// `NAMESPACE/NAME` of the Lease.
    pub lease: String,
    /// How long a holder's lease lasts without a renewal (default 8s); a new leader takes over
    /// within this plus one `retry` of the old one's loss.
    #[serde(default = "default_duration")]
    pub lease_duration: HumanDuration,
}

fn default_duration() -> HumanDuration {
    HumanDuration(Duration::from_secs(8))
}

impl HaConfig {
    /// The Lease's namespace and name.
    pub fn lease(&self) -> Option<(&str, &str)> {
        let (namespace, name) = self.lease.split_once('/')?;
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        (dns_label(namespace) && dns_label(name) && !namespace.contains('.'))
            .then_some((namespace, name))
    }

    /// The timing: lease duration, renew deadline (two thirds of it), retry (a quarter).
    pub fn timing(&self) -> Timing {
        let duration: Duration = self.lease_duration.into();
        Timing {
            lease_duration: duration,
            renew_deadline: duration * 2 / 3,
            retry: duration / 4,
        }
    }

    /// check-config's problems.
    pub fn validate(&self, problems: &mut Problems) {
        problems.check(
            self.lease().is_some(),
            "ha.lease",
            format!(
                "must be NAMESPACE/NAME (lowercase DNS names), got {:?}",
                self.lease
            ),
        );
        let duration: Duration = self.lease_duration.into();
        problems.check(
            (Duration::from_secs(4)..=Duration::from_secs(60)).contains(&duration),
            "ha.lease_duration",
            "must be between 4s and 60s",
        );
    }
}

/// The election's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A lease not renewed for this long (as observed) may be taken over.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Time between two rounds.
    pub retry: Duration,
}

/// This replica's name in the Lease: `POD_NAME`, else the host name.
pub fn identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "aistack-actioner".into())
}

/// Where a round left this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It holds the lease.
    Leader,
    /// Another replica does (`None`: nobody yet, or a race lost).
    Follower(Option<String>),
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record last read (its resourceVersion) and when it was first seen so.
    observed: Option<(Option<String>, Instant)>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

/// What the API server said, in one line.
fn why(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

fn conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

impl Elector {
    /// For the Lease `namespace/name`, as `identity`, through the in-cluster account or
    /// `KUBECONFIG`.
    pub async fn connect(
        namespace: &str,
        name: &str,
        identity: String,
        timing: Timing,
    ) -> Result<Self, String> {
        aistack_common::install_tls_provider();
        let client = kube::Client::try_default().await.map_err(|e| {
            format!("no Kubernetes API for the lease: {e} (in a pod: its service account; elsewhere: KUBECONFIG)")
        })?;
        Ok(Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            timing,
            observed: None,
        })
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
        let held = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if held {
                previous.and_then(|s| s.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if held { transitions } else { transitions + 1 }),
            ..LeaseSpec::default()
        }
    }

    /// One round: reads the Lease, renews it if held, takes it over if free or expired.
    pub async fn round(&mut self) -> Result<Standing, String> {
        let seen = Instant::now();
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let Some(lease) = self.api.get_opt(&self.name).await.map_err(|e| why(&e))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observed = Some((created.metadata.resource_version, seen));
                    Ok(Standing::Leader)
                }
                Err(e) if conflict(&e) => Ok(Standing::Follower(None)),
                Err(e) => Err(format!("creating the lease: {}", why(&e))),
            };
        };
        let version = lease.metadata.resource_version.clone();
        let observed_at = match &self.observed {
            Some((v, at)) if *v == version => *at,
            _ => {
                self.observed = Some((version.clone(), seen));
                seen
            }
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.timing.lease_duration, Duration::from_secs);
        let expired = holder.is_none() || seen.duration_since(observed_at) >= their_duration;
        if !mine && !expired {
            return Ok(Standing::Follower(holder));
        }
        let mut next = lease;
        next.spec = Some(self.spec(Some(&spec), now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                if !mine {
                    tracing::info!(lease = %self.name, previous = holder.as_deref().unwrap_or("nobody"), "took the lease over");
                }
                self.observed = Some((written.metadata.resource_version, seen));
                Ok(Standing::Leader)
            }
            // Another replica wrote first: it renewed, or took the lease.
            Err(e) if conflict(&e) => Ok(Standing::Follower(holder.filter(|_| !mine))),
            Err(e) => Err(format!("writing the lease: {}", why(&e))),
        }
    }

    /// Gives the lease up (at a clean stop), so another replica takes over at once.
    pub async fn release(&mut self) -> Result<(), String> {
        let lease = self.api.get(&self.name).await.map_err(|e| why(&e))?;
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let mut next = lease;
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            ..spec
        });
        self.api
            .replace(&self.name, &PostParams::default(), &next)
            .await
            .map(drop)
            .map_err(|e| why(&e))
    }

    /// Rounds every `retry` until this replica leads; a failing API server is logged (when
    /// what it says changes) and retried.
    pub async fn wait_for_leadership(&mut self) {
        let mut last = None::<String>;
        loop {
            let said = match self.round().await {
                Ok(Standing::Leader) => return,
                Ok(Standing::Follower(holder)) => format!(
                    "following: the lease is held by {}",
                    holder.as_deref().unwrap_or("another replica")
                ),
                Err(err) => format!("cannot reach the lease: {err}"),
            };
            if last.as_deref() != Some(said.as_str()) {
                tracing::info!(lease = %self.name, identity = %self.identity, "{said}");
                last = Some(said);
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews every `retry` while this replica leads; returns why it no longer may (another
    /// replica holds the lease, or no renewal succeeded for `renew_deadline`).
    pub async fn hold(&mut self) -> String {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.round().await {
                Ok(Standing::Leader) => renewed = Instant::now(),
                Ok(Standing::Follower(holder)) => {
                    return format!(
                        "lost the lease to {}",
                        holder.as_deref().unwrap_or("another replica")
                    );
                }
                Err(err) => {
                    let since = renewed.elapsed();
                    if since >= self.timing.renew_deadline {
                        return format!("could not renew the lease for {since:.1?} (last: {err})");
                    }
                    tracing::warn!(lease = %self.name, error = %err, "renewing the lease failed; retrying");
                }
            }
        }
    }
}

/// What a follower serves: alive (`/healthz` 200), not ready (`/readyz` 503), and 503 with
/// `Retry-After` for everything else, saying which lease decides.
pub fn follower_router(lease: &str) -> Router {
    let lease = lease.to_owned();
    let not_leader = move || {
        let body = format!("not the leader: the holder of the lease {lease} acts; retry\n");
        async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                body,
            )
                .into_response()
        }
    };
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { "ok (follower)\n" }),
        )
        .fallback(not_leader)
}

/// A router that serves whatever `current` holds now: the follower's until this replica
/// leads, then the actioner's.
pub fn switching_router(current: watch::Receiver<Router>) -> Router {
    Router::new().fallback(move |request: Request| {
        let router = current.borrow().clone();
        async move {
            match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_namespace_slash_name() {
        let ha = |lease: &str| HaConfig {
            lease: lease.into(),
            lease_duration: default_duration(),
        };
        assert_eq!(
            ha("aistack/aistack-actioner").lease(),
            Some(("aistack", "aistack-actioner"))
        );
        for bad in ["aistack", "/x", "x/", "Aistack/x", "a.b/x", "a/b/c", "a/-x"] {
            assert_eq!(ha(bad).lease(), None, "{bad}");
        }
        let timing = ha("a/b").timing();
        assert_eq!(timing.lease_duration, Duration::from_secs(8));
        assert!(timing.renew_deadline < timing.lease_duration);
        assert_eq!(timing.retry, Duration::from_secs(2));
        // Takeover: a lease duration (as observed) plus one round, within 15 s.
        assert!(timing.lease_duration + 2 * timing.retry <= Duration::from_secs(15));
    }
}
