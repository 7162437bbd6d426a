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
//! A leader steps down — ends its process — once `renew_deadline` (two thirds of
//! `lease_duration`) has passed since the *request* of its last successful renewal was sent;
//! every call to the API server is cut at that deadline, however the network stalls. Another
//! replica takes over only `lease_duration` after it *received* that renewal: the old leader
//! has stopped at least a third of a lease duration before, so two replicas never act at once.
//! A leader that was frozen or suspended past that deadline writes and calls nothing when it
//! wakes ([`crate::fence`]). An action cut short is journaled as interrupted by the next leader, which reads the same
//! journal (shared storage) and never runs it again.
//!
//! Every replica is ready (its readiness probe is `/healthz`) and may receive webhooks, API
//! calls and button presses (a Service, a PodDisruptionBudget and rolling updates work as
//! usual): a follower forwards them to the
//! leader's address, which the leader writes on the Lease (annotation `aistack.io/leader-url`),
//! and answers what the leader answered; with no leader known it answers 503, and
//! Alertmanager retries. A follower serves its own `/healthz` and `/metrics`
//! (`aistack_actioner_leader 0`); `/readyz` answers 200 on the leader only.

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

use crate::fence::Fence;

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
            (Duration::from_secs(4)..=Duration::from_secs(60)).contains(&duration)
                && duration.subsec_nanos() == 0,
            "ha.lease_duration",
            "must be whole seconds, between 4s and 60s (the Lease counts in seconds)",
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

/// This process's name in the Lease: `POD_NAME`, else the host name, and a random suffix of
/// this process (as client-go does), so that two processes of one name — a pod restarted, two
/// replicas on one host — never both take the lease for theirs.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "aistack-actioner".into());
    let suffix = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .ok()
        .and_then(|u| u.trim().get(..8).map(str::to_owned))
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            format!("{:08x}", nanos ^ std::process::id())
        });
    format!("{base}_{suffix}")
}

/// The annotation on the Lease that holds the leader's URL, for followers to forward to.
pub const LEADER_URL: &str = "aistack.io/leader-url";

/// Marks a request a follower forwarded, so that it is never forwarded again.
pub const FORWARDED: &str = "x-aistack-forwarded";

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
    /// Where other replicas reach this one, written on the Lease while it leads.
    advertise: Option<String>,
    /// The leader's URL as the Lease last said (`None`: no leader known, or this replica).
    leader_url: watch::Sender<Option<String>>,
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
    /// Reachable by the other replicas at `advertise`. Every API call is cut after `retry`.
    pub async fn connect(
        namespace: &str,
        name: &str,
        identity: String,
        timing: Timing,
        advertise: Option<String>,
    ) -> Result<Self, String> {
        aistack_common::install_tls_provider();
        let no_api = |e: &dyn std::fmt::Display| {
            format!(
                "no Kubernetes API for the lease: {e} (in a pod: its service account; elsewhere: KUBECONFIG)"
            )
        };
        let mut config = kube::Config::infer().await.map_err(|e| no_api(&e))?;
        config.connect_timeout = Some(timing.retry);
        config.read_timeout = Some(timing.retry);
        config.write_timeout = Some(timing.retry);
        let client = kube::Client::try_from(config).map_err(|e| no_api(&e))?;
        Ok(Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            timing,
            observed: None,
            advertise,
            leader_url: watch::Sender::new(None),
        })
    }

    /// The leader's URL as last read from the Lease.
    pub fn leader_url(&self) -> watch::Receiver<Option<String>> {
        self.leader_url.subscribe()
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

    fn annotate(&self, metadata: &mut ObjectMeta) {
        let annotations = metadata.annotations.get_or_insert_with(Default::default);
        match &self.advertise {
            Some(url) => annotations.insert(LEADER_URL.into(), url.clone()),
            None => annotations.remove(LEADER_URL),
        };
    }

    /// One round: reads the Lease, renews it if held, takes it over if free or expired.
    pub async fn round(&mut self) -> Result<Standing, String> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let read = self.api.get_opt(&self.name).await.map_err(|e| why(&e))?;
        // When this replica learnt of the record: after the answer, never before (client-go).
        let seen = Instant::now();
        let Some(lease) = read else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, now)),
            };
            self.annotate(&mut lease.metadata);
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
            let url = lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LEADER_URL))
                .cloned();
            self.leader_url.send_replace(url);
            return Ok(Standing::Follower(holder));
        }
        let mut next = lease;
        next.spec = Some(self.spec(Some(&spec), now));
        self.annotate(&mut next.metadata);
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
                self.leader_url.send_replace(None);
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
        if let Some(annotations) = &mut next.metadata.annotations {
            annotations.remove(LEADER_URL);
        }
        self.api
            .replace(&self.name, &PostParams::default(), &next)
            .await
            .map(drop)
            .map_err(|e| why(&e))
    }

    /// Rounds every `retry` until this replica leads; a failing API server is logged (when
    /// what it says changes) and retried. Returns when the winning round's request was sent.
    pub async fn wait_for_leadership(&mut self) -> Instant {
        let mut last = None::<String>;
        loop {
            let sent = Instant::now();
            let said = match self.round().await {
                Ok(Standing::Leader) => return sent,
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
}

/// Renews every `retry` while this replica leads, from the winning round sent at `won`,
/// moving `fence` to each new deadline; returns why it no longer may: another replica holds
/// the lease, or `renew_deadline` passed since the request of the last successful renewal was
/// sent (every call is cut there).
pub async fn hold(
    elector: std::sync::Arc<tokio::sync::Mutex<Elector>>,
    won: Instant,
    fence: Fence,
) -> String {
    let (timing, name) = {
        let e = elector.lock().await;
        (e.timing, e.name.clone())
    };
    let mut renewed = won;
    loop {
        let deadline = tokio::time::Instant::from_std(renewed + timing.renew_deadline);
        let next = tokio::time::Instant::now() + timing.retry;
        tokio::time::sleep_until(next.min(deadline)).await;
        if tokio::time::Instant::now() >= deadline {
            return format!(
                "could not renew the lease within {:.1?}",
                timing.renew_deadline
            );
        }
        let sent = Instant::now();
        let sent_boot = crate::fence::now();
        let round = tokio::time::timeout_at(deadline, async { elector.lock().await.round().await });
        match round.await {
            Ok(Ok(Standing::Leader)) => {
                renewed = sent;
                fence.extend(sent_boot + timing.renew_deadline);
            }
            Ok(Ok(Standing::Follower(holder))) => {
                return format!(
                    "lost the lease to {}",
                    holder.as_deref().unwrap_or("another replica")
                );
            }
            Ok(Err(err)) => {
                tracing::warn!(lease = %name, error = %err, "renewing the lease failed; retrying until the renew deadline");
            }
            Err(_) => {
                return format!(
                    "could not renew the lease within {:.1?} (the API server did not answer)",
                    timing.renew_deadline
                );
            }
        }
    }
}

/// What a follower serves: `/healthz` (alive), `/metrics` (`aistack_actioner_leader 0`),
/// `/readyz` 503 (it does not act), and every other request forwarded to the leader at the URL
/// the Lease names — its answer, or 503 with `Retry-After` when no leader is known or it does
/// not answer. A request a follower forwarded is never forwarded again.
pub fn follower_router(
    lease: &str,
    leader: watch::Receiver<Option<String>>,
    max_body_bytes: usize,
) -> Router {
    let lease = lease.to_owned();
    // As the leader's own handlers may take (its request timeout), following no redirect.
    let client =
        crate::actions::recheck_client(Duration::from_secs(2), Duration::from_secs(90)).ok();
    let metrics = format!(
        "# HELP aistack_actioner_leader {}\n# TYPE aistack_actioner_leader gauge\naistack_actioner_leader 0\n",
        crate::metrics::LEADER_HELP
    );
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { "ok (follower)\n" }),
        )
        .route(
            "/readyz",
            axum::routing::get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "not the leader\n") }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics,
                    )
                }
            }),
        )
        .fallback(move |request: Request| {
            let url = leader.borrow().clone();
            let (client, lease) = (client.clone(), lease.clone());
            async move { forward(client, url, &lease, request, max_body_bytes).await }
        })
}

fn unavailable(why: String) -> axum::response::Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        why,
    )
        .into_response()
}

/// Sends `request` on to the leader at `leader` and answers what it answered.
async fn forward(
    client: Option<reqwest::Client>,
    leader: Option<String>,
    lease: &str,
    request: Request,
    max_body_bytes: usize,
) -> axum::response::Response {
    if request.headers().contains_key(FORWARDED) {
        return unavailable("not the leader either: the leader moved; retry\n".into());
    }
    let (Some(client), Some(leader)) = (client, leader) else {
        return unavailable(format!(
            "not the leader, and no leader is known: the holder of the lease {lease} acts; retry\n"
        ));
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, max_body_bytes).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut outgoing = client
        .request(
            parts.method,
            format!("{}{path}", leader.trim_end_matches('/')),
        )
        .header(FORWARDED, "1")
        .body(body);
    // Hop-by-hop headers describe this connection, not the request (RFC 9110, 7.6.1): the
    // body goes on whole, with its own length.
    let hop_by_hop = [
        header::HOST,
        header::CONTENT_LENGTH,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ];
    for (name, value) in &parts.headers {
        if !hop_by_hop.contains(name) && name.as_str() != "keep-alive" {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = match outgoing.send().await {
        Ok(answer) => answer,
        Err(err) => {
            tracing::debug!(%leader, error = %err, "forwarding to the leader failed");
            return unavailable(format!("the leader ({leader}) does not answer; retry\n"));
        }
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    // Cut off mid-answer (the leader died): retry rather than pass on half an answer.
    let Ok(body) = answer.bytes().await else {
        return unavailable(format!("the leader ({leader}) stopped answering; retry\n"));
    };
    let mut response = (status, body).into_response();
    for name in [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::WWW_AUTHENTICATE,
    ] {
        if let Some(value) = headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
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
